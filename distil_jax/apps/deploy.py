"""The demo's models as users deploy them (mode deploy): ONNX, fp32 and int8, scored.

    python -m distil_jax.main --config=configs/demo.py --workdir=DIR --config.mode=deploy

From the demo's teacher and distilled student (its stages run first where DIR has none),
each model is exported to ONNX (fill-mask, checked against PyTorch within 1e-4) and
quantized to int8 (onnx_export.py), in DIR/deploy/NAME/onnx. Scored on what the demo
scores, in ONNX Runtime: held-out MLM accuracy on the demo's fixed masks (the JAX model,
the fp32 and the int8 ONNX model on the same targets, each difference with its paired
standard error), and the downstream task: each model fine-tuned on `finetune.task` by
mode finetune in DIR/finetune/NAME (the demo's runs, read back when it made them),
exported as *ForSequenceClassification (DIR/deploy/NAME_classifier, what
pipeline("text-classification") loads) and to ONNX fp32 and int8, scored on the same
held-out examples. File sizes beside. Writes DIR/deploy.md and DIR/deploy.json;
`python -m distil_jax.bench deploy` times the same files.
"""

from __future__ import annotations

import os
from typing import Dict

import jax
import numpy as np

from distil_jax.interop import hf, hf_heads, onnx_export
from distil_jax.apps import evaluate, finetune, stages
from distil_jax.train import task

FP32, INT8 = "onnx fp32", "onnx int8"


def _bytes(hf_dir: str) -> int:
    return os.path.getsize(os.path.join(hf_dir, "model.safetensors"))


def task_scores(config, source: str, run_dir: str, out_dir: str) -> Dict:
    """`source` fine-tuned on `finetune.task` in `run_dir` (mode finetune's run; one the demo
    finished is read back), exported, and scored in JAX and ONNX fp32 / int8 on the same
    held-out examples: accuracies, paired differences, file sizes."""
    _, hits_jax, tuned = finetune.finetune_in(config, run_dir, source)
    task_set, held = tuned.task, tuned.task.held_out
    hf_dir = hf_heads.save_hf_classifier(jax.device_get(tuned.params), tuned.model.config, out_dir, task_set.labels,
                                         tokenizer=tuned.tokenizer)
    files = onnx_export.export(hf_dir, task="text-classification")
    hits = {"jax": hits_jax}
    for kind, label in (("fp32", FP32), ("int8", INT8)):
        forward = onnx_export.onnx_forward(onnx_export.session(files[kind]["path"]))
        logits = task.in_blocks(lambda block: forward(block["input_ids"], block["attention_mask"]), held)
        hits[label] = logits.argmax(-1) == held["labels"]
    examples = np.arange(len(held["labels"]))
    return {"task": task_set.name, "held_out": int(len(held["labels"])), "hf_dir": hf_dir,
            "accuracy": {k: float(v.mean()) for k, v in hits.items()},
            "comparisons": {f"{INT8} - {FP32}": evaluate.paired_difference(hits[INT8], hits[FP32], examples),
                            f"{FP32} - jax": evaluate.paired_difference(hits[FP32], hits["jax"], examples)},
            "bytes": {"safetensors": _bytes(hf_dir), **{k: files[k]["bytes"] for k in ("fp32", "int8")}},
            "max_difference": files["fp32"]["max_difference"]}


def run(config, workdir: str) -> Dict:
    """Mode deploy: export, quantize and score the demo's teacher and student."""
    plan, clock = stages.start(config, workdir)
    dirs = {"teacher": plan.teacher_hf, "student": stages.ensure_student("student", plan, clock)}
    out: Dict = {"models": {}}
    forwards = {}
    for name, hf_dir in dirs.items():
        model = hf.load_hf_model(hf_dir)
        files = onnx_export.export(hf_dir, os.path.join(workdir, "deploy", name, "onnx"))
        forwards[name] = model
        for kind, label in (("fp32", FP32), ("int8", INT8)):
            forwards[f"{name} {label}"] = onnx_export.onnx_forward(onnx_export.session(files[kind]["path"]))
        out["models"][name] = {
            "hf_dir": hf_dir, "parameters": stages.count_parameters(model[1]),
            "bytes": {"safetensors": _bytes(hf_dir), "fp32": files["fp32"]["bytes"], "int8": files["int8"]["bytes"]},
            "onnx": {k: files[k]["path"] for k in ("fp32", "int8")}, "max_difference": files["fp32"]["max_difference"]}
        if finetune.finetunes(config):
            out["models"][name]["task"] = task_scores(config, hf_dir, os.path.join(workdir, "finetune", name),
                                                      os.path.join(workdir, "deploy", f"{name}_classifier"))
    found, _ = evaluate.compare_on_held_out(plan.student_config, workdir, forwards,
                                            vocab_size=forwards["teacher"][0].config.vocab_size)
    pairs = found["comparisons"]
    for name in dirs:
        out["models"][name]["mlm_accuracy"] = {k: found["models"][f"{name} {k}" if k != "jax" else name]["mlm_accuracy"]
                                               for k in ("jax", FP32, INT8)}
        out["models"][name]["mlm_comparisons"] = {
            f"{INT8} - {FP32}": evaluate.pair(pairs, f"{name} {INT8}", f"{name} {FP32}"),
            f"{FP32} - jax": evaluate.pair(pairs, f"{name} {FP32}", name)}
    out["held_out_targets"] = found["models"]["teacher"]["targets"]
    t, s = out["models"]["teacher"]["bytes"], out["models"]["student"]["bytes"]
    out["student_int8_over_teacher_fp32_bytes"] = s["int8"] / t["fp32"]
    text = format_table(out)
    stages.write_outputs(workdir, {"deploy.json": out, "deploy.md": text}, show=text)
    return {"table": os.path.join(workdir, "deploy.md"),
            "student_int8_mlm_cost": out["models"]["student"]["mlm_comparisons"][f"{INT8} - {FP32}"]}


def format_table(out: Dict) -> str:
    runtimes, pairs = [], []
    for name, m in out["models"].items():
        task = m.get("task", {}).get("accuracy", {})
        for k, size in (("jax", "safetensors"), (FP32, "fp32"), (INT8, "int8")):
            runtimes.append([name, k, f"{m['bytes'][size] / 1e6:.2f}", f"{100 * m['mlm_accuracy'][k]:.2f}",
                             f"{100 * task[k]:.2f}" if k in task else ""])
        for c, mlm in m["mlm_comparisons"].items():
            tuned = m.get("task", {}).get("comparisons", {}).get(c)
            pairs.append([f"{name}: {c}", f"{100 * mlm['difference']:+.2f} ± {100 * mlm['se']:.2f}",
                          "" if tuned is None else f"{100 * tuned['difference']:+.2f} ± {100 * tuned['se_iid']:.2f}"])
    lines = [stages.markdown_table(["model", "runtime", "file (MB)", "held-out MLM accuracy (%)",
                                    "fine-tuned accuracy (%)"], runtimes, right=(False, False, True, True, True)), "",
             stages.markdown_table(["comparison", "held-out MLM accuracy, points ± paired s.e.",
                                    "fine-tuned accuracy, points ± paired s.e."], pairs, right=(False, True, True))]
    lines.append("")
    lines.append(f"{out['held_out_targets']:,} held-out MLM targets, the same for every row (standard errors "
                 "clustered by sequence); fine-tuned accuracy on the same held-out examples for every row. "
                 f"int8 student file / fp32 teacher file: {100 * out['student_int8_over_teacher_fp32_bytes']:.1f}%.")
    return "\n".join(lines)
