"""Hugging Face <-> Flax: parameter mapping tables, import of teachers, export of students.

Hugging Face checkpoints are PyTorch layout: a Linear weight is [out, in], ours is
[in, out]; attention projections are split by head on our side. Each architecture is a
table of (Hugging Face name, our path, transform), so the whole mapping reads in one
screen. Transformers 5 has no Flax classes: the Flax side is ours.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from absl import logging
from etils import epy

from distil_jax.models import Bert, BertConfig, DistilBert, DistilBertConfig, EncoderConfig, init_params

with epy.lazy_imports():  # optional: only a pytorch_model.bin needs it
    import torch

Params = Dict[str, Any]

# --- the tables -------------------------------------------------------------------
# Per-layer entries: (HF name under the layer prefix, our path under encoder/layer_{i}, transform)
_BERT_LAYER = [
    ("attention.self.query.weight", "attention/query/kernel", "qkv"),
    ("attention.self.query.bias", "attention/query/bias", "qkv_bias"),
    ("attention.self.key.weight", "attention/key/kernel", "qkv"),
    ("attention.self.key.bias", "attention/key/bias", "qkv_bias"),
    ("attention.self.value.weight", "attention/value/kernel", "qkv"),
    ("attention.self.value.bias", "attention/value/bias", "qkv_bias"),
    ("attention.output.dense.weight", "attention/out/kernel", "attn_out"),
    ("attention.output.dense.bias", "attention/out/bias", None),
    ("attention.output.LayerNorm.weight", "attention_norm/scale", None),
    ("attention.output.LayerNorm.bias", "attention_norm/bias", None),
    ("intermediate.dense.weight", "wi/kernel", "linear"),
    ("intermediate.dense.bias", "wi/bias", None),
    ("output.dense.weight", "wo/kernel", "linear"),
    ("output.dense.bias", "wo/bias", None),
    ("output.LayerNorm.weight", "output_norm/scale", None),
    ("output.LayerNorm.bias", "output_norm/bias", None),
]
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


def _embeddings(base: str, token_types: bool):
    rows = [
        (f"{base}.embeddings.word_embeddings.weight", "word_embeddings/embedding", None),
        (f"{base}.embeddings.position_embeddings.weight", "position_embeddings/embedding", None),
        (f"{base}.embeddings.LayerNorm.weight", "embeddings_norm/scale", None),
        (f"{base}.embeddings.LayerNorm.bias", "embeddings_norm/bias", None),
    ]
    if token_types:
        rows.append((f"{base}.embeddings.token_type_embeddings.weight",
                     "token_type_embeddings/embedding", None))
    return rows


def _head(dense: str, norm: str, bias: str):
    return [(f"{dense}.weight", "mlm_head/transform/kernel", "linear"),
            (f"{dense}.bias", "mlm_head/transform/bias", None),
            (f"{norm}.weight", "mlm_head/layer_norm/scale", None),
            (f"{norm}.bias", "mlm_head/layer_norm/bias", None),
            (bias, "mlm_head/bias", None)]


# model_type -> (embeddings, layer prefix, layer table, head, tensors that may be present
# but carry nothing of ours: tied decoders, NSP head, old position-id buffers)
_ARCHS = {
    "bert": (_embeddings("bert", True), "bert.encoder.layer.{i}.", _BERT_LAYER,
             _head("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                   "cls.predictions.bias"),
             ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
              "cls.seq_relationship.weight", "cls.seq_relationship.bias",
              "bert.embeddings.position_ids")),
    "roberta": (_embeddings("roberta", True), "roberta.encoder.layer.{i}.", _BERT_LAYER,
                _head("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
                ("lm_head.decoder.weight", "lm_head.decoder.bias",
                 "roberta.embeddings.position_ids")),
    "distilbert": (_embeddings("distilbert", False), "distilbert.transformer.layer.{i}.",
                   _DISTILBERT_LAYER,
                   _head("vocab_transform", "vocab_layer_norm", "vocab_projector.bias"),
                   ("vocab_projector.weight", "distilbert.embeddings.position_ids")),
}
_POOLER = [("{base}.pooler.dense.weight", "pooler/kernel", "linear"),
           ("{base}.pooler.dense.bias", "pooler/bias", None)]


def param_table(config: EncoderConfig) -> List[Tuple[str, str, Optional[str]]]:
    """Every (HF name, our '/'-joined path, transform) of a model with this config."""
    arch = model_type(config)
    embeddings, prefix, layer, head, _ = _ARCHS[arch]
    rows = list(embeddings)
    for i in range(config.num_layers):
        rows += [(prefix.format(i=i) + hf, f"encoder/layer_{i}/{ours}", t) for hf, ours, t in layer]
    rows += head
    if isinstance(config, BertConfig) and config.add_pooler:
        rows += [(hf.format(base=arch), ours, t) for hf, ours, t in _POOLER]
    return rows


def _to_ours(kind: Optional[str], x: np.ndarray, config: EncoderConfig) -> np.ndarray:
    h, d = config.num_heads, config.hidden_size
    if kind is None:
        return x
    if kind == "linear":
        return x.T
    if kind == "qkv":  # [h*hd, d] -> [d, h, hd]
        return x.T.reshape(d, h, -1)
    if kind == "qkv_bias":
        return x.reshape(h, -1)
    if kind == "attn_out":  # [d, h*hd] -> [h, hd, d]
        return x.T.reshape(h, -1, d)
    raise ValueError(kind)


def _to_hf(kind: Optional[str], x: np.ndarray, config: EncoderConfig) -> np.ndarray:
    d = config.hidden_size
    if kind is None:
        return x
    if kind == "linear":
        return x.T
    if kind == "qkv":  # [d, h, hd] -> [h*hd, d]
        return x.reshape(d, -1).T
    if kind == "qkv_bias":
        return x.reshape(-1)
    if kind == "attn_out":  # [h, hd, d] -> [d, h*hd]
        return x.reshape(-1, d).T
    raise ValueError(kind)


# --- configs ----------------------------------------------------------------------
def model_type(config: EncoderConfig) -> str:
    if isinstance(config, DistilBertConfig):
        return "distilbert"
    if isinstance(config, BertConfig):
        return config.model_type
    raise TypeError(f"no Hugging Face mapping for {type(config).__name__}")


def config_from_hf(hf: Dict[str, Any]) -> EncoderConfig:
    """Our config from a Hugging Face config.json dict."""
    model_type = hf.get("model_type")
    if model_type in ("bert", "roberta"):
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type {hf['position_embedding_type']!r} is not supported; "
                "only 'absolute' position embeddings (every BERT/RoBERTa release) are")
        return BertConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            hidden_act=hf.get("hidden_act", "gelu"),
            pad_token_id=hf.get("pad_token_id") or (1 if model_type == "roberta" else 0),
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
        f"unsupported model_type {model_type!r} in config.json; supported: bert, roberta, "
        "distilbert (a masked-LM checkpoint of one of these architectures)")


def config_to_hf(config: EncoderConfig) -> Dict[str, Any]:
    """A config.json dict that transformers reads back as the same architecture."""
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
        architectures=["BertForMaskedLM" if arch == "bert" else "RobertaForMaskedLM"],
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
def resolve_model_dir(name_or_path: str) -> str:
    """A local directory as is; otherwise a hub name, fetched when there is a network."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise ValueError(f"{name_or_path} is a file; pass the Hugging Face model directory "
                         "that holds config.json and the weights")
    try:
        return huggingface_hub.snapshot_download(
            name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception as e:  # no network, unknown repo, gated repo, ...
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a local directory nor a model the hub gave "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Download it "
            f"where there is a network (`hf download {name_or_path} --local-dir DIR`) and "
            "pass DIR") from None


def read_config(name_or_path: str) -> EncoderConfig:
    """The architecture in a Hugging Face directory's config.json (a hub name needs a network)."""
    model_dir = resolve_model_dir(name_or_path)
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{model_dir} has no config.json; pass a Hugging Face model "
                                "directory (save_pretrained writes config.json and weights)")
    with open(config_path) as f:
        return config_from_hf(json.load(f))


def read_state_dict(model_dir: str) -> Dict[str, np.ndarray]:
    """All tensors of a HF checkpoint: model.safetensors (single or sharded) or pytorch_model.bin."""
    def load_file(path):
        try:
            return safetensors.numpy.load_file(path)
        except Exception as e:  # noqa: BLE001 - safetensors' errors do not name the file
            raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); it may be truncated "
                             "by an interrupted download: download it again") from None
    single = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    legacy = os.path.join(model_dir, "pytorch_model.bin")
    if os.path.exists(single):
        state = load_file(single)
    elif os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(model_dir, shard)))
    elif os.path.exists(legacy):
        try:
            loaded = torch.load(legacy, map_location="cpu", weights_only=True)
        except ImportError:
            raise ImportError(f"{legacy} is a PyTorch pickle and needs torch to read; install "
                              "torch or convert the checkpoint to model.safetensors") from None
        state = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in loaded.items()}
    else:
        raise FileNotFoundError(
            f"no weights in {model_dir}: expected model.safetensors, "
            "model.safetensors.index.json or pytorch_model.bin")
    # Original BERT releases name LayerNorm parameters gamma/beta (HF renames them on load).
    return {_rename_legacy(k): np.asarray(v) for k, v in state.items()}


def _rename_legacy(name: str) -> str:
    if name.endswith(".gamma"):
        return name[: -len("gamma")] + "weight"
    if name.endswith(".beta"):
        return name[: -len("beta")] + "bias"
    return name


def _set(tree: Params, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get(tree: Params, path: str):
    for p in path.split("/"):
        tree = tree[p]
    return tree


def _hf_shape(kind: Optional[str], ours: Tuple[int, ...]) -> Tuple[int, ...]:
    """The PyTorch-layout shape of one of our tensors (the inverse of `_to_ours`)."""
    if kind == "linear":
        return tuple(reversed(ours))
    if kind == "qkv":  # [d, h, hd] <- [h*hd, d]
        return (ours[1] * ours[2], ours[0])
    if kind == "qkv_bias":
        return (ours[0] * ours[1],)
    if kind == "attn_out":  # [h, hd, d] <- [d, h*hd]
        return (ours[2], ours[0] * ours[1])
    return tuple(ours)


def params_from_state_dict(state: Dict[str, np.ndarray], config: EncoderConfig,
                           param_dtype=jnp.float32) -> Params:
    """Our masked LM's params from HF tensors.

    Tensors the masked LM does not use (a pooler it has no place for, classification
    heads beside `cls.predictions`, old buffers) are ignored with one warning listing
    them, as transformers does; a tensor it needs that is missing or of the wrong shape
    is an error naming it."""
    module = DistilBert if isinstance(config, DistilBertConfig) else Bert
    shapes = jax.eval_shape(lambda: init_params(module(config), jax.random.key(0)))
    return params_from_table(state, config, param_table(config), shapes, "masked LM", param_dtype)


def params_from_table(state: Dict[str, np.ndarray], config: EncoderConfig, table, shapes, what: str,
                      param_dtype=jnp.float32) -> Params:
    """Our params (of the shapes in `shapes`) from HF tensors by `table` (a model of kind
    `what`: "masked LM", "sequence classifier"...); see `params_from_state_dict`."""
    _, _, _, _, ignorable = _ARCHS[model_type(config)]
    missing = [hf for hf, _, _ in table if hf not in state]
    wrong = [f"{hf} {tuple(state[hf].shape)} (expected {_hf_shape(kind, _get(shapes, ours).shape)})"
             for hf, ours, kind in table
             if hf in state and tuple(state[hf].shape) != _hf_shape(kind, _get(shapes, ours).shape)]
    if missing or wrong:
        found = ([f"missing {_brief(missing)}"] if missing else []) + ([f"wrong shape {_brief(wrong)}"] if wrong else [])
        raise ValueError(
            f"the checkpoint does not hold a {model_type(config)} {what} of the architecture its "
            f"config.json gives ({config.num_layers} layers, width {config.hidden_size}, vocabulary "
            f"{config.vocab_size}): {'; '.join(found)}. Pass a checkpoint whose config.json matches "
            "its weights")
    known = {hf for hf, _, _ in table}
    unused = sorted(k for k in state if k not in known and k not in ignorable)
    if unused:
        logging.warning("%d tensors of the checkpoint are not part of a %s %s and are "
                        "ignored: %s", len(unused), model_type(config), what, _brief(unused, 20))
    params: Params = {}
    for hf, ours, kind in table:
        _set(params, ours, jnp.asarray(_to_ours(kind, state[hf], config), param_dtype))
    return params


def _brief(names: List[str], n: int = 8) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_hf_model(path: str, dtype=jnp.float32, param_dtype=jnp.float32):
    """(model, params) for a HF bert / roberta / distilbert masked-LM directory or hub name."""
    model_dir = resolve_model_dir(path)
    config = read_config(model_dir)
    state = read_state_dict(model_dir)
    if isinstance(config, BertConfig) and f"{config.model_type}.pooler.dense.weight" in state:
        config = config.replace(add_pooler=True)
    params = params_from_state_dict(state, config, param_dtype)
    module = DistilBert if isinstance(config, DistilBertConfig) else Bert
    return module(config, dtype=dtype, param_dtype=param_dtype), params


def state_dict_from_params(params: Params, config: EncoderConfig, dtype=np.float32, table=None) -> Dict[str, np.ndarray]:
    """HF tensors (PyTorch layout, float32 unless `dtype` says otherwise) from our params,
    by `table` (default: the masked LM's, `param_table`)."""
    return {hf: np.ascontiguousarray(_to_hf(kind, np.asarray(_get(params, ours), np.float32), config)).astype(dtype)
            for hf, ours, kind in (table or param_table(config))}


def write_hf_dir(hf_config: Dict[str, Any], state: Dict[str, np.ndarray], out_dir: str, tokenizer=None) -> str:
    """config.json, model.safetensors (PyTorch-layout tensors) and the tokenizer's files in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    safetensors.numpy.save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        if not hasattr(tokenizer, "save_pretrained"):
            raise TypeError(f"cannot save a tokenizer of type {type(tokenizer).__name__}; pass a "
                            "transformers tokenizer (e.g. PreTrainedTokenizerFast)")
        tokenizer.save_pretrained(out_dir)
    return out_dir


def save_hf_model(params: Params, config: EncoderConfig, out_dir: str, tokenizer=None,
                  dtype=np.float32) -> str:
    """Write config.json + model.safetensors (+ tokenizer files) that transformers loads."""
    return write_hf_dir(config_to_hf(config), state_dict_from_params(params, config, dtype), out_dir, tokenizer)
