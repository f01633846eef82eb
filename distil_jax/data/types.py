"""What the rest of the code base knows of the data: the vocabulary, the error, the iterator."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Protocol, Tuple

import numpy as np


class DataError(ValueError):
    """Bad data input; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class VocabInfo:
    """What the step needs to know of the tokenizer and the corpus."""

    vocab_size: int
    pad_id: int
    mask_id: int
    special_ids: Tuple[int, ...]
    token_counts: np.ndarray  # [vocab_size], for the masking's smoothing
    tokenizer: Any = None  # saved with exports when known
    tokenizer_dir: str = ""  # where it was loaded from (recorded in checkpoints)
    kept: Any = None  # student.vocab='prune': the vocab_prune.KeptVocab the ids above are of


class BatchIterator(Protocol):
    """Micro-batches of this process's rows: dicts of int32 `input_ids` and `attention_mask`
    [rows, seq]; its state (get/set) is saved in every checkpoint."""

    sequences_per_epoch: int

    def __next__(self) -> Dict[str, np.ndarray]: ...

    def get_state(self) -> Dict[str, Any]: ...

    def set_state(self, state: Dict[str, Any]) -> None: ...
