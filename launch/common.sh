# Helpers sourced by the launch scripts: errors, printing commands, dry runs.
# shellcheck shell=bash

die() {  # an argument error: the problem, then where the options are listed
  echo "error: $*" >&2
  echo "run $0 --help for the options" >&2
  exit 2
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

quote() {  # words as a shell reads them back: plain when safe, else in single quotes
  local word out=""
  for word in "$@"; do
    if [[ $word =~ ^[][A-Za-z0-9_./:=@,+%^-]+$ && $word != *[][]* ]]; then
      out+=" $word"
    else
      out+=" '${word//\'/\'\\\'\'}'"
    fi
  done
  echo "${out# }"
}

dry_run=${dry_run:-0}
run() {  # print a command, then run it unless this is a dry run
  echo "+ $(quote "$@")"
  ((dry_run)) || "$@"
}
