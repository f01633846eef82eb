"""Teachers of every family through the real command: a random transformers checkpoint
saved with its own tokenizer (every tensor randomised, biases and norms included), distilled
for a few updates by `main.run` on a text corpus, exported, and loaded back by
transformers with the student's logits; the refusals a family brings, before anything runs."""

import chex
import jax
import ml_collections
import numpy as np
import pytest
import torch  # the test extra: without it this file fails to collect (it does not skip)
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from conftest import tiny_config
from distil_jax import main
from distil_jax.checkpoint import load_model
from distil_jax.config import ConfigError, find_problems, with_changes
from distil_jax.data import vocab_prune
from distil_jax.data.vocab_prune import count_params
from distil_jax.interop import hf
from distil_jax.models import BertConfig, DebertaV2Config, ModernBertConfig, init_params, module_for
from distil_jax.models.students import layer_map_for, student_config_from_teacher
from distil_jax.train.student_init import init_student_from_teacher

WORDS = ("return the value of a list sorted by key and its length in bytes when given an object "
         "raise an error if none found else yield each item from the iterator").split()
SEQ = 16


def _corpus(path, n=200, seed=0):
    rng = np.random.default_rng(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS, rng.integers(8, 30))) for _ in range(n)) + "\n")
    return path


def _tokenizer(kind: str, corpus, pieces: int = 0) -> transformers.PreTrainedTokenizerFast:
    """A tokenizer of the family's kind trained on the corpus: byte-level BPE with RoBERTa's
    specials (<s>=0, <pad>=1, </s>=2, <mask>) or ModernBERT's ([CLS], [SEP], [MASK], [PAD]);
    SentencePiece-style Unigram with XLM-R's or DeBERTa-v3's ([PAD]=0)."""
    roberta = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}
    bert = {"cls": "[CLS]", "pad": "[PAD]", "sep": "[SEP]", "unk": "[UNK]", "mask": "[MASK]"}
    specials = {"roberta": roberta, "xlm-roberta": roberta, "modernbert": bert, "deberta-v2": bert}[kind]
    order = (["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if specials is roberta
             else ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"])
    if kind in ("roberta", "modernbert"):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=order,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=pieces or 90, special_tokens=order, unk_token=order[3])
    tok.train([str(corpus)], trainer)
    first, last = (specials["bos"], specials["eos"]) if specials is roberta else (specials["cls"], specials["sep"])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{first} $A {last}", pair=f"{first} $A {last} {last} $B {last}",
        special_tokens=[(first, tok.token_to_id(first)), (last, tok.token_to_id(last))])
    named = ({"bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>"} if specials is roberta
             else {"cls_token": "[CLS]", "sep_token": "[SEP]"})
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=specials["pad"],
                                                unk_token=specials["unk"], mask_token=specials["mask"], **named)


def _hf_model(kind: str, vocab: int, pad: int, seed: int, **changes):
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=48, pad_token_id=pad)
    if kind in ("roberta", "xlm-roberta"):
        cls = transformers.RobertaConfig if kind == "roberta" else transformers.XLMRobertaConfig
        config = cls(**common, max_position_embeddings=SEQ + pad + 1, type_vocab_size=1, layer_norm_eps=1e-5)
        model = (transformers.RobertaForMaskedLM if kind == "roberta" else transformers.XLMRobertaForMaskedLM)(config)
    elif kind == "deberta-v2":
        config = transformers.DebertaV2Config(
            **common, max_position_embeddings=64, relative_attention=True, max_relative_positions=16,
            position_buckets=8, pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
            position_biased_input=False, type_vocab_size=0, layer_norm_eps=1e-7, **changes)
        model = transformers.DebertaV2ForMaskedLM(config)
    else:
        config = transformers.ModernBertConfig(
            **common, max_position_embeddings=64, global_attn_every_n_layers=2, local_attention=8,
            norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True,
            bos_token_id=None, eos_token_id=None, cls_token_id=None, sep_token_id=None)
        model = transformers.ModernBertForMaskedLM(config)
    model.config._attn_implementation = "eager"
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # every tensor: norms, biases and position tables included
            p.normal_(0.0, 0.2)
    return model.eval()


def _teacher_dir(tmp_path, kind, headless=False, tokenizer_text=None, pieces=0):
    corpus = _corpus(tmp_path / "corpus.txt")
    tok = _tokenizer(kind, tokenizer_text or corpus, pieces)
    model = _hf_model(kind, len(tok), tok.pad_token_id, seed=len(kind))
    directory = tmp_path / "teacher"
    if headless:  # the released DeBERTa-v3 checkpoints: the encoder alone
        model.deberta.save_pretrained(directory)
    else:
        model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory, corpus


def _run(directory, corpus, workdir, **more):
    changes = {"teacher.path": str(directory), "data.source": "corpus", "data.seq_len": SEQ,
               "data.length_buckets": (SEQ,),
               "data.sources": ml_collections.ConfigDict({"text": {"kind": "text", "files": [str(corpus)]}}),
               "student.num_layers": 2, "train.steps": 2, "train.batch_size": 16, "train.micro_batch_size": 8,
               "checkpoint.every_steps": 2, "train.log_every": 1, "mesh.shape": (-1, 1, 1), **more}
    return main.run(with_changes(tiny_config(), **changes), str(workdir))


# XLM-R (RoBERTa's architecture under its own name) goes through the same steps pruned, below.
CLASSES = {"roberta": "RobertaForMaskedLM", "deberta-v2": "DebertaV2ForMaskedLM", "modernbert": "ModernBertForMaskedLM"}


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """`distilled(kind)`: (teacher dir, corpus, workdir, run's result, export dir) of a
    teacher of that family distilled for 2 updates and exported, once per module."""
    runs = {}

    def get(kind):
        if kind not in runs:
            tmp = tmp_path_factory.mktemp(kind)
            directory, corpus = _teacher_dir(tmp, kind)
            out = _run(directory, corpus, tmp / "run")
            export = _run(directory, corpus, tmp / "run", mode="export")["export_dir"]
            runs[kind] = (directory, corpus, tmp / "run", out, export)
        return runs[kind]
    return get


@pytest.mark.parametrize("kind", list(CLASSES))
def test_a_teacher_of_each_family_distils_exports_and_reloads(kind, distilled):
    """A student of the teacher's family (2 of its 4 layers) trains 2 updates with the
    triple loss, exports as the family's *ForMaskedLM, and transformers gives the logits our
    student gives (a wrong table row, transform or config field moves them)."""
    directory, _, workdir, out, export = distilled(kind)
    m = out["metrics"]
    assert out["update"] == 2 and all(np.isfinite(m[k]) and m[k] > 0 for k in ("loss_ce", "loss_mlm", "loss_cos"))
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(export).eval()
    assert type(loaded).__name__ == CLASSES[kind] and loaded.config.num_hidden_layers == 2
    module, params, _ = load_model(str(workdir))
    tok = transformers.AutoTokenizer.from_pretrained(export)
    rows = tok(["return the value of a list", "raise an error"])["input_ids"]
    ids = np.full((2, SEQ), tok.pad_token_id, np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row[:SEQ]
    am = (ids != tok.pad_token_id).astype(np.int32)
    with torch.no_grad():
        want = loaded(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(am)).logits.numpy()
    got = np.asarray(module.apply({"params": params}, ids, am).logits)
    real = am.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=2e-6)
    chex.assert_trees_all_close(hf.load_hf_model(export)[1], params, atol=0)
    # The teacher as loaded: ours against transformers on its own directory (logits up to
    # ~1.4; measured max 4.2e-7 over the four families, the students' exports alike).
    teacher, t_params = hf.load_hf_model(str(directory))
    ref = transformers.AutoModelForMaskedLM.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        t_want = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(am)).logits.numpy()
    t_got = np.asarray(teacher.apply({"params": t_params}, ids, am).logits)
    np.testing.assert_allclose(t_got[real], t_want[real], atol=2e-6)


def test_roberta_end_to_end_classifier_in_a_pipeline(distilled, tmp_path):
    """The RoBERTa student (byte-level BPE, <s> </s> <mask>, padding id 1, positions from 2)
    fine-tuned on the embedded task for 2 updates, exported as
    RobertaForSequenceClassification (classifier.dense + out_proj) that
    pipeline("text-classification") loads with the labels and the scores our model gives."""
    directory, corpus, workdir, _, student_hf = distilled("roberta")
    ft = tmp_path / "ft"
    _run(directory, corpus, workdir, mode="finetune",
         **{"finetune.model": student_hf, "finetune.dir": str(ft), "finetune.max_len": SEQ,
            "finetune.train.steps": 2, "finetune.train.epochs": 0, "finetune.train.micro_batch_size": 8,
            "finetune.train.batch_size": 16, "finetune.classes": 3})
    hf_dir = _run(directory, corpus, ft, mode="export")["export_dir"]
    classifier = transformers.pipeline("text-classification", model=hf_dir, top_k=None)
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    assert config.architectures == ["RobertaForSequenceClassification"] and config.num_labels == 3
    text = "return the value of a list"
    scores = {s["label"]: s["score"] for s in classifier([text])[0]}
    assert set(scores) == set(config.id2label.values())
    # The pipeline's probabilities are our fine-tuned classifier's (classifier.dense + tanh,
    # out_proj: a head mapped to BERT's pooler names would move them).
    module, params, meta = load_model(str(ft))
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = np.asarray([tok(text)["input_ids"]], np.int32)
    ours = np.asarray(jax.nn.softmax(module.apply({"params": params}, ids, np.ones_like(ids))[0]))
    want = np.array([scores[config.id2label[i]] for i in range(3)])
    np.testing.assert_allclose(ours, want, atol=1e-6)


def test_a_headless_deberta_v3_teacher_distils_through_hidden_states(tmp_path):
    """A DeBERTa encoder without MLM head (as the released v3 checkpoints): alpha_ce > 0 is
    refused before anything runs, with the fix; with alpha_ce = 0 the student (a fresh head,
    the teacher's layers) trains on the cosine, relation and MLM terms."""
    directory, corpus = _teacher_dir(tmp_path, "deberta-v2", headless=True)
    assert not hf.read_config(str(directory)).mlm_head
    with pytest.raises(ConfigError, match=r"distill\.alpha_ce > 0 needs the teacher's MLM logits.*alpha_ce=0"):
        _run(directory, corpus, tmp_path / "refused")
    assert not (tmp_path / "refused" / "checkpoints").exists()
    out = _run(directory, corpus, tmp_path / "run",
               **{"distill.alpha_ce": 0.0, "distill.layer_terms": (("relation",),)})
    m = out["metrics"]
    assert "loss_ce" not in m and "kl_t1" not in m
    assert all(np.isfinite(m[k]) and m[k] > 0 for k in ("loss_mlm", "loss_cos", "loss_relation_4_2"))


def _modernbert_teacher(layers=6, every=3):
    config = ModernBertConfig(vocab_size=64, hidden_size=16, num_layers=layers, num_heads=2, intermediate_size=24,
                              global_attn_every_n_layers=every, local_attention=4, norm_bias=True)
    params = init_params(module_for(config)(config), jax.random.key(0))
    return config, jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(x.size), x.shape), params)


def test_a_modernbert_student_keeps_the_global_local_pattern():
    """Student layer i is global iff i % n == 0 (the teacher's rule), and takes a teacher
    layer of its own kind; the rest (embeddings, final norm, head) is the teacher's."""
    teacher, params = _modernbert_teacher(layers=9, every=3)  # global: 0, 3, 6
    student = student_config_from_teacher(teacher, 4)
    assert student.attention_types == ("full_attention", "sliding_attention", "sliding_attention", "full_attention")
    layer_map = layer_map_for(teacher, student)
    assert layer_map == (0, 2, 5, 6) and [teacher.is_global(t) for t in layer_map] == [True, False, False, True]
    s_params = init_student_from_teacher(params, teacher, student)
    for k, t in enumerate(layer_map):
        chex.assert_trees_all_equal(s_params["encoder"][f"layer_{k}"], params["encoder"][f"layer_{t}"])
    for name in ("word_embeddings", "embeddings_norm", "final_norm", "mlm_head"):
        chex.assert_trees_all_equal(s_params[name], params[name])
    with pytest.raises(ValueError, match=r"breaks ModernBERT's attention pattern.*student layer 1 \(sliding-window\) "
                                         r"<- teacher layer 3 \(global\).*e\.g\. \(0, 2, 5, 6\)"):
        init_student_from_teacher(params, teacher, student, layer_map=(0, 3, 4, 6))


def test_a_deberta_student_carries_the_relative_table():
    config = DebertaV2Config(vocab_size=64, hidden_size=16, num_layers=4, num_heads=2, intermediate_size=24,
                             max_position_embeddings=32, max_relative_positions=8, position_buckets=4)
    params = init_params(module_for(config)(config), jax.random.key(1))
    student = student_config_from_teacher(config, 2)
    s_params = init_student_from_teacher(params, config, student)
    np.testing.assert_array_equal(s_params["encoder"]["rel_embeddings"], params["encoder"]["rel_embeddings"])
    chex.assert_trees_all_equal(s_params["encoder"]["rel_norm"], params["encoder"]["rel_norm"])
    chex.assert_trees_all_equal(s_params["encoder"]["layer_1"], params["encoder"]["layer_3"])
    # The student's first layer reproduces the teacher's: the table and the layer came across.
    ids = np.arange(3, 15, dtype=np.int32)[None]
    t_out = module_for(config)(config).apply({"params": params}, ids)
    s_out = module_for(student)(student).apply({"params": s_params}, ids)
    np.testing.assert_allclose(s_out.hidden_states[1], t_out.hidden_states[1], atol=1e-6)


def test_the_distilroberta_config_is_a_valid_student_of_roberta_base(config_file):
    """configs/distilroberta.py against roberta-base's architecture: no problem, and the
    student it builds has distilroberta-base's published 82M parameters (roberta-base 125M),
    counted from the shapes (a DistilBERT student would have no token types, a pooler or
    the wrong offset would add or remove rows)."""
    config = config_file("distilroberta").get_config()
    roberta_base = BertConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                              layer_norm_eps=1e-5, model_type="roberta")
    assert find_problems(config, 8, roberta_base) == [] and not config.data.lowercase
    student = student_config_from_teacher(roberta_base, config.student.num_layers)
    assert type(student).__name__ == "BertConfig" and student.model_type == "roberta"
    assert layer_map_for(roberta_base, student) == (0, 2, 4, 7, 9, 11)
    assert round(count_params(module_for(student)(student)) / 1e6) == 82
    assert round(count_params(module_for(roberta_base)(roberta_base)) / 1e6) == 125


OTHER_WORDS = ("ein Wort das niemand hier braucht und ein anderes dazu une phrase que personne ne lit "
               "jamais dans ce corpus zeta omega kappa lambda").split()


def test_an_xlmr_teacher_distils_into_a_student_of_the_corpus_vocabulary(tmp_path):
    """student.vocab=prune: the teacher's tokenizer knows words the corpus never uses; the
    run keeps only the ids the prepared corpus holds (and the specials), slices teacher and
    student to them, and exports an XLMRobertaForMaskedLM of that vocabulary with a
    tokenizer that gives the kept ids of what the teacher's gave, and the same logits in
    transformers as ours (a dropped row, a shifted id or an unsliced bias moves them)."""
    rng = np.random.default_rng(1)
    wide = tmp_path / "wide.txt"
    wide.write_text("\n".join(" ".join(rng.choice(WORDS + OTHER_WORDS, 20)) for _ in range(300)) + "\n")
    directory, corpus = _teacher_dir(tmp_path, "xlm-roberta", tokenizer_text=wide, pieces=160)
    teacher_tok = transformers.AutoTokenizer.from_pretrained(directory)
    workdir = tmp_path / "run"
    out = _run(directory, corpus, workdir, **{"student.vocab": "prune"})
    assert out["update"] == 2 and all(np.isfinite(out["metrics"][k]) for k in ("loss_ce", "loss_mlm", "loss_cos"))
    kept = vocab_prune.KeptVocab.load(str(workdir / "data" / vocab_prune.PRUNED_DIR))
    assert kept.old_size == len(teacher_tok) and kept.size < len(teacher_tok) - 20, (kept.size, len(teacher_tok))
    export = _run(directory, corpus, workdir, mode="export", **{"student.vocab": "prune"})["export_dir"]
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(export).eval()
    tok = transformers.AutoTokenizer.from_pretrained(export)
    assert type(loaded).__name__ == "XLMRobertaForMaskedLM" and loaded.config.vocab_size == kept.size == len(tok)
    lines = corpus.read_text().splitlines()[:20]
    for line in lines:
        assert tok(line)["input_ids"] == kept.remap(np.asarray(teacher_tok(line)["input_ids"])).tolist()
    module, params, _ = load_model(str(workdir))
    assert params["word_embeddings"]["embedding"].shape[0] == kept.size
    ids = np.full((2, SEQ), tok.pad_token_id, np.int32)
    for i, line in enumerate(lines[:2]):
        row = tok(line)["input_ids"][:SEQ]
        ids[i, :len(row)] = row
    am = (ids != tok.pad_token_id).astype(np.int32)
    with torch.no_grad():
        want = loaded(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(am)).logits.numpy()
    got = np.asarray(module.apply({"params": params}, ids, am).logits)
    np.testing.assert_allclose(got[am.astype(bool)], want[am.astype(bool)], atol=2e-6)
    # The unpruned teacher as loaded, against transformers' XLMRobertaForMaskedLM, on its own ids.
    teacher, t_params = hf.load_hf_model(str(directory))
    ref = transformers.AutoModelForMaskedLM.from_pretrained(directory).eval()
    t_ids = np.asarray([teacher_tok(lines[0])["input_ids"][:SEQ]], np.int32)
    with torch.no_grad():
        t_want = ref(input_ids=torch.tensor(t_ids, dtype=torch.long)).logits.numpy()
    assert type(ref).__name__ == "XLMRobertaForMaskedLM"
    np.testing.assert_allclose(np.asarray(teacher.apply({"params": t_params}, t_ids).logits), t_want, atol=2e-6)


def test_a_family_refusal_is_a_config_problem_before_anything_runs(tiny):
    """Checked by `find_problems` with the teacher's architecture (what main does before it
    loads or compiles anything): a ModernBERT layer map that mixes attention kinds, pruning
    outside BERT, a headless teacher with alpha_ce, student.vocab=prune without a corpus."""
    modernbert, _ = _modernbert_teacher(layers=9, every=3)
    headless = DebertaV2Config(vocab_size=64, hidden_size=16, num_layers=4, num_heads=2, intermediate_size=24,
                               max_position_embeddings=32, mlm_head=False)
    cases = [
        (modernbert, {"student.num_layers": 4, "student.layer_map": (0, 3, 4, 6)},
         "student.layer_map (0, 3, 4, 6) breaks ModernBERT's attention pattern"),
        (modernbert, {"student.num_layers": 2, "student.init": "prune", "student.hidden_size": 8,
                      "student.num_heads": 1, "distill.alpha_cos": 0.0},
         "student.init='prune' cuts BERT teachers into DistilBERT students"),
        (headless, {"student.num_layers": 2}, "distill.alpha_ce > 0 needs the teacher's MLM logits"),
        (headless, {"student.num_layers": 2, "distill.alpha_ce": 0.0, "distill.alpha_mse": 1.0},
         "distill.alpha_mse > 0 needs the teacher's MLM logits"),
        (modernbert, {"student.num_layers": 2, "student.vocab": "prune"}, "needs data.source='corpus'"),
    ]
    for teacher, changes, message in cases:
        problems = find_problems(tiny(**changes), 8, teacher)
        assert any(message in p for p in problems), (message, problems)
    assert find_problems(tiny(**{"student.num_layers": 4, "student.layer_map": (0, 2, 5, 6)}), 8, modernbert) == []
    assert find_problems(tiny(**{"student.num_layers": 2, "distill.alpha_ce": 0.0}), 8, headless) == []
