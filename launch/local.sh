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
# Ctrl-C (or SIGTERM) is passed on to every process: they checkpoint and stop together.
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
while (($#)); do
  case $1 in
    --num_processes=*) num_processes=${1#*=} ;;
    --devices_per_process=*) devices=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --log_dir=*) log_dir=${1#*=} ;;
    --python=*) python_bin=${1#*=} ;;
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
((${#main_flags[@]})) || die "give the flags of distil_jax.main after --, at least --config=... --workdir=..."
[[ " ${main_flags[*]}" == *" --workdir="* ]] || die "MAIN_FLAGS need --workdir=DIR (shared by all processes)"
for flag in "${main_flags[@]}"; do
  case $flag in
    --coordinator_address* | --num_processes* | --process_id*)
      die "'$flag' is set by this script; leave it out of MAIN_FLAGS" ;;
  esac
done
if [[ -z $port ]]; then
  port=$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
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

if ((!dry_run)); then
  mkdir -p "$log_dir"
  trap 'stop_all TERM' INT TERM
fi
for ((i = 0; i < num_processes; i++)); do
  command_of "$i"
  if ((i == 0)); then
    echo "+ $(quote "${cmd[@]}")"
    ((dry_run)) || { "${cmd[@]}" & running[$!]=$i; }
  else
    echo "+ $(quote "${cmd[@]}") >$(quote "$log_dir/process_$i.log") 2>&1"
    ((dry_run)) || { "${cmd[@]}" >"$log_dir/process_$i.log" 2>&1 & running[$!]=$i; }
  fi
done
((dry_run)) && exit 0
echo "+ logs of processes 1..$((num_processes - 1)): $log_dir" >&2

status=0
while ((${#running[@]})); do
  finished=""
  rc=0
  wait -n -p finished "${!running[@]}" || rc=$?
  [[ -n $finished ]] || continue  # a trapped signal interrupted the wait
  i=${running[$finished]}
  unset "running[$finished]"
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "error: process $i exited with status $rc; stopping the others" >&2
    ((i == 0)) || tail -n 20 "$log_dir/process_$i.log" >&2
    stop_all KILL
  fi
done
exit "$status"
