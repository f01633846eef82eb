"""TensorBoard event files (metrics.EventWriter / MetricWriter, written by tensorboardX) read
back by independent readers: TensorBoard's own EventAccumulator, and the raw TFRecord
framing with every checksum recomputed by google-crc32c (not tensorboardX's CRC)."""

import json
import math
import struct
import subprocess
import sys
import time

import google_crc32c
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboardX.proto import event_pb2

from distil_jax import metrics, storage


def _next_second():
    """Wait into the next wall-clock second: event files are named by start second and pid,
    and a resume is a later start (within one second, one process would reuse the name)."""
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.02)


def raw_events(data: bytes):
    """The Event protos of a TFRecord file's bytes, each record's length and data checksums
    recomputed (masked CRC-32C, by google-crc32c) and checked."""

    def masked(b):
        c = google_crc32c.value(b)
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    events, i = [], 0
    while i < len(data):
        assert len(data) - i >= 16, "a torn record"
        header = data[i: i + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[i + 8: i + 12])[0] == masked(header)
        record = data[i + 12: i + 12 + n]
        assert len(record) == n and struct.unpack("<I", data[i + 12 + n: i + 16 + n])[0] == masked(record)
        events.append(event_pb2.Event.FromString(record))
        i += 16 + n
    return events


def _scalars_in(directory):
    """{tag: [(step, value)]} as TensorBoard shows the event files of `directory`."""
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _f32(x):
    return float(np.float32(x))


def test_tensorboard_reads_the_scalars_written_per_step_and_a_resume_drops_later_steps(tmp_path):
    """A run logs steps 1-3, is cut, resumes from its checkpoint at step 2 and logs 3-4: TensorBoard
    shows step 3 once, from the resumed run (as metrics.jsonl holds it), and the first run's 1-2."""
    writer = metrics.MetricWriter(str(tmp_path), total_steps=4)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.5 * step, "lr": 1e-4 * step, "mfu": None, "note": "text"})
    writer.close()
    _next_second()
    resumed = metrics.MetricWriter(str(tmp_path), total_steps=4, initial_step=2)
    for step in (3, 4):
        resumed.write(step, {"loss": 10.0 * step, "lr": 1e-4 * step, "skipped_updates": 1})
    resumed.close()
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2  # one file per start
    shown = _scalars_in(tmp_path / "tensorboard")
    assert set(shown) == {"loss", "lr", "skipped_updates"}  # None and text are not scalars
    assert shown["loss"] == [(1, 1.5), (2, 3.0), (3, 30.0), (4, 40.0)]
    assert shown["lr"] == [(s, _f32(1e-4 * s)) for s in (1, 2, 3, 4)]
    assert shown["skipped_updates"] == [(3, 1.0), (4, 1.0)]
    jsonl = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], _f32(r["loss"])) for r in jsonl] == shown["loss"]  # the two logs agree


def test_a_fresh_start_hides_what_an_earlier_run_left_in_the_directory(tmp_path):
    """initial_step 0 truncates metrics.jsonl to nothing; TensorBoard drops the old steps too."""
    old = metrics.MetricWriter(str(tmp_path), total_steps=2)
    for step in (1, 2):
        old.write(step, {"loss": 5.0})
    old.close()
    _next_second()
    new = metrics.MetricWriter(str(tmp_path), total_steps=2)
    new.write(1, {"loss": 0.25})
    new.close()
    assert _scalars_in(tmp_path / "tensorboard") == {"loss": [(1, 0.25)]}
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_event_records_are_framed_and_checksummed_and_hold_the_exact_float32_scalars(tmp_path):
    values = {"loss": 2.75, "lr": 1e-4, "mfu": float("nan"), "big": 1e39, "diverged": -1e39, "eval/acc": 0.5}
    writer = metrics.EventWriter(str(tmp_path), purge_from=8)
    writer.write(8, values)
    writer.write(9, {"loss": 1.0})
    writer.close()
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("events.out.tfevents.") and path.name.endswith(f".{__import__('os').getpid()}")
    version, start, first, second = raw_events(path.read_bytes())
    assert version.file_version == "brain.Event:2"
    assert start.step == 8 and start.session_log.status == start.session_log.START
    assert (first.step, second.step) == (8, 9)
    got = {v.tag: v.simple_value for v in first.summary.value}
    assert list(got) == list(values)
    for tag, want in values.items():
        if math.isnan(want):
            assert math.isnan(got[tag])
        else:  # float32, and beyond its range infinity of the value's sign
            assert got[tag] == (math.copysign(math.inf, want) if abs(want) > 3.5e38 else _f32(want)), tag
    assert [(v.tag, v.simple_value) for v in second.summary.value] == [("loss", 1.0)]
    assert abs(first.wall_time - time.time()) < 60


def test_writing_event_files_does_not_import_pytorch_and_leaves_it_importable(tmp_path, env):
    """tensorboardX's package imports PyTorch wherever it is installed (as here: the test
    extra); the writer keeps it out of a training process (a second of CPU in each) and
    torch still imports afterwards. A fresh process: this one has imported torch already."""
    code = ("import sys\nfrom distil_jax import metrics\n"
            f"w = metrics.EventWriter({str(tmp_path)!r}); w.write(1, {{'loss': 2.0}}); w.close()\n"
            "assert 'tensorboardX' in sys.modules and 'torch' not in sys.modules, 'torch was imported'\n"
            "import torch\nprint(torch.ones(2).sum().item())\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "2.0", proc.stderr[-2000:]
    assert len(raw_events(next(tmp_path.glob("events.out.tfevents.*")).read_bytes())) == 2  # version, scalars


def test_event_files_on_a_bucket_are_appended_and_read_back(bucket):
    """On gs:// the file grows by storage.Appender (compose), not a local `gs:` directory."""
    directory = f"{bucket}/run/tensorboard"
    writer = metrics.EventWriter(directory, purge_from=1)
    for step in (1, 2, 3):
        writer.write(step, {"loss": float(step)})
        (name,) = storage.listdir(directory)  # readable, whole, after each write
        assert [e.step for e in raw_events(storage.read_bytes(f"{directory}/{name}"))
                if e.HasField("summary")] == list(range(1, step + 1))
    writer.close()
    events = raw_events(storage.read_bytes(f"{directory}/{name}"))
    assert [(e.step, e.summary.value[0].simple_value) for e in events if e.HasField("summary")] == \
        [(1, 1.0), (2, 2.0), (3, 3.0)]


# --- GLUE metrics (train/task.py, by scikit-learn and SciPy) against float64 definitions -------
def _hand_pearson(x, y):
    x, y = [float(a) for a in x], [float(b) for b in y]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else 0.0


def _hand_ranks(x):
    """1-based ranks, ties given the mean of the ranks they span."""
    order = sorted(x)
    return [(order.index(v) + 1 + order.index(v) + order.count(v)) / 2 for v in x]


def _hand_binary(pred, gold):
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold))
    tn = sum(p == 0 and g == 0 for p, g in zip(pred, gold))
    fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold))
    fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return (tp + tn) / len(pred), f1, ((tp * tn - fp * fn) / denom if denom else 0.0)


@pytest.mark.parametrize("seed", range(6))
def test_glue_classification_metrics_equal_their_float64_definitions(seed):
    from distil_jax.train import task
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 12))
    pred, gold = rng.integers(0, 2, n), rng.integers(0, 2, n)
    acc, f1, mcc = _hand_binary(pred.tolist(), gold.tolist())
    assert task.accuracy(pred, gold) == pytest.approx(acc, abs=1e-12)
    assert task.f1(pred, gold) == pytest.approx(f1, abs=1e-12)
    assert task.matthews(pred, gold) == pytest.approx(mcc, abs=1e-12)
    assert all(type(task.METRICS[m](pred, gold)) is float for m in ("accuracy", "f1", "matthews"))


def test_glue_classification_metrics_on_hand_cases_and_degenerate_input():
    from distil_jax.train import task
    pred, gold = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]  # tp 2, fp 1, fn 1, tn 2
    assert (task.accuracy(pred, gold), task.f1(pred, gold)) == (pytest.approx(4 / 6), pytest.approx(2 / 3))
    assert task.matthews(pred, gold) == pytest.approx(3 / 9)
    assert task.matthews([0, 1, 1, 0], [1, 0, 0, 1]) == pytest.approx(-1.0)
    # Undefined Matthews (a constant prediction or gold) is GLUE's 0; so is F1 with no true positive.
    assert task.matthews([1, 1, 1], [1, 0, 1]) == 0.0 and task.matthews([0, 1, 0], [1, 1, 1]) == 0.0
    assert task.matthews([1, 1], [1, 1]) == 0.0
    assert task.f1([0, 0], [1, 1]) == 0.0 and task.f1([0, 0], [0, 0]) == 0.0 and task.f1([1, 1], [0, 0]) == 0.0
    assert task.f1([1, 2, 1], [1, 1, 2]) == pytest.approx(0.5)  # label 1 is the positive class


@pytest.mark.parametrize("seed", range(6))
def test_glue_correlations_equal_their_float64_definitions(seed):
    from distil_jax.train import task
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 15))
    x = rng.integers(0, 5, n).astype(np.float32) / 2  # float32 scores with ties, as a model gives
    y = rng.normal(size=n).round(1)
    y[: n // 3] = y[n // 3: 2 * (n // 3)]
    assert task.pearson(x, y) == pytest.approx(_hand_pearson(x, y), abs=1e-12)
    assert task.spearman(x, y) == pytest.approx(_hand_pearson(_hand_ranks(x.tolist()), _hand_ranks(y.tolist())),
                                                abs=1e-12)


def test_glue_correlations_on_degenerate_input_are_zero():
    from distil_jax.train import task
    assert task.pearson([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 9.0]) == pytest.approx(
        _hand_pearson([1, 2, 3, 4], [2, 4, 6, 9]))
    assert task.spearman([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 9.0]) == pytest.approx(1.0)
    assert task.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(_hand_pearson([1, 2.5, 2.5, 4], [1, 3, 2, 4]))
    for metric in (task.pearson, task.spearman):  # a constant prediction: undefined, GLUE's 0
        assert metric([3.0, 3.0, 3.0], [1.0, 2.0, 3.0]) == 0.0
        assert metric([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]) == 0.0
        assert metric([1.0], [2.0]) == 0.0
