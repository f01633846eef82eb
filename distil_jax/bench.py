"""Benchmarks, one JSON object per line on stdout.

    python -m distil_jax.bench data [--seq_len 512] [--vocab_size 30522] [--micro_batch 32]

`data`: tokenizer throughput (the multi-threaded Rust tokenizer on all cores),
preparation throughput, loader throughput (tokens delivered per second by the grain
loader, real and padded) and the padding fraction with and without length grouping,
all on the embedded corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _machine() -> dict:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}


def bench_data(args) -> None:
    import numpy as np

    from distil_jax.config import defaults
    from distil_jax.data.loader import BatchLoader, PreparedSplit, epoch_indices, plan_batches
    from distil_jax.data.prepare import prepare
    from distil_jax.data.sources import EmbeddedSource
    from distil_jax.data.tokenizer import train_wordpiece

    docs = list(EmbeddedSource().documents("train"))
    start = time.perf_counter()
    tok = train_wordpiece(docs, vocab_size=args.vocab_size)
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    encoded = tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(e.ids) for e in encoded)
    _emit({"bench": "data/tokenize", "documents": len(docs), "tokens": tokens, "seconds": seconds,
           "tokens_per_s": tokens / seconds, "documents_per_s": len(docs) / seconds,
           "tokenizer_train_s": train_s, "vocab_size": len(tok), **_machine()})

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = os.path.join(tmp, "tokenizer")
        tok.save_pretrained(tok_dir)
        c = defaults()
        c.data.update(seq_len=args.seq_len, tokenizer=tok_dir)
        start = time.perf_counter()
        manifest = prepare(c, os.path.join(tmp, "data"), progress=False)
        seconds = time.perf_counter() - start
        n_tokens = manifest["splits"]["train"]["embedded"]["tokens"]
        _emit({"bench": "data/prepare", "seconds": seconds, "tokens": n_tokens,
               "tokens_per_s": n_tokens / seconds, "seq_len": args.seq_len})

        split = PreparedSplit(os.path.join(tmp, "data"), "train")
        for grouped in (True, False):
            rng = np.random.default_rng(0)
            plan = plan_batches(epoch_indices(split.ranges, split.weights, rng, True), split.lengths,
                                args.micro_batch, rng, grouped, window=64, shuffle=True)
            real = split.lengths[plan].sum()
            padded = sum(-(-int(split.lengths[b].max()) // 8) * 8 * len(b) for b in plan)
            _emit({"bench": "data/padding", "group_by_length": grouped, "micro_batch": args.micro_batch,
                   "padding_fraction": 1 - real / padded, "seq_len": args.seq_len})

        loader = BatchLoader(split, args.micro_batch, seed=0, num_threads=args.threads,
                             prefetch=args.prefetch)
        next(loader)  # start the threads
        start, real, padded = time.perf_counter(), 0, 0
        for _ in range(args.batches):
            batch = next(loader)
            real += int(batch["attention_mask"].sum())
            padded += batch["input_ids"].size
        seconds = time.perf_counter() - start
        _emit({"bench": "data/loader", "batches": args.batches, "micro_batch": args.micro_batch,
               "seconds": seconds, "tokens_per_s": real / seconds, "padded_tokens_per_s": padded / seconds,
               "sequences_per_s": args.batches * args.micro_batch / seconds, "threads": args.threads})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distil_jax.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="tokenizer, preparation and loader throughput; padding")
    data.add_argument("--seq_len", type=int, default=512)
    data.add_argument("--vocab_size", type=int, default=30522)
    data.add_argument("--micro_batch", type=int, default=32)
    data.add_argument("--batches", type=int, default=200)
    data.add_argument("--threads", type=int, default=2)
    data.add_argument("--prefetch", type=int, default=8)
    args = parser.parse_args(argv)
    {"data": bench_data}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
