#!/usr/bin/env bash
# The accelerator check on one NVIDIA GPU (written for an H100 or H200; any CUDA GPU runs it).
# The real jitted train step (masking, teacher forward, student forward + backward, the triple
# loss, clipping, AdamW) at BERT-base shapes: a 12-layer teacher and its 6-layer student, width
# 768, vocabulary 30,522, sequences of 512 tokens, random tokens, micro-batches of 32 (the
# paper's 4K-sequence update is 8 GPUs x 16 micro-batches x 32).
#
#   pip install -e . "jax[cuda13]==$(python -c 'import jax; print(jax.__version__)')"
#   bash benchmarks/gpu.sh [OUT]             # its length is unmeasured: see BENCHMARKS.md "GPU"
#
# One JSON line per measurement goes to OUT (default benchmarks/results/gpu.jsonl), then the
# tables (benchmarks/report.py). What it prints, in order:
#   - matmul: an 8192^3 bfloat16 product, the card's practical rate (the ceiling MFU is read against);
#   - attention: the student's encoder with cuDNN flash attention against XLA's on a right-padded
#     batch: hidden states and gradients as relative errors against float32 XLA (the cuDNN row
#     should match the bf16 XLA row's error, about 1e-2), and forward + backward time;
#   - train rows: compile time, the median update time, tokens/s, model TFLOP/s per device, MFU
#     (against the vendor's dense bf16 peak, metrics.PEAK_TFLOPS), the device's peak memory, and
#     the ratio of tokens/s to the float32 step with XLA attention (JAX's default float32 matmul
#     precision, TF32 on the matrix units) for
#       bf16 compute + cuDNN flash attention, 1 micro-batch per update and 16,
#       the same with attention dropout 0 (the student's training attention also goes to cuDNN:
#       with dropout on the probabilities it takes the explicit softmax),
#       bf16 with XLA attention (separates the dtype's gain from the kernel's), float32 with XLA;
#   - fit: the largest micro-batch whose bf16 + cuDNN step runs (doubling from 128).
# A row whose command failed is missing, and the failure is printed (each command has a time limit).
set -uo pipefail
out=${1:-benchmarks/results/gpu.jsonl}
# Let the fit search use the card's memory, not JAX's default 75% preallocation.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
# shellcheck source-path=SCRIPTDIR source=accelerator.sh
source "$(dirname "$0")/accelerator.sh"

fast=(--dtype bfloat16 --attention cudnn)
no_attention_dropout=(--set teacher.model.attention_dropout=0.0)  # the student copies the teacher's

bench matmul --size 8192 --dtype bfloat16 --steps 10
bench attention "${base[@]}" --dtype bfloat16 --batch 32 --steps 10
bench train "${base[@]}" "${fast[@]}" --batch 32 --steps 10
bench train "${base[@]}" --dtype float32 --attention xla --batch 32 --steps 5
bench train "${base[@]}" "${fast[@]}" --batch 32 --accumulation 16 --steps 3
bench train "${base[@]}" "${fast[@]}" "${no_attention_dropout[@]}" --batch 32 --steps 10
bench train "${base[@]}" --dtype bfloat16 --attention xla --batch 32 --steps 5
bench fit "${base[@]}" "${fast[@]}" --start 128 --bisect 0 --trial_timeout "$limit"
"$py" benchmarks/report.py "$out"
