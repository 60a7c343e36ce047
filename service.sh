#!/usr/bin/env bash
# Install, remove and back up dicomflow services.
#   bash service.sh install NAME -p PATH            validate, then install (PATH holds registry/ and module/)
#   bash service.sh check   NAME -p PATH            validate only
#   bash service.sh backup  NAME -b BACKUP          copy registry/ + module/ to BACKUP (a backup of NAME there is replaced)
#   bash service.sh remove  NAME [-b BACKUP] [--force]   refused while other services depend on NAME, unless --force
#   bash service.sh COMMAND --help                  a command's help and exit codes
# Exit status: 0 done; 1 refused or failed (the message says why; nothing was changed); 2 a usage error.
# Docker mode (as run.sh: a Docker engine runs and neither DICOMFLOW_NATIVE=1 nor DICOMFLOW_PYTHON is
# set): the same commands run in a one-off container of the stack's image (docs/docker.md).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python="${DICOMFLOW_PYTHON:-$here/.venv/bin/python}"
help_text() { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
usage() { help_text >&2; exit 2; }
case "${1:-}" in
  -h|--help|help) help_text; exit 0 ;;
  install|remove|backup|check) ;;
  *) usage ;;
esac
[ $# -ge 2 ] || usage

# Docker mode: the services are checked with the packages the containers have (the image's),
# not with a Python of this host (Docker mode builds no .venv).
docker_mode=0
if [ "${DICOMFLOW_NATIVE:-0}" != 1 ] && [ -z "${DICOMFLOW_PYTHON:-}" ] \
   && command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  docker_mode=1
fi
if [ "$docker_mode" = 0 ] && [ ! -x "$python" ]; then
  echo "error: $python not found; run build.sh first (or set DICOMFLOW_PYTHON)" >&2; exit 1
fi
if [ -z "${DICOMFLOW_CONFIG:-}" ] && [ -f "${DICOMFLOW_HOME:-$here/state}/dicomflow.env" ]; then
  export DICOMFLOW_CONFIG="${DICOMFLOW_HOME:-$here/state}/dicomflow.env"
fi
if [ "$docker_mode" = 0 ]; then
  exec "$python" -P -m scheduler.installer "$@"   # -P: the caller's folder is not on sys.path
fi

# ---- Docker mode ------------------------------------------------------------------------------
conf=${DICOMFLOW_CONFIG:-}
[ -n "$conf" ] && [ -f "$conf" ] || { echo "error: no configuration yet: start the stack once (bash run.sh)" >&2; exit 1; }
# The folders named by -p and -b are mounted into the container; the installer sees them there.
command=$1; name=$2; shift 2
args=("$command" "$name"); mounts=()
while [ $# -gt 0 ]; do
  case "$1" in
    -p|--path)
      [ $# -ge 2 ] || usage
      [ -d "$2" ] || { echo "error: $2 is not a folder" >&2; exit 1; }
      mounts+=(-v "$(cd "$2" && pwd):/incoming/service:ro"); args+=(-p /incoming/service); shift ;;
    -b|--backup)
      [ $# -ge 2 ] || usage
      parent=$(dirname "$2"); mkdir -p "$parent"
      mounts+=(-v "$(cd "$parent" && pwd):/incoming/backups"); args+=(-b "/incoming/backups/$(basename "$2")"); shift ;;
    *) args+=("$1") ;;
  esac
  shift
done
compose() {
  DICOMFLOW_UID=${DICOMFLOW_UID:-$(id -u)} DICOMFLOW_GID=${DICOMFLOW_GID:-$(id -g)} \
    docker compose -p dicomflow --project-directory "$here" -f "$here/docker-compose.yml" --env-file "$conf" "$@"
}
# As the user who runs this (the services folder is theirs); the installer reaches the running
# scheduler at its container's name. Its last step, pip-installing the requirements into the
# Python it runs, would land in this throw-away container: PIP_TARGET sends it to a scratch
# folder, and the image rebuilt below holds them (Dockerfile: every services/modules/*/requirements.txt).
compose run --rm --no-deps -T --user "${DICOMFLOW_UID:-$(id -u)}:${DICOMFLOW_GID:-$(id -g)}" \
  -e DICOMFLOW_SCHEDULER_HOST=scheduler -e PIP_TARGET=/tmp/requirements-in-the-image "${mounts[@]}" \
  scheduler python -P -m scheduler.installer "${args[@]}"
if [ "$command" = install ] && [[ " ${args[*]} " != *" --help "* && " ${args[*]} " != *" -h "* ]]; then
  # The scheduler runs the callbacks and the workers the worker package: both need the requirements.
  workers=$(compose ps -q worker | wc -l)
  if [ "$workers" -gt 0 ]; then
    echo "service.sh: rebuilding the image with the service's requirements; recreating the scheduler and $workers worker(s)"
    compose build scheduler
    compose up -d --no-deps --scale "worker=$workers" scheduler worker dashboard
  else
    echo "service.sh: the stack is not running; bash run.sh builds the image with the service's requirements"
  fi
fi
