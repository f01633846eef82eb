"""What the demo-based modes (demo, ablate, shapes, deploy) share: the plan of their
stages and where each lives, a stage trained unless it is finished, its wall-time clock,
the results cached per stage, and the outputs (tables, JSON) written once, by process 0."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from typing import Any, Dict, Optional, Sequence

import jax

from distil_jax import assets, runtime, storage
from distil_jax.apps import export
from distil_jax.checkpoint import saved_steps
from distil_jax.config import stage_train, with_changes
from distil_jax.data.prepare import prepare, prepared_dir
from distil_jax.interop import hf
from distil_jax.train import trainer

# The shipped teacher was pretrained (configs/demo_teacher.py) with uniform masking, as the
# demo distils; its train.* values are demo.teacher_train.
MLM_ONLY = {"distill.alpha_ce": 0.0, "distill.alpha_cos": 0.0, "distill.alpha_mse": 0.0,
            "distill.alpha_mlm": 1.0}
def stage_config(config, mode: Optional[str] = None, **changes):
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
            self.times[name] = {"seconds": round(seconds, 2), "skipped_now": done}
        with open(self.path, "w") as f:
            json.dump(self.times, f, indent=2)


def exported(path: str) -> bool:
    return os.path.exists(os.path.join(path, "model.safetensors"))


def count_parameters(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


@dataclasses.dataclass
class Plan:
    """Where each stage of the demo lives and the config it runs with."""

    data_dir: str
    teacher_hf: str  # the teacher every student distils from
    pretrain: Optional[Any]  # the teacher's pretraining (demo.teacher="train"), else None
    teacher_dir: str
    runs: Dict[str, Any]  # student name -> (config, workdir, Hugging Face dir)

    @property
    def student_config(self):
        return self.runs["student"][0]


def make_plan(config, workdir: str) -> Plan:
    d = config.demo
    data_dir = prepared_dir(config, workdir)
    teacher_dir = os.path.join(workdir, "teacher")
    pretrain = None
    if d.teacher == "shipped":
        teacher_hf = assets.DEMO_TEACHER
    elif d.teacher == "train":
        teacher_hf = os.path.join(teacher_dir, "hf")
        pretrain = stage_train(stage_config(config, mode="pretrain", **{
            "masking.smoothing": 0.0, "data.dir": data_dir, "teacher.path": ""}), "demo.teacher_train")
    else:
        teacher_hf = d.teacher
    student = stage_train(stage_config(config, mode="distill", **{"data.dir": data_dir, "teacher.path": teacher_hf}),
                          "demo.student_train")
    runs = {"student": (student, os.path.join(workdir, "student"), os.path.join(workdir, "student_hf"))}
    if d.mlm_only_baseline:
        runs["student_mlm_only"] = (stage_config(student, **MLM_ONLY), os.path.join(workdir, "student_mlm_only"),
                                    os.path.join(workdir, "student_mlm_only_hf"))
    return Plan(data_dir, teacher_hf, pretrain, teacher_dir, runs)


def ensure_teacher(plan: Plan, clock: StageClock) -> None:
    """The prepared corpus and the teacher (pretrained and exported when demo.teacher="train")."""
    first = plan.pretrain if plan.pretrain is not None else plan.student_config
    with clock.stage("prepare", done=os.path.exists(os.path.join(plan.data_dir, "manifest.json"))):
        vocab = (first.teacher.model.vocab_size if plan.pretrain is not None
                 else hf.read_config(plan.teacher_hf).vocab_size)
        prepare(first, plan.data_dir, teacher_vocab_size=vocab)
    with clock.stage("teacher", done=exported(plan.teacher_hf)):
        if not exported(plan.teacher_hf):
            if plan.pretrain is None:
                raise FileNotFoundError(f"no teacher in {plan.teacher_hf} (demo.teacher); give a Hugging "
                                        "Face directory, or demo.teacher=train to pretrain one here")
            runtime.finish(trainer.train(plan.pretrain, plan.teacher_dir)[1])
            export.export_checkpoint(plan.teacher_dir, plan.teacher_hf)


def ensure_student(name: str, plan: Plan, clock: StageClock) -> str:
    """Train (or find) one student of the plan and export it; its Hugging Face dir."""
    config, workdir, hf_dir = plan.runs[name]
    with clock.stage(name, done=exported(hf_dir)):
        if not exported(hf_dir):
            runtime.finish(trainer.train(config, workdir)[1])
            export.export_checkpoint(workdir, hf_dir, config=config)
    return hf_dir


def cached(path: str, clock: StageClock, name: str, compute):
    """Stage `name`'s result: read from `path` when an earlier run wrote it, else computed
    and written (process 0)."""
    with clock.stage(name, done=storage.exists(path)):
        if storage.exists(path):
            return json.loads(storage.read_text(path))
        result = compute()
        write_outputs(os.path.dirname(path), {os.path.basename(path): result})
        return result


def start(config, workdir: str):
    """(plan, clock) of the demo's stages in `workdir`, the corpus prepared and the teacher
    ready: where every demo-based mode begins."""
    plan = make_plan(config, workdir)
    clock = StageClock(os.path.join(workdir, "stages.json"))
    ensure_teacher(plan, clock)
    return plan, clock


def train_unless_finished(config, run_dir: str) -> str:
    """`run_dir` holding `config`'s run finished: trained (or resumed) unless its last
    update is saved; a run stopped by a signal stops the mode (runtime.Stopped)."""
    if config.train.steps not in saved_steps(run_dir):
        runtime.finish(trainer.train(config, run_dir)[1])
    return run_dir


def slug(name: str) -> str:
    """A task's, a model's or a variant's name as a directory name: lower case, each run of
    other characters one "_" (glue/sst2 -> glue_sst2, "triple loss, T = 1" -> triple_loss_t_1)."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool] = ()) -> str:
    """A GitHub markdown table; `right[i]`: column i aligned right (numbers). Hand-written:
    five lines, where a table library would be a dependency for three tables."""
    right = list(right) + [False] * (len(header) - len(right))
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---:" if r else "---" for r in right) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(workdir: str, files: Dict[str, Any], show: str = "") -> None:
    """Process 0 writes each of `files` (name -> text, or a tree written as JSON) in
    `workdir` (local or a bucket) and prints `show`; the other processes write nothing."""
    if jax.process_index() != 0:
        return
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content, indent=2)
        storage.write_text(storage.join(workdir, name), text if text.endswith("\n") else text + "\n")
    if show:
        print(show, flush=True)
