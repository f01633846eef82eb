"""What every Hugging Face mapping shares: layout transforms, tree access, reading and
writing a model directory, and the one check of a checkpoint's tensors against a table.

A family's module (hf.py for BERT / RoBERTa / XLM-R / DistilBERT, hf_deberta.py,
hf_modernbert.py) is a table of (Hugging Face name, our path, transform) built from its
config, plus its config.json fields; hf.py dispatches between them by model_type.
Hugging Face checkpoints are PyTorch layout: a Linear weight is [out, in], ours is
[in, out]; attention projections are split by head on our side.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import huggingface_hub
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from absl import logging
from etils import epy

from distil_jax.models import EncoderConfig

with epy.lazy_imports():  # optional: only a pytorch_model.bin needs it
    import torch

Params = Dict[str, Any]

# One BERT-style layer: (HF name under the layer prefix, our path under encoder/layer_{i},
# transform). RoBERTa and XLM-R use it as is, DeBERTa with its projections' names.
BERT_LAYER = [
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


# --- layouts ----------------------------------------------------------------------
def to_ours(kind: Optional[str], x: np.ndarray, config: EncoderConfig) -> np.ndarray:
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


def to_hf(kind: Optional[str], x: np.ndarray, config: EncoderConfig) -> np.ndarray:
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


def hf_shape(kind: Optional[str], ours: Tuple[int, ...]) -> Tuple[int, ...]:
    """The PyTorch-layout shape of one of our tensors (the inverse of `to_ours`)."""
    if kind == "linear":
        return tuple(reversed(ours))
    if kind == "qkv":  # [d, h, hd] <- [h*hd, d]
        return (ours[1] * ours[2], ours[0])
    if kind == "qkv_bias":
        return (ours[0] * ours[1],)
    if kind == "attn_out":  # [h, hd, d] <- [d, h*hd]
        return (ours[2], ours[0] * ours[1])
    return tuple(ours)


def set_path(tree: Params, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def get_path(tree: Params, path: str):
    for p in path.split("/"):
        tree = tree[p]
    return tree


def brief(names: List[str], n: int = 8) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _paths(ours) -> Tuple[str, ...]:
    return (ours,) if isinstance(ours, str) else tuple(ours)


def expected_shapes(table, shapes: Params) -> Dict[str, Tuple[int, ...]]:
    """HF name -> the PyTorch-layout shape a row of `table` needs, from our params' shapes
    (a row whose HF tensor is fused from several of ours: their parts along axis 0)."""
    out = {}
    for hf, ours, kind in table:
        paths = _paths(ours)
        first = hf_shape(kind, tuple(get_path(shapes, paths[0]).shape))
        out[hf] = (first[0] * len(paths),) + tuple(first[1:])
    return out


def params_from_table(state: Dict[str, np.ndarray], table, config: EncoderConfig, shapes: Params, what: str,
                      ignorable: Callable[[str], bool], param_dtype=jnp.float32) -> Params:
    """Our params from HF tensors by `table`: rows (HF name, our '/'-joined path or a tuple
    of paths the HF tensor is cut into along its axis 0, transform). Checked first against
    `shapes` (`check_tensors`)."""
    check_tensors(state, expected_shapes(table, shapes), what, ignorable)
    params: Params = {}
    for hf, ours, kind in table:
        paths = _paths(ours)
        for path, part in zip(paths, np.split(np.asarray(state[hf]), len(paths), axis=0), strict=True):
            set_path(params, path, jnp.asarray(to_ours(kind, part, config), param_dtype))
    return params


def state_from_table(params: Params, table, config: EncoderConfig, dtype=np.float32) -> Dict[str, np.ndarray]:
    """HF tensors (PyTorch layout, float32 unless `dtype` says otherwise) from our params by
    `table` (the inverse of `params_from_table`)."""
    state = {}
    for hf, ours, kind in table:
        parts = [to_hf(kind, np.asarray(get_path(params, p), np.float32), config) for p in _paths(ours)]
        state[hf] = np.ascontiguousarray(np.concatenate(parts, axis=0)).astype(dtype)
    return state


def check_tensors(state: Dict[str, np.ndarray], expected: Dict[str, Tuple[int, ...]], what: str,
                  ignorable: Callable[[str], bool]) -> None:
    """Every tensor of `expected` (HF name -> PyTorch-layout shape) is in `state` with its
    shape, else a ValueError naming the missing and misshapen ones and `what` the config
    says the checkpoint is; tensors of no use (not expected, not `ignorable`) are ignored
    with one warning listing them, as transformers does."""
    missing = [name for name in expected if name not in state]
    wrong = [f"{name} {tuple(state[name].shape)} (expected {shape})" for name, shape in expected.items()
             if name in state and tuple(state[name].shape) != tuple(shape)]
    if missing or wrong:
        found = ([f"missing {brief(missing)}"] if missing else []) + ([f"wrong shape {brief(wrong)}"] if wrong else [])
        raise ValueError(f"the checkpoint does not hold {what}: {'; '.join(found)}. Pass a checkpoint "
                         "whose config.json matches its weights")
    unused = sorted(k for k in state if k not in expected and not ignorable(k))
    if unused:
        logging.warning("%d tensors of the checkpoint are not part of %s and are ignored: %s",
                        len(unused), what, brief(unused, 20))


# --- directories ------------------------------------------------------------------
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


def read_config_json(model_dir: str) -> Dict[str, Any]:
    """The config.json dict of a model directory."""
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{model_dir} has no config.json; pass a Hugging Face model "
                                "directory (save_pretrained writes config.json and weights)")
    with open(config_path) as f:
        return json.load(f)


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


def tensor_names(model_dir: str) -> frozenset:
    """The names of a checkpoint's tensors, from the safetensors headers (nothing loaded)."""
    single = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(single):
        with safetensors.safe_open(single, "np") as f:
            return frozenset(_rename_legacy(k) for k in f.keys())
    if os.path.exists(index):
        with open(index) as f:
            return frozenset(_rename_legacy(k) for k in json.load(f)["weight_map"])
    return frozenset(read_state_dict(model_dir))


def _rename_legacy(name: str) -> str:
    if name.endswith(".gamma"):
        return name[: -len("gamma")] + "weight"
    if name.endswith(".beta"):
        return name[: -len("beta")] + "bias"
    return name


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
