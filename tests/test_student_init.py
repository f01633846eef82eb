"""Student initialisation from the teacher: layer map, embeddings, head, pruning."""

import chex
import jax
import numpy as np
import pytest

from distil_jax.models import Bert, BertConfig, DistilBert, apply_recording, init_params, module_for
from distil_jax.train.student_init import (DISTILBERT_LAYER_MAP, activation_importance, default_layer_map,
                                     init_student_from_teacher, most_important, student_config_from_teacher)


def _teacher(model_type="bert", layers=12, seed=0):
    config = BertConfig(vocab_size=64, hidden_size=16, num_layers=layers, num_heads=2,
                        intermediate_size=32, max_position_embeddings=32,
                        model_type=model_type, pad_token_id=1 if model_type == "roberta" else 0)
    params = init_params(Bert(config), jax.random.key(seed))
    # Non-trivial token types, LayerNorms and biases, so that folding and copies are tested.
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(x.size + 1), x.shape), params)
    return config, params


def test_default_layer_map():
    assert default_layer_map(12, 6) == DISTILBERT_LAYER_MAP == (0, 2, 4, 7, 9, 11)
    assert default_layer_map(4, 2) == (0, 3)
    assert default_layer_map(24, 12)[0] == 0 and default_layer_map(24, 12)[-1] == 23
    assert default_layer_map(6, 6) == tuple(range(6))
    with pytest.raises(ValueError, match="cannot be taken"):
        default_layer_map(4, 5)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_student_reproduces_teacher_embeddings_and_copies_mapped_layers(model_type):
    t_config, t_params = _teacher(model_type)
    s_config = student_config_from_teacher(t_config)
    assert s_config.num_layers == 6
    s_params = init_student_from_teacher(t_params, t_config, s_config)
    ids = np.array([[2, 10, 11, 12, 3, t_config.pad_token_id],
                    [2, 20, 21, 3, t_config.pad_token_id, t_config.pad_token_id]], np.int32)
    am = (ids != t_config.pad_token_id).astype(np.int32)
    teacher = Bert(t_config).apply({"params": t_params}, ids, am)
    # BERT's student is a DistilBERT; RoBERTa's a RoBERTa of 6 layers (DistilRoBERTa's layout,
    # token types and position offset kept): a mix-up of offsets or a dropped token-type row
    # moves the embeddings' output.
    assert type(s_config).__name__ == ("DistilBertConfig" if model_type == "bert" else "BertConfig")
    student = module_for(s_config)(s_config).apply({"params": s_params}, ids, am)
    real = am.astype(bool)
    np.testing.assert_array_equal(np.asarray(student.hidden_states[0])[real],
                                  np.asarray(teacher.hidden_states[0])[real])
    for k, t in enumerate(DISTILBERT_LAYER_MAP):
        chex.assert_trees_all_equal(s_params["encoder"][f"layer_{k}"], t_params["encoder"][f"layer_{t}"])
    chex.assert_trees_all_equal(s_params["mlm_head"], t_params["mlm_head"])
    chex.assert_trees_all_equal(s_params["word_embeddings"], t_params["word_embeddings"])
    # Student layer 0 is teacher layer 0: its output equals the teacher's first layer output.
    np.testing.assert_allclose(np.asarray(student.hidden_states[1])[real],
                               np.asarray(teacher.hidden_states[1])[real], atol=1e-6)


def test_reference_mode_drops_token_types_and_fresh_head():
    t_config, t_params = _teacher(layers=4)
    s_config = student_config_from_teacher(t_config, num_layers=2)
    s_params = init_student_from_teacher(t_params, t_config, s_config, layer_map=[1, 3],
                                         vocab_transform=False, fold_token_type=False,
                                         rng=jax.random.key(9))
    np.testing.assert_array_equal(s_params["position_embeddings"]["embedding"],
                                  t_params["position_embeddings"]["embedding"])
    chex.assert_trees_all_equal(s_params["encoder"]["layer_1"], t_params["encoder"]["layer_3"])
    np.testing.assert_array_equal(s_params["mlm_head"]["bias"], t_params["mlm_head"]["bias"])
    assert not np.allclose(s_params["mlm_head"]["transform"]["kernel"],
                           t_params["mlm_head"]["transform"]["kernel"])
    chex.assert_trees_all_equal_shapes(s_params["mlm_head"], t_params["mlm_head"])


def test_student_params_do_not_alias_the_teacher():
    t_config, t_params = _teacher(layers=2)
    s_params = init_student_from_teacher(t_params, t_config, student_config_from_teacher(t_config))
    before = jax.tree.map(np.array, t_params)
    jax.tree.map(lambda x: x.delete() if hasattr(x, "delete") else None, s_params)
    chex.assert_trees_all_equal(t_params, before)


def test_shape_mismatch_is_a_clear_error():
    t_config, t_params = _teacher(layers=2)
    s_config = student_config_from_teacher(t_config, hidden_size=8, num_heads=2, vocab_size=10)
    with pytest.raises(ValueError, match=r"hidden_size: teacher 16, student 8; vocab_size: teacher 64, student 10"):
        init_student_from_teacher(t_params, t_config, s_config)
    with pytest.raises(ValueError, match="layer_map"):
        init_student_from_teacher(t_params, t_config, student_config_from_teacher(t_config),
                                  layer_map=[5])


def _importance(t_config, seed):
    rng = np.random.default_rng(seed)
    return {"channels": rng.random(t_config.hidden_size),
            "heads": rng.random((t_config.num_layers, t_config.num_heads)),
            "neurons": rng.random((t_config.num_layers, t_config.intermediate_size))}


def test_a_pruned_student_that_keeps_everything_is_the_teacher_copy():
    t_config, t_params = _teacher(layers=4)
    s_config = student_config_from_teacher(t_config, num_layers=2)
    copied = init_student_from_teacher(t_params, t_config, s_config)
    pruned = init_student_from_teacher(t_params, t_config, s_config, importance=_importance(t_config, 0))
    chex.assert_trees_all_equal(pruned, copied)


def test_pruning_slices_every_tensor_by_importance():
    t_config, t_params = _teacher(layers=4)
    t_config4 = t_config.replace(num_heads=4)  # head size 4: a student of 2 heads is 8 wide
    t_params = init_params(Bert(t_config4), jax.random.key(3))
    s_config = student_config_from_teacher(t_config4, num_layers=2, hidden_size=8, num_heads=2,
                                           intermediate_size=12)
    imp = _importance(t_config4, 1)
    s = init_student_from_teacher(t_params, t_config4, s_config, layer_map=[1, 3], importance=imp)
    ch = np.sort(np.argsort(-imp["channels"])[:8])
    assert list(ch) == sorted(ch) and len(set(ch)) == 8
    tp = jax.tree.map(np.asarray, t_params)
    np.testing.assert_array_equal(s["word_embeddings"]["embedding"], tp["word_embeddings"]["embedding"][:, ch])
    np.testing.assert_array_equal(s["mlm_head"]["transform"]["kernel"],
                                  tp["mlm_head"]["transform"]["kernel"][np.ix_(ch, ch)])
    np.testing.assert_array_equal(s["mlm_head"]["bias"], tp["mlm_head"]["bias"])
    for k, t in enumerate([1, 3]):
        heads = np.sort(np.argsort(-imp["heads"][t])[:2])
        neurons = np.sort(np.argsort(-imp["neurons"][t])[:12])
        got, want = s["encoder"][f"layer_{k}"], tp["encoder"][f"layer_{t}"]
        np.testing.assert_array_equal(got["attention"]["query"]["kernel"],
                                      want["attention"]["query"]["kernel"][ch][:, heads])
        np.testing.assert_array_equal(got["attention"]["out"]["kernel"],
                                      want["attention"]["out"]["kernel"][heads][:, :, ch])
        np.testing.assert_array_equal(got["wi"]["kernel"], want["wi"]["kernel"][np.ix_(ch, neurons)])
        np.testing.assert_array_equal(got["wo"]["kernel"], want["wo"]["kernel"][np.ix_(neurons, ch)])
        np.testing.assert_array_equal(got["output_norm"]["scale"], want["output_norm"]["scale"][ch])
    chex.assert_trees_all_equal_shapes(s, init_params(DistilBert(s_config), jax.random.key(0)))
    with pytest.raises(ValueError, match="whole heads"):
        init_student_from_teacher(t_params, t_config4, s_config.replace(num_heads=4), importance=imp)


def test_most_important_breaks_ties_by_the_lower_index():
    assert list(most_important(np.array([1.0, 3.0, 3.0, 0.5, 3.0]), 2)) == [1, 2]
    assert list(most_important(np.array([0.1, 0.9, 0.5]), 3)) == [0, 1, 2]


def test_activation_importance_is_the_documented_mean_over_real_tokens():
    t_config, t_params = _teacher(layers=2)
    model = Bert(t_config)
    ids = np.array([[2, 10, 11, 12, 3, 0], [2, 20, 21, 3, 0, 0]], np.int32)
    am = (ids != 0).astype(np.int32)
    imp = activation_importance(model, t_params, [{"input_ids": ids, "attention_mask": am}])
    out, records = apply_recording(model, t_params, ids, am)
    real = am.astype(bool)
    want_channels = sum(np.abs(np.asarray(h, np.float64))[real].mean(0) for h in out.hidden_states)
    np.testing.assert_allclose(imp["channels"], want_channels, rtol=1e-5)
    for i, r in enumerate(records):
        np.testing.assert_allclose(imp["heads"][i], np.linalg.norm(np.asarray(r["context"], np.float64),
                                                                  axis=-1)[real].mean(0), rtol=1e-5)
        np.testing.assert_allclose(imp["neurons"][i], np.abs(np.asarray(r["ffn"], np.float64))[real].mean(0),
                                   rtol=1e-5)
    # Padding does not count: other pad ids in the padded positions change nothing.
    other = activation_importance(model, t_params, [{"input_ids": np.where(real, ids, 7), "attention_mask": am}])
    chex.assert_trees_all_close(other, imp, rtol=1e-6)
