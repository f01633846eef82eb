"""SQuAD v1.1: the official metric on hand-made cases, span labels that round-trip through
the offsets of strided windows, and decoding that never leaves the context."""

import numpy as np
import pytest

from distil_jax.assets import DEMO_TEACHER
from distil_jax.data import squad
from distil_jax.data.tokenizer import load_tokenizer


def test_normalisation_is_the_official_scripts():
    assert squad.normalize_answer("  The Cat,  sat!\n") == "cat sat"
    assert squad.normalize_answer("an apple a day") == "apple day"
    assert squad.normalize_answer("theater") == "theater"  # whole words only
    assert squad.normalize_answer("the-end") == "theend"  # punctuation goes before the articles
    assert squad.normalize_answer("A") == ""


def test_exact_match_and_f1_take_the_best_gold_answer():
    golds = ["the Eiffel Tower", "Eiffel tower in Paris"]
    assert squad.exact_match("eiffel tower.", golds) == 1.0
    assert squad.exact_match("tower", golds) == 0.0
    # "tower" against "eiffel tower" (precision 1, recall 1/2) beats "eiffel tower in paris" (1, 1/4).
    assert squad.f1("tower", golds) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert squad.f1("Paris in tower", golds) == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert squad.f1("the", golds) == 0.0  # nothing left after normalisation: no common token
    counts = squad.f1("a b b", ["b b b c"])  # multiset overlap: 2 of b
    assert counts == pytest.approx(2 * (2 / 2) * (2 / 4) / ((2 / 2) + (2 / 4)))
    scores = squad.squad_scores({"q1": "Eiffel Tower", "q2": "London"},
                                {"q1": golds, "q2": ["Paris"], "q3": ["Rome"]})
    assert scores == {"exact_match": pytest.approx(100 / 3), "f1": pytest.approx(100 / 3)}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEMO_TEACHER)


CONTEXT = ("Return a new list containing all items from the iterable in ascending order. A custom key "
           "function can be supplied to customize the sort order, and the reverse flag can be set to "
           "request the result in descending order. The sort is guaranteed to be stable, which is "
           "helpful for sorting in multiple passes. ") * 3
QUESTION = "What can be set to request the result in descending order?"


@pytest.mark.parametrize("answer,occurrence", [("the reverse flag", 0), ("the reverse flag", 2),
                                               ("ascending order", 1)])  # the last one ends at a "."
def test_span_labels_round_trip_through_strided_windows(tokenizer, answer, occurrence):
    start = [i for i in range(len(CONTEXT)) if CONTEXT.startswith(answer, i)][occurrence]
    ws = squad.windows(tokenizer, QUESTION, CONTEXT, max_len=48, stride=16, answer_start=start, answer_text=answer)
    assert len(ws) > 3  # the context needs several overlapping windows
    found = 0
    for w in ws:
        assert len(w["input_ids"]) <= 48 and w["input_ids"][0] == tokenizer.cls_token_id
        context_tokens = [i for i, o in enumerate(w["offsets"]) if o is not None]
        assert all(w["token_type_ids"][i] == 1 for i in context_tokens)
        if w["start"] == w["end"] == 0:  # not in this window: the answer is not wholly inside it
            first, last = w["offsets"][context_tokens[0]][0], w["offsets"][context_tokens[-1]][1]
            assert not first <= start < start + len(answer) <= last
            continue
        found += 1
        s, e = w["offsets"][w["start"]][0], w["offsets"][w["end"]][1]
        assert (s, e) == (start, start + len(answer))
    assert found >= 1
    # Consecutive windows overlap by the stride's tokens of context.
    a, b = ws[0]["offsets"], ws[1]["offsets"]
    tail = [o for o in a if o is not None][-16:]
    assert tail == [o for o in b if o is not None][:16]


def test_decoding_stays_in_the_context_and_the_length_limit(tokenizer):
    ws = squad.windows(tokenizer, QUESTION, CONTEXT, max_len=48, stride=16)
    rng = np.random.default_rng(0)
    starts, ends = [], []
    for w in ws:
        n = len(w["input_ids"])
        s, e = rng.normal(size=n), rng.normal(size=n)
        question = [i for i, o in enumerate(w["offsets"]) if o is None]
        s[question] += 100.0  # the question, [CLS] and [SEP] score highest: never chosen
        e[question] += 100.0
        starts.append(np.concatenate([s, np.full(8, 1e3)]))  # padding beyond the window: ignored
        ends.append(np.concatenate([e, np.full(8, 1e3)]))
    for w, s, e in zip(ws, starts, ends):
        score, i, j = squad.best_span(s, e, w["offsets"], n_best=48, max_answer_len=5)
        assert w["offsets"][i] is not None and w["offsets"][j] is not None and 0 <= j - i < 5
        # The best of all allowed pairs (brute force).
        allowed = [(s[a] + e[b], a, b) for a in range(len(w["offsets"])) for b in range(len(w["offsets"]))
                   if w["offsets"][a] and w["offsets"][b] and 0 <= b - a < 5]
        assert score == pytest.approx(max(allowed)[0])
    text = squad.decode(ws, starts, ends, CONTEXT, n_best=48, max_answer_len=5)
    assert text and text in CONTEXT and len(tokenizer.tokenize(text)) <= 5
    # A peaked answer is decoded exactly.
    w = ws[2]
    i = next(k for k, o in enumerate(w["offsets"]) if o is not None) + 3
    s, e = np.zeros(len(w["input_ids"])), np.zeros(len(w["input_ids"]))
    s[i], e[i + 1] = 5.0, 5.0
    assert squad.decode([w], [s], [e], CONTEXT) == CONTEXT[w["offsets"][i][0]: w["offsets"][i + 1][1]]


def test_read_squad_takes_tfds_records_as_they_are(monkeypatch):
    import tensorflow_datasets as tfds  # a dependency of distil_jax itself
    context = "Paris is the capital of France."
    rows = [{"id": b"q1", "title": b"France", "context": context.encode(), "question": b"Capital of France?",
             "answers": {"text": np.array([b"Paris", b"Paris"], dtype=object),
                         "answer_start": np.array([0, 0], np.int32)}}]
    calls = []

    def data_source(name, split, **kwargs):
        calls.append((name, split, kwargs["data_dir"]))
        return rows

    monkeypatch.setattr(tfds, "data_source", data_source)
    (q,) = squad.read_squad("validation", data_dir="/data/tfds")
    assert calls == [("squad/v1.1", "validation", "/data/tfds")]
    assert q == {"id": "q1", "question": "Capital of France?", "context": context, "answers": ["Paris", "Paris"],
                 "answer_starts": [0, 0]}
    start = q["answer_starts"][0]
    assert q["context"][start: start + len(q["answers"][0])] == "Paris"


def test_features_and_predict_score_an_oracle_at_100(tokenizer):
    """Arrays of every window of two questions; logits peaked at the labels decode to the gold
    answer (EM 100), and the same logits shifted by one token do not."""
    examples = []
    for i, answer in enumerate(("the reverse flag", "ascending order")):
        start = CONTEXT.index(answer, 200 * i)
        examples.append({"id": f"q{i}", "question": QUESTION, "context": CONTEXT, "answers": [answer],
                         "answer_starts": [start]})
    arrays, index = squad.features(tokenizer, examples, max_len=48, stride=16)
    n = len(index)
    assert all(arrays[k].shape == (n, 48) for k in ("input_ids", "attention_mask", "token_type_ids"))
    assert arrays["input_ids"][arrays["attention_mask"] == 0].tolist() == [tokenizer.pad_token_id] * int(
        (arrays["attention_mask"] == 0).sum())
    labelled = arrays["start"] > 0
    assert 1 <= labelled.sum() < n and np.all(arrays["end"] >= arrays["start"])
    start_logits = np.full((n, 48), -5.0)
    end_logits = np.full((n, 48), -5.0)
    start_logits[np.arange(n), arrays["start"]] = 5.0 * labelled
    end_logits[np.arange(n), arrays["end"]] = 5.0 * labelled
    golds = {e["id"]: e["answers"] for e in examples}
    assert squad.squad_scores(squad.predict(examples, index, start_logits, end_logits), golds) == {
        "exact_match": 100.0, "f1": 100.0}
    shifted = squad.predict(examples, index, np.roll(start_logits, 1, axis=1), np.roll(end_logits, 1, axis=1))
    assert squad.squad_scores(shifted, golds)["exact_match"] < 100.0
