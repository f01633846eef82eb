"""Our Flax models against transformers' PyTorch models on the same weights, and export."""

import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.torch

from distil_jax import main
from distil_jax.interop import hf
from distil_jax.config import with_changes
from distil_jax.data import DataError
from distil_jax.models import Bert, BertConfig, DistilBert, DistilBertConfig, init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 120
TINY = {
    "bert": lambda: transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=40, type_vocab_size=2),
    "roberta": lambda: transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=42, type_vocab_size=1, pad_token_id=1),
    "distilbert": lambda: transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=40),
}
MLM_CLASSES = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM",
               "distilbert": "DistilBertForMaskedLM"}


def _random_hf_model(arch, seed=0):
    """A transformers model whose every tensor (LayerNorms and biases included) is random."""
    torch.manual_seed(seed)
    config = TINY[arch]()
    config._attn_implementation = "eager"  # so that attention probabilities are returned
    model = getattr(transformers, MLM_CLASSES[arch])(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _batch(pad_id, seed=0, b=3, s=16):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(b, s))
    am = np.ones((b, s), np.int64)
    am[1, 11:] = 0
    am[2, 4:] = 0
    return np.where(am == 1, ids, pad_id), am


def _torch_outputs(model, ids, am):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am),
                    output_hidden_states=True, output_attentions=True)
    return (out.logits.numpy(), [h.numpy() for h in out.hidden_states],
            [a.numpy() for a in out.attentions])


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_imported_model_equals_transformers(arch, tmp_path):
    ref = _random_hf_model(arch)
    ref.save_pretrained(tmp_path)
    model, params = hf.load_hf_model(str(tmp_path))
    assert isinstance(model, DistilBert if arch == "distilbert" else Bert)
    ids, am = _batch(ref.config.pad_token_id)
    logits, hidden, attn = _torch_outputs(ref, ids, am)
    out = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(am), output_attentions=True)
    assert len(out.hidden_states) == len(hidden) == model.config.num_layers + 1
    np.testing.assert_allclose(out.logits, logits, atol=1e-4)
    for ours, theirs in zip(out.hidden_states, hidden, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
    for ours, theirs in zip(out.attentions, attn, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_bert_with_pooler_and_token_types(tmp_path):
    torch.manual_seed(1)
    ref = transformers.BertModel(TINY["bert"]()).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    mlm = _random_hf_model("bert", seed=2)
    state = {f"bert.{k}": v for k, v in ref.state_dict().items()}
    state.update({k: v for k, v in mlm.state_dict().items() if k.startswith("cls.")})
    state.pop("cls.predictions.decoder.weight")
    mlm.save_pretrained(tmp_path)
    safetensors.torch.save_file({k: v.clone().contiguous() for k, v in state.items()},
                                os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
    model, params = hf.load_hf_model(str(tmp_path))
    assert model.config.add_pooler
    ids, am = _batch(0)
    tt = (np.arange(ids.shape[1])[None] >= 6).astype(np.int64) * am
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am),
                   token_type_ids=torch.tensor(tt))
    out = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(am), jnp.asarray(tt))
    np.testing.assert_allclose(out.last_hidden_state, want.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(out.pooled_output, want.pooler_output.numpy(), atol=1e-4)


def test_legacy_gamma_beta_names_and_pytorch_bin(tmp_path):
    ref = _random_hf_model("bert", seed=3)
    ref.save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in ref.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    model, params = hf.load_hf_model(str(tmp_path))
    ids, am = _batch(0, seed=4)
    logits, _, _ = _torch_outputs(ref, ids, am)
    np.testing.assert_allclose(model.apply({"params": params}, ids, am).logits, logits, atol=1e-4)


def test_bf16_compute_stays_close_to_float32(tmp_path):
    ref = _random_hf_model("distilbert", seed=5)
    ref.save_pretrained(tmp_path)
    model32, params = hf.load_hf_model(str(tmp_path))
    model16, _ = hf.load_hf_model(str(tmp_path), dtype=jnp.bfloat16)
    ids, am = _batch(0)
    out32 = model32.apply({"params": params}, ids, am)
    out16 = model16.apply({"params": params}, ids, am)
    assert out16.logits.dtype == jnp.bfloat16
    chex.assert_trees_all_equal_dtypes(params, jax.tree.map(lambda x: x.astype(jnp.float32), params))
    rel = np.abs(np.asarray(out16.logits, np.float32) - out32.logits).max() / np.abs(out32.logits).max()
    assert rel < 0.05, rel
    agree = (np.asarray(out16.logits, np.float32).argmax(-1) == np.asarray(out32.logits).argmax(-1)).mean()
    assert agree > 0.9, agree


def test_dropout_is_active_only_when_not_deterministic():
    config = DistilBertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    model = DistilBert(config)
    params = init_params(model, jax.random.key(0))
    ids, am = _batch(0)
    det = model.apply({"params": params}, ids, am).logits
    a = model.apply({"params": params}, ids, am, deterministic=False, rngs={"dropout": jax.random.key(1)}).logits
    b = model.apply({"params": params}, ids, am, deterministic=False, rngs={"dropout": jax.random.key(1)}).logits
    c = model.apply({"params": params}, ids, am, deterministic=False, rngs={"dropout": jax.random.key(2)}).logits
    chex.assert_trees_all_equal(a, b)
    assert not np.allclose(a, det) and not np.allclose(a, c)


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_student_export_round_trip(tmp_path, with_tokenizer, tiny_tokenizer):
    config = DistilBertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                              intermediate_size=64, max_position_embeddings=64)
    model = DistilBert(config)
    params = init_params(model, jax.random.key(3))
    # Give LayerNorms and biases non-trivial values so the check covers them.
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(x.size), x.shape), params)
    tokenizer = tiny_tokenizer if with_tokenizer else None
    hf.save_hf_model(params, config, str(tmp_path), tokenizer=tokenizer)
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path)).eval()
    assert type(loaded).__name__ == "DistilBertForMaskedLM"
    ids, am = _batch(0)
    with torch.no_grad():
        want = loaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am)).logits.numpy()
    np.testing.assert_allclose(model.apply({"params": params}, ids, am).logits, want, atol=1e-4)
    # And back: importing the export gives the same params.
    _, again = hf.load_hf_model(str(tmp_path))
    chex.assert_trees_all_close(again, params, atol=0)
    if with_tokenizer:
        tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
        assert tok("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]


def test_teacher_export_round_trip(tmp_path):
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    model = Bert(config)
    params = init_params(model, jax.random.key(4))
    hf.save_hf_model(params, config, str(tmp_path))
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path)).eval()
    assert type(loaded).__name__ == "BertForMaskedLM"
    ids, am = _batch(0)
    with torch.no_grad():
        want = loaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am)).logits.numpy()
    np.testing.assert_allclose(model.apply({"params": params}, ids, am).logits, want, atol=1e-4)


# --- real teachers, as users have them ----------------------------------------------------
def _bert_mlm_logits(directory, ids, am):
    ref = transformers.BertForMaskedLM.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am)).logits.numpy()


def _ours(directory, ids, am):
    model, params = hf.load_hf_model(str(directory))
    return np.asarray(model.apply({"params": params}, ids, am).logits)


def test_a_legacy_pytorch_bin_with_buffers_and_a_pooler(tmp_path):
    """transformers 3/4 wrote pytorch_model.bin with position_ids buffers, the pooler and the
    decoder weight: our MLM equals BertForMaskedLM.from_pretrained of the same directory."""
    torch.manual_seed(6)
    config = TINY["bert"]()
    base = transformers.BertModel(config).eval()  # with its pooler
    mlm = _random_hf_model("bert", seed=7)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.2)
    state = {f"bert.{k}": v for k, v in base.state_dict().items()}
    state.update({k: v for k, v in mlm.state_dict().items() if k.startswith("cls.")})
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    state["bert.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
    config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    ids, am = _batch(0, seed=8)
    np.testing.assert_allclose(_ours(tmp_path, ids, am), _bert_mlm_logits(tmp_path, ids, am), atol=1e-4)


class _Heads(torch.nn.Module):
    """`cls`: the MLM head beside two task heads, as multi-task research models hold them."""

    def __init__(self, config):
        super().__init__()
        self.predictions = transformers.models.bert.modeling_bert.BertLMPredictionHead(config)
        self.sentiment = torch.nn.Linear(config.hidden_size, 3)
        self.topic = torch.nn.Linear(config.hidden_size, 5)


class MultiTaskBert(transformers.BertPreTrainedModel):
    """A research model: `self.bert = BertModel(config)` (with its pooler) and `self.cls`."""

    _tied_weights_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                          "cls.predictions.decoder.bias": "cls.predictions.bias"}

    def __init__(self, config):
        super().__init__(config)
        self.bert = transformers.BertModel(config)
        self.cls = _Heads(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder


def _multitask_teacher(directory, vocab_size=VOCAB, seed=9):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=40)
    model = MultiTaskBert(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "word_embeddings" not in name:
                p.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    return model


def test_a_custom_model_with_extra_heads_gives_its_mlm_with_one_warning(tmp_path, caplog):
    _multitask_teacher(tmp_path)
    ids, am = _batch(0, seed=10)
    with caplog.at_level("WARNING"):
        ours = _ours(tmp_path, ids, am)
    np.testing.assert_allclose(ours, _bert_mlm_logits(tmp_path, ids, am), atol=1e-4)
    warnings = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(warnings) == 1 and "cls.sentiment.weight" in warnings[0] and "cls.topic.bias" in warnings[0]
    # A tensor the MLM needs is still an error that names it.
    state = safetensors.torch.load_file(tmp_path / "model.safetensors")
    del state["bert.encoder.layer.1.output.dense.bias"]
    safetensors.torch.save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing bert.encoder.layer.1.output.dense.bias"):
        hf.load_hf_model(str(tmp_path))


CASED_WORDS = "Return The Value Of A List Sorted By Key And Its Length In Bytes".split()


def _vocab_txt_only_teacher(directory):
    """config.json, the weights and a case-sensitive vocab.txt: nothing else (no
    tokenizer_config.json saying not to lowercase)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + CASED_WORDS
    vocab += [f"##{c}" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"] + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    _multitask_teacher(directory, vocab_size=len(vocab))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return vocab


def test_a_vocab_txt_only_directory_loads_as_transformers_loads_it(tmp_path):
    vocab = _vocab_txt_only_teacher(tmp_path)
    ids, am = _batch(0, seed=11)
    ids = ids % len(vocab)
    np.testing.assert_allclose(_ours(tmp_path, ids, am), _bert_mlm_logits(tmp_path, ids, am), atol=1e-4)


def test_distillation_from_a_research_teacher_end_to_end(tmp_path, config_file):
    """The custom multi-task teacher with a vocab.txt-only, case-sensitive tokenizer: refused
    with the cause under the default lowercasing, then distilled with data.lowercase=False
    for a few updates, and the student exported for AutoModelForMaskedLM (through
    main.run, what the command line runs)."""
    teacher = tmp_path / "teacher"
    _vocab_txt_only_teacher(teacher)
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(CASED_WORDS, 24)) + " ." for _ in range(300)) + "\n")
    changes = {"teacher.path": str(teacher), "data.source": "corpus", "data.seq_len": 32,
               "data.sources": ml_collections.ConfigDict({"mine": {"kind": "text", "files": [str(corpus)]}}),
               "student.num_layers": 1, "train.steps": 3, "train.batch_size": 16,
               "train.micro_batch_size": 16, "checkpoint.every_steps": 3}

    def run(workdir, **more):
        return main.run(with_changes(config_file("tiny").get_config(), **changes, **more), str(workdir))

    with pytest.raises(DataError, match=r"data\.lowercase=False"):
        run(tmp_path / "lower")
    assert not (tmp_path / "lower" / "checkpoints").exists()
    out = run(tmp_path / "run", **{"data.lowercase": False})
    assert out["update"] == 3 and np.isfinite(out["metrics"]["loss"])
    export = run(tmp_path / "run", **{"data.lowercase": False, "mode": "export"})["export_dir"]
    student = transformers.AutoModelForMaskedLM.from_pretrained(export)
    tok = transformers.AutoTokenizer.from_pretrained(export)
    assert type(student).__name__ == "DistilBertForMaskedLM" and student.config.n_layers == 1
    assert tok.tokenize("Return The Value")[:2] == ["Return", "The"]  # cased, as the teacher's

