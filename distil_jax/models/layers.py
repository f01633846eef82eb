"""Building blocks shared by the teacher (BERT/RoBERTa) and the student (DistilBERT).

Both Hugging Face architectures use the same post-LayerNorm encoder layer; only the
names of their tensors differ. Here they share one module tree with one set of names,
so that student initialisation is a copy by name and the Hugging Face mapping tables
(`distil_jax/interop/hf.py`) differ only on the Hugging Face side.

Every kernel and embedding carries logical axis names (`vocab`, `embed`, `heads`, `kv`,
`mlp`); the mapping from logical to mesh axes is a table in the training config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from distil_jax import parallel

Dtype = Any

# HF's ACT2FN names -> functions. "gelu" is the exact erf GELU (HF `GELUActivation`).
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,  # x * sigmoid(x) (some ModernBERT checkpoints)
    "swish": jax.nn.silu,
}

# What a layer records when applied with mutable=[INTERMEDIATES] (flax `sow`): per layer,
# the attention's queries q, keys k, values v and context [B, S, H, d] and the feed-forward
# activation [B, S, F], for the layer-pair losses and pruning. Otherwise the records are
# no-ops: a step that reads none compiles to the program it would be without them.
INTERMEDIATES = "intermediates"

# train.remat -> what the backward pass may keep of each encoder layer's activations.
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Fields every encoder has, named as in Hugging Face's BertConfig."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    initializer_range: float = 0.02

    def __post_init__(self):
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_act not in ACTIVATIONS:
            problems.append(
                f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    @property
    def head_act(self) -> str:
        """The MLM head's activation (between its dense layer and its LayerNorm)."""
        return self.hidden_act

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@flax.struct.dataclass
class MaskedLMOutput:
    """What both models return: like HF's output with `output_hidden_states=True`.

    logits: [B, S, V] (or None when the head was not asked for).
    hidden_states: embeddings output followed by every layer's output, each [B, S, D].
    attentions: per layer [B, H, S, S] probabilities when asked for, else None.
    """

    logits: Optional[jax.Array]
    hidden_states: Tuple[jax.Array, ...]
    attentions: Optional[Tuple[jax.Array, ...]] = None
    pooled_output: Optional[jax.Array] = None

    @property
    def last_hidden_state(self) -> jax.Array:
        return self.hidden_states[-1]


def kernel_init(config: EncoderConfig, names):
    return nn.with_logical_partitioning(
        nn.initializers.normal(stddev=config.initializer_range), names)


def zeros_init(names):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def ones_init(names):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def layer_norm(eps: float, name: Optional[str] = None, *, dtype: Dtype,
               param_dtype: Dtype) -> nn.LayerNorm:
    """LayerNorm (statistics in float32) with logically named scale and bias."""
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=ones_init(("embed",)), bias_init=zeros_init(("embed",)),
        use_fast_variance=False)


class Dropout(nn.Module):
    """Dropout whose mask is drawn row by row, each row's from its global index in the
    micro-batch (parallel.row_offset), so that the masks are the same however the rows are
    spread over devices (the update's per-device loop, parallel.per_device). `shared`: x
    is a table the whole batch shares (DeBERTa's relative positions), not rows of the
    batch: one mask from the key, the same on every device group."""

    rate: float
    shared: bool = False

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        key = self.make_rng("dropout")
        if self.shared:
            keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
        else:
            rows = parallel.row_offset(x.shape[0]) + jnp.arange(x.shape[0], dtype=jnp.int32)
            keep = jax.vmap(lambda r: jax.random.bernoulli(jax.random.fold_in(key, r), 1.0 - self.rate,
                                                           x.shape[1:]))(rows)
        return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))


def head_projection(module: nn.Module, name: str, use_bias: bool = True) -> nn.DenseGeneral:
    """A projection onto the heads [.., D] -> [.., H, d], a submodule `name` of the compact
    `module` (its config, dtype and param_dtype): every family's query / key / value."""
    cfg = module.config
    return nn.DenseGeneral(
        features=(cfg.num_heads, cfg.head_dim), use_bias=use_bias, dtype=module.dtype,
        param_dtype=module.param_dtype, name=name, kernel_init=kernel_init(cfg, ("embed", "heads", "kv")),
        bias_init=zeros_init(("heads", "kv")))


def record_qkv(module: nn.Module, query, key, value) -> None:
    for name, v in (("q", query), ("k", key), ("v", value)):
        module.sow(INTERMEDIATES, name, v)


def attend(module: nn.Module, query, key, value, keep, deterministic: bool, output_attentions: bool, *,
           lengths=None, bias=None, divisor: Optional[float] = None):
    """(context [B, S, H, d], probabilities or None): softmax(q k^T / divisor + bias) v over
    the keys `keep` allows ([B, 1, 1|S, S]), inside the compact `module` (its
    attention_impl, config.attention_dropout).

    Where no dropout is applied to the probabilities and none are returned, the fused
    `jax.nn.dot_product_attention` (`module.attention_impl`: None = XLA, "cudnn" = cuDNN
    flash attention on GPU); cuDNN takes the key padding as `lengths` (right-padded
    batches; a row of padding alone gets length 1: no target reads it), and where a caller
    gives none (a mask cuDNN cannot take, such as a sliding window) XLA's fused attention
    runs. Otherwise the explicit float32 softmax, whose probabilities dropout sees."""
    cfg = module.config
    divisor = math.sqrt(cfg.head_dim) if divisor is None else divisor
    scale = 1.0 / divisor
    if (deterministic or cfg.attention_dropout == 0.0) and not output_attentions:
        if module.attention_impl == "cudnn" and lengths is not None:
            context = jax.nn.dot_product_attention(
                query, key, value, bias=bias, scale=scale, key_value_seq_lengths=lengths, implementation="cudnn")
        else:
            impl = None if module.attention_impl == "cudnn" else module.attention_impl
            context = jax.nn.dot_product_attention(query, key, value, bias=bias, mask=keep, scale=scale,
                                                   implementation=impl)
        return context, None
    scores = jnp.einsum("bqhd,bkhd->bhqk", query / jnp.asarray(divisor, query.dtype), key)
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(keep, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    dropped = Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
    return jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(module.dtype), value), probs


def key_lengths(attention_mask):
    """Real keys per row for cuDNN's flash attention (at least 1)."""
    return jnp.maximum(attention_mask.astype(jnp.int32).sum(-1), 1)


def output_projection(module: nn.Module, context, use_bias: bool = True):
    """The attention's output [B, S, D] from the heads' context (recorded as "context"),
    as the submodule out of the compact `module`."""
    cfg = module.config
    module.sow(INTERMEDIATES, "context", context)  # [B, S, H, d], before the output projection
    return nn.DenseGeneral(
        features=cfg.hidden_size, axis=(-2, -1), use_bias=use_bias, dtype=module.dtype,
        param_dtype=module.param_dtype, name="out", kernel_init=kernel_init(cfg, ("heads", "kv", "embed")),
        bias_init=zeros_init(("embed",)))(context)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention over a key padding mask (`attend`)."""

    config: EncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool, output_attentions: bool):
        query, key, value = (head_projection(self, name)(x) for name in ("query", "key", "value"))
        record_qkv(self, query, key, value)
        keep = attention_mask[:, None, None, :].astype(bool)
        context, probs = attend(self, query, key, value, keep, deterministic, output_attentions,
                                lengths=key_lengths(attention_mask))
        return output_projection(self, context), probs


class EncoderLayer(nn.Module):
    """Post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x)).

    `dropout_after_attention`: BERT drops the attention output before the residual
    add; DistilBERT does not (HF `TransformerBlock`).
    """

    config: EncoderConfig
    dropout_after_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool, output_attentions: bool):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn, probs = SelfAttention(cfg, name="attention", attention_impl=self.attention_impl, **kw)(
            x, attention_mask, deterministic, output_attentions)
        if self.dropout_after_attention:
            attn = Dropout(cfg.hidden_dropout)(attn, deterministic=deterministic)
        return add_and_feed_forward(self, x, attn, deterministic), probs


def add_and_feed_forward(layer: nn.Module, x, attn, deterministic: bool):
    """The rest of a post-LN layer once its attention output `attn` is there:
    x = LN(x + attn); x = LN(x + FFN(x)). Called inside `layer`'s compact __call__ (its
    submodules attention_norm, wi, wo, output_norm; the feed-forward activation recorded
    as "ffn"): BERT's, DistilBERT's and DeBERTa's layers share it."""
    cfg = layer.config
    kw = dict(dtype=layer.dtype, param_dtype=layer.param_dtype)
    x = layer_norm(cfg.layer_norm_eps, "attention_norm", **kw)(x + attn)
    h = nn.Dense(cfg.intermediate_size, name="wi", kernel_init=kernel_init(cfg, ("embed", "mlp")),
                 bias_init=zeros_init(("mlp",)), **kw)(x)
    h = ACTIVATIONS[cfg.hidden_act](h)
    layer.sow(INTERMEDIATES, "ffn", h)
    h = nn.Dense(cfg.hidden_size, name="wo", kernel_init=kernel_init(cfg, ("mlp", "embed")),
                 bias_init=zeros_init(("embed",)), **kw)(h)
    h = Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
    return layer_norm(cfg.layer_norm_eps, "output_norm", **kw)(x + h)


class Encoder(nn.Module):
    """A stack of `num_layers` EncoderLayers named layer_0 ... layer_{N-1}.

    `remat`: "none" keeps every activation for the backward pass; "full" recomputes each
    layer in the backward pass; "dots" saves only matmul outputs (no batch dims) and
    recomputes the rest (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`).
    """

    config: EncoderConfig
    dropout_after_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    remat: str = "none"

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool, output_attentions: bool):
        return stack_layers(self, EncoderLayer, lambda cls, i: cls(
            self.config, self.dropout_after_attention, dtype=self.dtype, param_dtype=self.param_dtype,
            attention_impl=self.attention_impl, name=f"layer_{i}"), x, (attention_mask,), deterministic,
            output_attentions)


def stack_layers(encoder: nn.Module, layer_cls, make, x, args: tuple, deterministic: bool, output_attentions: bool):
    """(hidden states: x then every layer's output, attention probabilities per layer or
    None) of `encoder.config.num_layers` layers made by `make(cls, i)` (named layer_i) and
    called as layer(x, *args, deterministic, output_attentions); `encoder.remat` as in
    Encoder (the two flags static)."""
    if encoder.remat != "none":
        flags = 1 + len(args)
        layer_cls = nn.remat(layer_cls, static_argnums=(flags + 1, flags + 2), policy=REMAT_POLICIES[encoder.remat])
    hidden_states, attentions = [x], []
    for i in range(encoder.config.num_layers):
        x, probs = make(layer_cls, i)(x, *args, deterministic, output_attentions)
        hidden_states.append(x)
        attentions.append(probs)
    return tuple(hidden_states), (tuple(attentions) if output_attentions else None)


class Embed(nn.Module):
    """A lookup table with logical names; `attend` gives the tied output projection."""

    num_embeddings: int
    features: int
    config: EncoderConfig
    axes: Tuple[Optional[str], str]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", kernel_init(self.config, self.axes),
            (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, ids):
        return jnp.take(jnp.asarray(self.embedding, self.dtype), ids, axis=0)

    def attend(self, x):
        return jnp.einsum("...d,vd->...v", x, jnp.asarray(self.embedding, self.dtype))


class MLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> decoder tied to the word embeddings + bias.

    The same math as HF BertLMPredictionHead and DistilBERT's vocab_transform /
    vocab_layer_norm / vocab_projector. `features` stops before the vocabulary
    projection, which the chunked losses (`losses.vocab_terms`) do themselves.
    """

    config: EncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.transform = nn.Dense(cfg.hidden_size, kernel_init=kernel_init(cfg, ("embed_in", "embed")),
                                  bias_init=zeros_init(("embed",)), **kw)
        self.layer_norm = layer_norm(cfg.layer_norm_eps, **kw)
        self.bias = self.param("bias", zeros_init(("vocab",)), (cfg.vocab_size,), self.param_dtype)

    def features(self, hidden):
        return self.layer_norm(ACTIVATIONS[self.config.head_act](self.transform(hidden)))

    def __call__(self, hidden, word_embeddings: Embed):
        return word_embeddings.attend(self.features(hidden)) + jnp.asarray(self.bias, self.dtype)


class MaskedLM(nn.Module):
    """Embeddings -> Encoder -> MLMHead; every family specialises `setup` and `embed`, and
    where it needs to, `zero_padded_embeddings` (DeBERTa), `last_hidden` (ModernBERT's
    final norm) and `has_mlm_head` (a DeBERTa encoder without one).

    `apply({'params': p}, input_ids, attention_mask, deterministic=...)` returns a
    MaskedLMOutput. `compute_logits=False` skips the vocabulary projection: training
    projects only the rows a loss needs, in blocks, from `method=MaskedLM.head_inputs`.
    """

    config: EncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None  # see SelfAttention
    remat: str = "none"  # see Encoder

    dropout_after_attention = True  # class constants, not dataclass fields
    zero_padded_embeddings = False  # padded positions enter the encoder as zeros

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.word_embeddings = Embed(cfg.vocab_size, cfg.hidden_size, cfg, ("vocab", "embed"), **kw)
        self.position_embeddings = Embed(
            cfg.max_position_embeddings, cfg.hidden_size, cfg, (None, "embed"), **kw)
        self.embeddings_norm = layer_norm(cfg.layer_norm_eps, **kw)
        self.embeddings_dropout = Dropout(cfg.hidden_dropout)
        self.encoder = Encoder(cfg, self.dropout_after_attention, attention_impl=self.attention_impl,
                               remat=self.remat, **kw)
        self.mlm_head = MLMHead(cfg, **kw)

    def position_ids(self, input_ids):
        return jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)

    def embed(self, input_ids, token_type_ids):
        return self.word_embeddings(input_ids) + self.extra_embeddings(input_ids, token_type_ids)

    def extra_embeddings(self, input_ids, token_type_ids):
        """Everything added to the word embeddings (positions; BERT adds token types)."""
        return self.position_embeddings(self.position_ids(input_ids))

    def pool(self, hidden):
        return None

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
                 deterministic: bool = True, output_attentions: bool = False,
                 compute_logits: bool = True) -> MaskedLMOutput:
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        x = self.embeddings_norm(self.embed(input_ids, token_type_ids))
        if self.zero_padded_embeddings:
            x = x * attention_mask[..., None].astype(x.dtype)
        x = self.embeddings_dropout(x, deterministic=deterministic)
        hidden_states, attentions = self.encoder(
            x, attention_mask, deterministic, output_attentions)
        hidden_states = hidden_states[:-1] + (self.last_hidden(hidden_states[-1]),)
        # Without an MLM head there are no logits to give (None), as with compute_logits=False.
        logits = self.mlm_logits(hidden_states[-1]) if compute_logits and self.has_mlm_head else None
        return MaskedLMOutput(logits=logits, hidden_states=hidden_states,
                              attentions=attentions, pooled_output=self.pool(hidden_states[-1]))

    @property
    def has_mlm_head(self) -> bool:
        return True

    def last_hidden(self, hidden):
        """The last layer's output as the model gives it (and its head reads it)."""
        return hidden

    def mlm_logits(self, hidden):
        return self.mlm_head(hidden, self.word_embeddings)

    def head_inputs(self, hidden):
        """(features, word embeddings [V, D], bias [V]): logits = features @ embeddings.T + bias."""
        return self.mlm_head.features(hidden), self.word_embeddings.embedding, self.mlm_head.bias


def init_params(model: MaskedLM, rng: jax.Array, seq_len: int = 8):
    """Fresh params of `model` as plain arrays (logical-axis boxes removed)."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return nn.meta.unbox(model.init(rng, ids)["params"])


def logical_axes(model: nn.Module, seq_len: int = 8):
    """The params' logical PartitionSpecs (e.g. P('vocab', 'embed')), without allocating them,
    of a masked LM or a task head on one (whose head's params have none: replicated)."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, jnp.ones_like(ids)))
    return nn.get_partition_spec(boxed)["params"]


def apply_recording(model: MaskedLM, params, *args, **kwargs):
    """`model.apply` that also returns what each encoder layer recorded: (output, records),
    records[i] = {q, k, v, context, ffn} of layer i (0-based; see INTERMEDIATES)."""
    out, state = model.apply({"params": params}, *args, mutable=[INTERMEDIATES], **kwargs)
    encoder = state[INTERMEDIATES]["encoder"]
    records = []
    for i in range(model.config.num_layers):
        layer = encoder[f"layer_{i}"]
        records.append({**{k: v[0] for k, v in layer["attention"].items()}, "ffn": layer["ffn"][0]})
    return out, tuple(records)
