# Shared by up.sh and down.sh: where the sandbox lives and how its daemons are tracked.
# Every daemon is started in the foreground (setsid ... &) so that $! is the daemon itself;
# its PID goes to $PIDDIR/<comm>.pid, and <comm> (/proc/PID/comm) guards against PID reuse.

STATE=${HPC_KD_SLURM_DIR:-/var/lib/hpc_kd_slurm}
PIDDIR=$STATE/pid
LOGDIR=$STATE/log
TIMEOUT=${HPC_KD_SLURM_TIMEOUT:-60}
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; down.sh stops in reverse

log() { echo "[slurm/${0##*/}] $*"; }

# PID of a running daemon we started, or nothing (exit 1).
pid_of() {
  local f=$PIDDIR/$1.pid pid
  [[ -s $f ]] || return 1
  pid=$(<"$f")
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]] || return 1
  if grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null; then return 1; fi
  echo "$pid"
}

# Any live (non-zombie) process of these names, whoever started it (report only). Zombies are
# skipped: the sandbox's PID 1 reaps orphans only now and then.
leftovers() {
  local p
  for p in /proc/[0-9]*; do
    case $(cat "$p/comm" 2>/dev/null) in
      munged | mariadbd | mysqld | slurmdbd | slurmctld | slurmscriptd | slurmd | slurmstepd)
        grep -q '^State:[[:space:]]*Z' "$p/status" 2>/dev/null || echo "${p#/proc/}:$(cat "$p/comm")" ;;
    esac
  done
}
