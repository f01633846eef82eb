"""A checkpoint as a Hugging Face directory (mode export).

    python -m distil_jax.main --config=CONFIG --workdir=DIR --config.mode=export

The newest checkpoint in DIR/checkpoints becomes `export.dir` (default DIR/hf): a
student as DistilBertForMaskedLM, a pretrained BERT as BertForMaskedLM, with the
tokenizer of its data, in `export.dtype` (float32, or bfloat16 for half the size).
`export.onnx=fp32` adds `onnx/model.onnx` (checked against transformers within 1e-4),
`export.onnx=int8` that and its int8 quantization `onnx/model_quantized.onnx`
(onnx_export.py; `python -m distil_jax.onnx_export HF_DIR` does the same for any
Hugging Face directory).
"""

from __future__ import annotations

import os
from typing import Dict

import jax

from distil_jax import config as config_lib
from distil_jax import hf, onnx_export
from distil_jax.checkpoint import load_model
from distil_jax.data import prepared_dir
from distil_jax.data.tokenizer import load_tokenizer


def checkpoint_tokenizer(meta: Dict, config=None, workdir: str = ""):
    """The tokenizer a checkpoint's run was trained with (None for synthetic data)."""
    candidates = [meta.get("tokenizer_dir") or ""]
    if config is not None:
        candidates.append(os.path.join(prepared_dir(config, workdir), "tokenizer"))
    for path in candidates:
        if path and os.path.isdir(path):
            return load_tokenizer(path)
    return None


def export_checkpoint(workdir: str, out_dir: str, dtype: str = "float32", config=None) -> str:
    """The newest checkpoint of `workdir` written to `out_dir` (by process 0); returns out_dir."""
    module, params, meta = load_model(workdir)
    if jax.process_index() == 0:
        hf.save_hf_model(jax.device_get(params), module.config, out_dir,
                         tokenizer=checkpoint_tokenizer(meta, config, workdir),
                         dtype=config_lib.DTYPES[dtype])
    return out_dir


def run(config, workdir: str) -> Dict:
    out_dir = config.export.dir or os.path.join(workdir, "hf")
    result = {"export_dir": export_checkpoint(workdir, out_dir, config.export.dtype, config)}
    if config.export.onnx and jax.process_index() == 0:
        result["onnx"] = onnx_export.export(out_dir, int8=config.export.onnx == "int8")
    return result
