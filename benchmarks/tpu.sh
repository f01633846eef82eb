#!/usr/bin/env bash
# The accelerator check on one Cloud TPU VM host (v4, v5e, v5p, v6e): benchmarks/gpu.sh's train
# step at BERT-base shapes (12 -> 6 layers, width 768, vocabulary 30,522, sequences of 512,
# random tokens) over every chip of this host, data parallel, 32 sequences per chip per
# micro-batch. XLA's attention (the TPU has no cuDNN; XLA fuses it).
#
#   pip install -e . -c launch/constraints-tpu.txt "jax[tpu]"
#   bash benchmarks/tpu.sh [OUT]             # unmeasured: no TPU was at hand (BENCHMARKS.md)
#
# One JSON line per measurement to OUT (default benchmarks/results/tpu.jsonl), then the tables
# (benchmarks/report.py): the bf16 matmul rate of one chip; bf16 compute with 1 and 16
# micro-batches per update, bf16 with attention dropout 0, float32 (the ratio's baseline):
# compile time, update time, tokens/s, TFLOP/s and MFU per chip (against the vendor's dense
# bf16 peak, metrics.PEAK_TFLOPS), the chip's peak memory; and the largest micro-batch that runs.
set -uo pipefail
out=${1:-benchmarks/results/tpu.jsonl}
# shellcheck source-path=SCRIPTDIR source=accelerator.sh
source "$(dirname "$0")/accelerator.sh"

chips=$("$py" -c 'import jax; print(jax.local_device_count())')
batch=$((32 * chips))

bench matmul --size 8192 --dtype bfloat16 --steps 10
bench train "${base[@]}" --dtype bfloat16 --batch "$batch" --steps 10
bench train "${base[@]}" --dtype float32 --batch "$batch" --steps 5
bench train "${base[@]}" --dtype bfloat16 --batch "$batch" --accumulation 16 --steps 3
bench train "${base[@]}" --dtype bfloat16 --set teacher.model.attention_dropout=0.0 --batch "$batch" --steps 10
bench fit "${base[@]}" --dtype bfloat16 --start $((64 * chips)) --bisect 0 --trial_timeout "$limit"
"$py" benchmarks/report.py "$out"
