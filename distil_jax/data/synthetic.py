"""A fixed corpus drawn from a seeded Markov chain: learnable, offline, no files.

Each token has `branching` likely successors, so a masked LM can learn the corpus
and the loss visibly falls. Sequences look like real ones: [CLS] tokens [SEP], lengths
between min_len and seq_len, right padding.
"""

from __future__ import annotations

import numpy as np

from distil_jax.data.arrays import ShuffledBatches
from distil_jax.data.types import DataError, VocabInfo

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = (PAD, UNK, CLS, SEP, MASK)
EVAL_SEQUENCES = 256


class SyntheticCorpus:
    def __init__(self, vocab_size: int, seq_len: int, num_sequences: int, min_len: int = 12,
                 branching: int = 4, seed: int = 0):
        if vocab_size is None or vocab_size <= len(SPECIALS) + branching:
            raise DataError(f"the synthetic corpus needs a vocabulary larger than "
                             f"{len(SPECIALS) + branching}, got {vocab_size}")
        if not 3 <= min_len <= seq_len:
            raise DataError(f"data.synthetic.min_len {min_len} must be in [3, seq_len={seq_len}]")
        self.vocab_size, self.seq_len = vocab_size, seq_len
        rng = np.random.default_rng(seed)
        first = len(SPECIALS)
        self._next = rng.integers(first, vocab_size, size=(vocab_size, branching))
        self._train = self._draw(rng, num_sequences, min_len)
        self._eval = self._draw(rng, EVAL_SEQUENCES, min_len)

    def _draw(self, rng, n, min_len):
        ids = np.full((n, self.seq_len), PAD, np.int32)
        lengths = rng.integers(min_len, self.seq_len + 1, size=n)
        weights = 0.5 ** np.arange(self._next.shape[1])  # successor k with weight 2^-k
        weights /= weights.sum()
        for i, length in enumerate(lengths):
            tok = rng.integers(len(SPECIALS), self.vocab_size)
            row = [CLS]
            for _ in range(length - 2):
                row.append(tok)
                tok = self._next[tok, rng.choice(self._next.shape[1], p=weights)]
            row.append(SEP)
            ids[i, :length] = row
        return ids

    def vocab_info(self) -> VocabInfo:
        counts = np.bincount(self._train[self._train != PAD], minlength=self.vocab_size)
        return VocabInfo(self.vocab_size, PAD, MASK, SPECIALS, counts)

    def batches(self, split: str, micro_batch_size: int, seed: int, rows=None) -> ShuffledBatches:
        ids = {"train": self._train, "eval": self._eval}[split]
        data = {"input_ids": ids, "attention_mask": (ids != PAD).astype(np.int32)}
        return ShuffledBatches(data, micro_batch_size, seed, rows, shuffle=split == "train")
