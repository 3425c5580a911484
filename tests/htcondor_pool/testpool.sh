#!/usr/bin/env bash
# testpool.sh — a real single-node HTCondor pool for PCM's integration tests.
#
# Debian trixie's `minicondor` (HTCondor 23.9) in a debootstrap chroot; the host's
# htcondor2 bindings (25.x) talk to it over 127.0.0.1:9618 with an IDTOKEN. Glideins run
# the host's venv: the repository, the interpreter's prefix and a shared work directory
# are bind-mounted at the same paths inside the chroot.
#
# Usage (as root):  testpool.sh setup|start|stop|status|purge
#   start  = setup (idempotent; ~80 s the first time) + mount + start daemons + wait ready,
#            then write $POOL_STATE/env.sh (host client settings) for the tests.
#   stop   = stop the daemons by PID and unmount everything under $POOL_ROOT.
# Settings (environment): POOL_ROOT, POOL_STATE, POOL_SHARE, POOL_BIND_RO (extra host dirs,
# read-only, same path), POOL_CPUS (advertised CPUs, default 8), POOL_SIM_GPUS (default
# 4,1,2,1 = one simulated A100 and one V100), POOL_MAX_VACATE (SIGTERM→SIGKILL, default 5 s).
set -euo pipefail

ROOT=${POOL_ROOT:-/tmp/pcm-testpool/root}
STATE=${POOL_STATE:-/tmp/pcm-testpool/state}
SHARE=${POOL_SHARE:-/tmp/pcm-testpool/share}
POOL_USER=${POOL_USER:-pcmtest}
POOL_UID=${POOL_UID:-2000}
BIND_RO=${POOL_BIND_RO:-}
CPUS=${POOL_CPUS:-8}
SIM_GPUS=${POOL_SIM_GPUS:-4,1,2,1}
MAX_VACATE=${POOL_MAX_VACATE:-5}
READY_TIMEOUT=${POOL_READY_TIMEOUT:-120}
PACKAGES="minicondor libnuma1"

CENV=(/usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8)
inroot() { chroot "$ROOT" "${CENV[@]}" "$@"; }
T0=$(date +%s.%N)
log() { printf '[testpool %6.1fs] %s\n' "$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{print b-a}')" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount); run the tests as root to use the pool"
case "$ROOT" in /|/tmp|/tmp/|"") die "refusing POOL_ROOT=$ROOT";; esac

our_mounts() { awk -v r="$ROOT" '$2 == r || index($2, r "/") == 1 {print $2}' /proc/self/mounts | sort -r; }

host_mirror() {   # the Debian mirror this host's apt uses (deb822 or one-line sources)
  [ -n "${POOL_MIRROR:-}" ] && { echo "$POOL_MIRROR"; return; }
  local code m="" f; code=$(. /etc/os-release; echo "${VERSION_CODENAME:-bookworm}")
  shopt -s nullglob
  for f in /etc/apt/sources.list.d/*.sources; do
    m=$(awk -v c="$code" 'BEGIN{RS=""} {u=""; s=""; n=split($0, L, "\n");
          for (i=1;i<=n;i++) { if (L[i] ~ /^URIs:/) u=L[i]; if (L[i] ~ /^Suites:/) s=L[i] }
          sub(/^URIs:[ \t]*/, "", u); split(u, U, /[ \t]+/);
          if (s ~ ("[ \t]" c "([ \t]|$)") && U[1] !~ /security/) { print U[1]; exit } }' "$f")
    [ -n "$m" ] && break
  done
  if [ -z "$m" ]; then
    m=$(awk -v c="$code" '$1 == "deb" { hit = 0; url = "";
          for (i=2;i<=NF;i++) { if ($i ~ /^(https?|file):/ && url == "") url=$i; if ($i == c) hit=1 }
          if (hit && url !~ /security/ && url != "") { print url; exit } }' \
          /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null)
  fi
  shopt -u nullglob
  [ -n "$m" ] || die "cannot find the Debian mirror in /etc/apt; set POOL_MIRROR"
  echo "$m"
}

ro_dirs() {   # the interpreter prefix behind the host venv, plus POOL_BIND_RO
  local p; p=$(python3 -c 'import sys; print(sys.base_prefix)' 2>/dev/null || true)
  case "$p" in ""|/usr|/usr/local) ;; *) echo "$p";; esac
  local d; for d in $BIND_RO; do echo "$d"; done
}

bind_same_path() {   # bind host dir $1 at the same path inside the chroot; $2 = ro|rw
  local src=$1 mode=$2 dst="$ROOT$1" d
  [ -d "$src" ] || { log "skip bind of missing $src"; return 0; }
  mkdir -p "$dst"
  # the job user must traverse the chroot's own parents (the chroot's /root is 0700)
  d=$(dirname "$dst"); while [ "$d" != "$ROOT" ] && [ "$d" != / ]; do chmod o+x "$d"; d=$(dirname "$d"); done
  if ! mountpoint -q "$dst"; then
    mount --bind "$src" "$dst"
    [ "$mode" = ro ] && mount -o remount,bind,ro "$dst"
  fi
  return 0
}

do_mounts() {
  mountpoint -q "$ROOT/proc"    || mount -t proc proc "$ROOT/proc"
  mountpoint -q "$ROOT/sys"     || mount -t sysfs sysfs "$ROOT/sys"
  mountpoint -q "$ROOT/dev"     || mount --bind /dev "$ROOT/dev"
  mountpoint -q "$ROOT/dev/pts" || mount --bind /dev/pts "$ROOT/dev/pts"
  # the engine uses POSIX shared memory; the /dev bind above is not recursive
  if [ -d /dev/shm ] && ! mountpoint -q "$ROOT/dev/shm"; then mount --bind /dev/shm "$ROOT/dev/shm"; fi
  mkdir -p "$SHARE"; chmod 1777 "$SHARE"
  bind_same_path "$SHARE" rw
  local d; for d in $(ro_dirs); do bind_same_path "$d" ro; done
}

do_umounts() {
  local m
  for m in $(our_mounts); do umount "$m" 2>/dev/null || umount -l "$m"; done
  [ -z "$(our_mounts)" ] || die "still mounted: $(our_mounts | tr '\n' ' ')"
}

write_config() {
  local f="$ROOT/etc/condor/config.d/50-pcm-testpool.conf"
  cat > "$f.new" <<CONF
# written by PCM's tests/htcondor_pool/testpool.sh
# the root condor_master would otherwise retune the HOST's sysctls
ENABLE_KERNEL_TUNING = False
# the chroot's / is no mount point: a private mount namespace fails and every job is held
MOUNT_UNDER_SCRATCH =
ENABLE_IPV6 = False
MachineMaxVacateTime = $MAX_VACATE
NEGOTIATOR_INTERVAL = 1
NEGOTIATOR_CYCLE_DELAY = 1
NEGOTIATOR_MIN_INTERVAL = 1
SCHEDD_INTERVAL = 1
SCHEDD_MIN_INTERVAL = 0
UPDATE_INTERVAL = 2
NUM_CPUS = $CPUS
CONF
  [ -z "$SIM_GPUS" ] || printf '%s\n' "# simulated GPUs: type 4 = A100-SXM4-40GB (capability 8.0), type 2 = V100 (7.0)" \
      "GPU_DISCOVERY_EXTRA = -simulate:$SIM_GPUS" >> "$f.new"
  mv "$f.new" "$f"
}

do_setup() {
  if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null \
      || die "cannot install debootstrap"
  fi
  if [ ! -e "$ROOT/.pcm-bootstrapped" ]; then
    if [ -e "$ROOT" ]; then
      [ -z "$(our_mounts)" ] || die "$ROOT has mounts; run '$0 stop' first"
      rm -rf --one-file-system "$ROOT"
    fi
    mkdir -p "$(dirname "$ROOT")"
    local mirror; mirror=$(host_mirror)
    log "debootstrap --variant=minbase trixie $ROOT"
    debootstrap --variant=minbase trixie "$ROOT" "$mirror" > "$ROOT.debootstrap.log" 2>&1 \
      || die "debootstrap failed, see $ROOT.debootstrap.log"
    rm -f "$ROOT.debootstrap.log"
    touch "$ROOT/.pcm-bootstrapped"
  fi
  do_mounts
  # libnuma1: the vLLM CPU engine the glideins run from the host venv links against it
  if ! inroot dpkg -s $PACKAGES >/dev/null 2>&1; then
    log "apt-get install $PACKAGES (in the chroot)"
    printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"; chmod 755 "$ROOT/usr/sbin/policy-rc.d"
    inroot DEBIAN_FRONTEND=noninteractive sh -c \
      'apt-get update -q && apt-get install -y -q --no-install-recommends $0 && apt-get clean && rm -rf /var/lib/apt/lists/*' \
      "$PACKAGES" > "$ROOT/root/apt-install.log" 2>&1 || die "apt-get in the chroot failed, see $ROOT/root/apt-install.log"
  fi
  write_config
  inroot id "$POOL_USER" >/dev/null 2>&1 || inroot useradd -m -u "$POOL_UID" -s /bin/bash "$POOL_USER"
}

master_pid() {
  local p; p=$(cat "$ROOT/run/condor/master.pid" 2>/dev/null || true)
  [ -n "$p" ] && [ -d "/proc/$p" ] && [ "$(readlink "/proc/$p/root")" = "$ROOT" ] \
    && grep -q condor_master "/proc/$p/comm" 2>/dev/null && echo "$p"
  return 0
}

chroot_pids() {
  local d
  for d in /proc/[0-9]*; do [ "$(readlink "$d/root" 2>/dev/null)" = "$ROOT" ] && echo "${d#/proc/}"; done
  return 0
}

do_start() {
  do_setup
  if [ -z "$(master_pid)" ]; then
    # start with an empty queue: old glideins would restart and hold the slots
    local spool; spool=$(inroot condor_config_val SPOOL)
    rm -f "$ROOT$spool"/job_queue.log* "$ROOT$spool"/history*
    inroot install -d -o condor -g condor /run/condor /var/lock/condor
    log "starting condor_master"
    inroot condor_master -pidfile /run/condor/master.pid
  fi
  local i=0
  until inroot condor_status -af Name 2>/dev/null | grep -q slot && inroot condor_q -totals >/dev/null 2>&1; do
    i=$((i + 1)); [ "$i" -le $((READY_TIMEOUT * 2)) ] || die "pool not ready after ${READY_TIMEOUT}s; see $ROOT/var/log/condor"
    sleep 0.5
  done
  mkdir -p "$STATE/tokens"; chmod 700 "$STATE" "$STATE/tokens"
  local dom fsdom; dom=$(inroot condor_config_val UID_DOMAIN); fsdom=$(inroot condor_config_val FILESYSTEM_DOMAIN)
  ( umask 077; inroot condor_token_create -identity "$POOL_USER@$dom" > "$STATE/tokens/$POOL_USER" )
  cat > "$STATE/env.sh" <<ENV
export CONDOR_CONFIG=ONLY_ENV
export _CONDOR_COLLECTOR_HOST=127.0.0.1:9618
export _CONDOR_SEC_CLIENT_AUTHENTICATION_METHODS=IDTOKENS
export _CONDOR_SEC_TOKEN_DIRECTORY=$STATE/tokens
export _CONDOR_FILESYSTEM_DOMAIN=$fsdom
export _CONDOR_UID_DOMAIN=$dom
export PCM_TEST_POOL_SHARE=$SHARE
export PCM_TEST_POOL_ROOT=$ROOT
ENV
  log "pool ready: $(inroot condor_status -af Name Cpus Memory GPUs | tr '\n' ';')"
}

do_stop() {
  local p i
  p=$(master_pid)
  if [ -n "$p" ]; then
    log "stopping condor_master pid $p"
    kill -TERM "$p"
    for i in $(seq 1 60); do [ -z "$(chroot_pids)" ] && break; sleep 0.5; done
  fi
  for p in $(chroot_pids); do kill -KILL "$p" 2>/dev/null || true; done
  sleep 0.2
  do_umounts
  log "stopped; nothing mounted under $ROOT"
}

case "${1:-}" in
  setup)  do_setup; do_umounts ;;
  start)  do_start ;;
  stop)   do_stop ;;
  status) our_mounts; echo "master pid: $(master_pid)"; [ -z "$(master_pid)" ] || inroot condor_status ;;
  purge)  do_stop; rm -rf --one-file-system "$ROOT" "$STATE"; log "purged" ;;
  *) echo "usage: $0 setup|start|stop|status|purge" >&2; exit 2 ;;
esac
