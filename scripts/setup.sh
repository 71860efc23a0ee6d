#!/usr/bin/env bash
# Idempotent set-up for a Debian 12 host: system packages, kernel headers for bcc,
# bpffs, a venv from the system Python (which is the only one bcc is built for),
# the project in editable mode, and wrappers in /usr/local/bin so `sudo incd` works.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"

need_root() { [ "$(id -u)" = 0 ] || { echo "setup: must run as root (apt, bpffs, /usr/local/bin)" >&2; exit 1; }; }
need_root

# sudo: the README says `sudo incd start`; minimal images lack it.
APT_PKGS="python3-bpfcc python3-venv python3-pip iproute2 ethtool linux-headers-amd64 make sudo"
missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "setup: installing$missing"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing
fi

# bcc needs kernel headers under /lib/modules/$(uname -r). Debian has none for this
# kernel; its newest headers package works when both build and source links exist.
KDIR=/lib/modules/$(uname -r)
if [ ! -e "$KDIR/build/include/generated/autoconf.h" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  [ -n "$hdr" ] && [ -n "$common" ] || { echo "setup: no linux-headers found under /usr/src" >&2; exit 1; }
  mkdir -p "$KDIR"
  ln -sfn "$hdr" "$KDIR/build"
  ln -sfn "$common" "$KDIR/source"
  echo "setup: linked $KDIR/build -> $hdr, source -> $common"
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import bcc' 2>/dev/null; then
  rm -rf "$VENV"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -e "$stamp" ]; then
  "$VENV/bin/pip" install -q -e ".[switch,lab,test,bench]"
  rm -f "$VENV"/.installed-*; touch "$stamp"
fi

# sudo's secure_path has /usr/local/bin, not the venv.
for cmd in incd inc-agent inc-lab; do
  ln -sfn "$VENV/bin/$cmd" "/usr/local/bin/$cmd"
done
"$VENV/bin/python" -c 'import bcc, pyroute2, numpy, scapy' || { echo "setup: imports failed" >&2; exit 1; }
echo "setup: ok ($VENV)"
