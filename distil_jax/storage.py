"""Files on local disk or in a bucket (gs://, any fsspec URL), through one set of calls.

Everything that writes a run's files (prepared shards, manifests, exports, metrics, the
lock) goes through here or through orbax (checkpoints), so a path is a path: local
writes are atomic (a temporary file renamed into place); an object store writes an object
whole or not at all. Listings are never cached: several processes (and hosts) write the
same directory, and each must see the others' files.

Libraries that only take local paths (ArrayRecord's reader and writer, transformers'
`save_pretrained` / `from_pretrained`) work on a local copy: `local_copy` downloads a
remote directory once into a cache (`DISTIL_JAX_CACHE`, default the temp dir) and
`upload_dir` writes a local directory to a remote one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import tempfile
import uuid
from typing import List, Tuple

import fsspec

CACHE_ENV = "DISTIL_JAX_CACHE"


class StorageError(ValueError):
    """A path that cannot be used (no such bucket, no permission); the message says what to do."""


def is_remote(path: str) -> bool:
    """A URL (gs://bucket/...) rather than a local path."""
    return "://" in os.fspath(path)


def absolute(path: str) -> str:
    """A local path made absolute; a URL as it is."""
    return path if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
    return "/".join([path.rstrip("/"), *parts]) if is_remote(path) else os.path.join(path, *parts)


def filesystem(path: str) -> Tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, its path) for a local path or URL, with no listing cache."""
    return fsspec.core.url_to_fs(os.fspath(path), use_listings_cache=False)


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    return fs.cat_file(p)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Write `path` whole: locally to a temporary file renamed into place; an object at once."""
    if is_remote(path):
        fs, p = filesystem(path)
        fs.pipe_file(p, data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def _is_gcs(fs) -> bool:
    return "gs" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def create_exclusive(path: str, data: bytes) -> bool:
    """Write `path` whole only if nothing is there: False if something is. Of two callers
    (processes, hosts) that race, exactly one gets True, and nobody ever reads the file
    part-written:

    - locally the data goes to a temporary file of this process, which is then hard-linked
      to `path`: link(2) fails when `path` exists (atomic, as O_CREAT|O_EXCL is) and `path`
      appears with its whole content (an O_EXCL create followed by a write leaves an empty
      file when the process is killed in between). Where the filesystem has no hard links,
      O_CREAT|O_EXCL and a write (the reader treats an empty file by its age);
    - on GCS one upload with the precondition `ifGenerationMatch=0` (the server refuses it,
      412, when an object is there), sent through gcsfs's JSON-API upload itself: not
      `pipe_file`, whose zonal-bucket path ignores mode="create", nor fsspec's generic
      create mode, which checks and then writes;
    - other object stores: fsspec's create mode (checks, then writes: not atomic)."""
    if not is_remote(path):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links here (some network and FUSE filesystems)
                pass
        finally:
            os.remove(tmp)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    fs, p = filesystem(path)
    try:
        if _is_gcs(fs):
            from fsspec.asyn import sync
            from gcsfs.core import GCSFileSystem
            sync(fs.loop, GCSFileSystem._pipe_file, fs, p, data, mode="create")
        else:
            fs.pipe_file(p, data, mode="create")
    except FileExistsError:  # gcsfs: the precondition failed (412)
        return False
    return True


def stamp(path: str) -> Tuple[float, object]:
    """(when `path` was last written, seconds since the epoch; its version): the version
    changes with every write and touch (GCS: the object's generation; locally: inode and
    modification time in ns), so `remove_if` removes the very file that was judged.
    FileNotFoundError when there is none."""
    if not is_remote(path):
        st = os.stat(path)
        return st.st_mtime, (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    fs, p = filesystem(path)
    info = fs.info(p)
    when = next((info[k] for k in ("mtime", "updated", "LastModified", "last_modified") if info.get(k)), None)
    if when is None:
        raise OSError(f"{path}: the store gives no modification time")
    if isinstance(when, str):
        when = datetime.datetime.fromisoformat(when.replace("Z", "+00:00"))
    if isinstance(when, datetime.datetime):
        when = when.timestamp()
    version = info.get("generation") or info.get("ETag") or info.get("etag") or when
    return float(when), version


def remove_if(path: str, version) -> bool:
    """Remove `path` if it is still the version `stamp` gave (not rewritten, touched or
    replaced since): False, leaving it, otherwise. On GCS one delete on the precondition
    `ifGenerationMatch` (atomic). Locally the file is renamed aside (atomic) and put back,
    by a hard link, when it turns out to be another; between the two a creator may slip
    in, which POSIX gives no way to exclude. Other stores: checked, then removed."""
    if not is_remote(path):
        aside = f"{path}.removed-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        try:
            if stamp(aside)[1] == version:
                return True
            try:
                os.link(aside, path)  # not the one judged: put it back
            except FileExistsError:
                pass
            return False
        finally:
            os.remove(aside)
    fs, p = filesystem(path)
    if _is_gcs(fs):
        from fsspec.asyn import sync
        bucket, key, _ = fs.split_path(p)
        try:
            sync(fs.loop, fs._call, "DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(version))
        except (FileExistsError, FileNotFoundError):  # 412: rewritten since; 404: gone
            return False
        fs.invalidate_cache(p)
        return True
    try:
        if stamp(path)[1] != version:
            return False
        fs.rm_file(p)
    except FileNotFoundError:
        return False
    return True


class Appender:
    """A file written by appending, local or on object storage.

    Locally an open file, flushed at each `flush`. On GCS, each flush uploads the bytes
    written since the last one as a small object and composes it onto the file (a
    server-side concatenation: what is there is never uploaded again, so a run's log costs
    what it adds, not its whole length at every line); GCS caps an object at 1024
    components, so every `REWRITE_EVERY` flushes the object is rewritten whole once. Other
    object stores, which cannot compose, get the whole object rewritten at each flush."""

    REWRITE_EVERY = 500

    def __init__(self, path: str, initial: bytes = b""):
        """Start `path` as `initial` (replacing what is there)."""
        self.path = path
        self._pending = b""
        if not is_remote(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            write_bytes(path, initial)
            self._file = open(path, "ab")
            return
        self._file = None
        self._fs, self._key = filesystem(path)
        self._compose = "gcs" in (self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,))
        self._whole = initial  # what the object holds (kept only where it is rewritten)
        self._composed = 0
        self._fs.pipe_file(self._key, initial)

    def write(self, data: bytes) -> None:
        if self._file is not None:
            self._file.write(data)
        else:
            self._pending += data

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            return
        if not self._pending:
            return
        data, self._pending = self._pending, b""
        if not self._compose or self._composed >= self.REWRITE_EVERY:
            whole = (self._fs.cat_file(self._key) if self._compose else self._whole) + data
            self._fs.pipe_file(self._key, whole)
            self._whole, self._composed = (b"" if self._compose else whole), 0
            return
        part = f"{self._key}.part-{socket.gethostname()}-{os.getpid()}"
        self._fs.pipe_file(part, data)
        try:
            self._fs.merge(self._key, [self._key, part])
        finally:
            self._fs.rm_file(part)
        self._composed += 1

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


def makedirs(path: str) -> None:
    """A local directory (a bucket needs none)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    fs, p = filesystem(path)
    try:
        fs.rm_file(p)
    except FileNotFoundError:
        pass


def listdir(path: str) -> List[str]:
    """Names in a directory (an empty list when there is none)."""
    fs, p = filesystem(path)
    try:
        return sorted(os.path.basename(e.rstrip("/")) for e in fs.ls(p, detail=False))
    except FileNotFoundError:
        return []


def upload_file(local: str, path: str) -> None:
    """A local file written to `path` (local: moved into place)."""
    if is_remote(path):
        fs, p = filesystem(path)
        fs.put_file(local, p)
        os.remove(local)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.replace(local, path)


def upload_dir(local: str, path: str, last: str = "") -> None:
    """Every file under a local directory written under `path` (local: copied); the file
    named `last` after all the others (the one whose presence says the directory is whole)."""
    rels = sorted(os.path.relpath(os.path.join(root, name), local) for root, _, files in os.walk(local)
                  for name in files)
    for rel in sorted(rels, key=lambda r: r == last):
        with open(os.path.join(local, rel), "rb") as f:
            write_bytes(join(path, *rel.split(os.sep)), f.read())


def cache_dir(path: str) -> str:
    """The local directory that mirrors remote `path` on this host."""
    key = hashlib.sha256(path.encode()).hexdigest()[:16]
    return os.path.join(os.environ.get(CACHE_ENV) or tempfile.gettempdir(), "distil_jax_cache", key)


def local_copy(path: str, files: List[str] = ()) -> str:
    """A local directory holding `path`'s files (`files`, relative; empty: all): `path`
    itself when local, else this host's cached mirror. One listing of the remote directory
    gives every file's size and version (GCS generation, checksum); a cached file is kept
    while they match and downloaded again when the object was rewritten."""
    if not is_remote(path):
        return path
    fs, root = filesystem(path)
    root = root.rstrip("/")
    local = cache_dir(path)
    listing = {os.path.relpath(p, root): info for p, info in fs.find(root, detail=True).items()}
    for rel in list(files) or sorted(listing):
        if rel not in listing:
            raise FileNotFoundError(f"{join(path, rel)} does not exist")
        info = listing[rel]
        version = json.dumps([info.get(k) for k in ("size", "generation", "md5Hash", "crc32c", "ETag", "mtime")],
                             default=str)
        target = os.path.join(local, rel)
        stamp = target + ".version"
        if os.path.exists(target) and os.path.exists(stamp) and open(stamp).read() == version:
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp{os.getpid()}"
        try:
            fs.get_file(root + "/" + rel, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        with open(stamp, "w") as f:
            f.write(version)
    return local

def check_writable(path: str) -> None:
    """Raise StorageError, naming the bucket and the fix, if `path` on object storage cannot be
    written (a small object is written and removed); local paths are left to the OS."""
    if not is_remote(path):
        return
    probe = join(path, f".distil_jax_write_check_{socket.gethostname()}_{os.getpid()}")
    try:
        write_bytes(probe, b"")
        remove(probe)
    except Exception as e:  # noqa: BLE001 - no bucket, no permission, no network
        scheme, _, rest = path.partition("://")
        bucket = rest.split("/")[0]
        why = ("the bucket does not exist" if isinstance(e, FileNotFoundError) else
               "these credentials may not write there" if isinstance(e, PermissionError) else
               f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        raise StorageError(f"{path} cannot be written ({why}). Create the bucket (`gcloud storage buckets create "
                           f"{scheme}://{bucket}`), grant this machine's account write access to it, or give "
                           "another path; nothing was written") from None
