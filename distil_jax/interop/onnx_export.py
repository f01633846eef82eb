"""Deployment: a Hugging Face export as ONNX, its int8 quantization, and the runtimes users ship.

    python -m distil_jax.interop.onnx_export HF_DIR [--task fill-mask] [--int8] [--out DIR]

writes HF_DIR/onnx/model.onnx (and with --int8 model_quantized.onnx), the layout
transformers.js and Optimum read. The export is torch.onnx's (the dynamo exporter) of
the transformers model the directory holds, with dynamic batch and sequence axes, and is
checked on padded inputs of other shapes: ONNX Runtime's outputs must equal the PyTorch
model's within `--atol` (1e-4), or nothing is kept. int8 is onnxruntime's dynamic
quantization: weights int8 per output channel, activations quantized at run time.

Tasks (the transformers class exported, its outputs): fill-mask (AutoModelForMaskedLM,
logits), feature-extraction (AutoModel, last_hidden_state: the encoder alone, the part of
a task model that costs), text-classification (AutoModelForSequenceClassification,
logits), question-answering (AutoModelForQuestionAnswering, start_logits and end_logits;
token_type_ids is an input too for BERT and RoBERTa, whose segments tell question from
context). Needs the `deploy` extra (torch, onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import warnings
from typing import Callable, Dict, Optional, Tuple

import numpy as np
from etils import epy

with epy.lazy_imports():  # the `deploy` extra: never needed to train
    import onnxruntime
    import onnxruntime.quantization
    import torch
    import transformers

# task -> (transformers auto class, output names)
TASKS = {
    "fill-mask": ("AutoModelForMaskedLM", ("logits",)),
    "feature-extraction": ("AutoModel", ("last_hidden_state",)),
    "text-classification": ("AutoModelForSequenceClassification", ("logits",)),
    "question-answering": ("AutoModelForQuestionAnswering", ("start_logits", "end_logits")),
}
INPUTS = ("input_ids", "attention_mask")  # and token_type_ids for question answering on BERT / RoBERTa
FP32, INT8 = "model.onnx", "model_quantized.onnx"

Forward = Callable[[np.ndarray, np.ndarray], np.ndarray]


class ExportMismatch(ValueError):
    """The ONNX model's outputs differ from the PyTorch model's by more than the tolerance."""


def _task(task: str) -> Tuple[str, Tuple[str, ...]]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {sorted(TASKS)}")
    return TASKS[task]


def load_torch_model(hf_dir: str, task: str = "fill-mask"):
    """The transformers model of `hf_dir` for `task`, float32, in eval mode."""
    auto, _ = _task(task)
    with open(os.path.join(hf_dir, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    kwargs = {"add_pooling_layer": False} if task == "feature-extraction" and model_type in ("bert", "roberta", "xlm-roberta") else {}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # an MLM checkpoint read as AutoModel lists its head
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = getattr(transformers, auto).from_pretrained(hf_dir, dtype=torch.float32, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    return model.eval()


def _with_outputs(model, inputs, outputs):
    """The model with positional `inputs` and a tuple of the task's outputs (what ONNX names);
    a class made here so that importing this module does not import torch."""
    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            out = self.model(**{k: given[k] for k in inputs})
            return tuple(out[name] for name in outputs)
    return Outputs()


def task_inputs(model, task: str) -> Tuple[str, ...]:
    """The exported model's inputs: INPUTS, and token_type_ids for question answering on a
    model with token types."""
    if task == "question-answering" and getattr(model.config, "type_vocab_size", 0) > 1:
        return INPUTS + ("token_type_ids",)
    return INPUTS


def random_inputs(vocab_size: int, rows: int, seq: int, seed: int = 0, pad: int = 0) -> Dict[str, np.ndarray]:
    """int64 token ids and a mask whose last row ends in `pad` padding positions."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab_size, size=(rows, seq)).astype(np.int64)
    am = np.ones_like(ids)
    if pad:
        am[-1, seq - pad:] = 0
        ids[-1, seq - pad:] = 0
    token_types = (np.arange(seq)[None, :] >= seq // 2).astype(np.int64) * am  # a second segment
    return {"input_ids": ids, "attention_mask": am, "token_type_ids": token_types}


def session(path: str, threads: int = 0):
    """An ONNX Runtime CPU session; `threads` > 0 fixes its intra-op thread count."""
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def onnx_forward(sess, output: str = "") -> Forward:
    """(input_ids, attention_mask) -> the session's first output (or `output`), float32."""
    names = [output] if output else [sess.get_outputs()[0].name]
    return lambda ids, am: sess.run(names, {"input_ids": np.asarray(ids, np.int64),
                                            "attention_mask": np.asarray(am, np.int64)})[0]


def torch_forward(model, output: str) -> Forward:
    """(input_ids, attention_mask) -> the transformers model's `output`, as numpy."""
    def forward(ids, am):
        with torch.inference_mode():
            out = model(input_ids=torch.as_tensor(np.asarray(ids, np.int64)),
                        attention_mask=torch.as_tensor(np.asarray(am, np.int64)))
        return out[output].numpy()
    return forward


def max_difference(sess, model, inputs, outputs, shapes=((1, 7), (3, 33))) -> float:
    """The largest |ONNX Runtime - PyTorch| over every output, on random padded inputs of
    `shapes` (none of them the export's)."""
    worst = 0.0
    for i, (rows, seq) in enumerate(shapes):
        x = random_inputs(model.config.vocab_size, rows, seq, seed=i, pad=seq // 3 if rows > 1 else 0)
        got = sess.run(list(outputs), {k: x[k] for k in inputs})
        with torch.inference_mode():
            want = model(**{k: torch.as_tensor(x[k]) for k in inputs})
        worst = max([worst] + [float(np.max(np.abs(g - want[name].numpy()))) for g, name in zip(got, outputs)])
    return worst


def export_onnx(hf_dir: str, out_dir: str = "", task: str = "fill-mask", atol: float = 1e-4) -> Dict:
    """`hf_dir`'s model as out_dir/model.onnx (default HF_DIR/onnx), checked against
    PyTorch within `atol`; returns {"path", "max_difference", "bytes"}."""
    _, outputs = _task(task)
    out_dir = out_dir or os.path.join(hf_dir, "onnx")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, FP32)
    model = load_torch_model(hf_dir, task)
    inputs = task_inputs(model, task)
    example = random_inputs(model.config.vocab_size, 2, 16)
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", max=model.config.max_position_embeddings)
    tmp = path + ".tmp"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter narrates each pass
        torch.onnx.export(_with_outputs(model, inputs, outputs), tuple(torch.as_tensor(example[k]) for k in inputs),
                          tmp, input_names=list(inputs), output_names=list(outputs), dynamo=True,
                          dynamic_shapes={k: {0: batch, 1: sequence} for k in inputs},
                          external_data=False, optimize=True, verbose=False)
    difference = max_difference(session(tmp), model, inputs, outputs)
    if not difference <= atol:
        os.remove(tmp)
        raise ExportMismatch(f"ONNX Runtime's {', '.join(outputs)} differ from the PyTorch model's by "
                             f"{difference:.3g} (> {atol:g}) on padded inputs; nothing was written. "
                             "Report the model and the torch/onnxruntime versions")
    os.replace(tmp, path)
    return {"path": path, "max_difference": difference, "bytes": os.path.getsize(path)}


def quantize_int8(onnx_path: str, out_path: str = "") -> Dict:
    """onnxruntime's dynamic quantization of `onnx_path` (int8 weights per channel,
    activations quantized at run time) -> out_path (default model_quantized.onnx beside it)."""
    out_path = out_path or os.path.join(os.path.dirname(onnx_path), INT8)
    q = onnxruntime.quantization
    with contextlib.redirect_stdout(io.StringIO()):
        q.quantize_dynamic(onnx_path, out_path, per_channel=True, weight_type=q.QuantType.QInt8)
    return {"path": out_path, "bytes": os.path.getsize(out_path)}


def torch_int8(model):
    """PyTorch's own int8 path for the same comparison: dynamic quantization of every Linear."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's move to torchao
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def export(hf_dir: str, out_dir: str = "", task: str = "fill-mask", int8: bool = True,
           atol: float = 1e-4) -> Dict[str, Optional[Dict]]:
    """ONNX fp32 (checked) and, with `int8`, its quantization: {"fp32": ..., "int8": ...}."""
    fp32 = export_onnx(hf_dir, out_dir, task, atol)
    return {"fp32": fp32, "int8": quantize_int8(fp32["path"]) if int8 else None}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m distil_jax.interop.onnx_export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="a Hugging Face model directory (what mode export writes)")
    p.add_argument("--task", default="fill-mask", choices=sorted(TASKS))
    p.add_argument("--out", default="", help="default: HF_DIR/onnx")
    p.add_argument("--int8", action="store_true", help="also write the int8 model")
    p.add_argument("--atol", type=float, default=1e-4)
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
        p.error(f"{args.hf_dir} is not a Hugging Face model directory (no config.json): pass what "
                "`--config.mode=export` wrote")
    print(json.dumps(export(args.hf_dir, args.out, args.task, args.int8, args.atol)))


if __name__ == "__main__":
    main(sys.argv[1:])
