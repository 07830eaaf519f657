#!/usr/bin/env bash
# Idempotent set-up shared by scripts/up and scripts/test: Debian packages the
# data plane needs, and a virtualenv with the project and its dev extra.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MESH_VENV:-$root/.venv}

need=()
for pkg in lsyncd rsync mosquitto iproute2; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "meshsync: need root to install: ${need[*]}" >&2
    exit 1
  fi
  echo "meshsync: installing ${need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Debian starts a mosquitto service on install; the benchmark runs its own.
if command -v service >/dev/null 2>&1; then service mosquitto stop >/dev/null 2>&1 || true; fi

# promtool (Debian's prometheus) checks and unit-tests compose/monitoring's alerting rules.
# Without recommends (no node exporter); the package starts its server: stop it, no test
# needs one.
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "meshsync: need root to install: prometheus" >&2
    exit 1
  fi
  echo "meshsync: installing prometheus (for promtool)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if command -v service >/dev/null 2>&1; then service prometheus stop >/dev/null 2>&1 || true; fi
fi

stamp=$venv/.meshsync-installed
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$venv/bin/python" -m pip install -q -e "$root[dev]"
  touch "$stamp"
fi
