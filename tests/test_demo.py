"""The embedded demo end to end on a reduced variant, with the demo's directions; the ablation."""

import importlib
import json
import os

import numpy as np
import pytest
import transformers

from distil_jax import assets, main
from distil_jax.apps import ablate
from distil_jax.config import with_changes

# The demo made small enough for CI: the shipped teacher, sequences of 32 (one length, one
# compiled step), 100 updates of 16 sequences instead of 500 of 32, 4 held-out batches
# instead of all, one epoch of fine-tuning (51 updates; 20 leave the students under half
# right, the distilled one 5.54 ± 2.15 points behind its twin: the assertions fail).
# Measured alone: 107 s (162 CPU-s), 44 s for the two ablation rows, 40 s for deploy. With
# batches of 16 the distillation gain is 1.67 points, 4.9 paired s.e. (1.02 and 2.7 with
# 32), and the fine-tuned student is +0.44 ± 1.04 points over its twin.
REDUCED = {"data.seq_len": 32, "data.length_buckets": (32,), "demo.student_train.steps": 100,
           "train.batch_size": 16, "train.micro_batch_size": 16, "eval.batches": 4,
           "finetune.train.epochs": 1, "finetune.max_len": 32, "demo.examples": 2, "checkpoint.every_steps": 1000,
           "demo.inference_batches": 2}
REDUCED_FLAGS = [f"--config.{k}={v}" for k, v in REDUCED.items()]
SUMMARY_FIELDS = (
    "teacher_parameters", "student_parameters", "teacher_mlm_accuracy", "student_mlm_accuracy",
    "teacher_perplexity", "student_perplexity", "retention", "agreement", "teacher_inference_s",
    "student_inference_s", "speedup", "stage_seconds", "student_hf", "most_frequent_token_accuracy",
    "student_mlm_only_accuracy", "student_mlm_only_perplexity", "distillation_gain", "distillation_gain_se",
    "teacher_finetune_accuracy", "student_finetune_accuracy", "student_mlm_only_finetune_accuracy",
    "student_task_kd_finetune_accuracy", "task_distillation_gain", "task_distillation_gain_se",
    "comparisons", "finetune_comparisons", "examples", "held_out_targets")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, run_main):
    workdir = tmp_path_factory.mktemp("demo")
    out = run_main("configs/demo.py", workdir, *REDUCED_FLAGS, timeout=900, optimised=True)
    assert out["retention"] > 0
    return workdir


def test_the_shipped_teacher_is_small_and_loads():
    files = sorted(os.listdir(assets.DEMO_TEACHER))
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert sum(os.path.getsize(os.path.join(assets.DEMO_TEACHER, f)) for f in files) <= 10 * 2**20
    model = transformers.AutoModelForMaskedLM.from_pretrained(assets.DEMO_TEACHER)
    assert type(model).__name__ == "BertForMaskedLM" and model.config.num_hidden_layers == 4
    assert next(model.parameters()).dtype.__str__() in ("torch.bfloat16", "torch.float32")


def test_reduced_demo_goes_the_demos_directions(demo_dir):
    s = json.loads((demo_dir / "summary.json").read_text())
    for field in SUMMARY_FIELDS:
        assert field in s, field
    assert set(s["stage_seconds"]) >= {"prepare", "teacher", "student", "student_mlm_only", "evaluate",
                                       "finetune", "examples"}
    assert s["student_parameters"] < s["teacher_parameters"] and s["teacher"] == "shipped"
    # The directions of the full demo's targets (README): the distilled student beats its
    # MLM-only twin on the same masks by more than twice its paired standard error, keeps
    # most of the teacher (the full run's 500 updates keep 90.7%; 150 keep 87-90%), and is
    # closer to it. Fine-tuned, every model learns the task (over three times chance: 77.6-80.9%
    # here against 1/6), and the distilled student is no worse than its twin beyond two paired
    # standard errors: the full run finds no measurable difference (+1.11 ± 1.06 points),
    # and this one +0.44 ± 1.04, so asserting more would hold by determinism, not evidence.
    assert s["teacher_mlm_accuracy"] >= 5 * s["most_frequent_token_accuracy"], s
    assert s["distillation_gain"] > 2 * s["distillation_gain_se"] > 0, s
    assert s["retention"] >= 0.8, s
    task = json.loads((demo_dir / "finetune.json").read_text())
    tuned = [s[f"{name}_finetune_accuracy"] for name in ("teacher", "student", "student_mlm_only", "student_task_kd")]
    assert min(tuned) > 3 / len(task["classes"]), tuned
    fine = s["finetune_comparisons"]["student - student_mlm_only"]
    assert fine["difference"] > -2 * fine["se"] > -0.05 and fine["targets"] == task["held_out"], fine
    assert s["kl_teacher_student"] < s["student_mlm_only_kl_teacher"], s
    assert s["agreement"] > s["student_mlm_only_agreement"], s
    gain = s["comparisons"]["student - student_mlm_only"]
    assert gain["targets"] == s["held_out_targets"] and gain["only_first"] > gain["only_second"]
    assert len(s["examples"]) == 4 and all(len(e["student"]) == 3 for e in s["examples"])


def test_the_exported_student_fills_masks_in_a_transformers_pipeline(demo_dir):
    s = json.loads((demo_dir / "summary.json").read_text())
    fill = transformers.pipeline("fill-mask", model=s["student_hf"])
    guesses = fill("Return the [MASK] of the list.")
    assert len(guesses) == 5 and all(0 <= g["score"] <= 1 for g in guesses)
    assert guesses[0]["token_str"] == s["examples"][0]["student"][0][0]  # the demo's table shows the same


def test_a_second_run_skips_every_stage(demo_dir, config_file):
    before = json.loads((demo_dir / "summary.json").read_text())
    main.run(with_changes(config_file("demo").get_config(), **REDUCED), str(demo_dir))  # what the command runs
    stages = json.loads((demo_dir / "stages.json").read_text())
    assert all(v["skipped_now"] for v in stages.values()), stages
    after = json.loads((demo_dir / "summary.json").read_text())
    assert after["student_mlm_accuracy"] == before["student_mlm_accuracy"]


@pytest.mark.slow  # the second tier (pytest.ini): python -m pytest -q -m slow tests
def test_ablation_table_with_paired_errors(demo_dir, run_main):
    """Two of the ablation's rows beside the triple loss (the demo's student): 44 s and 68 CPU-s alone."""
    assert [name for name, _ in ablate.VARIANTS] == [
        "triple loss", "without L_ce", "without L_cos", "without L_mlm", "triple loss, random init",
        "triple loss, T = 1", "triple loss, T = 4"]
    run_main("configs/demo.py", demo_dir, *REDUCED_FLAGS, "--config.mode=ablate",
             "--config.demo.ablations=('without L_ce','triple loss, random init')", timeout=900, optimised=True)
    table = (demo_dir / "ablation.md").read_text()
    for variant in ("triple loss", "without L_ce", "random init", "paired s.e.", "-2.96", "-3.69"):
        assert variant in table.replace("−", "-")
    assert (demo_dir / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["variant"]: r for r in json.loads((demo_dir / "ablation.json").read_text())["rows"]}
    assert len(rows) == 3 and rows["triple loss"]["change_points"] == 0.0
    assert all(r["change_se_points"] > 0 for name, r in rows.items() if name != "triple loss")
    # As in the paper's Table 4: random initialisation is the worst row, and L_ce matters.
    assert min(rows.values(), key=lambda r: r["mlm_accuracy"])["variant"] == "triple loss, random init"
    without_ce = rows["without L_ce"]
    assert without_ce["change_points"] < -2 * without_ce["change_se_points"], without_ce
    assert np.isfinite([r["perplexity"] for r in rows.values()]).all()



def test_deploy_scores_the_demos_models_in_onnx_runtime(demo_dir, run_main):
    """Mode deploy on the demo's models: ONNX fp32 scores as JAX does on the same masks and
    examples, int8 is a small cost in a quarter of the file, the classifier loads in a pipeline.
    A subprocess with XLA's optimisations on, like the demo's: its fine-tuning is compute."""
    for needed in ("onnxruntime", "onnxscript"):  # the deploy extra: missing, this fails
        importlib.import_module(needed)
    # Scored on 2 held-out batches (every model on the same masks; the evaluation is not
    # part of any stage the deploy reads back): ONNX Runtime's forwards are most of its time.
    run_main("configs/demo.py", demo_dir, *REDUCED_FLAGS, "--config.mode=deploy", "--config.eval.batches=2",
             timeout=900, optimised=True)
    out = json.loads((demo_dir / "deploy.json").read_text())
    assert "| student | onnx int8 |" in (demo_dir / "deploy.md").read_text()
    for name in ("teacher", "student"):
        m = out["models"][name]
        assert m["max_difference"] < 1e-4 and m["task"]["max_difference"] < 1e-4
        same = m["mlm_comparisons"]["onnx fp32 - jax"]
        assert same["targets"] == out["held_out_targets"] and same["only_first"] + same["only_second"] <= 2, same
        cost = m["mlm_comparisons"]["onnx int8 - onnx fp32"]
        assert abs(cost["difference"]) < 0.03 and cost["se"] > 0, cost
        assert m["bytes"]["int8"] < 0.35 * m["bytes"]["fp32"], m["bytes"]
        task = m["task"]
        assert abs(task["accuracy"]["onnx fp32"] - task["accuracy"]["jax"]) <= 1 / task["held_out"]
    assert out["student_int8_over_teacher_fp32_bytes"] < 0.3
    classifier = transformers.pipeline("text-classification", model=out["models"]["student"]["task"]["hf_dir"])
    labels = json.loads((demo_dir / "deploy" / "student_classifier" / "config.json").read_text())["id2label"]
    assert classifier("Return the JSON encoding of an object.")[0]["label"] in labels.values()
