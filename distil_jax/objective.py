"""The training objective: which terms, with what weights, and their gradient.

The loss of a masked micro-batch is a weighted sum of terms (the paper's triple loss
and beyond):

    L = ce * L_ce + mlm * L_mlm + cos * L_cos + mse * L_mse

- vocabulary terms (L_mlm, L_ce, L_mse) need logits; they are computed fused with the
  tied projection, in blocks of rows (`losses.vocab_terms`), only on the rows a term
  reads: the MLM targets, and for the KL every real token or, with
  `restrict_ce_to_mask`, the targets only;
- representation terms (L_cos) compare the encoders' outputs: one entry each in
  `REPRESENTATION_TERMS`, name -> loss(student output, teacher output, attention mask).

A term with weight 0 is still reported when its inputs exist (a metric), and costs
nothing more than its inputs; the teacher runs only when a term with a positive weight
reads it (not for an MLM-only baseline).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

from distil_jax import losses
from distil_jax.masking import mask_tokens, token_probs_from_counts
from distil_jax.models import MaskedLMOutput


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The weight of each term (the paper's alphas); 0 leaves a term out of the gradient."""

    ce: float = 0.0  # KL(teacher_T || student_T) x T^2 over the vocabulary
    mlm: float = 0.0  # cross-entropy at the MLM targets
    cos: float = 0.0  # 1 - cos(student, teacher) of the last hidden states
    mse: float = 0.0  # squared error of the logits

    TEACHER_TERMS = ("ce", "cos", "mse")  # class constant: the terms that read the teacher

    @classmethod
    def from_config(cls, config) -> "LossWeights":
        if config.mode == "pretrain":
            return cls(mlm=1.0)
        d = config.distill
        return cls(ce=d.alpha_ce, mlm=d.alpha_mlm, cos=d.alpha_cos, mse=d.alpha_mse)

    @property
    def uses_teacher(self) -> bool:
        """Whether any term with a positive weight reads the teacher."""
        return any(getattr(self, name) for name in self.TEACHER_TERMS)


def _cosine_of_last_hidden(student: MaskedLMOutput, teacher: MaskedLMOutput, attention_mask):
    return losses.cosine_loss(student.last_hidden_state, teacher.last_hidden_state, attention_mask)


# Terms on the encoders' outputs: LossWeights field -> loss(student, teacher, attention mask);
# the metric is reported as loss_<name>.
REPRESENTATION_TERMS: Dict[str, Callable] = {"cos": _cosine_of_last_hidden}


@dataclasses.dataclass(frozen=True)
class Objective:
    """Static settings of the step: the terms' weights, masking, the vocabulary."""

    weights: LossWeights
    temperature: float
    restrict_ce_to_mask: bool
    masking: Dict[str, float]  # mask_prop, word_mask, word_keep, word_rand
    vocab_size: int
    mask_id: int
    special_ids: tuple
    token_probs: np.ndarray = dataclasses.field(hash=False, compare=False)
    loss_chunk: int = 0  # rows per block of the vocabulary terms; 0: one block

    @classmethod
    def from_config(cls, config, vocab) -> "Objective":
        d, m = config.distill, config.masking
        return cls(weights=LossWeights.from_config(config), temperature=d.temperature,
                   restrict_ce_to_mask=d.restrict_ce_to_mask,
                   masking=dict(mask_prop=m.mask_prop, word_mask=m.word_mask, word_keep=m.word_keep,
                                word_rand=m.word_rand),
                   vocab_size=vocab.vocab_size, mask_id=vocab.mask_id, special_ids=tuple(vocab.special_ids),
                   token_probs=token_probs_from_counts(vocab.token_counts, m.smoothing, vocab.special_ids),
                   loss_chunk=config.train.loss_chunk)

    def mask(self, rng, input_ids, attention_mask):
        return mask_tokens(rng, input_ids, attention_mask, self.token_probs, self.special_ids,
                           self.mask_id, self.vocab_size, **self.masking)

    @property
    def targets_only(self) -> bool:
        """Whether only the MLM targets are projected onto the vocabulary (no all-rows KL)."""
        return self.restrict_ce_to_mask or not self.weights.uses_teacher

    @property
    def head_rows(self) -> float:
        """The fraction of positions given logits (for model FLOPs): all, or the targets'."""
        return self.masking["mask_prop"] if self.targets_only else 1.0

    def max_targets(self, rows: int) -> int:
        """A static bound on the MLM targets among `rows` tokens (masking draws ceil(p x real))."""
        return min(rows, math.ceil(self.masking["mask_prop"] * rows) + 1)


def vocabulary_terms(obj: Objective, s_hidden, s_head, t_hidden, t_head, labels, targets,
                     attention_mask):
    """(weighted sum, terms) of the vocabulary terms, without whole [B, S, V] logits.

    s_head / t_head map last hidden rows [N, D] to `MaskedLM.head_inputs` (features,
    embedding, bias). With `targets_only` the targets' rows are gathered first and
    nothing else is projected; otherwise the KL covers every real token and all rows
    are projected. `t_hidden` is None when no term reads the teacher.
    """
    b, s, _ = s_hidden.shape
    flat = lambda x: x.reshape(b * s, *x.shape[2:])  # noqa: E731
    hs, labels_f, mlm_w, kd_w = flat(s_hidden), flat(labels), flat(targets), flat(attention_mask)
    ht = None if t_hidden is None else flat(t_hidden)
    if obj.targets_only:
        k = obj.max_targets(b * s)
        idx = jnp.nonzero(mlm_w, size=k, fill_value=0)[0]
        mlm_w = kd_w = (jnp.arange(k) < jnp.sum(mlm_w)).astype(jnp.float32)
        hs, labels_f = hs[idx], labels_f[idx]
        ht = None if ht is None else ht[idx]
    feat, *s_proj = s_head(hs)
    t_feat, t_proj = None, None
    if ht is not None:
        t_feat, *t_proj = jax.lax.stop_gradient(t_head(ht))
    w = obj.weights
    return losses.vocab_terms(feat, tuple(s_proj), labels_f, mlm_w, t_feat, t_proj, kd_w,
                              obj.temperature, obj.loss_chunk, mlm=w.mlm, ce=w.ce,
                              mse=w.mse if w.mse else None)


def loss_and_grads(params, teacher_params, masked_ids, attention_mask, labels, targets,
                   dropout_rng, *, model, teacher, obj: Objective):
    """(metrics, gradients) of one masked micro-batch; the teacher runs outside the gradient."""
    teacher_out = t_head = None
    if teacher is not None and obj.weights.uses_teacher:  # no teacher forward when no term reads it
        teacher_out = jax.lax.stop_gradient(teacher.apply(
            {"params": teacher_params}, masked_ids, attention_mask, deterministic=True,
            compute_logits=False))
        t_head = lambda h: teacher.apply({"params": teacher_params}, h,  # noqa: E731
                                         method=type(teacher).head_inputs)

    def loss_fn(p):
        out = model.apply({"params": p}, masked_ids, attention_mask, deterministic=False,
                          rngs={"dropout": dropout_rng}, compute_logits=False)
        s_head = lambda h: model.apply({"params": p}, h, method=type(model).head_inputs)  # noqa: E731
        t_hidden = None if teacher_out is None else teacher_out.last_hidden_state
        loss, terms = vocabulary_terms(obj, out.last_hidden_state, s_head, t_hidden, t_head, labels,
                                       targets, attention_mask)
        if teacher_out is not None:
            for name, term in REPRESENTATION_TERMS.items():
                value = term(out, teacher_out, attention_mask)
                terms[f"loss_{name}"] = value
                loss = loss + getattr(obj.weights, name) * value
        return loss, {**terms, "loss": loss}

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return metrics, grads
