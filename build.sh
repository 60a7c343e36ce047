#!/usr/bin/env bash
# Install or build everything the dicomflow stack needs. Idempotent; quiet when there is
# nothing to do.
#   bash build.sh            native: Debian packages + the project's virtualenv (.venv)
#   bash build.sh --docker   build the Compose images instead (needs a running Docker engine)
# Where a Docker engine runs and DICOMFLOW_NATIVE is not 1, --docker is the default.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here"
say() { printf 'build.sh: %s\n' "$*"; }
# Run a pip command; show its output only when it fails.
pip_quiet() {
  local log; log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then cat "$log" >&2; rm -f "$log"; say "failed: $*"; exit 1; fi
  rm -f "$log"
}

mode=native
if [ "${1:-}" = "--docker" ]; then mode=docker
elif [ "${1:-}" = "--native" ]; then mode=native
elif [ "${DICOMFLOW_NATIVE:-0}" != 1 ] && command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  mode=docker
fi

if [ "$mode" = docker ]; then
  say "building the Compose images"
  exec docker compose build
fi

# 1. Debian/Ubuntu packages.
packages=(orthanc orthanc-python dcmtk redis-server python3-venv ca-certificates)
# Orthanc's index in PostgreSQL (ORTHANC_DB_URL, in the environment or the configuration file): Debian's plugin.
conf=${DICOMFLOW_CONFIG:-${DICOMFLOW_HOME:-$here/state}/dicomflow.env}
if [ -n "${ORTHANC_DB_URL:-}" ] || grep -qs '^ORTHANC_DB_URL=.' "$conf"; then packages+=(orthanc-postgresql); fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  say "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # On a systemd host the packages start Debian's own Orthanc (0.0.0.0:4242/8042, no
  # password) and Redis. dicomflow runs its own; switch off the ones installed just now.
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    for unit in orthanc redis-server; do
      if printf '%s\n' "${missing[@]}" | grep -qx "${unit}"; then
        $sudo systemctl disable --now "$unit" >/dev/null 2>&1 && say "stopped and disabled Debian's own $unit service"
      fi
    done
  fi
fi

# 2. The virtualenv with dicomflow and its pinned dependencies.
python=${DICOMFLOW_BUILD_PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($python --version)"
  $python -m venv .venv
fi
stamp=.venv/.dicomflow-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing dicomflow into .venv"
  pip_quiet .venv/bin/python -m pip install --upgrade pip
  pip_quiet .venv/bin/python -m pip install -e '.[test]'
  echo "$want" > "$stamp"
fi

# 3. Requirements of installed services (service.sh installs them too; this covers a fresh clone).
for req in services/modules/*/requirements.txt; do
  [ -f "$req" ] || continue
  grep -qvE '^\s*(#|$)' "$req" || continue
  rstamp=".venv/.req-$(echo "$req" | tr '/' '_')"
  rwant=$(sha256sum "$req" | cut -d' ' -f1)
  if [ "$(cat "$rstamp" 2>/dev/null)" != "$rwant" ]; then
    say "installing $req"
    pip_quiet .venv/bin/python -m pip install -r "$req"
    echo "$rwant" > "$rstamp"
  fi
done
