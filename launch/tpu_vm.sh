#!/usr/bin/env bash
# Distil on a Cloud TPU VM (one host or a pod slice): create it, put the code on every
# worker, start distil_jax.main on all workers at once, detached (it keeps running when
# this script or its connection ends). Every worker runs the same command; JAX finds its
# peers on a TPU VM by itself.
#
#   launch/tpu_vm.sh --name=distil --zone=us-central2-b --accelerator_type=v4-32 \
#       --runtime_version=tpu-ubuntu2204-base --workdir=gs://BUCKET/distil/run1 \
#       --tfds_data_dir=gs://BUCKET/tensorflow_datasets --queued --spot --watch -- \
#       --config=configs/base.py
#
# The workdir (checkpoints, metrics) must be a bucket every worker writes to; the
# TFDS data dir holds the prepared datasets. Stages run in order: create, setup, run
# (the default), delete (--stages=delete deletes it). --watch stays to supervise: after a
# preemption it recreates what is needed and starts the same command again, which resumes
# from the last checkpoint; when the run is finished it deletes the TPU (--keep keeps it).
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
  --stages=LIST              of create,setup,run,delete (default: create,setup,run)
  --log_to_bucket            copy each worker's log to WORKDIR/logs/worker-N.log every
                             minute and when the run ends
  --watch                    stay and supervise (below); ends with the run's status
  --poll=SECONDS             how often --watch (and the wait for ACTIVE) looks (default 60)
  --max_restarts=N           --watch gives up after N restarts (default 10)
  --keep                     --watch keeps the TPU when the run is finished
  --dry_run                  print the commands, run nothing
MAIN_FLAGS go to distil_jax.main on every worker, e.g. --config=configs/base.py.

The run is detached on every worker: its output goes to ~/distil_jax.log there, its exit
status to ~/distil_jax.exit when it ends (launch/tpu_worker.sh). --watch polls the TPU's
state and the workers' exit files; after a preemption (a queued resource SUSPENDED or
FAILED, a VM PREEMPTED, TERMINATED or gone) it deletes and creates it again, sets it up
and starts the run again; workers that exited 75 (stopped with a checkpoint), died of a
signal or lost their run are started again. It ends with 0 when every worker exited 0
(and deletes the TPU unless --keep), with the workers' status on another failure, and
with 75 after --max_restarts (the same command resumes from the last checkpoint).
EOF
}


name="" zone="" accelerator_type="" runtime_version="" workdir="" tfds_data_dir=""
project="" queued=0 spot=0 repo="" ref="main" stages="create,setup,run" dry_run=0
log_to_bucket=0 watch=0 poll=60 max_restarts=10 keep=0
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
    --log_to_bucket) log_to_bucket=1 ;;
    --watch) watch=1 ;;
    --poll=*) poll=${1#*=} ;;
    --max_restarts=*) max_restarts=${1#*=} ;;
    --keep) keep=1 ;;
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
is_uint "$poll" || die "--poll must be a number of seconds, got '$poll'"
is_uint "$max_restarts" || die "--max_restarts must be an integer >= 0, got '$max_restarts'"
has_stage() { [[ ",$stages," == *",$1,"* ]]; }
if has_stage run && has_stage delete; then
  if ((watch)); then
    die "leave delete out of --stages with --watch: it deletes the TPU when the run is finished (--keep keeps it)"
  fi
  die "--stages with both run and delete would delete the TPU under the run it just started" \
    "(the run is detached): add --watch to delete it when the run is finished"
fi
cd "$(dirname "$0")/.."  # the checkout's root: git archive is relative to it



common=(--zone="$zone")
[[ -z $project ]] || common+=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)
queued_resources=(gcloud compute tpus queued-resources)
if ((queued)); then kind="queued resource" up_state=ACTIVE; else kind="TPU VM" up_state=READY; fi
on_all_workers() { run "${tpu[@]}" ssh "$name" "${common[@]}" --worker=all --command="$1"; }

# --- the state queries --watch polls (printed in a dry run; while watching, one line per poll)
describe_command() {
  if ((queued)); then
    cmd=("${queued_resources[@]}" describe "$name" "${common[@]}" --format='value(state.state)')
  else
    cmd=("${tpu[@]}" describe "$name" "${common[@]}" --format='value(state)')
  fi
}
status_command() {
  cmd=("${tpu[@]}" ssh "$name" "${common[@]}" --worker=all --command="distil_jax/launch/tpu_worker.sh status")
}
gcloud_errors=/dev/null  # gcloud's messages of the last state query (a file, below)
resource_state() {  # ACTIVE, READY, SUSPENDED, ...; MISSING when it does not exist; UNKNOWN when gcloud fails
  local state
  describe_command
  if state=$("${cmd[@]}" 2>"$gcloud_errors"); then
    echo "${state:-UNKNOWN}"
  elif grep -q NOT_FOUND "$gcloud_errors"; then
    echo MISSING
  else
    echo UNKNOWN
  fi
}
state_class() {  # up | lost (create it again) | pending (look again later)
  case $1 in
    ACTIVE | READY) echo up ;;
    SUSPENDED | PREEMPTED | FAILED | TERMINATED | STOPPED | MISSING) echo lost ;;
    *) echo pending ;;  # CREATING, ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, SUSPENDING, RESTARTING, ...
  esac
}
worker_states() {  # a line per worker, "worker N: running | exit STATUS | none"; fails if any is unreachable
  status_command
  "${cmd[@]}" 2>"$gcloud_errors" | grep -E '^worker [^:]+: '
}
workers_verdict() {  # of worker_states' lines -> verdict (running|finished|resume|error), cause, verdict_status
  local line worker answer n=0 running=0 resumable="" errors="" code
  verdict_status=0
  while IFS= read -r line; do
    worker=${line%%: *} answer=${line#*: } n=$((n + 1))
    case $answer in
      running) running=$((running + 1)) ;;
      "exit 0") ;;
      "exit 75") resumable+=", $worker stopped with a checkpoint (exit 75)" ;;
      "exit "*)
        code=${answer#exit }
        if is_uint "$code" && ((code > 128)); then
          resumable+=", $worker died of SIG$(kill -l $((code - 128)) 2>/dev/null || echo "$((code - 128))")"
        else
          errors+=", $worker exited $code"
          if ((verdict_status == 0)); then
            verdict_status=1
            if is_uint "$code" && ((code > 0)); then verdict_status=$code; fi
          fi
        fi ;;
      none) resumable+=", $worker has no run (its VM restarted?)" ;;
    esac
  done <<<"$1"
  if ((running)); then
    verdict=running cause="$running of $n workers running"
  elif [[ -n $resumable ]]; then  # errors beside a dead or stopped worker: it took them down
    verdict=resume cause=${resumable#, }
  elif [[ -n $errors ]]; then
    verdict=error cause=${errors#, }
  else
    verdict=finished cause="all $n workers exited 0"
  fi
}

wait_until_up() {  # poll until the resource is up (0) or lost (1; its state in $state)
  echo "+ waiting for $kind $name to be $up_state"
  ((dry_run)) && return 0
  while :; do
    state=$(resource_state)
    case $(state_class "$state") in
      up) return 0 ;;
      lost) return 1 ;;
    esac
    sleep "$poll"
  done
}

# --- the stages
create() {
  local capacity=()
  ((spot)) && capacity=(--spot)
  if ((queued)); then
    run "${queued_resources[@]}" create "$name" --node-id="$name" "${common[@]}" \
      --accelerator-type="$accelerator_type" --runtime-version="$runtime_version" "${capacity[@]}" || return 1
    wait_until_up || { echo "error: queued resource $name is $state" >&2; return 1; }
  else
    run "${tpu[@]}" create "$name" "${common[@]}" --accelerator-type="$accelerator_type" \
      --version="$runtime_version" "${capacity[@]}"
  fi
}

archive=distil_jax.tar.gz archived=0
setup() {
  if [[ -n $repo ]]; then
    on_all_workers "rm -rf distil_jax && git clone --depth=1 --branch=$(quote "$ref") $(quote "$repo") distil_jax" ||
      return 1
  else
    if ((!archived)); then  # once: a TPU created again gets the code the run started with
      run git archive --format=tar.gz --prefix=distil_jax/ -o "$archive" HEAD || return 1
      archived=1
    fi
    run "${tpu[@]}" scp "$archive" "$name:" "${common[@]}" --worker=all || return 1
    on_all_workers "rm -rf distil_jax && tar xzf $archive" || return 1
  fi
  # Both installs under the same constraints: jax[tpu] at the pinned jax, jaxlib and
  # libtpu, which `pip install -e .` then cannot move.
  local pin="-c launch/constraints-tpu.txt"
  on_all_workers "cd distil_jax && pip install -U $pin \"jax[tpu]\" && pip install $pin -e . gcsfs google-cloud-storage"
}

start_run() {
  local main=(python3 -m distil_jax.main "--workdir=$workdir" "${main_flags[@]}") options=()
  [[ -z $tfds_data_dir ]] || main=(env "TFDS_DATA_DIR=$tfds_data_dir" "${main[@]}")
  ((log_to_bucket)) && options=("--log_to=${workdir%/}/logs")
  on_all_workers "cd distil_jax && launch/tpu_worker.sh start $(quote "${options[@]}" -- "${main[@]}")" || return 1
  echo "+ started on every worker: output in ~/distil_jax.log, exit status in ~/distil_jax.exit" \
    "(launch/tpu_worker.sh)${options[*]:+; copied to ${workdir%/}/logs}"
  ((watch)) || echo "+ nothing watches it (--watch would): when it is done, delete $kind $name with" \
    "--stages=delete; the TPU costs until then"
}

delete() {
  if ((queued)); then
    run "${queued_resources[@]}" delete "$name" "${common[@]}" --force --quiet
  else
    run "${tpu[@]}" delete "$name" "${common[@]}" --quiet
  fi
}

# --- --watch
note() { echo "[$(date -u '+%F %T')] $*"; }
set_up=1
recover() {  # $1: recreate (delete if there, create, setup) or restart; then start the run
  if [[ $1 == recreate ]]; then
    if [[ $state != MISSING ]]; then delete || return 1; fi
    set_up=0
    create || return 1
  fi
  if ((!set_up)); then setup || return 1; set_up=1; fi
  start_run
}

watch() {
  local restarts=0 unreachable=0 states action
  echo "+ watching $kind $name every $poll s (at most $max_restarts restarts):"
  if ((dry_run)); then
    describe_command && run "${cmd[@]}"
    status_command && run "${cmd[@]}"
    echo "+ on a preemption: delete, create, setup and start again; on workers that exited 75 or died: start again"
    echo "+ when every worker exited 0:"
    ((keep)) || delete
    return 0
  fi
  while :; do
    sleep "$poll"
    state=$(resource_state)
    case $(state_class "$state") in
      pending) note "$kind $name: $state"; continue ;;
      lost) cause="$kind $name is $state" action=recreate ;;
      up)
        if ! states=$(worker_states); then
          unreachable=$((unreachable + 1))
          note "$kind $name: $state; the workers did not answer ($unreachable in a row): $(tail -n 1 "$gcloud_errors")"
          ((unreachable < 5)) && continue
          cause="the workers did not answer $unreachable polls in a row" action=recreate
        else
          unreachable=0
          workers_verdict "$states"
          note "$kind $name: $state; $cause"
          case $verdict in
            running) continue ;;
            finished)
              echo "+ the run is finished"
              ((keep)) || delete
              return 0 ;;
            error)
              echo "error: $cause; not started again. $kind $name is kept: read ~/distil_jax.log on the" \
                "workers, then delete it: $0 ... --stages=delete" >&2
              return "$verdict_status" ;;
            resume) action=restart ;;
          esac
        fi ;;
    esac
    if ((restarts >= max_restarts)); then
      echo "error: $cause; gave up after $max_restarts restarts (--max_restarts). $kind $name is kept;" \
        "the same command resumes from the last checkpoint" >&2
      return 75
    fi
    restarts=$((restarts + 1))
    if [[ $action == recreate ]]; then
      echo "+ restart $restarts of $max_restarts: $cause; creating it again, then setup and the same run"
    else
      echo "+ restart $restarts of $max_restarts: $cause; starting the same run again"
    fi
    recover "$action" || echo "+ restart $restarts did not complete; looking again in $poll s"
  done
}

if ((!dry_run)); then
  gcloud_errors=$(mktemp)
  trap 'rm -f "$gcloud_errors"' EXIT
fi
if has_stage create; then create || exit 1; fi
if ((watch)) && ! has_stage create && { has_stage setup || has_stage run; }; then
  wait_until_up || { echo "error: $kind $name is $state: add create to --stages" >&2; exit 1; }
fi
if has_stage setup; then setup; fi
if has_stage run; then start_run || exit 1; fi
if has_stage delete; then delete; fi
if ((watch)); then
  status=0
  watch || status=$?
  exit "$status"
fi
