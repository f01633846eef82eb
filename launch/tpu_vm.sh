#!/usr/bin/env bash
# Distil on a Cloud TPU VM (one host or a pod slice): create it, put the code on every
# worker, run distil_jax.main on all workers at once, stream their output, delete it.
# Every worker runs the same command; JAX finds its peers on a TPU VM by itself.
#
#   launch/tpu_vm.sh --name=distil --zone=us-central2-b --accelerator_type=v4-32 \
#       --runtime_version=tpu-ubuntu2204-base --workdir=gs://BUCKET/distil/run1 \
#       --tfds_data_dir=gs://BUCKET/tensorflow_datasets -- --config=configs/base.py
#
# The workdir (checkpoints, metrics) must be a bucket every worker writes to; the
# TFDS data dir holds the prepared datasets. Stages run in order: create, setup, run,
# delete (--stages=setup,run reuses an existing VM and keeps it).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh [options] -- MAIN_FLAGS...

  --name=NAME                TPU VM (and queued resource) name            (required)
  --zone=ZONE                e.g. us-central2-b                            (required)
  --accelerator_type=TYPE    e.g. v4-32, v5litepod-64                      (required)
  --runtime_version=VERSION  e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite (required)
  --workdir=gs://...         checkpoints, metrics and exports              (required)
  --tfds_data_dir=gs://...   TFDS_DATA_DIR on the workers (default: unset)
  --project=PROJECT          gcloud project (default: gcloud's)
  --queued                   ask for a queued resource and wait until it is ACTIVE
  --spot                     spot capacity
  --repo=URL [--ref=REF]     git clone REF of URL on the workers (default: copy this
                             checkout's HEAD with git archive)
  --stages=LIST              of create,setup,run,delete (default: all four)
  --log=FILE                 also write the run's output here (default: NAME.log)
  --dry_run                  print the commands, run nothing
MAIN_FLAGS go to distil_jax.main on every worker, e.g. --config=configs/base.py.
EOF
}


name="" zone="" accelerator_type="" runtime_version="" workdir="" tfds_data_dir=""
project="" queued=0 spot=0 repo="" ref="main" stages="create,setup,run,delete" log="" dry_run=0
while (($#)); do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --accelerator_type=*) accelerator_type=${1#*=} ;;
    --runtime_version=*) runtime_version=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --tfds_data_dir=*) tfds_data_dir=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --repo=*) repo=${1#*=} ;;
    --ref=*) ref=${1#*=} ;;
    --stages=*) stages=${1#*=} ;;
    --log=*) log=${1#*=} ;;
    --dry_run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (flags for distil_jax.main go after --)" ;;
  esac
  shift
done
main_flags=("$@")

[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name must be lowercase letters, digits and dashes, got '$name'"
[[ -n $zone ]] || die "--zone is required, e.g. --zone=us-central2-b"
[[ $accelerator_type =~ ^v[0-9][a-z]*(pod)?-[0-9]+$ ]] ||
  die "--accelerator_type must look like v4-32 or v5litepod-64, got '$accelerator_type'"
[[ -n $runtime_version ]] || die "--runtime_version is required, e.g. tpu-ubuntu2204-base"
[[ $workdir == gs://?* ]] ||
  die "--workdir must be a gs:// bucket path that every worker can write (got '$workdir')"
[[ -z $tfds_data_dir || $tfds_data_dir == gs://?* ]] || die "--tfds_data_dir must be a gs:// path, got '$tfds_data_dir'"
[[ " ${main_flags[*]}" == *" --config="* ]] || die "MAIN_FLAGS need --config=configs/FILE.py"
for flag in "${main_flags[@]}"; do
  case $flag in
    --workdir=*) die "give the workdir as --workdir before --, not in MAIN_FLAGS" ;;
    --coordinator_address* | --num_processes* | --process_id*)
      die "'$flag': on a TPU VM JAX finds its peers itself; leave it out" ;;
  esac
done
IFS=, read -r -a stage_list <<<"$stages"
for s in "${stage_list[@]}"; do
  case $s in create | setup | run | delete) ;; *) die "unknown stage '$s' in --stages (create,setup,run,delete)" ;; esac
done
log=${log:-$name.log}
cd "$(dirname "$0")/.."  # the checkout's root: git archive and the log are relative to it

has_stage() { [[ ",$stages," == *",$1,"* ]]; }



common=(--zone="$zone")
[[ -z $project ]] || common+=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)
on_all_workers() { run "${tpu[@]}" ssh "$name" "${common[@]}" --worker=all --command="$1"; }

create() {
  local capacity=()
  ((spot)) && capacity=(--spot)
  if ((queued)); then
    run gcloud compute tpus queued-resources create "$name" --node-id="$name" "${common[@]}" \
      --accelerator-type="$accelerator_type" --runtime-version="$runtime_version" "${capacity[@]}"
    echo "+ waiting for queued resource $name to become ACTIVE"
    ((dry_run)) && return 0
    local state=""
    until [[ $state == ACTIVE ]]; do
      state=$(gcloud compute tpus queued-resources describe "$name" "${common[@]}" --format='value(state.state)')
      case $state in FAILED | SUSPENDED) die "queued resource $name is $state" ;; esac
      sleep 30
    done
  else
    run "${tpu[@]}" create "$name" "${common[@]}" --accelerator-type="$accelerator_type" \
      --version="$runtime_version" "${capacity[@]}"
  fi
}

setup() {
  if [[ -n $repo ]]; then
    on_all_workers "rm -rf distil_jax && git clone --depth=1 --branch=$(quote "$ref") $(quote "$repo") distil_jax"
  else
    local archive=distil_jax.tar.gz
    run git archive --format=tar.gz --prefix=distil_jax/ -o "$archive" HEAD
    run "${tpu[@]}" scp "$archive" "$name:" "${common[@]}" --worker=all
    on_all_workers "rm -rf distil_jax && tar xzf $archive"
  fi
  on_all_workers "cd distil_jax && pip install -U \"jax[tpu]\" && pip install -e . gcsfs google-cloud-storage"
}

run_main() {
  local env_prefix="" cmd
  [[ -z $tfds_data_dir ]] || env_prefix="TFDS_DATA_DIR=$(quote "$tfds_data_dir") "
  cmd="cd distil_jax && ${env_prefix}python3 -m distil_jax.main $(quote "--workdir=$workdir" "${main_flags[@]}")"
  echo "+ output of all workers also goes to $log"
  if ((dry_run)); then
    on_all_workers "$cmd"
  else
    on_all_workers "$cmd" 2>&1 | tee "$log"
  fi
}

delete() {
  if ((queued)); then
    run gcloud compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
  else
    run "${tpu[@]}" delete "$name" "${common[@]}" --quiet
  fi
}

status=0
has_stage create && create
has_stage setup && setup
if has_stage run; then run_main || status=$?; fi
has_stage delete && delete  # also after a failed run: an idle TPU VM still costs
exit "$status"
