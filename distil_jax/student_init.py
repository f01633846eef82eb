"""A student's params taken from its teacher's (the reference's scripts/extract_distilbert.py).

Both models share one parameter naming (distil_jax/models/layers.py), so this is a copy
of embeddings, chosen layers and the MLM head. Token-type embeddings have no place in
the student; by default their row 0 (the segment every input here uses) is folded
into the position table, so that the student's embedding output equals the teacher's
exactly. The reference drops them instead: `fold_token_type=False` does the same.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp

from distil_jax.models import BertConfig, DistilBert, DistilBertConfig, EncoderConfig, init_params

Params = Dict[str, Any]

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


def student_config_from_teacher(teacher: EncoderConfig, num_layers: Optional[int] = None,
                                **overrides) -> DistilBertConfig:
    """A DistilBertConfig of the teacher's width and vocabulary with half its layers by default."""
    max_pos = teacher.max_position_embeddings - _position_offset(teacher)
    fields = dict(
        vocab_size=teacher.vocab_size, hidden_size=teacher.hidden_size,
        num_layers=num_layers or max(1, teacher.num_layers // 2), num_heads=teacher.num_heads,
        intermediate_size=teacher.intermediate_size, max_position_embeddings=max_pos,
        layer_norm_eps=teacher.layer_norm_eps, hidden_dropout=teacher.hidden_dropout,
        attention_dropout=teacher.attention_dropout, hidden_act=teacher.hidden_act,
        pad_token_id=teacher.pad_token_id, initializer_range=teacher.initializer_range)
    fields.update(overrides)
    return DistilBertConfig(**fields)


def _position_offset(config: EncoderConfig) -> int:
    return config.position_offset if isinstance(config, BertConfig) else 0


def init_student_from_teacher(teacher_params: Params, teacher_config: EncoderConfig,
                              student_config: DistilBertConfig,
                              layer_map: Optional[Sequence[int]] = None,
                              vocab_transform: bool = True, fold_token_type: bool = True,
                              rng: Optional[jax.Array] = None) -> Params:
    """Student params from teacher params.

    layer_map: teacher layer for each student layer (default: `default_layer_map`).
    vocab_transform: copy the MLM head's dense + LayerNorm (else fresh, from `rng`).
    fold_token_type: add the teacher's token-type row 0 into the position embeddings.
    """
    problems = []
    for field in ("hidden_size", "vocab_size", "num_heads", "intermediate_size"):
        t, s = getattr(teacher_config, field), getattr(student_config, field)
        if t != s:
            problems.append(f"{field}: teacher {t}, student {s}")
    offset = _position_offset(teacher_config)
    if student_config.max_position_embeddings > teacher_config.max_position_embeddings - offset:
        problems.append(f"max_position_embeddings: student {student_config.max_position_embeddings} "
                        f"> teacher's {teacher_config.max_position_embeddings - offset} usable")
    if problems:
        raise ValueError("cannot initialise the student from the teacher, the shapes differ ("
                         + "; ".join(problems) + "); make the student's sizes equal the "
                         "teacher's or initialise it randomly")
    if layer_map is None:
        layer_map = default_layer_map(teacher_config.num_layers, student_config.num_layers)
    layer_map = tuple(int(i) for i in layer_map)
    if len(layer_map) != student_config.num_layers or not all(
            0 <= i < teacher_config.num_layers for i in layer_map):
        raise ValueError(f"layer_map {layer_map} must name {student_config.num_layers} teacher "
                         f"layers in 0..{teacher_config.num_layers - 1}")

    positions = teacher_params["position_embeddings"]["embedding"][
        offset: offset + student_config.max_position_embeddings]
    if fold_token_type and "token_type_embeddings" in teacher_params:
        positions = positions + teacher_params["token_type_embeddings"]["embedding"][0]

    head = dict(teacher_params["mlm_head"])
    if not vocab_transform:
        if rng is None:
            raise ValueError("vocab_transform=False initialises the head's transform afresh "
                             "and needs an rng")
        fresh = init_params(DistilBert(student_config.replace(num_layers=1)), rng)["mlm_head"]
        head.update(transform=fresh["transform"], layer_norm=fresh["layer_norm"])

    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731 (own buffers, never aliased)
    return copy({
        "word_embeddings": teacher_params["word_embeddings"],
        "position_embeddings": {"embedding": positions},
        "embeddings_norm": teacher_params["embeddings_norm"],
        "encoder": {f"layer_{k}": teacher_params["encoder"][f"layer_{t}"]
                    for k, t in enumerate(layer_map)},
        "mlm_head": head,
    })
