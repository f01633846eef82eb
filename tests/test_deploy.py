"""Deployment: ONNX exports equal transformers on shapes they were not traced at, int8 stays
close and small, ONNX Runtime plugs into the same held-out evaluation, and fine-tuned
classifiers export as *ForSequenceClassification with equal logits."""

import collections
import importlib
import json
import os

import flax.linen as nn
import jax
import numpy as np
# The deploy extra and torch: plain imports, so that an install without them fails to
# collect this file (CI installs both) rather than skipping every test in it.
import onnx
import pytest
import torch
import transformers

from distil_jax.interop import hf, hf_heads, onnx_export
from distil_jax.apps import evaluate
from distil_jax.assets import DEMO_TEACHER
from distil_jax.data import squad
from distil_jax.data.tokenizer import load_tokenizer
from distil_jax.models import (Bert, BertConfig, DistilBert, DistilBertConfig, QuestionAnswerer,
                               SequenceClassifier, init_params)

for _needed in ("onnxruntime", "onnxscript"):  # what onnx_export imports lazily
    importlib.import_module(_needed)

VOCAB = 96
CONFIGS = {
    "bert": BertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                       max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0),
    "distilbert": DistilBertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                   intermediate_size=64, max_position_embeddings=64, hidden_dropout=0.0,
                                   attention_dropout=0.0),
}


def _module(arch):
    return (Bert if arch == "bert" else DistilBert)(CONFIGS[arch])


def _noisy(params, seed):
    """Random LayerNorms and biases too, so that every mapped tensor matters."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _padded(rows, seq, seed):
    x = onnx_export.random_inputs(VOCAB, rows, seq, seed=seed, pad=seq // 2)
    return x["input_ids"], x["attention_mask"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A BERT teacher and a DistilBERT student as Hugging Face dirs, each exported (fp32, int8)."""
    out = {}
    for i, arch in enumerate(CONFIGS):
        module = _module(arch)
        params = jax.device_get(_noisy(init_params(module, jax.random.key(i)), i))
        hf_dir = hf.save_hf_model(params, module.config, str(tmp_path_factory.mktemp(arch)))
        out[arch] = (module, params, hf_dir, onnx_export.export(hf_dir))
    return out


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_onnx_equals_transformers_on_other_shapes(exported, arch):
    _, _, hf_dir, files = exported[arch]
    assert files["fp32"]["path"] == os.path.join(hf_dir, "onnx", "model.onnx")
    sess = onnx_export.session(files["fp32"]["path"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert all(isinstance(d, str) for i in sess.get_inputs() for d in i.shape)  # dynamic batch and sequence
    model = onnx_export.load_torch_model(hf_dir)
    ours, theirs = onnx_export.onnx_forward(sess), onnx_export.torch_forward(model, "logits")
    for rows, seq in ((1, 5), (4, 50), (2, 64)):  # the export traced (2, 16)
        ids, am = _padded(rows, seq, seed=rows)
        got, want = ours(ids, am), theirs(ids, am)
        assert got.shape == (rows, seq, VOCAB)
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_failed_check_keeps_what_was_there(exported, tmp_path):
    _, _, hf_dir, _ = exported["distilbert"]
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an earlier export")
    with pytest.raises(onnx_export.ExportMismatch, match="nothing was written"):
        onnx_export.export_onnx(hf_dir, str(out), atol=0.0)  # float32 ONNX vs PyTorch is never exact
    assert (out / "model.onnx").read_bytes() == b"an earlier export"
    assert sorted(os.listdir(out)) == ["model.onnx"]


def test_int8_is_smaller_and_agrees_with_fp32(exported):
    module, _, _, files = exported["bert"]
    assert files["int8"]["bytes"] < files["fp32"]["bytes"]  # at this size the graph outweighs the weights
    ops = {k: collections.Counter(n.op_type for n in onnx.load(files[k]["path"]).graph.node) for k in files}
    # Every product with a weight is int8; the two per layer between activations (QK^T, PV) stay float.
    assert ops["int8"]["MatMulInteger"] == ops["fp32"]["MatMul"] - 2 * module.config.num_layers > 0
    ids, am = _padded(8, 32, seed=3)
    fp32 = onnx_export.onnx_forward(onnx_export.session(files["fp32"]["path"]))(ids, am)
    int8 = onnx_export.onnx_forward(onnx_export.session(files["int8"]["path"]))(ids, am)
    real = am.astype(bool)
    assert not np.allclose(int8, fp32, atol=1e-4)  # it is quantized
    # ...but close: the logits correlate and the top-1 token mostly agrees.
    assert np.corrcoef(int8[real].ravel(), fp32[real].ravel())[0, 1] > 0.99
    assert np.mean(int8.argmax(-1)[real] == fp32.argmax(-1)[real]) > 0.8


def test_onnx_runtime_in_the_held_out_evaluation_scores_as_jax(exported):
    module, params, _, files = exported["distilbert"]
    vocab = type("Vocab", (), {"special_ids": (0, 1, 2, 3), "mask_id": 3, "vocab_size": VOCAB})()
    batches = []
    for i in range(3):
        ids, am = _padded(4, 24, seed=10 + i)
        batches.append({"input_ids": ids.astype(np.int32), "attention_mask": am.astype(np.int32)})
    masked = evaluate.fixed_masked_batches(batches, vocab, seed=0, passes=2)
    models = {"jax": (module, params),
              "onnx": onnx_export.onnx_forward(onnx_export.session(files["fp32"]["path"]))}
    results, hits, clusters = evaluate.evaluate_models(models, masked, reference="jax")
    assert results["onnx"]["targets"] == results["jax"]["targets"] > 50
    np.testing.assert_array_equal(hits["onnx"], hits["jax"])
    assert results["onnx"]["perplexity"] == pytest.approx(results["jax"]["perplexity"], rel=1e-4)
    assert results["onnx"]["agreement_with_teacher"] == 1.0


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_classifier_export_loads_in_a_pipeline_with_equal_logits(tmp_path, tiny_tokenizer, arch):
    module = _module(arch)
    classifier = SequenceClassifier(module, num_labels=3)
    ids, am = _padded(3, 20, seed=5)
    params = nn.meta.unbox(classifier.init(jax.random.key(0), ids[:1], am[:1])["params"])
    params = jax.device_get(_noisy(params, 7))
    labels = ["json", "email", "asyncio"]
    hf_dir = hf_heads.save_hf_classifier(params, module.config, str(tmp_path / "hf"), labels, tokenizer=tiny_tokenizer)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    assert type(loaded).__name__ == {"bert": "BertForSequenceClassification",
                                     "distilbert": "DistilBertForSequenceClassification"}[arch]
    want = onnx_export.torch_forward(loaded, "logits")(ids, am)
    got = np.asarray(classifier.apply({"params": params}, ids, am))
    np.testing.assert_allclose(got, want, atol=1e-4)
    pipe = transformers.pipeline("text-classification", model=hf_dir)
    (guess,) = pipe("the cat sat on a mat")
    assert guess["label"] in labels and 0 < guess["score"] <= 1
    if arch == "distilbert":  # and the task head through ONNX (one architecture is enough)
        files = onnx_export.export(hf_dir, task="text-classification", int8=False)
        onnx = onnx_export.onnx_forward(onnx_export.session(files["fp32"]["path"]))(ids, am)
        np.testing.assert_allclose(onnx, want, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_question_answerer_export_loads_in_a_pipeline_with_equal_logits(tmp_path, arch):
    module = _module(arch)
    qa = QuestionAnswerer(module)
    ids, am = _padded(3, 24, seed=6)
    token_types = (np.arange(24)[None, :] >= 9).astype(np.int64) * am  # question 0, context 1
    params = nn.meta.unbox(qa.init(jax.random.key(0), ids[:1], am[:1])["params"])
    params = jax.device_get(_noisy(params, 8))
    hf_dir = hf_heads.save_hf_question_answerer(params, module.config, str(tmp_path / "hf"))
    loaded = transformers.AutoModelForQuestionAnswering.from_pretrained(hf_dir).eval()
    assert type(loaded).__name__ == {"bert": "BertForQuestionAnswering",
                                     "distilbert": "DistilBertForQuestionAnswering"}[arch]
    inputs = {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(am)}
    if arch == "bert":  # DistilBERT has no token types
        inputs["token_type_ids"] = torch.as_tensor(token_types)
    with torch.no_grad():
        want = loaded(**inputs)
    start, end = qa.apply({"params": params}, ids, am, token_types if arch == "bert" else None)
    np.testing.assert_allclose(np.asarray(start), want.start_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(end), want.end_logits.numpy(), atol=1e-4)
    if arch == "bert":  # and through ONNX, segments included (one architecture is enough)
        files = onnx_export.export(hf_dir, task="question-answering", int8=False)
        sess = onnx_export.session(files["fp32"]["path"])
        assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
        got = sess.run(None, {"input_ids": ids, "attention_mask": am, "token_type_ids": token_types})
        np.testing.assert_allclose(got[0], want.start_logits.numpy(), atol=1e-4)
        np.testing.assert_allclose(got[1], want.end_logits.numpy(), atol=1e-4)


def test_an_exported_answerer_decodes_the_same_answer_as_ours(tmp_path):
    """transformers 5 has no question-answering pipeline (removed in v5): the export is read by
    AutoModelForQuestionAnswering, and its logits decode (data/squad.py) to our answer."""
    tokenizer = load_tokenizer(DEMO_TEACHER)
    config = DistilBertConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=4,
                              intermediate_size=64, max_position_embeddings=128)
    qa = QuestionAnswerer(DistilBert(config))
    ids = np.zeros((1, 8), np.int32)
    params = jax.device_get(_noisy(nn.meta.unbox(qa.init(jax.random.key(1), ids, np.ones_like(ids))["params"]), 9))
    hf_dir = hf_heads.save_hf_question_answerer(params, config, str(tmp_path / "hf"), tokenizer=tokenizer)
    loaded = transformers.AutoModelForQuestionAnswering.from_pretrained(hf_dir).eval()
    context = "The sort is guaranteed to be stable, which is helpful for sorting in multiple passes. " * 4
    ws = squad.windows(tokenizer, "What is the sort guaranteed to be?", context, max_len=40, stride=12)
    ours, theirs = ([], []), ([], [])
    for w in ws:
        x = np.asarray([w["input_ids"]])
        start, end = qa.apply({"params": params}, x, np.ones_like(x))
        ours[0].append(np.asarray(start[0]))
        ours[1].append(np.asarray(end[0]))
        with torch.no_grad():
            out = loaded(input_ids=torch.as_tensor(x))
        theirs[0].append(out.start_logits[0].numpy())
        theirs[1].append(out.end_logits[0].numpy())
    answer = squad.decode(ws, *theirs, context)
    assert answer and answer in context and answer == squad.decode(ws, *ours, context)


def test_a_transformers_classifier_loads_as_ours_and_back(tmp_path):
    """A fine-tuned teacher as users have one (transformers' own classifier, every tensor
    random): ours computes its logits, and saving ours writes the same tensors back."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3,
                                     id2label={0: "neg", 1: "neutral", 2: "pos"})
    theirs = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.2)
    theirs.save_pretrained(tmp_path / "theirs")
    module, params, labels = hf_heads.load_hf_task_model(str(tmp_path / "theirs"))
    assert labels == ["neg", "neutral", "pos"]
    ids, am = _padded(3, 20, seed=11)
    want = onnx_export.torch_forward(theirs, "logits")(ids, am)
    np.testing.assert_allclose(np.asarray(module.apply({"params": params}, ids, am)), want, atol=1e-4)
    again = hf_heads.save_hf_classifier(params, module.encoder.config, str(tmp_path / "ours"), labels)
    back, state = hf.read_state_dict(again), theirs.state_dict()
    assert set(back) <= set(state) and len(back) == len(hf_heads.classifier_table(module.encoder.config))
    for name, tensor in back.items():
        np.testing.assert_allclose(tensor, state[name].numpy(), atol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="not a fine-tuned model"):
        hf_heads.load_hf_task_model(exported_mlm_dir(tmp_path))


def exported_mlm_dir(tmp_path):
    module = _module("distilbert")
    return hf.save_hf_model(jax.device_get(init_params(module, jax.random.key(0))), module.config,
                            str(tmp_path / "mlm"))


def test_the_command_line_exports_and_refuses_a_directory_without_a_model(exported, tmp_path, capsys):
    _, _, hf_dir, _ = exported["distilbert"]
    onnx_export.main([hf_dir, "--out", str(tmp_path / "cli"), "--int8"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["fp32"]["path"] == str(tmp_path / "cli" / "model.onnx") and out["fp32"]["max_difference"] < 1e-4
    assert os.path.exists(out["int8"]["path"])
    with pytest.raises(SystemExit):
        onnx_export.main([str(tmp_path)])
    assert "no config.json" in capsys.readouterr().err
