"""A checkpoint as a Hugging Face directory (mode export).

    python -m distil_jax.main --config=CONFIG --workdir=DIR --config.mode=export

The newest checkpoint in DIR/checkpoints becomes `export.dir` (default DIR/hf): a
student as DistilBertForMaskedLM, a pretrained BERT as BertForMaskedLM, a fine-tuned
model (mode finetune's run directory) as *ForSequenceClassification (with its labels) or
*ForQuestionAnswering, with the tokenizer of its data, in `export.dtype` (float32, or
bfloat16 for half the size).
`export.onnx=fp32` adds `onnx/model.onnx` (checked against transformers within 1e-4),
`export.onnx=int8` that and its int8 quantization `onnx/model_quantized.onnx`
(onnx_export.py; `python -m distil_jax.interop.onnx_export HF_DIR` does the same for any
Hugging Face directory).
"""

from __future__ import annotations

import json
import tempfile
from typing import Dict

import jax

from distil_jax import config as config_lib
from distil_jax import storage
from distil_jax.interop import hf, hf_heads, onnx_export
from distil_jax.checkpoint import checkpoint_tokenizer, load_model
from distil_jax.data import prepared_dir
from distil_jax.models import QuestionAnswerer, SequenceClassifier


def export_checkpoint(workdir: str, out_dir: str, dtype: str = "float32", config=None) -> str:
    """The newest checkpoint of `workdir` written to `out_dir` (by process 0); returns out_dir.
    A masked LM as *ForMaskedLM, a fine-tuned model (mode finetune) as its task's class."""
    module, params, meta = load_model(workdir)
    if jax.process_index() == 0:
        fallback = ""
        if config is not None and storage.exists(storage.join(prepared_dir(config, workdir), "tokenizer")):
            fallback = storage.local_copy(storage.join(prepared_dir(config, workdir), "tokenizer"))
        kw = dict(tokenizer=checkpoint_tokenizer(meta, fallback), dtype=config_lib.DTYPES[dtype])
        params = jax.device_get(params)
        if isinstance(module, SequenceClassifier):
            hf_heads.save_hf_classifier(params, module.config, out_dir, meta["task"]["labels"], **kw)
        elif isinstance(module, QuestionAnswerer):
            hf_heads.save_hf_question_answerer(params, module.config, out_dir, **kw)
        else:
            hf.save_hf_model(params, module.config, out_dir, **kw)
    return out_dir


def run(config, workdir: str) -> Dict:
    """The export (and its ONNX files) in `export.dir`; on a bucket, written in a local
    temporary directory first (transformers and ONNX write local files) and then uploaded."""
    out_dir = config.export.dir or storage.join(workdir, "hf")
    with tempfile.TemporaryDirectory() as tmp:
        local = tmp if storage.is_remote(out_dir) else out_dir
        export_checkpoint(workdir, local, config.export.dtype, config)
        result = {"export_dir": out_dir}
        if config.export.onnx and jax.process_index() == 0:
            result["onnx"] = onnx_export.export(local, int8=config.export.onnx == "int8")
            result["onnx"] = json.loads(json.dumps(result["onnx"]).replace(local, out_dir))  # where they end up
        if local != out_dir and jax.process_index() == 0:
            storage.upload_dir(local, out_dir)
    return result
