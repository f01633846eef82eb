"""Fine-tuning: GLUE metrics against their definitions, an easy task learned, GLUE data offline."""

import jax
import numpy as np
import pytest

from distil_jax.apps import finetune
from distil_jax.data.tokenizer import train_wordpiece
from distil_jax.models import DistilBert, DistilBertConfig, init_params


def test_glue_metrics_on_hand_made_cases():
    pred, gold = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
    # tp=2 fp=1 fn=1 tn=2
    assert finetune.accuracy(pred, gold) == pytest.approx(4 / 6)
    assert finetune.f1(pred, gold) == pytest.approx(2 / 3)  # P = R = 2/3
    assert finetune.matthews(pred, gold) == pytest.approx((2 * 2 - 1 * 1) / 9)  # sqrt(3*3*3*3)
    assert finetune.matthews([1, 1, 1], [1, 0, 1]) == 0.0  # undefined: GLUE's 0
    assert finetune.f1([0, 0], [1, 1]) == 0.0
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 9.0]
    mx, my = np.mean(x), np.mean(y)
    r = sum((a - mx) * (b - my) for a, b in zip(x, y)) / np.sqrt(
        sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert finetune.pearson(x, y) == pytest.approx(r)
    assert finetune.spearman(x, y) == pytest.approx(1.0)
    assert finetune.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(
        finetune.pearson([1, 2.5, 2.5, 4], [1, 3, 2, 4]))  # ties share their average rank
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    b[:10] = b[10:20]  # ties
    assert finetune.pearson(a, b) == pytest.approx(scipy_stats.pearsonr(a, b)[0])
    assert finetune.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b)[0])


def test_easy_task_reaches_high_accuracy():
    """Label 1 when token 7 occurs in the sequence: a randomly initialised encoder learns it."""
    rng = np.random.default_rng(0)
    n, s = 768, 16

    def make(n):
        ids = rng.integers(8, 40, size=(n, s)).astype(np.int32)
        labels = rng.integers(0, 2, size=n)
        pos = rng.integers(1, s, size=n)
        ids[labels == 1, pos[labels == 1]] = 7
        ids[:, 0] = 2
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}

    train, held = make(n), make(256)
    encoder = DistilBert(DistilBertConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2,
                                          intermediate_size=64, max_position_embeddings=32,
                                          hidden_dropout=0.0, attention_dropout=0.0))
    params = init_params(encoder, jax.random.key(0))
    result, predictions, _ = finetune.finetune(encoder, params, train, held, 2, ("accuracy", "f1"), epochs=8,
                                            learning_rate=3e-3, batch_size=32)
    assert result["accuracy"] > 0.9, result
    assert result["accuracy"] == np.mean(predictions == held["labels"])


def test_glue_data_reads_tfds_records(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    rows = {"train": [{"sentence1": b"hello world", "sentence2": b"the cat", "label": 1, "idx": 0},
                      {"sentence1": b"the world", "sentence2": b"hello", "label": 0, "idx": 1}],
            "validation": [{"sentence1": b"cat", "sentence2": b"world", "label": 1, "idx": 0}]}
    calls = []

    def data_source(name, split, **kwargs):
        calls.append((name, split))
        return rows[split]

    monkeypatch.setattr(tfds, "data_source", data_source)
    tok = train_wordpiece(["hello world the cat"] * 50, vocab_size=60)
    train, held, metrics = finetune.glue_data("mrpc", tok)
    assert calls == [("glue/mrpc", "train"), ("glue/mrpc", "validation")] and metrics == ("f1", "accuracy")
    np.testing.assert_array_equal(train["labels"], [1, 0])
    first = tok.convert_ids_to_tokens(train["input_ids"][0][train["attention_mask"][0] == 1].tolist())
    assert first == ["[CLS]", "hello", "world", "[SEP]", "the", "cat", "[SEP]"]
    assert len(held["labels"]) == 1
    with pytest.raises(ValueError, match="unknown GLUE task"):
        finetune.glue_data("nope", tok)


def test_stdlib_packages_task_has_real_labels(tiny_tokenizer):
    train, held, names = finetune.stdlib_packages_data(tiny_tokenizer, classes=4, max_len=32)
    assert len(names) == 4 and len(set(names)) == 4
    assert set(np.unique(train["labels"])) == set(range(4)) and len(held["labels"]) > 50
    assert len(train["labels"]) > 4 * len(held["labels"]) * 0.5
