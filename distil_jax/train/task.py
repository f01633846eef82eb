"""Task-specific fine-tuning and distillation: the task objective, its models, its scores.

Mode finetune trains a task head (models/heads.py) on an encoder with the trainer's one
step and loop (trainer.py); this module is what differs from pretraining distillation:

- `TaskObjective`: the task's loss (cross-entropy over the classes; squared error for
  regression; for question answering the mean of the start and end cross-entropies,
  as transformers' *ForQuestionAnswering) times `alpha_task`, plus, with a fine-tuned
  teacher, `alpha_kd` times KL(teacher_T || student_T) of the head's logits times T^2
  (losses.task_kd_loss; the start and end distributions over each window's real tokens
  for QA, averaged; the squared difference of the two predictions for regression), the
  teacher frozen and outside the gradient. The same micro-batch interface as the masked
  LM's `objective.Objective`: the step does not know which it runs.
- `load_encoder` / `load_task_model`: the student's encoder (a Hugging Face masked LM, or
  a distill/pretrain run's workdir) and the fine-tuned teacher (a Hugging Face
  *ForSequenceClassification / *ForQuestionAnswering, or a finetune run's directory).
- `evaluate`: the held-out scores as GLUE and SQuAD define them (GLUE's metrics below,
  SQuAD's official EM and F1 in data/squad.py), and each example's score for paired
  comparisons of two models on the same examples.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distil_jax.interop import hf, hf_heads
from distil_jax.train import losses
from distil_jax.checkpoint import checkpoint_tokenizer, load_model, saved_steps
from distil_jax.config import stage_train
from distil_jax.data import squad
from distil_jax.data.tasks import TaskSet
from distil_jax.data.tokenizer import load_tokenizer
from distil_jax.models import MaskedLM, QuestionAnswerer, SequenceClassifier

INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what the models read of a batch
def task_training(config):
    """Mode finetune's config: its train group set from finetune.train (what the trainer
    runs and the checkpoints record)."""
    return stage_train(config, "finetune.train")


# --- the objective ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TaskObjective:
    """The task's loss and, with a teacher, the distillation of its head's outputs."""

    kind: str  # data.tasks.KINDS
    alpha_task: float = 1.0
    alpha_kd: float = 0.0  # 0 without a teacher
    temperature: float = 2.0
    logit_fraction = 0.0  # no vocabulary projection (model FLOPs: metrics.train_flops_per_token)

    @property
    def uses_teacher(self) -> bool:
        return self.alpha_kd > 0

    def task_loss(self, out, batch) -> jax.Array:
        mean = losses.mean_over_rows
        if self.kind == "question_answering":
            return 0.5 * (mean(losses.token_nll(out[0], batch["start"])) + mean(losses.token_nll(out[1], batch["end"])))
        if self.kind == "regression":
            return mean((out[:, 0].astype(jnp.float32) - batch["labels"]) ** 2)
        return mean(losses.token_nll(out, batch["labels"]))

    def kd_loss(self, out, teacher_out, batch) -> jax.Array:
        t = self.temperature
        if self.kind == "question_answering":
            am = batch["attention_mask"]
            return 0.5 * (losses.task_kd_loss(out[0], teacher_out[0], t, am)
                          + losses.task_kd_loss(out[1], teacher_out[1], t, am))
        if self.kind == "regression":
            return losses.mean_over_rows((out[:, 0].astype(jnp.float32) - teacher_out[:, 0].astype(jnp.float32)) ** 2)
        return losses.task_kd_loss(out, teacher_out, t)

    def prepare(self, rng, batch):
        """(inputs, dropout key, counts) of one micro-batch, as `objective.Objective.prepare`."""
        return dict(batch), rng, {"examples": jnp.float32(batch["input_ids"].shape[0])}

    def grads(self, batch, rng, params, teacher_params, *, model, teacher):
        """(metrics, gradients) of one prepared micro-batch, as `objective.Objective.grads`."""
        inputs = model_inputs(batch)
        teacher_out = None
        if teacher is not None and self.uses_teacher:
            teacher_out = jax.lax.stop_gradient(teacher.apply({"params": teacher_params}, **inputs))

        def loss_fn(p):
            out = model.apply({"params": p}, **inputs, deterministic=False, rngs={"dropout": rng})
            task = self.task_loss(out, batch)
            terms = {"loss_task": task}
            loss = self.alpha_task * task
            if teacher_out is not None:
                terms["loss_kd"] = self.kd_loss(out, teacher_out, batch)
                loss = loss + self.alpha_kd * terms["loss_kd"]
            return loss, {**terms, "loss": loss}

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return metrics, grads


def model_inputs(batch) -> Dict[str, Any]:
    return {k: batch[k] for k in INPUTS if k in batch}


# --- models -------------------------------------------------------------------------------
def head_model(encoder: MaskedLM, task: TaskSet):
    """The task's head on `encoder`."""
    if task.kind == "question_answering":
        return QuestionAnswerer(encoder)
    return SequenceClassifier(encoder, task.num_labels)


def with_dtype(module, dtype):
    """A head model (or masked LM) computing in `dtype` over `dtype` params."""
    if isinstance(module, MaskedLM):
        return type(module)(module.config, dtype=dtype, param_dtype=dtype)
    return module.clone(encoder=with_dtype(module.encoder, dtype))


def initial_params(model, encoder_params, rng, example: Dict[str, np.ndarray]):
    """A fresh head (seeded by `rng`) on the given encoder params (without their MLM head)."""
    inputs = {k: v[:1] for k, v in model_inputs(example).items()}
    fresh = nn.meta.unbox(model.init(rng, **inputs)["params"])
    return {**fresh, "encoder": {k: v for k, v in encoder_params.items() if k != "mlm_head"}}


def load_encoder(source: str) -> Tuple[MaskedLM, Any, Any, str]:
    """(float32 module, params, tokenizer, tokenizer dir) of a masked LM: a Hugging Face
    directory or hub name, or the workdir of a distill / pretrain run (its newest checkpoint)."""
    if saved_steps(source):
        module, params, meta = load_model(source)
        if not isinstance(module, MaskedLM):
            raise ValueError(f"{source} holds a fine-tuned {type(module).__name__}, not a masked LM: give "
                             "finetune.model a distill or pretrain run (or a Hugging Face masked LM)")
        tokenizer = checkpoint_tokenizer(meta)
        if tokenizer is None:
            raise FileNotFoundError(f"the checkpoint in {source} was trained without a tokenizer "
                                    "(synthetic data): fine-tune a Hugging Face directory instead")
        return module, params, tokenizer, meta["tokenizer_dir"]
    module, params = hf.load_hf_model(source)
    return module, params, load_tokenizer(source), hf.resolve_model_dir(source)


def load_task_model(source: str) -> Tuple[Any, Any, List[str]]:
    """(float32 module, params, label names) of a fine-tuned model: a Hugging Face
    *ForSequenceClassification / *ForQuestionAnswering, or a finetune run's directory."""
    if saved_steps(source):
        module, params, meta = load_model(source)
        if isinstance(module, MaskedLM):
            raise ValueError(f"{source} holds a masked LM, not a fine-tuned model: give finetune.teacher "
                             "the directory of a finetune run (or a Hugging Face *ForSequenceClassification)")
        return module, params, list(meta["task"]["labels"])
    return hf_heads.load_hf_task_model(source)


# --- evaluation ---------------------------------------------------------------------------
def in_blocks(forward: Callable[[Dict[str, np.ndarray]], Any], arrays: Dict[str, np.ndarray], rows: int = 256):
    """forward(block) over `arrays` in blocks of `rows` rows, concatenated as float32 numpy
    (an output that is a tuple, QA's (start, end), element by element)."""
    n = len(arrays["input_ids"])
    blocks = [forward({k: v[i: i + rows] for k, v in arrays.items()}) for i in range(0, n, rows)]
    if isinstance(blocks[0], (tuple, list)):
        return tuple(np.concatenate([np.asarray(b[j], np.float32) for b in blocks]) for j in range(len(blocks[0])))
    return np.concatenate([np.asarray(b, np.float32) for b in blocks])


def outputs(model, params, arrays: Dict[str, np.ndarray], rows: int = 256):
    """The model's outputs over `arrays` in blocks of `rows` (float32 numpy; QA: (start, end))."""
    forward = jax.jit(lambda p, x: model.apply({"params": p}, **x))
    return in_blocks(lambda block: jax.device_get(forward(params, model_inputs(block))), arrays, rows)


def evaluate(model, params, task: TaskSet) -> Tuple[Dict[str, float], np.ndarray]:
    """(held-out scores, per-example score for paired comparisons: 1/0 correct for
    classification, the squared error for regression, each question's F1 in [0, 1] for QA)."""
    out = outputs(model, params, task.held_out)
    if task.kind == "question_answering":
        answers = squad.predict(task.questions, task.windows, *out)
        golds = {str(q["id"]): q["answers"] for q in task.questions}
        per_question = np.asarray([squad.f1(answers.get(q, ""), g) for q, g in golds.items()])
        return squad.squad_scores(answers, golds), per_question
    gold = task.held_out["labels"]
    if task.kind == "regression":
        predictions = out[:, 0]
        return task_metrics(task.metrics, predictions, gold), (predictions - gold) ** 2
    predictions = out.argmax(-1)
    return task_metrics(task.metrics, predictions, gold), (predictions == gold).astype(np.float64)


# GLUE's metrics by scikit-learn and SciPy, imported when scored (not by every run that imports
# this module). Undefined ones (a constant input, under two examples) score 0, as GLUE reports.
def _undefined(*arrays) -> bool:
    return any(len(a) < 2 or np.all(a == a[0]) for a in arrays)


def accuracy(pred, gold) -> float:
    from sklearn.metrics import accuracy_score
    return float(accuracy_score(np.asarray(gold), np.asarray(pred)))


def f1(pred, gold) -> float:
    """F1 of the positive class (label 1), as GLUE reports for MRPC and QQP (0 with no positive)."""
    from sklearn.metrics import f1_score
    return float(f1_score(np.asarray(gold), np.asarray(pred), labels=[1], average=None, zero_division=0.0)[0])


def matthews(pred, gold) -> float:
    """Matthews correlation of the predictions (CoLA)."""
    from sklearn.metrics import matthews_corrcoef
    pred, gold = np.asarray(pred), np.asarray(gold)
    return 0.0 if _undefined(pred, gold) else float(matthews_corrcoef(gold, pred))


def pearson(x, y) -> float:
    from scipy.stats import pearsonr
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return 0.0 if _undefined(x, y) else float(pearsonr(x, y).statistic)


def spearman(x, y) -> float:
    """Pearson correlation of the ranks (ties share their average rank)."""
    from scipy.stats import spearmanr
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return 0.0 if _undefined(x, y) else float(spearmanr(x, y).statistic)


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def task_metrics(names, predictions, gold) -> Dict[str, float]:
    return {name: METRICS[name](predictions, gold) for name in names}
