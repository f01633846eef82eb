"""Our Flax DeBERTa-v2/v3 against transformers' DebertaV2ForMaskedLM / DebertaV2Model on the
same weights, and export back to transformers."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch  # the test extra: without it this file fails to collect (it does not skip)
import transformers
from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

from distil_jax.interop import hf, hf_deberta
from distil_jax.models.deberta import DebertaV2, DebertaV2Config, log_bucket_positions, relative_positions
from distil_jax.models.layers import apply_recording, init_params, logical_axes

VOCAB, SEQ = 100, 24
# Small enough that, at SEQ = 24, relative distances are both log-bucketed (distances past
# position_buckets // 2 = 4) and clipped to the table (|bucket| >= 8, or |distance| >= 16
# without buckets).
BASE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64, hidden_act="gelu", layer_norm_eps=1e-7,
            relative_attention=True, max_relative_positions=16, position_buckets=8,
            pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
            position_biased_input=False, type_vocab_size=0)  # DeBERTa-v3's choices, tiny


def _randomise(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # every tensor: LayerNorms, biases, rel table included
            p.normal_(0.0, 0.2)
    return model.eval()


def _hf_config(**changes):
    config = transformers.DebertaV2Config(**{**BASE, **changes})
    config._attn_implementation = "eager"
    return config


def _batch(seed=0, b=3, s=SEQ):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(b, s))
    am = np.ones((b, s), np.int64)
    am[1, 15:] = 0
    am[2, 5:] = 0
    return np.where(am == 1, ids, 0), am


def _torch_outputs(model, ids, am):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am),
                    output_hidden_states=True, output_attentions=True)
    return out


def _err(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


# Float32 against float32 on the same random weights. Measured max abs errors over PARITY
# (every position, padded rows included: see the module docstring of models/deberta.py):
# logits 4.8e-7, hidden states 5.4e-7, attention probabilities 6.0e-8; the tolerances are
# about 4x those.
ATOL = {"logits": 2e-6, "hidden": 2e-6, "attentions": 2.5e-7}
PARITY = [
    {},  # v3-like: no absolute positions, buckets, shared keys, LayerNorm'ed rel table
    {"position_biased_input": True, "type_vocab_size": 2},
    {"pos_att_type": ["c2p"]},
    {"pos_att_type": ["p2c"]},
    {"share_att_key": False},  # its own pos_key_proj and pos_query_proj
    {"share_att_key": False, "pos_att_type": ["c2p"]},
    {"share_att_key": False, "pos_att_type": ["p2c"]},
    {"position_buckets": 0},  # plain relative distances, clipped at max_relative_positions
    {"position_buckets": 0, "share_att_key": False, "norm_rel_ebd": "none"},
    {"norm_rel_ebd": "none"},
    # off: no relative table, content-to-content only, but still scaled by sqrt(3 d)
    {"relative_attention": False, "position_biased_input": True},
    {"relative_attention": False, "pos_att_type": None},
    {"embedding_size": 16},  # embed_proj, and a head mapping hidden 32 -> 16
    {"legacy": False},  # the lm_predictions.lm_head head
    {"hidden_act": "gelu_new", "layer_norm_eps": 1e-5},
]


def _ids(changes):
    return "-".join(f"{k}={v}" for k, v in changes.items()) or "v3-like"


def parity_errors(changes, tmp_path):
    """Max abs differences (logits, hidden states[, attentions]): ours minus transformers'
    on a random DebertaV2ForMaskedLM with `changes`, over every position of a right-padded batch."""
    ref = _randomise(transformers.DebertaV2ForMaskedLM(_hf_config(**changes)), seed=len(_ids(changes)))
    ref.save_pretrained(tmp_path)
    model, params = hf.load_hf_model(str(tmp_path))
    assert model.config.mlm_head and isinstance(model, DebertaV2)
    ids, am = _batch()
    want = _torch_outputs(ref, ids, am)
    out = model.apply({"params": params}, ids, am)  # the fused attention (dot_product_attention)
    assert len(out.hidden_states) == len(want.hidden_states) == 4
    errors = {"logits": _err(out.logits, want.logits),
              "hidden": max(_err(o, t) for o, t in zip(out.hidden_states, want.hidden_states, strict=True))}
    if not changes or "relative_attention" in changes:  # the explicit softmax and its probabilities
        out = model.apply({"params": params}, ids, am, output_attentions=True)
        errors["logits"] = max(errors["logits"], _err(out.logits, want.logits))
        errors["attentions"] = max(_err(o, t) for o, t in zip(out.attentions, want.attentions, strict=True))
    return errors


@pytest.mark.parametrize("changes", PARITY, ids=_ids)
def test_imported_model_equals_transformers(changes, tmp_path):
    errors = parity_errors(changes, tmp_path)
    assert all(errors[k] <= ATOL[k] for k in errors), errors


def test_relative_positions_are_transformers_buckets():
    rel = np.arange(-1100, 1101)
    for buckets in (4, 8, 16, 64, 256, 512):
        for max_position in (16, 64, 128, 256, 512, 1024):
            if max_position <= buckets // 2:  # log of a ratio below 1: no config does that
                continue
            want = make_log_bucket_position(torch.tensor(rel), buckets, max_position).long().numpy()
            np.testing.assert_array_equal(log_bucket_positions(rel, buckets, max_position), want)
    # The parity tests' config buckets and clips at SEQ: the bucketing is exercised.
    config = hf_deberta.read_deberta_config(_hf_config().to_dict())
    raw = np.arange(SEQ)[:, None] - np.arange(SEQ)[None, :]
    bucketed = relative_positions(SEQ, SEQ, config)
    assert (bucketed != raw).any() and np.abs(bucketed).max() >= config.position_span
    assert np.abs(relative_positions(SEQ, SEQ, config.replace(position_buckets=0))).max() >= config.max_relative


def _random_ours(config, seed):
    """Params of our DebertaV2 with every tensor random (LayerNorm scales near 1), drawn in
    numpy (drawing them in JAX compiles one program per shape)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(DebertaV2(config), jax.random.key(0)))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray((path[-1].key == "scale") + rng.normal(0.0, 0.2, x.shape), jnp.float32),
        shapes)


@pytest.mark.parametrize("changes", [
    dict(share_att_key=False, position_biased_input=True, type_vocab_size=2, embedding_size=16),
    dict(legacy=False, position_buckets=0),
    dict(relative_attention=False, norm_rel_ebd="layer_norm"),
], ids=["pos-projections-embed-proj", "lm-predictions-head", "no-relative-attention"])
def test_export_round_trip(changes, tmp_path):
    config = hf_deberta.read_deberta_config(_hf_config(**changes).to_dict())
    model = DebertaV2(config)
    params = _random_ours(config, seed=3)
    hf.save_hf_model(params, config, str(tmp_path))
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["model_type"] == "deberta-v2" and hf_config["architectures"] == ["DebertaV2ForMaskedLM"]
    loaded, info = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert type(loaded).__name__ == "DebertaV2ForMaskedLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, am = _batch(seed=1)
    want = _torch_outputs(loaded.eval(), ids, am)
    # Measured max abs errors 3.1e-6, 5.2e-6, 1.8e-6 (logits up to ~4): larger than the
    # imports' because these LayerNorm scales are near 1 (transformers' random ones near 0), so
    # the activations are larger. Float32 rounding: transformers in float32 is about as far
    # from itself in float64 (2.5e-6, 3.6e-6, 1.5e-6).
    np.testing.assert_allclose(model.apply({"params": params}, ids, am).logits, want.logits.numpy(), atol=2e-5)
    # And back: importing the export gives the same params.
    again_model, again = hf.load_hf_model(str(tmp_path))
    assert again_model.config.mlm_head
    chex.assert_trees_all_close(again, params, atol=0)


def test_an_encoder_only_checkpoint_loads_without_head(tmp_path):
    """DebertaV2Model.save_pretrained (top-level names), and the same encoder under
    "deberta." beside an RTD discriminator head (as the released DeBERTa-v3 hold it)."""
    ref = _randomise(transformers.DebertaV2Model(_hf_config()), seed=5)
    ref.save_pretrained(tmp_path / "model")
    ids, am = _batch(seed=2)
    want = _torch_outputs(ref, ids, am).hidden_states
    state = {f"deberta.{k}": v.clone().contiguous() for k, v in ref.state_dict().items()}
    state["mask_predictions.classifier.weight"] = torch.zeros(1, 32)
    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / "config.json").write_text((tmp_path / "model" / "config.json").read_text())
    safetensors.torch.save_file(state, str(tmp_path / "v3" / "model.safetensors"), metadata={"format": "pt"})
    for directory in ("model", "v3"):
        model, params = hf.load_hf_model(str(tmp_path / directory))
        assert not model.config.mlm_head and "mlm_head" not in params
        out = model.apply({"params": params}, ids, am)
        assert out.logits is None
        # measured max abs error 3.6e-7
        assert max(_err(o, t) for o, t in zip(out.hidden_states, want, strict=True)) <= 2e-6
        with pytest.raises(ValueError, match="no MLM head"):
            model.apply({"params": params}, out.last_hidden_state, method=DebertaV2.head_inputs)
    # Saved again, it is an encoder that transformers' AutoModel reads.
    hf.save_hf_model(params, model.config, str(tmp_path / "again"))
    again = transformers.AutoModel.from_pretrained(str(tmp_path / "again")).eval()
    assert type(again).__name__ == "DebertaV2Model"
    np.testing.assert_allclose(_torch_outputs(again, ids, am).last_hidden_state.numpy(),
                               want[-1].numpy(), atol=2e-6)


def test_missing_tensor_is_named(tmp_path):
    ref = _randomise(transformers.DebertaV2ForMaskedLM(_hf_config(share_att_key=False)), seed=6)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    config = hf_deberta.read_deberta_config(ref.config.to_dict())
    del state["deberta.encoder.layer.2.attention.self.pos_key_proj.bias"]
    with pytest.raises(ValueError, match=r"missing deberta\.encoder\.layer\.2\.attention\.self\.pos_key_proj\.bias"):
        hf.params_from_state_dict(state, config)
    with pytest.raises(ValueError, match="conv_kernel_size"):
        hf_deberta.read_deberta_config({**ref.config.to_dict(), "conv_kernel_size": 3})


@pytest.mark.parametrize("changes", [{}, dict(share_att_key=False, position_biased_input=True,
                                              type_vocab_size=2, embedding_size=16)])
def test_logical_axes_name_every_kernel(changes):
    config = hf_deberta.read_deberta_config(_hf_config(**changes).to_dict())
    for model in (DebertaV2(config), DebertaV2(config.replace(mlm_head=False))):
        axes = logical_axes(model)
        shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
        flat_axes = dict(jax.tree_util.tree_flatten_with_path(
            axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0])
        flat_shapes = dict(jax.tree_util.tree_flatten_with_path(shapes)[0])
        assert flat_axes.keys() == flat_shapes.keys()
        for path, spec in flat_axes.items():
            assert len(spec) == len(flat_shapes[path].shape), (path, spec)
            if path[-1].key == "kernel":
                assert all(name is not None for name in spec), (path, spec)
        assert ("mlm_head" in axes) == model.config.mlm_head


def test_dropout_remat_recording_and_bf16():
    config = hf_deberta.read_deberta_config(_hf_config(
        num_hidden_layers=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).to_dict())
    params = _random_ours(config, seed=7)
    ids, am = _batch(seed=3)
    base = DebertaV2(config).apply({"params": params}, ids, am)
    out, records = apply_recording(DebertaV2(config), params, ids, am)
    assert len(records) == config.num_layers
    assert records[0]["q"].shape == (3, SEQ, 4, 8) and records[0]["ffn"].shape == (3, SEQ, 48)
    chex.assert_trees_all_close(out.logits, base.logits, atol=1e-6)

    @jax.jit  # one program each (faster here than running them op by op)
    def variants(params):
        remat = DebertaV2(config, remat="full").apply({"params": params}, ids, am).logits
        dropped = DebertaV2(config).apply({"params": params}, ids, am, deterministic=False,
                                          rngs={"dropout": jax.random.key(0)}).logits
        low = DebertaV2(config, dtype=jnp.bfloat16).apply({"params": params}, ids, am).logits
        return remat, dropped, low

    remat, dropped, low = variants(params)
    chex.assert_trees_all_close(remat, base.logits, atol=1e-5)
    assert np.isfinite(dropped).all() and _err(dropped, base.logits) > 1e-3
    assert low.dtype == jnp.bfloat16
    rel = _err(low, base.logits) / float(np.abs(base.logits).max())
    assert rel < 0.05, rel


def test_config_normalises_and_refuses():
    config = DebertaV2Config(hidden_size=32, num_heads=4, pos_att_type="P2C|c2p", norm_rel_ebd="Layer_Norm")
    assert config.pos_att_type == ("p2c", "c2p") and config.rel_layer_norm and config.scale_factor == 3
    assert DebertaV2Config(pos_att_type=None).scale_factor == 1
    assert DebertaV2Config(max_relative_positions=-1, position_buckets=0).position_span == 512
    with pytest.raises(ValueError, match="pos_att_type"):
        DebertaV2Config(pos_att_type=("c2p", "p2p"))
    with pytest.raises(ValueError, match="legacy=False"):
        DebertaV2Config(embedding_size=128, legacy=False)
