#!/usr/bin/env bash
# On a TPU VM worker: run a command detached from the ssh session that starts it (a
# dropped connection does not stop it), and say how it is doing. launch/tpu_vm.sh runs
# this on every worker over ssh; by hand, on a worker:
#
#   distil_jax/launch/tpu_worker.sh start [--log_to=gs://BUCKET/run/logs] -- COMMAND...
#   distil_jax/launch/tpu_worker.sh status   # "worker N: running", "worker N: exit S" or "worker N: none"
#   distil_jax/launch/tpu_worker.sh stop     # SIGTERM to the command: distil_jax.main checkpoints, exits 75
#
# Files in $HOME: distil_jax.log (the command's output; every start appends),
# distil_jax.pid (while it runs), distil_jax.exit (its exit status, written when it
# ends; a start removes it). --log_to copies the log to LOG_TO/worker-N.log every
# minute and when the command ends. N is the worker's index in the slice
# ($TPU_WORKER_ID, else the VM's metadata, else the host name).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

usage() { sed -n '2,14p' "$0"; }

log=$HOME/distil_jax.log
pid_file=$HOME/distil_jax.pid
exit_file=$HOME/distil_jax.exit
copy_every_s=60

worker_id() {
  if [[ -n ${TPU_WORKER_ID:-} ]]; then echo "$TPU_WORKER_ID"; return; fi
  curl -sf --max-time 5 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number ||
    hostname
}

running_pid() {  # the pid of the command's supervisor (the `_run` below), if it runs
  local pid
  [[ -f $pid_file ]] || return 1
  pid=$(<"$pid_file")
  is_uint "$pid" && kill -0 "$pid" 2>/dev/null && [[ $(ps -o args= -p "$pid" 2>/dev/null) == *tpu_worker.sh* ]] &&
    echo "$pid"
}

copy_log() {  # to the bucket; a failure is noted in the log and tried again next time
  gcloud storage cp --quiet "$log" "$1/worker-$(worker_id).log" >/dev/null 2>&1 ||
    echo "tpu_worker.sh: could not copy $log to $1 (tried again later)" >>"$log"
}

# The detached part: runs COMMAND, passes SIGTERM/SIGINT/SIGHUP on to it, waits for it
# (it checkpoints first), then writes its exit status.
run_detached() {
  local log_to=$1 copier="" child rc=0
  shift
  if [[ -n $log_to ]]; then
    (  # its sleep ends with it
      trap 'kill "$nap" 2>/dev/null; exit 0' TERM
      while :; do
        sleep "$copy_every_s" & nap=$!
        wait "$nap"
        copy_log "$log_to"
      done
    ) &
    copier=$!
  fi
  "$@" &
  child=$!
  trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT HUP
  wait "$child" || rc=$?
  while kill -0 "$child" 2>/dev/null; do  # the wait was interrupted by a signal: wait on
    rc=0
    wait "$child" || rc=$?
  done
  echo "=== $(date -u '+%F %T') exit status $rc"
  [[ -z $copier ]] || kill "$copier" 2>/dev/null || true
  echo "$rc" >"$exit_file.tmp" && mv "$exit_file.tmp" "$exit_file"
  rm -f "$pid_file"
  [[ -z $log_to ]] || copy_log "$log_to"
}

command=${1:-}
(($#)) && shift
case $command in
  start)
    log_to=""
    while (($#)); do
      case $1 in
        --log_to=*) log_to=${1#*=} ;;
        --) shift; break ;;
        *) die "unknown option '$1' of start (the command goes after --)" ;;
      esac
      shift
    done
    (($#)) || die "give the command to run after --"
    if pid=$(running_pid); then
      echo "error: worker $(worker_id): a run is going (pid $pid); stop it first: $0 stop" >&2
      exit 1
    fi
    rm -f "$exit_file"
    echo "=== $(date -u '+%F %T') start: $(quote "$@")" >>"$log"
    nohup setsid bash "$0" _run "$log_to" "$@" >>"$log" 2>&1 </dev/null &
    echo "$!" >"$pid_file"
    echo "worker $(worker_id): started (pid $!), output in $log"
    ;;
  _run) run_detached "$@" ;;
  status)
    if running_pid >/dev/null; then
      echo "worker $(worker_id): running"
    elif [[ -f $exit_file ]]; then
      echo "worker $(worker_id): exit $(<"$exit_file")"
    else
      echo "worker $(worker_id): none"  # never started here, or the VM restarted under it
    fi
    ;;
  stop)
    if pid=$(running_pid); then
      kill -TERM "$pid"
      echo "worker $(worker_id): SIGTERM sent to pid $pid"
    else
      echo "worker $(worker_id): nothing runs"
    fi
    ;;
  -h | --help) usage ;;
  *) die "the command must be start, status or stop, got '$command'" ;;
esac
