"""Mode finetune through the trainer's one step and loop: plain fine-tuning and task
distillation (vs a float64 reference), accumulation, learning, resuming, question
answering, and the exports transformers loads with equal logits."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from distil_jax import data as data_lib
from distil_jax import parallel
from distil_jax.interop import hf, hf_heads
from distil_jax.train import task, trainer
from distil_jax.apps import export, finetune
from distil_jax.config import defaults, find_problems, with_changes
from distil_jax.data import squad, tasks
from distil_jax.models import Bert, BertConfig, DistilBert, DistilBertConfig, SequenceClassifier, init_params
from distil_jax.train.step import compiled_step

WORDS = "the cat sat on a mat while dogs ran past and birds sang in tall green trees".split()
SIZES = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64,
             hidden_dropout=0.0, attention_dropout=0.0)


def word_tokenizer():
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A random DistilBERT masked LM and a random 2-label BERT classifier (Hugging Face dirs)."""
    root = tmp_path_factory.mktemp("finetune")
    tok = word_tokenizer()
    student = DistilBertConfig(vocab_size=len(tok), **SIZES)
    student_dir = hf.save_hf_model(jax.device_get(init_params(DistilBert(student), jax.random.key(0))), student,
                                   str(root / "student"), tokenizer=tok)
    teacher = SequenceClassifier(Bert(BertConfig(vocab_size=len(tok), **SIZES)), 2)
    ids = np.zeros((1, 8), np.int32)
    params = jax.device_get(nn.meta.unbox(teacher.init(jax.random.key(1), ids, np.ones_like(ids))["params"]))
    teacher_dir = hf_heads.save_hf_classifier(params, teacher.config, str(root / "teacher"), ["no", "yes"], tok)
    return {"root": root, "student": student_dir, "teacher": teacher_dir, "tokenizer": tok}


def easy_task(tokenizer, n, seed):
    """Label 1 when "cat" occurs in the sentence: a random encoder learns it."""
    rng = np.random.default_rng(seed)
    others = [w for w in WORDS if w != "cat"]
    labels = rng.integers(0, 2, size=n)
    texts = []
    for y in labels:
        words = list(rng.choice(others, size=int(rng.integers(4, 10))))
        if y:
            words.insert(int(rng.integers(0, len(words))), "cat")
        texts.append(" ".join(words))
    return tasks.encode(tokenizer, texts, None, labels.astype(np.int32), max_len=16)


@pytest.fixture
def easy(monkeypatch):
    """stdlib_packages replaced by the easy task (same shapes and kinds)."""
    def data(tokenizer, classes, max_len):
        return easy_task(tokenizer, 512, 0), easy_task(tokenizer, 256, 1), ["no", "yes"]
    monkeypatch.setattr(tasks, "stdlib_packages_data", data)


def task_config(**changes):
    c = with_changes(defaults(), **{"mode": "finetune", "finetune.task": "stdlib_packages", "finetune.classes": 2,
                                    "finetune.train.batch_size": 16, "finetune.train.micro_batch_size": 16,
                                    "finetune.train.learning_rate": 3e-3,
                                    "finetune.train.epochs": 1, "train.log_every": 8, "checkpoint.every_steps": 16})
    return with_changes(c, **changes)


def first_update(config, workdir):
    """(params after the first update (no warmup: it moves them), its metrics, the params
    before, the trainer, the update's batches)."""
    tr = trainer.build(with_changes(config, **{"finetune.train.warmup_fraction": 0.0}), workdir)
    state = jax.jit(tr.create, out_shardings=tr.state_shardings)(tr.initial_params())
    before = jax.device_get(state.params)
    step = compiled_step(tr.model, tr.teacher, tr.tx, tr.schedule, tr.objective, tr.mesh, tr.state_shardings,
                         tr.teacher_shardings)
    local = data_lib.next_update(tr.data, tr.accumulation, tr.vocab.pad_id)
    state, metrics = step(state, tr.teacher_params, parallel.global_batch(local, tr.mesh))
    return jax.device_get(state.params), jax.device_get(metrics), before, tr, local


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def oracle_grad_norm(model, params, teacher_logits, rows, alpha_kd=0.0, t=1.0):
    """The global norm of the gradient of the mean cross-entropy over all of `rows` (plus
    alpha_kd times the KL(teacher_T || student_T) T^2 of `teacher_logits`), by jax.grad of
    the loss written out here, one device, the whole batch at once (no mesh, no partial
    sums); the sum of squares in float64."""
    def loss(p):
        logits = model.apply({"params": p}, rows["input_ids"], rows["attention_mask"]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        ce = -jnp.mean(jnp.take_along_axis(logp, rows["labels"][:, None].astype(jnp.int32), axis=-1))
        if not alpha_kd:
            return ce
        lt, ls = jax.nn.log_softmax(teacher_logits / t), jax.nn.log_softmax(logits / t)
        return ce + alpha_kd * jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls), -1)) * t * t
    grads = jax.device_get(jax.jit(jax.grad(loss))(params))
    return float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads))))


# The step's grad_norm (partial sums on 8 devices' rows, psum-reduced) against
# oracle_grad_norm's: float32 round-off, measured 3.6e-7 (plain) and 4.8e-7 (KD) relative.
# A mean over one device's rows is off by 8x, a pmean where the psum belongs by 1/8
# (measured: 0.875 relative), a sum over rows in place of the mean by 16x.
GRAD_NORM_RTOL = 5e-6


def kl_times_t2(student, teacher, t):
    lt, ls = log_softmax(teacher / t), log_softmax(student / t)
    return float(np.mean(np.sum(np.exp(lt) * (lt - ls), -1)) * t * t)


def test_task_step_distils_as_the_reference_and_without_kd_is_plain_finetuning(dirs, easy, tmp_path):
    kd = dict(**{"finetune.model": dirs["student"], "finetune.teacher": dirs["teacher"], "finetune.temperature": 3.0})
    plain, m_plain, before, tr, local = first_update(task_config(**{"finetune.model": dirs["student"]}), tmp_path / "a")
    zero, m_zero, _, _, _ = first_update(task_config(**kd, **{"finetune.alpha_kd": 0.0}), tmp_path / "b")
    full, m_full, _, tr_kd, _ = first_update(task_config(**kd, **{"finetune.alpha_kd": 0.5}), tmp_path / "c")
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(zero)):
        np.testing.assert_array_equal(a, b)  # alpha_kd = 0: the teacher changes nothing
    assert "loss_kd" not in m_zero and m_plain["loss"] == m_zero["loss"]
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(full))) > 1e-4
    # The KD term against float64 numpy on the same rows (no dropout: the student is deterministic).
    rows = {k: v[0] for k, v in local.items()}
    s_logits = np.asarray(tr.model.apply({"params": before}, rows["input_ids"], rows["attention_mask"]), np.float64)
    t_logits = np.asarray(tr_kd.teacher.apply({"params": jax.device_get(tr_kd.teacher_params)}, rows["input_ids"],
                                              rows["attention_mask"]), np.float64)
    np.testing.assert_allclose(m_full["loss_kd"], kl_times_t2(s_logits, t_logits, 3.0), rtol=2e-5)
    ce = -np.mean(log_softmax(s_logits)[np.arange(len(rows["labels"])), rows["labels"]])
    np.testing.assert_allclose(m_full["loss_task"], ce, rtol=2e-5)
    np.testing.assert_allclose(m_full["loss"], ce + 0.5 * m_full["loss_kd"], rtol=2e-5)
    # The gradients the step hands to AdamW (the params above hide their scale: AdamW's first
    # step moves each weight by about lr * sign(g)): their norm, without and with KD.
    rows32 = {k: jnp.asarray(v) for k, v in rows.items()}
    want_plain = oracle_grad_norm(tr.model, before, None, rows32)
    want_full = oracle_grad_norm(tr.model, before, jnp.asarray(t_logits, jnp.float32), rows32, 0.5, 3.0)
    assert want_full > 0 and abs(want_full / want_plain - 1) > 100 * GRAD_NORM_RTOL  # the KD term counts
    for got, want in ((m_plain["grad_norm"], want_plain), (m_zero["grad_norm"], want_plain),
                      (m_full["grad_norm"], want_full)):
        np.testing.assert_allclose(got, want, rtol=GRAD_NORM_RTOL)
    print("task step vs one-device jax.grad: grad_norm rel diff plain", abs(m_plain["grad_norm"] / want_plain - 1),
          "kd", abs(m_full["grad_norm"] / want_full - 1))


ACCUMULATION_RTOL = 1e-6  # 16x the loss's measured 6e-8


def test_task_accumulation_equals_the_big_batch(dirs, easy, tmp_path):
    kd = {"finetune.model": dirs["student"], "finetune.teacher": dirs["teacher"]}
    big, m_big, _, _, _ = first_update(task_config(**kd), tmp_path / "big")
    acc, m_acc, _, tr, _ = first_update(task_config(**kd, **{"finetune.train.micro_batch_size": 8}), tmp_path / "acc")
    assert tr.accumulation == 2 and m_acc["examples"] == m_big["examples"] == 16
    # The loss (a mean over the micro-batches) and the norm of the gradient AdamW is given, at
    # float32 round-off (measured 6e-8 and 0): a sum over rows in place of the mean (2x here)
    # or a micro-batch counted twice change them, and AdamW's params could hide that.
    loss = {name: m["loss"] / m["finite_micro_batches"] for name, m in (("big", m_big), ("acc", m_acc))}
    assert m_big["finite_micro_batches"] == 1 and m_acc["finite_micro_batches"] == 2
    print("accumulated vs one batch: rel diff loss", abs(loss["acc"] / loss["big"] - 1), "grad_norm",
          abs(m_acc["grad_norm"] / m_big["grad_norm"] - 1))
    np.testing.assert_allclose(loss["acc"], loss["big"], rtol=ACCUMULATION_RTOL)
    np.testing.assert_allclose(m_acc["grad_norm"], m_big["grad_norm"], rtol=ACCUMULATION_RTOL)
    assert m_big["grad_norm"] > 0
    for a, b in zip(jax.tree.leaves(big), jax.tree.leaves(acc)):
        np.testing.assert_allclose(a, b, atol=1e-5)  # AdamW moves each by ~lr = 3e-3: no sign differs


def test_finetune_learns_resumes_distils_and_exports_for_pipelines(dirs, easy, tmp_path, monkeypatch):
    config = task_config(**{"finetune.train.epochs": 6})
    teacher_run = str(tmp_path / "teacher_run")
    scores, hits, (module, params, _, _) = finetune.finetune_in(config, teacher_run, dirs["student"])
    assert scores["accuracy"] > 0.9 and scores["updates"] == 6 * 512 // 16, scores
    assert scores["accuracy"] == hits.mean() and scores["labels"] == ["no", "yes"]
    records = open(os.path.join(teacher_run, "metrics.jsonl")).read()
    with monkeypatch.context() as m:  # finished: read back from the checkpoint, no trainer built
        m.setattr(trainer, "build", lambda *a, **k: pytest.fail("a finished run was rebuilt to be read"))
        again, _, _ = finetune.finetune_in(config, teacher_run, dirs["student"])
    assert again["accuracy"] == scores["accuracy"] and open(os.path.join(teacher_run, "metrics.jsonl")).read() == records
    assert again["updates"] == scores["updates"]

    out = export.export_checkpoint(teacher_run, str(tmp_path / "hf"))
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(theirs).__name__ == "DistilBertForSequenceClassification"
    assert theirs.config.id2label == {0: "no", 1: "yes"}
    held = easy_task(dirs["tokenizer"], 64, 2)
    with torch.no_grad():
        want = theirs(input_ids=torch.tensor(held["input_ids"], dtype=torch.long),
                      attention_mask=torch.tensor(held["attention_mask"], dtype=torch.long)).logits.numpy()
    ours = np.asarray(module.apply({"params": jax.device_get(params)}, held["input_ids"], held["attention_mask"]))
    np.testing.assert_allclose(ours, want, atol=1e-4)
    found = transformers.pipeline("text-classification", model=out)(["the cat sat on a mat", "dogs ran past"])
    assert [f["label"] for f in found] == ["yes", "no"]

    # The student distilled from the fine-tuned run's checkpoint (a finetune run's directory).
    student_cfg = task_config(**{"finetune.train.epochs": 1, "finetune.temperature": 2.0})
    kd_scores, _, _ = finetune.finetune_in(student_cfg, str(tmp_path / "kd"), dirs["student"], teacher_run)
    last = json.loads(open(tmp_path / "kd" / "metrics.jsonl").read().splitlines()[-1])
    assert last["loss_kd"] > 0 and kd_scores["teacher"] == teacher_run
    assert finetune.finished_run(with_changes(student_cfg, **{"finetune.model": dirs["student"],
                                                             "finetune.teacher": teacher_run}), str(tmp_path / "kd"))
    more = finetune.finetune_in(task_config(**{"finetune.train.epochs": 7}), teacher_run, dirs["student"])[0]
    assert more["updates"] == 7 * 512 // 16  # another epoch asked for: the trainer resumes the run


def qa_examples(n, seed):
    """Questions "where cat" or "where dogs" on a context of 12 words holding each of the two
    once: the answer is the asked word, so where it is depends on the question."""
    rng = np.random.default_rng(seed)
    others = [w for w in WORDS if w not in ("cat", "dogs")]
    out = []
    for i in range(n):
        words = list(rng.choice(others, size=12))
        for w, at in zip(("cat", "dogs"), rng.choice(12, size=2, replace=False)):
            words[at] = w
        asked = ("cat", "dogs")[int(rng.integers(0, 2))]
        j = words.index(asked)
        out.append({"id": f"q{i}", "question": f"where {asked}", "context": " ".join(words), "answers": [asked],
                    "answer_starts": [len(" ".join(words[:j])) + (1 if j else 0)]})
    return out


# Points (of 100) by which the fine-tuned model's EM and F1 beat both the untrained model's
# and the best fixed position's on the 32 held-out questions: measured 40.6 (EM 59.4 vs
# 18.8) and 41.7 (F1 60.4 vs 18.8); the untrained model scores EM 0, F1 11.7.
QA_MARGIN = {"exact_match": 20.0, "f1": 20.0}


def test_question_answering_trains_decodes_and_exports(dirs, monkeypatch, tmp_path):
    monkeypatch.setattr(squad, "read_squad", lambda split, data_dir="": qa_examples(96 if split == "train" else 32,
                                                                                     split == "train"))
    config = task_config(**{"finetune.task": "squad/v1.1", "finetune.max_len": 24, "finetune.stride": 8,
                            "finetune.train.epochs": 4})
    scores, per_question, (module, params, qa, _) = finetune.finetune_in(config, str(tmp_path / "qa"), dirs["student"])
    assert set(scores) >= {"exact_match", "f1"} and 0 <= scores["exact_match"] <= scores["f1"] <= 100
    assert len(per_question) == 32 and np.isclose(100 * per_question.mean(), scores["f1"])
    # It learned: above the same model before training (its fresh head) and above the best
    # answer that ignores the question (the word at one position of every context).
    untrained = task.evaluate(module, trainer.build(with_changes(config, **{"finetune.model": dirs["student"]}),
                                                    str(tmp_path / "untrained")).initial_params(), qa)[0]
    golds = {q["id"]: q["answers"] for q in qa.questions}
    by_position = [squad.squad_scores({q["id"]: q["context"].split()[j] for q in qa.questions}, golds)
                   for j in range(12)]
    best = {k: max(b[k] for b in by_position) for k in ("exact_match", "f1")}
    print("QA held out: trained", {k: scores[k] for k in best}, "untrained", untrained, "best fixed position", best)
    for k in best:
        assert scores[k] >= max(untrained[k], best[k]) + QA_MARGIN[k], (k, scores[k], untrained[k], best[k])
    out = export.export_checkpoint(str(tmp_path / "qa"), str(tmp_path / "qa_hf"))
    theirs = transformers.AutoModelForQuestionAnswering.from_pretrained(out).eval()
    features, _ = squad.features(dirs["tokenizer"], qa_examples(4, 5), 24, 8)
    with torch.no_grad():
        got = theirs(input_ids=torch.tensor(features["input_ids"], dtype=torch.long),
                     attention_mask=torch.tensor(features["attention_mask"], dtype=torch.long))
    start, end = module.apply({"params": jax.device_get(params)}, features["input_ids"], features["attention_mask"])
    np.testing.assert_allclose(np.asarray(start), got.start_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(end), got.end_logits.numpy(), atol=1e-4)


def test_finetune_config_problems_are_named():
    found = find_problems(task_config(**{"finetune.task": "squad", "finetune.alpha_task": 0.0,
                                         "finetune.train.micro_batch_size": 5}))
    text = " | ".join(found)
    assert "finetune.task 'squad' is not stdlib_packages, glue/NAME or squad/v1.1" in text
    assert "not a multiple of finetune.train.micro_batch_size 5" in text
    assert "nothing to train on" in text
    assert find_problems(task_config()) == []
    assert "unknown key 'finetune.train.no_such_key'" in " | ".join(
        find_problems(task_config(**{"finetune.train.no_such_key": 1})))


def test_the_fine_tuning_recipe_is_set_once_in_finetune_train():
    """What the fine-tuning runs with: finetune.train's values over train.*, every other
    train.* key the config's (no hidden recipe overwriting what the config says)."""
    config = task_config(**{"train.dtype": "bfloat16", "train.grad_clip": 7.0, "finetune.train.adam_b2": 0.95})
    run = task.task_training(config)
    recipe = config.finetune.train
    assert {k: run.train[k] for k in recipe} == recipe.to_dict()
    assert run.train.adam_b2 == 0.95 and run.train.dtype == "bfloat16"
    assert run.train.grad_clip == recipe.grad_clip == 1.0  # the recipe names it: its value, not train's
    del config.finetune.train["grad_clip"]
    assert task.task_training(config).train.grad_clip == 7.0  # not named: the config's


def test_a_signal_during_finetuning_stops_the_mode_before_it_evaluates(dirs, easy, tmp_path, monkeypatch):
    """SIGTERM in the fine-tuning stage (here: the flag up from the start) stops the mode after
    that stage's checkpoint, with main's resumable exit, not with a score of a half-trained
    model; the same command then resumes and finishes."""
    import signal as signal_lib

    from distil_jax import main as main_lib
    from distil_jax import runtime
    config = task_config(**{"finetune.model": dirs["student"], "finetune.dir": str(tmp_path / "ft")})
    enter = runtime.PreemptionFlag.__enter__

    def signalled(self):
        flag = enter(self)
        flag.signal = signal_lib.SIGTERM
        return flag
    monkeypatch.setattr(runtime.PreemptionFlag, "__enter__", signalled)
    with pytest.raises(runtime.Stopped, match="stopped by SIGTERM at update 1 of"):
        main_lib.run(config, str(tmp_path))
    assert not (tmp_path / "finetune.json").exists()
    assert (tmp_path / "ft" / "checkpoints" / "1").is_dir()
    monkeypatch.setattr(runtime.PreemptionFlag, "__enter__", enter)
    result = main_lib.run(config, str(tmp_path))
    assert result["updates"] > 1 and (tmp_path / "finetune.json").exists()
