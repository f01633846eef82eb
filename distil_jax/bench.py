"""Benchmarks, one JSON object per line on stdout.

    python -m distil_jax.bench train [--teacher_layers 12 --student_layers 6 --hidden 768
        --heads 12 --ffn 3072 --vocab 30522 --batch 8 --seq 128 --steps 5 --dtype float32]
        [--config configs/base.py] [--loss_chunk N] [--restrict_ce_to_mask] [--remat dots]
        [--accumulation K] [--matmul] [--peak_tflops X]
    python -m distil_jax.bench infer [shape flags] [--latency_seq 128 --throughput_batch 64]
    python -m distil_jax.bench attention [shape flags] [--dtype bfloat16]
    python -m distil_jax.bench fit [shape flags] [--start 16 --bisect 2]
    python -m distil_jax.bench matmul [--size 4096 --dtype float32]
    python -m distil_jax.bench compare [shape flags]      (needs torch: the reference step)
    python -m distil_jax.bench data [--seq_len 512] [--vocab_size 30522] [--tokens 20000000]
        [--workers 1 2] [--micro_batch 32]                  (bench_data.py)
    python -m distil_jax.bench deploy [--models base|embedded] [--task feature-extraction]
        [--seq 128 --batch 32 --threads 2]       (needs the deploy extra; bench_deploy.py)

`train`: the real jitted train step (masking, teacher forward, student forward and
backward, the triple loss, clip + AdamW) on random tokens of the given shape: compile
time, median step time, tokens/s, sequences/s, model TFLOP/s (student fwd+bwd +
teacher fwd, metrics.py), MFU where the device's peak is known (or --peak_tflops), and
with --matmul the fraction of this machine's measured matmul rate; peak memory
(device peak bytes on GPU/TPU, XLA's compiled estimate and the process's peak RSS).
`infer`: forward latency (batch 1) and throughput of teacher and student on the same
inputs. `attention`: cuDNN flash attention against XLA's on a
right-padded batch (hidden states and gradients vs float32, time). `fit`: the largest micro-batch whose
train step compiles and runs on this device (each size tried in a process of its own).
`matmul`: a large jitted matrix product, the machine's practical FLOP/s.
`compare`: our step against the PyTorch reference step (torch_reference.py:
transformers' BertForMaskedLM teacher without grad + DistilBertForMaskedLM student, the
reference's triple loss with KL over all non-pad rows, AdamW, clipping) on the same
shapes, timed in turn with ours, in this process or a child process of its own.
`data`: preparation end to end (in this process, and Beam with 1 and 2 workers) against
the tokenizer alone and against `datasets.map(num_proc=2)` + `save_to_disk`, on a Parquet
corpus of 20M tokens made from the embedded text; loader throughput and the padding
fraction with and without length grouping. `deploy`: teacher and student exported
(transformers and ONNX Runtime, fp32 and int8), latency and throughput interleaved.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from distil_jax import bench_data, bench_deploy, parallel, runtime, torch_reference, trainer
from distil_jax.config import config_file, defaults, with_changes
from distil_jax.data import next_update
from distil_jax.metrics import device_peak_tflops, train_flops_per_token
from distil_jax.step import compiled_step
from distil_jax.timing import interleaved, median_seconds


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _machine() -> dict:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(), "jax": jax.__version__}


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _device_peak_gb():
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


# --- shapes -> config ---------------------------------------------------------------
def shape_config(args):
    """A distillation config of the benchmark's shape (a random teacher, synthetic data),
    or --config's file with the shape flags that were given applied on top."""
    if args.config:
        c = config_file(args.config)
    else:
        c = defaults()
        c.teacher.model.update(num_layers=args.teacher_layers, hidden_size=args.hidden,
                               num_heads=args.heads, intermediate_size=args.ffn, vocab_size=args.vocab,
                               max_position_embeddings=max(512, args.seq))
        c.student.num_layers = args.student_layers
    c.teacher.path = ""  # a random teacher of the shape: nothing to download
    c.data.source = "synthetic"
    # --batch / --seq when given, else the config file's (or 8 x 128); compare reads them back.
    if args.config:  # the file's model sizes, for the record and for compare's torch models
        m = c.teacher.model
        args.teacher_layers, args.hidden, args.heads = m.num_layers, m.hidden_size, m.num_heads
        args.ffn, args.vocab, args.student_layers = m.intermediate_size, m.vocab_size, c.student.num_layers
    args.batch = args.batch or (c.train.micro_batch_size if args.config else 8)
    args.seq = args.seq or (c.data.seq_len if args.config else 128)
    accumulation = args.accumulation
    changes = {"data.seq_len": args.seq, "train.micro_batch_size": args.batch,
               "train.batch_size": args.batch * accumulation, "train.steps": 10 ** 6,
               "train.dtype": args.dtype, "teacher.dtype": args.teacher_dtype or args.dtype,
               "train.remat": args.remat, "train.attention": args.attention,
               "distill.restrict_ce_to_mask": args.restrict_ce_to_mask, "mesh.shape": (-1, 1, 1)}
    if args.loss_chunk is not None:
        changes["train.loss_chunk"] = args.loss_chunk
    changes.update(_settings(args.set))
    return with_changes(c, **changes)


def _settings(pairs) -> dict:
    """--set KEY=VALUE ... as config changes; a VALUE that is a Python literal is read as one."""
    changes = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set takes KEY=VALUE (a dotted config key), got {pair!r}")
        try:
            changes[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            changes[key] = text
    return changes


def _random_batch(config, vocab_size: int, rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab_size, size=(rows, config.data.seq_len)).astype(np.int32)
    ids[:, 0] = 2  # a [CLS]-like first token; every position is real (no padding)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def matmul_tflops(size: int = 4096, dtype: str = "float32", steps: int = 5) -> dict:
    """The machine's practical matmul rate: a jitted [size, size] @ [size, size]."""
    one, tflops = _matmul_timer(size, dtype)
    seconds, _ = median_seconds(one, steps)
    return {"bench": "matmul", "size": size, "dtype": dtype, "seconds": seconds, "tflops": tflops(seconds)}


def bench_matmul(args) -> None:
    _emit({**matmul_tflops(args.size, args.dtype, args.steps), **_machine()})


class _StepTimer:
    """The real jitted train step of `config`, compiled, on random tokens: `one()` runs one
    update to completion; `record(times)` turns update times into the benchmark's JSON."""

    def __init__(self, config, peak_tflops: float = 0.0, label: str = "train"):
        self.config, self.peak_tflops, self.label = config, peak_tflops, label
        self._tmp = tempfile.TemporaryDirectory()
        tr = self.trainer = trainer.build(config, self._tmp.name)
        state, _ = tr.restore_or_init()
        micro = config.train.micro_batch_size
        batches = iter([_random_batch(config, tr.model.config.vocab_size, micro, seed=i)
                        for i in range(tr.accumulation)])
        batch = parallel.global_batch(next_update(batches, tr.accumulation), tr.mesh)
        start = time.perf_counter()
        compiled = compiled_step(tr.model, tr.teacher, tr.tx, tr.schedule, tr.objective, tr.mesh,
                                 tr.state_shardings, tr.teacher_shardings).lower(
            state, tr.teacher_params, batch).compile()
        self.compile_s = time.perf_counter() - start
        self.memory = compiled.memory_analysis()
        holder = {"state": state}

        def one():
            holder["state"], metrics = compiled(holder["state"], tr.teacher_params, batch)
            jax.block_until_ready(metrics)
        self.one = one

    def close(self):
        self._tmp.cleanup()

    def record(self, times) -> dict:
        config, tr, memory = self.config, self.trainer, self.memory
        seconds = float(np.median(times)) if times else None  # no times: compile only
        seq, micro, per_call = config.data.seq_len, config.train.micro_batch_size, tr.accumulation
        tokens = per_call * micro * seq
        teacher_cfg = None if tr.teacher is None else tr.teacher.config
        flops = train_flops_per_token(tr.objective, tr.model.config, teacher_cfg, seq) * tokens
        tflops = flops / seconds / 1e12 / jax.device_count() if seconds else None
        peak = device_peak_tflops(self.peak_tflops)
        t = config.train
        return {"bench": self.label, "teacher_layers": None if teacher_cfg is None else teacher_cfg.num_layers,
                "student_layers": tr.model.config.num_layers, "hidden": tr.model.config.hidden_size,
                "vocab": tr.model.config.vocab_size, "batch": micro, "seq": seq,
                "micro_batches_per_update": per_call, "dtype": t.dtype,
                "loss_chunk": t.loss_chunk, "restrict_ce_to_mask": config.distill.restrict_ce_to_mask,
                "remat": t.remat, "attention": t.attention or "xla",
                "compile_s": self.compile_s, "step_s": seconds, "step_times_s": list(times),
                "tokens_per_s": tokens / seconds if seconds else None,
                "sequences_per_s": per_call * micro / seconds if seconds else None,
                "model_tflops_per_device": tflops, "mfu": tflops / peak if peak and tflops else None,
                "peak_tflops": peak, "model_gflop_per_step": flops / 1e9,
                "xla_temp_gb": memory.temp_size_in_bytes / 2**30 if memory else None,
                "xla_argument_gb": memory.argument_size_in_bytes / 2**30 if memory else None,
                "device_peak_gb": _device_peak_gb(), "process_peak_rss_gb": _peak_rss_gb(),
                "malloc": "keep" if runtime.host_memory_kept() else "system", **_machine()}


def _matmul_timer(size: int = 4096, dtype: str = "float32"):
    """(one, tflops(seconds)): one jitted [size, size] @ [size, size], for interleaved timing."""
    a = jax.random.normal(jax.random.key(0), (size, size), getattr(jnp, dtype))
    b = jax.random.normal(jax.random.key(1), (size, size), getattr(jnp, dtype))
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    return (lambda: f(a, b).block_until_ready()), (lambda seconds: 2 * size ** 3 / seconds / 1e12)


def _timed_with_matmul(args, timer, others=None):
    """Our step (and `others`), and with --matmul the matmul rate, interleaved; returns
    (our record with the matmul fields, the other timers' times)."""
    timers = {"ours": timer.one, **(others or {})}
    if args.matmul:
        timers["matmul"], matmul_rate = _matmul_timer(args.matmul_size)
    times = interleaved(timers, args.steps, args.pause) if args.steps > 0 else {name: [] for name in timers}
    record = timer.record(times.pop("ours"))
    if args.matmul and record["step_s"]:
        rates = [matmul_rate(t) for t in times.pop("matmul")]
        rate = float(np.median(rates))
        record.update(matmul_tflops=rate, matmul_tflops_per_round=rates,
                      fraction_of_matmul=record["model_tflops_per_device"] / rate)
    return record, times


def bench_train(args) -> None:
    timer = _StepTimer(shape_config(args), args.peak_tflops)
    try:
        _emit({**_timed_with_matmul(args, timer)[0], "set": args.set})
    finally:
        timer.close()


def _fits(argv, batch: int, timeout: float):
    """One `bench train` of micro-batch `batch` in a process of its own (a fresh device
    allocator): its record, or None when it ran out of memory (or failed otherwise: the
    reason is the stderr's last line)."""
    cmd = [sys.executable, "-m", "distil_jax.bench", "train", *argv, "--batch", str(batch), "--steps", "2"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and records:
        return records[-1], "ok"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    at = next((i for i in reversed(range(len(lines))) if "RESOURCE_EXHAUSTED" in lines[i]
               or "Out of memory" in lines[i]), None)
    if at is None:
        at = next((i for i in reversed(range(len(lines))) if re.match(r"^[\w.]*(Error|Exception)\b|.*\berror: ", lines[i])), None)
    if at is None:
        return None, f"exit status {proc.returncode}"
    reason = " ".join(line.strip() for line in lines[at:at + 2 if lines[at].endswith(":") else at + 1])
    return None, reason[-300:]


def bench_fit(args, argv) -> None:
    """The largest micro-batch whose train step compiles and runs: doubling from --start
    until a size fails, then --bisect halvings of the gap, each size in its own process."""
    shape_argv = _without(argv, ("--start", "--max_batch", "--bisect", "--trial_timeout", "--batch", "--steps"))
    tried, best, best_record, failed = {}, None, None, None
    batch = args.start
    while failed is None and batch <= args.max_batch:
        record, tried[batch] = _fits(shape_argv, batch, args.trial_timeout)
        if record is None:
            failed = batch
        else:
            best, best_record = batch, record
            batch *= 2
    for _ in range(args.bisect):
        if best is None or failed is None or failed - best <= 1:
            break
        batch = (best + failed) // 2
        record, tried[batch] = _fits(shape_argv, batch, args.trial_timeout)
        if record is None:
            failed = batch
        else:
            best, best_record = batch, record
    out = {"bench": "fit", "set": args.set, "largest_micro_batch": best, "smallest_failed": failed,
           "tried": {str(b): why for b, why in sorted(tried.items())}}
    if best_record:
        out.update({k: best_record.get(k) for k in ("teacher_layers", "student_layers", "hidden", "vocab", "seq",
                                                "dtype", "attention", "remat", "loss_chunk", "step_s",
                                                "tokens_per_s", "mfu", "device_peak_gb", "compile_s")})
    _emit({**out, **_machine()})


def _without(argv, flags):
    """argv less the given flags (and their values)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif not any(a.startswith(f + "=") for f in flags):
            out.append(a)
    return out


def bench_attention(args) -> None:
    """The fused attention kernel against XLA's on one BERT-shaped encoder (the student's
    shape, the given dtype) and a right-padded batch (lengths from a quarter to all of
    --seq): the last hidden state and the gradient of a loss on it, each as the relative
    error ||x - ref|| / ||ref|| against XLA attention in float32, and the forward + backward
    time of each. The kernel's error should be the dtype's (the XLA row in the same dtype)."""
    from distil_jax.models import DistilBert, DistilBertConfig
    cfg = DistilBertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.student_layers,
                           num_heads=args.heads, intermediate_size=args.ffn,
                           max_position_embeddings=max(512, args.seq))
    rng = np.random.default_rng(0)
    rows = args.batch or 8
    ids = rng.integers(5, args.vocab, (rows, args.seq)).astype(np.int32)
    lengths = rng.integers(args.seq // 4, args.seq + 1, rows)
    mask = (np.arange(args.seq)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0)
    params = DistilBert(cfg).init(jax.random.key(0), ids[:1], mask[:1])["params"]

    def loss_and_grad(dtype, impl):
        model = DistilBert(cfg, dtype=getattr(jnp, dtype), attention_impl=impl)

        def loss(p):
            h = model.apply({"params": p}, ids, mask, compute_logits=False).hidden_states[-1]
            h = h.astype(jnp.float32) * mask[..., None]
            return jnp.sum(h * jnp.sin(jnp.arange(h.shape[-1]))) / mask.sum(), h
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    def flat(tree):
        return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])

    def rel(x, ref):
        return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))

    (_, h_ref), g_ref = loss_and_grad("float32", None)(params)
    h_ref, g_ref = np.asarray(h_ref, np.float64), flat(g_ref)
    out = {"bench": "attention", "dtype": args.dtype, "batch": rows, "seq": args.seq,
           "layers": args.student_layers, "hidden": args.hidden, **_machine()}
    for name, impl in (("xla", None), ("cudnn", "cudnn")):
        f = loss_and_grad(args.dtype, impl)
        try:
            (_, h), g = f(params)
        except Exception as e:  # noqa: BLE001 -- a kernel this device or shape lacks
            out[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            continue
        out[f"{name}_hidden_rel_err"] = rel(np.asarray(h, np.float64), h_ref)
        out[f"{name}_grad_rel_err"] = rel(flat(g), g_ref)
        seconds, _ = median_seconds(lambda: jax.block_until_ready(f(params)), args.steps)
        out[f"{name}_fwd_bwd_ms"] = seconds * 1e3
    _emit(out)


def bench_infer(args) -> None:
    """Teacher vs student forward (encoder + MLM features, no vocabulary projection)."""
    with tempfile.TemporaryDirectory() as tmp:
        tr = trainer.build(shape_config(args), tmp)
    models = {"teacher": (tr.teacher, tr.teacher_params), "student": (tr.model, tr.initial_params())}
    out = {"bench": "infer", "dtype": args.dtype, **_machine()}
    for name, (module, params) in models.items():
        forward = jax.jit(lambda p, ids, am, m=module: m.apply(
            {"params": p}, ids, am, deterministic=True, compute_logits=False).last_hidden_state)
        for setting, rows, seq in (("latency", 1, args.latency_seq),
                                   ("throughput", args.throughput_batch, args.latency_seq)):
            ids = np.random.default_rng(0).integers(5, tr.model.config.vocab_size, (rows, seq)).astype(np.int32)
            am = np.ones_like(ids)
            forward(params, ids, am).block_until_ready()
            seconds, _ = median_seconds(lambda: forward(params, ids, am).block_until_ready(), args.steps)
            out[f"{name}_{setting}_ms"] = seconds * 1e3
            out[f"{name}_{setting}_sequences_per_s"] = rows / seconds
        out[f"{name}_params"] = int(sum(x.size for x in jax.tree.leaves(params)))
    out["latency_speedup"] = out["teacher_latency_ms"] / out["student_latency_ms"]
    out["throughput_speedup"] = out["student_throughput_sequences_per_s"] / out["teacher_throughput_sequences_per_s"]
    out.update(latency_batch=1, throughput_batch=args.throughput_batch, seq=args.latency_seq)
    _emit(out)


def bench_compare(args) -> None:
    """Ours and the reference step (and with --matmul the matmul) timed in turn, one of each
    per round (`timing.interleaved`); medians over the rounds, and the per-round speed-ups."""
    timer = _StepTimer(shape_config(args), args.peak_tflops, label="compare/ours")
    close = None
    try:
        if args.torch_process == "separate":
            ref_one, ref_record, close = torch_reference.separate_process_timer(args)
        else:
            ref_one, ref_record = torch_reference.step_timer(args)
        ours, times = _timed_with_matmul(args, timer, {"torch": ref_one})
        ref = ref_record(times["torch"])
    finally:
        timer.close()
        if close:
            close()
    if args.torch_process == "same":
        ref.update(process="same", malloc="keep" if runtime.host_memory_kept() else "system")
    ours["torch_process"] = args.torch_process
    ours["speedup_vs_torch"] = ours["tokens_per_s"] / ref["tokens_per_s"]
    ours["speedup_vs_torch_per_round"] = sorted(t / o for t, o in zip(ref["step_times_s"], ours["step_times_s"]))
    _emit(ref)
    _emit(ours)


def _model_flags(p) -> None:
    """The models' shapes (BERT-base and its 6-layer student by default)."""
    p.add_argument("--teacher_layers", type=int, default=12)
    p.add_argument("--student_layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=30522)


def _shape_flags(p) -> None:
    p.add_argument("--config", default="", help="a config file; the shape flags given apply on top")
    _model_flags(p)
    p.add_argument("--batch", type=int, default=0, help="sequences per micro-batch (default: "
                   "the config's, else 8)")
    p.add_argument("--seq", type=int, default=0, help="default: the config's, else 128")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported); "
                   "train: 0 compiles only (memory)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--teacher_dtype", default="", help="default: --dtype")
    p.add_argument("--loss_chunk", type=int, default=None, help="rows per block of the vocabulary terms; 0: one block")
    p.add_argument("--restrict_ce_to_mask", action="store_true")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    p.add_argument("--attention", default="", choices=("", "xla", "cudnn"))
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per update")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config change on top, e.g. --set student.attention_dropout=0.0 (repeatable)")
    p.add_argument("--peak_tflops", type=float, default=0.0)
    p.add_argument("--latency_seq", type=int, default=128)
    p.add_argument("--throughput_batch", type=int, default=64)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distil_jax.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "the jitted train step: time, tokens/s, TFLOP/s, MFU, memory"),
                        ("attention", "cuDNN vs XLA attention: errors against float32 XLA, time"),
                        ("infer", "teacher vs student forward latency and throughput"),
                        ("compare", "our train step vs the PyTorch reference step (needs torch)")):
        p = sub.add_parser(name, help=help_)
        _shape_flags(p)
        if name in ("train", "compare"):
            p.add_argument("--matmul", action="store_true", help="also measure the matmul rate")
            p.add_argument("--matmul_size", type=int, default=4096)
            p.add_argument("--pause", type=float, default=0.5, help="seconds of rest before each "
                           "timed step or matmul (lets the previous one's threads go idle)")
        if name == "compare":
            p.add_argument("--torch_process", default="same", choices=("same", "separate"),
                           help="same: the reference runs in this process, with this process's "
                           "malloc settings (runtime.keep_host_memory); separate: in a child process with the "
                           "system's malloc, as the reference's users run it")
    fit = sub.add_parser("fit", help="the largest micro-batch whose train step runs (doubling, then bisection)")
    _shape_flags(fit)
    fit.add_argument("--start", type=int, default=16, help="the first micro-batch tried")
    fit.add_argument("--max_batch", type=int, default=4096)
    fit.add_argument("--bisect", type=int, default=2, help="halvings of the gap after the first failure")
    fit.add_argument("--trial_timeout", type=float, default=600.0, help="seconds per size")
    mm = sub.add_parser("matmul", help="a large jitted matmul: the machine's practical FLOP/s")
    mm.add_argument("--size", type=int, default=4096)
    mm.add_argument("--dtype", default="float32")
    mm.add_argument("--steps", type=int, default=5)
    data = sub.add_parser("data", help="preparation (in-process, Beam workers) against the tokenizer alone "
                          "and datasets.map; loader throughput; padding (bench_data.py)")
    bench_data.add_flags(data)
    dep = sub.add_parser("deploy", help="exported teacher and student: PyTorch and ONNX Runtime, fp32 and int8")
    _model_flags(dep)  # --models base
    bench_deploy.add_flags(dep)
    args = parser.parse_args(argv)
    if args.command != "data":  # as main.py does for the steps; its one arena would serialise the tokenizer
        runtime.keep_host_memory()
    if args.command == "deploy":
        return _emit(bench_deploy.run(args))
    if args.command == "data":
        for record in bench_data.run(args):
            _emit({**record, **(_machine() if record["bench"] == "data/tokenize" else {})})
        return
    if args.command == "fit":
        argv = sys.argv[1:] if argv is None else list(argv)
        return bench_fit(args, argv[argv.index("fit") + 1:])
    {"train": bench_train, "infer": bench_infer, "matmul": bench_matmul, "attention": bench_attention,
     "compare": bench_compare}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
