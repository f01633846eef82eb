"""A student's architecture from its teacher's, and which teacher layer each student
layer is taken from (the params themselves: train/student_init.py).

A BERT teacher's student is a DistilBERT (the paper's); any other family's is of its own
family with fewer layers (`student_config_from_teacher`). Layers are evenly spaced by
default (the paper's 12 -> 6 is one layer out of two, keeping the first and the last);
a ModernBERT student layer takes a teacher layer of its own attention
kind, since a sliding-window layer's weights and rotary base were trained for local
attention and a global layer's for global. The student keeps the teacher's rule, layer
i global iff i % global_attn_every_n_layers == 0, whatever its depth, so a map that sends
a sliding-window teacher layer to a global student layer (or back) breaks the pattern
and is refused (`pattern_problems`) before anything runs.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from distil_jax.models.bert import BertConfig
from distil_jax.models.deberta import DebertaV2Config
from distil_jax.models.distilbert import DistilBertConfig
from distil_jax.models.layers import EncoderConfig
from distil_jax.models.modernbert import ModernBertConfig


def distils_to_distilbert(teacher: EncoderConfig) -> bool:
    """A BERT (or DistilBERT) teacher's student is a DistilBERT, the paper's; a teacher of
    another family gets a student of its own family."""
    return isinstance(teacher, DistilBertConfig) or (isinstance(teacher, BertConfig) and not teacher.roberta_like)


def student_config_from_teacher(teacher: EncoderConfig, num_layers: Optional[int] = None,
                                **overrides) -> EncoderConfig:
    """The student's architecture, of the teacher's width and vocabulary with half its
    layers by default: a DistilBERT of a BERT teacher (no token types, no pooler); of any
    other family the same family with fewer layers: DistilRoBERTa's layout (a RoBERTa of
    6 layers, its own position offset) for RoBERTa and XLM-R, a DeBERTa that keeps the
    relative-position table, a ModernBERT that keeps the teacher's global / sliding-window
    rule (layer i global iff i % global_attn_every_n_layers == 0); always with an MLM head
    (a fresh one when the teacher has none)."""
    num_layers = num_layers or max(1, teacher.num_layers // 2)
    if not distils_to_distilbert(teacher):
        changes = dict(num_layers=num_layers, **overrides)
        if isinstance(teacher, BertConfig):
            changes["add_pooler"] = False
        elif isinstance(teacher, DebertaV2Config):
            changes["mlm_head"] = True
        elif isinstance(teacher, ModernBertConfig):
            changes["layer_types"] = None  # the rule, global_attn_every_n_layers, for any depth
        return teacher.replace(**changes)
    fields = dict(
        vocab_size=teacher.vocab_size, hidden_size=teacher.hidden_size,
        num_layers=num_layers, num_heads=teacher.num_heads,
        intermediate_size=teacher.intermediate_size, max_position_embeddings=teacher.max_position_embeddings,
        layer_norm_eps=teacher.layer_norm_eps, hidden_dropout=teacher.hidden_dropout,
        attention_dropout=teacher.attention_dropout, hidden_act=teacher.hidden_act,
        pad_token_id=teacher.pad_token_id, initializer_range=teacher.initializer_range)
    fields.update(overrides)
    return DistilBertConfig(**fields)


# The paper's choice for 12 -> 6: one layer out of two, keeping the first and the last.
DISTILBERT_LAYER_MAP = (0, 2, 4, 7, 9, 11)


def default_layer_map(teacher_layers: int, student_layers: int) -> tuple:
    """Student layer k <- teacher layer round_half_up(k * (T - 1) / (S - 1)).

    Evenly spaced teacher layers keeping the first and the last; for 12 -> 6 this is the
    paper's (0, 2, 4, 7, 9, 11). A one-layer student takes the teacher's first layer.
    """
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"a student of {student_layers} layers cannot be taken from a teacher "
                         f"of {teacher_layers}; choose 1..{teacher_layers} student layers")
    if student_layers == 1:
        return (0,)
    step = (teacher_layers - 1) / (student_layers - 1)
    return tuple(int(math.floor(k * step + 0.5)) for k in range(student_layers))


def layer_map_for(teacher: EncoderConfig, student: EncoderConfig) -> tuple:
    """The default teacher layer of each student layer: `default_layer_map`, except that a
    ModernBERT student layer takes the nearest teacher layer of its own attention kind
    (global or sliding window, which its weights and rotary base were trained for), in
    increasing order."""
    spread = default_layer_map(teacher.num_layers, student.num_layers)
    if not isinstance(teacher, ModernBertConfig):
        return spread
    chosen, previous = [], -1
    for k, target in enumerate(spread):
        kind = student.is_global(k)
        candidates = [t for t in range(previous + 1, teacher.num_layers) if teacher.is_global(t) == kind]
        if not candidates:
            raise ValueError(f"the teacher's layers {teacher.attention_types} hold no "
                             f"{'global' if kind else 'sliding-window'} layer after layer {previous} for "
                             f"student layer {k}: give student.layer_map, or fewer student layers")
        chosen.append(min(candidates, key=lambda t: (abs(t - target), t)))
        previous = chosen[-1]
    return tuple(chosen)


def pattern_problems(teacher: EncoderConfig, student: EncoderConfig, layer_map: Sequence[int]) -> list:
    """For a ModernBERT: the student layers whose teacher layer is of another attention kind."""
    if not isinstance(teacher, ModernBertConfig):
        return []
    kind = lambda c, i: "global" if c.is_global(i) else "sliding-window"  # noqa: E731
    wrong = [f"student layer {k} ({kind(student, k)}) <- teacher layer {t} ({kind(teacher, t)})"
             for k, t in enumerate(layer_map) if 0 <= t < teacher.num_layers and
             student.is_global(k) != teacher.is_global(t)]
    if not wrong:
        return []
    return [f"student.layer_map {tuple(layer_map)} breaks ModernBERT's attention pattern (student layer i "
            f"is global iff i % {student.global_attn_every_n_layers} == 0): " + "; ".join(wrong) +
            f". Map each student layer to a teacher layer of its kind, e.g. {layer_map_for(teacher, student)}"]
