#!/usr/bin/env bash
# Start, inspect and stop the dicomflow stack.
#   bash run.sh [start] [--workers N]   start everything (first start writes the config + secrets)
#   bash run.sh status                  what runs, and where
#   bash run.sh stop                    stop exactly what run.sh started
# Runtime state (config, secrets, Orthanc storage, spool, logs) lives in $DICOMFLOW_HOME
# (default: ./state). Settings: $DICOMFLOW_HOME/dicomflow.env; environment variables override it.
# Native processes under supervisord where no Docker engine runs (or DICOMFLOW_NATIVE=1);
# docker compose where one does.
set -euo pipefail
# Every file run.sh creates (config, secrets, logs, pid files) is private: 0600 (folders 0700).
umask 077
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
home=${DICOMFLOW_HOME:-$here/state}
conf=$home/dicomflow.env
say() { printf 'run.sh: %s\n' "$*"; }
die() { printf 'run.sh: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

cmd=start; workers=""
while [ $# -gt 0 ]; do
  case "$1" in
    start|status|stop) cmd=$1 ;;
    --workers) [ $# -ge 2 ] || usage; workers=$2; shift ;;
    --workers=*) workers=${1#--workers=} ;;
    -h|--help) usage ;;
    *) usage ;;
  esac
  shift
done
if [ -n "$workers" ] && ! [[ "$workers" =~ ^[0-9]+$ && "$workers" -ge 1 ]]; then
  die "--workers takes a whole number >= 1"
fi

docker_mode=0
if [ "${DICOMFLOW_NATIVE:-0}" != 1 ] && command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  docker_mode=1
fi

py=$here/.venv/bin/python
supervisor_conf=$home/supervisord.conf
ctl() { "$here/.venv/bin/supervisorctl" -c "$supervisor_conf" "$@"; }

write_config() {
  # First start: a config file with working defaults and freshly generated secrets.
  # python3 of the system: in Docker mode there is no .venv.
  local secret; secret() { python3 -c 'import secrets; print(secrets.token_urlsafe(24))'; }
  local redis_port=${DICOMFLOW_REDIS_PORT:-6389} redis_pw; redis_pw=$(secret)
  local orthanc_http=${ORTHANC_HTTP_PORT:-8044}
  ( umask 077; mkdir -p "$home"; cat > "$conf" <<CONF
# dicomflow configuration, written by run.sh on first start ($(date -u +%FT%TZ)).
# Environment variables of the same name override these values. Keep this file private:
# it holds the generated secrets.
DICOMFLOW_HOME=$home
DICOMFLOW_START_REDIS=${DICOMFLOW_START_REDIS:-1}
DICOMFLOW_REDIS_PORT=$redis_port
DICOMFLOW_REDIS_PASSWORD=$redis_pw
DICOMFLOW_REDIS_URL=redis://:$redis_pw@127.0.0.1:$redis_port/0
DICOMFLOW_QUEUES=high,default,low
DICOMFLOW_WORKERS=${DICOMFLOW_WORKERS:-2}
DICOMFLOW_WORKER_CLASS=simple
DICOMFLOW_SCHEDULER_HOST=127.0.0.1
DICOMFLOW_SCHEDULER_PORT=${DICOMFLOW_SCHEDULER_PORT:-8642}
DICOMFLOW_SCHEDULER_TOKEN=$(secret)
DICOMFLOW_DASHBOARD_HOST=127.0.0.1
DICOMFLOW_DASHBOARD_PORT=${DICOMFLOW_DASHBOARD_PORT:-9181}
DICOMFLOW_DASHBOARD_USERNAME=admin
DICOMFLOW_DASHBOARD_PASSWORD=$(secret)
ORTHANC_AET=${ORTHANC_AET:-DICOMFLOW}
ORTHANC_DICOM_PORT=${ORTHANC_DICOM_PORT:-4244}
ORTHANC_HTTP_PORT=$orthanc_http
ORTHANC_URL=http://127.0.0.1:$orthanc_http
ORTHANC_USERNAME=dicomflow
ORTHANC_PASSWORD=$(secret)
ORTHANC_STORAGE_DIR=$home/orthanc-storage
# Refuse new instances when the storage's filesystem has less free space (MB); 0 = never.
ORTHANC_MIN_FREE_SPACE_MB=${ORTHANC_MIN_FREE_SPACE_MB:-1024}
# Delete studies from Orthanc this many days after their last update; 0 = keep everything.
ORTHANC_RETENTION_DAYS=${ORTHANC_RETENTION_DAYS:-0}
# Built-in services stay off until configured, e.g.:
# REPACK_DATADIR=/data/pypx
# CHRIS_URL=http://localhost:8000/api/v1/
CONF
  )
  say "wrote $conf (with generated secrets; mode 0600)"
}

load_config() {
  export DICOMFLOW_CONFIG=$conf
  set -a; eval "$("$py" -m dicomflow.config --shell)"; set +a
}

where() {
  cat <<TXT
  Orthanc Explorer   http://127.0.0.1:${ORTHANC_HTTP_PORT}/app/explorer.html  (user ${ORTHANC_USERNAME})
  DICOM (C-STORE)    ${ORTHANC_AET}@127.0.0.1:${ORTHANC_DICOM_PORT}
  RQ dashboard       http://${DICOMFLOW_DASHBOARD_HOST}:${DICOMFLOW_DASHBOARD_PORT}/  (user ${DICOMFLOW_DASHBOARD_USERNAME})
  scheduler API      http://${DICOMFLOW_SCHEDULER_HOST}:${DICOMFLOW_SCHEDULER_PORT}/api/v1/services  (bearer token)
  credentials        $conf
  logs               $home/logs/
TXT
}

supervisord_pid() { cat "$home/supervisord.pid" 2>/dev/null || true; }
running() { local pid; pid=$(supervisord_pid); [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

if [ "$docker_mode" = 1 ]; then
  cd "$here"
  [ -f "$conf" ] || write_config
  case "$cmd" in
    start) DICOMFLOW_CONFIG=$conf docker compose --env-file "$conf" up -d --scale "worker=${workers:-${DICOMFLOW_WORKERS:-2}}" ;;
    status) docker compose --env-file "$conf" ps ;;
    stop) docker compose --env-file "$conf" down ;;
  esac
  exit 0
fi

case "$cmd" in
  status)
    running || { say "not running (state in $home)"; exit 3; }
    load_config; ctl status || true; where; exit 0 ;;
  stop)
    if ! running; then say "not running"; exit 0; fi
    pid=$(supervisord_pid)
    ctl shutdown >/dev/null || kill "$pid"
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && die "supervisord ($pid) did not stop"
    say "stopped"; exit 0 ;;
esac

# start
[ -x "$py" ] || ( umask 022; bash "$here/build.sh" --native )  # the code, not state: readable as usual
running && { say "already running"; load_config; where; exit 0; }
[ -f "$conf" ] || write_config
chmod 700 "$home"  # Orthanc's storage, the spool and the cache hold patient data
load_config
workers=${workers:-${DICOMFLOW_WORKERS:-2}}
# Redis, the scheduler, the workers and the dashboard yield the CPU to Orthanc's ingest (README: benchmark).
niceness=${DICOMFLOW_NICE:-10}
[[ "$niceness" =~ ^[0-9]+$ && "$niceness" -le 19 ]] || die "DICOMFLOW_NICE takes a whole number 0-19"
mkdir -p "$home/logs" "$home/spool"

"$py" -m dicomflow.orthanc_config --out "$home/orthanc.json"
chmod 600 "$home/orthanc.json"

redis_program=""
if [ "${DICOMFLOW_START_REDIS:-1}" = 1 ]; then
  # Redis's memory limit: DICOMFLOW_REDIS_MAXMEMORY in Redis's units (512mb, 2gb; 0: none),
  # by default a quarter of the host's RAM. When full, Redis refuses writes and drops nothing
  # (noeviction: queued jobs are never evicted); the scheduler answers 503 (redis-full) and
  # the plugin keeps the events in its spool until there is room.
  redis_maxmemory=${DICOMFLOW_REDIS_MAXMEMORY:-}
  if [ -z "$redis_maxmemory" ]; then
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo 2>/dev/null || true)
    if [[ "$mem_kb" =~ ^[0-9]+$ ]]; then redis_maxmemory="$((mem_kb / 4 / 1024))mb"; else redis_maxmemory=1gb; fi
  fi
  [[ "$redis_maxmemory" =~ ^[0-9]+([kKmMgG][bB]?)?$ ]] \
    || die "DICOMFLOW_REDIS_MAXMEMORY takes a size such as 512mb or 2gb, not '$redis_maxmemory'"
  ( umask 077; cat > "$home/redis.conf" <<RCONF
bind 127.0.0.1 -::1
port ${DICOMFLOW_REDIS_PORT}
requirepass ${DICOMFLOW_REDIS_PASSWORD}
dir $home
appendonly yes
appendfsync everysec
save ""
maxmemory $redis_maxmemory
maxmemory-policy noeviction
RCONF
  )
  redis_program="[program:redis]
command=nice -n $niceness $(command -v redis-server) $home/redis.conf
priority=10
autorestart=true
stdout_logfile=$home/logs/redis.log
redirect_stderr=true
"
else
  "$py" -c 'import redis, os; redis.Redis.from_url(os.environ["DICOMFLOW_REDIS_URL"]).ping()' 2>/dev/null \
    || die "DICOMFLOW_START_REDIS=0 but no Redis answers at DICOMFLOW_REDIS_URL"
fi

cat > "$supervisor_conf" <<SCONF
; written by run.sh on each start
[unix_http_server]
file=$home/supervisor.sock
chmod=0700

[supervisord]
; its logs, pid file and socket, and what Redis, Orthanc (storage, spool), the scheduler and the
; dashboard write: private (supervisord's default umask is 022)
umask=077
logfile=$home/logs/supervisord.log
pidfile=$home/supervisord.pid
childlogdir=$home/logs
directory=$here
environment=DICOMFLOW_CONFIG="$conf",TCP_NODELAY="1"

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://$home/supervisor.sock

$redis_program
[program:orthanc]
command=$(command -v Orthanc || echo /usr/sbin/Orthanc) $home/orthanc.json
priority=20
autorestart=true
stopwaitsecs=30
stdout_logfile=$home/logs/orthanc.log
redirect_stderr=true

[program:scheduler]
command=nice -n $niceness $here/.venv/bin/dicomflow-scheduler
priority=30
autorestart=true
stopasgroup=true
stdout_logfile=$home/logs/scheduler.log
redirect_stderr=true

[program:worker]
command=nice -n $niceness $here/.venv/bin/dicomflow-worker
; services write their outputs (e.g. REPACK_DATADIR) for other programs to read; the DICOM cache
; under $home sets its own private modes
umask=022
process_name=%(program_name)s-%(process_num)d
numprocs=$workers
priority=40
autorestart=true
stopasgroup=true
killasgroup=true
stopwaitsecs=60
stdout_logfile=$home/logs/%(program_name)s-%(process_num)d.log
redirect_stderr=true

[program:dashboard]
command=nice -n $niceness $here/.venv/bin/python -m dicomflow.dashboard
priority=50
autorestart=true
stopasgroup=true
stdout_logfile=$home/logs/dashboard.log
redirect_stderr=true
SCONF

"$here/.venv/bin/supervisord" -c "$supervisor_conf"
say "starting (supervisord pid $(supervisord_pid)); waiting for the services to answer"
"$py" - <<'PY' || { ctl status || true; die "the stack did not come up; see $home/logs/"; }
import os, sys, time
import requests
env = os.environ
checks = {
    "scheduler": (f"http://{env['DICOMFLOW_SCHEDULER_HOST']}:{env['DICOMFLOW_SCHEDULER_PORT']}/health", None),
    "orthanc": (f"{env['ORTHANC_URL']}/system", (env.get("ORTHANC_USERNAME", ""), env.get("ORTHANC_PASSWORD", ""))),
    "dashboard": (f"http://{env['DICOMFLOW_DASHBOARD_HOST']}:{env['DICOMFLOW_DASHBOARD_PORT']}/",
                  (env["DICOMFLOW_DASHBOARD_USERNAME"], env["DICOMFLOW_DASHBOARD_PASSWORD"])),
}
deadline = time.time() + 60
pending = dict(checks)
while pending and time.time() < deadline:
    for name, (url, auth) in list(pending.items()):
        try:
            if requests.get(url, auth=auth, timeout=2).status_code == 200:
                del pending[name]
        except requests.RequestException:
            pass
    time.sleep(0.3)
if pending:
    print("not answering: " + ", ".join(pending), file=sys.stderr)
    sys.exit(1)
PY
say "dicomflow is up with $workers worker(s):"
where
cat <<TXT
Send a first DICOM file:
  TCP_NODELAY=1 storescu -aec ${ORTHANC_AET} 127.0.0.1 ${ORTHANC_DICOM_PORT} FILE.dcm
Install a service:   bash service.sh install NAME -p PATH
Stop:                bash run.sh stop
TXT
