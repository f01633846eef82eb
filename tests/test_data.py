"""The data pipeline: sources, split/filter rules, preparation, the grain loader."""

import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from distil_jax.train import trainer
from distil_jax.data import DataError
from distil_jax.data import loader as loader_lib
from distil_jax.data.prepare import prepare
from distil_jax.data.shards import split_and_filter
from distil_jax.data.sources import EmbeddedSource, TextFilesSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLS, SEP, UNK = 2, 3, 1


# --- sources -----------------------------------------------------------------------
def test_text_files_lines_paragraphs_and_bad_bytes(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"first line\nsecond \xff\xfe line\n\nthird\n")
    lines = TextFilesSource([str(tmp_path / "*.txt")], doc_per="line", eval_percent=0)
    assert list(lines.documents("train")) == ["first line", "second \ufffd\ufffd line", "third"]
    assert [lines.replaced_bytes(u) for u in lines.units(100)] == [2]
    paras = TextFilesSource([str(tmp_path / "a.txt")], doc_per="paragraph", eval_percent=0)
    assert list(paras.documents("train")) == ["first line\nsecond \ufffd\ufffd line", "third"]
    with pytest.raises(DataError, match=r"no file matches '.*missing\*\.txt'"):
        TextFilesSource([str(tmp_path / "missing*.txt")])


def test_embedded_corpus_is_deterministic_with_a_disjoint_held_out_split():
    source = EmbeddedSource()
    train, held_out = list(source.documents("train")), list(source.documents("eval"))
    assert not set(train) & set(held_out)
    assert 0.02 < len(held_out) / (len(train) + len(held_out)) < 0.08
    words = sum(len(d.split()) for d in train + held_out)
    assert words > 250_000, words  # about 330K on CPython 3.11
    assert list(EmbeddedSource().documents("eval")) == held_out


# --- split and filter (the reference's rules) ----------------------------------------
def test_split_boundaries_and_filters():
    seq_len = 16
    body = list(range(10, 10 + seq_len - 2))  # exactly seq_len - 2 tokens: one sequence
    kept, short, unk = split_and_filter(body, seq_len, CLS, SEP, UNK)
    assert [len(s) for s in kept] == [16] and kept[0][0] == CLS and kept[0][-1] == SEP
    kept, short, _ = split_and_filter(body + [99], seq_len, CLS, SEP, UNK)  # one more: a 3-token tail
    assert [len(s) for s in kept] == [16] and short == 1
    long = list(range(10, 10 + 2 * (seq_len - 2) + 10))
    kept, _, _ = split_and_filter(long, seq_len, CLS, SEP, UNK)
    assert [len(s) for s in kept] == [16, 16, 12]
    np.testing.assert_array_equal(np.concatenate([s[1:-1] for s in kept]), long)
    assert all(s[0] == CLS and s[-1] == SEP for s in kept)
    # 11 tokens or fewer are dropped, 12 kept.
    assert split_and_filter(list(range(10, 19)), 64, CLS, SEP, UNK)[1] == 1  # 9 + 2 = 11
    assert len(split_and_filter(list(range(10, 20)), 64, CLS, SEP, UNK)[0]) == 1  # 12
    # Half or more unknown tokens are dropped; just under half is kept.
    half = [UNK] * 6 + [20] * 4  # 6 unknown of 12
    assert split_and_filter(half, 64, CLS, SEP, UNK)[2] == 1
    under = [UNK] * 5 + [20] * 5  # 5 of 12
    assert len(split_and_filter(under, 64, CLS, SEP, UNK)[0]) == 1


def test_sequences_of_many_documents_are_each_documents_own(corpus):
    """The vectorised cut and filter over a batch of documents (empty ones, [UNK]-heavy ones,
    chunk ends between documents) gives what the reference's loop gives one document at a
    time (lm_seqs_dataset.py: [CLS] chunk [SEP], keep > 11 tokens, drop half or more [UNK])."""
    from distil_jax.data.shards import sequences_of
    rng = np.random.default_rng(0)
    for trial in range(200):
        seq_len = int(rng.integers(12, 40))
        docs = [rng.choice([UNK, 10, 11], size=int(rng.integers(0, 90)), p=[q, (1 - q) / 2, (1 - q) / 2])
                for q in rng.uniform(0, 0.9, size=int(rng.integers(1, 6)))]
        expected, short, unknown = [], 0, 0
        for doc in docs:
            for start in range(0, max(len(doc), 1), seq_len - 2):
                seq = [CLS, *doc[start: start + seq_len - 2], SEP]
                if len(seq) < 12:
                    short += 1
                elif seq.count(UNK) / len(seq) >= 0.5:
                    unknown += 1
                else:
                    expected.append(seq)
        flat = np.concatenate(docs + [np.zeros(0, np.int64)]).astype(np.int64)
        got, got_short, got_unknown = sequences_of(flat, np.array([len(d) for d in docs]), seq_len, CLS, SEP, UNK)
        assert [g.tolist() for g in got] == expected and (got_short, got_unknown) == (short, unknown), trial


def test_packing_joins_adjacent_rows_of_one_group_only():
    from distil_jax.data.shards import pack_rows
    lengths, groups = [3, 3, 3, 3, 9, 2, 2], ["a", "a", "a", "b", "b", "b", "b"]
    assert pack_rows(lengths, groups, 8) == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 7)]
    assert pack_rows(lengths, groups, 8, rows=[0, 1, 2, 3, 4, 5, 9]) == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6),
                                                                          (6, 7)]  # row 9 is not next to row 5


# --- preparation -----------------------------------------------------------------------
def test_prepare_is_idempotent_resumable_and_refuses_other_inputs(tmp_path, corpus):
    text = tmp_path / "corpus.txt"
    corpus.write(text, 300)
    out = tmp_path / "prepared"
    config = corpus.config([text])
    manifest = prepare(config, str(out), progress=False)
    train = manifest["splits"]["train"]["text"]
    assert train["shards"] >= 5 and train["sequences"] > 200 and manifest["vocab_size"] == 64
    assert len(AutoTokenizer.from_pretrained(out / "tokenizer")) == 64
    counts = np.load(out / "token_counts.npy")
    assert counts.sum() == train["tokens"]

    shard = out / "train" / "text" / "shard-00001"
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert prepare(config, str(out), progress=False) == manifest  # a second run does nothing
    assert stamp == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    # An interrupted run: no manifest, one shard half written (no .json). Only it is redone.
    before = shard.with_suffix(".array_record").read_bytes()
    os.remove(out / "manifest.json")
    os.remove(out / "done" / "text" / "shard-00001.json")
    shard.with_suffix(".array_record").write_bytes(b"partial")
    again = prepare(config, str(out), progress=False)
    assert again == manifest and shard.with_suffix(".array_record").read_bytes() == before
    other = out / "train" / "text" / "shard-00002.array_record"
    assert other.stat().st_mtime_ns == stamp[other]

    # Other inputs into the same directory are refused; nothing is touched.
    with pytest.raises(DataError, match="prepared from other inputs"):
        prepare(corpus.config([text], seq_len=48), str(out), progress=False)
    assert json.loads((out / "manifest.json").read_text()) == manifest


# --- the loader ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("loader")
    text = tmp / "corpus.txt"
    corpus.write(text, 600, min_words=3, max_words=40)
    prepare(corpus.config([text], seq_len=48), str(tmp / "data"), progress=False)
    return str(tmp / "data")


def _loader(data_dir, **kw):
    args = dict(micro_batch_size=16, seed=3, num_threads=1, prefetch=2)
    args.update(kw)
    split = loader_lib.PreparedSplit(data_dir, "train")
    return loader_lib.BatchLoader(split, **args), split


def test_every_sequence_once_per_epoch_and_grouping_lowers_padding(prepared):
    grouped, split = _loader(prepared, group_by_length=True, pad_multiple=1)
    plain, _ = _loader(prepared, group_by_length=False, pad_multiple=1)
    for loader in (grouped, plain):
        rows = np.concatenate([loader.global_rows(b) for b in range(loader.batches_per_epoch)])
        assert len(rows) == len(set(rows.tolist())) == loader.sequences_per_epoch
        assert len(split) - len(rows) < 16  # only the last incomplete batch is left out

    def padding(loader):
        real = total = 0
        for _ in range(loader.batches_per_epoch):
            mask = next(loader)["attention_mask"]
            real, total = real + mask.sum(), total + mask.size
        return 1 - real / total
    p_grouped, p_plain = padding(grouped), padding(plain)
    assert p_grouped < 0.5 * p_plain, (p_grouped, p_plain)
    second_epoch = np.concatenate([grouped.global_rows(grouped.batches_per_epoch + b)
                                   for b in range(grouped.batches_per_epoch)])
    assert not np.array_equal(second_epoch, np.concatenate(
        [grouped.global_rows(b) for b in range(grouped.batches_per_epoch)]))


def test_batches_are_padded_to_a_multiple_or_a_bucket(prepared):
    loader, split = _loader(prepared, pad_multiple=8)
    for _ in range(5):
        batch = next(loader)
        assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape[1] % 8 == 0
        assert batch["attention_mask"].sum(1).max() > batch["input_ids"].shape[1] - 8
    buckets, _ = _loader(prepared, length_buckets=(16, 48))
    assert {next(buckets)["input_ids"].shape[1] for _ in range(10)} <= {16, 48}


def test_process_rows_are_the_global_batchs_rows_in_any_arrangement(prepared):
    """Each process reads the rows of the global batch its devices hold, whatever they are
    (one block each, or runs interleaved with the other process's, as a TPU slice's device
    order can give), and together they are the global batch."""
    for arrangement in ([np.arange(0, 8), np.arange(8, 16)], [np.r_[0:4, 8:12], np.r_[4:8, 12:16]]):
        single, _ = _loader(prepared)
        parts = [_loader(prepared, rows=rows)[0] for rows in arrangement]
        for _ in range(3):
            full = next(single)
            got = [next(p) for p in parts]
            for key in ("input_ids", "attention_mask"):
                for rows, part in zip(arrangement, got):
                    np.testing.assert_array_equal(part[key], full[key][rows])
    rows = single.global_rows(7)
    assert set(rows[:8].tolist()).isdisjoint(rows[8:].tolist())


def test_mixture_weights():
    rng = np.random.default_rng(0)
    ranges = {"a": (0, 100), "b": (100, 140)}
    idx = loader_lib.epoch_indices(ranges, {"a": 0.5, "b": 2.0}, rng, shuffle=True)
    from_a, from_b = idx[idx < 100], idx[idx >= 100]
    assert len(from_a) == 50 and len(set(from_a.tolist())) == 50
    assert len(from_b) == 80 and np.all(np.bincount(from_b - 100) == 2)


def test_restored_state_gives_the_next_batches_in_a_fresh_process(prepared, tmp_path):
    loader, _ = _loader(prepared)
    for _ in range(loader.batches_per_epoch + 3):  # into the second epoch
        next(loader)
    state = loader.get_state()
    expected = [next(loader) for _ in range(3)]
    code = f"""
import json, sys, numpy as np
sys.path.insert(0, {ROOT!r})
from distil_jax.data import loader as L
loader = L.BatchLoader(L.PreparedSplit({prepared!r}, "train"), micro_batch_size=16, seed=3,
                       num_threads=1, prefetch=2)
loader.set_state(json.loads({json.dumps(state)!r}))
batches = [next(loader) for _ in range(3)]
np.savez({str(tmp_path / "next.npz")!r}, **{{f"{{k}}{{i}}": b[k] for i, b in enumerate(batches) for k in b}})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, XLA_FLAGS=""))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.load(tmp_path / "next.npz")
    for i, batch in enumerate(expected):
        for k in batch:
            np.testing.assert_array_equal(got[f"{k}{i}"], batch[k])


def test_training_on_a_prepared_corpus_resumes_exactly(tmp_path, corpus):
    """The loader's state travels in the checkpoint: cut-and-resumed equals straight."""
    text = tmp_path / "corpus.txt"
    corpus.write(text, 200)
    c = corpus.config([text], seq_len=32, vocab=96)
    c.teacher.model.update(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           max_position_embeddings=32)
    c.data.dir = str(tmp_path / "data")
    c.data.length_buckets = (32,)  # one compiled step (each length is one)
    c.train.update(steps=6, epochs=0, batch_size=16, micro_batch_size=8, seed=0, log_every=1)
    c.checkpoint.every_steps = 3
    c.mesh.shape = (-1, 1, 1)
    straight, _ = trainer.train(c, str(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
    resumed, _ = trainer.train(c, str(tmp_path / "b"))
    chex.assert_trees_all_close(jax.device_get(resumed.params), jax.device_get(straight.params), atol=1e-6)


def test_plan_keeps_an_updates_micro_batches_together():
    """keep_together=k shuffles blocks of k consecutive (length-sorted) batches: the same
    batches, and the k micro-batches one update stacks pad to nearly one length."""
    plan_batches = loader_lib.plan_batches
    rng = np.random.default_rng(0)
    lengths = rng.integers(12, 512, size=4096)
    indices = rng.permutation(4096)

    def plan(k):
        return plan_batches(indices, lengths, 16, np.random.default_rng(1), True, 64, True, keep_together=k)

    single, blocks = plan(1), plan(4)
    assert sorted(map(tuple, single)) == sorted(map(tuple, blocks))
    unshuffled = plan_batches(indices, lengths, 16, np.random.default_rng(1), True, 64, False)
    position = {tuple(b): i for i, b in enumerate(unshuffled)}
    starts = [position[tuple(blocks[i])] for i in range(0, len(blocks), 4)]
    assert all(s % 4 == 0 for s in starts)
    assert all(position[tuple(blocks[i + j])] == starts[i // 4] + j for i in range(0, len(blocks), 4) for j in range(4))

    def stacked_padding(p):
        groups = p.reshape(-1, 4, 16)
        longest = np.array([lengths[g].max() for g in groups])
        return 1 - lengths[p].sum() / (longest.sum() * 64)
    assert stacked_padding(blocks) < 0.5 * stacked_padding(single)




def test_token_ids_beyond_the_models_vocabulary_never_reach_it(tmp_path, corpus):
    """Checked where shards are written (nothing of the shard is written) and where a
    prepared directory is opened for a model (a smaller vocabulary is refused)."""
    from distil_jax.data import make_data
    from distil_jax.data.shards import UnitWriter
    from distil_jax.data.sources import make_source
    from distil_jax.data.tokenizer import load_tokenizer
    text = tmp_path / "corpus.txt"
    corpus.write(text, 200)
    config = corpus.config([text])
    manifest = prepare(config, str(tmp_path / "data"), progress=False)
    assert manifest["max_id"] == 63 and manifest["vocab_size"] == 64
    config.data.dir = str(tmp_path / "data")
    with pytest.raises(DataError, match="holds token id 63, beyond the model's vocabulary of 40"):
        make_data(config, "train", 16, vocab_size=40, workdir=str(tmp_path))
    tok = load_tokenizer(str(tmp_path / "data" / "tokenizer"))
    spec = {"kind": "text", "files": [str(text)]}
    writer = UnitWriter(str(tmp_path / "other"), {"t": spec}, tok.backend_tokenizer.to_str(), 32, "f", 39, len(tok))
    with pytest.raises(DataError, match=r"beyond the model's vocabulary \(ids 0..39\)"):
        writer("t", make_source(spec).units(50)[0], dict(cls=2, sep=3, unk=1))
    assert not list((tmp_path / "other").rglob("*.*"))
