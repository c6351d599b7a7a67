#!/usr/bin/env bash
# Install and start what the launch tests need: OpenMPI (+ mpi4py in the project's Python),
# Slurm + munge (started without systemd), iproute2 for network namespaces. Idempotent and
# fast when everything is already there. Needs root (CI runs as root with apt available).
#
# usage: setup-cluster.sh [install]          install packages only (default)
#        setup-cluster.sh slurm-up [N]       (re)start a local Slurm; N>0 fakes nodes n1..nN
#        setup-cluster.sh slurm-down
#        setup-cluster.sh netns-up | netns-down   two "hosts" ssA (10.201.0.1) / ssB (10.201.0.2)
# env: PYTHON=interpreter that gets mpi4py (default: .venv/bin/python of the repo, else python3)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}; [ -x "$PY" ] || PY=$(command -v python3)

need_apt() {
  local missing=()
  command -v mpirun >/dev/null || missing+=(openmpi-bin libopenmpi-dev)
  [ -e /usr/include/x86_64-linux-gnu/openmpi/mpi.h ] || [ -e /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] \
    || missing+=(libopenmpi-dev)
  command -v slurmctld >/dev/null || missing+=(slurm-wlm)
  command -v munged >/dev/null || missing+=(munge)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v unshare >/dev/null || missing+=(util-linux)
  echo "${missing[@]:-}"
}

install_packages() {
  local pkgs; pkgs=$(need_apt)
  if [ -n "${pkgs// /}" ]; then
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs build-essential >/dev/null
  fi
  if ! "$PY" -c "import mpi4py" 2>/dev/null; then
    "$PY" -m pip install -q "mpi4py>=3.1"
  fi
  echo "setup-cluster: mpirun $(mpirun --version 2>/dev/null | head -1 | awk '{print $NF}'),"\
       "slurm $(slurmctld -V | awk '{print $2}'), mpi4py $("$PY" -c 'import mpi4py; print(mpi4py.__version__)')"
}

slurm_down() {
  stop() { [ -s "$1" ] || return 0; local p; p=$(cat "$1")
    alive() { [ -e "/proc/$p" ] && ! grep -q ') Z' "/proc/$p/stat"; }
    if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ]; then
      kill "$p"; for _ in $(seq 50); do alive || break; sleep 0.1; done; if alive; then kill -9 "$p"; fi
    fi; rm -f "$1"; }
  for f in /run/slurm/slurmd*.pid; do stop "$f" slurmd; done
  stop /run/slurm/slurmctld.pid slurmctld
  stop /run/munge/munged.pid munged
}

slurm_up() {
  local fake=${1:-0} nodes suffix nodeline want
  install_packages >/dev/null
  slurm_down
  if [ "$fake" -gt 0 ]; then nodes="n[1-$fake]"; suffix=-%n
    nodeline="NodeName=$nodes NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-$((17000 + fake))]"
  else nodes=localhost; suffix=; nodeline="NodeName=localhost NodeAddr=127.0.0.1"; fi
  mkdir -p /etc/slurm
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=shardserve
SlurmctldHost=localhost
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
KillWait=5
SlurmdParameters=config_overrides
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd$suffix.pid
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd$suffix
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd$suffix.log
$nodeline CPUs=4 Sockets=1 CoresPerSocket=4 ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$nodes Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP
CONF
  install -d -o slurm -g slurm /run/slurm /var/lib/slurm/slurmctld /var/log/slurm
  install -d -o munge -g munge -m 755 /run/munge
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null;
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  su -s /bin/sh munge -c /usr/sbin/munged
  munge -n | unmunge >/dev/null
  /usr/sbin/slurmctld -c
  if [ "$fake" -gt 0 ]; then
    for i in $(seq 1 "$fake"); do mkdir -p "/var/lib/slurm/slurmd-n$i"; /usr/sbin/slurmd -N "n$i"; done
    want=$fake
  else mkdir -p /var/lib/slurm/slurmd; /usr/sbin/slurmd -N localhost; want=1; fi
  for _ in $(seq 150); do [ "$(sinfo -hN -o %T | grep -c ^idle)" = "$want" ] && break; sleep 0.2; done
  [ "$(sinfo -hN -o %T | grep -c ^idle)" = "$want" ] || { sinfo -N; echo "slurm nodes not idle" >&2; exit 1; }
  echo "setup-cluster: slurm up with $want node(s)"
}

netns_down() {
  for ns in ssA ssB; do
    if ip netns list | grep -qw "$ns"; then
      for p in $(ip netns pids "$ns"); do kill "$p" 2>/dev/null || true; done
      ip netns delete "$ns"
    fi
    rm -rf "/etc/netns/$ns"
  done
}

netns_up() {
  install_packages >/dev/null
  netns_down
  ip netns add ssA; ip netns add ssB
  ip link add vethSA netns ssA type veth peer name vethSB netns ssB
  ip -n ssA addr add 10.201.0.1/24 dev vethSA
  ip -n ssB addr add 10.201.0.2/24 dev vethSB
  for n in A B; do
    ip -n "ss$n" link set lo up; ip -n "ss$n" link set "vethS$n" up
    mkdir -p "/etc/netns/ss$n"
    printf '127.0.0.1 localhost\n10.201.0.1 hosta\n10.201.0.2 hostb\n' > "/etc/netns/ss$n/hosts"
    printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' > "/etc/netns/ss$n/resolv.conf"
  done
  echo "setup-cluster: netns ssA/ssB up"
}

case "${1:-install}" in
  install) install_packages ;;
  slurm-up) slurm_up "${2:-0}" ;;
  slurm-down) slurm_down; echo "setup-cluster: slurm stopped" ;;
  netns-up) netns_up ;;
  netns-down) netns_down; echo "setup-cluster: netns removed" ;;
  *) echo "unknown command $1" >&2; exit 2 ;;
esac
