"""The train-step benchmarks: `train` (time, tokens/s, model TFLOP/s, MFU, memory), `fit`
(the largest micro-batch that runs), `matmul` (the machine's practical FLOP/s) and
`compare` (our step against the PyTorch reference step, interleaved)."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from distil_jax import parallel, runtime
from distil_jax.bench import torch_reference
from distil_jax.train import trainer
from distil_jax.config import config_file, defaults, with_changes
from distil_jax.data import next_update
from distil_jax.metrics import device_peak_tflops, train_flops_per_token
from distil_jax.train.step import compiled_step
from distil_jax.bench.timing import device_peak_gb, emit, interleaved, machine, median_seconds, peak_rss_gb


# --- shapes -> config ---------------------------------------------------------------
def shape_config(args):
    """A distillation config of the benchmark's shape (a random teacher, synthetic data),
    or --config's file with the shape flags that were given applied on top."""
    if args.config:
        c = config_file(args.config)
    else:
        c = defaults()
        c.teacher.model.update(num_layers=args.teacher_layers, hidden_size=args.hidden,
                               num_heads=args.heads, intermediate_size=args.ffn, vocab_size=args.vocab,
                               max_position_embeddings=max(512, args.seq))
        c.student.num_layers = args.student_layers
    c.teacher.path = ""  # a random teacher of the shape: nothing to download
    c.data.source = "synthetic"
    # --batch / --seq when given, else the config file's (or 8 x 128); compare reads them back.
    if args.config:  # the file's model sizes, for the record and for compare's torch models
        m = c.teacher.model
        args.teacher_layers, args.hidden, args.heads = m.num_layers, m.hidden_size, m.num_heads
        args.ffn, args.vocab, args.student_layers = m.intermediate_size, m.vocab_size, c.student.num_layers
    args.batch = args.batch or (c.train.micro_batch_size if args.config else 8)
    args.seq = args.seq or (c.data.seq_len if args.config else 128)
    accumulation = args.accumulation
    changes = {"data.seq_len": args.seq, "train.micro_batch_size": args.batch,
               "train.batch_size": args.batch * accumulation, "train.steps": 10 ** 6,
               "train.dtype": args.dtype, "teacher.dtype": args.teacher_dtype or args.dtype,
               "train.remat": args.remat, "train.attention": args.attention,
               "distill.restrict_ce_to_mask": args.restrict_ce_to_mask, "mesh.shape": (-1, 1, 1)}
    if args.loss_chunk is not None:
        changes["train.loss_chunk"] = args.loss_chunk
    changes.update(_settings(args.set))
    return with_changes(c, **changes)


def _settings(pairs) -> dict:
    """--set KEY=VALUE ... as config changes; a VALUE that is a Python literal is read as one."""
    changes = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set takes KEY=VALUE (a dotted config key), got {pair!r}")
        try:
            changes[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            changes[key] = text
    return changes


def _random_batch(config, vocab_size: int, rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab_size, size=(rows, config.data.seq_len)).astype(np.int32)
    ids[:, 0] = 2  # a [CLS]-like first token; every position is real (no padding)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def matmul_tflops(size: int = 4096, dtype: str = "float32", steps: int = 5) -> dict:
    """The machine's practical matmul rate: a jitted [size, size] @ [size, size]."""
    one, tflops = _matmul_timer(size, dtype)
    seconds, _ = median_seconds(one, steps)
    return {"bench": "matmul", "size": size, "dtype": dtype, "seconds": seconds, "tflops": tflops(seconds)}


def bench_matmul(args) -> None:
    emit({**matmul_tflops(args.size, args.dtype, args.steps), **machine()})


class _StepTimer:
    """The real jitted train step of `config`, compiled, on random tokens: `one()` runs one
    update to completion; `record(times)` turns update times into the benchmark's JSON."""

    def __init__(self, config, peak_tflops: float = 0.0, label: str = "train"):
        self.config, self.peak_tflops, self.label = config, peak_tflops, label
        self._tmp = tempfile.TemporaryDirectory()
        tr = self.trainer = trainer.build(config, self._tmp.name)
        state, _ = tr.restore_or_init()
        micro = config.train.micro_batch_size
        batches = iter([_random_batch(config, tr.model.config.vocab_size, micro, seed=i)
                        for i in range(tr.accumulation)])
        batch = parallel.global_batch(next_update(batches, tr.accumulation), tr.mesh)
        start = time.perf_counter()
        compiled = compiled_step(tr.model, tr.teacher, tr.tx, tr.schedule, tr.objective, tr.mesh,
                                 tr.state_shardings, tr.teacher_shardings).lower(
            state, tr.teacher_params, batch).compile()
        self.compile_s = time.perf_counter() - start
        self.memory = compiled.memory_analysis()
        holder = {"state": state}

        def one():
            holder["state"], metrics = compiled(holder["state"], tr.teacher_params, batch)
            jax.block_until_ready(metrics)
        self.one = one

    def close(self):
        self._tmp.cleanup()

    def record(self, times) -> dict:
        config, tr, memory = self.config, self.trainer, self.memory
        seconds = float(np.median(times)) if times else None  # no times: compile only
        seq, micro, per_call = config.data.seq_len, config.train.micro_batch_size, tr.accumulation
        tokens = per_call * micro * seq
        teacher_cfg = None if tr.teacher is None else tr.teacher.config
        flops = train_flops_per_token(tr.objective, tr.model.config, teacher_cfg, seq) * tokens
        tflops = flops / seconds / 1e12 / jax.device_count() if seconds else None
        peak = device_peak_tflops(self.peak_tflops)
        t = config.train
        return {"bench": self.label, "teacher_layers": None if teacher_cfg is None else teacher_cfg.num_layers,
                "student_layers": tr.model.config.num_layers, "hidden": tr.model.config.hidden_size,
                "vocab": tr.model.config.vocab_size, "batch": micro, "seq": seq,
                "micro_batches_per_update": per_call, "dtype": t.dtype,
                "loss_chunk": t.loss_chunk, "restrict_ce_to_mask": config.distill.restrict_ce_to_mask,
                "remat": t.remat, "attention": t.attention or "xla",
                "compile_s": self.compile_s, "step_s": seconds, "step_times_s": list(times),
                "tokens_per_s": tokens / seconds if seconds else None,
                "sequences_per_s": per_call * micro / seconds if seconds else None,
                "model_tflops_per_device": tflops, "mfu": tflops / peak if peak and tflops else None,
                "peak_tflops": peak, "model_gflop_per_step": flops / 1e9,
                "xla_temp_gb": memory.temp_size_in_bytes / 2**30 if memory else None,
                "xla_argument_gb": memory.argument_size_in_bytes / 2**30 if memory else None,
                "device_peak_gb": device_peak_gb(), "process_peak_rss_gb": peak_rss_gb(),
                "malloc": "keep" if runtime.host_memory_kept() else "system", **machine()}


def _matmul_timer(size: int = 4096, dtype: str = "float32"):
    """(one, tflops(seconds)): one jitted [size, size] @ [size, size], for interleaved timing."""
    a = jax.random.normal(jax.random.key(0), (size, size), getattr(jnp, dtype))
    b = jax.random.normal(jax.random.key(1), (size, size), getattr(jnp, dtype))
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    return (lambda: f(a, b).block_until_ready()), (lambda seconds: 2 * size ** 3 / seconds / 1e12)


def _timed_with_matmul(args, timer, others=None):
    """Our step (and `others`), and with --matmul the matmul rate, interleaved; returns
    (our record with the matmul fields, the other timers' times)."""
    timers = {"ours": timer.one, **(others or {})}
    if args.matmul:
        timers["matmul"], matmul_rate = _matmul_timer(args.matmul_size)
    times = interleaved(timers, args.steps, args.pause) if args.steps > 0 else {name: [] for name in timers}
    record = timer.record(times.pop("ours"))
    if args.matmul and record["step_s"]:
        rates = [matmul_rate(t) for t in times.pop("matmul")]
        rate = float(np.median(rates))
        record.update(matmul_tflops=rate, matmul_tflops_per_round=rates,
                      fraction_of_matmul=record["model_tflops_per_device"] / rate)
    return record, times


def bench_train(args) -> None:
    timer = _StepTimer(shape_config(args), args.peak_tflops)
    try:
        emit({**_timed_with_matmul(args, timer)[0], "set": args.set})
    finally:
        timer.close()


def _fits(argv, batch: int, timeout: float):
    """One `bench train` of micro-batch `batch` in a process of its own (a fresh device
    allocator): its record, or None when it ran out of memory (or failed otherwise: the
    reason is the stderr's last line)."""
    cmd = [sys.executable, "-m", "distil_jax.bench", "train", *argv, "--batch", str(batch), "--steps", "2"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and records:
        return records[-1], "ok"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    at = next((i for i in reversed(range(len(lines))) if "RESOURCE_EXHAUSTED" in lines[i]
               or "Out of memory" in lines[i]), None)
    if at is None:
        at = next((i for i in reversed(range(len(lines))) if re.match(r"^[\w.]*(Error|Exception)\b|.*\berror: ", lines[i])), None)
    if at is None:
        return None, f"exit status {proc.returncode}"
    reason = " ".join(line.strip() for line in lines[at:at + 2 if lines[at].endswith(":") else at + 1])
    return None, reason[-300:]


def bench_fit(args, argv) -> None:
    """The largest micro-batch whose train step compiles and runs: doubling from --start
    until a size fails, then --bisect halvings of the gap, each size in its own process."""
    shape_argv = _without(argv, ("--start", "--max_batch", "--bisect", "--trial_timeout", "--batch", "--steps"))
    tried, best, best_record, failed = {}, None, None, None
    batch = args.start
    while failed is None and batch <= args.max_batch:
        record, tried[batch] = _fits(shape_argv, batch, args.trial_timeout)
        if record is None:
            failed = batch
        else:
            best, best_record = batch, record
            batch *= 2
    for _ in range(args.bisect):
        if best is None or failed is None or failed - best <= 1:
            break
        batch = (best + failed) // 2
        record, tried[batch] = _fits(shape_argv, batch, args.trial_timeout)
        if record is None:
            failed = batch
        else:
            best, best_record = batch, record
    out = {"bench": "fit", "set": args.set, "largest_micro_batch": best, "smallest_failed": failed,
           "tried": {str(b): why for b, why in sorted(tried.items())}}
    if best_record:
        out.update({k: best_record.get(k) for k in ("teacher_layers", "student_layers", "hidden", "vocab", "seq",
                                                "dtype", "attention", "remat", "loss_chunk", "step_s",
                                                "tokens_per_s", "mfu", "device_peak_gb", "compile_s")})
    emit({**out, **machine()})


def _without(argv, flags):
    """argv less the given flags (and their values)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif not any(a.startswith(f + "=") for f in flags):
            out.append(a)
    return out


def bench_compare(args) -> None:
    """Ours and the reference step (and with --matmul the matmul) timed in turn, one of each
    per round (`timing.interleaved`); medians over the rounds, and the per-round speed-ups."""
    timer = _StepTimer(shape_config(args), args.peak_tflops, label="compare/ours")
    close = None
    try:
        if args.torch_process == "separate":
            ref_one, ref_record, close = torch_reference.separate_process_timer(args)
        else:
            ref_one, ref_record = torch_reference.step_timer(args)
        ours, times = _timed_with_matmul(args, timer, {"torch": ref_one})
        ref = ref_record(times["torch"])
    finally:
        timer.close()
        if close:
            close()
    if args.torch_process == "same":
        ref.update(process="same", malloc="keep" if runtime.host_memory_kept() else "system")
    ours["torch_process"] = args.torch_process
    ours["speedup_vs_torch"] = ours["tokens_per_s"] / ref["tokens_per_s"]
    ours["speedup_vs_torch_per_round"] = sorted(t / o for t, o in zip(ref["step_times_s"], ours["step_times_s"]))
    emit(ref)
    emit(ours)


