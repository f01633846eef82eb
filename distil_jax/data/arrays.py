"""In-memory datasets as batch iterators: epochs of seeded shuffles over arrays of rows.

`ShuffledBatches` serves the synthetic corpus (token ids) and the downstream tasks
(token ids, masks and labels): every array of the dict has one row per example, and
each micro-batch takes the same rows of all of them; this process gets its rows of each
global micro-batch (`rows`: their positions, parallel.process_rows; default all). The last incomplete batch of an epoch is dropped; its state
(epoch, position) resumes it exactly.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from distil_jax.data.types import DataError


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
        self._epoch, self._position, self._order = 0, 0, None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            self._order = (np.random.default_rng((self._seed, self._epoch)).permutation(self._n)
                           if self._shuffle else np.arange(self._n))
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        if self._position >= self.batches_per_epoch:
            self._epoch, self._position, self._order = self._epoch + 1, 0, None
        rows = self._epoch_order()[self._position * self._batch + self._rows]
        self._position += 1
        return {k: v[rows] for k, v in self._arrays.items()}

    def get_state(self) -> Dict[str, Any]:
        return {"epoch": self._epoch, "position": self._position}

    def set_state(self, state: Dict[str, Any]) -> None:
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._order = None
