#!/bin/bash
# A throw-away SLURM cluster on this machine for the tests: N compute nodes, each in its own network namespace
# (own IP on a bridge, own hostname, private /etc/hosts), so rank-to-rank traffic really crosses veth links.
# Adapted from shared/tools/local_slurm (netns mode only, project-specific names so it never touches a cluster
# someone else brought up with those tools). Needs root; no systemd. Debian's slurm-wlm 22.05 + munge.
#
#   cluster.sh up [N]   start munged, slurmctld (host namespace, on the bridge IP) and N slurmd (default 2).
#                       Idempotent. Prints "export SLURM_CONF=..." on its last line; also in $DSD_DIR/env.sh.
#   cluster.sh down     cancel jobs, stop only the daemons recorded here, remove only the links/netns made here.
#   cluster.sh exec I CMD...   run CMD inside node I's namespaces (debugging).
#
# Names (override through the environment; keep them unique per machine):
#   DSD_DIR (/tmp/ds_distill_slurm), DSD_PREFIX (dsd: nodes dsdn1.., bridge dsdbr0, host veths dsdh1..),
#   DSD_SUBNET (10.79.0: nodes .1.., controller .254), DSD_CTLD_PORT (16817), DSD_SLURMD_PORT (16818).
set -euo pipefail
CMD=${1:-}
DIR=${DSD_DIR:-/tmp/ds_distill_slurm}
PFX=${DSD_PREFIX:-dsd}
SUBNET=${DSD_SUBNET:-10.79.0}
CTLD_PORT=${DSD_CTLD_PORT:-16817}
SLURMD_PORT=${DSD_SLURMD_PORT:-16818}
BR=${PFX}br0
CTLD_ADDR=$SUBNET.254
CONF=$DIR/slurm.conf
HOST=$(hostname -s)

die() { echo "cluster.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (network namespaces, slurmd)"

alive() {  # alive PIDFILE: the pid runs AND its command line names $DIR (never touch someone else's daemon)
  local f=$1 p
  [ -s "$f" ] || return 1
  p=$(cat "$f"); kill -0 "$p" 2>/dev/null || return 1
  tr '\0' ' ' < "/proc/$p/cmdline" | grep -qF "$DIR"
}

node_exec() {  # node_exec I CMD...: private mount + UTS namespace, node I's network namespace
  local i=$1; shift
  exec unshare --mount --uts --propagation private nsenter --net="/run/netns/${PFX}n$i" sh -c \
    "hostname ${PFX}n$i; mount --bind '$DIR/hosts' /etc/hosts; mount --bind '$DIR/resolv.conf' /etc/resolv.conf; exec \"\$@\"" \
    node "$@"
}

up() {
  local n=${1:-2} t0 i ns
  t0=$(date +%s.%N)
  for b in slurmctld slurmd munged sinfo unshare nsenter ip; do
    command -v $b >/dev/null || die "$b not found: run .ci/slurm_setup.sh (apt-get install slurm-wlm munge iproute2 util-linux)"
  done
  mkdir -p "$DIR"/{state,spool,log,run,munge,munge-run}
  chmod 700 "$DIR/munge"; chmod 755 "$DIR/munge-run"
  if [ -s "$DIR/nodes" ] && [ "$(cat "$DIR/nodes")" != "$n" ] && alive "$DIR/run/slurmctld.pid"; then
    die "a cluster with $(cat "$DIR/nodes") nodes is running in $DIR: run 'cluster.sh down' first"
  fi
  echo "$n" > "$DIR/nodes"

  # munge, on its own socket and key
  local key=$DIR/munge/munge.key sock=$DIR/munge-run/munge.socket
  [ -s "$key" ] || { dd if=/dev/urandom of="$key" bs=1024 count=1 status=none; chmod 400 "$key"; }
  alive "$DIR/run/munged.pid" || munged --force --key-file="$key" --socket="$sock" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"

  # /etc/hosts seen inside the nodes (v4-mapped entries silence c10d reverse-lookup warnings)
  {
    echo "127.0.0.1 localhost"; echo "::1 localhost"
    echo "$CTLD_ADDR $HOST"; echo "::ffff:$CTLD_ADDR $HOST"
    for i in $(seq 1 "$n"); do echo "$SUBNET.$i ${PFX}n$i"; echo "::ffff:$SUBNET.$i ${PFX}n$i"; done
  } > "$DIR/hosts"
  echo "options timeout:1 attempts:1" > "$DIR/resolv.conf"   # no nameserver inside: lookups fail fast

  # bridge on the host + one namespace per node, joined by a veth pair
  touch "$DIR/created_links"
  if ! ip link show "$BR" >/dev/null 2>&1; then
    ip link add "$BR" type bridge && echo "link $BR" >> "$DIR/created_links"
    ip addr add "$CTLD_ADDR/24" dev "$BR"
  fi
  ip link set "$BR" up
  for i in $(seq 1 "$n"); do
    ns=${PFX}n$i
    [ -e "/run/netns/$ns" ] && continue
    ip netns add "$ns" && echo "netns $ns" >> "$DIR/created_links"
    ip link add "${PFX}h$i" type veth peer name eth0 netns "$ns"
    ip link set "${PFX}h$i" master "$BR" up
    ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done

  # slurm.conf: no accounting, no cgroups (no systemd here), nodes advertise this machine's cores
  {
    cat <<EOF
ClusterName=dsd
SlurmctldHost=$HOST($CTLD_ADDR)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$sock
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
MinJobAge=300
EOF
    for i in $(seq 1 "$n"); do
      echo "NodeName=${PFX}n$i NodeAddr=$SUBNET.$i CPUs=$(nproc) RealMemory=2000 State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } > "$CONF.new"
  if cmp -s "$CONF.new" "$CONF"; then rm -f "$CONF.new"; else
    mv "$CONF.new" "$CONF"
    alive "$DIR/run/slurmctld.pid" && SLURM_CONF=$CONF scontrol reconfigure 2>/dev/null || true
  fi
  echo "export SLURM_CONF=$CONF" > "$DIR/env.sh"
  export SLURM_CONF=$CONF

  alive "$DIR/run/slurmctld.pid" || slurmctld -c -f "$CONF"   # -c: no job state from an earlier cluster
  for i in $(seq 1 "$n"); do
    alive "$DIR/run/slurmd-${PFX}n$i.pid" && continue
    ( node_exec "$i" slurmd -f "$CONF" -N "${PFX}n$i" )
  done

  # wait until every node is idle (resume nodes that came up "down" after an unclean stop)
  local states=""
  for _ in $(seq 1 120); do
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
    [ "$(echo "$states" | grep -cE ' (idle|allocated|mixed)$')" = "$n" ] && break
    echo "$states" | awk '$2 ~ /^(down|drain)/ {print $1}' | while read -r node; do
      scontrol update nodename="$node" state=resume 2>/dev/null || true; done
    sleep 0.25
  done
  [ "$(echo "$states" | grep -cE ' (idle|allocated|mixed)$')" = "$n" ] || { sinfo -N >&2; die "nodes did not come up; logs in $DIR/log"; }
  sinfo -N
  echo "cluster up in $(python3 -c "import time; print(round(time.time() - $t0, 1))") s"
  echo "export SLURM_CONF=$CONF"
}

down() {
  [ -d "$DIR" ] || { echo "nothing at $DIR"; return 0; }
  export SLURM_CONF=$CONF
  local f p jobs
  if alive "$DIR/run/slurmctld.pid"; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    [ -n "$jobs" ] && scancel $jobs
    for _ in $(seq 1 40); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.25; done
  fi
  stop() {  # stop PIDFILE: TERM, wait up to 10 s, then KILL; only a pid recorded here and naming $DIR
    alive "$1" || { rm -f "$1"; return 0; }
    p=$(cat "$1"); kill "$p" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null
    rm -f "$1"
  }
  for f in "$DIR"/run/slurmd-*.pid; do [ -e "$f" ] && stop "$f"; done
  stop "$DIR/run/slurmctld.pid"
  stop "$DIR/run/munged.pid"
  if [ -f "$DIR/created_links" ]; then
    tac "$DIR/created_links" | while read -r kind name; do
      case $kind in
        netns) ip netns del "$name" 2>/dev/null || true ;;   # also removes its veth pair
        link)  ip link del "$name" 2>/dev/null || true ;;
      esac
    done
    rm -f "$DIR/created_links"
  fi
  rm -f "$DIR/nodes"
  echo "cluster down ($DIR)"
}

case $CMD in
  up)   shift; up "${1:-2}" ;;
  down) down ;;
  exec) shift; i=$1; shift; node_exec "$i" "$@" ;;
  *)    echo "usage: cluster.sh up [N] | down | exec I CMD..." >&2; exit 2 ;;
esac
