"""The paper's recipe on paper: tokens, updates, model FLOPs and hours on a few machines.

    python launch/scaling.py [--mfu=0.4] [--tokens_per_word=1.3]

FLOPs per token are metrics.py's forward FLOPs, counted as the trainer's MFU counts them:
student forward + backward (3x forward) plus teacher forward, logits at every position
(the reference's L_ce covers every real token). The corpus size is the BERT paper's word count times an assumed WordPiece
ratio; `manifest.json` of a prepared corpus gives the real token count.

MFU per machine: measured where a results file (`--results`, default benchmarks/results/*.jsonl)
holds a `bench train` record of that device at the recipe's shapes (12 -> 6 layers, width 768,
seq 512, bf16; the best such record), else `--mfu`, labelled "assumed" in the table.
"""

import argparse
import glob
import json
import os

from distil_jax.metrics import PEAK_TFLOPS, forward_flops_per_token
from distil_jax.models import BertConfig
from distil_jax.train.student_init import student_config_from_teacher

V100_FP32_TFLOPS = 15.7  # V100 SXM2 without tensor cores
MACHINES = (("8 x V100 (paper)", 8, "V100"), ("8 x H100", 8, "H100"),
            ("TPU v4-32 (16 chips)", 16, "TPU v4"), ("TPU v5e-64 (64 chips)", 64, "TPU v5e"))


def measured_mfu(paths, device: str):
    """The highest MFU of a bf16 `bench train` record on `device` at the recipe's shapes, or None."""
    best = None
    for path in paths:
        for line in open(path, encoding="utf-8"):
            r = json.loads(line) if line.startswith("{") else {}
            if (r.get("bench") == "train" and device.lower() in str(r.get("device", "")).lower()
                    and (r.get("teacher_layers"), r.get("student_layers"), r.get("hidden"), r.get("seq"),
                         r.get("dtype")) == (12, 6, 768, 512, "bfloat16") and r.get("mfu")):
                best = max(best or 0.0, r["mfu"])
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed MFU of the modern machines")
    parser.add_argument("--tokens_per_word", type=float, default=1.3)
    parser.add_argument("--words", type=float, default=3.3e9, help="BookCorpus 0.8B + Wikipedia 2.5B")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4096, help="sequences per update")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--results", nargs="*", default=None, help="bench JSON lines files "
                        "(default: benchmarks/results/*.jsonl)")
    args = parser.parse_args()
    if args.results is None:
        here = os.path.dirname(os.path.abspath(__file__))
        args.results = sorted(glob.glob(os.path.join(here, "..", "benchmarks", "results", "*.jsonl")))

    teacher = BertConfig(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                         intermediate_size=3072, max_position_embeddings=512)
    student = student_config_from_teacher(teacher, num_layers=6)
    student_part = 3 * forward_flops_per_token(student, args.seq_len)
    per_token = student_part + forward_flops_per_token(teacher, args.seq_len)
    tokens = args.epochs * args.words * args.tokens_per_word
    per_update = args.batch * args.seq_len
    total = tokens * per_token
    paper_mfu = total / (90 * 3600 * 8 * PEAK_TFLOPS["V100"] * 1e12)
    print(f"model FLOPs per token: {per_token / 1e9:.3f} G (student fwd+bwd {student_part / 1e9:.3f} G, "
          f"teacher fwd {(per_token - student_part) / 1e9:.3f} G)")
    print(f"tokens per update: {per_update / 1e6:.2f} M positions ({args.batch} x {args.seq_len}); "
          f"{tokens / 1e9:.1f} B tokens in {args.epochs} epochs: {tokens / per_update:,.0f} updates "
          f"of full sequences; {total:.2e} FLOPs in all")
    print(f"the paper's 90 h on 8 x V100 imply an MFU of {paper_mfu:.1%} of the fp16 tensor-core "
          f"peak ({PEAK_TFLOPS['V100']:g} TFLOP/s), {paper_mfu * PEAK_TFLOPS['V100'] / V100_FP32_TFLOPS:.0%} "
          f"of the fp32 peak ({V100_FP32_TFLOPS} TFLOP/s)")
    print("| machine | 16-bit peak, PFLOP/s | MFU | MFU from | hours |\n| --- | ---: | ---: | --- | ---: |")
    for name, chips, kind in MACHINES:
        measured = None if kind == "V100" else measured_mfu(args.results, kind)
        mfu, source = ((paper_mfu, "the paper's 90 h") if kind == "V100" else
                       (measured, "measured (bench train, one device)") if measured else (args.mfu, "**assumed**"))
        hours = total / (chips * PEAK_TFLOPS[kind] * 1e12 * mfu) / 3600
        print(f"| {name} | {chips * PEAK_TFLOPS[kind] / 1e3:.2f} | {mfu:.1%} | {source} | {hours:.1f} |")


if __name__ == "__main__":
    main()
