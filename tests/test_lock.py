"""The workdir lock (`runtime.WorkdirLock`) on local disk and on a bucket (the GCS
emulator of conftest): the exclusive create under a race, takeover of an empty lock file
and of another host's stale lock by their age, and the refresh that keeps a long run's
lock from ever looking stale. Ages are judged against the lock's `clock`, so a test moves
"now" past the staleness window instead of waiting for it."""

import json
import os
import threading
import time

import pytest

from distil_jax import runtime, storage

STALE = 600.0  # the staleness window of every lock here (the default)


@pytest.fixture(params=["local", "gcs"])
def workdir(request, tmp_path):
    """A run's workdir that does not exist yet: on local disk, or in a new bucket."""
    if request.param == "local":
        return str(tmp_path / "run")
    return f"{request.getfixturevalue('bucket')}/run"


def lock_path(workdir):
    return storage.join(workdir, "lock")


def record(workdir):
    return json.loads(storage.read_text(lock_path(workdir)))


def later(seconds):
    """A clock `seconds` ahead of this host's."""
    return lambda: time.time() + seconds


def test_an_empty_lock_file_is_refused_until_it_is_stale_then_taken_over(workdir):
    """A lock file with no record (a start killed between its create and its write) names
    no process: before the window it is refused, saying so, and left as it is; once its
    modification time is older than the window it is taken over."""
    storage.write_bytes(lock_path(workdir), b"")
    with pytest.raises(runtime.WorkdirBusy, match="holds no readable record") as refused:
        runtime.WorkdirLock(workdir, stale_after_s=STALE).acquire()
    assert lock_path(workdir).split("://")[-1] in str(refused.value)
    assert storage.read_bytes(lock_path(workdir)) == b""
    lock = runtime.WorkdirLock(workdir, stale_after_s=STALE)
    lock.clock = later(STALE + 60)
    lock.acquire()
    try:
        assert record(workdir)["pid"] == os.getpid() and record(workdir)["token"] == lock._token
    finally:
        lock.release()
    assert not storage.exists(lock_path(workdir))


def test_another_hosts_lock_is_refused_while_fresh_and_taken_over_when_stale(workdir):
    theirs = {"pid": 4242, "host": "another-host.example", "started": "2026-01-01 00:00:00 UTC", "token": "x"}
    storage.write_text(lock_path(workdir), json.dumps(theirs))
    fresh = runtime.WorkdirLock(workdir, stale_after_s=STALE)
    fresh.clock = later(STALE - 60)  # its heartbeat (mtime) is under the window old
    with pytest.raises(runtime.WorkdirBusy, match=r"is in use by process 4242 on host another-host\.example "
                                                  r"\(started 2026-01-01 00:00:00 UTC\)"):
        fresh.acquire()
    assert record(workdir) == theirs
    stale = runtime.WorkdirLock(workdir, stale_after_s=STALE)
    stale.clock = later(STALE + 60)
    stale.acquire()
    try:
        assert record(workdir)["pid"] == os.getpid() and record(workdir)["token"] == stale._token
    finally:
        stale.release()
    assert not storage.exists(lock_path(workdir))


def test_the_holder_refreshes_its_lock_so_that_it_never_looks_stale(workdir):
    """While held, the lock's modification time advances every `refresh_s`; a start on
    another host whose "now" is past the window from the lock's creation, but not from
    its last refresh, is refused: a run longer than the window is never taken over."""
    holder = runtime.WorkdirLock(workdir, stale_after_s=STALE, refresh_s=0.02)
    holder._me = lambda: {"pid": os.getpid(), "host": "holder-host.example"}  # as seen from another host
    holder.acquire()
    try:
        created, _ = storage.stamp(lock_path(workdir))
        seen, deadline = [created], time.monotonic() + 60  # a guard against a hang, not a bound
        while len(seen) < 3:  # two refreshes: the record's mtime changes, twice
            assert time.monotonic() < deadline, "the lock was never refreshed"
            when = storage.stamp(lock_path(workdir))[0]
            if when > seen[-1]:
                seen.append(when)
            else:
                holder._stop.wait(0.005)
        contender = runtime.WorkdirLock(workdir, stale_after_s=STALE)
        # Stale if dated from the creation, fresh if from a refresh (later ones only more so).
        contender.clock = lambda: created + STALE + (seen[-1] - created) / 2
        with pytest.raises(runtime.WorkdirBusy, match=r"in use by process \d+ on host holder-host\.example"):
            contender.acquire()
        assert record(workdir)["token"] == holder._token
    finally:
        holder.release()
    assert not storage.exists(lock_path(workdir))


def test_of_two_racing_starts_exactly_one_wins(workdir):
    """Two starts at once on one workdir, several times: one takes the lock (its record is
    there, whole) and the other is refused naming the process; never both, never neither
    (as when the loser reads a lock file created but not yet written)."""
    for round_ in range(6):
        here = storage.join(workdir, str(round_))
        gate, results = threading.Barrier(2), [None, None]

        def start(i):
            lock = runtime.WorkdirLock(here)
            gate.wait()
            try:
                results[i] = lock.acquire()
            except runtime.WorkdirBusy as e:
                results[i] = e
        threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [r for r in results if isinstance(r, runtime.WorkdirLock)]
        lost = [r for r in results if isinstance(r, runtime.WorkdirBusy)]
        assert len(won) == 1 and len(lost) == 1, results
        assert f"in use by process {os.getpid()}" in str(lost[0])
        assert record(here)["token"] == won[0]._token
        won[0].release()
        assert not storage.exists(lock_path(here))


def test_a_create_does_not_trust_an_existence_check(workdir, monkeypatch):
    """The create is one atomic step: with every existence check saying "no lock" (a rival
    wrote it just after such a check), it still refuses and leaves the rival's lock whole."""
    path = lock_path(workdir)
    storage.write_bytes(path, b"rival")
    fs, key = storage.filesystem(path)  # the cached filesystem object storage uses
    absent = {path, key, os.path.abspath(path) if not storage.is_remote(path) else path}

    def says_absent(real):
        return lambda p, *a, **k: False if os.fspath(p) in absent else real(p, *a, **k)

    async def async_absent(p, *a, **k):
        return False if p in absent else await real_async(p, *a, **k)
    real_async = getattr(fs, "_exists", None)
    monkeypatch.setattr(storage, "exists", says_absent(storage.exists))
    monkeypatch.setattr(fs, "exists", says_absent(fs.exists))
    if real_async is not None:
        monkeypatch.setattr(fs, "_exists", async_absent)
    for name in ("exists", "lexists", "isfile"):
        monkeypatch.setattr(os.path, name, says_absent(getattr(os.path, name)))
    assert not storage.exists(path)  # the checks are fooled ...
    assert not storage.create_exclusive(path, b"mine")  # ... the create is not
    monkeypatch.undo()
    assert storage.read_bytes(path) == b"rival"


def test_a_takeover_removes_only_the_lock_it_judged(tmp_path):
    """`remove_if` removes the lock at the version that was judged stale, not one rewritten
    or touched since (another taker's new lock, a refresh). Locally only: the GCS emulator
    ignores a delete's generation precondition (real GCS honours it)."""
    path = str(tmp_path / "lock")
    storage.write_bytes(path, b"stale")
    judged = storage.stamp(path)[1]
    storage.write_bytes(path, b"another taker's")  # a new file in its place
    assert not storage.remove_if(path, judged)
    assert storage.read_bytes(path) == b"another taker's"
    judged = storage.stamp(path)[1]
    os.utime(path, ns=(1, os.stat(path).st_mtime_ns + 1000))  # refreshed since
    assert not storage.remove_if(path, judged)
    assert storage.read_bytes(path) == b"another taker's"
    assert storage.remove_if(path, storage.stamp(path)[1])
    assert not os.path.exists(path) and os.listdir(tmp_path) == []


class Killed(BaseException):
    """The process dying at this point."""


def test_a_start_killed_while_writing_its_lock_leaves_no_empty_one(tmp_path, monkeypatch):
    """Killed as it writes the record (here: at the open of a file for the record's bytes,
    which both an O_EXCL create-then-write and a write-then-link do through os.fdopen), a
    start leaves no lock, or a whole one, never an empty file that names nobody."""
    path = str(tmp_path / "run" / "lock")

    def killed(fd, *args, **kwargs):
        os.close(fd)
        raise Killed
    monkeypatch.setattr(os, "fdopen", killed)
    with pytest.raises(Killed):
        storage.create_exclusive(path, b'{"pid": 1}')
    monkeypatch.undo()
    assert not os.path.exists(path) or storage.read_bytes(path) == b'{"pid": 1}'
    assert os.listdir(tmp_path / "run") == []  # nor a temporary file
    assert storage.create_exclusive(path, b"next")  # the next start takes it at once
