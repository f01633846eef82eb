"""Fine-tuning and task-specific distillation (mode finetune).

    python -m distil_jax.main --config=CONFIG --workdir=DIR --config.mode=finetune \
        --config.finetune.model=STUDENT --config.finetune.task=glue/sst2 --config.finetune.data_dir=TFDS_DIR \
        [--config.finetune.teacher=FINE_TUNED_TEACHER --config.finetune.alpha_kd=1.0]

A task head (models/heads.py: sequence classification or regression on [CLS], extractive
question answering on every token) on `finetune.model`'s encoder (a Hugging Face masked LM,
or a distill/pretrain workdir; empty: DIR), trained by the trainer's one step and loop
(sharded, accumulated, checkpointed, resumable: the same command resumes) in
`finetune.dir` (default DIR/finetune/TASK). With `finetune.teacher` (a fine-tuned model)
the loss adds the distillation of the head's outputs (task.py), the paper's second,
task-specific distillation. Then scored on the held-out split as GLUE or SQuAD define it
-> DIR/finetune.json. `--config.mode=export --workdir=DIR/finetune/TASK` writes the
fine-tuned model as *ForSequenceClassification (which pipeline("text-classification")
loads) or *ForQuestionAnswering (AutoModelForQuestionAnswering).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, NamedTuple, Optional, Tuple

import numpy as np

from distil_jax import runtime
from distil_jax.apps import evaluate, stages
from distil_jax.train import task, trainer
from distil_jax.checkpoint import checkpoint_tokenizer, load_model, params_fingerprint, saved_steps
from distil_jax.config import with_changes
from distil_jax.data import tasks
from distil_jax.data.tasks import TaskSet


class FineTuned(NamedTuple):
    """A finished fine-tuning run: the trained module and params, the task's data, the tokenizer."""

    model: Any
    params: Any
    task: TaskSet
    tokenizer: Any


def finetunes(config) -> bool:
    """Whether the demo-based modes fine-tune (finetune.train gives steps or epochs; both 0
    leaves the stage out)."""
    recipe = config.finetune.train
    return recipe.get("steps", config.train.steps) > 0 or recipe.get("epochs", config.train.epochs) > 0


def run_dir(config, workdir: str) -> str:
    """Where mode finetune trains: `finetune.dir`, default WORKDIR/finetune/slug(TASK)."""
    return config.finetune.dir or os.path.join(workdir, "finetune", stages.slug(config.finetune.task))


def finetune_in(config, directory: str, model: str, teacher: str = "") -> Tuple[Dict[str, Any], np.ndarray, FineTuned]:
    """Fine-tune `model` (distilling from `teacher` if given) on `finetune.task` in `directory`:
    (the held-out scores with the run's summary, each held-out example's score for paired
    comparisons, the FineTuned run). A finished run is read back from its checkpoint
    (`finished_run`), not built or trained again."""
    config = with_changes(config, **{"mode": "finetune", "finetune.model": model, "finetune.teacher": teacher})
    finished, loss = finished_run(config, directory), None
    if finished is None:
        if not runtime.is_remote(directory):
            os.makedirs(directory, exist_ok=True)
        with runtime.hold_workdir(directory):
            tr = trainer.build(config, directory)
            state, summary = trainer.fit(tr)
            runtime.finish(summary)
        tuned = FineTuned(tr.model, state.params, tr.parts.task, tr.vocab.tokenizer)
        update, loss = summary["update"], (summary["metrics"] or {}).get("loss")
    else:
        tuned, update = finished
    scores, per_example = task.evaluate(tuned.model, tuned.params, tuned.task)
    result = {"model": model, "teacher": teacher, "task": tuned.task.name, "labels": tuned.task.labels,
              "dir": directory, "held_out": int(len(per_example)), **scores, "updates": update,
              "train_loss": loss}
    return result, per_example, tuned


def _as_json(tree):
    return json.loads(json.dumps(tree))


def finished_run(config, directory: str) -> Optional[Tuple[FineTuned, int]]:
    """(the run `config` (mode finetune's) asks for, its last update), read from its newest
    checkpoint alone (`load_model`: no optimizer, teacher or loader is built) when
    `directory` holds it finished; else None, and the trainer resumes it, trains it or
    names the mismatch."""
    if not saved_steps(directory):
        return None
    module, params, meta = load_model(directory)
    trained = meta.get("config", {})
    wanted = task.task_training(config)
    same = (meta.get("mode") == "finetune" and meta.get("step") == meta.get("total_updates")
            and all(_as_json(trained.get(g)) == _as_json(wanted[g].to_dict()) for g in ("finetune", "train")))
    if same and config.finetune.teacher:  # distilled from the teacher that is there now
        teacher_params = task.load_task_model(config.finetune.teacher)[1]
        same = meta.get("teacher", {}).get("fingerprint") == params_fingerprint(teacher_params)
    tokenizer = checkpoint_tokenizer(meta) if same else None
    if tokenizer is None:
        return None
    return FineTuned(module, params, tasks.task_data(wanted.finetune, tokenizer), tokenizer), meta["step"]


def finetune_models(config, workdir: str, sources: Dict[str, str], task_kd: bool = True) -> Dict:
    """Each model (name -> a Hugging Face dir or a checkpoint workdir) fine-tuned on
    `finetune.task` by mode finetune in WORKDIR/finetune/NAME; with `task_kd` the student
    again with task distillation from the fine-tuned teacher (student_task_kd): scores and
    paired comparisons on the same held-out examples."""
    runs = {name: (source, "") for name, source in sources.items()}
    if task_kd:
        runs["student_task_kd"] = (sources["student"], os.path.join(workdir, "finetune", "teacher"))
    out: Dict[str, Any] = {"task": config.finetune.task, "models": {}}
    hits = {}
    for name, (source, teacher) in runs.items():  # the teacher first: the last run distils from it
        scores, hits[name], _ = finetune_in(config, os.path.join(workdir, "finetune", stages.slug(name)), source, teacher)
        out["models"][name] = {k: v for k, v in scores.items() if k not in ("model", "teacher", "task", "labels")}
        out["held_out"], out["classes"] = scores["held_out"], scores["labels"]
    out["comparisons"] = evaluate.paired_comparisons(hits, np.arange(out["held_out"]))
    return out




def run(config, workdir: str) -> Dict:
    """Mode finetune -> WORKDIR/finetune.json."""
    f = config.finetune
    result, _, _ = finetune_in(config, run_dir(config, workdir), f.model or workdir, f.teacher)
    stages.write_outputs(workdir, {"finetune.json": result})
    return result
