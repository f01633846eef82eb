"""`ShuffledBatches` (data/arrays.py, a grain pipeline) against the batches its contract
defines: epoch e is numpy's permutation seeded (seed, e) (or the examples in order for
evaluation), cut into micro-batches with the last incomplete one dropped, each process
taking its `rows` of every global micro-batch; its state resumes it exactly."""

import json

import numpy as np
import pytest

from distil_jax.data.arrays import ShuffledBatches
from distil_jax.data.types import DataError


def _arrays(n=23, seq=5):
    ids = np.arange(n * seq, dtype=np.int32).reshape(n, seq)
    return {"input_ids": ids, "attention_mask": (ids % 3 != 0).astype(np.int32),
            "labels": np.arange(n, dtype=np.float32) / 2}


def _expected(arrays, batch, seed, count, rows=None, shuffle=True):
    """The first `count` micro-batches by definition (the hand-written implementation's)."""
    n = len(next(iter(arrays.values())))
    rows = np.arange(batch) if rows is None else np.asarray(rows)
    out = []
    for i in range(count):
        epoch, b = divmod(i, n // batch)
        order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)
        picked = order[b * batch + rows]
        out.append({k: v[picked] for k, v in arrays.items()})
    return out


def _take(it, count):
    return [next(it) for _ in range(count)]


def _assert_batches_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k].dtype == w[k].dtype and g[k].shape == w[k].shape
            np.testing.assert_array_equal(g[k], w[k])


@pytest.mark.parametrize("n,batch,seed", [(23, 4, 0), (24, 4, 7), (9, 9, 3), (23, 5, 12345)])
def test_batches_are_the_seeded_epochs_cut_into_micro_batches(n, batch, seed):
    arrays = _arrays(n)
    it = ShuffledBatches(arrays, batch, seed)
    per_epoch = n // batch
    assert (it.batches_per_epoch, it.sequences_per_epoch) == (per_epoch, per_epoch * batch)
    count = 3 * per_epoch + 1  # across two epoch boundaries, into a fourth epoch
    got = _take(it, count)
    _assert_batches_equal(got, _expected(arrays, batch, seed, count))
    for e in range(3):  # each epoch: distinct examples, the remainder of n dropped
        labels = np.concatenate([b["labels"] for b in got[e * per_epoch: (e + 1) * per_epoch]])
        assert len(set(labels.tolist())) == per_epoch * batch
    if n > batch:  # a fresh shuffle per epoch
        first, second = (np.concatenate([b["labels"] for b in got[e * per_epoch: (e + 1) * per_epoch]])
                         for e in (0, 1))
        assert not np.array_equal(first, second)


def test_evaluation_order_is_the_examples_in_order_every_epoch():
    arrays = _arrays(10)
    got = _take(ShuffledBatches(arrays, 3, seed=5, shuffle=False), 7)
    _assert_batches_equal(got, _expected(arrays, 3, 5, 7, shuffle=False))
    assert [b["labels"].tolist() for b in got[:4]] == [[0, .5, 1], [1.5, 2, 2.5], [3, 3.5, 4], [0, .5, 1]]


def test_processes_take_their_rows_of_the_same_global_batches():
    arrays = _arrays(30)
    whole = _take(ShuffledBatches(arrays, 6, seed=2), 12)
    parts = [np.array([0, 1, 2]), np.array([3, 4, 5])]  # two processes, three rows each
    per_process = [_take(ShuffledBatches(arrays, 6, seed=2, rows=r), 12) for r in parts]
    _assert_batches_equal(per_process[1], _expected(arrays, 6, 2, 12, rows=parts[1]))
    for i in range(12):
        for k in arrays:
            np.testing.assert_array_equal(np.concatenate([p[i][k] for p in per_process]), whole[i][k])
    odd = _take(ShuffledBatches(arrays, 6, seed=2, rows=np.array([5, 1])), 6)  # any positions, in their order
    _assert_batches_equal(odd, _expected(arrays, 6, 2, 6, rows=[5, 1]))


def test_other_seeds_give_other_orders():
    arrays = _arrays(40)
    a, b = (np.concatenate([x["labels"] for x in _take(ShuffledBatches(arrays, 4, seed=s), 10)]) for s in (0, 1))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("cut", [0, 1, 3, 5, 6, 11])  # start, mid-epoch, an epoch's end (5 per epoch), later
def test_a_saved_state_resumes_exactly(cut):
    arrays = _arrays(23)
    straight = ShuffledBatches(arrays, 4, seed=9, rows=np.array([1, 3]))
    want = _take(straight, cut + 8)
    first = ShuffledBatches(arrays, 4, seed=9, rows=np.array([1, 3]))
    _take(first, cut)
    state = json.loads(json.dumps(first.get_state()))  # as a checkpoint saves it (JSON)
    assert state == {"next_index": cut}
    _take(first, 2)  # the cut run goes on past its checkpoint, then is lost
    resumed = ShuffledBatches(arrays, 4, seed=9, rows=np.array([1, 3]))
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 8), want[cut:])
    assert resumed.get_state() == {"next_index": cut + 8}


@pytest.mark.parametrize("epoch,position,index", [(0, 0, 0), (0, 3, 3), (0, 5, 5), (2, 1, 11)])
def test_a_state_saved_before_grain_resumes_the_same_batch(epoch, position, index):
    """{epoch, position}, the state checkpoints held before (position may equal the batches
    per epoch: the epoch's end), continues at the same global batch."""
    arrays = _arrays(23)
    want = _take(ShuffledBatches(arrays, 4, seed=1), index + 3)[index:]
    it = ShuffledBatches(arrays, 4, seed=1)
    it.set_state({"epoch": epoch, "position": position})
    _assert_batches_equal(_take(it, 3), want)


def test_unusable_arrays_are_refused():
    with pytest.raises(DataError, match="one row per example"):
        ShuffledBatches({"a": np.zeros((4, 2)), "b": np.zeros(5)}, 2, 0)
    with pytest.raises(DataError, match="cannot fill a micro batch of 8"):
        ShuffledBatches(_arrays(5), 8, 0)
