"""Hugging Face <-> Flax: the one door for every family's checkpoints (import of teachers,
export of students), dispatching on config.json's model_type.

Each architecture is a table of (Hugging Face name, our path, transform), so a mapping
reads in one screen: BERT, RoBERTa, XLM-R (RoBERTa's layout) and DistilBERT here,
DeBERTa-v2/v3 in hf_deberta.py, ModernBERT in hf_modernbert.py; what they share (layout
transforms, reading and writing a directory, the tensor check) is tables.py.
Transformers 5 has no Flax classes: the Flax side is ours.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from distil_jax.interop import hf_deberta, hf_modernbert, tables
from distil_jax.interop.tables import (BERT_LAYER, Params, read_config_json, read_state_dict,  # noqa: F401
                                       resolve_model_dir, write_hf_dir)
from distil_jax.models import (BertConfig, DebertaV2Config, DistilBertConfig, EncoderConfig, ModernBertConfig,
                               init_params, module_for)

# --- the tables (BERT, RoBERTa, XLM-R, DistilBERT) -----------------------------------
# Per-layer entries: (HF name under the layer prefix, our path under encoder/layer_{i}, transform)
_DISTILBERT_LAYER = [
    ("attention.q_lin.weight", "attention/query/kernel", "qkv"),
    ("attention.q_lin.bias", "attention/query/bias", "qkv_bias"),
    ("attention.k_lin.weight", "attention/key/kernel", "qkv"),
    ("attention.k_lin.bias", "attention/key/bias", "qkv_bias"),
    ("attention.v_lin.weight", "attention/value/kernel", "qkv"),
    ("attention.v_lin.bias", "attention/value/bias", "qkv_bias"),
    ("attention.out_lin.weight", "attention/out/kernel", "attn_out"),
    ("attention.out_lin.bias", "attention/out/bias", None),
    ("sa_layer_norm.weight", "attention_norm/scale", None),
    ("sa_layer_norm.bias", "attention_norm/bias", None),
    ("ffn.lin1.weight", "wi/kernel", "linear"),
    ("ffn.lin1.bias", "wi/bias", None),
    ("ffn.lin2.weight", "wo/kernel", "linear"),
    ("ffn.lin2.bias", "wo/bias", None),
    ("output_layer_norm.weight", "output_norm/scale", None),
    ("output_layer_norm.bias", "output_norm/bias", None),
]


def _head(dense: str, norm: str, bias: str):
    return [(f"{dense}.weight", "mlm_head/transform/kernel", "linear"),
            (f"{dense}.bias", "mlm_head/transform/bias", None),
            (f"{norm}.weight", "mlm_head/layer_norm/scale", None),
            (f"{norm}.bias", "mlm_head/layer_norm/bias", None),
            (bias, "mlm_head/bias", None)]


# model_type -> (encoder prefix, layer prefix, layer table, head, tensors that may be present
# but carry nothing of ours: tied decoders, NSP head, old position-id buffers).
# XLM-R is RoBERTa's architecture (XLMRobertaForMaskedLM: roberta.*, lm_head.*).
_ROBERTA = ("roberta", "roberta.encoder.layer.{i}.", BERT_LAYER,
            _head("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
            ("lm_head.decoder.weight", "lm_head.decoder.bias", "roberta.embeddings.position_ids"))
_ARCHS = {
    "bert": ("bert", "bert.encoder.layer.{i}.", BERT_LAYER,
             _head("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                   "cls.predictions.bias"),
             ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
              "cls.seq_relationship.weight", "cls.seq_relationship.bias",
              "bert.embeddings.position_ids")),
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "distilbert": ("distilbert", "distilbert.transformer.layer.{i}.", _DISTILBERT_LAYER,
                   _head("vocab_transform", "vocab_layer_norm", "vocab_projector.bias"),
                   ("vocab_projector.weight", "distilbert.embeddings.position_ids")),
}
_POOLER = [("{base}.pooler.dense.weight", "pooler/kernel", "linear"),
           ("{base}.pooler.dense.bias", "pooler/bias", None)]
_HF_CLASSES = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM",
               "xlm-roberta": "XLMRobertaForMaskedLM"}
# Every model_type a checkpoint may have (config.json), and the family's own mapping.
SUPPORTED = ("bert", "roberta", "xlm-roberta", "distilbert", hf_deberta.MODEL_TYPE, hf_modernbert.MODEL_TYPE)


def param_table(config: EncoderConfig) -> List[Tuple[str, Any, Optional[str]]]:
    """Every (HF name, our '/'-joined path (or paths: a fused tensor), transform) of a
    masked LM with this config."""
    if isinstance(config, DebertaV2Config):
        return hf_deberta.param_table(config)
    if isinstance(config, ModernBertConfig):
        return hf_modernbert.param_table(config)
    arch = model_type(config)
    base, prefix, layer, head, _ = _ARCHS[arch]
    token_types = isinstance(config, BertConfig)
    rows = [
        (f"{base}.embeddings.word_embeddings.weight", "word_embeddings/embedding", None),
        (f"{base}.embeddings.position_embeddings.weight", "position_embeddings/embedding", None),
        (f"{base}.embeddings.LayerNorm.weight", "embeddings_norm/scale", None),
        (f"{base}.embeddings.LayerNorm.bias", "embeddings_norm/bias", None),
    ] + ([(f"{base}.embeddings.token_type_embeddings.weight", "token_type_embeddings/embedding", None)]
         if token_types else [])
    for i in range(config.num_layers):
        rows += [(prefix.format(i=i) + hf, f"encoder/layer_{i}/{ours}", t) for hf, ours, t in layer]
    rows += head
    if isinstance(config, BertConfig) and config.add_pooler:
        rows += [(hf.format(base=base), ours, t) for hf, ours, t in _POOLER]
    return rows


def _ignorable(config: EncoderConfig) -> Callable[[str], bool]:
    if isinstance(config, DebertaV2Config):
        return lambda name: hf_deberta.ignorable(name, config)
    if isinstance(config, ModernBertConfig):
        return lambda name: hf_modernbert.ignorable(name, config)
    return frozenset(_ARCHS[model_type(config)][4]).__contains__


# --- configs ----------------------------------------------------------------------
def model_type(config: EncoderConfig) -> str:
    if isinstance(config, DistilBertConfig):
        return "distilbert"
    if isinstance(config, BertConfig):
        return config.model_type
    if isinstance(config, DebertaV2Config):
        return hf_deberta.MODEL_TYPE
    if isinstance(config, ModernBertConfig):
        return hf_modernbert.MODEL_TYPE
    raise TypeError(f"no Hugging Face mapping for {type(config).__name__}")


def config_from_hf(hf: Dict[str, Any]) -> EncoderConfig:
    """Our config from a Hugging Face config.json dict."""
    model_type = hf.get("model_type")
    if model_type == hf_deberta.MODEL_TYPE:
        return hf_deberta.read_deberta_config(hf)
    if model_type == hf_modernbert.MODEL_TYPE:
        return hf_modernbert.read_modernbert_config(hf)
    if model_type in ("bert", "roberta", "xlm-roberta"):
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type {hf['position_embedding_type']!r} is not supported; "
                "only 'absolute' position embeddings (every BERT/RoBERTa/XLM-R release) are")
        return BertConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            hidden_act=hf.get("hidden_act", "gelu"),
            pad_token_id=hf.get("pad_token_id") or (0 if model_type == "bert" else 1),
            initializer_range=hf.get("initializer_range", 0.02),
            type_vocab_size=hf.get("type_vocab_size", 2), model_type=model_type)
    if model_type == "distilbert":
        return DistilBertConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["dim"], num_layers=hf["n_layers"],
            num_heads=hf["n_heads"], intermediate_size=hf["hidden_dim"],
            max_position_embeddings=hf["max_position_embeddings"],
            hidden_dropout=hf.get("dropout", 0.1),
            attention_dropout=hf.get("attention_dropout", 0.1),
            hidden_act=hf.get("activation", "gelu"), pad_token_id=hf.get("pad_token_id") or 0,
            initializer_range=hf.get("initializer_range", 0.02))
    raise ValueError(
        f"unsupported model_type {model_type!r} in config.json; supported: {', '.join(SUPPORTED)} "
        "(a masked-LM or encoder checkpoint of one of these architectures; mBERT is 'bert')")


def config_to_hf(config: EncoderConfig) -> Dict[str, Any]:
    """A config.json dict that transformers reads back as the same architecture."""
    if isinstance(config, DebertaV2Config):
        return hf_deberta.deberta_config_to_hf(config)
    if isinstance(config, ModernBertConfig):
        return hf_modernbert.modernbert_config_to_hf(config)
    arch = model_type(config)
    if arch == "distilbert":
        return dict(
            architectures=["DistilBertForMaskedLM"], model_type="distilbert",
            vocab_size=config.vocab_size, dim=config.hidden_size, n_layers=config.num_layers,
            n_heads=config.num_heads, hidden_dim=config.intermediate_size,
            max_position_embeddings=config.max_position_embeddings,
            dropout=config.hidden_dropout, attention_dropout=config.attention_dropout,
            activation=config.hidden_act, pad_token_id=config.pad_token_id,
            initializer_range=config.initializer_range, sinusoidal_pos_embds=False,
            tie_word_embeddings=True, qa_dropout=0.1, seq_classif_dropout=0.2)
    return dict(
        architectures=[_HF_CLASSES[arch]],
        model_type=arch, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        layer_norm_eps=config.layer_norm_eps, hidden_dropout_prob=config.hidden_dropout,
        attention_probs_dropout_prob=config.attention_dropout, hidden_act=config.hidden_act,
        pad_token_id=config.pad_token_id, initializer_range=config.initializer_range,
        type_vocab_size=config.type_vocab_size, position_embedding_type="absolute",
        tie_word_embeddings=True)


# --- reading and writing ----------------------------------------------------------
def read_config(name_or_path: str) -> EncoderConfig:
    """The architecture in a Hugging Face directory's config.json (a hub name needs a
    network); for a DeBERTa, whether it has an MLM head, from its tensors' names."""
    model_dir = resolve_model_dir(name_or_path)
    config = config_from_hf(read_config_json(model_dir))
    if isinstance(config, DebertaV2Config):
        config = hf_deberta.with_the_head_found(config, tables.tensor_names(model_dir))
    return config


def _description(config: EncoderConfig, what: str) -> str:
    extra = ""
    if isinstance(config, DebertaV2Config):
        extra = (f", relative_attention={config.relative_attention}, share_att_key={config.share_att_key}, "
                 f"pos_att_type={list(config.pos_att_type)}")
    elif isinstance(config, ModernBertConfig):
        extra = (f", biases: attention {config.attention_bias}, mlp {config.mlp_bias}, norm {config.norm_bias}, "
                 f"classifier {config.classifier_bias}, decoder {config.decoder_bias}")
    return (f"a {model_type(config)} {what} of the architecture its config.json gives ({config.num_layers} "
            f"layers, width {config.hidden_size}, vocabulary {config.vocab_size}{extra})")


def params_from_state_dict(state: Dict[str, np.ndarray], config: EncoderConfig,
                           param_dtype=jnp.float32) -> Params:
    """Our masked LM's params from HF tensors.

    Tensors the masked LM does not use (a pooler it has no place for, classification
    heads beside the MLM head, old buffers) are ignored with one warning listing
    them, as transformers does; a tensor it needs that is missing or of the wrong shape
    is an error naming it."""
    table = param_table(config)
    if isinstance(config, DebertaV2Config):
        table = hf_deberta.param_table(config, hf_deberta.encoder_prefix(state))
    shapes = jax.eval_shape(lambda: init_params(module_for(config)(config), jax.random.key(0)))
    what = "masked LM" if getattr(config, "mlm_head", True) else "encoder"
    return params_from_table(state, config, table, shapes, what, param_dtype)


def params_from_table(state: Dict[str, np.ndarray], config: EncoderConfig, table, shapes, what: str,
                      param_dtype=jnp.float32) -> Params:
    """Our params (of the shapes in `shapes`) from HF tensors by `table` (a model of kind
    `what`: "masked LM", "sequence classifier"...); see `params_from_state_dict`."""
    return tables.params_from_table(state, table, config, shapes, _description(config, what),
                                    _ignorable(config), param_dtype)


def load_hf_model(path: str, dtype=jnp.float32, param_dtype=jnp.float32):
    """(model, params) for a HF masked-LM (or encoder) directory or hub name of any family
    in SUPPORTED. A DeBERTa checkpoint without MLM head (the released DeBERTa-v3) gives an
    encoder: config.mlm_head False, logits None."""
    model_dir = resolve_model_dir(path)
    config = config_from_hf(read_config_json(model_dir))
    state = read_state_dict(model_dir)
    if isinstance(config, BertConfig):
        base = _ARCHS[config.model_type][0]
        if f"{base}.pooler.dense.weight" in state:
            config = config.replace(add_pooler=True)
    elif isinstance(config, DebertaV2Config):
        config = hf_deberta.with_the_head_found(config, state)
    params = params_from_state_dict(state, config, param_dtype)
    return module_for(config)(config, dtype=dtype, param_dtype=param_dtype), params


def state_dict_from_params(params: Params, config: EncoderConfig, dtype=np.float32, table=None) -> Dict[str, np.ndarray]:
    """HF tensors (PyTorch layout, float32 unless `dtype` says otherwise) from our params,
    by `table` (default: the masked LM's, `param_table`)."""
    state = tables.state_from_table(params, table or param_table(config), config, dtype)
    if isinstance(config, DebertaV2Config) and table is None:
        state.update(hf_deberta.unused_norm(config, dtype))
    return state


def save_hf_model(params: Params, config: EncoderConfig, out_dir: str, tokenizer=None,
                  dtype=np.float32) -> str:
    """Write config.json + model.safetensors (+ tokenizer files) that transformers loads."""
    return write_hf_dir(config_to_hf(config), state_dict_from_params(params, config, dtype), out_dir, tokenizer)
