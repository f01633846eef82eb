"""Our Flax ModernBERT against transformers' ModernBertForMaskedLM on the same weights, and export."""

import json

import chex
import jax
import numpy as np
import pytest
import torch  # the test extra: without it this file fails to collect (it does not skip)
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from distil_jax.interop import hf, hf_modernbert
from distil_jax.models.layers import apply_recording, init_params, logical_axes
from distil_jax.models.modernbert import ModernBert, ModernBertConfig

VOCAB = 100
SEQ = 24  # longer than the tiny window (local_attention 8: |i - j| <= 4), so windows matter


def _hf_config(**changes):
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=64, local_attention=8, pad_token_id=0,
              bos_token_id=None, eos_token_id=None, cls_token_id=None, sep_token_id=None)
    kw.update(changes)
    return transformers.ModernBertConfig(**kw)


def _random_hf_model(seed=0, **changes):
    """A ModernBertForMaskedLM whose every tensor (LayerNorms and biases included) is random."""
    torch.manual_seed(seed)
    config = _hf_config(**changes)
    config._attn_implementation = "eager"  # padded rows as ours, and the probabilities returned
    model = transformers.ModernBertForMaskedLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, 0.0, 0.2)
    return model


def _batch(seed=0, b=3, s=SEQ):
    """Right-padded: row 0 full, row 1 17 tokens, row 2 5 tokens (its last padded rows have no
    real key within the window)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, size=(b, s))
    am = np.ones((b, s), np.int64)
    am[1, 17:] = 0
    am[2, 5:] = 0
    return np.where(am == 1, ids, 0), am


def _torch_outputs(model, ids, am, **kw):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am),
                     output_hidden_states=True, **kw)


# Float32 against float32 (transformers' eager attention) on the same random weights, over every
# position, padded ones included. Measured max abs errors over PARITY: logits 5.7e-7, hidden
# states 7.2e-7, attention probabilities 6.0e-8, fused-attention logits 5.4e-7 (in float64
# without padding: 3e-8, what is left of the float32 rotary angles both sides keep); the
# tolerances are about 4x those. Mutations of ours on the defaults case, logits off by: the
# window as |i - j| < local_attention // 2: 0.50; gate and input halves of Wi swapped: 0.35;
# the two rotary bases swapped: 5.6e-3; norm_eps 1e-12: 4.6e-4; the head's exact gelu as tanh
# gelu: 5.9e-5.
PARITY_ATOL = {"logits": 2e-6, "hidden": 3e-6, "attentions": 2.5e-7}
PARITY = [
    {},  # transformers' defaults: a global layer every 3, rope bases 160000 / 10000, gelu
    {"global_attn_every_n_layers": 1},  # every layer global
    {"global_attn_every_n_layers": 2, "local_attention": 16},
    {"global_attn_every_n_layers": 3, "global_rope_theta": 500.0, "local_rope_theta": 37.0},
    {"global_attn_every_n_layers": 2, "global_rope_theta": 1e6, "local_rope_theta": 160000.0},
    {"norm_eps": 1e-3, "hidden_activation": "gelu_pytorch_tanh"},
    {"norm_bias": True, "mlp_bias": True, "attention_bias": True, "classifier_bias": True},
    {"norm_bias": True, "attention_bias": True, "decoder_bias": False},
    {"hidden_activation": "silu", "classifier_activation": "gelu_pytorch_tanh", "mlp_bias": True},
    {"tie_word_embeddings": False, "classifier_activation": "silu"},
    {"layer_types": ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]},
]


def _case_id(changes):
    return "-".join(f"{k}={v if not isinstance(v, list) else ''.join(t[0] for t in v)}"
                    for k, v in changes.items()) or "defaults"


def parity_errors(tmp_path, seed=0, **changes):
    """Max abs differences (ours minus transformers') of the logits, hidden states and
    attention probabilities (explicit softmax path), and of the logits of the fused path."""
    ref = _random_hf_model(seed=seed, **changes)
    ref.save_pretrained(tmp_path)
    model, params = hf.load_hf_model(str(tmp_path))
    assert isinstance(model, ModernBert)
    ids, am = _batch(seed)
    want = _torch_outputs(ref, ids, am, output_attentions=True)
    out = model.apply({"params": params}, ids, am, output_attentions=True)
    fused = model.apply({"params": params}, ids, am)
    n = model.config.num_layers
    assert len(out.hidden_states) == len(want.hidden_states) == len(out.attentions) + 1 == n + 1
    diff = lambda a, b: float(np.abs(np.asarray(a) - b.numpy()).max())  # noqa: E731
    return {"logits": diff(out.logits, want.logits),
            "hidden": max(diff(o, t) for o, t in zip(out.hidden_states, want.hidden_states, strict=True)),
            "attentions": max(diff(o, t) for o, t in zip(out.attentions, want.attentions, strict=True)),
            "fused": diff(fused.logits, want.logits)}


@pytest.mark.parametrize("changes", PARITY, ids=_case_id)
def test_imported_model_equals_transformers(changes, tmp_path):
    errors = parity_errors(tmp_path, **changes)
    tol = dict(PARITY_ATOL, fused=PARITY_ATOL["logits"])
    assert all(errors[k] <= tol[k] for k in errors), errors


def test_real_tokens_equal_transformers_sdpa(tmp_path):
    """transformers' default attention (sdpa) agrees on real tokens; on padded rows whose
    window holds no real key it differs from eager (and from ours, which follow eager)."""
    ref = _random_hf_model(seed=1, global_attn_every_n_layers=2)
    ref.config._attn_implementation = "sdpa"
    ref.save_pretrained(tmp_path)
    model, params = hf.load_hf_model(str(tmp_path))
    ids, am = _batch(1)
    want = _torch_outputs(ref, ids, am).logits.numpy()
    got = np.asarray(model.apply({"params": params}, ids, am).logits)
    real = am.astype(bool)
    # measured max abs error 3.9e-7 on real tokens (0.53 on the padded rows 9.. of row 2)
    np.testing.assert_allclose(got[real], want[real], atol=2e-6)


# --- config.json ------------------------------------------------------------------------------
def test_config_reads_both_formats():
    """transformers 5's layer_types / rope_parameters and the released checkpoints' older keys."""
    new = _hf_config(global_attn_every_n_layers=2, global_rope_theta=1234.0, local_rope_theta=56.0,
                     norm_eps=1e-6, hidden_activation="silu", local_attention=16).to_dict()
    old = {k: v for k, v in new.items() if k not in ("layer_types", "rope_parameters")}
    old.update(global_attn_every_n_layers=2, global_rope_theta=1234.0, local_rope_theta=56.0)
    a, b = hf_modernbert.read_modernbert_config(new), hf_modernbert.read_modernbert_config(old)
    assert a == b
    assert (a.global_attn_every_n_layers, a.layer_types, a.local_attention, a.sliding_window) == (2, None, 16, 8)
    assert (a.global_rope_theta, a.local_rope_theta) == (1234.0, 56.0)
    assert (a.layer_norm_eps, a.hidden_act) == (1e-6, "silu")
    assert a.attention_types == ("full_attention", "sliding_attention") * 2
    # transformers 4: a null local_rope_theta meant the global base in sliding layers too
    assert hf_modernbert.read_modernbert_config({**old, "local_rope_theta": None}).local_rope_theta == 1234.0
    irregular = hf_modernbert.read_modernbert_config(
        {**new, "layer_types": ["sliding_attention", "full_attention"] * 2})
    assert irregular.layer_types == ("sliding_attention", "full_attention") * 2
    assert not irregular.is_global(0) and irregular.is_global(1)
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        hf_modernbert.read_modernbert_config(
            {**new, "rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1.0}}})
    with pytest.raises(ValueError, match="hidden_act 'nope'"):
        ModernBertConfig(hidden_act="nope")


def test_a_missing_or_misshapen_tensor_is_named(tmp_path):
    ref = _random_hf_model(seed=2)
    config = hf_modernbert.read_modernbert_config(ref.config.to_dict())
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    del state["model.layers.2.mlp.Wi.weight"]
    state["model.layers.1.attn.Wqkv.weight"] = state["model.layers.1.attn.Wqkv.weight"][:64]
    with pytest.raises(ValueError, match=r"missing model\.layers\.2\.mlp\.Wi\.weight.*model\.layers\.1\."
                                         r"attn\.Wqkv\.weight \(64, 32\) \(expected \(96, 32\)\)"):
        hf.params_from_state_dict(state, config)


# --- our model's own surface ------------------------------------------------------------------
SMALL = ModernBertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=48,
                         max_position_embeddings=64, local_attention=8, pad_token_id=0,
                         global_attn_every_n_layers=2)


def _random_params(model, seed=3):
    """Fresh params with every tensor (LayerNorm scales, biases) moved off its init value."""
    params = init_params(model, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_logical_axes_name_every_axis():
    config = SMALL.replace(norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True,
                           tie_word_embeddings=False)
    model = ModernBert(config)
    axes = logical_axes(model)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    assert jax.tree.structure(shapes) == jax.tree.structure(axes, is_leaf=is_spec)
    flat_axes = jax.tree.leaves(axes, is_leaf=is_spec)
    for spec, shape in zip(flat_axes, jax.tree.leaves(shapes), strict=True):
        assert len(spec) == len(shape.shape) and all(isinstance(a, str) for a in spec), (spec, shape)
    layer = axes["encoder"]["layer_1"]
    assert tuple(layer["attention"]["query"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(layer["attention"]["out"]["kernel"]) == ("heads", "kv", "embed")
    assert tuple(layer["gate"]["kernel"]) == tuple(layer["wi"]["kernel"]) == ("embed", "mlp")
    assert tuple(layer["wo"]["kernel"]) == ("mlp", "embed")
    assert tuple(axes["word_embeddings"]["embedding"]) == ("vocab", "embed")
    assert tuple(axes["mlm_head"]["decoder"]) == ("vocab", "embed")
    assert "attention_norm" not in axes["encoder"]["layer_0"]  # layer 0: no attention norm


@pytest.mark.parametrize("changes", [{}, {"tie_word_embeddings": False, "decoder_bias": False}],
                         ids=["tied", "untied-no-bias"])
def test_head_inputs_give_the_logits(changes):
    model = ModernBert(SMALL.replace(**changes))
    params = _random_params(model)
    ids, am = _batch(4)
    out = model.apply({"params": params}, ids, am)
    feats, matrix, bias = model.apply({"params": params}, out.last_hidden_state, method=ModernBert.head_inputs)
    assert matrix.shape == (VOCAB, SMALL.hidden_size) and bias.shape == (VOCAB,)
    if changes:
        assert not np.any(bias)
        chex.assert_trees_all_equal(matrix, params["mlm_head"]["decoder"])
    else:
        chex.assert_trees_all_equal(matrix, params["word_embeddings"]["embedding"])
    np.testing.assert_allclose(feats @ matrix.T + bias, out.logits, atol=1e-5)
    assert model.apply({"params": params}, ids, am, compute_logits=False).logits is None


def test_dropout_remat_and_records():
    config = SMALL.replace(embedding_dropout=0.1, attention_dropout=0.1, hidden_dropout=0.1)
    model = ModernBert(config)
    params = _random_params(model)
    ids, am = _batch(5)
    det = model.apply({"params": params}, ids, am)
    drop = lambda m: m.apply({"params": params}, ids, am, deterministic=False,  # noqa: E731
                             rngs={"dropout": jax.random.key(7)})
    a, b = drop(model), drop(ModernBert(config, remat="full"))
    assert not np.allclose(a.logits, det.logits)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)  # the same masks with remat
    out, records = apply_recording(model, params, ids, am)
    np.testing.assert_allclose(out.logits, det.logits, atol=1e-6)
    assert len(records) == 3 and records[0]["q"].shape == (3, SEQ, 4, 8)
    assert records[2]["ffn"].shape == (3, SEQ, 48) and records[1]["context"].shape == (3, SEQ, 4, 8)


# --- export --------------------------------------------------------------------------------
WORDS = "the cat sat on a mat dog ran past".split()


def _tokenizer():
    """A WordLevel tokenizer with ModernBERT's special tokens: [CLS] text [SEP]."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]")


def test_export_round_trip_and_fill_mask_pipeline(tmp_path):
    config = SMALL.replace(norm_bias=True, attention_bias=True, global_rope_theta=999.0, local_rope_theta=77.0,
                           hidden_act="gelu_pytorch_tanh")
    model = ModernBert(config)
    params = _random_params(model, seed=6)
    hf.save_hf_model(params, config, str(tmp_path), tokenizer=_tokenizer())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "modernbert" and saved["architectures"] == ["ModernBertForMaskedLM"]
    assert hf_modernbert.read_modernbert_config(saved) == config
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert type(loaded).__name__ == "ModernBertForMaskedLM"
    ids, am = _batch(6)
    want = _torch_outputs(loaded, ids, am).logits.numpy()
    ours = np.asarray(model.apply({"params": params}, ids, am).logits)
    # measured max abs error 4.6e-6 (logits up to 5.6: these params are larger than PARITY's)
    np.testing.assert_allclose(ours, want, atol=2e-5)
    _, again = hf.load_hf_model(str(tmp_path))
    chex.assert_trees_all_equal(again, params)

    fill = transformers.pipeline("fill-mask", model=str(tmp_path), top_k=3)
    text = "the cat [MASK] on a mat"
    results = fill(text)
    enc = fill.tokenizer(text)["input_ids"]
    assert enc[0] == 2 and enc[-1] == 3  # [CLS] ... [SEP]
    logits = np.asarray(model.apply({"params": params}, np.array([enc]), np.ones((1, len(enc)), np.int32)).logits)
    probs = np.asarray(jax.nn.softmax(logits[0, enc.index(4)]))
    top = np.argsort(-probs)[:3]
    assert [r["token"] for r in results] == list(top)
    np.testing.assert_allclose([r["score"] for r in results], probs[top], atol=1e-5)
