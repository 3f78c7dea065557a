#!/usr/bin/env bash
# Stop the sandbox SLURM cluster started by up.sh: cancel jobs, then stop each daemon by its
# recorded PID (TERM, wait, KILL). Tolerates daemons that are already gone.
# --wipe also deletes the state directory (accounting DB, job state, logs): job ids restart at 1.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WIPE=0
case ${1:-} in
  --wipe) WIPE=1 ;;
  "") ;;
  *) echo "usage: $0 [--wipe]" >&2; exit 2 ;;
esac

# Cancel jobs first: with proctrack/linuxproc, job steps would outlive a stopped slurmd.
if pid_of slurmctld >/dev/null; then
  jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
  if [[ -n $jobs ]]; then
    log "cancelling jobs: $(echo $jobs)"
    timeout 10 scancel $jobs || true
    for _ in $(seq 40); do
      [[ -z $(timeout 5 squeue -h -o %A 2>/dev/null || true) ]] && break
      sleep 0.5
    done
  fi
fi

for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
  name=${DAEMONS[i]}
  if pid=$(pid_of "$name"); then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 60); do pid_of "$name" >/dev/null || break; sleep 0.5; done
    if pid_of "$name" >/dev/null; then
      log "WARNING: $name (pid $pid) ignored SIGTERM for 30s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 1
    fi
    log "stopped $name (pid $pid)"
  fi
  rm -f "$PIDDIR/$name.pid"
done

left=$(leftovers)
[[ -z $left ]] || log "WARNING: still running (not started by up.sh, or orphaned): $(echo $left)"

if ((WIPE)); then
  rm -rf "$STATE"
  log "wiped $STATE"
fi
