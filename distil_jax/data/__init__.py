"""Data for the train step: iterators of micro-batches and what the masking needs to know.

sources.py (TFDS, text files, the embedded corpus) -> tokenizer.py -> prepare.py
(tokenized, split and filtered shards) -> loader.py (grain, length-grouped batches);
synthetic.py is a fixed corpus without files, for tests and smoke runs.

Every source yields dicts of int32 numpy arrays `input_ids` and `attention_mask` of
shape [micro_batch // process_count, seq] (this process's rows of each global batch),
and has `get_state()` / `set_state()` so that the checkpoint resumes it exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from typing import Any, Dict, Optional, Protocol, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class VocabInfo:
    """What the step needs to know of the tokenizer and the corpus."""

    vocab_size: int
    pad_id: int
    mask_id: int
    special_ids: Tuple[int, ...]
    token_counts: np.ndarray  # [vocab_size], for the masking's smoothing
    tokenizer: Any = None  # saved with exports when known


class BatchIterator(Protocol):
    sequences_per_epoch: int

    def __next__(self) -> Dict[str, np.ndarray]: ...

    def get_state(self) -> Dict[str, Any]: ...

    def set_state(self, state: Dict[str, Any]) -> None: ...


def make_data(config, split: str, micro_batch_size: int, process_index: int = 0,
              process_count: int = 1, vocab_size: Optional[int] = None, workdir: str = ""):
    """(iterator, VocabInfo) for `config.data` and split 'train' or 'eval'.

    With source 'corpus' the sources are prepared first when they are not yet (process 0
    prepares; the others wait for it)."""
    if config.data.source == "synthetic":
        from distil_jax.data.synthetic import SyntheticCorpus
        corpus = SyntheticCorpus(vocab_size=vocab_size, seq_len=config.data.seq_len,
                                 **config.data.synthetic.to_dict())
        it = corpus.batches(split, micro_batch_size, seed=config.train.seed,
                            process_index=process_index, process_count=process_count)
        return it, corpus.vocab_info()
    if config.data.source == "corpus":
        return _corpus_data(config, split, micro_batch_size, process_index, process_count,
                            vocab_size, workdir)
    raise ValueError(f"data.source {config.data.source!r} is not one of: corpus, synthetic")


def prepared_dir(config, workdir: str, process: int = 0) -> str:
    """Where the tokenized corpus lives: data.dir, else WORKDIR/data.

    A workdir on a bucket (gs://...) cannot hold it (preparation and the loader use local
    files): then every process keeps its own copy on its host, under the temp dir and
    named by the workdir, and prepares it itself (`per_process_data`). Set data.dir to a
    directory every host sees (NFS, a gcsfuse mount) to prepare once.
    """
    if config.data.dir:
        return config.data.dir
    if per_process_data(config, workdir):
        key = hashlib.sha256(workdir.encode()).hexdigest()[:16]
        return os.path.join(tempfile.gettempdir(), "distil_jax_data", key, f"process_{process}")
    return os.path.join(workdir, "data")


def per_process_data(config, workdir: str) -> bool:
    return not config.data.dir and "://" in workdir


def _corpus_data(config, split, micro_batch_size, process_index, process_count, vocab_size, workdir):
    from distil_jax.data.loader import BatchLoader, PreparedSplit
    from distil_jax.data.prepare import prepare
    from distil_jax.data.tokenizer import load_tokenizer, special_ids

    data_dir = prepared_dir(config, workdir, process_index)
    if process_index == 0 or per_process_data(config, workdir):
        prepare(config, data_dir, teacher_vocab_size=vocab_size)
    if process_count > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("distil_jax: data prepared")
    tok = load_tokenizer(os.path.join(data_dir, "tokenizer"))
    d = config.data
    loader = BatchLoader(
        PreparedSplit(data_dir, split), micro_batch_size, config.train.seed,
        process_index=process_index, process_count=process_count, shuffle=split == "train",
        group_by_length=d.group_by_length and split == "train", group_window=d.group_window,
        pad_multiple=d.pad_multiple, length_buckets=tuple(d.length_buckets), pad_id=tok.pad_token_id,
        num_threads=d.num_threads, prefetch=d.prefetch,
        # accumulate="scan" stacks an update's micro-batches: keep them in one length group.
        keep_together=(config.train.batch_size // config.train.micro_batch_size
                       if config.train.accumulate == "scan" and split == "train" else 1))
    counts = np.load(os.path.join(data_dir, "token_counts.npy"))
    info = VocabInfo(vocab_size=len(tok), pad_id=tok.pad_token_id, mask_id=tok.mask_token_id,
                     special_ids=special_ids(tok), token_counts=counts, tokenizer=tok)
    return loader, info
