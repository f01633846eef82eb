"""Every bad input of the reliability issue, one row each: the error type and a message naming it.

A row is (action, error type, needles): the action gets a fresh tmp dir and must raise
that error with every needle in its message. An error type of None means the input is
accepted and the action checks what was done with it (non-UTF-8 bytes: replaced, counted).
"""

import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from distil_jax import config as config_lib
from distil_jax import experiment, hf, train
from distil_jax.checkpoint import CheckpointMismatch
from distil_jax.data.prepare import prepare
from distil_jax.data.sources import DataError
from distil_jax.data.tokenizer import train_wordpiece
from distil_jax.models import Bert, BertConfig, DistilBert, DistilBertConfig, init_params
from test_data import WORDS, _config, _write_corpus
from test_train import tiny


# --- config -----------------------------------------------------------------------------
def config_unknown_key(tmp):
    c = tiny()
    with c.unlocked():
        c.train.stpes = 5
    config_lib.validate(c, num_devices=1)


def config_wrong_types_and_unknown_key_at_once(tmp):
    c = tiny()
    with c.unlocked():  # as a config built from a JSON file would be
        c.checkpoint = ml_collections.ConfigDict(dict(c.checkpoint.to_dict(), keep="3"))
        c.train.learning_rate = None
        c.masking.smoothng = 0.5
    config_lib.validate(c, num_devices=1)


def config_impossible_sizes(tmp):
    c = tiny(**{"train.batch_size": 30, "data.seq_len": 64, "student.init": "random",
                "student.num_heads": 5, "mesh.shape": (-1, 1, 1)})
    config_lib.validate(c, num_devices=8)


# --- teacher ------------------------------------------------------------------------------
def _student_dir(tmp, tokenizer=None, vocab=64):
    config = DistilBertConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4,
                              intermediate_size=64, max_position_embeddings=64)
    params = init_params(DistilBert(config), jax.random.key(0))
    return hf.save_hf_model(params, config, str(tmp / "hf"), tokenizer=tokenizer)


def teacher_missing_dir(tmp):
    hf.load_hf_model(str(tmp / "no-such-teacher"))


def teacher_without_weights(tmp):
    os.remove(os.path.join(_student_dir(tmp), "model.safetensors"))
    hf.load_hf_model(str(tmp / "hf"))


def teacher_without_config(tmp):
    os.remove(os.path.join(_student_dir(tmp), "config.json"))
    hf.load_hf_model(str(tmp / "hf"))


def teacher_truncated_weights(tmp):
    path = os.path.join(_student_dir(tmp), "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    hf.load_hf_model(str(tmp / "hf"))


def teacher_unsupported_type(tmp):
    (tmp / "config.json").write_text('{"model_type": "gpt2"}')
    hf.load_hf_model(str(tmp))


def teacher_missing_and_extra_tensors(tmp):
    from safetensors.numpy import load_file, save_file
    path = os.path.join(_student_dir(tmp), "model.safetensors")
    state = load_file(path)
    del state["distilbert.transformer.layer.1.ffn.lin2.bias"]
    state["distilbert.transformer.layer.9.ffn.lin2.bias"] = np.zeros(32, np.float32)
    save_file(state, path, metadata={"format": "pt"})
    hf.load_hf_model(str(tmp / "hf"))


def teacher_vocab_disagrees_with_its_tokenizer(tmp):
    corpus = tmp / "corpus.txt"
    _write_corpus(corpus, 100)
    tok = train_wordpiece(corpus.read_text().splitlines(), vocab_size=40)
    teacher = BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                         max_position_embeddings=64)
    hf.save_hf_model(init_params(Bert(teacher), jax.random.key(0)), teacher, str(tmp / "teacher"),
                     tokenizer=tok)
    c = _config([corpus], seq_len=32)
    c.mode = "distill"
    c.teacher.path = str(tmp / "teacher")
    c.student.num_layers = 1
    c.train.update(steps=1, batch_size=16, micro_batch_size=16)
    experiment.build(c, str(tmp / "work"))


# --- data -------------------------------------------------------------------------------------
def data_missing_files(tmp):
    prepare(_config([tmp / "nope-*.txt"]), str(tmp / "out"), progress=False)


def data_empty_corpus(tmp):
    (tmp / "empty.txt").write_text("\n\n")
    prepare(_config([tmp / "empty.txt"]), str(tmp / "out"), progress=False)


def data_every_document_filtered(tmp):
    (tmp / "short.txt").write_text("\n".join(WORDS * 5))  # [CLS] word [SEP]: too short to keep
    prepare(_config([tmp / "short.txt"]), str(tmp / "out"), progress=False)


def data_non_utf8_bytes_replaced_and_counted(tmp):
    corpus = tmp / "corpus.txt"
    _write_corpus(corpus, 200)
    raw = corpus.read_bytes()
    corpus.write_bytes(raw[:100] + b"\xff\xfe" + raw[100:200] + b"\xc3" + raw[200:])
    manifest = prepare(_config([corpus]), str(tmp / "out"), progress=False)
    assert manifest["splits"]["train"]["text"]["replaced_bytes"] == 3


def data_prepared_with_another_tokenizer(tmp):
    corpus = tmp / "corpus.txt"
    _write_corpus(corpus, 200)
    texts = corpus.read_text().splitlines()
    for name, lowercase in (("lower", True), ("cased", False)):
        train_wordpiece(texts, vocab_size=64, lowercase=lowercase).save_pretrained(str(tmp / name))
    prepare(_config([corpus], tokenizer=str(tmp / "lower")), str(tmp / "out"), progress=False)
    prepare(_config([corpus], tokenizer=str(tmp / "cased")), str(tmp / "out"), progress=False)


# --- checkpoints ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A workdir with one checkpoint (step 0) of tiny(), written without training."""
    workdir = tmp_path_factory.mktemp("saved_run")
    run = train.make_run(tiny(), str(workdir))
    state, _ = train.restore_or_init(run)
    run.checkpointer.save(0, state, run.exp.train_data.get_state(), run.exp.meta())
    run.checkpointer.wait()
    return workdir


def _resume(tmp, config):
    train.restore_or_init(train.make_run(config, str(tmp / "run")))


def checkpoint_of_another_shape(tmp):
    _resume(tmp, tiny(**{"student.num_layers": 2}))


def checkpoint_of_another_mode(tmp):
    _resume(tmp, tiny(mode="pretrain"))


def checkpoint_of_another_teacher(tmp):
    _resume(tmp, tiny(**{"train.seed": 1}))  # the random teacher is drawn from the seed


def _damage(tmp, how):
    for f in (tmp / "run" / "checkpoints" / "0" / "state").rglob("*"):
        if f.is_file() and "metadata" not in f.name.lower() and f.stat().st_size > 0:
            if how == "truncate":
                with open(f, "r+b") as handle:
                    handle.truncate(f.stat().st_size // 2)
            else:
                f.write_bytes(b"\x00garbage" * 4)
    _resume(tmp, tiny())


def checkpoint_truncated(tmp):
    _damage(tmp, "truncate")


def checkpoint_corrupt(tmp):
    _damage(tmp, "garbage")


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
    (teacher_unsupported_type, ValueError, ["unsupported model_type 'gpt2'", "bert, roberta, distilbert"]),
    (teacher_missing_and_extra_tensors, ValueError,
     ["missing distilbert.transformer.layer.1.ffn.lin2.bias",
      "unexpected distilbert.transformer.layer.9.ffn.lin2.bias"]),
    (teacher_vocab_disagrees_with_its_tokenizer, DataError,
     ["the tokenizer has", "tokens, the teacher's vocabulary 64", "use the teacher's tokenizer"]),
    (data_missing_files, DataError, ["no file matches", "nope-*.txt"]),
    (data_empty_corpus, DataError, ["the corpus is empty"]),
    (data_every_document_filtered, DataError, ["every training document was filtered out"]),
    (data_non_utf8_bytes_replaced_and_counted, None, []),
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
def test_bad_input(action, error, needles, tmp_path, request):
    if action.__name__.startswith("checkpoint_"):
        shutil.copytree(request.getfixturevalue("saved_run"), tmp_path / "run")
    if error is None:
        action(tmp_path)
        return
    with pytest.raises(error) as caught:
        action(tmp_path)
    message = str(caught.value)
    for needle in needles:
        assert needle in message, (needle, message)
