# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154  # out is the caller's; base, limit and py are for it
# Sourced by gpu.sh and tpu.sh: OUT (emptied), the compilation cache, and `bench ARGS...`,
# which runs `python -m distil_jax.bench ARGS...` under a time limit, appends its JSON lines
# to OUT and prints the end of a failed command's error instead of stopping the script.
# PYTHON names the interpreter (default python); BENCH_TIME_LIMIT the seconds a command may take.
mkdir -p "$(dirname "$out")"
: >"$out"
# The one H200 run so far (BENCHMARKS.md "GPU and TPU") saw the base step's XLA compile take
# longer than 170 s, so the default limit leaves room; the cache keeps each compiled program
# for the next command or run of the same shapes.
limit=${BENCH_TIME_LIMIT:-1200}
py=${PYTHON:-python}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/distil_jax/xla}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}
base=(--teacher_layers 12 --student_layers 6 --hidden 768 --heads 12 --ffn 3072 --vocab 30522 --seq 512)

bench() {
  echo "+ [$(date +%T)] python -m distil_jax.bench $*" >&2
  local log status
  log=$(mktemp)
  timeout "$limit" "$py" -m distil_jax.bench "$@" 2>"$log" | grep '^{' | tee -a "$out"
  status=${PIPESTATUS[0]}
  ((status == 0)) || { echo "  failed (status $status):" >&2; tail -n 5 "$log" >&2; }
  rm -f "$log"
}
