"""Vocabulary pruning (data/vocab_prune.py): the kept ids, the tokenizers of the three
model types (WordPiece, Unigram, byte-level BPE) giving exactly the remapped ids on the
corpus, the params and config cut to the kept rows, the logits and KL that follow, the
ids of a prepared corpus and its batches remapped."""

import argparse
import functools
import json
import textwrap

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from distil_jax.data import loader as loader_lib
from distil_jax.data import vocab_prune as vp
from distil_jax.data.prepare import prepare
from distil_jax.data.sources import docstrings
from distil_jax.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, special_ids, train_wordpiece
from distil_jax.data.types import VocabInfo
from distil_jax.models import Bert, BertConfig, DistilBert, DistilBertConfig, SequenceClassifier, init_params
from distil_jax.models.deberta import DebertaV2, DebertaV2Config
from distil_jax.models.modernbert import ModernBert, ModernBertConfig
from distil_jax.train.student_init import init_student_from_teacher, student_config_from_teacher

ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
OTHER_SCRIPTS = ["Größe und Übermaß: eine naïve Äußerung im Café", "東京は日本の首都です。京都もまた古い都です。",
                 "Привет, мир! Как дела у тебя сегодня?", "emoji 🙂 and maths ∑ x² ≤ ∞"]


@functools.lru_cache(maxsize=None)
def texts():
    """Docstrings of a few stdlib modules (the embedded corpus's kind of text) and lines in
    other scripts: (the texts tokenizers are trained on, the corpus subset pruned to)."""
    docs = [d for module in (json, textwrap, argparse, functools) for d in docstrings(module.__file__)]
    docs += OTHER_SCRIPTS
    return tuple(docs), tuple(docs[::4])


def _wrap(tok, **specials):
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **specials)


def wordpiece():
    """mBERT-like: the repo's WordPiece (WordPieceTrainer) laid out as BERT's vocab.txt is,
    [PAD] [unused0..19] [UNK] [CLS] [SEP] [MASK] then the pieces, so that pruning the
    never-seen [unused] tokens moves the specials (and [CLS] $A [SEP]'s ids)."""
    trained = train_wordpiece(texts()[0], vocab_size=1500, lowercase=False)
    pieces = [t for t, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1]) if t not in SPECIAL_TOKENS]
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(20)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + pieces
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=None)  # train_wordpiece's
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 22), ("[SEP]", 23)])
    return _wrap(tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                 do_lower_case=False)


def unigram():
    """XLM-R-like: SentencePiece Unigram over Metaspace, <s> <pad> </s> <unk> first, <s> $A
    </s> </s> $B </s>, and <mask> last (here an added token beyond the model's pieces)."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts()[0], trainer=trainers.UnigramTrainer(
        vocab_size=1200, special_tokens=ROBERTA_SPECIALS[:4], unk_token="<unk>", show_progress=False))
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return _wrap(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", sep_token="</s>", cls_token="<s>",
                 pad_token="<pad>", mask_token="<mask>")


def bpe():
    """RoBERTa-like: byte-level BPE with RobertaProcessing; its specials appended after the
    merges' tokens (added tokens, as GPT-2-style tokenizers have them), so that they move."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts()[0], trainer=trainers.BpeTrainer(
        vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(ROBERTA_SPECIALS)
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")))
    return _wrap(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", sep_token="</s>", cls_token="<s>",
                 pad_token="<pad>", mask_token="<mask>")


TOKENIZERS = {"wordpiece": wordpiece, "unigram": unigram, "bpe": bpe}


@functools.lru_cache(maxsize=None)
def tokenizer(kind):
    return TOKENIZERS[kind]()


def seen_ids(tok, docs):
    """The ids of `docs` as prepare.py sees them (no special tokens added)."""
    return np.unique(np.concatenate([e.ids for e in tok.backend_tokenizer.encode_batch(list(docs),
                                                                                      add_special_tokens=False)]))


def shuffled_texts(docs, n, seed=0):
    """New texts from the corpus's words in random order (WordPiece, Metaspace and
    ByteLevel pre-tokenise on whitespace, so a word's pieces do not depend on its neighbours)."""
    rng = np.random.default_rng(seed)
    words = [w for d in docs for w in d.split()]
    return [" ".join(rng.choice(words, rng.integers(3, 40))) for _ in range(n)]


# --- the tokenizers --------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_pruned_tokenizer_gives_the_remapped_ids_on_corpus_text(kind, tmp_path):
    # Catches: ids renumbered out of order, a post-processor's [CLS]/[SEP] (or <s>/</s>)
    # ids not remapped, Unigram scores lost or misplaced, BPE merges reordered or cut to a
    # set not closed, added tokens beyond the model's pieces (<mask>, BPE's specials)
    # numbered apart from the kept order, special tokens not carried over; and a saved
    # pruned tokenizer that loads differently.
    tok = tokenizer(kind)
    everything, subset = texts()
    kept = vp.kept_vocab_for(tok, seen_ids(tok, subset), len(tok))
    assert kept.size < 0.85 * len(tok)  # a real pruning, not the identity
    pruned = vp.prune_tokenizer(tok, kept)
    assert len(pruned) == kept.size

    shuffled = [t for t in shuffled_texts(subset, 60)
                if not len(kept.dropped_among(tok(t, add_special_tokens=False)["input_ids"]))]
    assert len(shuffled) >= 20
    for text in list(subset) + shuffled:
        old = tok(text)["input_ids"]
        new = pruned(text)["input_ids"]
        assert new == kept.remap(old).tolist(), text[:80]
        assert pruned.decode(new) == tok.decode(old)
    old_pair, new_pair = tok(subset[1], subset[2]), pruned(subset[1], subset[2])
    assert new_pair["input_ids"] == kept.remap(old_pair["input_ids"]).tolist()
    moved = 0
    for attr in vp.SPECIAL_ATTRIBUTES:
        assert getattr(pruned, attr) == getattr(tok, attr)
        if getattr(tok, attr) is not None:
            assert getattr(pruned, attr + "_id") == kept.remap(getattr(tok, attr + "_id"))
            moved += getattr(pruned, attr + "_id") != getattr(tok, attr + "_id")
    assert moved  # some special's id changed: the post-processor's and added tokens' ids were remapped

    held = [d for d in everything if d not in subset]  # text outside the corpus has dropped ids
    assert any(len(kept.dropped_among(tok(d)["input_ids"])) for d in held)

    pruned.save_pretrained(tmp_path)  # what a run writes next to its prepared data
    again = load_tokenizer(str(tmp_path))
    assert again(subset[3])["input_ids"] == pruned(subset[3])["input_ids"]
    assert again.mask_token_id == kept.remap(tok.mask_token_id) and len(again) == kept.size


def test_bpe_needs_the_kept_set_closed_under_its_merges():
    # Catches: no closure (a kept token whose parts were dropped could never be built: the
    # pruned merges would give other tokens), a closure that stops after one level, and a
    # prune_tokenizer that silently accepts an open set.
    tok = tokenizer("bpe")
    _, subset = texts()
    open_set = vp.kept_vocab(seen_ids(tok, subset), len(tok), vp.tokenizer_special_ids(tok))
    with pytest.raises(ValueError, match="not closed under the BPE merges.*close_under_merges"):
        vp.prune_tokenizer(tok, open_set)
    closed = vp.close_under_merges(open_set, tok)
    assert set(open_set.kept.tolist()) < set(closed.kept.tolist())
    assert vp.close_under_merges(closed, tok) == closed  # a fixed point
    state = json.loads(tok.backend_tokenizer.to_str())["model"]
    for a, b in state["merges"]:  # every merge that makes a kept token has both parts kept
        if closed.old_to_new[state["vocab"][a + b]] >= 0:
            assert closed.old_to_new[state["vocab"][a]] >= 0 and closed.old_to_new[state["vocab"][b]] >= 0
    for kind in ("wordpiece", "unigram"):  # nothing to close
        other = tokenizer(kind)
        kept = vp.kept_vocab(seen_ids(other, subset), len(other), vp.tokenizer_special_ids(other))
        assert vp.close_under_merges(kept, other) is kept


def test_unigram_keeps_the_unknown_score_where_it_was():
    # Catches: the unknown-character score (lowest piece score - 10) rising with the
    # lowest-scoring pieces dropped. Here "abcd" is ab + cd (-40) while [UNK] costs -110;
    # with "zzz" (-100) dropped it would cost -30, and abc + [UNK] (-31) would win.
    vocab = [("<unk>", 0.0), ("ab", -20.0), ("cd", -20.0), ("abc", -1.0), ("zzz", -100.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    tok = _wrap(tok, unk_token="<unk>")
    assert tok("abcd")["input_ids"] == [1, 2] and tok("abc")["input_ids"] == [3]
    kept = vp.kept_vocab_for(tok, seen_ids(tok, ["abcd", "abc"]), len(tok))
    assert kept.kept.tolist() == [0, 1, 2, 3]
    pruned = vp.prune_tokenizer(tok, kept)
    assert pruned("abcd")["input_ids"] == [1, 2] and pruned("abc")["input_ids"] == [3]
    scores = json.loads(pruned.backend_tokenizer.to_str())["model"]["vocab"]
    assert scores == [["<unk>", -100.0], ["ab", -20.0], ["cd", -20.0], ["abc", -1.0]]


def test_missing_or_outside_specials_are_refused_with_the_fix():
    # Catches: a special id beyond the model's vocabulary (a tokenizer of another model)
    # or a missing one passing silently, and a tokenizer pruned without its [MASK].
    with pytest.raises(ValueError, match=r"mask has id 12, outside the vocabulary \(ids 0..9\).*use the model's "
                                         "own tokenizer"):
        vp.kept_vocab([1, 2], 10, {"pad": 0, "mask": 12})
    with pytest.raises(ValueError, match="the special token cls is missing"):
        vp.kept_vocab([1, 2], 10, {"cls": None})
    with pytest.raises(ValueError, match="corpus holds token id 10.*another tokenizer"):
        vp.kept_vocab([1, 10], 10, {"pad": 0})
    tok = tokenizer("wordpiece")
    specials = {k: i for k, i in vp.tokenizer_special_ids(tok).items() if i != tok.mask_token_id}
    no_mask = vp.kept_vocab(seen_ids(tok, texts()[1]), len(tok), specials)
    with pytest.raises(ValueError, match=f"special token 'mask' \\(id {tok.mask_token_id}\\) is not in the kept "
                                         "vocabulary.*kept_vocab_for"):
        vp.prune_tokenizer(tok, no_mask)
    assert vp.kept_vocab({5: 3, 7: 0, 2: 1}, 10, [0]).kept.tolist() == [0, 2, 5]  # counts: ids seen > 0 times


def test_remap_refuses_dropped_ids_and_round_trips(tmp_path):
    # Catches: a dropped id silently mapped to -1 (an out-of-range gather on device) or
    # to another token, ids outside the old vocabulary, and a file that loads differently.
    kept = vp.kept_vocab([9, 3, 3, 5], 12, [0, 1])
    assert kept.kept.tolist() == [0, 1, 3, 5, 9] and kept.size == 5
    assert kept.old_to_new.tolist() == [0, 1, -1, 2, -1, 3, -1, -1, -1, 4, -1, -1]
    ids = np.array([[0, 9, 5], [3, 1, 1]])
    assert kept.remap(ids).tolist() == [[0, 4, 3], [2, 1, 1]] and kept.remap(ids).dtype == np.int32
    assert (kept.kept[kept.remap(ids)] == ids).all()
    with pytest.raises(ValueError, match=r"2 token id\(s\) are not in the pruned vocabulary \(4, 7; it keeps 5 of 12"):
        kept.remap([0, 7, 4, 7])
    for outside in (-1, 12):
        with pytest.raises(ValueError, match=f"\\({outside};"):
            kept.remap([0, outside])
    with pytest.raises(ValueError, match="strictly ascending"):
        vp.KeptVocab(np.array([3, 1]), 12)
    path = kept.save(str(tmp_path))
    assert path.endswith(vp.KEPT_FILE)
    assert vp.KeptVocab.load(str(tmp_path)) == kept and vp.KeptVocab.load(str(tmp_path)) != vp.kept_vocab([9], 12)
    with pytest.raises(ValueError, match="holds no pruned vocabulary"):
        vp.KeptVocab.load(str(tmp_path / "elsewhere"))


# --- params, logits, KL ----------------------------------------------------------------
SMALL = dict(vocab_size=61, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=24)


def test_vocab_paths_are_every_vocabulary_sized_param():
    # Catches: a vocabulary-indexed leaf left unpruned (MLM bias, ModernBERT's untied
    # decoder, a task head's nested embeddings) or a leaf cut that is not one.
    bert = {"word_embeddings/embedding": 0, "mlm_head/bias": 0}
    assert vp.vocab_paths(Bert(BertConfig(**SMALL))) == bert
    assert vp.vocab_paths(DistilBert(DistilBertConfig(**SMALL))) == bert
    assert vp.vocab_paths(DebertaV2(DebertaV2Config(**SMALL))) == bert
    untied = ModernBertConfig(**SMALL, pad_token_id=0, tie_word_embeddings=False)
    assert vp.vocab_paths(ModernBert(untied)) == {**bert, "mlm_head/decoder": 0}
    assert vp.vocab_paths(SequenceClassifier(Bert(BertConfig(**SMALL)), 3)) == {"encoder/word_embeddings/embedding": 0}


def _roberta_teacher():
    config = BertConfig(**SMALL, model_type="roberta", pad_token_id=1, type_vocab_size=1)
    params = init_params(Bert(config), jax.random.key(0))
    # A non-zero MLM bias, so that cutting it is tested too.
    params["mlm_head"]["bias"] = jax.random.normal(jax.random.key(1), params["mlm_head"]["bias"].shape)
    return config, params


def test_pruned_model_logits_are_the_kept_columns_and_its_softmax_the_conditional():
    # Catches: rows cut in another order than the new ids (logits of other tokens), the
    # MLM bias not cut (shape error) or cut apart from the embeddings, a RoBERTa pad id
    # that moves (shifted position ids change every hidden state), and a KL that would not
    # be the teacher's distribution conditioned on the kept set.
    config, params = _roberta_teacher()
    rng = np.random.default_rng(0)
    kept = vp.kept_vocab(rng.choice(np.arange(5, 61), 20, replace=False), 61, [0, 1, 2, 3, 4])
    pruned_config = vp.prune_config(config, kept)
    assert (pruned_config.vocab_size, pruned_config.pad_token_id) == (kept.size, 1)
    pruned = vp.prune_params(params, kept, vp.vocab_paths(Bert(config)))
    assert pruned["word_embeddings"]["embedding"].shape == (kept.size, 16) and pruned["mlm_head"]["bias"].shape == (25,)
    assert pruned["encoder"]["layer_0"]["wi"]["kernel"] is params["encoder"]["layer_0"]["wi"]["kernel"]  # shared

    ids = rng.choice(kept.kept[5:], (3, 12)).astype(np.int32)
    ids[:, 0], ids[1, 8:], ids[2, 5:] = 0, 1, 1  # <s> ..., then padding
    mask = (ids != 1).astype(np.int32)
    full = Bert(config).apply({"params": params}, ids, mask)
    cut = Bert(pruned_config).apply({"params": pruned}, kept.remap(ids), mask)
    np.testing.assert_allclose(cut.last_hidden_state, full.last_hidden_state, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cut.logits, np.asarray(full.logits)[..., kept.kept], rtol=0, atol=1e-6)
    for temperature in (1.0, 2.0):
        z = np.asarray(full.logits, np.float64) / temperature  # float64, on the host
        p = np.exp(z - z.max(-1, keepdims=True))
        p = (p / p.sum(-1, keepdims=True))[..., kept.kept]
        conditional = p / p.sum(-1, keepdims=True)  # p'(t) = p(t) / sum over kept
        np.testing.assert_allclose(jax.nn.softmax(cut.logits / temperature, axis=-1), conditional, rtol=0, atol=1e-6)
        assert p.sum(-1).max() < 0.9  # the dropped tokens had mass: a real renormalisation


def test_student_init_commutes_with_pruning_and_bad_inputs_are_refused():
    # Catches: a student cut apart from its teacher (pruning the teacher then initialising
    # the student must equal initialising then pruning), a KeptVocab of another model,
    # a wrong path, and a pad id that would move or vanish.
    config, params = _roberta_teacher()
    kept = vp.kept_vocab(np.arange(20, 50), 61, [0, 1, 2, 3, 4])
    student = student_config_from_teacher(config, num_layers=1)
    after = vp.prune_params(init_student_from_teacher(params, config, student), kept,
                            vp.vocab_paths(DistilBert(student)))
    pruned_config = vp.prune_config(config, kept)
    before = init_student_from_teacher(vp.prune_params(params, kept, vp.vocab_paths(Bert(config))), pruned_config,
                                       student_config_from_teacher(pruned_config, num_layers=1))
    assert jax.tree.structure(after) == jax.tree.structure(before)
    jax.tree.map(np.testing.assert_array_equal, after, before)

    with pytest.raises(ValueError, match="vocab_size is 61, the kept vocabulary was chosen from 70"):
        vp.prune_config(config, vp.kept_vocab([5], 70, [0, 1]))
    with pytest.raises(ValueError, match="has 61 rows along axis 0, not 70.*vocab_paths"):
        vp.prune_params(params, vp.kept_vocab([5], 70, [0, 1]), {"word_embeddings/embedding": 0})
    with pytest.raises(ValueError, match="mlm_head/decoder is not a param"):
        vp.prune_params(params, kept, {"mlm_head/decoder": 0})
    with pytest.raises(ValueError, match="moves the pad id from 1 to 0.*keep ids 0..1"):
        vp.prune_config(config, vp.kept_vocab([5], 61, [1]))
    with pytest.raises(ValueError, match="pad_token_id 1 is not in the kept vocabulary"):
        vp.prune_config(config, vp.kept_vocab([5], 61, [0]))
    bert = BertConfig(**SMALL, pad_token_id=7)  # positions do not depend on it: it is renumbered
    assert vp.prune_config(bert, vp.kept_vocab([3, 9], 61, [0, 7])).pad_token_id == 2


def test_parameter_counts_follow_the_shapes():
    # Catches: a count that misses the MLM bias or the student's embeddings, or counts the
    # student with the teacher's layers.
    teacher = BertConfig(vocab_size=1000, hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64,
                         max_position_embeddings=34, type_vocab_size=1, model_type="roberta", pad_token_id=1)
    counts = vp.parameter_counts(teacher, 100, student_layers=2)
    assert counts["teacher"] - counts["teacher_pruned"] == 900 * (32 + 1)  # embedding rows + bias entries
    assert counts["student"] - counts["student_pruned"] == 900 * (32 + 1)
    layer = 4 * (32 * 32 + 32) + 2 * 32 + (32 * 64 + 64) + (64 * 32 + 32) + 2 * 32  # attention, norm, FFN, norm
    # A RoBERTa's student is a RoBERTa (DistilRoBERTa's layout: positions and token types kept): only layers differ.
    assert counts["teacher"] - counts["student"] == 2 * layer
    assert vp.parameter_counts(teacher, vp.kept_vocab(range(99), 1000, [999]))["kept_size"] == 100


# --- a prepared corpus -----------------------------------------------------------------
def test_seen_ids_of_a_prepared_corpus_and_its_batches_remapped(tmp_path, corpus):
    # Catches: seen ids taken from the train split alone (an eval batch would then hold
    # dropped ids), shards missed, and batches remapped wrongly or with their state lost.
    tok = tokenizer("wordpiece")
    tok.save_pretrained(tmp_path / "tok")
    train, held = tmp_path / "train.txt", tmp_path / "eval.txt"
    corpus.write(train, 200, min_words=12)
    held.write_text("\n".join(" ".join(["the parser returns the value of an argument"] * 2)
                              for _ in range(10)) + "\n")
    config = corpus.config([train], vocab=len(tok), tokenizer=str(tmp_path / "tok"), docs_per_shard=40)
    config.data.sources.text.eval_files = [str(held)]
    data_dir = str(tmp_path / "data")
    prepare(config, data_dir, progress=False)

    read = {split: loader_lib.PreparedSplit(data_dir, split) for split in ("train", "eval")}
    ids = {split: np.unique(np.concatenate([s[i] for i in range(len(s))])) for split, s in read.items()}
    seen = vp.corpus_seen_ids(data_dir)
    np.testing.assert_array_equal(seen, np.union1d(ids["train"], ids["eval"]))
    np.testing.assert_array_equal(vp.corpus_seen_ids(data_dir, ("train",)), ids["train"])
    assert len(np.setdiff1d(ids["eval"], ids["train"]))  # the eval split adds ids of its own

    kept = vp.kept_vocab_for(tok, seen, len(tok))
    kw = dict(micro_batch_size=8, seed=3, num_threads=1, prefetch=2, pad_id=tok.pad_token_id)
    plain = loader_lib.BatchLoader(read["train"], **kw)
    remapped = vp.RemappedBatches(loader_lib.BatchLoader(read["train"], **kw), kept)
    assert remapped.sequences_per_epoch == plain.sequences_per_epoch
    for _ in range(3):
        a, b = next(plain), next(remapped)
        np.testing.assert_array_equal(kept.kept[b["input_ids"]], a["input_ids"])
        np.testing.assert_array_equal(b["attention_mask"], a["attention_mask"])
    assert remapped.get_state() == plain.get_state() and remapped.next_batch_index == 3

    counts = np.load(f"{data_dir}/token_counts.npy")
    info = vp.prune_vocab_info(VocabInfo(len(tok), tok.pad_token_id, tok.mask_token_id, special_ids(tok), counts),
                               kept)
    assert special_ids(tok) == (0, 21, 22, 23, 24)  # [PAD], [UNK], [CLS], [SEP], [MASK]; [unused*] dropped
    assert (info.vocab_size, info.pad_id, info.mask_id, info.special_ids) == (kept.size, 0, 4, (0, 1, 2, 3, 4))
    np.testing.assert_array_equal(info.token_counts, counts[kept.kept])
