"""Data for the train step: iterators of micro-batches and what the masking needs to know.

Every source yields dicts of int32 numpy arrays `input_ids` and `attention_mask` of
shape [micro_batch // process_count, seq] (this process's rows of each global batch),
and has `get_state()` / `set_state()` so that the checkpoint resumes it exactly.
"""

from __future__ import annotations

import dataclasses
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
              process_count: int = 1, vocab_size: Optional[int] = None):
    """(iterator, VocabInfo) for `config.data` and split 'train' or 'eval'."""
    if config.data.source == "synthetic":
        from distil_jax.data.synthetic import SyntheticCorpus
        corpus = SyntheticCorpus(vocab_size=vocab_size, seq_len=config.data.seq_len,
                                 **config.data.synthetic.to_dict())
        it = corpus.batches(split, micro_batch_size, seed=config.train.seed,
                            process_index=process_index, process_count=process_count)
        return it, corpus.vocab_info()
    raise ValueError(f"data.source {config.data.source!r} is not one of: synthetic")
