"""Benchmarks, one JSON object per line on stdout.

    python -m distil_jax.bench train [--teacher_layers 12 --student_layers 6 --hidden 768
        --heads 12 --ffn 3072 --vocab 30522 --batch 8 --seq 128 --steps 5 --dtype float32]
        [--config configs/base.py] [--loss_chunk N] [--restrict_ce_to_mask] [--remat dots]
        [--accumulation K] [--matmul] [--peak_tflops X]
    python -m distil_jax.bench infer [shape flags] [--latency_seq 128 --throughput_batch 64]
    python -m distil_jax.bench attention [shape flags] [--dtype bfloat16]
    python -m distil_jax.bench fit [shape flags] [--start 16 --bisect 2]
    python -m distil_jax.bench matmul [--size 4096 --dtype float32]
    python -m distil_jax.bench compare [shape flags]      (needs torch: the reference step)
    python -m distil_jax.bench data [--seq_len 512] [--vocab_size 30522] [--tokens 20000000]
        [--workers 1 2] [--micro_batch 32]                  (bench/data.py)
    python -m distil_jax.bench deploy [--models base|embedded] [--task feature-extraction]
        [--seq 128 --batch 32 --threads 2]       (needs the deploy extra; bench/deploy.py)
    python -m distil_jax.bench vocab [--pieces 250002 --student_layers 6]   (bench/vocab.py)

`train`: the real jitted train step (masking, teacher forward, student forward and
backward, the triple loss, clip + AdamW) on random tokens of the given shape: compile
time, median step time, tokens/s, sequences/s, model TFLOP/s (student fwd+bwd +
teacher fwd, metrics.py), MFU where the device's peak is known (or --peak_tflops), and
with --matmul the fraction of this machine's measured matmul rate; peak memory
(device peak bytes on GPU/TPU, XLA's compiled estimate and the process's peak RSS).
`infer`: forward latency (batch 1) and throughput of teacher and student on the same
inputs. `attention`: cuDNN flash attention against XLA's on a
right-padded batch (hidden states and gradients vs float32, time). `fit`: the largest micro-batch whose
train step compiles and runs on this device (each size tried in a process of its own).
`matmul`: a large jitted matrix product, the machine's practical FLOP/s.
`compare`: our step against the PyTorch reference step (bench/torch_reference.py:
transformers' BertForMaskedLM teacher without grad + DistilBertForMaskedLM student, the
reference's triple loss with KL over all non-pad rows, AdamW, clipping) on the same
shapes, timed in turn with ours, in this process or a child process of its own.
`data`: preparation end to end (in this process, and Beam with 1 and 2 workers) against
the tokenizer alone and against `datasets.map(num_proc=2)` + `save_to_disk`, on a Parquet
corpus of 20M tokens made from the embedded text; loader throughput and the padding
fraction with and without length grouping. `deploy`: teacher and student exported
(transformers and ONNX Runtime, fp32 and int8), latency and throughput interleaved.
"""

from __future__ import annotations

import argparse
import sys

from distil_jax import runtime
from distil_jax.bench import data as bench_data
from distil_jax.bench import deploy as bench_deploy
from distil_jax.bench import inference, step
from distil_jax.bench import vocab as bench_vocab
from distil_jax.bench.timing import emit, machine


def _model_flags(p) -> None:
    """The models' shapes (BERT-base and its 6-layer student by default)."""
    p.add_argument("--teacher_layers", type=int, default=12)
    p.add_argument("--student_layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=30522)


def _shape_flags(p) -> None:
    p.add_argument("--config", default="", help="a config file; the shape flags given apply on top")
    _model_flags(p)
    p.add_argument("--batch", type=int, default=0, help="sequences per micro-batch (default: "
                   "the config's, else 8)")
    p.add_argument("--seq", type=int, default=0, help="default: the config's, else 128")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported); "
                   "train: 0 compiles only (memory)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--teacher_dtype", default="", help="default: --dtype")
    p.add_argument("--loss_chunk", type=int, default=None, help="rows per block of the vocabulary terms; 0: one block")
    p.add_argument("--restrict_ce_to_mask", action="store_true")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    p.add_argument("--attention", default="", choices=("", "xla", "cudnn"))
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per update")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config change on top, e.g. --set student.attention_dropout=0.0 (repeatable)")
    p.add_argument("--peak_tflops", type=float, default=0.0)
    p.add_argument("--latency_seq", type=int, default=128)
    p.add_argument("--throughput_batch", type=int, default=64)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distil_jax.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "the jitted train step: time, tokens/s, TFLOP/s, MFU, memory"),
                        ("attention", "cuDNN vs XLA attention: errors against float32 XLA, time"),
                        ("infer", "teacher vs student forward latency and throughput"),
                        ("compare", "our train step vs the PyTorch reference step (needs torch)")):
        p = sub.add_parser(name, help=help_)
        _shape_flags(p)
        if name in ("train", "compare"):
            p.add_argument("--matmul", action="store_true", help="also measure the matmul rate")
            p.add_argument("--matmul_size", type=int, default=4096)
            p.add_argument("--pause", type=float, default=0.5, help="seconds of rest before each "
                           "timed step or matmul (lets the previous one's threads go idle)")
        if name == "compare":
            p.add_argument("--torch_process", default="same", choices=("same", "separate"),
                           help="same: the reference runs in this process, with this process's "
                           "malloc settings (runtime.keep_host_memory); separate: in a child process with the "
                           "system's malloc, as the reference's users run it")
    fit = sub.add_parser("fit", help="the largest micro-batch whose train step runs (doubling, then bisection)")
    _shape_flags(fit)
    fit.add_argument("--start", type=int, default=16, help="the first micro-batch tried")
    fit.add_argument("--max_batch", type=int, default=4096)
    fit.add_argument("--bisect", type=int, default=2, help="halvings of the gap after the first failure")
    fit.add_argument("--trial_timeout", type=float, default=600.0, help="seconds per size")
    mm = sub.add_parser("matmul", help="a large jitted matmul: the machine's practical FLOP/s")
    mm.add_argument("--size", type=int, default=4096)
    mm.add_argument("--dtype", default="float32")
    mm.add_argument("--steps", type=int, default=5)
    data = sub.add_parser("data", help="preparation (in-process, Beam workers) against the tokenizer alone "
                          "and datasets.map; loader throughput; padding (bench_data.py)")
    bench_data.add_flags(data)
    voc = sub.add_parser("vocab", help="student.vocab=prune on the embedded corpus: an XLM-R-shaped teacher's "
                         "parameters before and after (bench/vocab.py)")
    bench_vocab.add_flags(voc)
    dep = sub.add_parser("deploy", help="exported teacher and student: PyTorch and ONNX Runtime, fp32 and int8")
    _model_flags(dep)  # --models base
    bench_deploy.add_flags(dep)
    args = parser.parse_args(argv)
    if args.command != "data":  # as main.py does for the steps; its one arena would serialise the tokenizer
        runtime.keep_host_memory()
    if args.command == "deploy":
        return emit(bench_deploy.run(args))
    if args.command == "vocab":
        return emit(bench_vocab.run(args))
    if args.command == "data":
        for record in bench_data.run(args):
            emit({**record, **(machine() if record["bench"] == "data/tokenize" else {})})
        return
    if args.command == "fit":
        argv = sys.argv[1:] if argv is None else list(argv)
        return step.bench_fit(args, argv[argv.index("fit") + 1:])
    {"train": step.bench_train, "infer": inference.bench_infer, "matmul": step.bench_matmul,
     "attention": inference.bench_attention, "compare": step.bench_compare}[args.command](args)
