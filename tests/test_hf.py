"""Our Flax models against transformers' PyTorch models on the same weights, and export."""

import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.torch
import torch  # the test extra: without it this file fails to collect (it does not skip)
import transformers

from distil_jax import main
from distil_jax.interop import hf
from distil_jax.config import with_changes
from distil_jax.data import DataError
from distil_jax.models import Bert, BertConfig, DistilBert, DistilBertConfig, init_params

VOCAB = 120
TINY = {
    "bert": lambda **kw: transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=40, type_vocab_size=2, **kw),
    "roberta": lambda **kw: transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=42, type_vocab_size=1, pad_token_id=1, **kw),
    "distilbert": lambda **kw: transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=40, **kw),
}
MLM_CLASSES = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM",
               "distilbert": "DistilBertForMaskedLM"}


def _random_hf_model(arch, seed=0, **config_changes):
    """A transformers model whose every tensor (LayerNorms and biases included) is random."""
    torch.manual_seed(seed)
    config = TINY[arch](**config_changes)
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


# Float32 against float32 on the same random weights. Measured max abs errors over PARITY:
# logits 4.8e-7, hidden states 4.8e-7, attention probabilities 6.0e-8 (float32 rounding);
# the tolerances are about 4x those. Outside them by far: LayerNorm eps hard-coded to 1e-12
# (logits off by 5.4e-5 for RoBERTa's 1e-5, 1.5e-4 with gelu_new) and the activation
# hard-coded to gelu (2.7e-5 for gelu_new, 0.17 for relu) - both inside the former 1e-4.
PARITY_ATOL = {"logits": 2e-6, "hidden": 2e-6, "attentions": 2.5e-7}
# Configs beyond transformers' defaults: RoBERTa's layer_norm_eps 1e-5 (roberta-base's
# config.json) and a larger one, and every activation models/layers.py knows. HF DistilBERT
# fixes its LayerNorm eps at 1e-12 (its config has no field for it): its activation varies.
PARITY = [
    ("bert", {}), ("roberta", {}), ("distilbert", {}),
    ("bert", {"layer_norm_eps": 1e-5, "hidden_act": "gelu_new"}),
    ("bert", {"layer_norm_eps": 1e-3, "hidden_act": "relu"}),
    ("bert", {"hidden_act": "gelu_pytorch_tanh"}),
    ("roberta", {"layer_norm_eps": 1e-5}),
    # transformers' RobertaLMHead applies exact gelu whatever hidden_act says (BertConfig.head_act);
    # with the encoder's relu in the head the logits were off by 0.10, the hidden states equal.
    ("roberta", {"layer_norm_eps": 1e-5, "hidden_act": "relu"}),
    ("distilbert", {"activation": "relu"}),
    ("distilbert", {"activation": "gelu_new"}),
]


def parity_errors(arch, tmp_path, seed=0, **config_changes):
    """Max abs differences of (logits, hidden states, attentions): ours minus transformers'
    on a random model of `arch` with `config_changes`."""
    ref = _random_hf_model(arch, seed=seed, **config_changes)
    ref.save_pretrained(tmp_path)
    model, params = hf.load_hf_model(str(tmp_path))
    assert isinstance(model, DistilBert if arch == "distilbert" else Bert)
    ids, am = _batch(ref.config.pad_token_id)
    logits, hidden, attn = _torch_outputs(ref, ids, am)
    out = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(am), output_attentions=True)
    assert len(out.hidden_states) == len(hidden) == len(out.attentions) + 1 == model.config.num_layers + 1
    return {"logits": float(np.abs(out.logits - logits).max()),
            "hidden": max(float(np.abs(o - t).max()) for o, t in zip(out.hidden_states, hidden, strict=True)),
            "attentions": max(float(np.abs(o - t).max()) for o, t in zip(out.attentions, attn, strict=True))}


@pytest.mark.parametrize("arch, changes", PARITY, ids=lambda x: x if isinstance(x, str) else
                         "-".join(f"{v}" for v in x.values()) or "defaults")
def test_imported_model_equals_transformers(arch, changes, tmp_path):
    errors = parity_errors(arch, tmp_path, **changes)
    assert all(errors[k] <= PARITY_ATOL[k] for k in errors), errors


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
    # measured max abs errors: 1.8e-7 (hidden states), 1.8e-7 (pooled)
    np.testing.assert_allclose(out.last_hidden_state, want.last_hidden_state.numpy(), atol=1e-6)
    np.testing.assert_allclose(out.pooled_output, want.pooler_output.numpy(), atol=1e-6)


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
    # measured max abs error 3.6e-7
    np.testing.assert_allclose(model.apply({"params": params}, ids, am).logits, logits, atol=1.5e-6)


def test_bf16_compute_stays_close_to_float32(tmp_path):
    ref = _random_hf_model("distilbert", seed=5)
    ref.save_pretrained(tmp_path)
    model32, params = hf.load_hf_model(str(tmp_path))
    model16, params16 = hf.load_hf_model(str(tmp_path), dtype=jnp.bfloat16)
    # bf16 compute keeps float32 params: the same values as the float32 load, in float32.
    assert {x.dtype for x in jax.tree.leaves(params16)} == {np.dtype(np.float32)}
    chex.assert_trees_all_equal(params16, params)
    # bf16 params (param_dtype): each the float32 value rounded to the nearest bf16.
    model_bf, params_bf = hf.load_hf_model(str(tmp_path), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params_bf)} == {np.dtype(jnp.bfloat16)}
    chex.assert_trees_all_equal(params_bf, jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params))
    assert any(not np.array_equal(np.asarray(b, np.float32), a)
               for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_bf)))  # rounded, not exact
    ids, am = _batch(0)
    out32 = model32.apply({"params": params}, ids, am)
    out16 = model16.apply({"params": params16}, ids, am)
    assert out16.logits.dtype == jnp.bfloat16
    assert model_bf.apply({"params": params_bf}, ids, am).logits.dtype == jnp.bfloat16
    rel = np.abs(np.asarray(out16.logits, np.float32) - out32.logits).max() / np.abs(out32.logits).max()
    assert rel < 0.05, rel
    agree = (np.asarray(out16.logits, np.float32).argmax(-1) == np.asarray(out32.logits).argmax(-1)).mean()
    assert agree > 0.9, agree


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
    # measured max abs error 9.2e-7 (logits up to ~15)
    np.testing.assert_allclose(model.apply({"params": params}, ids, am).logits, want, atol=4e-6)
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
    # measured max abs error 1.2e-7
    np.testing.assert_allclose(model.apply({"params": params}, ids, am).logits, want, atol=5e-7)


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
    # measured max abs error 2.4e-7
    np.testing.assert_allclose(_ours(tmp_path, ids, am), _bert_mlm_logits(tmp_path, ids, am), atol=1e-6)


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
    # measured max abs error 3.0e-8 (word embeddings as initialised: small logits)
    np.testing.assert_allclose(ours, _bert_mlm_logits(tmp_path, ids, am), atol=1.5e-7)
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
    # measured max abs error 3.0e-8 (its word embeddings are the init's: small logits)
    np.testing.assert_allclose(_ours(tmp_path, ids, am), _bert_mlm_logits(tmp_path, ids, am), atol=1.5e-7)


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

