"""Hugging Face DeBERTa-v2/v3 (model_type "deberta-v2") <-> our DebertaV2 params.

The table and config.json fields of the family; interop/hf.py loads and saves through
them (tables.py's transforms and readers). A PyTorch Linear weight is [out, in], ours [in, out]; attention projections are split by
head on our side. The mapping is one table built from the config, since which tensors
exist depends on it (absolute positions, token types, embedding projection, relative
table and its LayerNorm, per-layer position projections unless share_att_key, the head).

Checkpoints come with the encoder under "deberta." (DebertaV2ForMaskedLM and the other
task models) or at the top level (DebertaV2Model.save_pretrained). The MLM head is
transformers' legacy `cls.predictions.*` or the newer `lm_predictions.lm_head.*`
(config `legacy`); the released DeBERTa-v3 checkpoints have neither (they are the
ELECTRA-style discriminators): those load as an encoder, config.mlm_head False.
"""

from __future__ import annotations

from typing import Any, Collection, Dict, List, Optional, Tuple

import numpy as np
from absl import logging

from distil_jax.interop.tables import BERT_LAYER
from distil_jax.models.deberta import DebertaV2Config

Params = Dict[str, Any]
Table = List[Tuple[str, str, Optional[str]]]

MODEL_TYPE = "deberta-v2"
BASE = "deberta."  # the encoder's prefix in every task model's checkpoint

# BERT's layer table with DeBERTa's names for the attention's projections.
_LAYER = [(hf.replace("self.query.", "self.query_proj.").replace("self.key.", "self.key_proj.")
           .replace("self.value.", "self.value_proj."), ours, kind) for hf, ours, kind in BERT_LAYER]
_POS_KEY = [("attention.self.pos_key_proj.weight", "attention/pos_key/kernel", "qkv"),
            ("attention.self.pos_key_proj.bias", "attention/pos_key/bias", "qkv_bias")]
_POS_QUERY = [("attention.self.pos_query_proj.weight", "attention/pos_query/kernel", "qkv"),
              ("attention.self.pos_query_proj.bias", "attention/pos_query/bias", "qkv_bias")]
# (dense, LayerNorm, bias) of the MLM head: legacy (cls.predictions) and newer (lm_predictions)
_HEADS = {True: ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                 "cls.predictions.bias"),
          False: ("lm_predictions.lm_head.dense", "lm_predictions.lm_head.LayerNorm",
                  "lm_predictions.lm_head.bias")}


def head_table(legacy: bool) -> Table:
    dense, norm, bias = _HEADS[legacy]
    return [(f"{dense}.weight", "mlm_head/transform/kernel", "linear"),
            (f"{dense}.bias", "mlm_head/transform/bias", None),
            (f"{norm}.weight", "mlm_head/layer_norm/scale", None),
            (f"{norm}.bias", "mlm_head/layer_norm/bias", None),
            (bias, "mlm_head/bias", None)]


def param_table(config: DebertaV2Config, prefix: str = BASE) -> Table:
    """Every (HF name, our '/'-joined path, transform) of a model with this config (the
    head's rows when config.mlm_head; the encoder's under `prefix`)."""
    p = prefix
    rows: Table = [(f"{p}embeddings.word_embeddings.weight", "word_embeddings/embedding", None)]
    if config.position_biased_input:
        rows.append((f"{p}embeddings.position_embeddings.weight", "position_embeddings/embedding", None))
    if config.type_vocab_size > 0:
        rows.append((f"{p}embeddings.token_type_embeddings.weight", "token_type_embeddings/embedding", None))
    if config.embedding_width != config.hidden_size:
        rows.append((f"{p}embeddings.embed_proj.weight", "embed_proj/kernel", "linear"))
    rows += [(f"{p}embeddings.LayerNorm.weight", "embeddings_norm/scale", None),
             (f"{p}embeddings.LayerNorm.bias", "embeddings_norm/bias", None)]
    if config.relative_attention:
        rows.append((f"{p}encoder.rel_embeddings.weight", "encoder/rel_embeddings", None))
        if config.rel_layer_norm:
            rows += [(f"{p}encoder.LayerNorm.weight", "encoder/rel_norm/scale", None),
                     (f"{p}encoder.LayerNorm.bias", "encoder/rel_norm/bias", None)]
    layer = list(_LAYER)
    if config.relative_attention and not config.share_att_key:
        layer += (_POS_KEY if "c2p" in config.pos_att_type else []) + \
                 (_POS_QUERY if "p2c" in config.pos_att_type else [])
    for i in range(config.num_layers):
        rows += [(f"{p}encoder.layer.{i}.{hf}", f"encoder/layer_{i}/{ours}", t) for hf, ours, t in layer]
    if config.mlm_head:
        rows += head_table(config.legacy)
    return rows


# --- configs ----------------------------------------------------------------------
def read_deberta_config(hf: Dict[str, Any]) -> DebertaV2Config:
    """Our config from a config.json dict of model_type "deberta-v2"; missing keys mean
    what transformers' DebertaV2Config (and the modeling code's getattr defaults) mean."""
    model_type = hf.get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(f"model_type {model_type!r} is not {MODEL_TYPE!r} (DeBERTa-v2/v3); DeBERTa v1 "
                         "('deberta') has another attention layout and is not supported")
    if hf.get("conv_kernel_size", 0) > 0:
        raise ValueError(
            f"conv_kernel_size {hf['conv_kernel_size']}: the convolution beside the first layer "
            "(deberta-v2-xlarge / xxlarge) is not supported; DeBERTa-v3 checkpoints have none")
    hidden, heads = hf.get("hidden_size", 1536), hf.get("num_attention_heads", 24)
    head_size = hf.get("attention_head_size")
    if head_size is not None and head_size * heads != hidden:
        raise ValueError(f"attention_head_size {head_size} x {heads} heads != hidden_size {hidden}: "
                         "attention widths other than hidden_size are not supported")
    embedding_size = hf.get("embedding_size")
    pad = hf.get("pad_token_id")
    return DebertaV2Config(
        vocab_size=hf.get("vocab_size", 128100), hidden_size=hidden,
        num_layers=hf.get("num_hidden_layers", 24), num_heads=heads,
        intermediate_size=hf.get("intermediate_size", 6144),
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-7),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        hidden_act=hf.get("hidden_act", "gelu"),
        pad_token_id=0 if pad is None else pad,
        initializer_range=hf.get("initializer_range", 0.02),
        type_vocab_size=hf.get("type_vocab_size", 0),
        position_biased_input=hf.get("position_biased_input", True),
        relative_attention=hf.get("relative_attention", False),
        max_relative_positions=hf.get("max_relative_positions", -1),
        position_buckets=hf.get("position_buckets", -1),
        pos_att_type=hf.get("pos_att_type"),
        share_att_key=hf.get("share_att_key", False),
        norm_rel_ebd=hf.get("norm_rel_ebd", "none"),
        embedding_size=None if embedding_size in (None, hidden) else embedding_size,
        legacy=hf.get("legacy", True))


def deberta_config_to_hf(config: DebertaV2Config) -> Dict[str, Any]:
    """A config.json dict that transformers reads back as the same DebertaV2ForMaskedLM
    (DebertaV2Model for a config without MLM head)."""
    out = dict(
        architectures=["DebertaV2ForMaskedLM" if config.mlm_head else "DebertaV2Model"],
        model_type=MODEL_TYPE, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size, hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout,
        attention_probs_dropout_prob=config.attention_dropout,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size, initializer_range=config.initializer_range,
        layer_norm_eps=config.layer_norm_eps, relative_attention=config.relative_attention,
        max_relative_positions=config.max_relative_positions,
        position_buckets=config.position_buckets, pos_att_type=list(config.pos_att_type),
        share_att_key=config.share_att_key, norm_rel_ebd=config.norm_rel_ebd,
        position_biased_input=config.position_biased_input, pad_token_id=config.pad_token_id,
        legacy=config.legacy, tie_word_embeddings=True)
    if config.embedding_width != config.hidden_size:
        out["embedding_size"] = config.embedding_width
    return out


# --- params -----------------------------------------------------------------------
def encoder_prefix(state: Dict[str, np.ndarray]) -> str:
    """"deberta." or "" (a DebertaV2Model's own checkpoint), from the word embeddings' name."""
    for prefix in (BASE, ""):
        if f"{prefix}embeddings.word_embeddings.weight" in state:
            return prefix
    raise ValueError("the checkpoint holds no DeBERTa encoder: neither "
                     f"{BASE}embeddings.word_embeddings.weight nor embeddings.word_embeddings.weight")


def ignorable(name: str, config: DebertaV2Config) -> bool:
    """Tensors a checkpoint may hold that carry nothing of ours (transformers ignores them
    too): buffers, the tied decoder, the RTD discriminator head, absolute positions of a
    model that does not add them, the rel LayerNorm of a model without relative attention
    (the encoder's under "deberta." or at the top level)."""
    bare = name.removeprefix(BASE)
    return (bare == "embeddings.position_ids"
            or name in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
            or name.startswith("mask_predictions.")
            or (not config.position_biased_input and bare == "embeddings.position_embeddings.weight")
            or (not config.relative_attention and bare.startswith("encoder.LayerNorm.")))


def with_the_head_found(config: DebertaV2Config, names: Collection[str]) -> DebertaV2Config:
    """The config with `legacy` and `mlm_head` as the checkpoint's tensor names say: without MLM
    head tensors (the released DeBERTa-v3 checkpoints) the model is an encoder (mlm_head
    False, logits None), which a distillation that needs the teacher's logits must refuse."""
    has_head = {legacy: f"{_HEADS[legacy][0]}.weight" in names for legacy in (True, False)}
    legacy = config.legacy
    if not has_head[legacy] and has_head[not legacy]:
        # e.g. microsoft/deberta-v2-* carry lm_predictions.lm_head.* with no `legacy` key (True
        # by default): transformers would leave its cls.predictions head random; we read the
        # head the checkpoint holds and record which (a save writes it with that flag).
        logging.warning("the config says legacy=%s but the checkpoint holds the %s MLM head: using it",
                        legacy, _HEADS[not legacy][0].split(".")[0])
        legacy = not legacy
    return config.replace(legacy=legacy, mlm_head=has_head[legacy])


def unused_norm(config: DebertaV2Config, dtype=np.float32) -> Dict[str, np.ndarray]:
    """transformers builds the relative table's LayerNorm whenever norm_rel_ebd says so and
    uses it only on that table: for a model without relative attention it is written as
    the identity, so that nothing is missing on load."""
    if config.relative_attention or not config.rel_layer_norm:
        return {}
    return {f"{BASE}encoder.LayerNorm.weight": np.ones(config.hidden_size, dtype),
            f"{BASE}encoder.LayerNorm.bias": np.zeros(config.hidden_size, dtype)}
