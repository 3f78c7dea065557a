#!/usr/bin/env bash
# Bring up a real single-node SLURM cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd) for
# integration tests. Idempotent: installs only missing packages, starts only stopped daemons.
# See slurm/README.md for the facts this relies on.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NGPU=${HPC_KD_SLURM_GPUS:-4}
DB_PORT=${HPC_KD_SLURM_DB_PORT:-3306}
DB_PASS=hpckd-sandbox            # MariaDB listens on 127.0.0.1 only; test sandbox
ETC=/etc/slurm
HOST=$(hostname -s)
T0=$SECONDS

die() {
  echo "[slurm/up.sh] ERROR: $*" >&2
  local f
  for f in "$LOGDIR"/*.out; do
    echo "----- tail $f" >&2
    tail -n 8 "$f" >&2
  done
  echo "[slurm/up.sh] logs: $LOGDIR/" >&2
  exit 1
}

# start NAME CMD...: run CMD in its own session in the background, unless NAME already runs.
start() {
  local name=$1 pid
  shift
  if pid=$(pid_of "$name"); then log "$name already running (pid $pid)"; return; fi
  setsid "$@" </dev/null >>"$LOGDIR/$name.out" 2>&1 &
  echo $! >"$PIDDIR/$name.pid"
  for _ in $(seq 50); do # until the background shell has exec'd into the daemon
    pid_of "$name" >/dev/null && return
    kill -0 $! 2>/dev/null || break
    sleep 0.1
  done
  die "$name did not start"
}

# wait_until NAME WHAT CMD...: retry CMD until it succeeds; fail if NAME dies or on timeout.
wait_until() {
  local name=$1 what=$2 t0=$SECONDS out
  shift 2
  until out=$("$@" 2>&1); do
    pid_of "$name" >/dev/null || die "$name exited while waiting for $what"
    ((SECONDS - t0 < TIMEOUT)) || die "timed out after ${TIMEOUT}s waiting for $what; '$*' said: $out"
    sleep 0.5
  done
}

# install_conf FILE MODE OWNER: move FILE.new into place; echo 'changed' if the content differs.
install_conf() {
  if ! cmp -s "$1.new" "$1" 2>/dev/null; then echo changed; fi
  chmod "$2" "$1.new" && chown "$3" "$1.new" && mv "$1.new" "$1"
}

[[ $(id -u) == 0 ]] || { echo "[slurm/up.sh] ERROR: must run as root" >&2; exit 1; }
[[ $NGPU =~ ^[1-9][0-9]*$ && ${HPC_KD_SLURM_CPUS:-1} =~ ^[1-9][0-9]*$ ]] ||
  { echo "[slurm/up.sh] ERROR: HPC_KD_SLURM_GPUS/HPC_KD_SLURM_CPUS must be positive integers" >&2; exit 1; }

# --- packages ---------------------------------------------------------------------------------
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
mkdir -p "$PIDDIR" "$LOGDIR"
if ((${#missing[@]})); then
  log "installing ${missing[*]} (log: $LOGDIR/apt.log)"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
    >"$LOGDIR/apt.log" 2>&1 || die "apt-get failed"
fi

# --- host, directories, fake GPUs -------------------------------------------------------------
getent hosts "$HOST" >/dev/null || { echo "127.0.0.1 $HOST" >>/etc/hosts; log "added $HOST to /etc/hosts"; }
mkdir -p "$STATE"/{run,dev,spool/ctld,spool/d,mysql,mysqld} /run/munge "$ETC"
chown slurm:slurm "$STATE/spool/ctld"
chown mysql:mysql "$STATE/mysql" "$STATE/mysqld"
chown munge:munge /run/munge
touch "$LOGDIR"/{slurmctld,slurmdbd}.log && chown slurm:slurm "$LOGDIR"/{slurmctld,slurmdbd}.log
for ((i = 0; i < NGPU; i++)); do
  [[ -c $STATE/dev/gpu$i ]] || mknod "$STATE/dev/gpu$i" c 1 3
done

# --- configs ----------------------------------------------------------------------------------
# Node line from the hardware; RealMemory at 90% (above the real value the node drains).
# HPC_KD_SLURM_CPUS=N advertises N single-thread cores instead (SlurmdParameters=config_overrides).
read -r -a hw < <(slurmd -C | head -n 1)
node=() overrides=
for kv in "${hw[@]}"; do
  case $kv in
    RealMemory=*) node+=("RealMemory=$((${kv#*=} * 9 / 10))") ;;
    CPUs=* | Boards=* | SocketsPerBoard=* | CoresPerSocket=* | ThreadsPerCore=*)
      [[ -n ${HPC_KD_SLURM_CPUS:-} ]] || node+=("$kv") ;;
    *) node+=("$kv") ;;
  esac
done
[[ ${node[0]} == NodeName=* ]] || die "unexpected 'slurmd -C' output: ${hw[*]}"
NODE=${node[0]#NodeName=}
if [[ -n ${HPC_KD_SLURM_CPUS:-} ]]; then
  node+=("CPUs=$HPC_KD_SLURM_CPUS" SocketsPerBoard=1 "CoresPerSocket=$HPC_KD_SLURM_CPUS" ThreadsPerCore=1)
  overrides=SlurmdParameters=config_overrides
fi

cat >"$ETC/slurm.conf.new" <<EOF
# Written by hpc_kd slurm/up.sh; regenerated on every run.
ClusterName=hpckd
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
KillWait=5
SchedulerParameters=bf_interval=1,sched_interval=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
$overrides
GresTypes=gpu
${node[*]} NodeAddr=127.0.0.1 Gres=gpu:$NGPU State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE OverSubscribe=NO State=UP
EOF
cat >"$ETC/gres.conf.new" <<EOF
AutoDetect=off
Name=gpu File=$STATE/dev/gpu[0-$((NGPU - 1))]
EOF
cat >"$ETC/slurmdbd.conf.new" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
PidFile=$STATE/run/slurmdbd.pid
LogFile=$LOGDIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
changed=$(install_conf "$ETC/slurm.conf" 644 root:root)$(install_conf "$ETC/gres.conf" 644 root:root)
changed+=$(install_conf "$ETC/slurmdbd.conf" 600 slurm:slurm)
if [[ -n $changed ]] && pid_of slurmctld >/dev/null; then
  log "configs changed while SLURM runs: restarting it"
  bash "$(dirname "${BASH_SOURCE[0]}")/down.sh"
fi

# --- munge ------------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
  mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
start munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
wait_until munged "munged" bash -c 'munge -n | unmunge'

# --- MariaDB + accounting database --------------------------------------------------------------
SOCK=$STATE/mysqld/mysqld.sock
if [[ ! -d $STATE/mysql/mysql ]]; then
  log "initialising MariaDB datadir $STATE/mysql"
  mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql" \
    >"$LOGDIR/mariadb-install.log" 2>&1 || die "mariadb-install-db failed"
fi
start mariadbd /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql" \
  --socket="$SOCK" --bind-address=127.0.0.1 --port="$DB_PORT" --pid-file="$STATE/mysqld/mariadb.pid" \
  --innodb-lock-wait-timeout=900
wait_until mariadbd "MariaDB on $SOCK" mariadb-admin --no-defaults --socket="$SOCK" ping
mariadb --no-defaults --socket="$SOCK" -uroot <<EOF || die "creating the slurm database failed"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF

# --- SLURM daemons ----------------------------------------------------------------------------
start slurmdbd /usr/sbin/slurmdbd -D
wait_until slurmdbd "slurmdbd" sacctmgr -n list cluster
start slurmctld /usr/sbin/slurmctld -D
wait_until slurmctld "slurmctld" scontrol ping
start slurmd /usr/sbin/slurmd -D
# Prints state and reason. A drain/down saved in the state files by an earlier run survives a
# restart (ReturnToService does not clear it), so resume the node; a real fault drains it again.
node_ready() {
  local s
  s=$(sinfo -h -N -n "$NODE" -o '%t %E') || return 1
  echo "$s"
  case ${s%% *} in
    idle | mix | alloc) return 0 ;;
    drain | drng | down) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  return 1
}
wait_until slurmd "node $NODE to become idle" node_ready
wait_until slurmctld "sacct to answer" sacct -n -X

log "SLURM up in $((SECONDS - T0))s: cluster hpckd, partition debug, node $NODE ($(sinfo -h -N -o '%c CPUs, %m MB, %G')), state $(sinfo -h -N -o %t)"
log "daemons: $(for d in "${DAEMONS[@]}"; do printf '%s=%s ' "$d" "$(pid_of "$d")"; done)"
log "logs: $LOGDIR  configs: $ETC  stop: bash slurm/down.sh [--wipe]"
