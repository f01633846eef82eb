"""One unit of a source -> its shards: tokenize, pack, split, filter, write.

What every preparation worker runs (in this process, or in a Beam worker: see
prepare.py), for one `Unit` at a time; its output depends on the unit alone, so any
number of workers in any order writes the same files. For each split it writes
`SPLIT/SOURCE/shard-NNNNN.array_record` (one record per sequence, token ids) with
`.lengths.npy` and `.counts.npy`, then the unit's done marker `done/SOURCE/shard-NNNNN.json`
(its statistics), last: a unit without its marker is unfinished and is redone.

The rules are the reference's (lm_seqs_dataset.py): each document is [CLS] text [SEP];
longer ones are cut into chunks of seq_len - 2 with [CLS]/[SEP] re-added; sequences of 11
tokens or fewer and those half or more [UNK] are dropped. A packing source's documents
are consecutive rows of one group joined up to seq_len - 2 tokens.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import tempfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tokenizers import Tokenizer

from distil_jax import storage
from distil_jax.data.sources import SPLITS, Source, Unit, make_source
from distil_jax.data.types import DataError

MIN_LENGTH = 12  # the reference keeps sequences longer than 11 tokens
MAX_UNK_FRACTION = 0.5  # ... and drops those half or more unknown
# Documents per call to the Rust tokenizer: large enough for its threads to share the work
# (the in-process path), small enough that a call's encodings stay well under a GB.
ENCODE_BATCH = 4096
FORMAT_VERSION = 2  # the layout of a prepared directory (loader.py refuses others)
STATS = ("documents", "rows", "sequences", "tokens", "dropped_short", "dropped_unknown")


def token_dtype(vocab_size: int) -> np.dtype:
    """How a shard stores token ids: two bytes when the vocabulary allows."""
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)


def shard_base(out_dir: str, split: str, source: str, index: int) -> str:
    return storage.join(out_dir, split, source, f"shard-{index:05d}")


def done_path(out_dir: str, source: str, index: int) -> str:
    return storage.join(out_dir, "done", source, f"shard-{index:05d}.json")


def sequences_of(flat: np.ndarray, lengths: np.ndarray, seq_len: int, cls_id: int, sep_id: int,
                 unk_id: int) -> Tuple[List[np.ndarray], int, int]:
    """The sequences of documents given as their concatenated token ids `flat` and their
    `lengths`: ([CLS] chunk [SEP], ...) in order, and how many were too short or unknown."""
    step = seq_len - 2
    if not len(lengths):
        return [], 0, 0
    chunks = np.maximum(-(-lengths // step), 1)  # an empty document is one (too short) chunk
    doc_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    first = np.repeat(doc_start, chunks) + step * (np.arange(chunks.sum()) - np.repeat(np.cumsum(chunks) - chunks, chunks))
    end = np.minimum(first + step, np.repeat(doc_start + lengths, chunks))
    sizes = end - first + 2
    unknown_in = np.add.reduceat(np.append(flat == unk_id, False), np.minimum(first, len(flat)))
    unknown_in = np.where(end > first, unknown_in, 0)
    short = sizes < MIN_LENGTH
    too_unknown = ~short & (unknown_in / sizes >= MAX_UNK_FRACTION)
    kept = [np.concatenate([[cls_id], flat[a:b], [sep_id]]) for a, b in zip(first[~short & ~too_unknown],
                                                                            end[~short & ~too_unknown])]
    return kept, int(short.sum()), int(too_unknown.sum())


def split_and_filter(ids: Sequence[int], seq_len: int, cls_id: int, sep_id: int,
                     unk_id: int) -> Tuple[List[np.ndarray], int, int]:
    """The sequences of one document (see `sequences_of`)."""
    ids = np.asarray(ids, np.int64)
    return sequences_of(ids, np.array([len(ids)]), seq_len, cls_id, sep_id, unk_id)


def pack_rows(lengths: Sequence[int], groups: Sequence[str], budget: int,
              rows: Sequence[int] = ()) -> List[Tuple[int, int]]:
    """Runs [start, stop) of rows of one group, adjacent in the source (`rows`: their
    indices there), whose lengths add up to at most `budget` (a row longer than that is a
    run of its own)."""
    runs, start, total = [], 0, 0
    for i, (n, g) in enumerate(zip(lengths, groups)):
        apart = len(rows) and rows[i] != rows[i - 1] + 1
        if i > start and (g != groups[start] or total + n > budget or apart):
            runs.append((start, i))
            start, total = i, 0
        total += n
    if len(lengths):
        runs.append((start, len(lengths)))
    return runs


class _ShardWriter:
    """One split's shard of a unit, built chunk by chunk: records go to a local temporary
    file, lengths and counts are kept; `finish` puts the three files in place (the records
    last but one, the unit's marker after all splits)."""

    def __init__(self, base: str, tokenizer_size: int):
        self.base, self.size = base, tokenizer_size
        local_dir = None if storage.is_remote(base) else os.path.dirname(os.path.abspath(base))
        if local_dir:
            os.makedirs(local_dir, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(suffix=".tmp", dir=local_dir)
        os.close(fd)
        self.writer, self.closed = ArrayRecordWriter(self.tmp, "group_size:1"), False
        self.dtype = token_dtype(tokenizer_size)
        self.lengths: List[np.ndarray] = []
        self.counts = np.zeros(tokenizer_size, np.int64)
        self.stats = dict(documents=0, rows=0, dropped_short=0, dropped_unknown=0, max_id=0)

    def add(self, sequences: List[np.ndarray], documents: int, rows: int, short: int, unknown: int) -> None:
        for seq in sequences:
            self.writer.write(seq.astype(self.dtype).tobytes())
        if sequences:
            joined = np.concatenate(sequences)
            self.counts += np.bincount(joined, minlength=self.size)
            self.stats["max_id"] = max(self.stats["max_id"], int(joined.max()))
        self.lengths.append(np.array([len(s) for s in sequences], np.int32))
        for key, value in (("documents", documents), ("rows", rows), ("dropped_short", short),
                           ("dropped_unknown", unknown)):
            self.stats[key] += value

    def finish(self) -> dict:
        self.writer.close()
        self.closed = True
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int32)
        storage.write_bytes(self.base + ".lengths.npy", npy_bytes(lengths))
        storage.write_bytes(self.base + ".counts.npy", npy_bytes(self.counts))
        storage.upload_file(self.tmp, self.base + ".array_record")
        return {**self.stats, "sequences": len(lengths), "tokens": int(lengths.sum())}

    def discard(self) -> None:
        try:
            if not self.closed:
                self.writer.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def _chunks_of(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class UnitWriter:
    """Prepares units into `out_dir`: the worker's state (sources, tokenizer) built once, on
    its first unit. A unit is read, tokenized and written `ENCODE_BATCH` rows at a time, so
    a worker holds one chunk, whatever the unit's size (a packed document never spans two
    chunks: one cut per 4,096 rows)."""

    def __init__(self, out_dir: str, specs: Dict[str, dict], tokenizer_json: str, seq_len: int,
                 fingerprint: str, max_id: int, tokenizer_size: int):
        self.out_dir, self.specs, self.seq_len, self.fingerprint = out_dir, specs, seq_len, fingerprint
        self.max_id, self.tokenizer_size = max_id, tokenizer_size
        self.tokenizer_json = tokenizer_json
        self._sources: Dict[str, Source] = {}
        self._tok: Optional[Tokenizer] = None

    def source(self, name: str) -> Source:
        if name not in self._sources:
            self._sources[name] = make_source(self.specs[name])
        return self._sources[name]

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tok is None:
            self._tok = Tokenizer.from_str(self.tokenizer_json)
        return self._tok

    def done(self, name: str, index: int) -> Optional[dict]:
        """A finished unit's statistics, or None if it must be (re)done."""
        try:
            info = json.loads(storage.read_bytes(done_path(self.out_dir, name, index)))
        except (FileNotFoundError, ValueError):
            return None
        return info if info.get("fingerprint") == self.fingerprint else None

    def __call__(self, name: str, unit: Unit, special: Dict[str, int]) -> dict:
        """Prepare one unit unless done; its statistics per split. Nothing of a unit that
        fails (an id beyond the vocabulary, a read error) is left at its shard paths."""
        info = self.done(name, unit.index)
        if info is not None:
            return info
        source = self.source(name)
        writers = {split: _ShardWriter(shard_base(self.out_dir, split, name, unit.index), self.tokenizer_size)
                   for split in SPLITS}
        try:
            for chunk in _chunks_of(enumerate(source.rows(unit)), ENCODE_BATCH):
                by_split: Dict[str, list] = {split: [] for split in SPLITS}
                for i, (text, group) in chunk:
                    by_split[source.split_of(unit, text, group)].append((i, text, group))
                for split, rows in by_split.items():
                    if rows:
                        self._add(writers[split], rows, source.pack, special, f"unit {unit.index} of source {name!r}")
            info = {"fingerprint": self.fingerprint, "replaced_bytes": source.replaced_bytes(unit),
                    **{split: writers[split].finish() for split in SPLITS}}
        finally:
            for writer in writers.values():
                writer.discard()
        storage.write_text(done_path(self.out_dir, name, unit.index), json.dumps(info))  # the marker, last
        return info

    def _add(self, writer: _ShardWriter, rows: List[Tuple[int, str, str]], pack: bool, special: Dict[str, int],
             where: str) -> None:
        """Tokenize rows of one split, pack them (a packing source), cut and filter, write."""
        encoded = self.tokenizer.encode_batch([text for _, text, _ in rows], add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encoded), np.int64, count=len(encoded))
        flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encoded), np.int64, count=int(lengths.sum()))
        if len(flat) and flat.max() > self.max_id:
            raise DataError(f"token id {int(flat.max())} of {where} is beyond the model's vocabulary (ids "
                            f"0..{self.max_id}): the tokenizer does not belong to the teacher. Nothing of this unit "
                            "was written; use the teacher's tokenizer (data.tokenizer empty)")
        if pack:
            runs = pack_rows(lengths, [g for _, _, g in rows], self.seq_len - 2, [i for i, _, _ in rows])
            lengths = np.add.reduceat(lengths, [a for a, _ in runs]) if runs else lengths
        sequences, short, unknown = sequences_of(flat, lengths, self.seq_len, special["cls"], special["sep"],
                                                 special["unk"])
        writer.add(sequences, len(lengths), len(rows), short, unknown)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def load_npy(path: str) -> np.ndarray:
    """A .npy file, local or in a bucket."""
    return np.load(io.BytesIO(storage.read_bytes(path)))
