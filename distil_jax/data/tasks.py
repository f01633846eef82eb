"""Downstream tasks as arrays: GLUE (TFDS), SQuAD v1.1 (TFDS) and the embedded one.

`task_data(finetune_config, tokenizer)` -> `TaskSet`: the train and held-out arrays
(one row per example; `ShuffledBatches` batches them for the train step), the kind of
head, the label names and the metrics. Kinds and the arrays each has beside
`input_ids`, `attention_mask` (and `token_type_ids` for sentence pairs and questions):
  classification  `labels` int32 class ids (GLUE's tasks but STS-B; stdlib_packages)
  regression      `labels` float32 scores (GLUE's STS-B)
  question_answering  `start`, `end` int32 token labels of the answer (SQuAD v1.1, through
                  data/squad.py's windows; the held-out questions and windows decode spans)
`stdlib_packages` is an offline task with real labels: which standard-library package
a docstring comes from (held out by content hash).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sysconfig
from typing import Dict, List, Sequence, Tuple

import numpy as np
from etils import epy

from distil_jax.data import squad
from distil_jax.data.sources import docstrings, held_out, stdlib_files

with epy.lazy_imports():  # heavy, and only GLUE needs it
    import tensorflow_datasets as tfds

Arrays = Dict[str, np.ndarray]
KINDS = ("classification", "regression", "question_answering")
# task -> (text fields, number of labels (1: regression), metrics, eval split)
GLUE_TASKS = {
    "cola": (("sentence",), 2, ("matthews",), "validation"),
    "sst2": (("sentence",), 2, ("accuracy",), "validation"),
    "mrpc": (("sentence1", "sentence2"), 2, ("f1", "accuracy"), "validation"),
    "qqp": (("question1", "question2"), 2, ("f1", "accuracy"), "validation"),
    "stsb": (("sentence1", "sentence2"), 1, ("pearson", "spearman"), "validation"),
    "mnli": (("premise", "hypothesis"), 3, ("accuracy",), "validation_matched"),
    "qnli": (("question", "sentence"), 2, ("accuracy",), "validation"),
    "rte": (("sentence1", "sentence2"), 2, ("accuracy",), "validation"),
    "wnli": (("sentence1", "sentence2"), 2, ("accuracy",), "validation"),
}
SQUAD = "squad/v1.1"


@dataclasses.dataclass
class TaskSet:
    """A task's data: arrays for training and evaluation, and how to score them."""

    name: str
    kind: str  # one of KINDS
    train: Arrays
    held_out: Arrays
    labels: List[str]  # class names (regression: one; question answering: none)
    metrics: Tuple[str, ...]
    questions: List[dict] = dataclasses.field(default_factory=list)  # QA: the held-out questions
    windows: List[tuple] = dataclasses.field(default_factory=list)  # QA: (question, window) per held-out row

    @property
    def num_labels(self) -> int:
        return len(self.labels)


def encode(tokenizer, texts_a: Sequence[str], texts_b=None, labels=None, max_len: int = 128) -> Arrays:
    """Token ids padded to the longest (rounded up to 8, at most max_len), with labels;
    sentence pairs get `token_type_ids` (0 for the first text, 1 for the second)."""
    enc = tokenizer(list(texts_a), list(texts_b) if texts_b is not None else None,
                    truncation=True, max_length=max_len, return_token_type_ids=texts_b is not None)
    longest = max(len(x) for x in enc["input_ids"])
    length = min(max_len, -(-longest // 8) * 8)
    keys = ("input_ids", "attention_mask") + (("token_type_ids",) if texts_b is not None else ())
    out = {k: np.full((len(enc["input_ids"]), length), tokenizer.pad_token_id if k == "input_ids" else 0, np.int32)
           for k in keys}
    for i, row in enumerate(enc["input_ids"]):
        out["input_ids"][i, : len(row)] = row
        out["attention_mask"][i, : len(row)] = 1
        if texts_b is not None:
            out["token_type_ids"][i, : len(row)] = enc["token_type_ids"][i]
    if labels is not None:
        out["labels"] = np.asarray(labels)
    return out


def glue_data(task: str, tokenizer, data_dir: str = "", max_len: int = 128) -> Tuple[Arrays, Arrays, tuple]:
    """(train, eval, metrics) of a GLUE task read with tfds.data_source('glue/TASK')."""
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; one of {sorted(GLUE_TASKS)}")
    fields, num_labels, metrics, eval_split = GLUE_TASKS[task]
    out = []
    for split in ("train", eval_split):
        source = tfds.data_source(f"glue/{task}", split=split, data_dir=data_dir or None, download=False)
        rows = [source[i] for i in range(len(source))]
        text = lambda r, k: r[k].decode() if isinstance(r[k], bytes) else str(r[k])  # noqa: E731
        a = [text(r, fields[0]) for r in rows]
        b = [text(r, fields[1]) for r in rows] if len(fields) > 1 else None
        labels = np.asarray([r["label"] for r in rows], np.float32 if num_labels == 1 else np.int32)
        out.append(encode(tokenizer, a, b, labels, max_len))
    return out[0], out[1], metrics


def stdlib_packages_data(tokenizer, classes: int = 6, max_len: int = 128,
                         eval_percent: int = 20) -> Tuple[Arrays, Arrays, List[str]]:
    """Docstrings labelled by the standard-library package they come from (the `classes`
    packages with the most docstrings); held out by content hash."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for path in stdlib_files():
        rel = os.path.relpath(path, root).split(os.sep)
        if len(rel) > 1:  # files inside a package
            docs += [(rel[0], d) for d in docstrings(path) if len(d.split()) >= 8]
    counts = collections.Counter(p for p, _ in docs)
    names = sorted(p for p, _ in counts.most_common(classes))
    label = {p: i for i, p in enumerate(names)}
    chosen = [(label[p], d) for p, d in docs if p in label]
    train = [(y, d) for y, d in chosen if not held_out(d, eval_percent)]
    held = [(y, d) for y, d in chosen if held_out(d, eval_percent)]
    make = lambda rows: encode(tokenizer, [d for _, d in rows], None,  # noqa: E731
                               np.asarray([y for y, _ in rows], np.int32), max_len)
    return make(train), make(held), names


def squad_data(tokenizer, data_dir: str = "", max_len: int = 384, stride: int = 128) -> TaskSet:
    """SQuAD v1.1 (tfds 'squad/v1.1'): train windows with span labels; the validation
    questions, their windows and arrays for decoding."""
    train, _ = squad.features(tokenizer, squad.read_squad("train", data_dir), max_len, stride)
    questions = squad.read_squad("validation", data_dir)
    held, index = squad.features(tokenizer, questions, max_len, stride)
    return TaskSet(SQUAD, "question_answering", train, held, [], ("exact_match", "f1"), questions, index)


def task_data(f, tokenizer) -> TaskSet:
    """The `finetune` config group's task: stdlib_packages, glue/NAME or squad/v1.1."""
    if f.task == "stdlib_packages":
        train, held, names = stdlib_packages_data(tokenizer, f.classes, f.max_len)
        return TaskSet(f.task, "classification", train, held, names, ("accuracy",))
    if f.task == SQUAD:
        return squad_data(tokenizer, f.data_dir, f.max_len, f.stride)
    name = f.task.split("/", 1)[-1]
    train, held, metrics = glue_data(name, tokenizer, f.data_dir, f.max_len)
    regression = GLUE_TASKS[name][1] == 1
    labels = ["score"] if regression else [f"LABEL_{i}" for i in range(GLUE_TASKS[name][1])]
    return TaskSet(f.task, "regression" if regression else "classification", train, held, labels, metrics)

