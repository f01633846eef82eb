"""Extractive question answering, SQuAD v1.1: windows, span labels, span decoding, EM and F1.

A question and its context become windows of at most `max_len` tokens ([CLS] question
[SEP] context-part [SEP]) that overlap by `stride` tokens, through the tokenizer's
overflow and offset mapping (`windows`). A window's labels are the token indices of the
answer's first and last tokens when the whole answer lies inside its context part, else
0 and 0 ([CLS]: "not here"), as in BERT's recipe. Decoding (`best_span`) takes the n best
start and end logits of each window, keeps the pairs with start <= end, both in the
context part and at most `max_answer_len` tokens long, and maps the best of all windows
back to the context's characters through the offsets. The scores are the official
evaluation script's: answers normalised (lower case, punctuation and the articles a, an,
the removed, whitespace collapsed), exact match and token F1, each the maximum over the
gold answers, averaged over questions, in percent.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from etils import epy

with epy.lazy_imports():  # heavy, and only reading SQuAD needs it
    import tensorflow_datasets as tfds

# --- the official metric ------------------------------------------------------------
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case; punctuation, then the articles a / an / the, removed; whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    return max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, golds: Sequence[str]) -> float:
    """Token F1 of the normalised answers, the best over the gold answers."""
    return max(_f1(prediction, g) for g in golds)


def squad_scores(predictions: Dict[str, str], golds: Dict[str, Sequence[str]]) -> Dict[str, float]:
    """{"exact_match", "f1"} in percent over the questions of `golds` (a missing prediction scores 0)."""
    if not golds:
        raise ValueError("no questions to score")
    em = sum(exact_match(predictions.get(q, ""), g) for q, g in golds.items())
    f = sum(f1(predictions.get(q, ""), g) for q, g in golds.items())
    return {"exact_match": 100.0 * em / len(golds), "f1": 100.0 * f / len(golds)}


# --- data -------------------------------------------------------------------------------
def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def read_squad(split: str = "validation", data_dir: str = "") -> List[Dict[str, object]]:
    """SQuAD v1.1 through `tfds.data_source("squad/v1.1")` (prepared in data_dir): per
    question `id`, `question`, `context`, `answers` (gold texts), `answer_starts` (characters)."""
    source = tfds.data_source("squad/v1.1", split=split, data_dir=data_dir or None, download=False)
    out = []
    for i in range(len(source)):
        r = source[i]
        answers = r["answers"]
        out.append({"id": _text(r["id"]), "question": _text(r["question"]), "context": _text(r["context"]),
                    "answers": [_text(t) for t in answers["text"]],
                    "answer_starts": [int(a) for a in answers["answer_start"]]})
    return out


# --- windows and span labels ----------------------------------------------------------
Window = Dict[str, object]


def windows(tokenizer, question: str, context: str, max_len: int = 384, stride: int = 128,
            answer_start: Optional[int] = None, answer_text: str = "") -> List[Window]:
    """The windows of one question over its context: `input_ids`, `attention_mask`,
    `token_type_ids` (unpadded lists), `offsets` ((start, end) characters of each context
    token in `context`; None elsewhere), and with an answer `start` / `end` token labels."""
    enc = tokenizer(question, context, truncation="only_second", max_length=max_len, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True)
    out = []
    for w in range(len(enc["input_ids"])):
        sequence_ids = enc.sequence_ids(w)
        offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][w], sequence_ids)]
        ids = enc["input_ids"][w]
        window = {"input_ids": list(ids), "attention_mask": [1] * len(ids),
                  "token_type_ids": [1 if s == 1 else 0 for s in sequence_ids], "offsets": offsets}
        if answer_start is not None:
            window["start"], window["end"] = span_labels(offsets, answer_start, answer_start + len(answer_text))
        out.append(window)
    return out


def span_labels(offsets: Sequence[Optional[Tuple[int, int]]], start_char: int, end_char: int) -> Tuple[int, int]:
    """Token indices of the first and last context tokens of [start_char, end_char), or
    (0, 0) when the span is not wholly inside this window's context part."""
    context = [i for i, o in enumerate(offsets) if o is not None]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return 0, 0
    start = next(i for i in context if offsets[i][1] > start_char)
    end = next(i for i in reversed(context) if offsets[i][0] < end_char)
    return start, end


# --- decoding -------------------------------------------------------------------------
def best_span(start_logits: np.ndarray, end_logits: np.ndarray, offsets: Sequence[Optional[Tuple[int, int]]],
              n_best: int = 20, max_answer_len: int = 30) -> Optional[Tuple[float, int, int]]:
    """(score, start, end) of the best span of one window: start and end among the n best
    logits, both context tokens, start <= end < start + max_answer_len; None if none is."""
    n = len(offsets)
    starts = np.argsort(start_logits[:n])[::-1][:n_best]
    ends = np.argsort(end_logits[:n])[::-1][:n_best]
    best = None
    for s in starts:
        for e in ends:
            if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_len:
                continue
            score = float(start_logits[s] + end_logits[e])
            if best is None or score > best[0]:
                best = (score, int(s), int(e))
    return best


def decode(window_list: Iterable[Window], start_logits: Iterable[np.ndarray], end_logits: Iterable[np.ndarray],
           context: str, n_best: int = 20, max_answer_len: int = 30) -> str:
    """The answer text: the best span over all windows of one question, as context characters."""
    best = None
    for w, s, e in zip(window_list, start_logits, end_logits):
        found = best_span(np.asarray(s), np.asarray(e), w["offsets"], n_best, max_answer_len)
        if found is not None and (best is None or found[0] > best[0]):
            best = (found[0], w["offsets"][found[1]][0], w["offsets"][found[2]][1])
    return "" if best is None else context[best[1]: best[2]]


# --- a split as arrays ------------------------------------------------------------------
def features(tokenizer, examples: Sequence[Dict[str, object]], max_len: int = 384,
             stride: int = 128) -> Tuple[Dict[str, np.ndarray], List[Tuple[int, Window]]]:
    """Every window of every question as arrays padded to `max_len` (`input_ids`,
    `attention_mask`, `token_type_ids`, `start`, `end`: the first gold answer's labels),
    and per row (index of its question in `examples`, its window) for `predict`."""
    rows, index = [], []
    for q, ex in enumerate(examples):
        first = ex["answers"][0] if ex["answers"] else ""
        start = ex["answer_starts"][0] if ex["answers"] else None
        for w in windows(tokenizer, ex["question"], ex["context"], max_len, stride, start, first):
            rows.append(w)
            index.append((q, w))
    pad = tokenizer.pad_token_id
    out = {k: np.full((len(rows), max_len), pad if k == "input_ids" else 0, np.int32)
           for k in ("input_ids", "attention_mask", "token_type_ids")}
    for i, w in enumerate(rows):
        n = len(w["input_ids"])
        for k in out:
            out[k][i, :n] = w[k]
    out["start"] = np.asarray([w.get("start", 0) for w in rows], np.int32)
    out["end"] = np.asarray([w.get("end", 0) for w in rows], np.int32)
    return out, index


def predict(examples: Sequence[Dict[str, object]], index: Sequence[Tuple[int, Window]], start_logits: np.ndarray,
            end_logits: np.ndarray, n_best: int = 20, max_answer_len: int = 30) -> Dict[str, str]:
    """{question id: answer text} from the logits of the rows of `features` (in its order)."""
    by_question: Dict[int, List[int]] = collections.defaultdict(list)
    for row, (q, _) in enumerate(index):
        by_question[q].append(row)
    out = {}
    for q, rows in by_question.items():
        ex = examples[q]
        out[str(ex["id"])] = decode([index[r][1] for r in rows], [start_logits[r] for r in rows],
                                    [end_logits[r] for r in rows], str(ex["context"]), n_best, max_answer_len)
    return out
