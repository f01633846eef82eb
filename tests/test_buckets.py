"""Everything that reads or writes a path, on a bucket: against a real GCS-API server
(fake-gcs-server, the `gcs` fixture), never a stand-in. Prepared shards, the loader,
checkpoints and resume, metrics.jsonl and TensorBoard, exports, the lock."""

import json
import os

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distil_jax import runtime, storage
from distil_jax.data import DataError, make_data
from distil_jax.data.loader import PreparedSplit
from distil_jax.data.prepare import prepare
from distil_jax.data.tokenizer import train_wordpiece


def _files(root):
    fs, path = fsspec.core.url_to_fs(root)
    return {os.path.relpath(p, path): fs.cat_file(p) for p in fs.find(path)}


def test_shards_prepared_on_a_bucket_are_the_local_ones_and_load_alike(bucket, tmp_path, corpus):
    """A Parquet source on the bucket, prepared into the bucket: the same files, byte for
    byte, as from local Parquet into a local directory; the loader reads the same rows."""
    text = tmp_path / "corpus.txt"
    lines = corpus.write(text, 300)
    pq.write_table(pa.table({"text": lines}), tmp_path / "corpus.parquet", row_group_size=50)
    fsspec.filesystem("gs").put_file(str(tmp_path / "corpus.parquet"), f"{bucket}/in/corpus.parquet")

    train_wordpiece(lines, 64).save_pretrained(tmp_path / "tok")  # one tokenizer for both (training varies)

    def config(files):
        c = corpus.config([], tokenizer=str(tmp_path / "tok"))
        c.data.sources = {"text": {"kind": "parquet", "files": files, "eval_percent": 5}}
        return c
    local = prepare(config([str(tmp_path / "*.parquet")]), str(tmp_path / "data"), progress=False)
    remote = prepare(config([f"{bucket}/in/*.parquet"]), f"{bucket}/data", progress=False)
    assert remote["splits"] == local["splits"] and remote["splits"]["train"]["text"]["shards"] == 6
    on_bucket, on_disk = _files(f"{bucket}/data"), _files(str(tmp_path / "data"))
    shards = {k for k in on_disk if k.endswith((".array_record", ".npy"))}
    assert len(shards) == 2 * 3 * 6 + 1 and all(on_bucket[k] == on_disk[k] for k in shards)
    assert not any(".tmp" in k for k in on_bucket)
    a, b = PreparedSplit(str(tmp_path / "data"), "train"), PreparedSplit(f"{bucket}/data", "train")
    assert len(a) == len(b) and all(np.array_equal(a[i], b[i]) for i in range(0, len(a), 7))
    # The same inputs again: nothing is redone; other inputs are refused, the bucket untouched.
    assert prepare(config([f"{bucket}/in/*.parquet"]), f"{bucket}/data", progress=False) == remote
    with pytest.raises(DataError, match="prepared from other inputs"):
        prepare(corpus.config([text], seq_len=48), f"{bucket}/data", progress=False)
    assert _files(f"{bucket}/data") == on_bucket


def test_a_run_of_several_processes_reads_a_prepared_bucket_and_stops_without_one(bucket, tmp_path, corpus):
    text = tmp_path / "corpus.txt"
    corpus.write(text, 300)
    c = corpus.config([text])
    c.data.dir = f"{bucket}/data"
    with pytest.raises(DataError, match=r"holds no prepared dataset.*--config.mode=prepare"):
        make_data(c, "train", 16, 1, 2, vocab_size=64, workdir=f"{bucket}/run")
    assert not storage.listdir(f"{bucket}/data")
    prepare(c, c.data.dir, progress=False)
    loader, vocab = make_data(c, "train", 16, 1, 2, vocab_size=64, workdir=f"{bucket}/run")
    assert next(loader)["input_ids"].shape[0] == 8 and vocab.vocab_size == 64  # process 1's half


def test_the_lock_is_one_create_if_absent_on_a_bucket(bucket):
    assert storage.create_exclusive(f"{bucket}/x", b"first")
    assert not storage.create_exclusive(f"{bucket}/x", b"second")
    assert storage.read_bytes(f"{bucket}/x") == b"first"
    first = runtime.WorkdirLock(f"{bucket}/run").acquire()
    with pytest.raises(runtime.WorkdirBusy, match=f"{bucket}/run is in use by process {os.getpid()}"):
        runtime.WorkdirLock(f"{bucket}/run").acquire()
    first.release()
    assert not storage.exists(f"{bucket}/run/lock")
    runtime.WorkdirLock(f"{bucket}/run").acquire().release()


def test_a_bucket_that_does_not_exist_is_named_with_the_fix(gcs, tmp_path, corpus):
    with pytest.raises(storage.StorageError, match=r"gs://no-such-bucket-0/data cannot be written \(the bucket "
                                                   r"does not exist\).*gcloud storage buckets create"):
        prepare(corpus.config([tmp_path / "corpus.txt"]), "gs://no-such-bucket-0/data", progress=False)


def _config_file(tmp_path, tiny_source, text, data_dir, steps):
    path = tmp_path / "config.py"
    path.write_text(tiny_source(**{"data.source": "corpus", "data.dir": data_dir, "train.steps": steps,
                                   "checkpoint.every_steps": 2, "teacher.model.vocab_size": 64,
                                   "data.prepare_workers": 1, "data.docs_per_shard": 100})
                    + "import ml_collections\n"
                    f"config.data.sources = ml_collections.ConfigDict({{'t': {{'kind': 'text', 'files': [{str(text)!r}]}}}})\n"
                    "def get_config():\n    return config\n")
    return str(path)


def test_a_run_on_a_bucket_checkpoints_resumes_logs_and_exports_there(bucket, tmp_path, corpus, tiny_source,
                                                                       run_main, read_events):
    """`--workdir=gs://...`: the data, checkpoints, metrics.jsonl, TensorBoard events and
    the export all land in the bucket (nothing in a local `gs:` directory); a second
    command with more updates resumes from the bucket's checkpoint."""
    text = tmp_path / "corpus.txt"
    corpus.write(text, 300)
    workdir = f"{bucket}/run"
    first = run_main(_config_file(tmp_path, tiny_source, text, f"{workdir}/data", 2), workdir)
    assert first["update"] == first["last_checkpoint"] == 2
    second = run_main(_config_file(tmp_path, tiny_source, text, f"{workdir}/data", 4), workdir)
    assert second["update"] == second["last_checkpoint"] == 4
    names = storage.listdir(workdir)
    assert {"checkpoints", "data", "metrics.jsonl", "tensorboard"} <= set(names) and "lock" not in names
    assert storage.listdir(f"{workdir}/checkpoints") == ["2", "4"]
    steps = [json.loads(line)["step"] for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
    assert steps == [1, 2, 3, 4]  # updates 3 and 4 continued from the bucket's checkpoint 2
    events = [e for name in storage.listdir(f"{workdir}/tensorboard")  # one file per start, appended to
              for e in read_events(storage.read_bytes(f"{workdir}/tensorboard/{name}"))]
    assert [e.step for e in events if e.HasField("summary")] == [1, 2, 3, 4]
    exported = run_main(_config_file(tmp_path, tiny_source, text, f"{workdir}/data", 4), workdir,
                        "--config.mode=export")
    assert exported["export_dir"] == f"{workdir}/hf"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(storage.listdir(f"{workdir}/hf"))
    assert not os.path.exists(os.path.join(os.getcwd(), "gs:"))


def test_logs_on_a_bucket_are_appended_not_rewritten(bucket, monkeypatch):
    """metrics.jsonl and the event files on a bucket grow by GCS compose: each flush uploads
    only what it adds (a rewrite of the whole object every REWRITE_EVERY flushes keeps it
    under GCS's 1024 components), and the object holds every line in order."""
    fs, _ = storage.filesystem(bucket)
    uploads, pipe = [], fs.pipe_file  # storage's calls get this (cached) filesystem object

    def counted(path, data, *args, **kwargs):  # every upload of a whole object goes here
        uploads.append(len(data))
        return pipe(path, data, *args, **kwargs)
    monkeypatch.setattr(fs, "pipe_file", counted)
    monkeypatch.setattr(storage.Appender, "REWRITE_EVERY", 20)
    log = storage.Appender(f"{bucket}/run/metrics.jsonl", b"0\n")
    lines = [f"{i:04d} {'x' * 95}\n".encode() for i in range(1, 51)]
    for line in lines:
        log.write(line)
        log.flush()
    log.close()
    assert storage.read_bytes(f"{bucket}/run/metrics.jsonl") == b"0\n" + b"".join(lines)
    whole = [n for n in uploads if n > 101]
    assert uploads[0] == 2 and len(whole) == 2 and len(uploads) == 1 + 50  # 48 parts of 101 bytes, 2 rewrites
    assert not [n for n in storage.listdir(f"{bucket}/run") if ".part-" in n]
