#!/usr/bin/env bash
# Distil on machines with no scheduler: the coordinator's address and every process's
# index are explicit flags of distil_jax.main. Two ways:
#
# On each node, by hand (process 0's node hosts the coordinator on PORT):
#   node0$ launch/multinode.sh --coordinator=node0:8476 --num_processes=2 --process_id=0 -- \
#              --config=configs/base.py --workdir=/shared/distil/run1
#   node1$ launch/multinode.sh --coordinator=node0:8476 --num_processes=2 --process_id=1 -- ...
#
# From one machine, over ssh (the first host runs process 0 and the coordinator; the
# code is installed at --remote_dir on every host; output comes back prefixed by host):
#   launch/multinode.sh --hosts=node0,node1 --port=8476 -- --config=... --workdir=/shared/...
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/multinode.sh (--coordinator=HOST:PORT --num_processes=N --process_id=I
                            | --hosts=H0,H1,... [--port=PORT] [--remote_dir=DIR])
                           [--python=PYTHON] [--dry_run] -- MAIN_FLAGS...
USAGE
}

coordinator="" num_processes="" process_id="" hosts="" port=8476 remote_dir=distil_jax
python_bin=python3
while (($#)); do
  case $1 in
    --coordinator=*) coordinator=${1#*=} ;;
    --num_processes=*) num_processes=${1#*=} ;;
    --process_id=*) process_id=${1#*=} ;;
    --hosts=*) hosts=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --remote_dir=*) remote_dir=${1#*=} ;;
    --python=*) python_bin=${1#*=} ;;
    --dry_run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (flags for distil_jax.main go after --)" ;;
  esac
  shift
done
main_flags=("$@")
[[ " ${main_flags[*]}" == *" --workdir="* ]] || die "MAIN_FLAGS need --workdir=DIR on storage all nodes share"
[[ " ${main_flags[*]}" == *" --config="* ]] || die "MAIN_FLAGS need --config=configs/FILE.py"
if ! is_uint "$port" || ((port < 1 || port > 65535)); then die "--port must be in 1..65535, got '$port'"; fi

main_command() {  # coordinator, process count, process index
  cmd=("$python_bin" -m distil_jax.main "--coordinator_address=$1" "--num_processes=$2" "--process_id=$3"
       "${main_flags[@]}")
}

if [[ -z $hosts ]]; then  # this node only
  [[ $coordinator =~ ^[^:]+:[0-9]+$ ]] || die "--coordinator must be HOST:PORT of process 0, got '$coordinator'"
  if ! is_uint "$num_processes" || ((num_processes < 1)); then
    die "--num_processes must be a positive integer, got '$num_processes'"
  fi
  if ! is_uint "$process_id" || ((process_id >= num_processes)); then
    die "--process_id must be in 0..$((num_processes - 1)), got '$process_id'"
  fi
  main_command "$coordinator" "$num_processes" "$process_id"
  run "${cmd[@]}"
  exit
fi

[[ -z $coordinator$num_processes$process_id ]] || die "--hosts sets the coordinator and indices; drop the other flags"
IFS=, read -r -a host_list <<<"$hosts"
((${#host_list[@]})) || die "--hosts is empty"
pids=()
for i in "${!host_list[@]}"; do
  main_command "${host_list[0]}:$port" "${#host_list[@]}" "$i"
  remote="cd $(quote "$remote_dir") && $(quote "${cmd[@]}")"
  if ((dry_run)); then
    run ssh "${host_list[i]}" "$remote"
  else
    echo "+ $(quote ssh "${host_list[i]}" "$remote")"
    # shellcheck disable=SC2029  # $remote is built and quoted here, for the remote shell
    ssh "${host_list[i]}" "$remote" 2>&1 | sed -u "s/^/[${host_list[i]}] /" &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
