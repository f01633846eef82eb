"""`python -m distil_jax.bench data`: preparation against its tokenizer and its usual peer.

On a Parquet corpus of at least --tokens tokens made from the embedded text (its
documents, repeated; 8 files, row groups of 10,000), with a WordPiece of --vocab_size
trained on it, all in one run:
- `data/tokenize`: the tokenizer alone (`encode_batch`, its own threads on every core)
  over three copies of the embedded corpus, the fastest of three passes: the rate
  preparation is held to;
- `data/prepare`: mode prepare end to end (read, tokenize, split, filter, count, write
  ArrayRecord shards and the manifest): in this process (`workers` 0: the in-process path,
  with the tokenizer's threads), and as a Beam pipeline on the DirectRunner with 1 and
  with 2 worker processes (`--workers`);
- `data/datasets_map`: the usual alternative, `datasets.load_dataset("parquet")`, then
  `Dataset.map(batched=True, num_proc=2)` with the same tokenizer and the same split and
  filter rules (shards.split_and_filter), then `save_to_disk`;
- `data/padding` and `data/loader`: the padding fraction with and without length grouping,
  and the grain loader's rate, on the prepared corpus.
`--tokens 0` skips the corpus above and measures on the embedded corpus once (the tests).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Callable, Dict, List

import numpy as np
from etils import epy

from distil_jax.config import defaults
from distil_jax.data.loader import BatchLoader, PreparedSplit, epoch_indices, plan_batches
from distil_jax.data.prepare import prepare
from distil_jax.data.shards import ENCODE_BATCH, split_and_filter
from distil_jax.data.sources import EmbeddedSource
from distil_jax.data.tokenizer import train_wordpiece

with epy.lazy_imports():
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

FILES = 8


def add_flags(p) -> None:
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--vocab_size", type=int, default=30522)
    p.add_argument("--tokens", type=int, default=20_000_000, help="corpus size (0: the embedded corpus once)")
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="Beam worker processes to time")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="also time datasets.map + save_to_disk")
    p.add_argument("--micro_batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=8)


def write_corpus(docs: List[str], tokens_per_copy: int, tokens: int, directory: str) -> int:
    """The documents repeated to at least `tokens` tokens, in FILES Parquet files; the rows."""
    rows = docs * max(1, -(-tokens // tokens_per_copy))
    per = -(-len(rows) // FILES)
    for k in range(FILES):
        pq.write_table(pa.table({"text": rows[k * per:(k + 1) * per]}),
                       os.path.join(directory, f"part-{k:02d}.parquet"), row_group_size=10_000)
    return len(rows)


def _timed(run: Callable[[], Dict]) -> tuple:
    start = time.perf_counter()
    out = run()
    return out, time.perf_counter() - start


def run(args) -> List[Dict]:
    records = []
    docs = list(EmbeddedSource().documents("train"))
    tok, train_s = _timed(lambda: train_wordpiece(docs, vocab_size=args.vocab_size))
    per_copy = sum(len(e.ids) for e in tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False))
    # The tokenizer alone at its best: all its threads, calls of ENCODE_BATCH documents (the
    # size preparation uses) over three copies of the corpus, the fastest of three passes.
    def three_copies():
        for _ in range(3):
            for i in range(0, len(docs), ENCODE_BATCH):
                tok.backend_tokenizer.encode_batch(docs[i:i + ENCODE_BATCH], add_special_tokens=False)
    seconds = min(_timed(three_copies)[1] for _ in range(3))
    records.append({"bench": "data/tokenize", "documents": 3 * len(docs), "tokens": 3 * per_copy, "seconds": seconds,
                    "tokens_per_s": 3 * per_copy / seconds, "documents_per_s": 3 * len(docs) / seconds,
                    "tokenizer_train_s": train_s, "vocab_size": len(tok), "cores": os.cpu_count()})
    tmp = tempfile.mkdtemp(prefix="distil_jax_bench_data_")
    try:
        tok_dir = os.path.join(tmp, "tokenizer")
        tok.save_pretrained(tok_dir)
        c = defaults()
        c.mode = "pretrain"
        c.data.update(seq_len=args.seq_len, tokenizer=tok_dir)
        if args.tokens:
            os.makedirs(os.path.join(tmp, "parquet"))
            rows = write_corpus(docs, per_copy, args.tokens, os.path.join(tmp, "parquet"))
            c.data.sources = {"corpus": {"kind": "parquet", "files": [os.path.join(tmp, "parquet", "*.parquet")],
                                         "eval_percent": 1}}
            runs = [0] + list(args.workers)
        else:
            rows, runs = len(docs), [0]
        prepared = ""
        for workers in runs:
            out = os.path.join(tmp, f"prepared_{workers}")
            c.data.prepare_workers = workers or 1
            c.data.beam_options = (() if not workers else
                                   ("--runner=DirectRunner", "--direct_running_mode=multi_processing",
                                    f"--direct_num_workers={workers}"))
            manifest, seconds = _timed(lambda: prepare(c, out, progress=False))
            n = sum(s["tokens"] for split in manifest["splits"].values() for s in split.values())
            records.append({"bench": "data/prepare", "runner": "in_process" if not workers else "beam_direct",
                            "workers": workers, "seconds": seconds, "tokens": n, "rows": rows,
                            "tokens_per_s": n / seconds, "seq_len": args.seq_len})
            if prepared:
                shutil.rmtree(out)
            else:
                prepared = out
        if args.tokens and args.peer:
            records.append(_datasets_map(tok, os.path.join(tmp, "parquet"), args.seq_len, os.path.join(tmp, "hf")))
        records += _loader_records(prepared, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return records


def _datasets_map(tok, parquet_dir: str, seq_len: int, out: str) -> Dict:
    """The peer: `datasets` map with num_proc=2 and save_to_disk, the same rules."""
    cls, sep, unk = tok.cls_token_id, tok.sep_token_id, tok.unk_token_id

    def tokenize(batch):
        ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [seq.tolist() for doc in ids for seq in split_and_filter(doc, seq_len, cls, sep, unk)[0]]}

    def whole():
        ds = datasets.load_dataset("parquet", data_files=os.path.join(parquet_dir, "*.parquet"), split="train",
                                   cache_dir=out + "_cache")
        mapped = ds.map(tokenize, batched=True, batch_size=1000, num_proc=2, remove_columns=ds.column_names)
        mapped.save_to_disk(out)
        return mapped
    mapped, seconds = _timed(whole)
    n = int(sum(len(x) for x in mapped["input_ids"]))
    return {"bench": "data/datasets_map", "num_proc": 2, "seconds": seconds, "tokens": n,
            "tokens_per_s": n / seconds, "seq_len": seq_len}


def _loader_records(prepared: str, args) -> List[Dict]:
    records = []
    split = PreparedSplit(prepared, "train")
    for grouped in (True, False):
        rng = np.random.default_rng(0)
        plan = plan_batches(epoch_indices(split.ranges, split.weights, rng, True), split.lengths,
                            args.micro_batch, rng, grouped, window=64, shuffle=True)
        real = split.lengths[plan].sum()
        padded = sum(-(-int(split.lengths[b].max()) // 8) * 8 * len(b) for b in plan)
        records.append({"bench": "data/padding", "group_by_length": grouped, "micro_batch": args.micro_batch,
                        "padding_fraction": 1 - real / padded, "seq_len": args.seq_len})
    loader = BatchLoader(split, args.micro_batch, seed=0, num_threads=args.threads, prefetch=args.prefetch)
    next(loader)  # start the threads
    start, real, padded = time.perf_counter(), 0, 0
    for _ in range(args.batches):
        batch = next(loader)
        real += int(batch["attention_mask"].sum())
        padded += batch["input_ids"].size
    seconds = time.perf_counter() - start
    records.append({"bench": "data/loader", "batches": args.batches, "micro_batch": args.micro_batch,
                    "seconds": seconds, "tokens_per_s": real / seconds, "padded_tokens_per_s": padded / seconds,
                    "sequences_per_s": args.batches * args.micro_batch / seconds, "threads": args.threads})
    return records
