"""The embedded default, end to end (mode `demo`): the whole DistilBERT story on a CPU.

    python -m distil_jax.main --config=configs/demo.py --workdir=DIR

Stages, each in its own place in DIR and skipped when already done:
  data/               the embedded corpus prepared with a WordPiece tokenizer trained on it
  teacher/            a small BERT pretrained with MLM (mode pretrain) -> teacher/hf
  student/            a student of half the teacher's layers, initialised from it, distilled
                      with the triple loss
  student_mlm_only/   the same student trained with the MLM loss alone, same steps
  student_hf/         the student exported for Hugging Face
  eval.json           teacher, students and the most-frequent-token baseline on the same
                      held-out masks; inference time of teacher and student
  finetune.json       teacher and student fine-tuned on which-package-is-this-docstring-from
  summary.json        all of it, plus parameter counts and each stage's wall time
To re-run a stage, delete its directory or file (and those of the stages after it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any, Dict

import jax

from distil_jax.config import with_changes

STAGES = ("prepare", "teacher", "student", "student_mlm_only", "export", "evaluate", "finetune")


def stage_config(config, mode: str = None, **changes):
    """The demo's config for one stage: `mode` and dotted-key changes."""
    if mode is not None:
        changes["mode"] = mode
    return with_changes(config, **changes)


class StageClock:
    """Wall time of each stage, kept across runs (a skipped stage keeps its first time)."""

    def __init__(self, path: str):
        self.path = path
        self.times: Dict[str, dict] = {}
        if os.path.exists(path):
            with open(path) as f:
                self.times = json.load(f)

    @contextlib.contextmanager
    def stage(self, name: str, done: bool):
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        if done and name in self.times:
            self.times[name]["skipped_now"] = True
        else:
            self.times[name] = {"seconds": round(seconds, 2), "skipped_now": False}
        with open(self.path, "w") as f:
            json.dump(self.times, f, indent=2)


def _exported(path: str) -> bool:
    return os.path.exists(os.path.join(path, "model.safetensors"))


def _count(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


@dataclasses.dataclass
class Plan:
    """Where each stage of the demo lives and the config it runs with."""

    data_dir: str
    teacher_dir: str
    teacher_hf: str
    student_dir: str
    student_hf: str
    mlm_only_dir: str
    pretrain: Any
    student: Any
    mlm_only: Any


def make_plan(config, workdir: str) -> Plan:
    d = config.demo
    data_dir = config.data.dir or os.path.join(workdir, "data")
    teacher_dir = os.path.join(workdir, "teacher")
    teacher_hf, student_hf = os.path.join(teacher_dir, "hf"), os.path.join(workdir, "student_hf")
    pretrain = stage_config(config, mode="pretrain", **{"data.dir": data_dir, "train.steps": d.teacher_steps,
                                                        "train.learning_rate": d.teacher_learning_rate,
                                                        "export.dir": teacher_hf})
    student = stage_config(config, mode="distill", **{
        "data.dir": data_dir, "teacher.path": teacher_hf, "train.steps": d.student_steps,
        "train.learning_rate": d.student_learning_rate, "export.dir": student_hf})
    mlm_only = stage_config(student, **MLM_ONLY)
    return Plan(data_dir, teacher_dir, teacher_hf, os.path.join(workdir, "student"), student_hf,
                os.path.join(workdir, "student_mlm_only"), pretrain, student, mlm_only)


MLM_ONLY = {"distill.alpha_ce": 0.0, "distill.alpha_cos": 0.0, "distill.alpha_mse": 0.0,
            "distill.alpha_mlm": 1.0}


def ensure_teacher(plan: Plan, clock: StageClock) -> None:
    """The prepared corpus and the pretrained, exported teacher (skipped when there)."""
    from distil_jax import train
    from distil_jax.data.prepare import prepare
    with clock.stage("prepare", done=os.path.exists(os.path.join(plan.data_dir, "manifest.json"))):
        prepare(plan.pretrain, plan.data_dir)
    with clock.stage("teacher", done=_exported(plan.teacher_hf)):
        if not _exported(plan.teacher_hf):
            train.train_and_evaluate(plan.pretrain, plan.teacher_dir)
            train.export_checkpoint(plan.pretrain, plan.teacher_dir)


def run_demo(config, workdir: str) -> Dict:
    from distil_jax import finetune, hf, train
    from distil_jax.data.tokenizer import load_tokenizer

    d = config.demo
    plan = make_plan(config, workdir)
    clock = StageClock(os.path.join(workdir, "stages.json"))
    ensure_teacher(plan, clock)
    with clock.stage("student", done=_exported(plan.student_hf)):
        if not _exported(plan.student_hf):
            train.train_and_evaluate(plan.student, plan.student_dir)
    if d.mlm_only_baseline:
        marker = os.path.join(plan.mlm_only_dir, "done")
        with clock.stage("student_mlm_only", done=os.path.exists(marker)):
            if not os.path.exists(marker):
                train.train_and_evaluate(plan.mlm_only, plan.mlm_only_dir)
                open(marker, "w").close()
    with clock.stage("export", done=_exported(plan.student_hf)):
        if not _exported(plan.student_hf):
            train.export_checkpoint(plan.student, plan.student_dir)
    teacher_hf, student_hf, data_dir = plan.teacher_hf, plan.student_hf, plan.data_dir
    student = plan.student

    eval_path = os.path.join(workdir, "eval.json")
    with clock.stage("evaluate", done=os.path.exists(eval_path)):
        if os.path.exists(eval_path):
            with open(eval_path) as f:
                evaluation = json.load(f)
        else:
            evaluation = _evaluate(student, workdir, teacher_hf, student_hf,
                                   plan.mlm_only_dir if d.mlm_only_baseline else None)
            with open(eval_path, "w") as f:
                json.dump(evaluation, f, indent=2)

    ft_path = os.path.join(workdir, "finetune.json")
    with clock.stage("finetune", done=os.path.exists(ft_path) or d.finetune_epochs <= 0):
        if os.path.exists(ft_path):
            with open(ft_path) as f:
                finetuned = json.load(f)
        elif d.finetune_epochs > 0:
            tok = load_tokenizer(os.path.join(data_dir, "tokenizer"))
            train_set, held, names = finetune.stdlib_packages_data(tok, d.finetune_classes, d.finetune_max_len)
            finetuned = {"task": "stdlib_packages", "classes": names, "train": int(len(train_set["labels"])),
                         "held_out": int(len(held["labels"]))}
            for name, path in (("teacher", teacher_hf), ("student", student_hf)):
                module, params = hf.load_hf_model(path)
                finetuned[name] = finetune.finetune(module, params, train_set, held, len(names), ("accuracy",),
                                                    d.finetune_epochs, d.finetune_learning_rate,
                                                    seed=config.train.seed)
            with open(ft_path, "w") as f:
                json.dump(finetuned, f, indent=2)
        else:
            finetuned = {}

    summary = _summary(evaluation, finetuned, clock.times, teacher_hf, student_hf)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(format_summary(summary), flush=True)
    return summary


def _evaluate(student_config, workdir, teacher_hf, student_hf, mlm_only_dir) -> Dict:
    from distil_jax import evaluate, hf, train
    models = {"teacher": hf.load_hf_model(teacher_hf), "student": hf.load_hf_model(student_hf)}
    if mlm_only_dir:
        run = train.make_run(stage_config(student_config, **MLM_ONLY), mlm_only_dir, split="eval")
        models["student_mlm_only"] = (run.exp.model, train.restore_params(run)[0])
    results, batches = evaluate.compare_on_held_out(student_config, workdir, models)
    baseline = results.pop("most_frequent_token")
    timing_batches = batches[: student_config.demo.inference_batches]
    seconds = {name: evaluate.inference_seconds(models[name][0], models[name][1], timing_batches)
               for name in ("teacher", "student")}
    return {"models": results, "most_frequent_token": baseline,
            "parameters": {n: _count(p) for n, (_, p) in models.items()},
            "inference_seconds": seconds, "inference_sequences": int(sum(len(b["input_ids"]) for b in timing_batches))}


def _summary(evaluation, finetuned, stages, teacher_hf, student_hf) -> Dict:
    m = evaluation["models"]
    t, s = m["teacher"], m["student"]
    secs = evaluation["inference_seconds"]
    summary = {
        "teacher_parameters": evaluation["parameters"]["teacher"],
        "student_parameters": evaluation["parameters"]["student"],
        "teacher_mlm_accuracy": t["mlm_accuracy"], "student_mlm_accuracy": s["mlm_accuracy"],
        "teacher_perplexity": t["perplexity"], "student_perplexity": s["perplexity"],
        "retention": s["mlm_accuracy"] / max(t["mlm_accuracy"], 1e-9),
        "agreement": s["agreement_with_teacher"], "kl_teacher_student": s["kl_from_teacher"],
        "most_frequent_token_accuracy": evaluation["most_frequent_token"]["mlm_accuracy"],
        "teacher_inference_s": secs["teacher"], "student_inference_s": secs["student"],
        "speedup": secs["teacher"] / max(secs["student"], 1e-9),
        "inference_sequences": evaluation["inference_sequences"],
        "held_out_targets": t["targets"], "stage_seconds": {k: v["seconds"] for k, v in stages.items()},
        "teacher_hf": teacher_hf, "student_hf": student_hf,
    }
    if "student_mlm_only" in m:
        summary["student_mlm_only_accuracy"] = m["student_mlm_only"]["mlm_accuracy"]
        summary["student_mlm_only_perplexity"] = m["student_mlm_only"]["perplexity"]
        summary["student_mlm_only_kl_teacher"] = m["student_mlm_only"]["kl_from_teacher"]
        summary["student_mlm_only_agreement"] = m["student_mlm_only"]["agreement_with_teacher"]
    if finetuned.get("teacher"):
        summary["finetune_task"] = f"{finetuned['task']} ({len(finetuned['classes'])} classes)"
        summary["teacher_finetune_accuracy"] = finetuned["teacher"]["accuracy"]
        summary["student_finetune_accuracy"] = finetuned["student"]["accuracy"]
        summary["finetune_retention"] = finetuned["student"]["accuracy"] / max(finetuned["teacher"]["accuracy"], 1e-9)
    return summary


def format_summary(s: Dict) -> str:
    rows = [("", "teacher", "student")]
    rows.append(("parameters", f"{s['teacher_parameters']:,}", f"{s['student_parameters']:,}"))
    rows.append(("held-out MLM accuracy", f"{s['teacher_mlm_accuracy']:.4f}", f"{s['student_mlm_accuracy']:.4f}"))
    rows.append(("held-out perplexity", f"{s['teacher_perplexity']:.2f}", f"{s['student_perplexity']:.2f}"))
    rows.append((f"inference, {s['inference_sequences']} seq (s)", f"{s['teacher_inference_s']:.3f}",
                 f"{s['student_inference_s']:.3f}"))
    if "teacher_finetune_accuracy" in s:
        rows.append((f"fine-tuned: {s['finetune_task']}", f"{s['teacher_finetune_accuracy']:.4f}",
                     f"{s['student_finetune_accuracy']:.4f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{r[0]:<{width}}  {r[1]:>12}  {r[2]:>12}" for r in rows]
    lines += [
        f"retention (student / teacher accuracy): {s['retention']:.1%}; top-1 agreement {s['agreement']:.1%}; "
        f"speed-up {s['speedup']:.2f}x",
        f"most frequent token baseline accuracy: {s['most_frequent_token_accuracy']:.4f}",
    ]
    if "student_mlm_only_accuracy" in s:
        lines.append(f"same student, MLM loss only: accuracy {s['student_mlm_only_accuracy']:.4f}, "
                     f"perplexity {s['student_mlm_only_perplexity']:.2f}, agreement with the teacher "
                     f"{s['student_mlm_only_agreement']:.1%} (distilled: {s['student_mlm_accuracy']:.4f}, "
                     f"{s['student_perplexity']:.2f}, {s['agreement']:.1%})")
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s["stage_seconds"].items()))
    lines.append(f"student for Hugging Face: {s['student_hf']}")
    return "\n".join(lines)
