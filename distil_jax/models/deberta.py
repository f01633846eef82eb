"""DeBERTa-v2/v3 masked LM, like transformers' DebertaV2ForMaskedLM (DebertaV2Model + MLM head).

What differs from the BERT-style MaskedLM (models/layers.py):

* Embeddings: word embeddings of width `embedding_size` (projected to hidden_size without a
  bias when it differs), absolute positions only when `position_biased_input` (DeBERTa-v3
  has none), token types only when `type_vocab_size` > 0; after the LayerNorm the padded
  positions are zeroed (multiplied by the attention mask).
* Disentangled self-attention: content-to-content scores plus content-to-position (c2p:
  queries against the projected relative-position embeddings, at the key's relative
  position) and position-to-content (p2c: keys against projected relative-position
  embeddings, at the query's) terms, all divided by sqrt(head_dim * (1 + number of terms)).
  One relative-position table (`encoder/rel_embeddings`, optionally LayerNorm'ed) is
  shared by all layers; each layer projects it with its own `pos_key` / `pos_query`
  projections, or with its query / key projections when `share_att_key`. Relative
  positions are log-bucketed when `position_buckets` > 0.
* Masking as transformers does it: a query-key pair is kept when both are real tokens, so
  a padded query row has every score masked and attends uniformly to all positions (as
  transformers' masked_fill + softmax does). Real tokens never see padding; padded rows
  are computed as transformers computes them.
* MLM head: dense (hidden -> embedding_size) -> activation -> LayerNorm -> decoder tied
  to the word embeddings + bias (transformers' legacy `cls.predictions` and its newer
  `lm_predictions.lm_head` are the same computation under different names). A DeBERTa
  without an MLM head (released DeBERTa-v3 checkpoints are discriminators: encoder only)
  has `config.mlm_head = False`: no head params, its outputs' logits are None, and
  `mlm_logits` / `head_inputs` are errors that say why.

The layer keeps the names of layers.EncoderLayer (attention/{query,key,value,out},
attention_norm, wi, wo, output_norm) and records the same intermediates (q, k, v,
context, ffn), so that apply_recording and the name-based tools work on it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from distil_jax.models.layers import (Dropout, Embed, EncoderConfig, MaskedLM, MLMHead,
                                      add_and_feed_forward, attend, head_projection, kernel_init, key_lengths,
                                      layer_norm, output_projection, record_qkv, stack_layers, zeros_init)

POS_ATT_TYPES = ("c2p", "p2c")
NORM_REL_EBD = ("none", "layer_norm")


@dataclasses.dataclass(frozen=True)
class DebertaV2Config(EncoderConfig):
    """HF DebertaV2Config's fields that change the computation, in EncoderConfig's names
    (num_hidden_layers -> num_layers, num_attention_heads -> num_heads, hidden_dropout_prob
    -> hidden_dropout, attention_probs_dropout_prob -> attention_dropout).

    The defaults are microsoft/deberta-v3-base's config.json (not transformers' class
    defaults; `interop.hf_deberta.read_deberta_config` applies those to missing keys).

    max_relative_positions < 1 means max_position_embeddings (as in transformers).
    pos_att_type: a subset of ("c2p", "p2c"), in any order; also accepted as "p2c|c2p".
    norm_rel_ebd: "layer_norm" (LayerNorm on the relative-position table) or "none".
    embedding_size: the word embeddings' width; None means hidden_size.
    legacy: the MLM head's names in transformers (True: cls.predictions, False:
        lm_predictions.lm_head); the computation is the same.
    mlm_head: False for an encoder without MLM head (no logits).
    """

    vocab_size: int = 128100
    layer_norm_eps: float = 1e-7
    type_vocab_size: int = 0
    position_biased_input: bool = False
    relative_attention: bool = True
    max_relative_positions: int = -1
    position_buckets: int = 256
    pos_att_type: Tuple[str, ...] = ("p2c", "c2p")
    share_att_key: bool = True
    norm_rel_ebd: str = "layer_norm"
    embedding_size: Optional[int] = None
    legacy: bool = True
    mlm_head: bool = True

    def __post_init__(self):
        pos_att_type = self.pos_att_type
        if pos_att_type is None:
            pos_att_type = ()
        elif isinstance(pos_att_type, str):
            pos_att_type = [x for x in pos_att_type.split("|")]
        pos_att_type = tuple(str(x).strip().lower() for x in pos_att_type if str(x).strip())
        object.__setattr__(self, "pos_att_type", pos_att_type)
        norm = "|".join(x.strip() for x in str(self.norm_rel_ebd or "none").lower().split("|"))
        object.__setattr__(self, "norm_rel_ebd", norm)
        super().__post_init__()
        problems = []
        unknown = [x for x in pos_att_type if x not in POS_ATT_TYPES]
        if unknown or len(set(pos_att_type)) != len(pos_att_type):
            problems.append(f"pos_att_type {pos_att_type} must be distinct entries of {POS_ATT_TYPES}")
        if any(x not in NORM_REL_EBD for x in norm.split("|")):
            problems.append(f"norm_rel_ebd {self.norm_rel_ebd!r} is not one of {NORM_REL_EBD}")
        if self.embedding_size is not None and self.embedding_size <= 0:
            problems.append(f"embedding_size must be positive, got {self.embedding_size}")
        if self.type_vocab_size < 0:
            problems.append(f"type_vocab_size must be >= 0, got {self.type_vocab_size}")
        if not self.legacy and self.embedding_width != self.hidden_size:
            problems.append("legacy=False (transformers' lm_predictions head) needs embedding_size == "
                            f"hidden_size, got {self.embedding_width} and {self.hidden_size}")
        if self.relative_attention and self.position_buckets > 0 and self.max_relative < 2:
            problems.append("log-bucketed relative positions need max_relative_positions >= 2")
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    @property
    def embedding_width(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def max_relative(self) -> int:
        """The largest relative distance told apart (transformers' max_relative_positions
        after replacing a value < 1 by max_position_embeddings)."""
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def position_span(self) -> int:
        """Half the rows of the relative-position table (transformers' pos_ebd_size)."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative

    @property
    def rel_layer_norm(self) -> bool:
        return "layer_norm" in self.norm_rel_ebd.split("|")

    @property
    def scale_factor(self) -> int:
        """Scores are divided by sqrt(head_dim * scale_factor). transformers counts the
        pos_att_type terms even when relative_attention is off."""
        return 1 + len(self.pos_att_type)


def log_bucket_positions(relative: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
    """Relative positions mapped to log-spaced buckets: distances below bucket_size // 2
    stay as they are, larger ones are compressed logarithmically so that max_position - 1
    maps to bucket_size // 2 + (bucket_size // 2 - 1) (sign kept). float32 arithmetic, as
    transformers' make_log_bucket_position computes it (the rounding up decides buckets)."""
    relative = np.asarray(relative, np.int64)
    sign = np.sign(relative)
    mid = bucket_size // 2
    near = (relative < mid) & (relative > -mid)
    abs_pos = np.where(near, mid - 1, np.abs(relative))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = abs_pos.astype(np.float32) / np.float32(mid)
        denom = np.log(np.float32((max_position - 1) / mid))
        log_pos = np.ceil(np.log(ratio) / denom * np.float32(mid - 1)) + np.float32(mid)
    return np.where(abs_pos <= mid, relative.astype(np.float32), log_pos * sign).astype(np.int64)


def relative_positions(query_len: int, key_len: int, config: DebertaV2Config) -> np.ndarray:
    """[query_len, key_len] relative position (query minus key), bucketed when the
    config says so (transformers' build_relative_position)."""
    rel = np.arange(query_len)[:, None] - np.arange(key_len)[None, :]
    if config.position_buckets > 0:
        rel = log_bucket_positions(rel, config.position_buckets, config.max_relative)
    return rel.astype(np.int64)


class DisentangledSelfAttention(nn.Module):
    """Content-to-content + c2p + p2c attention over the shared relative-position table.

    `attention_impl` as in layers.attend: jax.nn.dot_product_attention (the c2p +
    p2c terms as its bias) where no dropout is applied to the probabilities and none are
    returned, the explicit softmax otherwise. With "cudnn" the key padding goes as lengths
    (right-padded batches): padded query rows then attend to the real keys only, unlike
    transformers (their rows are padding: no real token reads them).
    """

    config: DebertaV2Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x, attention_mask, rel_embeddings, deterministic: bool, output_attentions: bool):
        cfg = self.config
        query_proj, key_proj = head_projection(self, "query"), head_projection(self, "key")
        query, key, value = query_proj(x), key_proj(x), head_projection(self, "value")(x)
        record_qkv(self, query, key, value)
        scale = math.sqrt(cfg.head_dim * cfg.scale_factor)

        bias = None  # the c2p + p2c scores, [B, H, S, S]
        if cfg.relative_attention and cfg.pos_att_type:
            rel = Dropout(cfg.hidden_dropout, shared=True)(rel_embeddings, deterministic=deterministic)
            seq = x.shape[1]
            span = cfg.position_span
            positions = relative_positions(seq, seq, cfg)
            rows = np.arange(seq)[:, None]
            if "c2p" in cfg.pos_att_type:
                pos_key = (key_proj if cfg.share_att_key else head_projection(self, "pos_key"))(rel)  # [2span, H, d]
                scores = jnp.einsum("bqhd,rhd->bhqr", query, pos_key)
                index = np.clip(positions + span, 0, 2 * span - 1)  # [q, k] -> row of the table
                c2p = scores[:, :, rows, index]  # [B, H, q, k]
                bias = c2p / jnp.asarray(scale, c2p.dtype)
            if "p2c" in cfg.pos_att_type:
                pos_query = (query_proj if cfg.share_att_key else head_projection(self, "pos_query"))(rel)
                scores = jnp.einsum("bkhd,rhd->bhkr", key, pos_query)
                index = np.clip(-positions + span, 0, 2 * span - 1)  # [k, q] -> row of the table
                p2c = jnp.swapaxes(scores[:, :, rows, index], -1, -2)  # [B, H, q, k]
                p2c = p2c / jnp.asarray(scale, p2c.dtype)
                bias = p2c if bias is None else bias + p2c

        real = attention_mask.astype(bool)
        keep = real[:, None, :, None] & real[:, None, None, :]  # [B, 1, q, k]
        context, probs = attend(self, query, key, value, keep, deterministic, output_attentions,
                                lengths=key_lengths(attention_mask), bias=bias, divisor=scale)
        return output_projection(self, context), probs


class DebertaLayer(nn.Module):
    """Post-LN layer: x = LN(x + Dropout(Attn(x))); x = LN(x + Dropout(FFN(x)))."""

    config: DebertaV2Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x, attention_mask, rel_embeddings, deterministic: bool, output_attentions: bool):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn, probs = DisentangledSelfAttention(cfg, name="attention", attention_impl=self.attention_impl, **kw)(
            x, attention_mask, rel_embeddings, deterministic, output_attentions)
        attn = Dropout(cfg.hidden_dropout)(attn, deterministic=deterministic)
        return add_and_feed_forward(self, x, attn, deterministic), probs


class DebertaEncoder(nn.Module):
    """The shared relative-position table (`rel_embeddings`, `rel_norm`) and the layers
    layer_0 ... layer_{N-1}; `remat` as in layers.Encoder."""

    config: DebertaV2Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: Optional[str] = None
    remat: str = "none"

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool, output_attentions: bool):
        cfg = self.config
        rel = None
        if cfg.relative_attention:
            rel = self.param("rel_embeddings", kernel_init(cfg, (None, "embed")),
                             (2 * cfg.position_span, cfg.hidden_size), self.param_dtype)
            rel = jnp.asarray(rel, self.dtype)
            if cfg.rel_layer_norm:
                rel = layer_norm(cfg.layer_norm_eps, "rel_norm", dtype=self.dtype,
                                 param_dtype=self.param_dtype)(rel)
        return stack_layers(self, DebertaLayer, lambda cls, i: cls(
            cfg, dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
            name=f"layer_{i}"), x, (attention_mask, rel), deterministic, output_attentions)


class DebertaMLMHead(MLMHead):
    """MLMHead whose dense layer maps hidden_size to embedding_size (the word embeddings'
    width: transformers' legacy head; the same as MLMHead when they are equal)."""

    config: DebertaV2Config

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.transform = nn.Dense(cfg.embedding_width, kernel_init=kernel_init(cfg, ("embed_in", "embed")),
                                  bias_init=zeros_init(("embed",)), **kw)
        self.layer_norm = layer_norm(cfg.layer_norm_eps, **kw)
        self.bias = self.param("bias", zeros_init(("vocab",)), (cfg.vocab_size,), self.param_dtype)


class DebertaV2(MaskedLM):
    """DeBERTa-v2/v3 masked LM (transformers' DebertaV2ForMaskedLM); token types default to 0."""

    config: DebertaV2Config

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = cfg.embedding_width
        self.word_embeddings = Embed(cfg.vocab_size, width, cfg, ("vocab", "embed"), **kw)
        if cfg.position_biased_input:
            self.position_embeddings = Embed(cfg.max_position_embeddings, width, cfg, (None, "embed"), **kw)
        if cfg.type_vocab_size > 0:
            self.token_type_embeddings = Embed(cfg.type_vocab_size, width, cfg, (None, "embed"), **kw)
        if width != cfg.hidden_size:
            self.embed_proj = nn.Dense(cfg.hidden_size, use_bias=False,
                                       kernel_init=kernel_init(cfg, ("embed_in", "embed")), **kw)
        self.embeddings_norm = layer_norm(cfg.layer_norm_eps, **kw)
        self.embeddings_dropout = Dropout(cfg.hidden_dropout)
        self.encoder = DebertaEncoder(cfg, attention_impl=self.attention_impl, remat=self.remat, **kw)
        if cfg.mlm_head:
            self.mlm_head = DebertaMLMHead(cfg, **kw)

    def embed(self, input_ids, token_type_ids):
        cfg = self.config
        x = self.word_embeddings(input_ids)
        if cfg.position_biased_input:
            x = x + self.position_embeddings(self.position_ids(input_ids))
        if cfg.type_vocab_size > 0:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        if cfg.embedding_width != cfg.hidden_size:
            x = self.embed_proj(x)
        return x

    zero_padded_embeddings = True  # as transformers' DebertaV2Embeddings

    @property
    def has_mlm_head(self) -> bool:
        return self.config.mlm_head

    def _require_head(self):
        if not self.config.mlm_head:
            raise ValueError(
                "this DeBERTa has no MLM head (an encoder-only checkpoint, as the released "
                "DeBERTa-v3 discriminators are): it gives hidden states (compute_logits=False), "
                "not logits")

    def mlm_logits(self, hidden):
        self._require_head()
        return self.mlm_head(hidden, self.word_embeddings)

    def head_inputs(self, hidden):
        """(features [.., E], word embeddings [V, E], bias [V]): logits = features @ embeddings.T + bias."""
        self._require_head()
        return self.mlm_head.features(hidden), self.word_embeddings.embedding, self.mlm_head.bias
