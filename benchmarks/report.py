"""Markdown tables from `python -m distil_jax.bench` JSON lines (what BENCHMARKS.md shows).

    python benchmarks/report.py benchmarks/results/cpu.jsonl
"""

import json
import sys


def _fmt(value, digits=3):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _table(rows, columns):
    out = ["| " + " | ".join(title for title, _ in columns) + " |",
           "| " + " | ".join("---" for _ in columns) + " |"]
    for r in rows:
        out.append("| " + " | ".join(_fmt(get(r)) for _, get in columns) + " |")
    return "\n".join(out)


def _range(values):
    return "–" if not values else f"{min(values):.2f}–{max(values):.2f}"


def _shape(r):
    return f"{r['teacher_layers']}→{r['student_layers']} × {r['hidden']}, V {r['vocab']}, {r['batch']}×{r['seq']}"


def _variant(r):
    extra = ", ".join(r.get("set") or [])
    return f"{r['dtype']}, {r['attention']} attention" + (f", {extra}" if extra else "")


def _accelerator(rows, fits) -> None:
    """The accelerator check (benchmarks/gpu.sh, tpu.sh): each step against the float32
    step with XLA attention of the same micro-batch and accumulation."""
    print(f"### Train step on `{rows[0]['device']}` ({rows[0]['num_devices']} device, jax {rows[0]['jax']})\n")

    def baseline(r):
        return next((b for b in rows if b["dtype"] == "float32" and b["attention"] == "xla" and not b.get("set")
                     and b["batch"] == r["batch"] and b["micro_batches_per_update"] == 1), None)

    print(_table(rows, [
        ("shape", _shape), ("compute", _variant), ("micro-batches per update", lambda r: r["micro_batches_per_update"]),
        ("compile s", lambda r: r["compile_s"]), ("update s", lambda r: r["step_s"]),
        ("tokens/s", lambda r: r["tokens_per_s"]), ("TFLOP/s per device", lambda r: r["model_tflops_per_device"]),
        ("MFU", lambda r: r["mfu"]), ("peak device GiB", lambda r: r["device_peak_gb"]),
        ("tokens/s ÷ float32 XLA", lambda r: (r["tokens_per_s"] / baseline(r)["tokens_per_s"]) if baseline(r) else None)]))
    print()
    for f in fits:
        print(f"Largest micro-batch ({f['seq']} tokens, {_variant(f)}): {f['largest_micro_batch']} "
              f"(first failure: {f['smallest_failed']}; tried {f['tried']}); at that size "
              f"{_fmt(f.get('tokens_per_s'))} tokens/s, MFU {_fmt(f.get('mfu'))}, peak {_fmt(f.get('device_peak_gb'))} GiB.\n")


def main(path):
    records = [json.loads(line) for line in open(path) if line.strip()]
    by = lambda name: [r for r in records if r["bench"] == name]  # noqa: E731
    machine = next((r for r in records if "jax" in r), records[0])
    print(f"Machine: {machine.get('cpus')} CPUs ({machine.get('machine')}), device `{machine.get('device')}`, "
          f"jax {machine.get('jax')}, Python {machine.get('python')}.\n")

    torch_rows, ours_rows = by("compare/torch"), by("compare/ours")
    if ours_rows:
        print("### Against the PyTorch reference step\n")
        pairs = list(zip(torch_rows, ours_rows))
        print(_table(pairs, [
            ("shape (teacher→student × width, vocab, batch×seq)", lambda p: _shape(p[1])),
            ("torch runs in", lambda p: f"{p[0].get('process', 'same')} process, malloc {p[0].get('malloc', '?')}"),
            ("torch step s", lambda p: p[0]["step_s"]), ("torch tokens/s", lambda p: p[0]["tokens_per_s"]),
            ("ours step s", lambda p: p[1]["step_s"]), ("ours tokens/s", lambda p: p[1]["tokens_per_s"]),
            ("speed-up", lambda p: p[1]["speedup_vs_torch"]),
            ("speed-up per round (min–max)", lambda p: _range(p[1].get("speedup_vs_torch_per_round"))),
            ("ours TFLOP/s", lambda p: p[1]["model_tflops_per_device"]),
            ("matmul TFLOP/s", lambda p: p[1].get("matmul_tflops")),
            ("fraction of matmul", lambda p: p[1].get("fraction_of_matmul"))]))
        print()

    accel = [r for r in by("train") if r["step_s"] and r.get("device", "cpu") != "cpu"]
    if accel:
        _accelerator(accel, by("fit"))
    train_rows = [r for r in by("train") if r["step_s"] and r.get("device", "cpu") == "cpu"]
    if train_rows:
        print("### Train step variants\n")
        print(_table(train_rows, [
            ("shape", _shape), ("malloc", lambda r: r.get("malloc", "system")),
            ("loss_chunk", lambda r: r["loss_chunk"]),
            ("restrict_ce_to_mask", lambda r: r["restrict_ce_to_mask"]), ("remat", lambda r: r["remat"]),
            ("micro-batches per update", lambda r: r.get("micro_batches_per_update", r.get("micro_batches_per_call"))),
            ("compile s", lambda r: r["compile_s"]), ("step s", lambda r: r["step_s"]),
            ("tokens/s", lambda r: r["tokens_per_s"]), ("TFLOP/s", lambda r: r["model_tflops_per_device"]),
            ("fraction of matmul", lambda r: r.get("fraction_of_matmul")),
            ("XLA temp GiB", lambda r: r["xla_temp_gb"])]))
        print()

    memory_rows = [r for r in by("train") if not r["step_s"]]
    if memory_rows:
        print("### Memory against the micro-batch (XLA's compiled temp allocation)\n")
        batches = sorted({r["batch"] for r in memory_rows})
        chunks = sorted({r["loss_chunk"] for r in memory_rows})
        cell = {(r["batch"], r["loss_chunk"]): r["xla_temp_gb"] for r in memory_rows}
        print(_table(batches, [("micro-batch × seq", lambda b: f"{b}×{memory_rows[0]['seq']}")] + [
            ("loss_chunk 0 GiB" if c == 0 else f"{c}-row blocks GiB", lambda b, c=c: cell.get((b, c)))
            for c in chunks]))
        print()

    for r in by("infer"):
        print("### Inference (teacher vs student, same inputs)\n")
        print(_table([r], [
            ("seq", lambda r: r["seq"]),
            ("teacher batch-1 ms", lambda r: r["teacher_latency_ms"]),
            ("student batch-1 ms", lambda r: r["student_latency_ms"]),
            ("latency speed-up", lambda r: r["latency_speedup"]),
            (f"teacher seq/s (batch {r['throughput_batch']})", lambda r: r["teacher_throughput_sequences_per_s"]),
            ("student seq/s", lambda r: r["student_throughput_sequences_per_s"]),
            ("throughput speed-up", lambda r: r["throughput_speedup"]),
            ("params teacher / student", lambda r: f"{r['teacher_params'] / 1e6:.1f}M / {r['student_params'] / 1e6:.1f}M")]))
        print()
    for r in by("attention"):
        print(f"### Attention kernels on `{r['device']}` ({r['layers']} layers × {r['hidden']}, "
              f"{r['batch']}×{r['seq']} right-padded, {r['dtype']}; errors against XLA attention in float32)\n")
        print(_table([n for n in ("xla", "cudnn") if f"{n}_fwd_bwd_ms" in r], [
            ("attention", lambda n: n), ("hidden-state rel. error", lambda n: r[f"{n}_hidden_rel_err"]),
            ("gradient rel. error", lambda n: r[f"{n}_grad_rel_err"]),
            ("forward + backward ms", lambda n: r[f"{n}_fwd_bwd_ms"])]))
        for n in ("xla", "cudnn"):
            if f"{n}_error" in r:
                print(f"\n{n}: {r[f'{n}_error']}")
        print()
    for r in by("matmul"):
        print(f"Matmul ({r['size']}² {r['dtype']}): {r['tflops']:.3f} TFLOP/s.\n")

    tokenize = next(iter(by("data/tokenize")), None)
    prepare_rows = by("data/prepare") + by("data/datasets_map")
    if tokenize and prepare_rows:
        print("### Data preparation (Parquet corpus made from the embedded text)\n")
        one = next((r for r in by("data/prepare") if r.get("workers") == 1), None)
        rows = [dict(tokenize, what="the tokenizer alone (all threads)")] + [
            dict(r, what=("datasets.map(num_proc=2) + save_to_disk" if r["bench"] == "data/datasets_map" else
                          "in this process" if not r.get("workers") else f"Beam DirectRunner, {r['workers']} worker{'s' if r['workers'] > 1 else ''}"))
            for r in prepare_rows]
        print(_table(rows, [
            ("run", lambda r: r["what"]), ("tokens", lambda r: r["tokens"]), ("seconds", lambda r: r["seconds"]),
            ("tokens/s", lambda r: r["tokens_per_s"]),
            ("÷ tokenizer alone", lambda r: r["tokens_per_s"] / tokenize["tokens_per_s"]),
            ("÷ one Beam worker", lambda r: r["tokens_per_s"] / one["tokens_per_s"] if one else None)]))
        print()


if __name__ == "__main__":
    main(sys.argv[1])
