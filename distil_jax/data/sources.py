"""Where documents come from: TFDS, Parquet, `datasets`, text files, and the corpus every
Python ships.

A source cuts its input into `Unit`s (a row range of a file, an index range of a TFDS
split, a shard of a streamed dataset): preparation tokenizes and writes each unit as one
shard, on any worker, in any order, and the result depends on the units alone. A unit's
rows are (text, group) pairs in the source's order; a row's split is the unit's (an
explicit eval split or eval files) or, without one, a content hash (`held_out`) that
puts the same text on the same side everywhere.

`pack=True` is for corpora whose rows are sentences of running text (BookCorpus): the
rows of one group (the `group_key` column: a book, an article; without one, blocks of
`PACK_BLOCK_ROWS` consecutive rows) are held out together, and preparation packs
consecutive rows of a group into documents of up to seq_len - 2 tokens instead of
dropping them for being short.
"""

from __future__ import annotations

import ast
import codecs
import dataclasses
import functools
import hashlib
import os
import sys
import sysconfig
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import fsspec
import pydoc_data.topics
from etils import epy

from distil_jax import storage
from distil_jax.data.types import DataError

with epy.lazy_imports():  # heavy, and only their sources need them
    import datasets
    import pyarrow.parquet as pq
    import tensorflow_datasets as tfds

SPLITS = ("train", "eval")
PACK_BLOCK_ROWS = 256  # a packed source without group_key: groups of this many rows
# A text file with more undecodable bytes than this is not text (UTF-8 prose has none,
# Latin-1 prose a few percent, which are replaced and counted; random bytes about 40%).
MAX_REPLACED_FRACTION = 0.2
EMBEDDED_FILES_PER_UNIT = 64


@dataclasses.dataclass(frozen=True)
class Unit:
    """One shard's worth of a source: where its rows are (`part`, the source's own terms)
    and which split they belong to ('' = each row by the held-out hash)."""

    index: int
    split: str
    part: tuple


def _hash(*parts) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def held_out(text: str, eval_percent: int) -> bool:
    """A deterministic split by content: the same document lands on the same side everywhere."""
    return int(hashlib.sha1(text.encode("utf-8", "replace")).hexdigest(), 16) % 100 < eval_percent


class Source:
    """A corpus cut into units (see the module docstring)."""

    eval_percent: int = 5
    pack: bool = False

    def units(self, rows_per_unit: int) -> List[Unit]:
        raise NotImplementedError

    def rows(self, unit: Unit) -> Iterator[Tuple[str, str]]:
        """(text, group) of each non-empty row of `unit`, in order."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def replaced_bytes(self, unit: Unit) -> int:
        """Undecodable bytes replaced in `unit` (text files only), once its rows were read."""
        del unit
        return 0

    def split_of(self, unit: Unit, text: str, group: str) -> str:
        if unit.split:
            return unit.split
        return "eval" if held_out(group if self.pack else text, self.eval_percent) else "train"

    def documents(self, split: str, rows_per_unit: int = 10_000) -> Iterator[str]:
        """The row texts of one split in order (what a tokenizer is trained or checked on)."""
        for unit in self.units(rows_per_unit):
            if unit.split in ("", split):
                yield from (text for text, group in self.rows(unit) if self.split_of(unit, text, group) == split)


def _chunks(n: int, size: int) -> List[Tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, max(size, 1))]


def expand(patterns: Sequence[str], what: str) -> List[str]:
    """Files matching local paths, globs or fsspec URLs (gs://...), sorted; a pattern that
    matches nothing is an error naming it."""
    if isinstance(patterns, str):
        patterns = [patterns]
    paths, missing = [], []
    for pattern in patterns:
        fs, path = storage.filesystem(os.path.expanduser(pattern))
        try:
            found = sorted(p for p in fs.glob(path) if fs.isfile(p))
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"cannot list {pattern!r} (data source {what}): {e}") from None
        if "://" in pattern:
            found = [fs.unstrip_protocol(p) for p in found]
        (paths.extend(found) if found else missing.append(pattern))
    if missing:
        raise DataError(f"no file matches {', '.join(map(repr, missing))} (data source {what}); "
                        "check the path or glob")
    return paths


def _file_splits(train_paths: List[str], eval_paths: List[str]) -> List[Tuple[str, List[str]]]:
    """(split, files): train files hold both splits by the hash unless eval files are given."""
    return [("train" if eval_paths else "", train_paths), ("eval", eval_paths)]


def _named_splits(split: str, eval_split: str) -> List[Tuple[str, str]]:
    """(our split, the dataset's split name): `split` holds both by the hash unless an
    `eval_split` is named."""
    return [("train" if eval_split else "", split), ("eval", eval_split)]


def _file_stats(paths: List[str]) -> List[tuple]:
    """What a files source's fingerprint sees of its files: path, size, modification time."""
    stats = []
    for p in paths:
        fs, path = storage.filesystem(p)
        info = fs.info(path)
        stats.append((p, info.get("size"), str(info.get("mtime") or info.get("updated") or "")))
    return stats


# --- the embedded corpus --------------------------------------------------------------
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
              "ensurepip", "__phello__"}


def stdlib_files() -> List[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


@functools.lru_cache(maxsize=None)
def docstrings(path: str) -> Tuple[str, ...]:
    """Module, class and function docstrings of a source file, read with ast (nothing
    imported); parsed once per process (the corpus's splits and the stdlib_packages task
    read the same files)."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ()
    return tuple(doc for node in ast.walk(tree)
                 if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                 and (doc := ast.get_docstring(node)))


def embedded_documents() -> Iterator[str]:
    """Every document of the embedded corpus in order: pydoc topics, then the stdlib's docstrings."""
    topics = pydoc_data.topics.topics
    for key in sorted(topics):
        yield topics[key]
    for path in stdlib_files():
        yield from docstrings(path)


class EmbeddedSource(Source):
    """English prose that ships with every Python: stdlib docstrings and pydoc topics.

    About 330K words on CPython 3.11; a deterministic 5% (by content hash) is held out.
    Units: the pydoc topics, then the stdlib's files 64 at a time.
    """

    def __init__(self, eval_percent: int = 5):
        self.eval_percent = eval_percent

    def units(self, rows_per_unit: int) -> List[Unit]:
        del rows_per_unit
        files = stdlib_files()
        parts = [("topics",)] + [tuple(files[a:b]) for a, b in _chunks(len(files), EMBEDDED_FILES_PER_UNIT)]
        return [Unit(k, "", part) for k, part in enumerate(parts)]

    def rows(self, unit: Unit) -> Iterator[Tuple[str, str]]:
        if unit.part == ("topics",):
            topics = pydoc_data.topics.topics
            yield from ((topics[key], "") for key in sorted(topics))
            return
        for path in unit.part:
            yield from ((doc, "") for doc in docstrings(path))

    def fingerprint(self) -> str:
        return _hash("embedded", sys.version, self.eval_percent, len(stdlib_files()))


# --- local text files -----------------------------------------------------------------
class _ReplacementCounter:
    """A codecs error handler that replaces undecodable bytes with U+FFFD and counts them."""

    def __init__(self):
        self.count = 0
        self.name = f"distil_jax_replace_{id(self)}"
        codecs.register_error(self.name, self)

    def __call__(self, error: UnicodeDecodeError):
        self.count += error.end - error.start
        return "\ufffd", error.end


class TextFilesSource(Source):
    """Documents from text files (local or any fsspec URL): one per line, or one per
    blank-line-separated paragraph.

    Files are UTF-8; undecodable bytes become U+FFFD and are counted (a unit of a file
    with more than 20% of them is refused as not text). `eval_files` gives the held-out split;
    without it, a content-hash `eval_percent` is held out. Units: byte ranges of a file
    that start at a document and hold `rows_per_unit` documents.
    """

    def __init__(self, files: Sequence[str], doc_per: str = "line", eval_files: Sequence[str] = (),
                 eval_percent: int = 5, pack: bool = False):
        if doc_per not in ("line", "paragraph"):
            raise DataError(f"doc_per must be 'line' or 'paragraph', got {doc_per!r}")
        self.doc_per, self.eval_percent, self.pack = doc_per, eval_percent, pack
        self.train_paths = expand(files, "files")
        self.eval_paths = expand(eval_files, "eval_files") if eval_files else []
        self._counter = _ReplacementCounter()
        self._replaced: Dict[tuple, int] = {}

    def units(self, rows_per_unit: int) -> List[Unit]:
        units = []
        for split, paths in _file_splits(self.train_paths, self.eval_paths):
            for path in paths:
                for start, stop in self._ranges(path, rows_per_unit):
                    units.append(Unit(len(units), split, (path, start, stop)))
        return units

    @functools.lru_cache(maxsize=None)
    def _ranges(self, path: str, rows_per_unit: int) -> Tuple[Tuple[int, int], ...]:
        """Byte ranges of `rows_per_unit` documents each (a range starts where a document
        does); the file is scanned once per source object."""
        starts, docs, offset, in_paragraph = [0], 0, 0, False
        with fsspec.open(path, "rb") as f:
            for line in f:
                blank = not line.strip()
                if self.doc_per == "line" or (blank and in_paragraph):
                    if not blank or self.doc_per == "paragraph":
                        docs += 1
                        if docs == rows_per_unit:
                            starts.append(offset + len(line))
                            docs = 0
                in_paragraph = not blank
                offset += len(line)
        if starts[-1] == offset and len(starts) > 1:
            starts.pop()
        return tuple(zip(starts, starts[1:] + [offset]))

    def replaced_bytes(self, unit: Unit) -> int:
        return self._replaced.get(unit.part, 0)

    def rows(self, unit: Unit) -> Iterator[Tuple[str, str]]:
        path, start, stop = unit.part
        with fsspec.open(path, "rb") as f:
            f.seek(start)
            data = f.read(stop - start)
        before = self._counter.count
        text = data.decode("utf-8", errors=self._counter.name)
        replaced = self._replaced[unit.part] = self._counter.count - before
        if replaced > MAX_REPLACED_FRACTION * max(len(data), 1):
            raise DataError(f"{path} is not UTF-8 text: {replaced} of its {len(data)} bytes (from byte {start}) "
                            "cannot be decoded. Give text files (convert other encodings with iconv), or "
                            "another source kind for binary formats (parquet, tfds)")
        lines = text.splitlines()
        if self.doc_per == "line":
            parts = lines
        else:
            parts, current = [], []
            for line in lines:
                if line.strip():
                    current.append(line)
                elif current:
                    parts.append("\n".join(current))
                    current = []
            if current:
                parts.append("\n".join(current))
        for i, part in enumerate(p.strip() for p in parts):
            if part:
                yield part, f"{path}:{start}:{i // PACK_BLOCK_ROWS}"

    def fingerprint(self) -> str:
        stats = _file_stats(self.train_paths + self.eval_paths)
        return _hash("text", self.doc_per, self.eval_percent, self.pack, stats)


# --- Parquet ---------------------------------------------------------------------------
class ParquetSource(Source):
    """Rows of Parquet files (local paths, globs, gs:// or any fsspec URL), read with pyarrow
    (the engine under `datasets`): the text in column `text_key`; `group_key` names the
    column of a row's book or article for `pack`. Units: consecutive row groups of one
    file, at least `rows_per_unit` rows each. `eval_files` or a content-hash
    `eval_percent` give the held-out split."""

    def __init__(self, files: Sequence[str], text_key: str = "text", group_key: str = "", pack: bool = False,
                 eval_files: Sequence[str] = (), eval_percent: int = 1):
        self.text_key, self.group_key, self.pack = text_key, group_key, pack
        self.eval_percent = eval_percent
        self.train_paths = expand(files, "files")
        self.eval_paths = expand(eval_files, "eval_files") if eval_files else []

    def _columns(self, path: str, schema_names: Sequence[str]) -> List[str]:
        wanted = [self.text_key] + ([self.group_key] if self.group_key else [])
        missing = [c for c in wanted if c not in schema_names]
        if missing:
            raise DataError(f"{path} has no column {', '.join(map(repr, missing))}; "
                            f"its columns are {', '.join(schema_names)}: set text_key (and group_key) to them")
        return wanted

    def units(self, rows_per_unit: int) -> List[Unit]:
        units = []
        for split, paths in _file_splits(self.train_paths, self.eval_paths):
            for path in paths:
                with fsspec.open(path, "rb") as f:
                    meta = pq.ParquetFile(f).metadata
                self._columns(path, meta.schema.names)
                group_start, rows = 0, 0
                for g in range(meta.num_row_groups):
                    rows += meta.row_group(g).num_rows
                    if rows >= rows_per_unit or g == meta.num_row_groups - 1:
                        units.append(Unit(len(units), split, (path, group_start, g + 1)))
                        group_start, rows = g + 1, 0
        return units

    def rows(self, unit: Unit) -> Iterator[Tuple[str, str]]:
        path, first, stop = unit.part
        with fsspec.open(path, "rb") as f:
            file = pq.ParquetFile(f)
            columns = self._columns(path, file.schema_arrow.names)
            table = file.read_row_groups(list(range(first, stop)), columns=columns)
        texts = table.column(self.text_key).to_pylist()
        groups = (table.column(self.group_key).to_pylist() if self.group_key else
                  [f"{path}:{first}:{i // PACK_BLOCK_ROWS}" for i in range(len(texts))])
        for text, group in zip(texts, groups):
            if text and not text.isspace():
                yield text, str(group)

    def fingerprint(self) -> str:
        stats = _file_stats(self.train_paths + self.eval_paths)
        return _hash("parquet", self.text_key, self.group_key, self.pack, self.eval_percent, stats)


# --- `datasets` -----------------------------------------------------------------------
class DatasetsSource(Source):
    """A dataset as `datasets.load_dataset(path, name, split=..., streaming=True)` gives it:
    a hub name with its config (`wikimedia/wikipedia`, `20231101.en`) or a local folder of
    data files; `revision` a branch (`refs/convert/parquet`: the hub's Parquet copy of a
    dataset published as a script). Streamed, so nothing is downloaded whole before
    preparation starts; units are the stream's shards (its files), read in chunks. Without `eval_split`, a content-hash
    `eval_percent` of `split` is held out."""

    def __init__(self, path: str, name: str = "", split: str = "train", eval_split: str = "",
                 text_key: str = "text", group_key: str = "", pack: bool = False, eval_percent: int = 1,
                 data_files: Sequence[str] = (), revision: str = ""):
        self.path, self.config_name, self.split, self.eval_split = path, name or None, split, eval_split
        self.text_key, self.group_key, self.pack, self.eval_percent = text_key, group_key, pack, eval_percent
        self.data_files, self.revision = list(data_files) or None, revision or None

    @functools.lru_cache(maxsize=4)
    def _stream(self, split: str):
        try:
            return datasets.load_dataset(self.path, self.config_name, split=split, streaming=True,
                                         data_files=self.data_files, revision=self.revision)
        except Exception as e:  # noqa: BLE001 - no such dataset, config or split; no network
            raise DataError(f"`datasets` cannot open {self.path!r} (config {self.config_name!r}, split "
                            f"{split!r}): {type(e).__name__}: {str(e).splitlines()[0][:300]}. Check the name, "
                            "config and split on the hub (or the local folder)") from None

    def units(self, rows_per_unit: int) -> List[Unit]:
        del rows_per_unit  # the stream's shards are the units
        units = []
        for split, asked in _named_splits(self.split, self.eval_split):
            if asked:
                stream = self._stream(asked)
                units += [Unit(len(units), split, (asked, k, stream.num_shards))
                          for k in range(stream.num_shards)]
        return units

    def rows(self, unit: Unit) -> Iterator[Tuple[str, str]]:
        asked, k, n = unit.part
        shard = self._stream(asked).shard(num_shards=n, index=k)
        for i, row in enumerate(shard):
            if self.text_key not in row or (self.group_key and self.group_key not in row):
                raise DataError(f"{self.path!r} has no column {self.text_key!r}"
                                + (f" or {self.group_key!r}" if self.group_key else "")
                                + f"; its columns are {', '.join(row)}: set text_key (and group_key) to them")
            text = row[self.text_key]
            if text and not text.isspace():
                yield text, str(row[self.group_key]) if self.group_key else f"{k}:{i // PACK_BLOCK_ROWS}"

    def fingerprint(self) -> str:
        return _hash("datasets", self.path, self.config_name, self.split, self.eval_split, self.text_key,
                     self.group_key, self.pack, self.eval_percent, self.data_files, self.revision)


# --- TFDS ----------------------------------------------------------------------------
def _tfrecord_prepared(data_dir: Optional[str], name: str) -> bool:
    """Whether `name` was prepared in data_dir in TFRecord (what `tfds build` writes by default)."""
    root = storage.join(data_dir or os.path.expanduser("~/tensorflow_datasets"), *name.split("/"))
    fs, path = storage.filesystem(root)
    try:
        return any(".tfrecord" in p for p in fs.glob(path + "/**"))
    except (FileNotFoundError, OSError):
        return False


class TfdsSource(Source):
    """A TFDS text dataset read with `tfds.data_source` (random access to ArrayRecord, no
    TensorFlow needed for a dataset already prepared in `data_dir`), e.g.
    `wikipedia/20230601.en`. Units: `rows_per_unit` consecutive examples of a split."""

    def __init__(self, name: str, split: str = "train", eval_split: str = "", data_dir: str = "",
                 text_key: str = "text", group_key: str = "", pack: bool = False, download: bool = False,
                 eval_percent: int = 1):
        self.tfds_name, self.split, self.eval_split = name, split, eval_split
        self.data_dir, self.text_key, self.download = data_dir or None, text_key, download
        self.group_key, self.pack, self.eval_percent = group_key, pack, eval_percent

    @functools.lru_cache(maxsize=4)
    def _load(self, split: str):
        try:
            return tfds.data_source(self.tfds_name, split=split, data_dir=self.data_dir, download=self.download)
        except tfds.core.registered.DatasetNotFoundError:
            raise DataError(
                f"TFDS has no dataset {self.tfds_name!r} (in data_dir {self.data_dir!r}). Check the "
                "name (`tfds.list_builders()`); a builder whose code needs TensorFlow (wikipedia) "
                "is found without it only once prepared in data_dir") from None
        except Exception as e:  # noqa: BLE001 - not prepared, prepared as TFRecord, no network, bad split
            if _tfrecord_prepared(self.data_dir, self.tfds_name):
                raise DataError(
                    f"TFDS {self.tfds_name!r} in {self.data_dir or '~/tensorflow_datasets'} was prepared in "
                    "TFRecord (the default of `tfds build`), which tfds.data_source cannot read. Build it "
                    f"again in ArrayRecord: `tfds build {self.tfds_name} --file_format=array_record "
                    f"--data_dir={self.data_dir or '~/tensorflow_datasets'}`") from None
            raise DataError(f"TFDS {self.tfds_name!r} split {split!r} could not be opened "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); prepare it with "
                            f"`tfds build {self.tfds_name} --file_format=array_record --data_dir=DIR` where there "
                            "is a network and pass that data_dir") from None

    def units(self, rows_per_unit: int) -> List[Unit]:
        units = []
        for split, asked in _named_splits(self.split, self.eval_split):
            if asked:
                units += [Unit(len(units), split, (asked, a, b))
                          for a, b in _chunks(len(self._load(asked)), rows_per_unit)]
        return units

    def rows(self, unit: Unit) -> Iterator[Tuple[str, str]]:
        asked, start, stop = unit.part
        examples = self._load(asked).__getitems__(list(range(start, stop)))
        for i, example in enumerate(examples, start):
            missing = [k for k in (self.text_key, self.group_key) if k and k not in example]
            if missing:
                raise DataError(f"TFDS {self.tfds_name!r} has no feature {', '.join(map(repr, missing))}; its "
                                f"features are {', '.join(example)}: set text_key (and group_key) to them")
            text = _text(example[self.text_key])
            if text and not text.isspace():
                yield text, _text(example[self.group_key]) if self.group_key else f"{start}:{(i - start) // PACK_BLOCK_ROWS}"

    def fingerprint(self) -> str:
        return _hash("tfds", self.tfds_name, self.split, self.eval_split, self.data_dir, self.text_key,
                     self.group_key, self.pack, self.eval_percent)


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


KINDS = {"embedded": EmbeddedSource, "text": TextFilesSource, "parquet": ParquetSource,
         "datasets": DatasetsSource, "tfds": TfdsSource}


def make_source(spec: Dict) -> Source:
    """A source from its config dict: `kind` (one of KINDS) and that kind's fields."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    spec.pop("weight", None)
    if kind not in KINDS:
        raise DataError(f"data source kind {kind!r} is not one of {', '.join(map(repr, KINDS))}")
    try:
        return KINDS[kind](**spec)
    except TypeError as e:
        raise DataError(f"data source {kind!r}: {e}") from None
