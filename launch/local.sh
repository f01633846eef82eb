#!/usr/bin/env bash
# Run distil_jax.main as N processes on this machine, the way N hosts would run it:
# process 0 hosts the coordinator on 127.0.0.1:PORT, every process gets
# DEVICES fake CPU devices, and the N processes train one model together.
# Process 0's output comes here; the others' go to LOG_DIR/process_I.log.
#
#   launch/local.sh --num_processes=2 --devices_per_process=4 -- \
#       --config=configs/tiny.py --workdir=/tmp/distil_2proc
#
# If one process fails the others are stopped, and the script exits with its status.
# Ctrl-C (or SIGTERM) is passed on to every process: they checkpoint and stop together
# (exit status 75). With --supervise, processes that were killed or stopped with a
# checkpoint are all started again, and resume from it, until the run finishes.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/local.sh [options] -- MAIN_FLAGS...

  --num_processes=N        processes to start (default 2)
  --devices_per_process=K  fake CPU devices per process (default 4); 0 keeps
                           XLA_FLAGS and JAX_PLATFORMS as they are (real accelerators)
  --port=PORT              coordinator port on 127.0.0.1 (default: a free one)
  --log_dir=DIR            where processes 1..N-1 write their logs (default: a new temp dir)
  --python=PYTHON          interpreter (default: python, or $PYTHON)
  --supervise[=MAX]        start all N again (a new port unless --port) when a process is
                           killed by a signal or stops with a checkpoint (exit 75), at most
                           MAX times (default 10); exit 0 once the run finished. Another
                           failure (e.g. exit 1 with no process killed) still ends it.
  --dry_run                print the commands, run nothing
MAIN_FLAGS go to every process: --config=... --workdir=... [--config.a.b=...]
EOF
}



num_processes=2
devices=4
port=""
log_dir=""
python_bin=${PYTHON:-python}
dry_run=0
supervise=0
max_restarts=10
while (($#)); do
  case $1 in
    --num_processes=*) num_processes=${1#*=} ;;
    --devices_per_process=*) devices=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --log_dir=*) log_dir=${1#*=} ;;
    --python=*) python_bin=${1#*=} ;;
    --supervise) supervise=1 ;;
    --supervise=*) supervise=1; max_restarts=${1#*=} ;;
    --dry_run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (flags for distil_jax.main go after --)" ;;
  esac
  shift
done
main_flags=("$@")

if ! is_uint "$num_processes" || ((num_processes < 1)); then
  die "--num_processes must be a positive integer, got '$num_processes'"
fi
is_uint "$devices" || die "--devices_per_process must be an integer >= 0, got '$devices'"
is_uint "$max_restarts" || die "--supervise=MAX_RESTARTS must be an integer >= 0, got '$max_restarts'"
((${#main_flags[@]})) || die "give the flags of distil_jax.main after --, at least --config=... --workdir=..."
[[ " ${main_flags[*]}" == *" --workdir="* ]] || die "MAIN_FLAGS need --workdir=DIR (shared by all processes)"
for flag in "${main_flags[@]}"; do
  case $flag in
    --coordinator_address* | --num_processes* | --process_id*)
      die "'$flag' is set by this script; leave it out of MAIN_FLAGS" ;;
  esac
done
free_port() {
  "$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
fixed_port=$port
[[ -n $port ]] || port=$(free_port)
if ! is_uint "$port" || ((port < 1 || port > 65535)); then
  die "--port must be in 1..65535, got '$port'"
fi
if [[ -z $log_dir ]]; then
  if ((dry_run)); then log_dir=LOG_DIR; else log_dir=$(mktemp -d "${TMPDIR:-/tmp}/distil_jax_local.XXXXXX"); fi
fi

# The process environment: fake CPU devices replace any device count already in XLA_FLAGS.
env_vars=()
if ((devices > 0)); then
  xla_flags=""
  for f in ${XLA_FLAGS:-}; do
    [[ $f == --xla_force_host_platform_device_count=* ]] || xla_flags+="$f "
  done
  env_vars=("JAX_PLATFORMS=cpu" "XLA_FLAGS=${xla_flags}--xla_force_host_platform_device_count=$devices")
fi

command_of() {  # the command line of process $1
  cmd=(env "${env_vars[@]}" "$python_bin" -m distil_jax.main "--coordinator_address=127.0.0.1:$port"
       "--num_processes=$num_processes" "--process_id=$1" "${main_flags[@]}")
}


declare -A running=()  # pid -> process index
stop_all() {
  local sig=$1
  for pid in "${!running[@]}"; do kill "-$sig" "$pid" 2>/dev/null || true; done
}

launch() {  # start all processes (logs appended when supervised: every round's output is kept)
  local redirect='>'
  ((supervise)) && redirect='>>'
  for ((i = 0; i < num_processes; i++)); do
    command_of "$i"
    if ((i == 0)); then
      echo "+ $(quote "${cmd[@]}")"
      ((dry_run)) || { "${cmd[@]}" & running[$!]=$i; }
    else
      echo "+ $(quote "${cmd[@]}") $redirect$(quote "$log_dir/process_$i.log") 2>&1"
      if ((!dry_run)); then
        if ((supervise)); then
          "${cmd[@]}" >>"$log_dir/process_$i.log" 2>&1 & running[$!]=$i
        else
          "${cmd[@]}" >"$log_dir/process_$i.log" 2>&1 & running[$!]=$i
        fi
      fi
    fi
  done
}

signal_name() { kill -l "$1" 2>/dev/null || echo "signal $1"; }
gone() {  # whether process $1 has exited (reaped by this shell, or a zombie)
  ! kill -0 "$1" 2>/dev/null || [[ $(ps -o stat= -p "$1" 2>/dev/null) == Z* ]]
}
resumable_cause() {  # why process $1's exit status $2 can be resumed; fails for a real error
  if (($2 == 75)); then
    echo "process $1 stopped with a checkpoint (exit 75)"
  elif (($2 > 128)); then
    echo "process $1 was killed by SIG$(signal_name $(($2 - 128)))"
  else
    return 1
  fi
}

# One round: wait for every process. status: the first failure's exit status (0: all
# finished); cause: why the round can be resumed ("" for a real error). How a failure is
# told apart: exit 75 (a checkpoint, then a stop) and death by a signal (status > 128)
# can be resumed; once a process died of a signal, the others' failures are its
# consequences (they lost a peer). A process that fails otherwise, while no other has
# died, is a real error. Exit 75 stops nobody: the others stop at the same update.
wait_round() {
  status=0 cause=""
  local finished rc i pid
  while ((${#running[@]})); do
    finished="" rc=0
    wait -n -p finished || rc=$?  # the next of this round's processes (our only jobs) to end
    if [[ -z ${finished:-} ]]; then  # -p leaves it unset when no job ended:
      ((rc == 127)) || continue  # a trapped signal interrupted the wait
      # No job known to bash (a pid it lost track of): look for an ended process instead.
      for pid in "${!running[@]}"; do gone "$pid" && finished=$pid && break; done
      [[ -n ${finished:-} ]] || { sleep 0.2; continue; }
      rc=0
      wait "$finished" || rc=$?
    fi
    i=${running[$finished]}
    unset "running[$finished]"
    ((rc != 0 && status == 0)) || continue
    status=$rc
    if cause=$(resumable_cause "$i" "$rc"); then
      ((rc == 75)) && continue
    else
      for pid in "${!running[@]}"; do  # a peer that died first, and was not reaped yet
        gone "$pid" || continue
        local peer=${running[$pid]} peer_rc=0
        wait "$pid" || peer_rc=$?
        unset "running[$pid]"
        cause=$(resumable_cause "$peer" "$peer_rc") && break
      done
    fi
    if [[ -n $cause ]]; then
      echo "process $i exited with status $rc ($cause); stopping the others" >&2
    else
      echo "error: process $i exited with status $rc; stopping the others" >&2
      ((i == 0)) || tail -n 20 "$log_dir/process_$i.log" >&2
    fi
    stop_all KILL
  done
}

stopping=0
if ((!dry_run)); then
  mkdir -p "$log_dir"
  trap 'stopping=1; stop_all TERM' INT TERM
fi
launch
if ((dry_run)); then
  if ((supervise)); then
    where="a new coordinator port"
    [[ -z $fixed_port ]] || where="port $fixed_port"
    echo "+ supervised: all $num_processes start again when one is killed or exits 75" \
      "(at most $max_restarts times, each on $where)"
  fi
  exit 0
fi
echo "+ logs of processes 1..$((num_processes - 1)): $log_dir" >&2

restarts=0
while :; do
  wait_round
  if ((status == 0 || !supervise || stopping)) || [[ -z $cause ]]; then exit "$status"; fi
  if ((restarts >= max_restarts)); then
    echo "error: $cause; gave up after $max_restarts restarts (--supervise=$max_restarts)." \
      "The same command resumes from the last checkpoint." >&2
    exit "$status"
  fi
  restarts=$((restarts + 1))
  [[ -n $fixed_port ]] || port=$(free_port)
  echo "+ restart $restarts of $max_restarts: $cause; starting all $num_processes processes again" \
    "(coordinator port $port); they resume from the last checkpoint" >&2
  launch
  ((stopping)) && stop_all TERM  # a signal that came during the start
done
