"""Every bad input of the reliability issue, one row each: the error type and a message naming it.

A row is (action, error type, needles): the action gets a fresh tmp dir and the suite's
fixtures (`kit`: tiny, corpus) and must raise that error with every needle in its
message. An error type of None means the input is accepted and the action checks what
was done with it (non-UTF-8 bytes: replaced, counted).
"""

import os
import shutil
import types

import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from distil_jax import config as config_lib
from distil_jax.interop import hf
from distil_jax.train import trainer
from distil_jax.checkpoint import CheckpointMismatch
from distil_jax.data import DataError
from distil_jax.data.prepare import prepare
from distil_jax.data.tokenizer import train_wordpiece
from distil_jax.models import Bert, BertConfig, DistilBert, DistilBertConfig, init_params


# --- config -----------------------------------------------------------------------------
def config_unknown_key(tmp, kit):
    c = kit.tiny()
    with c.unlocked():
        c.train.stpes = 5
    config_lib.validate(c, num_devices=1)


def config_wrong_types_and_unknown_key_at_once(tmp, kit):
    c = kit.tiny()
    with c.unlocked():  # as a config built from a JSON file would be
        c.checkpoint = ml_collections.ConfigDict(dict(c.checkpoint.to_dict(), keep="3"))
        c.train.learning_rate = None
        c.masking.smoothng = 0.5
    config_lib.validate(c, num_devices=1)


def config_impossible_sizes(tmp, kit):
    c = kit.tiny(**{"train.batch_size": 30, "data.seq_len": 64, "student.init": "random",
                "student.num_heads": 5, "mesh.shape": (-1, 1, 1)})
    config_lib.validate(c, num_devices=8)


# --- teacher ------------------------------------------------------------------------------
def _student_dir(tmp, tokenizer=None, vocab=64):
    config = DistilBertConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4,
                              intermediate_size=64, max_position_embeddings=64)
    params = init_params(DistilBert(config), jax.random.key(0))
    return hf.save_hf_model(params, config, str(tmp / "hf"), tokenizer=tokenizer)


def teacher_missing_dir(tmp, kit):
    hf.load_hf_model(str(tmp / "no-such-teacher"))


def teacher_without_weights(tmp, kit):
    os.remove(os.path.join(_student_dir(tmp), "model.safetensors"))
    hf.load_hf_model(str(tmp / "hf"))


def teacher_without_config(tmp, kit):
    os.remove(os.path.join(_student_dir(tmp), "config.json"))
    hf.load_hf_model(str(tmp / "hf"))


def teacher_truncated_weights(tmp, kit):
    path = os.path.join(_student_dir(tmp), "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    hf.load_hf_model(str(tmp / "hf"))


def teacher_unsupported_type(tmp, kit):
    (tmp / "config.json").write_text('{"model_type": "gpt2"}')
    hf.load_hf_model(str(tmp))


def teacher_missing_and_extra_tensors(tmp, kit):
    path = os.path.join(_student_dir(tmp), "model.safetensors")
    state = safetensors.numpy.load_file(path)
    del state["distilbert.transformer.layer.1.ffn.lin2.bias"]
    state["distilbert.transformer.layer.9.ffn.lin2.bias"] = np.zeros(32, np.float32)
    safetensors.numpy.save_file(state, path, metadata={"format": "pt"})
    hf.load_hf_model(str(tmp / "hf"))


def teacher_tensor_of_the_wrong_shape(tmp, kit):
    path = os.path.join(_student_dir(tmp), "model.safetensors")
    state = safetensors.numpy.load_file(path)
    state["distilbert.transformer.layer.0.ffn.lin1.weight"] = np.zeros((32, 32), np.float32)
    safetensors.numpy.save_file(state, path, metadata={"format": "pt"})
    hf.load_hf_model(str(tmp / "hf"))


def _distill_from(teacher_dir, corpus, kit, **data):
    c = kit.corpus.config([corpus], seq_len=32, **data)
    c.mode = "distill"
    c.teacher.path = str(teacher_dir)
    c.student.num_layers = 1
    c.train.update(steps=1, batch_size=16, micro_batch_size=16)
    c.mesh.shape = (-1, 1, 1)
    return c


def teacher_tokenizer_larger_than_its_vocabulary(tmp, kit):
    corpus = tmp / "corpus.txt"
    kit.corpus.write(corpus, 100)
    tok = train_wordpiece(corpus.read_text().splitlines(), vocab_size=64)
    teacher = BertConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                         max_position_embeddings=64)
    hf.save_hf_model(init_params(Bert(teacher), jax.random.key(0)), teacher, str(tmp / "teacher"),
                     tokenizer=tok)
    trainer.build(_distill_from(tmp / "teacher", corpus, kit), str(tmp / "work"))


CASED = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "The", "A", "Return", "Cat", "Sat", "On", "Mat",
         "While", "Dogs", "Ran", "##s", "."] + [w.capitalize() for w in "and birds sang loud songs".split()]


def _cased_teacher(tmp):
    """A teacher directory as some research releases are: config.json, weights and a
    case-sensitive vocab.txt, nothing saying the tokenizer must not lowercase."""
    teacher = BertConfig(vocab_size=len(CASED), hidden_size=32, num_layers=2, num_heads=4,
                         intermediate_size=64, max_position_embeddings=64)
    hf.save_hf_model(init_params(Bert(teacher), jax.random.key(0)), teacher, str(tmp / "teacher"))
    (tmp / "teacher" / "vocab.txt").write_text("\n".join(CASED) + "\n")
    corpus = tmp / "corpus.txt"
    rng = np.random.default_rng(0)
    words = [w for w in CASED[5:] if not w.startswith("##") and w != "."]
    corpus.write_text("\n".join(" ".join(rng.choice(words, 20)) + " ." for _ in range(120)) + "\n")
    return tmp / "teacher", corpus


def teacher_case_sensitive_vocab_read_lowercased(tmp, kit):
    teacher, corpus = _cased_teacher(tmp)
    trainer.build(_distill_from(teacher, corpus, kit), str(tmp / "work"))


def teacher_case_sensitive_vocab_read_as_it_is(tmp, kit):
    teacher, corpus = _cased_teacher(tmp)
    tr = trainer.build(_distill_from(teacher, corpus, kit, lowercase=False), str(tmp / "work"))
    assert tr.vocab.vocab_size == len(CASED) and any((tmp / "work" / "data" / "train").glob("*"))  # prepared
    batch = next(tr.data)
    assert (batch["input_ids"][batch["attention_mask"] == 1] != 1).mean() > 0.9  # hardly any [UNK]


# --- data -------------------------------------------------------------------------------------
def data_missing_files(tmp, kit):
    prepare(kit.corpus.config([tmp / "nope-*.txt"]), str(tmp / "out"), progress=False)


def data_empty_corpus(tmp, kit):
    (tmp / "empty.txt").write_text("\n\n")
    prepare(kit.corpus.config([tmp / "empty.txt"]), str(tmp / "out"), progress=False)


def _tiny_on_text(tmp, kit, name, content: bytes):
    """configs/tiny.py (a random teacher of vocabulary 256) reading one text file, as a new
    user tries it: the WordPiece is trained on that file."""
    (tmp / name).write_bytes(content)
    c = kit.tiny(**{"data.source": "corpus", "data.dir": str(tmp / "data"), "teacher.model.vocab_size": 256})
    c.data.sources = ml_collections.ConfigDict({"mine": {"kind": "text", "files": [str(tmp / name)]}})
    trainer.build(c, str(tmp / "work"))


def data_empty_text_file(tmp, kit):
    _tiny_on_text(tmp, kit, "empty.txt", b"")


def data_binary_garbage(tmp, kit):
    """20 KB of random bytes as a text source: refused as not text, before a tokenizer is
    trained on it (once one was, its 753 entries reached a 256-entry teacher) and with
    nothing written."""
    try:
        _tiny_on_text(tmp, kit, "garbage.bin", np.random.default_rng(0).bytes(20_000))
    finally:
        assert not (tmp / "data" / "manifest.json").exists() and not list((tmp / "data").rglob("*.array_record"))


def data_more_characters_than_the_vocabulary(tmp, kit):
    """Text (valid UTF-8) of more distinct characters than the teacher has embeddings: the
    WordPiece trained on it would be larger than the vocabulary, and is refused."""
    rng = np.random.default_rng(0)
    letters = [chr(c) for c in range(0x4E00, 0x4E00 + 400)]  # 400 CJK characters
    text = "\n".join(" ".join("".join(rng.choice(letters, 3)) for _ in range(12)) for _ in range(300))
    try:
        _tiny_on_text(tmp, kit, "many.txt", text.encode())
    finally:
        assert not (tmp / "data" / "manifest.json").exists() and not list((tmp / "data").rglob("*.array_record"))


def data_a_single_short_line(tmp, kit):
    _tiny_on_text(tmp, kit, "one.txt", b"hello world, this is my corpus\n")


def data_every_document_filtered(tmp, kit):
    (tmp / "short.txt").write_text("\n".join(kit.corpus.words * 5))  # [CLS] word [SEP]: too short to keep
    prepare(kit.corpus.config([tmp / "short.txt"]), str(tmp / "out"), progress=False)


def data_non_utf8_bytes_replaced_and_counted(tmp, kit):
    corpus = tmp / "corpus.txt"
    kit.corpus.write(corpus, 200)
    raw = corpus.read_bytes()
    corpus.write_bytes(raw[:100] + b"\xff\xfe" + raw[100:200] + b"\xc3" + raw[200:])
    manifest = prepare(kit.corpus.config([corpus]), str(tmp / "out"), progress=False)
    assert manifest["splits"]["train"]["text"]["replaced_bytes"] == 3


def data_parquet_without_the_text_column(tmp, kit):
    """A Parquet source whose text is in another column: named with the columns there are,
    before anything is written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["some words here"] * 50}), tmp / "corpus.parquet")
    c = kit.corpus.config([])
    c.data.sources = ml_collections.ConfigDict({"wiki": {"kind": "parquet", "files": [str(tmp / "*.parquet")]}})
    try:
        prepare(c, str(tmp / "out"), progress=False)
    finally:
        assert not list((tmp / "out").rglob("*.*"))


def data_prepared_with_another_tokenizer(tmp, kit):
    corpus = tmp / "corpus.txt"
    kit.corpus.write(corpus, 200)
    texts = corpus.read_text().splitlines()
    for name, lowercase in (("lower", True), ("cased", False)):
        train_wordpiece(texts, vocab_size=64, lowercase=lowercase).save_pretrained(str(tmp / name))
    prepare(kit.corpus.config([corpus], tokenizer=str(tmp / "lower")), str(tmp / "out"), progress=False)
    prepare(kit.corpus.config([corpus], tokenizer=str(tmp / "cased")), str(tmp / "out"), progress=False)


# --- checkpoints ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny):
    """A workdir with one checkpoint (step 0) of tiny(), written without training."""
    workdir = tmp_path_factory.mktemp("saved_run")
    tr = trainer.build(tiny(), str(workdir))
    state, _ = tr.restore_or_init()
    tr.checkpointer.save(0, state, tr.data.get_state(), tr.meta())
    tr.checkpointer.wait()
    return workdir


def _resume(tmp, config):
    trainer.build(config, str(tmp / "run")).restore_or_init()


def checkpoint_of_another_shape(tmp, kit):
    _resume(tmp, kit.tiny(**{"student.num_layers": 2}))


def checkpoint_of_another_mode(tmp, kit):
    _resume(tmp, kit.tiny(mode="pretrain"))


def checkpoint_of_another_teacher(tmp, kit):
    _resume(tmp, kit.tiny(**{"train.seed": 1}))  # the random teacher is drawn from the seed


def _damage(tmp, kit, how):
    for f in (tmp / "run" / "checkpoints" / "0" / "state").rglob("*"):
        if f.is_file() and "metadata" not in f.name.lower() and f.stat().st_size > 0:
            if how == "truncate":
                with open(f, "r+b") as handle:
                    handle.truncate(f.stat().st_size // 2)
            else:
                f.write_bytes(b"\x00garbage" * 4)
    _resume(tmp, kit.tiny())


def checkpoint_truncated(tmp, kit):
    _damage(tmp, kit, "truncate")


def checkpoint_corrupt(tmp, kit):
    _damage(tmp, kit, "garbage")


ROWS = [
    (config_unknown_key, config_lib.ConfigError, ["unknown key 'train.stpes'"]),
    (config_wrong_types_and_unknown_key_at_once, config_lib.ConfigError,
     ["3 problem(s)", "unknown key 'masking.smoothng'", "checkpoint.keep must be int", "got str '3'",
      "train.learning_rate must be float", "got NoneType None"]),
    (config_impossible_sizes, config_lib.ConfigError,
     ["batch_size 30 is not a multiple of train.micro_batch_size 16",
      "data.seq_len 64 is longer than the teacher's 32 position embeddings",
      "hidden_size 32 is not divisible by num_heads 5"]),
    (teacher_missing_dir, FileNotFoundError, ["no-such-teacher", "neither a local directory nor a model"]),
    (teacher_without_weights, FileNotFoundError, ["no weights in", "model.safetensors"]),
    (teacher_without_config, FileNotFoundError, ["has no config.json"]),
    (teacher_truncated_weights, ValueError, ["model.safetensors cannot be read", "download it again"]),
    (teacher_unsupported_type, ValueError, ["unsupported model_type 'gpt2'", "bert, roberta, xlm-roberta, distilbert, deberta-v2, modernbert"]),
    (teacher_missing_and_extra_tensors, ValueError,
     ["missing distilbert.transformer.layer.1.ffn.lin2.bias", "(2 layers, width 32, vocabulary 64)"]),
    (teacher_tensor_of_the_wrong_shape, ValueError,
     ["wrong shape distilbert.transformer.layer.0.ffn.lin1.weight (32, 32) (expected (64, 32))"]),
    (teacher_tokenizer_larger_than_its_vocabulary, DataError,
     ["has 64 tokens, more than the teacher's vocabulary of 40", "not of one model", "data.tokenizer=DIR"]),
    (teacher_case_sensitive_vocab_read_lowercased, DataError,
     ["into [UNK]", "the tokenizer lowercases its input", "capital letters", "no tokenizer_config.json",
      "data.lowercase=False", '{"do_lower_case": false}', "Nothing was prepared"]),
    (teacher_case_sensitive_vocab_read_as_it_is, None, []),
    (data_missing_files, DataError, ["no file matches", "nope-*.txt"]),
    (data_empty_corpus, DataError, ["the corpus is empty"]),
    (data_empty_text_file, DataError, ["the corpus is empty", "(mine)", "an empty file"]),
    (data_binary_garbage, DataError, ["garbage.bin is not UTF-8 text", "of its 20000 bytes", "cannot be decoded",
                                      "iconv"]),
    (data_more_characters_than_the_vocabulary, DataError,
     ["WordPiece trained on the corpus has", "more than the 256 of the model's vocabulary",
      "teacher.model.vocab_size to at least"]),
    (data_a_single_short_line, DataError, ["too small to train a vocabulary of 256 tokens", "has 1 documents and 6 words",
                                           "smaller teacher.model.vocab_size"]),
    (data_every_document_filtered, DataError, ["every training document was filtered out"]),
    (data_non_utf8_bytes_replaced_and_counted, None, []),
    (data_parquet_without_the_text_column, DataError, ["corpus.parquet has no column 'text'", "its columns are content",
                                                       "set text_key"]),
    (data_prepared_with_another_tokenizer, DataError, ["prepared with another tokenizer", "cased",
                                                       "set data.dir to another directory"]),
    (checkpoint_of_another_shape, CheckpointMismatch,
     ["another shape", "encoder/layer_1/", "checkpoint absent"]),
    (checkpoint_of_another_mode, CheckpointMismatch, ["from a 'distill' run", "another --workdir"]),
    (checkpoint_of_another_teacher, CheckpointMismatch, ["distilled from teacher", "fingerprint"]),
    (checkpoint_truncated, CheckpointMismatch, ["can be read", "0: "]),
    (checkpoint_corrupt, CheckpointMismatch, ["can be read", "0: "]),
]


@pytest.mark.parametrize("action,error,needles", ROWS, ids=[r[0].__name__ for r in ROWS])
def test_bad_input(action, error, needles, tmp_path, request, tiny, corpus):
    if action.__name__.startswith("checkpoint_"):
        shutil.copytree(request.getfixturevalue("saved_run"), tmp_path / "run")
    kit = types.SimpleNamespace(tiny=tiny, corpus=corpus)
    if error is None:
        action(tmp_path, kit)
        return
    with pytest.raises(error) as caught:
        action(tmp_path, kit)
    message = str(caught.value)
    for needle in needles:
        assert needle in message, (needle, message)
