#!/usr/bin/env bash
# Install, remove and back up dicomflow services.
#   bash service.sh install NAME -p PATH     PATH holds registry/ and module/
#   bash service.sh remove  NAME [-b BACKUP]
#   bash service.sh backup  NAME -b BACKUP
#   bash service.sh check   NAME -p PATH     validate only
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python="${DICOMFLOW_PYTHON:-$here/.venv/bin/python}"
usage() { sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 2 ] || usage
case "$1" in install|remove|backup|check) ;; *) usage ;; esac
if [ ! -x "$python" ]; then
  echo "error: $python not found; run build.sh first (or set DICOMFLOW_PYTHON)" >&2; exit 1
fi
if [ -z "${DICOMFLOW_CONFIG:-}" ] && [ -f "$here/state/dicomflow.env" ]; then
  export DICOMFLOW_CONFIG="$here/state/dicomflow.env"
fi
exec "$python" -P -m scheduler.installer "$@"   # -P: the caller's folder is not on sys.path
