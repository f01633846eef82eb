"""Students of another shape: narrower, fewer heads, cut from the teacher by pruning, with
layer-pair terms; they train, resume, shard and export like the paper's student."""

import json
import shutil

import chex
import numpy as np
import pytest
import torch  # the test extra: without it this file fails to collect (no skip)
import transformers

from conftest import NARROW
from distil_jax import config as config_lib
from distil_jax import assets
from distil_jax.interop import hf
from distil_jax.train import trainer
from distil_jax.apps import export, shapes
from distil_jax.checkpoint import load_model
from distil_jax.config import with_changes
from distil_jax.models import BertConfig
from distil_jax.terms import LayerTerm, LossWeights, layer_terms

TERMS = {**NARROW, "distill.layer_terms": (("relation",), ("hidden_mse", 0, 0), ("hidden_mse", -1, -1, 2.0)),
         "distill.relation_heads": 2, "train.steps": 4, "checkpoint.every_steps": 2}


def test_a_narrow_pruned_student_trains_resumes_shards_and_exports(tmp_path, tiny, host):
    config = tiny(**TERMS)
    straight, summary = trainer.train(config, str(tmp_path / "a"))
    assert set(straight.params["projections"]) == {"hidden_mse_0_0", "hidden_mse_2_1"}
    assert straight.params["projections"]["hidden_mse_2_1"]["kernel"].shape == (16, 32)
    m = summary["metrics"]
    assert all(np.isfinite(m[k]) and m[k] > 0 for k in ("loss_relation_2_1", "loss_hidden_mse_0_0",
                                                        "loss_hidden_mse_2_1", "loss_ce", "loss_mlm"))
    assert "loss_cos" not in m  # the widths differ: no last-layer cosine
    # Resumed from update 2 = uninterrupted (the projections and their moments included).
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
    resumed, _ = trainer.train(config, str(tmp_path / "b"))
    chex.assert_trees_all_close(host(resumed.params), host(straight.params), atol=1e-6)
    chex.assert_trees_all_close(host(resumed.opt_state), host(straight.opt_state), atol=1e-6)
    # Sharded over data, fsdp and tensor axes = data parallel only.
    sharded, _ = trainer.train(tiny(**TERMS, **{"mesh.shape": (2, 2, 2)}), str(tmp_path / "c"))
    chex.assert_trees_all_close(host(sharded.params), host(straight.params), atol=2e-5, rtol=1e-4)

    # Exported without its projections, as DistilBertForMaskedLM of the student's shape.
    out = export.export_checkpoint(str(tmp_path / "a"), str(tmp_path / "hf"))
    module, params, _ = load_model(str(tmp_path / "a"))
    assert "projections" not in params
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "DistilBertForMaskedLM"
    assert (loaded.config.dim, loaded.config.n_heads, loaded.config.hidden_dim, loaded.config.n_layers) == (16, 2, 32, 1)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 128, size=(3, 12)).astype(np.int32)
    am = (np.arange(12)[None] < np.array([[12], [9], [5]])).astype(np.int32)
    with torch.no_grad():
        want = loaded(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(am)).logits.numpy()
    np.testing.assert_allclose(module.apply({"params": params}, ids, am).logits, want, atol=1e-4)
    chex.assert_trees_all_close(hf.load_hf_model(out)[1], params, atol=0)
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_pruning_keeps_the_teachers_function_when_it_keeps_everything(tmp_path, tiny, host):
    """student.init=prune at the teacher's shape is the layer copy, exactly."""
    same = {"student.init": "prune", "student.num_layers": 2}
    pruned = trainer.build(tiny(**same), str(tmp_path / "p")).initial_params()
    copied = trainer.build(tiny(**{**same, "student.init": "teacher"}), str(tmp_path / "t")).initial_params()
    chex.assert_trees_all_equal(host(pruned), host(copied))


def test_layer_terms_are_resolved_and_bad_ones_named():
    assert layer_terms([("relation",), ("hidden_mse", 0, 0), ("attention_kl", -1, -1, 0.5)], 12, 6) == (
        LayerTerm("relation", 12, 6), LayerTerm("hidden_mse", 0, 0), LayerTerm("attention_kl", 12, 6, 0.5))
    assert layer_terms([("relation",)], 24, 6) == (LayerTerm("relation", 21, 6),)  # an upper-middle layer
    with pytest.raises(ValueError) as e:
        layer_terms([("relaton",), ("attention_kl", 0, 1), ("hidden_mse", 13, 1), ("hidden_cos", 1, 1),
                     ("hidden_cos", 1, 1)], 12, 6)
    for part in ("'relaton'", "teacher layer 0 is not in 1..12", "teacher layer 13 is not in 0..12",
                 "hidden_cos_1_1 is given twice"):
        assert part in str(e.value)


def test_config_problems_of_other_shapes_are_listed_before_anything_runs(tiny):
    teacher = config_lib.teacher_model(tiny())  # 32 wide, 4 heads of 8, 2 layers
    cases = {
        "student.init='prune' keeps whole heads": {**NARROW, "student.num_heads": 4},
        "student.hidden_size 64 is larger than the teacher's 32": {**NARROW, "student.hidden_size": 64,
                                                                     "student.num_heads": 8},
        "distill.relation_heads 3 does not divide": {**NARROW, "distill.layer_terms": (("relation",),),
                                                     "distill.relation_heads": 3},
        "attention_kl compares heads one to one": {**NARROW, "distill.layer_terms": (("attention_kl",),)},
        "distill.alpha_cos > 0 needs equal widths": {**NARROW, "distill.alpha_cos": 1.0},
        "student.hidden_size 16 differs from the teacher's 32": {**NARROW, "student.init": "teacher"},
        "is not in 1..1": {"distill.layer_terms": (("relation", 2, 2),)},
    }
    for message, changes in cases.items():
        problems = config_lib.find_problems(tiny(**changes), 8, teacher)
        assert any(message in p for p in problems), (message, problems)
    assert config_lib.find_problems(tiny(**TERMS), 8, teacher) == []


def test_the_minilm_config_is_a_valid_relation_only_student_of_bert_base(config_file):
    config = config_file("minilm_l6_h384").get_config()
    assert config_lib.find_problems(config, 8, BertConfig()) == []  # bert-base-uncased's architecture
    weights = LossWeights.from_config(config, 12, config.student.num_layers)
    assert weights.layers == (LayerTerm("relation", 12, 6),) and weights.uses_teacher
    assert (weights.ce, weights.mlm, weights.cos) == (0.0, 0.0, 0.0)


# Mode shapes at CI's size: each student trained 3 updates of 16 sequences of 32, one
# held-out batch (its 7 passes), the demo's batch of 32 otherwise; the narrow students of
# 2 layers (half the teacher's depth: the prune row also picks layers), not the default 4.
SHAPES = {"mode": "shapes", "data.seq_len": 32, "data.length_buckets": (32,), "demo.student_train.steps": 3,
          "demo.narrow.num_layers": 2,
          "train.batch_size": 16, "train.micro_batch_size": 16, "eval.batches": 1, "finetune.train.epochs": 0,
          "demo.inference_batches": 1, "student.prune_batches": 2, "checkpoint.every_steps": 1000,
          "demo.mlm_only_baseline": False}


@pytest.mark.slow  # the second tier (pytest.ini): python -m pytest -q -m slow tests
def test_students_of_another_shape_table(tmp_path, config_file, run_main):
    """Mode shapes on the demo's corpus and shipped teacher in a fresh workdir (its demo
    student first), at a small size (SHAPES): the rows, the comparisons with paired errors,
    and pruning's head start over random init (97 CPU-s alone). A subprocess at the suite's fast code
    generation: with 3 updates per student, compiling is most of its time (measured with
    narrow students of 4 layers: 82 s alone against 103 s at XLA's defaults)."""
    config = with_changes(config_file("demo").get_config(), **SHAPES)
    run_main("configs/demo.py", tmp_path, *(f"--config.{k}={v}" for k, v in SHAPES.items()), timeout=900)
    out = json.loads((tmp_path / "shapes.json").read_text())
    rows = {r["model"]: r for r in out["rows"]}
    assert list(rows)[:6] == ["teacher", shapes.HALF_DEPTH, shapes.MLM_ONLY, shapes.KD, shapes.KD_RELATIONS,
                              shapes.KD_HIDDEN] and len(rows) == 7
    pruned = list(rows)[-1]
    assert pruned.startswith("prune init") and out["best_objective"] in shapes.variants(config, hf.read_config(assets.DEMO_TEACHER))
    narrow, teacher = rows[shapes.KD], rows["teacher"]
    assert (narrow["layers"], narrow["width"], narrow["heads"]) == (2, 128, 2)
    assert all((r["layers"], r["width"]) == (2, 128) for r in list(rows.values())[2:])
    assert narrow["non_embedding_parameters"] / teacher["non_embedding_parameters"] == pytest.approx(0.125, abs=0.005)
    assert set(out["comparisons"]) == {f"{shapes.KD_RELATIONS} - {shapes.KD}", f"{shapes.KD_HIDDEN} - {shapes.KD}",
                                       f"{shapes.KD} - {shapes.MLM_ONLY}", f"{pruned} - {out['best_objective']}"}
    gain = out["comparisons"][f"{pruned} - {out['best_objective']}"]
    assert gain["difference"] > 3 * gain["se"], gain  # the pruned teacher starts far ahead
    table = (tmp_path / "shapes.md").read_text()
    assert pruned in table and "± " in table and "per million parameters" in table

