"""Where documents come from: TFDS, local text files, and the corpus every Python ships.

A source yields documents (str) in a fixed order for a split ('train' or 'eval') and
has a fingerprint that changes when its content would; preparation records both.
"""

from __future__ import annotations

import ast
import codecs
import functools
import glob
import hashlib
import os
import sys
import sysconfig
from typing import Dict, Iterator, List, Sequence, Tuple

import pydoc_data.topics
from etils import epy

from distil_jax.data.types import DataError

with epy.lazy_imports():  # heavy, and only TFDS sources need it
    import tensorflow_datasets as tfds

SPLITS = ("train", "eval")


class Source:
    name: str

    def documents(self, split: str) -> Iterator[str]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError


def _hash(*parts) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def held_out(text: str, eval_percent: int) -> bool:
    """A deterministic split by content: the same document lands on the same side everywhere."""
    return int(hashlib.sha1(text.encode("utf-8", "replace")).hexdigest(), 16) % 100 < eval_percent


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
    """

    name = "embedded"

    def __init__(self, eval_percent: int = 5):
        self.eval_percent = eval_percent

    def documents(self, split: str) -> Iterator[str]:
        want_eval = split == "eval"
        for doc in embedded_documents():
            if held_out(doc, self.eval_percent) == want_eval:
                yield doc

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
    """Documents from text files: one per line, or one per blank-line-separated paragraph.

    Files are UTF-8; undecodable bytes become U+FFFD and are counted in `replaced_bytes`.
    `eval_files` gives the held-out split; without it, a content-hash 5% is held out.
    """

    def __init__(self, files: Sequence[str], doc_per: str = "line", eval_files: Sequence[str] = (),
                 name: str = "text", eval_percent: int = 5):
        if doc_per not in ("line", "paragraph"):
            raise DataError(f"doc_per must be 'line' or 'paragraph', got {doc_per!r}")
        self.name, self.doc_per, self.eval_percent = name, doc_per, eval_percent
        self.train_paths = self._expand(files, "files")
        self.eval_paths = self._expand(eval_files, "eval_files") if eval_files else []
        self._counter = _ReplacementCounter()
        self._replaced: Dict[str, int] = {}  # path -> bytes replaced; a file is read once per pass

    @staticmethod
    def _expand(patterns: Sequence[str], what: str) -> List[str]:
        if isinstance(patterns, str):
            patterns = [patterns]
        paths, missing = [], []
        for pattern in patterns:
            found = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
            found = [p for p in found if os.path.isfile(p)]
            (paths.extend(found) if found else missing.append(pattern))
        if missing:
            raise DataError(f"no file matches {', '.join(map(repr, missing))} (data source {what}); "
                            "check the path or glob")
        return paths

    @property
    def replaced_bytes(self) -> int:
        """Undecodable bytes in the files read so far, each file counted once however often read."""
        return sum(self._replaced.values())

    def _read(self, path: str) -> Iterator[str]:
        before = self._counter.count
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors=self._counter.name)
        self._replaced[path] = self._counter.count - before
        if self.doc_per == "line":
            parts = text.splitlines()
        else:
            parts, current = [], []
            for line in text.splitlines():
                if line.strip():
                    current.append(line)
                elif current:
                    parts.append("\n".join(current))
                    current = []
            if current:
                parts.append("\n".join(current))
        for part in parts:
            if part.strip():
                yield part.strip()

    def documents(self, split: str) -> Iterator[str]:
        if self.eval_paths:
            for path in self.train_paths if split == "train" else self.eval_paths:
                yield from self._read(path)
            return
        want_eval = split == "eval"
        for path in self.train_paths:
            for doc in self._read(path):
                if held_out(doc, self.eval_percent) == want_eval:
                    yield doc

    def fingerprint(self) -> str:
        stats = [(p, os.path.getsize(p), int(os.path.getmtime(p))) for p in self.train_paths + self.eval_paths]
        return _hash("text", self.doc_per, self.eval_percent, stats)


# --- TFDS ----------------------------------------------------------------------------
class TfdsSource(Source):
    """A TFDS text dataset read with `tfds.data_source` (random access, no TensorFlow needed
    for a dataset already prepared in `data_dir`), e.g. `wikipedia/20230601.en` or
    `huggingface:bookcorpus`."""

    def __init__(self, name: str, split: str = "train", eval_split: str = "", data_dir: str = "",
                 text_key: str = "text", download: bool = False):
        self.name, self.tfds_name, self.split, self.eval_split = name.replace("/", "_"), name, split, eval_split
        self.data_dir, self.text_key, self.download = data_dir or None, text_key, download

    def _load(self, split: str):
        try:
            return tfds.data_source(self.tfds_name, split=split, data_dir=self.data_dir,
                                    download=self.download)
        except tfds.core.registered.DatasetNotFoundError:
            raise DataError(
                f"TFDS has no dataset {self.tfds_name!r} (in data_dir {self.data_dir!r}). Check the "
                "name (`tfds.list_builders()`); a builder whose code needs TensorFlow (wikipedia) "
                "is found without it only once prepared in data_dir") from None
        except Exception as e:  # not prepared, no network, bad split ...
            raise DataError(f"TFDS {self.tfds_name!r} split {split!r} could not be opened "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); prepare it with "
                            "`tfds build` where there is a network and pass its data_dir") from None

    def documents(self, split: str) -> Iterator[str]:
        tfds_split = self.split if split == "train" else self.eval_split
        if not tfds_split:
            return
        source = self._load(tfds_split)
        for i in range(len(source)):
            text = source[i][self.text_key]
            yield text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)

    def fingerprint(self) -> str:
        return _hash("tfds", self.tfds_name, self.split, self.eval_split, self.data_dir, self.text_key)


def make_source(spec: Dict) -> Source:
    """A source from its config dict: kind 'embedded' | 'text' | 'tfds' and that kind's fields."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    spec.pop("weight", None)
    try:
        if kind == "embedded":
            return EmbeddedSource(**spec)
        if kind == "text":
            return TextFilesSource(**spec)
        if kind == "tfds":
            return TfdsSource(**spec)
    except TypeError as e:
        raise DataError(f"data source {kind!r}: {e}") from None
    raise DataError(f"data source kind {kind!r} is not one of 'embedded', 'text', 'tfds'")
