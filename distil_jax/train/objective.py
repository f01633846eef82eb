"""The training objective: which terms, with what weights, and their gradient.

The loss of a masked micro-batch is a weighted sum of terms (the paper's triple loss
and beyond):

    L = ce * L_ce + mlm * L_mlm + cos * L_cos + mse * L_mse

- vocabulary terms (L_mlm, L_ce, L_mse) need logits; they are computed fused with the
  tied projection, in blocks of rows (`losses.vocab_terms`), only on the rows a term
  reads: the MLM targets, and for the KL every real token or, with
  `restrict_ce_to_mask`, the targets only;
- representation terms (L_cos) compare the encoders' outputs: one entry each in
  `REPRESENTATION_TERMS`, name -> loss(student output, teacher output, attention mask);
- layer-pair terms (TinyBERT, MiniLM, MiniLMv2) compare a teacher layer with a student
  layer: `LossWeights.layers` holds `LayerTerm`s (kind, teacher layer, student layer,
  weight), one entry per kind in `LAYER_KINDS`. Layers are numbered as in the papers:
  0 is the embeddings' output (hidden kinds only), i the output (or the self-attention)
  of encoder layer i, 1-based. A hidden-state term between models of different widths
  goes through a learned linear projection of the student's states onto the teacher's
  width (TinyBERT), trained with the student under params["projections"] and dropped
  at export.

A term with weight 0 is still reported when its inputs exist (a metric), and costs
nothing more than its inputs; the teacher runs only when a term with a positive weight
reads it (not for an MLM-only baseline).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from distil_jax.train import losses
from distil_jax.terms import LAYER_KINDS, PROJECTIONS, LayerTerm, LossWeights, model_params
from distil_jax.train.masking import mask_tokens, token_probs_from_counts
from distil_jax.models import MaskedLM, MaskedLMOutput, apply_recording

def _cosine_of_last_hidden(student: MaskedLMOutput, teacher: MaskedLMOutput, attention_mask):
    return losses.cosine_loss(student.last_hidden_state, teacher.last_hidden_state, attention_mask)


# Terms on the encoders' outputs: LossWeights field -> loss(student, teacher, attention mask);
# the metric is reported as loss_<name>.
REPRESENTATION_TERMS: Dict[str, Callable] = {"cos": _cosine_of_last_hidden}


@flax.struct.dataclass
class ForwardPass:
    """What a layer-pair term may read of one model's forward pass."""

    out: MaskedLMOutput
    records: Optional[tuple] = None  # per layer, what it recorded (models.apply_recording)

    def attention(self, layer: int) -> Dict[str, jax.Array]:
        return self.records[layer - 1]


def _projected(hidden, projection):
    if projection is None:
        return hidden
    return (jnp.einsum("bsd,de->bse", hidden.astype(jnp.float32), projection["kernel"])
            + projection["bias"])


def _hidden_mse(s: ForwardPass, t: ForwardPass, term: LayerTerm, mask, projection, obj) -> jax.Array:
    return losses.hidden_mse_loss(_projected(s.out.hidden_states[term.student_layer], projection),
                                  t.out.hidden_states[term.teacher_layer], mask)


def _hidden_cos(s: ForwardPass, t: ForwardPass, term: LayerTerm, mask, projection, obj) -> jax.Array:
    return losses.cosine_loss(_projected(s.out.hidden_states[term.student_layer], projection),
                              t.out.hidden_states[term.teacher_layer], mask)


# The attention terms are made of what each layer records (models/layers.py
# INTERMEDIATES): its queries, keys and values, padding masked. What that leaves out of a
# family's own attention: DeBERTa's scores add the disentangled position terms (content-to-
# position c2p and position-to-content p2c, through the shared relative table): the Q-K
# relation and attention_kl compare the content-to-content part alone (q and k are the
# content projections), and V-V is unaffected. ModernBERT's q and k are recorded after the
# rotary rotation, so positions are in them, but a sliding-window layer's band is not
# applied: its Q-K relation spans the whole sequence.
def _attention_kl(s: ForwardPass, t: ForwardPass, term: LayerTerm, mask, projection, obj) -> jax.Array:
    a, b = s.attention(term.student_layer), t.attention(term.teacher_layer)
    return losses.attention_kl(losses.attention_scores(a["q"], a["k"]),
                               losses.attention_scores(b["q"], b["k"]), mask)


def _relation(s: ForwardPass, t: ForwardPass, term: LayerTerm, mask, projection, obj) -> jax.Array:
    a, b = s.attention(term.student_layer), t.attention(term.teacher_layer)
    qkv = ("q", "k", "v")
    return losses.relation_loss([a[k] for k in qkv], [b[k] for k in qkv], mask, obj.relation_heads)


# Each layer-pair kind's loss: (student pass, teacher pass, term, attention mask,
# projection or None, objective) -> scalar. What each kind reads: terms.LAYER_KINDS.
LAYER_LOSSES: Dict[str, Callable] = {"hidden_mse": _hidden_mse, "hidden_cos": _hidden_cos,
                                     "attention_kl": _attention_kl, "relation": _relation}


def init_projections(rng, weights: LossWeights, student_width: int, teacher_width: int,
                     stddev: float = 0.02) -> Dict[str, Dict[str, jax.Array]]:
    """Fresh projections [student width -> teacher width] of the hidden-state terms between
    models of different widths (none otherwise): kernel ~ N(0, stddev), bias 0."""
    if student_width == teacher_width:
        return {}
    names = [t.name for t in weights.layers if LAYER_KINDS[t.kind].hidden]
    keys = jax.random.split(rng, max(len(names), 1))
    return {n: {"kernel": stddev * jax.random.normal(k, (student_width, teacher_width), jnp.float32),
                "bias": jnp.zeros((teacher_width,), jnp.float32)} for n, k in zip(names, keys)}


def forward_pass(model: MaskedLM, params, masked_ids, attention_mask, records: bool, **kwargs) -> ForwardPass:
    """One model's forward pass as the terms read it (no vocabulary projection)."""
    if records:
        return ForwardPass(*apply_recording(model, params, masked_ids, attention_mask, compute_logits=False, **kwargs))
    return ForwardPass(model.apply({"params": params}, masked_ids, attention_mask, compute_logits=False, **kwargs))


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
    relation_heads: int = 1  # MiniLMv2's relation heads (the relation terms)
    teacher_logits: bool = True  # False: a teacher without MLM head (DeBERTa-v3), no vocabulary terms from it

    @classmethod
    def from_config(cls, config, vocab, teacher=None, student=None) -> "Objective":
        """From the config; `teacher` / `student` (model configs) resolve the layer terms."""
        d, m = config.distill, config.masking
        weights = LossWeights.from_config(config, getattr(teacher, "num_layers", 0),
                                          getattr(student, "num_layers", 0))
        heads = d.relation_heads or getattr(teacher, "num_heads", 1)
        return cls(weights=weights, temperature=d.temperature, relation_heads=heads,
                   teacher_logits=getattr(teacher, "mlm_head", True),
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
    def uses_teacher(self) -> bool:
        return self.weights.uses_teacher

    def prepare(self, rng, batch):
        """Dynamic masking with `rng` over the whole micro-batch: (inputs, dropout key,
        counts), inputs the masked ids, attention mask, labels and targets [rows, seq]."""
        mask_rng, dropout_rng = jax.random.split(rng)
        am = batch["attention_mask"]
        masked, labels, targets = self.mask(mask_rng, batch["input_ids"], am)
        inputs = {"input_ids": masked, "attention_mask": am, "labels": labels, "targets": targets}
        return inputs, dropout_rng, {"targets": jnp.sum(targets).astype(jnp.float32)}

    def grads(self, inputs, rng, params, teacher_params, *, model, teacher):
        """(metrics, gradients) of one prepared micro-batch (on a device group's rows: its
        share of each mean, parallel.per_device)."""
        return loss_and_grads(params, teacher_params, inputs["input_ids"], inputs["attention_mask"],
                              inputs["labels"], inputs["targets"], rng, model=model, teacher=teacher, obj=self)

    @property
    def targets_only(self) -> bool:
        """Whether only the MLM targets are projected onto the vocabulary (no all-rows KL)."""
        return self.restrict_ce_to_mask or not (self.weights.uses_teacher and self.teacher_logits)

    @property
    def logit_fraction(self) -> float:
        """The fraction of positions given logits (for model FLOPs): all, or the targets'."""
        return self.masking["mask_prop"] if self.targets_only else 1.0

    def max_targets(self, rows: int) -> int:
        """A static bound on the MLM targets among `rows` tokens (masking draws ceil(p x real))."""
        return min(rows, math.ceil(self.masking["mask_prop"] * rows) + 1)


def vocab_loss_and_terms(obj: Objective, s_hidden, s_head, t_hidden, t_head, labels, targets,
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
    w = obj.weights
    teacher_pass = t_head = None
    if teacher is not None and w.uses_teacher:  # no teacher forward when no term reads it
        teacher_pass = jax.lax.stop_gradient(forward_pass(teacher, teacher_params, masked_ids, attention_mask,
                                                     w.records_layers, deterministic=True))
        t_head = lambda h: teacher.apply({"params": teacher_params}, h,  # noqa: E731
                                         method=type(teacher).head_inputs)
    t_logits = teacher_pass is not None and obj.teacher_logits

    def loss_fn(p):
        student, projections = model_params(p), p.get(PROJECTIONS, {})
        s_pass = forward_pass(model, student, masked_ids, attention_mask, w.records_layers and teacher_pass is not None,
                         deterministic=False, rngs={"dropout": dropout_rng})
        out = s_pass.out
        s_head = lambda h: model.apply({"params": student}, h, method=type(model).head_inputs)  # noqa: E731
        t_hidden = teacher_pass.out.last_hidden_state if t_logits else None
        loss, terms = vocab_loss_and_terms(obj, out.last_hidden_state, s_head, t_hidden, t_head, labels,
                                       targets, attention_mask)
        if teacher_pass is not None:
            same_width = out.last_hidden_state.shape == teacher_pass.out.last_hidden_state.shape
            for name, term in REPRESENTATION_TERMS.items() if same_width else ():  # else weight 0 (config)
                value = term(out, teacher_pass.out, attention_mask)
                terms[f"loss_{name}"] = value
                loss = loss + getattr(w, name) * value
            for term in w.layers:
                value = LAYER_LOSSES[term.kind](s_pass, teacher_pass, term, attention_mask,
                                                    projections.get(term.name), obj)
                terms[f"loss_{term.name}"] = value
                loss = loss + term.weight * value
        return loss, {**terms, "loss": loss}

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return metrics, grads
