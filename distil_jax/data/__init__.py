"""Data for the train step: iterators of micro-batches and what the masking needs to know.

sources.py (TFDS, Parquet, `datasets`, text files, the embedded corpus; each cut into
units) -> prepare.py (the tokenizer, then a Beam pipeline over the units: beam_pipeline.py)
-> shards.py (one unit tokenized, packed, split, filtered and written) -> loader.py (grain,
length-grouped batches); synthetic.py is a fixed corpus without files, for tests and smoke
runs; types.py holds VocabInfo, DataError and the iterator protocol.

Every source yields dicts of int32 numpy arrays `input_ids` and `attention_mask` of
shape [len(rows), seq] (this process's rows of each global batch),
and has `get_state()` / `set_state()` so that the checkpoint resumes it exactly.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np
from etils import epy

from distil_jax import storage
from distil_jax.data.shards import load_npy
from distil_jax.data.synthetic import SyntheticCorpus
from distil_jax.data.tokenizer import load_tokenizer, special_ids
from distil_jax.data.types import BatchIterator, DataError, VocabInfo

# Lazily: a preparation worker imports this package for shards.py alone, and JAX and
# grain are most of the package's import time.
with epy.lazy_imports():
    from jax.experimental import multihost_utils

    from distil_jax.data import loader as loader_lib
    from distil_jax.data import prepare as prepare_lib
    from distil_jax.data import vocab_prune

__all__ = ["BatchIterator", "DataError", "VocabInfo", "make_data", "next_update", "prepared_dir"]


def prepared_dir(config, workdir: str) -> str:
    return prepare_lib.prepared_dir(config, workdir)


def block_rows(process_index: int, process_count: int, micro_batch_size: int) -> np.ndarray:
    """Process `process_index`'s equal block of the rows of a global micro-batch."""
    if micro_batch_size % process_count:
        raise DataError(f"micro batch {micro_batch_size} is not divisible by {process_count} processes")
    local = micro_batch_size // process_count
    return np.arange(process_index * local, (process_index + 1) * local)


def make_data(config, split: str, micro_batch_size: int, process_index: int = 0,
              process_count: int = 1, vocab_size: Optional[int] = None, workdir: str = "",
              keep_together: int = 1, rows: Optional[np.ndarray] = None, pad_id: Optional[int] = None):
    """(iterator, VocabInfo) for `config.data` and split 'train' or 'eval': process
    `process_index` of `process_count`, reading `rows` of each global micro-batch (their
    positions: parallel.process_rows; default the process's block of them). `vocab_size`
    and `pad_id` are the teacher's (its ids, before any pruning).

    With student.vocab='prune' the batches and the VocabInfo are in the kept vocabulary's
    ids (vocab_prune.py: VocabInfo.kept, the pruned tokenizer), remapped as they are read.

    With source 'corpus' a single process prepares the sources first when they are not
    yet; a run of several processes reads a directory prepared beforehand (mode prepare)
    and stops with that command when there is none. `keep_together` consecutive micro-batches (an
    update's) come from one length group."""
    if rows is None:
        rows = block_rows(process_index, process_count, micro_batch_size)
    if config.data.source == "synthetic":
        corpus = SyntheticCorpus(vocab_size=vocab_size, seq_len=config.data.seq_len,
                                 **config.data.synthetic.to_dict())
        it = corpus.batches(split, micro_batch_size, seed=config.train.seed, rows=rows)
        return it, corpus.vocab_info()
    if config.data.source == "corpus":
        return _corpus_data(config, split, micro_batch_size, process_index, process_count,
                            vocab_size, workdir, keep_together, rows, pad_id)
    raise DataError(f"data.source {config.data.source!r} is not one of: corpus, synthetic")


SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def next_update(data: BatchIterator, k: int, pad_id: int = 0) -> Dict[str, np.ndarray]:
    """The next `k` micro-batches stacked [k, rows, seq], each padded (pad id, attention
    mask 0) to the longest of them: one update's input (a task's labels: [k, rows, ...])."""
    micro = [next(data) for _ in range(k)]
    seq = max(m["input_ids"].shape[1] for m in micro)

    def pad(key, x):  # the token arrays [rows, seq]; labels [rows] as they are
        if key not in SEQUENCE_KEYS:
            return x
        return np.pad(x, [(0, 0), (0, seq - x.shape[1])], constant_values=pad_id if key == "input_ids" else 0)
    return {key: np.stack([pad(key, m[key]) for m in micro]) for key in micro[0]}


def _corpus_data(config, split, micro_batch_size, process_index, process_count, vocab_size, workdir,
                 keep_together, rows, pad_id):
    data_dir = prepared_dir(config, workdir)
    if process_count > 1 and not prepare_lib.is_prepared(data_dir):
        raise DataError(
            f"{data_dir} holds no prepared dataset, and a run of {process_count} processes does not tokenize a "
            "corpus behind a barrier. Prepare it once, from one machine: `python -m distil_jax.main "
            f"--config=<this config> --workdir={workdir} --config.mode=prepare` (the same data settings; "
            "data.prepare_workers or data.beam_options for more workers), then start this run again")
    error = None
    if process_index == 0:  # prepares (one process), or checks that the directory is of these inputs
        try:
            prepare_lib.prepare(config, data_dir, teacher_vocab_size=vocab_size)
        except Exception as e:  # noqa: BLE001 - the other processes must hear of it, not wait forever
            error = e
    if process_count > 1:
        failed = int(np.max(multihost_utils.process_allgather(np.int32(error is not None))))
        if failed and error is None:
            error = DataError(f"process 0 could not check the prepared data in {data_dir} (its log names why)")
    if error is not None:
        raise error
    tok_dir = storage.local_copy(storage.join(data_dir, "tokenizer"))
    tok = load_tokenizer(tok_dir)
    d = config.data
    loader = loader_lib.BatchLoader(
        loader_lib.PreparedSplit(data_dir, split, vocab_size or len(tok)), micro_batch_size, config.train.seed,
        rows=rows, shuffle=split == "train",
        group_by_length=d.group_by_length and split == "train", group_window=d.group_window,
        pad_multiple=d.pad_multiple, length_buckets=tuple(d.length_buckets), pad_id=tok.pad_token_id,
        num_threads=d.num_threads, prefetch=d.prefetch,
        keep_together=keep_together if split == "train" else 1)
    counts = load_npy(storage.join(data_dir, "token_counts.npy"))
    info = VocabInfo(vocab_size=len(tok), pad_id=tok.pad_token_id, mask_id=tok.mask_token_id,
                     special_ids=special_ids(tok), token_counts=counts, tokenizer=tok,
                     tokenizer_dir=os.path.abspath(tok_dir))
    if config.student.vocab == "prune":
        extra = {} if pad_id is None else {"the model's pad": pad_id}
        kept, pruned, pruned_dir = vocab_prune.pruned_vocabulary(data_dir, tok, vocab_size or len(tok), extra,
                                                                 write=process_index == 0)
        info = vocab_prune.prune_vocab_info(info, kept, pruned, pruned_dir)
        return vocab_prune.RemappedBatches(loader, kept), info
    return loader, info
