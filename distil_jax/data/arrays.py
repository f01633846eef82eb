"""In-memory datasets as batch iterators: epochs of seeded shuffles over arrays of rows.

`ShuffledBatches` serves the synthetic corpus (token ids) and the downstream tasks
(token ids, masks and labels): every array of the dict has one row per example, and
each micro-batch takes the same rows of all of them; this process gets its rows of each
global micro-batch (`rows`: their positions, parallel.process_rows; default all). The last
incomplete batch of an epoch is dropped.

A grain pipeline, as the prepared-shard loader's (data/loader.py): batch `i` of the run is
element `i` of a grain MapDataset, and grain's iterator state (the index of the next batch)
is what checkpoints save, so a restore gives the batches that would have come next.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import grain
import numpy as np

from distil_jax.data.types import DataError

MAX_EPOCHS = 100_000  # the pipeline is this long; epochs are counted by the batch index


class ShuffledBatches:
    """Epochs of seeded shuffles over `arrays` (name -> [examples, ...]); this process's rows only."""

    def __init__(self, arrays: Dict[str, np.ndarray], micro_batch_size: int, seed: int,
                 rows: Optional[np.ndarray] = None, shuffle: bool = True):
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise DataError(f"the arrays of a dataset must have one row per example; got {sizes}")
        n = next(iter(sizes.values()))
        if n < micro_batch_size:
            raise DataError(f"{n} examples cannot fill a micro batch of {micro_batch_size}: lower the "
                            "batch size or give more data")
        self._arrays, self._n, self._batch, self._seed, self._shuffle = arrays, n, micro_batch_size, seed, shuffle
        self._rows = np.arange(micro_batch_size) if rows is None else np.asarray(rows)
        self.batches_per_epoch = n // micro_batch_size
        self.sequences_per_epoch = self.batches_per_epoch * micro_batch_size
        self._order = None  # (epoch, its order of the examples)
        dataset = grain.MapDataset.range(MAX_EPOCHS * self.batches_per_epoch).map(self._load)
        # In memory: batches are read in the caller's thread, nothing prefetched.
        self._iter = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()

    def _epoch_order(self, epoch: int) -> np.ndarray:
        # numpy's permutation, not grain's shuffle (it seeds epoch e with seed + e: seeds 1 apart share orders).
        cached = self._order
        if cached is None or cached[0] != epoch:
            cached = self._order = (epoch, np.random.default_rng((self._seed, epoch)).permutation(self._n)
                                    if self._shuffle else np.arange(self._n))
        return cached[1]

    def global_rows(self, index: int) -> np.ndarray:
        """Example indices of global micro-batch `index` (all processes' rows)."""
        epoch, b = divmod(int(index), self.batches_per_epoch)
        return self._epoch_order(epoch)[b * self._batch: (b + 1) * self._batch]

    def _load(self, index: int) -> Dict[str, np.ndarray]:
        rows = self.global_rows(index)[self._rows]
        return {k: v[rows] for k, v in self._arrays.items()}

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        return next(self._iter)

    # The interface every batch iterator has (see distil_jax/data/__init__.py).
    def get_state(self) -> Dict[str, Any]:
        return dict(self._iter.get_state())

    def set_state(self, state: Dict[str, Any]) -> None:
        """A state from `get_state`; or one of the {epoch, position} this class saved before
        it was a grain pipeline (the same batch: position `position` of epoch `epoch`)."""
        if "next_index" not in state:
            state = {"next_index": int(state["epoch"]) * self.batches_per_epoch + int(state["position"])}
        self._iter.set_state(dict(state))

    @property
    def next_batch_index(self) -> int:
        return int(self._iter.get_state()["next_index"])
