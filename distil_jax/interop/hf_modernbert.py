"""Hugging Face ModernBERT (model_type "modernbert") <-> our ModernBert params.

The table and config.json fields of the family; interop/hf.py loads and saves through
them (tables.py's transforms and readers). A PyTorch Linear weight is [out, in], ours
[in, out]; attention projections are split by head on our side. Two of transformers' tensors are fused where ours are not, so a row of
the table maps one HF tensor to one or more of our paths, the HF tensor cut into equal
parts along its output axis (PyTorch axis 0):

* attn.Wqkv [3D, D] (and its bias) -> attention/query, attention/key, attention/value
  (transformers views its output as [3, heads, head_dim]);
* mlp.Wi [2F, D] (and its bias) -> wi (the first half, the input) and gate (the second).

Which tensors exist depends on the config: biases only with attention_bias / mlp_bias /
norm_bias / classifier_bias / decoder_bias, no attn_norm in layer 0, decoder.weight only
when the embeddings are not tied (a tied one may be present and is ignored).

transformers 5 writes layer_types and rope_parameters; older config.json files (those of
the released checkpoints) have global_attn_every_n_layers, global_rope_theta and
local_rope_theta: both are read; both are written.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple


from distil_jax.models.modernbert import LAYER_TYPES, ModernBertConfig

Params = Dict[str, Any]
# (HF name, our '/'-joined paths (the HF tensor is cut into that many parts), transform)
Table = List[Tuple[str, Tuple[str, ...], Optional[str]]]

MODEL_TYPE = "modernbert"
BASE = "model."  # the encoder's prefix in ModernBertForMaskedLM


def param_table(config: ModernBertConfig) -> Table:
    """Every (HF name, our paths, transform) of a ModernBertForMaskedLM with this config."""
    c = config
    rows: Table = []

    def add(hf: str, ours, kind: Optional[str] = None, present: bool = True):
        if present:
            rows.append((hf, (ours,) if isinstance(ours, str) else tuple(ours), kind))

    def norm(hf: str, ours: str):
        add(f"{hf}.weight", f"{ours}/scale")
        add(f"{hf}.bias", f"{ours}/bias", present=c.norm_bias)

    add(f"{BASE}embeddings.tok_embeddings.weight", "word_embeddings/embedding")
    norm(f"{BASE}embeddings.norm", "embeddings_norm")
    for i in range(c.num_layers):
        hf, ours = f"{BASE}layers.{i}.", f"encoder/layer_{i}/"
        if i > 0:
            norm(f"{hf}attn_norm", f"{ours}attention_norm")
        qkv = [f"{ours}attention/{n}" for n in ("query", "key", "value")]
        add(f"{hf}attn.Wqkv.weight", [f"{p}/kernel" for p in qkv], "qkv")
        add(f"{hf}attn.Wqkv.bias", [f"{p}/bias" for p in qkv], "qkv_bias", c.attention_bias)
        add(f"{hf}attn.Wo.weight", f"{ours}attention/out/kernel", "attn_out")
        add(f"{hf}attn.Wo.bias", f"{ours}attention/out/bias", None, c.attention_bias)
        norm(f"{hf}mlp_norm", f"{ours}mlp_norm")
        add(f"{hf}mlp.Wi.weight", [f"{ours}wi/kernel", f"{ours}gate/kernel"], "linear")
        add(f"{hf}mlp.Wi.bias", [f"{ours}wi/bias", f"{ours}gate/bias"], None, c.mlp_bias)
        add(f"{hf}mlp.Wo.weight", f"{ours}wo/kernel", "linear")
        add(f"{hf}mlp.Wo.bias", f"{ours}wo/bias", None, c.mlp_bias)
    norm(f"{BASE}final_norm", "final_norm")
    add("head.dense.weight", "mlm_head/transform/kernel", "linear")
    add("head.dense.bias", "mlm_head/transform/bias", None, c.classifier_bias)
    norm("head.norm", "mlm_head/layer_norm")
    add("decoder.weight", "mlm_head/decoder", None, not c.tie_word_embeddings)
    add("decoder.bias", "mlm_head/bias", None, c.decoder_bias)
    return rows


# --- configs ----------------------------------------------------------------------
def _every_n(layer_types, num_layers: int) -> Optional[int]:
    """The n with layer i full iff i % n == 0 that gives `layer_types`, if one does."""
    for n in range(1, num_layers + 1):
        if all((t == LAYER_TYPES[0]) == (i % n == 0) for i, t in enumerate(layer_types)):
            return n
    return None


def _rope_thetas(hf: Dict[str, Any]) -> Tuple[float, float]:
    """(global, local) RoPE bases from transformers 5's rope_parameters or the older keys."""
    defaults = ModernBertConfig()
    if hf.get("rope_scaling"):
        raise ValueError(f"rope_scaling {hf['rope_scaling']!r} is not supported (plain RoPE only)")
    glob = hf.get("global_rope_theta", defaults.global_rope_theta)
    # transformers 4 used the global base in sliding layers when local_rope_theta was null
    local = hf.get("local_rope_theta", defaults.local_rope_theta)
    local = glob if local is None else local
    params = hf.get("rope_parameters") or {}
    if "rope_theta" in params or "rope_type" in params:  # one set for both layer types
        params = {t: params for t in LAYER_TYPES}
    thetas = {LAYER_TYPES[0]: glob, LAYER_TYPES[1]: local}
    for layer_type, p in params.items():
        if layer_type not in LAYER_TYPES or not p:
            continue
        if p.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type {p['rope_type']!r} ({layer_type}) is not supported; "
                             "only 'default' rotary positions (every ModernBERT release) are")
        if p.get("rope_theta") is not None:
            thetas[layer_type] = p["rope_theta"]
    return float(thetas[LAYER_TYPES[0]]), float(thetas[LAYER_TYPES[1]])


def read_modernbert_config(hf: Dict[str, Any]) -> ModernBertConfig:
    """Our config from a ModernBERT config.json dict (missing keys: transformers' defaults)."""
    if hf.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ValueError(f"model_type {hf.get('model_type')!r} is not {MODEL_TYPE!r}")
    d = ModernBertConfig()
    num_layers = hf.get("num_hidden_layers", d.num_layers)
    every_n = hf.get("global_attn_every_n_layers", d.global_attn_every_n_layers)
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        n = _every_n(layer_types, num_layers) if len(layer_types) == num_layers else None
        every_n, layer_types = (n, None) if n is not None else (every_n, tuple(layer_types))
    global_theta, local_theta = _rope_thetas(hf)
    pad = hf.get("pad_token_id")
    return ModernBertConfig(
        vocab_size=hf.get("vocab_size", d.vocab_size), hidden_size=hf.get("hidden_size", d.hidden_size),
        num_layers=num_layers, num_heads=hf.get("num_attention_heads", d.num_heads),
        intermediate_size=hf.get("intermediate_size", d.intermediate_size),
        max_position_embeddings=hf.get("max_position_embeddings", d.max_position_embeddings),
        layer_norm_eps=hf.get("norm_eps", d.layer_norm_eps),
        hidden_dropout=hf.get("mlp_dropout", d.hidden_dropout),
        attention_dropout=hf.get("attention_dropout", d.attention_dropout),
        hidden_act=hf.get("hidden_activation", d.hidden_act),
        pad_token_id=d.pad_token_id if pad is None else pad,
        initializer_range=hf.get("initializer_range", d.initializer_range),
        embedding_dropout=hf.get("embedding_dropout", d.embedding_dropout),
        norm_bias=hf.get("norm_bias", d.norm_bias), attention_bias=hf.get("attention_bias", d.attention_bias),
        mlp_bias=hf.get("mlp_bias", d.mlp_bias), classifier_bias=hf.get("classifier_bias", d.classifier_bias),
        classifier_activation=hf.get("classifier_activation", d.classifier_activation),
        decoder_bias=hf.get("decoder_bias", d.decoder_bias),
        tie_word_embeddings=hf.get("tie_word_embeddings", d.tie_word_embeddings),
        global_attn_every_n_layers=every_n, layer_types=layer_types,
        local_attention=hf.get("local_attention", d.local_attention),
        global_rope_theta=global_theta, local_rope_theta=local_theta)


def modernbert_config_to_hf(config: ModernBertConfig) -> Dict[str, Any]:
    """A config.json dict that transformers reads back as the same ModernBertForMaskedLM.
    The bos/eos/cls/sep ids are left unset (None): nothing here computes with them, and
    transformers' defaults (50281/50282) lie outside a small vocabulary."""
    c = config
    return dict(
        architectures=["ModernBertForMaskedLM"], model_type=MODEL_TYPE,
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        hidden_activation=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range, norm_eps=c.layer_norm_eps, norm_bias=c.norm_bias,
        pad_token_id=c.pad_token_id, bos_token_id=None, eos_token_id=None, cls_token_id=None,
        sep_token_id=None, attention_bias=c.attention_bias, attention_dropout=c.attention_dropout,
        embedding_dropout=c.embedding_dropout, mlp_bias=c.mlp_bias, mlp_dropout=c.hidden_dropout,
        decoder_bias=c.decoder_bias, classifier_bias=c.classifier_bias,
        classifier_activation=c.classifier_activation, tie_word_embeddings=c.tie_word_embeddings,
        local_attention=c.local_attention, layer_types=list(c.attention_types),
        global_attn_every_n_layers=c.global_attn_every_n_layers,
        global_rope_theta=c.global_rope_theta, local_rope_theta=c.local_rope_theta,
        rope_parameters={LAYER_TYPES[0]: {"rope_type": "default", "rope_theta": c.global_rope_theta},
                         LAYER_TYPES[1]: {"rope_type": "default", "rope_theta": c.local_rope_theta}})


# --- tensors ----------------------------------------------------------------------
def ignorable(name: str, config: ModernBertConfig) -> bool:
    """Tensors that may be present and carry nothing of ours: a tied decoder's copy."""
    return name == "decoder.weight" and config.tie_word_embeddings
