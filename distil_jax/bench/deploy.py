"""`python -m distil_jax.bench deploy`: teacher and student as users ship them, timed.

Both models as Hugging Face directories, each run four ways: transformers (PyTorch)
fp32 and int8 (torch's dynamic quantization of every Linear), ONNX Runtime fp32 and int8
(onnx_export.py: the checked export and onnxruntime's dynamic quantization); latency at
batch 1 and throughput at --batch, at --seq, with --threads intra-op threads in both
runtimes. All eight runners are timed in interleaved rounds (timing.interleaved), so a
drifting machine slows all alike; medians over the rounds, and the speed-ups from them.

--models base: BERT-base and DistilBERT-base shapes (12 and 6 layers, 768 wide, 12
heads, 3072, vocabulary 30522), random weights (speed does not depend on them).
--models embedded: the shipped demo teacher and a student of half its layers initialised
from it (or --student_dir, e.g. the demo's DIR/student_hf).
--task feature-extraction (default) times the encoder, what a task model spends its time
in (the paper's inference figure is a classifier's pass over STS-B, batch 1, on a CPU);
fill-mask adds the vocabulary projection.
"""

from __future__ import annotations

import os
import tempfile
from typing import Dict

import jax
import numpy as np
from etils import epy

from distil_jax.interop import hf, onnx_export
from distil_jax.assets import DEMO_TEACHER
from distil_jax.models import Bert, BertConfig, init_params
from distil_jax.train.student_init import init_student_from_teacher, student_config_from_teacher
from distil_jax.bench.timing import interleaved

with epy.lazy_imports():  # the `deploy` extra
    import torch

RUNNERS = (("torch", "fp32"), ("torch", "int8"), ("onnx", "fp32"), ("onnx", "int8"))


def add_flags(p) -> None:
    """Its flags beside bench's model-shape flags (--teacher_layers ... --vocab, for --models base)."""
    p.add_argument("--models", default="base", choices=("base", "embedded"))
    p.add_argument("--student_dir", default="", help="embedded: a trained student's Hugging Face dir")
    p.add_argument("--task", default="feature-extraction", choices=("feature-extraction", "fill-mask"))
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="sequences per call for throughput")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of both runtimes")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (medians reported)")
    p.add_argument("--pause", type=float, default=0.2, help="seconds of rest before each timed call")


def model_dirs(args, tmp: str) -> Dict[str, str]:
    """{"teacher", "student"} Hugging Face directories for --models."""
    if args.models == "embedded":
        teacher_dir = DEMO_TEACHER
        teacher, teacher_params = hf.load_hf_model(teacher_dir)
    else:
        teacher = Bert(BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.teacher_layers,
                                  num_heads=args.heads, intermediate_size=args.ffn,
                                  max_position_embeddings=max(512, args.seq)))
        teacher_params = jax.device_get(init_params(teacher, jax.random.key(0)))
        teacher_dir = hf.save_hf_model(teacher_params, teacher.config, os.path.join(tmp, "teacher"))
    if args.student_dir:
        return {"teacher": teacher_dir, "student": args.student_dir}
    layers = args.student_layers if args.models == "base" else max(1, teacher.config.num_layers // 2)
    student = student_config_from_teacher(teacher.config, layers)
    params = init_student_from_teacher(teacher_params, teacher.config, student)
    return {"teacher": teacher_dir, "student": hf.save_hf_model(jax.device_get(params), student,
                                                                os.path.join(tmp, "student"))}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    out = {"bench": "deploy", "models": args.models, "task": args.task, "seq": args.seq,
           "latency_batch": 1, "throughput_batch": args.batch, "threads": args.threads,
           "cpus": os.cpu_count(), "torch": torch.__version__,
           "onnxruntime": onnx_export.onnxruntime.__version__}
    output = onnx_export.TASKS[args.task][1][0]
    with tempfile.TemporaryDirectory() as tmp:
        forwards = {}
        for name, hf_dir in model_dirs(args, tmp).items():
            files = onnx_export.export(hf_dir, os.path.join(tmp, f"{name}_onnx"), task=args.task)
            model = onnx_export.load_torch_model(hf_dir, args.task)
            out[f"{name}_params"] = int(sum(p.numel() for p in model.parameters()))
            out[f"{name}_onnx_fp32_mb"] = files["fp32"]["bytes"] / 1e6
            out[f"{name}_onnx_int8_mb"] = files["int8"]["bytes"] / 1e6
            vocab = model.config.vocab_size
            forwards[name, "torch", "fp32"] = onnx_export.torch_forward(model, output)
            forwards[name, "torch", "int8"] = onnx_export.torch_forward(onnx_export.torch_int8(model), output)
            for precision in ("fp32", "int8"):
                sess = onnx_export.session(files[precision]["path"], args.threads)
                forwards[name, "onnx", precision] = onnx_export.onnx_forward(sess, output)
        rounds = {}
        for setting, rows in (("latency", 1), ("throughput", args.batch)):
            x = onnx_export.random_inputs(vocab, rows, args.seq, seed=1)
            timers = {key: (lambda f=f: f(x["input_ids"], x["attention_mask"])) for key, f in forwards.items()}
            times = rounds[setting] = interleaved(timers, args.steps, args.pause)
            for (name, runtime, precision), t in times.items():
                seconds = float(np.median(t))
                key = f"{name}_{runtime}_{precision}"
                if setting == "latency":
                    out[f"{key}_latency_ms"] = seconds * 1e3
                else:
                    out[f"{key}_sequences_per_s"] = rows / seconds
    for runtime, precision in RUNNERS:
        key = f"{runtime}_{precision}"
        out[f"speedup_{key}_latency"] = out[f"teacher_{key}_latency_ms"] / out[f"student_{key}_latency_ms"]
        out[f"speedup_{key}_throughput"] = (out[f"student_{key}_sequences_per_s"]
                                            / out[f"teacher_{key}_sequences_per_s"])
    latency = rounds["latency"]
    for runtime in ("torch", "onnx"):
        out[f"speedup_{runtime}_int8_student_vs_fp32_teacher_latency"] = (
            out[f"teacher_{runtime}_fp32_latency_ms"] / out[f"student_{runtime}_int8_latency_ms"])
        # the spread: each round's ratio (both timed in the same round)
        for student, label in (("fp32", f"speedup_{runtime}_fp32_latency"),
                               ("int8", f"speedup_{runtime}_int8_student_vs_fp32_teacher_latency")):
            out[f"{label}_per_round"] = sorted(t / s for t, s in zip(latency["teacher", runtime, "fp32"],
                                                                     latency["student", runtime, student]))
    out["student_int8_over_teacher_fp32_file"] = out["student_onnx_int8_mb"] / out["teacher_onnx_fp32_mb"]
    return out
