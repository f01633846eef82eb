"""ModernBERT masked LM, like transformers' ModernBertForMaskedLM (ModernBertModel + head).

What differs from the BERT-style MaskedLM (models/layers.py):

* Embeddings: word embeddings only (no position table, no token types), then a LayerNorm
  and `embedding_dropout`.
* Rotary positions (RoPE, the two halves of each head rotated, "rotate_half") on queries
  and keys, with base `global_rope_theta` in global layers and `local_rope_theta` in
  sliding-window layers; positions are 0..S-1 in every row (right padding).
* Pre-norm layers: x = x + Attn(attention_norm(x)); x = x + MLP(mlp_norm(x)). Layer 0
  has no attention norm (transformers' nn.Identity); a final LayerNorm (`final_norm`)
  follows the last layer. Every LayerNorm has a bias only when `norm_bias`.
* Attention alternates: layer i is global iff i % global_attn_every_n_layers == 0 (or as
  `layer_types` says), otherwise a query attends only to keys with |i - j| <=
  local_attention // 2. Both also mask padded keys. The dropout `attention_dropout` is
  applied to the probabilities and to the attention's output projection, as transformers
  does. Projections have biases only when `attention_bias`.
* GeGLU MLP: transformers' Wi [D -> 2F] is our `wi` (its first half, the input) and
  `gate` (its second half); out = wo(dropout(act(wi(x)) * gate(x))); biases only when
  `mlp_bias`; the dropout is `hidden_dropout` (transformers' mlp_dropout).
* MLM head: dense (bias when `classifier_bias`) -> `classifier_activation` -> LayerNorm
  -> decoder tied to the word embeddings (a separate `mlm_head/decoder` when not
  `tie_word_embeddings`) + a bias when `decoder_bias` (otherwise head_inputs gives zeros).
* hidden_states: the embeddings' output, then each layer's output, the last one after
  `final_norm` (transformers replaces its last hidden state by the normed one too); the
  head reads that last one.

Padded query rows are computed as transformers' eager attention computes them: they
attend to the real keys (in their window); a padded row whose window holds no real key
attends uniformly to every position (as masked softmax with a large negative number
does). Real tokens never see padding.

The layer keeps layers.EncoderLayer's names where they mean the same (attention/{query,
key,value,out}, wi, wo under encoder/layer_{i}) and records the same intermediates: q and
k after the rotation (what the scores are made of), v, context, and ffn = act(wi) * gate
(the input of wo), so that apply_recording and the name-based tools work on it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from distil_jax.models.layers import (ACTIVATIONS, INTERMEDIATES, Dropout, Embed, EncoderConfig, MaskedLM,
                                      attend, head_projection, kernel_init, key_lengths, ones_init,
                                      output_projection, record_qkv, stack_layers, zeros_init)

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class ModernBertConfig(EncoderConfig):
    """HF ModernBertConfig's fields that change the computation, in EncoderConfig's names
    where one exists (num_hidden_layers -> num_layers, num_attention_heads -> num_heads,
    norm_eps -> layer_norm_eps, hidden_activation -> hidden_act, mlp_dropout ->
    hidden_dropout). Defaults are answerdotai/ModernBERT-base's.

    layer_types: None means layer i is "full_attention" iff i % global_attn_every_n_layers
      == 0, else "sliding_attention" (transformers' default); a tuple gives each layer's.
    local_attention: the whole window of a sliding layer; a query sees keys at distance
      <= local_attention // 2.
    global_rope_theta / local_rope_theta: RoPE bases of full / sliding layers.
    max_position_embeddings: no table depends on it (positions are rotary).
    """

    vocab_size: int = 50368
    hidden_size: int = 768
    num_layers: int = 22
    num_heads: int = 12
    intermediate_size: int = 1152
    max_position_embeddings: int = 8192
    layer_norm_eps: float = 1e-5
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    hidden_act: str = "gelu"
    pad_token_id: int = 50283
    initializer_range: float = 0.02
    embedding_dropout: float = 0.0
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    classifier_bias: bool = False
    classifier_activation: str = "gelu"
    decoder_bias: bool = True
    tie_word_embeddings: bool = True
    global_attn_every_n_layers: int = 3
    layer_types: Optional[Tuple[str, ...]] = None
    local_attention: int = 128
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0

    def __post_init__(self):
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        super().__post_init__()  # the fields every encoder has
        problems = []
        if self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even (rotary positions)")
        if self.classifier_activation not in ACTIVATIONS:
            problems.append(f"classifier_activation {self.classifier_activation!r} is not one of "
                            f"{sorted(ACTIVATIONS)}")
        for name in ("global_attn_every_n_layers", "local_attention"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("global_rope_theta", "local_rope_theta"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                problems.append(f"layer_types has {len(self.layer_types)} entries for "
                                f"{self.num_layers} layers")
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                problems.append(f"layer_types {unknown} are not among {LAYER_TYPES}")
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    @property
    def head_act(self) -> str:
        return self.classifier_activation

    @property
    def sliding_window(self) -> int:
        """The largest |query - key| distance a sliding layer attends over."""
        return self.local_attention // 2

    def is_global(self, layer: int) -> bool:
        if self.layer_types is not None:
            return self.layer_types[layer] == "full_attention"
        return layer % self.global_attn_every_n_layers == 0

    @property
    def attention_types(self) -> Tuple[str, ...]:
        return tuple(LAYER_TYPES[0] if self.is_global(i) else LAYER_TYPES[1]
                     for i in range(self.num_layers))


def norm(config: ModernBertConfig, name: Optional[str] = None, *, dtype, param_dtype) -> nn.LayerNorm:
    """LayerNorm (statistics in float32) with a bias only when config.norm_bias."""
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps, use_bias=config.norm_bias, dtype=dtype,
        param_dtype=param_dtype, name=name, scale_init=ones_init(("embed",)),
        bias_init=zeros_init(("embed",)), use_fast_variance=False)


def rotary_tables(theta: float, head_dim: int, seq_len: int):
    """(cos, sin) [S, head_dim] in float32: angle(p, j) = p * theta^(-2j / head_dim) for
    j < head_dim / 2, the same angles repeated over the second half."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
    angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x, cos, sin):
    """x [B, S, H, d] rotated by position (in float32): x * cos + rotate_half(x) * sin, where
    rotate_half(x) = concat(-x[..., d/2:], x[..., :d/2])."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)


def window_mask(seq_len: int, half_window: int):
    """[S, S] boolean: True where |query - key| <= half_window."""
    pos = np.arange(seq_len)
    return jnp.asarray(np.abs(pos[:, None] - pos[None, :]) <= half_window)


class ModernBertAttention(nn.Module):
    """Multi-head self-attention with rotary positions, global or in a sliding window.

    `attention_impl` as in layers.attend. With "cudnn", global layers run cuDNN's
    flash attention over key lengths; sliding layers run XLA's fused attention with the
    boolean window mask (jax's cuDNN path takes a sliding window only with a causal mask).
    """

    config: ModernBertConfig
    is_global: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool, output_attentions: bool):
        cfg = self.config
        query, key, value = (head_projection(self, name, cfg.attention_bias)(x) for name in ("query", "key", "value"))
        theta = cfg.global_rope_theta if self.is_global else cfg.local_rope_theta
        cos, sin = rotary_tables(theta, cfg.head_dim, x.shape[1])
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        record_qkv(self, query, key, value)
        keep = attention_mask[:, None, None, :].astype(bool)  # [B, 1, 1, S]: real keys
        if not self.is_global:
            keep = keep & window_mask(x.shape[1], cfg.sliding_window)[None, None]  # [B, 1, S, S]
        # cuDNN (key lengths, right padding) in global layers only: jax's cuDNN path takes a
        # sliding window with a causal mask alone, so sliding layers run XLA's fused attention.
        context, probs = attend(self, query, key, value, keep, deterministic, output_attentions,
                                lengths=key_lengths(attention_mask) if self.is_global else None)
        out = output_projection(self, context, cfg.attention_bias)
        out = Dropout(cfg.attention_dropout)(out, deterministic=deterministic)
        return out, probs


class ModernBertLayer(nn.Module):
    """Pre-norm layer: x + Attn(attention_norm(x)) (no norm in layer 0), then
    x + MLP(mlp_norm(x)) with the GeGLU MLP."""

    config: ModernBertConfig
    index: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool, output_attentions: bool):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = x if self.index == 0 else norm(cfg, "attention_norm", **kw)(x)
        attn, probs = ModernBertAttention(cfg, cfg.is_global(self.index), name="attention",
                                          attention_impl=self.attention_impl, **kw)(
            h, attention_mask, deterministic, output_attentions)
        x = x + attn
        h = norm(cfg, "mlp_norm", **kw)(x)
        dense = lambda features, name, axes: nn.Dense(  # noqa: E731
            features, use_bias=cfg.mlp_bias, name=name, kernel_init=kernel_init(cfg, axes),
            bias_init=zeros_init(axes[1:]), **kw)
        inputs = dense(cfg.intermediate_size, "wi", ("embed", "mlp"))(h)
        gate = dense(cfg.intermediate_size, "gate", ("embed", "mlp"))(h)
        h = ACTIVATIONS[cfg.hidden_act](inputs) * gate
        self.sow(INTERMEDIATES, "ffn", h)
        h = Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
        h = dense(cfg.hidden_size, "wo", ("mlp", "embed"))(h)
        return x + h, probs


class ModernBertEncoder(nn.Module):
    """layer_0 ... layer_{N-1}; `remat` as layers.Encoder's."""

    config: ModernBertConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: Optional[str] = None
    remat: str = "none"

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool, output_attentions: bool):
        return stack_layers(self, ModernBertLayer, lambda cls, i: cls(
            self.config, i, dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
            name=f"layer_{i}"), x, (attention_mask,), deterministic, output_attentions)


class ModernBertHead(nn.Module):
    """dense -> classifier_activation -> LayerNorm, then the decoder (the word embeddings
    when tied, else its own [V, D] matrix) + bias (zeros when not decoder_bias)."""

    config: ModernBertConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.transform = nn.Dense(cfg.hidden_size, use_bias=cfg.classifier_bias,
                                  kernel_init=kernel_init(cfg, ("embed_in", "embed")),
                                  bias_init=zeros_init(("embed",)), **kw)
        self.layer_norm = norm(cfg, **kw)
        if cfg.decoder_bias:
            self.bias = self.param("bias", zeros_init(("vocab",)), (cfg.vocab_size,), self.param_dtype)
        if not cfg.tie_word_embeddings:
            self.decoder = self.param("decoder", kernel_init(cfg, ("vocab", "embed")),
                                      (cfg.vocab_size, cfg.hidden_size), self.param_dtype)

    def features(self, hidden):
        return self.layer_norm(ACTIVATIONS[self.config.head_act](self.transform(hidden)))

    def projection(self, word_embeddings: Embed):
        """(matrix [V, D], bias [V]) of the decoder."""
        cfg = self.config
        matrix = word_embeddings.embedding if cfg.tie_word_embeddings else self.decoder
        bias = self.bias if cfg.decoder_bias else jnp.zeros((cfg.vocab_size,), self.param_dtype)
        return matrix, bias

    def __call__(self, hidden, word_embeddings: Embed):
        matrix, bias = self.projection(word_embeddings)
        feats = self.features(hidden)
        return (jnp.einsum("...d,vd->...v", feats, jnp.asarray(matrix, self.dtype))
                + jnp.asarray(bias, self.dtype))


class ModernBert(MaskedLM):
    """ModernBERT masked LM (transformers' ModernBertForMaskedLM). token_type_ids are ignored."""

    config: ModernBertConfig

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.word_embeddings = Embed(cfg.vocab_size, cfg.hidden_size, cfg, ("vocab", "embed"), **kw)
        self.embeddings_norm = norm(cfg, **kw)
        self.embeddings_dropout = Dropout(cfg.embedding_dropout)
        self.encoder = ModernBertEncoder(cfg, attention_impl=self.attention_impl, remat=self.remat, **kw)
        self.final_norm = norm(cfg, **kw)
        self.mlm_head = ModernBertHead(cfg, **kw)

    def embed(self, input_ids, token_type_ids):
        return self.word_embeddings(input_ids)

    def last_hidden(self, hidden):
        return self.final_norm(hidden)

    def head_inputs(self, hidden):
        """(features, decoder matrix [V, D], bias [V]): logits = features @ matrix.T + bias.
        The matrix is the word embeddings when tied; the bias zeros without decoder_bias."""
        return (self.mlm_head.features(hidden), *self.mlm_head.projection(self.word_embeddings))
