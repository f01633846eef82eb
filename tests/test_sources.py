"""Sources in the formats users have them: a TFDS dataset in ArrayRecord (built here by a
TFDS builder, read by the production path), Parquet files, a `datasets` folder; sentence
rows packed into running text; 1 worker and N Beam workers write the same shards."""

import filecmp
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from distil_jax.data import DataError
from distil_jax.data.loader import PreparedSplit
from distil_jax.data.prepare import prepare
from distil_jax.data.sources import DatasetsSource, ParquetSource, TfdsSource
from distil_jax.data.tokenizer import train_wordpiece


class TinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS text dataset like wikipedia's (text and title), 60 + 20 articles."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "title": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split):
        for i in range(60 if split == "train" else 20):
            yield i, {"text": f"{split} article {i} " + "the cat sat on a mat while dogs ran " * 3, "title": f"t{i}"}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    TinyText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_a_tfds_array_record_dataset_is_read_for_real(tfds_dir):
    source = TfdsSource("tiny_text", split="train[:90%]", eval_split="test", data_dir=str(tfds_dir))
    units = source.units(25)
    assert [(u.split, u.part) for u in units] == [
        ("train", ("train[:90%]", 0, 25)), ("train", ("train[:90%]", 25, 50)), ("train", ("train[:90%]", 50, 54)),
        ("eval", ("test", 0, 20))]
    train = list(source.documents("train"))
    assert len(train) == 54 and train[0].startswith("train article 0 ") and train[-1].startswith("train article 53 ")
    assert [d.split()[2] for d in source.documents("eval")] == [str(i) for i in range(20)]
    titled = TfdsSource("tiny_text", split="train", data_dir=str(tfds_dir), group_key="title", pack=True)
    assert [g for _, g in titled.rows(titled.units(10)[1])][:2] == ["t10", "t11"]
    with pytest.raises(DataError, match="has no feature 'body'; its features are text, title"):
        list(TfdsSource("tiny_text", data_dir=str(tfds_dir), text_key="body").documents("train"))
    with pytest.raises(DataError, match="has no feature 'book'; its features are text, title"):
        list(TfdsSource("tiny_text", data_dir=str(tfds_dir), group_key="book", pack=True).documents("train"))
    with pytest.raises(DataError, match="TFDS has no dataset 'no_such_corpus_xyz'"):
        TfdsSource("no_such_corpus_xyz", data_dir=str(tfds_dir)).units(10)


def test_a_tfds_dataset_prepared_in_tfrecord_is_refused_naming_the_flag(tfds_dir, tmp_path):
    """`tfds build` writes TFRecord by default, which tfds.data_source cannot read: the
    message names the flag that builds what it reads. (TFRecord needs TensorFlow to write:
    the copy is made TFRecord by its metadata and file names, which is what TFDS reads.)"""
    import shutil
    copy = tmp_path / "tfds"
    shutil.copytree(tfds_dir, copy)
    version = copy / "tiny_text" / "1.0.0"
    info = json.loads((version / "dataset_info.json").read_text())
    info["fileFormat"] = "tfrecord"
    (version / "dataset_info.json").write_text(json.dumps(info))
    for f in version.glob("*.array_record-*"):
        f.rename(str(f).replace(".array_record-", ".tfrecord-"))
    with pytest.raises(DataError, match=r"was prepared in TFRecord .*`tfds build tiny_text --file_format=array_record"):
        TfdsSource("tiny_text", data_dir=str(copy)).units(10)


def _parquet(path, texts, groups=None, row_group_size=10):
    columns = {"text": texts, **({"book": groups} if groups is not None else {})}
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def test_parquet_units_are_row_groups_and_a_missing_column_is_named(tmp_path):
    texts = [f"row {i} of the file" for i in range(45)]
    _parquet(tmp_path / "a.parquet", texts[:25])
    _parquet(tmp_path / "b.parquet", texts[25:])
    source = ParquetSource(str(tmp_path / "*.parquet"), eval_percent=0)
    units = source.units(20)  # row groups of 10: two per unit
    assert [u.part[1:] for u in units] == [(0, 2), (2, 3), (0, 2)]
    assert list(source.documents("train")) == texts
    with pytest.raises(DataError, match=r"has no column 'content'; its columns are text: set text_key"):
        ParquetSource(str(tmp_path / "*.parquet"), text_key="content").units(20)
    with pytest.raises(DataError, match=r"no file matches '.*nothing-\*\.parquet'"):
        ParquetSource(str(tmp_path / "nothing-*.parquet"))


def test_a_datasets_folder_streams_the_same_rows_as_the_parquet_source(tmp_path):
    texts = [f"row {i} of the file" for i in range(45)]
    folder = tmp_path / "corpus" / "data"
    folder.mkdir(parents=True)
    _parquet(folder / "train-00000-of-00002.parquet", texts[:25])
    _parquet(folder / "train-00001-of-00002.parquet", texts[25:])
    source = DatasetsSource(str(tmp_path / "corpus"), split="train", eval_percent=0)
    assert len(source.units(1000)) == 2  # one per file: the stream's shards
    assert list(source.documents("train")) == texts
    with pytest.raises(DataError, match="has no column 'content'; its columns are text"):
        list(DatasetsSource(str(tmp_path / "corpus"), text_key="content").documents("train"))


def _sentences(n_books=8, per_book=80, seed=0):
    words = "the cat sat on a mat while dogs ran past quickly and birds sang".split()
    rng = np.random.default_rng(seed)
    return [(" ".join(rng.choice(words, rng.integers(2, 4))), f"book{b}") for b in range(n_books)
            for _ in range(per_book)]


def _config(corpus, tmp_path, files, seq_len=32, prepare_workers=1, **source):
    c = corpus.config([], seq_len=seq_len, tokenizer=str(tmp_path / "tok"), prepare_workers=prepare_workers)
    c.data.sources = {"books": {"kind": "parquet", "files": [str(f) for f in files], "eval_percent": 20, **source}}
    return c


def test_sentence_rows_are_packed_into_running_text_of_one_book(tmp_path, corpus):
    """BookCorpus rows are sentences: unpacked, almost every one is under the 12-token minimum
    and dropped; packed, every row's tokens are kept, in order, in documents of up to
    seq_len - 2 tokens that never join two books, and whole books are held out."""
    rows = _sentences()
    _parquet(tmp_path / "books.parquet", [t for t, _ in rows], [g for _, g in rows], row_group_size=100)
    tok = train_wordpiece([t for t, _ in rows], 64)
    tok.save_pretrained(tmp_path / "tok")
    plain = prepare(_config(corpus, tmp_path, [tmp_path / "books.parquet"]), str(tmp_path / "plain"),
                    progress=False)["splits"]["train"]["books"]
    assert plain["dropped_short"] > 0.95 * plain["rows"]  # sentences of 2-3 words: almost all dropped
    packed = prepare(_config(corpus, tmp_path, [tmp_path / "books.parquet"], pack=True, group_key="book"),
                     str(tmp_path / "packed"), progress=False)
    train, held = packed["splits"]["train"]["books"], packed["splits"]["eval"]["books"]
    assert train["rows"] + held["rows"] == len(rows) and train["dropped_short"] + held["dropped_short"] <= 8
    ids = {}
    for text, book in rows:
        ids.setdefault(book, []).extend(tok(text, add_special_tokens=False)["input_ids"])
    for split, books in (("train", ["book0", "book1", "book3", "book4", "book5", "book6"]), ("eval", ["book2", "book7"])):
        data = PreparedSplit(str(tmp_path / "packed"), split)
        bodies = [data[i][1:-1].tolist() for i in range(len(data))]
        assert max(len(b) for b in bodies) <= 30 and np.mean([len(b) for b in bodies]) > 22  # running text
        assert all(any(_contains(ids[book], body) for book in books) for body in bodies)  # one book's, whole rows
        expected = [i for book in books for i in ids[book]]
        body = [i for b in bodies for i in b]
        assert len(body) >= len(expected) - 8 * 30 and _in_order(body, expected)  # at most a short tail dropped


def _in_order(kept, expected):
    """`kept` is `expected` with whole runs left out (the dropped short tails)."""
    it = iter(expected)
    return all(any(x == y for y in it) for x in kept)


def _contains(haystack, needle):
    return any(haystack[i:i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def test_one_worker_and_beam_workers_write_the_same_shards(tmp_path, corpus):
    """The same units give the same files whichever worker writes them and in whatever
    order: in-process (1 worker) and Beam's DirectRunner over 2 processes agree byte for
    byte, manifest and fingerprint included."""
    rows = _sentences(n_books=8, per_book=120, seed=1)
    for k in range(3):
        _parquet(tmp_path / f"part-{k}.parquet", [t for t, _ in rows[k::3]], [g for _, g in rows[k::3]],
                 row_group_size=40)
    train_wordpiece([t for t, _ in rows], 64).save_pretrained(tmp_path / "tok")
    manifests = {}
    for workers in (1, 2):
        c = _config(corpus, tmp_path, sorted(tmp_path.glob("part-*.parquet")), pack=True, group_key="book",
                    prepare_workers=workers)
        c.data.docs_per_shard = 40
        manifests[workers] = prepare(c, str(tmp_path / f"w{workers}"), progress=False)
    assert manifests[1] == manifests[2] and manifests[1]["splits"]["train"]["books"]["shards"] == 24

    def same(d):
        assert not (d.diff_files or d.left_only or d.right_only), (d.diff_files, d.left_only, d.right_only)
        for sub in d.subdirs.values():
            same(sub)
    same(filecmp.dircmp(tmp_path / "w1", tmp_path / "w2"))


def test_the_papers_config_prepares_parquet_copies_of_its_corpora(tmp_path, run_main):
    """`configs/base.py:DIR` reads Wikipedia and BookCorpus as the hub's Parquet files laid
    out under DIR by `hf download` (README), through mode prepare: articles one document
    each, BookCorpus sentences packed into running text."""
    from distil_jax.assets import DEMO_TEACHER
    from distil_jax.data.sources import stdlib_files
    wiki = tmp_path / "corpora" / "wikipedia" / "20231101.en"
    books = tmp_path / "corpora" / "bookcorpus" / "plain_text" / "train"
    wiki.mkdir(parents=True)
    books.mkdir(parents=True)
    articles = [open(f).read()[:3000] for f in stdlib_files()[:40]]
    pq.write_table(pa.table({"id": [str(i) for i in range(40)], "title": ["t"] * 40, "text": articles}),
                   wiki / "train.0000.parquet")
    sentences = [s.strip() + "." for a in articles for s in a.split(".") if len(s.split()) > 2]
    pq.write_table(pa.table({"text": sentences}), books / "0000.parquet", row_group_size=500)
    result = run_main(f"configs/base.py:{tmp_path / 'corpora'}", str(tmp_path / "run"), "--config.mode=prepare",
                      f"--config.teacher.path={DEMO_TEACHER}", "--config.data.seq_len=128",
                      "--config.data.prepare_workers=1")
    train = result["splits"]["train"]
    assert train["wikipedia"]["documents"] + result["splits"]["eval"]["wikipedia"]["documents"] == 40
    book = train["bookcorpus"]
    assert book["rows"] + result["splits"]["eval"]["bookcorpus"]["rows"] == len(sentences) and book["documents"] < book["rows"] / 2  # several sentences a document
    assert book["dropped_short"] < 0.05 * book["documents"]
