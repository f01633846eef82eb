"""Batches from prepared shards: a grain pipeline, planned per epoch from a seed.

Each epoch is planned from (seed, epoch) alone: the mixture of sources (a source of weight
w contributes w times its sequences, sampled without replacement where w <= 1), a
shuffle, then length grouping (the reference's grouped sampler): windows of
`group_window` micro-batches are sorted by length and cut into micro-batches, whose order
is shuffled again. A batch is padded to its longest sequence rounded up to
`pad_multiple` (or to the next of `length_buckets`), decided on the *global* batch so that
every process pads alike; each process reads only its own rows.

grain runs the reads and padding on background threads; its iterator state (the index of
the next batch) is what checkpoints save, so a restore gives the batches that would
have come next.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from typing import Dict, Optional, Sequence

import grain
import numpy as np

from distil_jax import storage
from distil_jax.data.shards import FORMAT_VERSION, load_npy
from distil_jax.data.types import DataError

MAX_EPOCHS = 100_000  # the pipeline is this long; epochs are counted by the batch index


class PreparedSplit:
    """Random access to the sequences of one split of a prepared dataset (local, or a bucket
    mirrored to this host's disk once: ArrayRecord reads local files only)."""

    def __init__(self, data_dir: str, split: str, vocab_size: int = 0):
        path = storage.join(data_dir, "manifest.json")
        if not storage.exists(path):
            raise DataError(f"{data_dir} holds no prepared dataset (no manifest.json); run "
                            "`python -m distil_jax.main --config.mode=prepare` with the same config first")
        self.manifest = json.loads(storage.read_bytes(path))
        if self.manifest.get("format") != FORMAT_VERSION:
            raise DataError(f"{data_dir} was prepared by an older version of distil_jax (format "
                            f"{self.manifest.get('format')}, this one reads {FORMAT_VERSION}); prepare the corpus "
                            "again into a new data.dir")
        if vocab_size and self.manifest["max_id"] >= vocab_size:
            raise DataError(f"{data_dir} holds token id {self.manifest['max_id']}, beyond the model's vocabulary "
                            f"of {vocab_size}: it was prepared with another tokenizer than the teacher's. Prepare "
                            "the corpus with the teacher's tokenizer into another data.dir")
        self.dtype = np.dtype(self.manifest["dtype"])
        files, lengths, self.ranges, self.weights = [], [], {}, {}
        for name, info in self.manifest["splits"][split].items():
            start = sum(len(x) for x in lengths)
            for k in range(info["shards"]):
                rel = f"{split}/{name}/shard-{k:05d}"
                shard_lengths = load_npy(storage.join(data_dir, rel + ".lengths.npy"))
                if len(shard_lengths):
                    files.append(rel + ".array_record")
                    lengths.append(shard_lengths)
            self.ranges[name] = (start, sum(len(x) for x in lengths))
            self.weights[name] = info["weight"]
        if not lengths:
            raise DataError(f"the {split!r} split of {data_dir} has no sequences")
        self.lengths = np.concatenate(lengths)
        local = storage.local_copy(data_dir, files)
        self._records = grain.sources.ArrayRecordDataSource([os.path.join(local, f) for f in files])

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.frombuffer(self._records[int(index)], self.dtype)


def epoch_indices(ranges: Dict[str, tuple], weights: Dict[str, float], rng: np.random.Generator,
                  shuffle: bool) -> np.ndarray:
    """The sequences of one epoch: each source `weight` times over (sampled), then shuffled."""
    parts = []
    for name, (start, stop) in ranges.items():
        n, want = stop - start, int(round((stop - start) * weights.get(name, 1.0)))
        full, rest = divmod(want, n) if n else (0, 0)
        picked = [np.arange(start, stop)] * full
        if rest:
            picked.append(start + (rng.choice(n, rest, replace=False) if shuffle else np.arange(rest)))
        parts += picked
    indices = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return rng.permutation(indices) if shuffle else indices


def plan_batches(indices: np.ndarray, lengths: np.ndarray, batch: int, rng: np.random.Generator,
                 group_by_length: bool, window: int, shuffle: bool, keep_together: int = 1) -> np.ndarray:
    """[num_batches, batch] sequence indices; the last incomplete batch is dropped.

    The shuffle moves blocks of `keep_together` consecutive batches (1: single batches),
    so that the micro-batches one update stacks come from the
    same length group and pad to nearly the same length.
    """
    n = (len(indices) // batch) * batch
    if group_by_length:
        span = batch * max(window, 1)
        grouped = []
        for start in range(0, len(indices), span):
            chunk = indices[start: start + span]
            grouped.append(chunk[np.argsort(lengths[chunk], kind="stable")])
        indices = np.concatenate(grouped)
    batches = indices[:n].reshape(-1, batch)
    if shuffle and len(batches):
        blocks = [batches[i: i + keep_together] for i in range(0, len(batches), keep_together)]
        batches = np.concatenate([blocks[i] for i in rng.permutation(len(blocks))])
    return batches


def padded_length(longest: int, seq_len: int, pad_multiple: int, buckets: Sequence[int]) -> int:
    if buckets:
        for b in sorted(buckets):
            if b >= longest:
                return int(b)
    return int(min(seq_len, -(-longest // pad_multiple) * pad_multiple))


class BatchLoader:
    """This process's rows of each global micro-batch (`rows`: their positions,
    parallel.process_rows; default all), as int32 numpy arrays."""

    def __init__(self, split_data: PreparedSplit, micro_batch_size: int, seed: int, *,
                 rows: Optional[np.ndarray] = None, shuffle: bool = True,
                 group_by_length: bool = True, group_window: int = 64, pad_multiple: int = 8,
                 length_buckets: Sequence[int] = (), pad_id: int = 0, num_threads: int = 2,
                 prefetch: int = 8, keep_together: int = 1):
        self._data, self._batch, self._seed = split_data, micro_batch_size, seed
        self._rows = np.arange(micro_batch_size) if rows is None else np.asarray(rows)
        self._shuffle, self._group, self._window = shuffle, group_by_length, group_window
        self._keep_together = keep_together
        self._pad_multiple, self._buckets, self._pad_id = pad_multiple, tuple(length_buckets), pad_id
        self._seq_len = int(split_data.manifest["seq_len"])
        self._plan_lock = threading.Lock()
        self.batches_per_epoch = len(self._plan(0))
        if self.batches_per_epoch == 0:
            raise DataError(f"{len(split_data)} sequences cannot fill one micro batch of {micro_batch_size}")
        self.sequences_per_epoch = self.batches_per_epoch * micro_batch_size
        dataset = grain.MapDataset.range(MAX_EPOCHS * self.batches_per_epoch).map(self._load)
        self._iter = dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)).__iter__()

    @functools.lru_cache(maxsize=2)
    def _plan_cached(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng((self._seed, epoch))
        indices = epoch_indices(self._data.ranges, self._data.weights, rng, self._shuffle)
        return plan_batches(indices, self._data.lengths, self._batch, rng, self._group,
                            self._window, self._shuffle, self._keep_together)

    def _plan(self, epoch: int) -> np.ndarray:
        with self._plan_lock:
            return self._plan_cached(epoch)

    def global_rows(self, index: int) -> np.ndarray:
        """Sequence indices of global batch `index` (all processes' rows)."""
        epoch, b = divmod(int(index), self.batches_per_epoch)
        return self._plan(epoch)[b]

    def _load(self, index: int) -> Dict[str, np.ndarray]:
        rows = self.global_rows(index)
        length = padded_length(int(self._data.lengths[rows].max()), self._seq_len,
                               self._pad_multiple, self._buckets)
        ids = np.full((len(self._rows), length), self._pad_id, np.int32)
        mask = np.zeros((len(self._rows), length), np.int32)
        for i, row in enumerate(rows[self._rows]):
            seq = self._data[row]
            ids[i, : len(seq)] = seq
            mask[i, : len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        return next(self._iter)

    # The interface every batch iterator has (see distil_jax/data/__init__.py).
    def get_state(self) -> Dict:
        return dict(self._iter.get_state())

    def set_state(self, state: Dict) -> None:
        self._iter.set_state(dict(state))

    @property
    def next_batch_index(self) -> int:
        return int(self._iter.get_state()["next_index"])
