"""A student's params taken from its teacher's (the reference's scripts/extract_distilbert.py).

Every family shares one parameter naming (distil_jax/models/layers.py), so this is a
copy of embeddings, chosen layers and the MLM head. A BERT teacher's student is a
DistilBERT (the paper's); any other family's is of its own family (student_config_from_teacher):
a RoBERTa / XLM-R student (DistilRoBERTa's layout) keeps its token types and position
offset, a DeBERTa its relative-position table, a ModernBERT its global / sliding-window
rule, each student layer taken from a teacher layer of its own attention kind. Token-type embeddings have no place in
the student; by default their row 0 (the segment every input here uses) is folded
into the position table, so that the student's embedding output equals the teacher's
exactly. The reference drops them instead: `fold_token_type=False` does the same.

A student narrower than its teacher is cut from it by structured pruning, the way
Minitron does it for LLMs (`activation_importance`, then `init_student_from_teacher`
with the importance): on a few calibration batches the teacher's embedding channels,
attention heads and feed-forward neurons are ranked by their activations, the top ones
kept, and every tensor sliced accordingly. The rule, deterministic:
  - a channel's importance is the mean |value| over real tokens of that channel in the
    embeddings' output and every layer's output (each a LayerNorm's output), summed;
  - a head's (per layer) is the mean over real tokens of the L2 norm of its attention
    output (the head's context vector, before the output projection);
  - a neuron's (per layer) is the mean over real tokens of |its activation|;
  - the k most important are kept (ties: the lower index), in their original order, so
    a student that keeps everything is the teacher's copy, bit for bit.
Heads are kept whole: the student's head size is the teacher's.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distil_jax.models import (BertConfig, DistilBertConfig, EncoderConfig, MaskedLM, apply_recording,
                               init_params, module_for)
from distil_jax.models.students import (DISTILBERT_LAYER_MAP, default_layer_map, layer_map_for, pattern_problems,
                                        student_config_from_teacher)

__all__ = ["DISTILBERT_LAYER_MAP", "activation_importance", "default_layer_map", "init_student_from_teacher",
           "layer_map_for", "most_important", "student_config_from_teacher"]

Params = Dict[str, Any]

def activation_importance(model: MaskedLM, params: Params, batches: Iterable[Dict[str, np.ndarray]],
                          combine: Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]] = lambda s: s
                          ) -> Dict[str, np.ndarray]:
    """The importance of every channel, head and neuron of `model` (the module docstring's
    rule) on `batches` of input_ids / attention_mask: {"channels": [D], "heads": [L, H],
    "neurons": [L, F]}, float64 means over all the batches' real tokens. `combine` maps
    this process's sums (and token count) to the sums over every process's batches."""

    @jax.jit
    def sums(batch):
        out, records = apply_recording(model, params, batch["input_ids"], batch["attention_mask"],
                                       deterministic=True, compute_logits=False)
        real = batch["attention_mask"].astype(jnp.float32)
        over_tokens = lambda x: jnp.einsum("bs,bs...->...", real, x.astype(jnp.float32))  # noqa: E731
        return {"channels": sum(over_tokens(jnp.abs(h)) for h in out.hidden_states),
                "heads": jnp.stack([over_tokens(jnp.linalg.norm(r["context"].astype(jnp.float32), axis=-1))
                                    for r in records]),
                "neurons": jnp.stack([over_tokens(jnp.abs(r["ffn"])) for r in records]),
                "tokens": jnp.sum(real)}

    total = None
    for batch in batches:
        found = {k: np.asarray(v, np.float64) for k, v in jax.device_get(sums(batch)).items()}
        total = found if total is None else {k: total[k] + found[k] for k in total}
    if total is None:
        raise ValueError("activation_importance needs at least one batch")
    total = combine(total)
    if total["tokens"] == 0:
        raise ValueError("activation_importance needs at least one batch with a real token")
    tokens = total.pop("tokens")
    return {k: v / tokens for k, v in total.items()}


def most_important(importance: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries (ties: the lower index), in ascending order."""
    order = np.argsort(-np.asarray(importance), kind="stable")
    return np.sort(order[:k])


def _keep(layer: Params, ch, heads, neurons) -> Params:
    """One encoder layer's params with only channels `ch`, `heads` and `neurons` kept."""
    att = layer["attention"]
    norm = lambda p: {"scale": p["scale"][ch], "bias": p["bias"][ch]}  # noqa: E731
    return {
        "attention": {**{n: {"kernel": att[n]["kernel"][ch][:, heads], "bias": att[n]["bias"][heads]}
                         for n in ("query", "key", "value")},
                      "out": {"kernel": att["out"]["kernel"][heads][:, :, ch], "bias": att["out"]["bias"][ch]}},
        "attention_norm": norm(layer["attention_norm"]),
        "wi": {"kernel": layer["wi"]["kernel"][ch][:, neurons], "bias": layer["wi"]["bias"][neurons]},
        "wo": {"kernel": layer["wo"]["kernel"][neurons][:, ch], "bias": layer["wo"]["bias"][ch]},
        "output_norm": norm(layer["output_norm"]),
    }


def init_student_from_teacher(teacher_params: Params, teacher_config: EncoderConfig,
                              student_config: EncoderConfig,
                              layer_map: Optional[Sequence[int]] = None,
                              vocab_transform: bool = True, fold_token_type: bool = True,
                              rng: Optional[jax.Array] = None,
                              importance: Optional[Dict[str, np.ndarray]] = None) -> Params:
    """Student params from teacher params.

    layer_map: teacher layer for each student layer (default: `default_layer_map`).
    vocab_transform: copy the MLM head's dense + LayerNorm (else fresh, from `rng`).
    fold_token_type: add the teacher's token-type row 0 into the position embeddings.
    importance: `activation_importance` of the teacher, to cut it to a student of smaller
    width, fewer heads or neurons (pruning); without it the sizes must be the teacher's.
    """
    problems = []
    fields = ("hidden_size", "vocab_size", "num_heads", "intermediate_size")
    for field in fields:
        t, s = getattr(teacher_config, field), getattr(student_config, field)
        if t != s and (importance is None or field == "vocab_size"):
            problems.append(f"{field}: teacher {t}, student {s}")
        elif s > t:  # pruned
            problems.append(f"{field}: student {s} > teacher {t}")
    if importance is not None and student_config.head_dim != teacher_config.head_dim:
        problems.append(f"head size: teacher {teacher_config.head_dim}, student {student_config.head_dim} "
                        "(pruning keeps whole heads)")
    t_off, s_off = _position_offset(teacher_config), _position_offset(student_config)
    usable = teacher_config.max_position_embeddings - t_off
    if student_config.max_position_embeddings - s_off > usable:
        problems.append(f"max_position_embeddings: student {student_config.max_position_embeddings - s_off} "
                        f"usable > teacher's {usable}")
    if problems:
        raise ValueError("cannot initialise the student from the teacher, the shapes differ ("
                         + "; ".join(problems) + "); make the student's sizes equal the "
                         "teacher's, prune it (student.init='prune') or initialise it randomly")
    if layer_map is None:
        layer_map = layer_map_for(teacher_config, student_config)
    layer_map = tuple(int(i) for i in layer_map)
    if len(layer_map) != student_config.num_layers or not all(
            0 <= i < teacher_config.num_layers for i in layer_map):
        raise ValueError(f"layer_map {layer_map} must name {student_config.num_layers} teacher "
                         f"layers in 0..{teacher_config.num_layers - 1}")
    problems = pattern_problems(teacher_config, student_config, layer_map)
    if problems:
        raise ValueError(problems[0])
    if not isinstance(student_config, (BertConfig, DistilBertConfig)):
        if importance is not None:
            raise ValueError(f"pruning cuts BERT-style teachers; a {type(teacher_config).__name__} "
                             "student copies whole layers: use student.init='teacher' or 'random'")
        return _copy_layers(teacher_params, student_config, layer_map, vocab_transform, rng)

    if importance is None:  # keep everything
        importance = {"channels": np.zeros(teacher_config.hidden_size),
                      "heads": np.zeros((teacher_config.num_layers, teacher_config.num_heads)),
                      "neurons": np.zeros((teacher_config.num_layers, teacher_config.intermediate_size))}
    ch = most_important(importance["channels"], student_config.hidden_size)
    tp = jax.tree.map(np.asarray, teacher_params)
    # Student row s_off + p <- teacher row t_off + p; a RoBERTa student's rows below its
    # offset (padding's) are the teacher's own (the same offset).
    table = tp["position_embeddings"]["embedding"]
    positions = np.concatenate([table[:s_off], table[t_off: t_off + student_config.max_position_embeddings - s_off]])
    keeps_token_types = isinstance(student_config, BertConfig)  # DistilRoBERTa's layout; DistilBERT has none
    if fold_token_type and not keeps_token_types and "token_type_embeddings" in tp:
        positions = positions + tp["token_type_embeddings"]["embedding"][0]

    t_head = tp["mlm_head"]
    head = {"transform": {"kernel": t_head["transform"]["kernel"][ch][:, ch],
                          "bias": t_head["transform"]["bias"][ch]},
            "layer_norm": {k: v[ch] for k, v in t_head["layer_norm"].items()}, "bias": t_head["bias"]}
    if not vocab_transform:
        if rng is None:
            raise ValueError("vocab_transform=False initialises the head's transform afresh "
                             "and needs an rng")
        fresh = _fresh_head(student_config, rng)
        head.update(transform=fresh["transform"], layer_norm=fresh["layer_norm"])

    layers = {}
    for k, t in enumerate(layer_map):
        heads = most_important(importance["heads"][t], student_config.num_heads)
        neurons = most_important(importance["neurons"][t], student_config.intermediate_size)
        layers[f"layer_{k}"] = _keep(tp["encoder"][f"layer_{t}"], ch, heads, neurons)
    out = {
        "word_embeddings": {"embedding": tp["word_embeddings"]["embedding"][:, ch]},
        "position_embeddings": {"embedding": positions[:, ch]},
        "embeddings_norm": {k: v[ch] for k, v in tp["embeddings_norm"].items()},
        "encoder": layers,
        "mlm_head": head,
    }
    if keeps_token_types:
        out["token_type_embeddings"] = {"embedding": tp["token_type_embeddings"]["embedding"][:, ch]}
    return jax.tree.map(jnp.array, out)  # own buffers, never aliased to the teacher's


def _fresh_head(student_config: EncoderConfig, rng: Optional[jax.Array]) -> Params:
    if rng is None:
        raise ValueError("a fresh MLM head (vocab_transform=False, or a teacher without one) needs an rng")
    return init_params(module_for(student_config)(student_config.replace(num_layers=1)), rng)["mlm_head"]


def _copy_layers(teacher_params: Params, student_config: EncoderConfig, layer_map: Sequence[int],
                 vocab_transform: bool, rng: Optional[jax.Array]) -> Params:
    """A student of the teacher's own family (DeBERTa, ModernBERT) and width: everything
    outside the layers copied (embeddings, DeBERTa's relative-position table and its norm,
    ModernBERT's final norm, the MLM head), layer k = teacher layer layer_map[k]. A teacher
    without MLM head (DeBERTa-v3) gives a fresh one; `vocab_transform=False` a fresh
    transform and norm before the tied decoder."""
    tp = jax.tree.map(np.asarray, teacher_params)
    out = {k: v for k, v in tp.items() if k not in ("encoder", "pooler")}
    out["encoder"] = {k: v for k, v in tp["encoder"].items() if not k.startswith("layer_")}
    out["encoder"].update({f"layer_{k}": tp["encoder"][f"layer_{t}"] for k, t in enumerate(layer_map)})
    if "mlm_head" not in out:
        out["mlm_head"] = _fresh_head(student_config, rng)
    elif not vocab_transform:
        fresh = _fresh_head(student_config, rng)
        out["mlm_head"] = {**out["mlm_head"], "transform": fresh["transform"], "layer_norm": fresh["layer_norm"]}
    return jax.tree.map(jnp.array, out)  # own buffers, never aliased to the teacher's


def _position_offset(config: EncoderConfig) -> int:
    return config.position_offset if isinstance(config, BertConfig) else 0
