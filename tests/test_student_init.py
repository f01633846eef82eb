"""Student initialisation from the teacher: layer map, embeddings, head."""

import chex
import jax
import numpy as np
import pytest

from distil_jax.models import Bert, BertConfig, DistilBert, init_params
from distil_jax.student_init import (DISTILBERT_LAYER_MAP, default_layer_map,
                                     init_student_from_teacher, student_config_from_teacher)


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
    student = DistilBert(s_config).apply({"params": s_params}, ids, am)
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
