"""Task data and metrics: GLUE metrics against their definitions, GLUE data offline, the
embedded task's labels. (Mode finetune through the trainer: tests/test_finetune.py.)"""

import numpy as np
import pytest

from distil_jax.train import task
from distil_jax.data import tasks
from distil_jax.data.tokenizer import train_wordpiece


def test_glue_metrics_on_hand_made_cases():
    pred, gold = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
    # tp=2 fp=1 fn=1 tn=2
    assert task.accuracy(pred, gold) == pytest.approx(4 / 6)
    assert task.f1(pred, gold) == pytest.approx(2 / 3)  # P = R = 2/3
    assert task.matthews(pred, gold) == pytest.approx((2 * 2 - 1 * 1) / 9)  # sqrt(3*3*3*3)
    assert task.matthews([1, 1, 1], [1, 0, 1]) == 0.0  # undefined: GLUE's 0
    assert task.f1([0, 0], [1, 1]) == 0.0
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 9.0]
    mx, my = np.mean(x), np.mean(y)
    r = sum((a - mx) * (b - my) for a, b in zip(x, y)) / np.sqrt(
        sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert task.pearson(x, y) == pytest.approx(r)
    assert task.spearman(x, y) == pytest.approx(1.0)
    assert task.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(
        task.pearson([1, 2.5, 2.5, 4], [1, 3, 2, 4]))  # ties share their average rank
    import scipy.stats as scipy_stats  # jax depends on scipy
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    b[:10] = b[10:20]  # ties
    assert task.pearson(a, b) == pytest.approx(scipy_stats.pearsonr(a, b)[0])
    assert task.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b)[0])


def test_glue_data_reads_tfds_records(monkeypatch):
    import tensorflow_datasets as tfds  # a dependency of distil_jax itself
    rows = {"train": [{"sentence1": b"hello world", "sentence2": b"the cat", "label": 1, "idx": 0},
                      {"sentence1": b"the world", "sentence2": b"hello", "label": 0, "idx": 1}],
            "validation": [{"sentence1": b"cat", "sentence2": b"world", "label": 1, "idx": 0}]}
    calls = []

    def data_source(name, split, **kwargs):
        calls.append((name, split))
        return rows[split]

    monkeypatch.setattr(tfds, "data_source", data_source)
    tok = train_wordpiece(["hello world the cat"] * 50, vocab_size=60)
    train, held, metrics = tasks.glue_data("mrpc", tok)
    assert calls == [("glue/mrpc", "train"), ("glue/mrpc", "validation")] and metrics == ("f1", "accuracy")
    np.testing.assert_array_equal(train["labels"], [1, 0])
    first = tok.convert_ids_to_tokens(train["input_ids"][0][train["attention_mask"][0] == 1].tolist())
    assert first == ["[CLS]", "hello", "world", "[SEP]", "the", "cat", "[SEP]"]
    np.testing.assert_array_equal(train["token_type_ids"][0][:7], [0, 0, 0, 0, 1, 1, 1])  # BERT's segments
    assert len(held["labels"]) == 1
    with pytest.raises(ValueError, match="unknown GLUE task"):
        tasks.glue_data("nope", tok)


def test_stdlib_packages_task_has_real_labels(tiny_tokenizer):
    train, held, names = tasks.stdlib_packages_data(tiny_tokenizer, classes=4, max_len=32)
    assert len(names) == 4 and len(set(names)) == 4
    assert set(np.unique(train["labels"])) == set(range(4)) and len(held["labels"]) > 50
    assert len(train["labels"]) > 4 * len(held["labels"]) * 0.5
