#!/usr/bin/env bash
# Install, remove and back up dicomflow services.
#   bash service.sh install NAME -p PATH            validate, then install (PATH holds registry/ and module/)
#   bash service.sh check   NAME -p PATH            validate only
#   bash service.sh backup  NAME -b BACKUP          copy registry/ + module/ to BACKUP (a backup of NAME there is replaced)
#   bash service.sh remove  NAME [-b BACKUP] [--force]   refused while other services depend on NAME, unless --force
#   bash service.sh COMMAND --help                  a command's help and exit codes
# Exit status: 0 done; 1 refused or failed (the message says why; nothing was changed); 2 a usage error.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python="${DICOMFLOW_PYTHON:-$here/.venv/bin/python}"
help_text() { sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
usage() { help_text >&2; exit 2; }
case "${1:-}" in
  -h|--help|help) help_text; exit 0 ;;
  install|remove|backup|check) ;;
  *) usage ;;
esac
[ $# -ge 2 ] || usage
if [ ! -x "$python" ]; then
  echo "error: $python not found; run build.sh first (or set DICOMFLOW_PYTHON)" >&2; exit 1
fi
if [ -z "${DICOMFLOW_CONFIG:-}" ] && [ -f "$here/state/dicomflow.env" ]; then
  export DICOMFLOW_CONFIG="$here/state/dicomflow.env"
fi
exec "$python" -P -m scheduler.installer "$@"   # -P: the caller's folder is not on sys.path
