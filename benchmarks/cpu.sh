#!/usr/bin/env bash
# Every CPU measurement in BENCHMARKS.md, one JSON line each, into OUT (default
# benchmarks/results/cpu.jsonl). Run on an otherwise idle machine; about 25 minutes on 2 cores.
#   bash benchmarks/cpu.sh [OUT]
set -euo pipefail
out=${1:-benchmarks/results/cpu.jsonl}
mkdir -p "$(dirname "$out")"
: > "$out"
bench() { echo "+ python -m distil_jax.bench $*" >&2; python -m distil_jax.bench "$@" 2>/dev/null | grep '^{' >> "$out"; }

small=(--teacher_layers 4 --student_layers 2 --hidden 256 --heads 4 --ffn 1024 --vocab 8192)
base=(--teacher_layers 12 --student_layers 6 --hidden 768 --heads 12 --ffn 3072 --vocab 30522)

# The peer: the PyTorch reference step on the same shapes, timed in turn with ours and the
# matmul (the machine's rate). Twice: in this process (the same malloc settings as ours,
# runtime.keep_host_memory), and in a process of its own with the system's malloc (as its users run it).
for where in same separate; do
  bench compare "${small[@]}" --batch 16 --seq 128 --steps 7 --matmul --torch_process "$where"
  bench compare "${base[@]}" --batch 8 --seq 128 --steps 4 --matmul --torch_process "$where"
done
# What keeping host memory buys (runtime.keep_host_memory): the default step with malloc left as it is.
DISTIL_JAX_HOST_MALLOC=system bench train "${base[@]}" --batch 8 --seq 128 --steps 4 --matmul
bench train "${base[@]}" --batch 8 --seq 128 --steps 4 --matmul
# The fused vocabulary terms in one block of all rows vs blocks of 256 and 512 rows.
bench train "${base[@]}" --batch 8 --seq 128 --steps 3 --loss_chunk 0
bench train "${base[@]}" --batch 8 --seq 128 --steps 3 --loss_chunk 256
bench train "${base[@]}" --batch 8 --seq 128 --steps 3 --loss_chunk 512
bench train "${base[@]}" --batch 8 --seq 128 --steps 3 --restrict_ce_to_mask
bench train "${base[@]}" --batch 8 --seq 128 --steps 3 --remat dots
# Accumulation: an update of 4 micro-batches in one call.
bench train "${small[@]}" --batch 16 --seq 128 --steps 3 --accumulation 4
# Memory (XLA's compiled temp bytes) against the micro-batch, one block vs 512-row blocks.
for b in 4 8 16 32; do
  for chunk in 0 512; do
    bench train "${base[@]}" --batch "$b" --seq 128 --steps 0 --loss_chunk "$chunk"
  done
done
# Inference: the paper's batch-1 latency and a large-batch throughput.
bench infer "${base[@]}" --latency_seq 128 --throughput_batch 64 --steps 5
bench matmul --size 4096
# Data preparation: the tokenizer alone, in-process, Beam with 1 and 2 workers, datasets.map (20M tokens).
bench data
# Deployment (needs the deploy extra): the exported models in PyTorch and ONNX Runtime, fp32 and int8.
bench deploy --models base
bench deploy --models embedded --steps 40 --pause 0.05
# Vocabulary pruning: an XLM-R-shaped teacher and its student on the embedded corpus.
bench vocab
