#!/usr/bin/env bash
# Start, inspect, scale, restart and stop the dicomflow stack. `bash run.sh --help` for the
# commands and their exit codes (the help texts are below, in help_text).
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

help_text() {
  case "${1:-}" in
    start) cat <<'TXT'
bash run.sh [start] [--workers N]

Start everything run.sh runs: Redis (unless DICOMFLOW_START_REDIS=0), Orthanc with the
plugin, the scheduler, N workers (--workers N, else DICOMFLOW_WORKERS, else 2) and the RQ
dashboard. The first start writes $DICOMFLOW_HOME/dicomflow.env with generated secrets.
On a running stack, --workers N scales it: it starts only the new workers, or stops the
highest-numbered ones, each after its current job (up to 60 s); without --workers it says
that the stack is already running.

Exit status: 0 the stack is up (started, scaled, or already running); 1 it could not start
or scale (the message and $DICOMFLOW_HOME/logs/ say why); 2 a usage error.
TXT
      ;;
    status) cat <<'TXT'
bash run.sh status

Every program run.sh started, its state and pid, where each service is, and whether the
configuration file changed since the stack started (then: bash run.sh restart).

Exit status: 0 running; 3 not running; 2 a usage error.
TXT
      ;;
    stop) cat <<'TXT'
bash run.sh stop

Stop exactly what run.sh started (workers finish their current job, up to 60 s).

Exit status: 0 stopped, or was not running; 1 supervisord did not stop within 90 s; 2 a usage error.
TXT
      ;;
    restart) cat <<'TXT'
bash run.sh restart [--workers N]
bash run.sh restart workers

restart: stop everything and start it again, with the same number of workers unless
--workers N says otherwise. Every process reads the configuration file when it starts,
so this applies any change to $DICOMFLOW_HOME/dicomflow.env (ports, ORTHANC_*, DICOMFLOW_*,
and the built-in services' REPACK_*, CHRIS_*, NATS_URL). Orthanc refuses associations for
the seconds it is down; what the plugin received is in its spool.
restart workers: restart the workers only (each after its current job), e.g. after
installing a new version of a service's worker package.

Exit status: 0 the stack is up again; 1 it could not stop or start; 2 a usage error;
3 (restart workers) the stack is not running.
TXT
      ;;
    env) cat <<'TXT'
bash run.sh env

Print the configuration (the file, with environment variables on top) as shell
assignments, for:  eval "$(bash run.sh env)"

Exit status: 0 printed; 1 no configuration yet (start the stack once) or it cannot be read;
2 a usage error.
TXT
      ;;
    *) cat <<'TXT'
Start, inspect, scale, restart and stop the dicomflow stack.

  bash run.sh [start] [--workers N]   start everything; on a running stack, scale to N workers
  bash run.sh status                  what runs, and where
  bash run.sh stop                    stop exactly what run.sh started
  bash run.sh restart [--workers N]   stop and start everything: applies configuration changes
  bash run.sh restart workers         restart the workers only (a new worker package version)
  bash run.sh env                     the configuration as shell assignments: eval "$(bash run.sh env)"
  bash run.sh COMMAND --help          a command's help and exit codes

State and configuration: $DICOMFLOW_HOME (default ./state), $DICOMFLOW_HOME/dicomflow.env.
Exit status: 0 done; 1 failed (the message says why); 2 a usage error; status: 3 not running.
TXT
      ;;
  esac
}
usage_error() {
  printf 'run.sh: %s\n' "$*" >&2
  printf 'usage: bash run.sh [start [--workers N] | status | stop | restart [workers] [--workers N] | env | --help]\n' >&2
  exit 2
}

cmd=""; workers=""; target=""; want_help=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) want_help=1 ;;
    help) if [ -z "$cmd" ]; then want_help=1; cmd=${2:-}; [ $# -ge 2 ] && shift; else usage_error "unexpected 'help'"; fi ;;
    start|status|stop|restart|env)
      [ -z "$cmd" ] || usage_error "one command at a time ('$cmd', then '$1')"; cmd=$1 ;;
    workers)
      [ "$cmd" = restart ] && [ -z "$target" ] || usage_error "'workers' only follows 'restart'"; target=workers ;;
    --workers) [ $# -ge 2 ] || usage_error "--workers needs a number"; workers=$2; shift ;;
    --workers=*) workers=${1#--workers=} ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
  shift
done
if [ "$want_help" = 1 ]; then
  case "$cmd" in ""|start|status|stop|restart|env) help_text "$cmd"; exit 0 ;;
    *) usage_error "no such command '$cmd'" ;; esac
fi
cmd=${cmd:-start}
if [ -n "$workers" ]; then
  [[ "$workers" =~ ^[0-9]+$ && "$workers" -ge 1 ]] || usage_error "--workers takes a whole number >= 1"
  case "$cmd" in start|restart) ;; *) usage_error "--workers goes with start or restart" ;; esac
  [ "$target" != workers ] || usage_error "restart workers keeps their number; scale with: bash run.sh --workers N"
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
# Where the browser reaches Orthanc Explorer (the status page's link; in Docker ORTHANC_URL is another).
DICOMFLOW_ORTHANC_EXPLORER_URL=http://127.0.0.1:$orthanc_http/app/explorer.html
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
  status page        http://${DICOMFLOW_SCHEDULER_HOST}:${DICOMFLOW_SCHEDULER_PORT}/  (the dashboard's user)
  scheduler API      http://${DICOMFLOW_SCHEDULER_HOST}:${DICOMFLOW_SCHEDULER_PORT}/api/v1/services  (bearer token)
  credentials        $conf
  logs               $home/logs/
TXT
}

supervisord_pid() { cat "$home/supervisord.pid" 2>/dev/null || true; }
running() { local pid; pid=$(supervisord_pid); [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

# The configuration file's checksum when the stack started: status says when it changed since.
started_stamp=$home/dicomflow.env.started
config_stamp() { sha256sum "$conf" 2>/dev/null | cut -d' ' -f1; }
note_config_change() {
  if [ -f "$started_stamp" ] && [ "$(cat "$started_stamp")" != "$(config_stamp)" ]; then
    say "$conf changed since the stack started: 'bash run.sh restart' applies it"
  fi
}

# The workers are programs worker-0 ... worker-(N-1) of their own (not one group with
# numprocs), in a file supervisord includes: changing their number adds or removes programs
# and leaves the running ones alone.
workers_conf=$home/supervisord.workers.conf
worker_count() { grep -c '^\[program:worker-' "$workers_conf" 2>/dev/null || true; }
write_workers() {  # N COMMAND
  local i
  { echo "; written by run.sh: one program per worker (run.sh --workers N changes their number)"
    for ((i = 0; i < $1; i++)); do cat <<WCONF
[program:worker-$i]
command=$2
; services write their outputs (e.g. REPACK_DATADIR) for other programs to read; the DICOM cache
; under $home sets its own private modes
umask=022
priority=40
autorestart=true
stopasgroup=true
killasgroup=true
stopwaitsecs=60
stdout_logfile=$home/logs/worker-$i.log
redirect_stderr=true

WCONF
    done; } > "$workers_conf.new"
  mv "$workers_conf.new" "$workers_conf"
}
workers_running() { ctl status 2>/dev/null | grep -cE '^worker-[0-9]+ +RUNNING' || true; }
wait_for_workers() {  # N: until exactly N workers run (stopping ones may take stopwaitsecs)
  local _
  for _ in $(seq 1 900); do
    [ "$(workers_running)" = "$1" ] && [ "$(ctl status 2>/dev/null | grep -c '^worker-')" = "$1" ] && return 0
    sleep 0.1
  done
  return 1
}

scale() {  # a running native stack to $workers workers
  local current cmdline
  current=$(worker_count)
  if [ "$current" = "$workers" ]; then say "already running with $workers worker(s)"; return 0; fi
  cmdline=$(grep -m1 '^command=' "$workers_conf" | cut -d= -f2-)
  [ -n "$cmdline" ] || die "no worker program in $workers_conf: restart the stack (bash run.sh restart --workers $workers)"
  write_workers "$workers" "$cmdline"
  ctl reread >/dev/null
  ctl update >/dev/null || die "supervisord did not take the new worker count; see $home/logs/supervisord.log"
  wait_for_workers "$workers" || { ctl status || true; die "$workers worker(s) did not come up; see $home/logs/"; }
  say "scaled from $current to $workers worker(s) (until 'run.sh stop'; DICOMFLOW_WORKERS sets the number at start)"
}

stop_stack() {
  local pid
  if ! running; then say "not running"; return 0; fi
  pid=$(supervisord_pid)
  ctl shutdown >/dev/null || kill "$pid"
  for _ in $(seq 1 900); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && die "supervisord ($pid) did not stop within 90 s"
  rm -f "$started_stamp"
  say "stopped"
}

if [ "$cmd" = env ]; then
  [ -f "$conf" ] || die "no configuration yet at $conf: start the stack once (bash run.sh)"
  [ -x "$py" ] || die "$py not found: run build.sh first"
  DICOMFLOW_CONFIG=$conf exec "$py" -m dicomflow.config --shell
fi

if [ "$docker_mode" = 1 ]; then
  cd "$here"
  [ -f "$conf" ] || write_config
  # The containers run as this user (files in the state and data folders are theirs, docs/docker.md).
  compose() { DICOMFLOW_CONFIG=$conf DICOMFLOW_UID=${DICOMFLOW_UID:-$(id -u)} DICOMFLOW_GID=${DICOMFLOW_GID:-$(id -g)} \
    docker compose -p dicomflow --env-file "$conf" "$@"; }
  n=${workers:-${DICOMFLOW_WORKERS:-2}}
  case "$cmd/$target" in
    start/) compose up -d --build --scale "worker=$n" ;;  # also scales a running stack; --build: installed services' requirements
    status/) compose ps ;;
    stop/) compose down ;;
    restart/)  # the running number of workers, unless --workers says otherwise
      running_workers=$(compose ps -q worker 2>/dev/null | wc -l)
      [ -n "$workers" ] || [ "$running_workers" -eq 0 ] || n=$running_workers
      compose up -d --force-recreate --scale "worker=$n" ;;
    restart/workers) compose restart worker ;;
  esac
  exit 0
fi

case "$cmd" in
  status)
    running || { say "not running (state in $home)"; exit 3; }
    load_config; ctl status || true; where; note_config_change; exit 0 ;;
  stop)
    stop_stack; exit 0 ;;
  restart)
    if [ "$target" = workers ]; then
      running || { say "not running (state in $home)"; exit 3; }
      mapfile -t names < <(grep -o '^\[program:worker-[0-9]*' "$workers_conf" | cut -c10-)
      ctl restart "${names[@]}" >/dev/null || die "the workers did not restart; see $home/logs/"
      say "restarted ${#names[@]} worker(s)"; exit 0
    fi
    if running; then
      workers=${workers:-$(worker_count)}
      stop_stack
    else
      say "was not running; starting"
    fi ;;
esac

# start
[ -x "$py" ] || ( umask 022; bash "$here/build.sh" --native )  # the code, not state: readable as usual
if running; then
  load_config
  if [ -n "$workers" ]; then scale; else say "already running (bash run.sh --workers N scales it)"; fi
  where; note_config_change; exit 0
fi
[ -f "$conf" ] || write_config
chmod 700 "$home"  # Orthanc's storage, the spool and the cache hold patient data
load_config
if [ -n "${ORTHANC_DB_URL:-}" ] && [ ! -e /usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so ]; then
  say "ORTHANC_DB_URL is set: installing Orthanc's PostgreSQL index plugin (build.sh)"
  ( umask 022; bash "$here/build.sh" --native )
fi
workers=${workers:-${DICOMFLOW_WORKERS:-2}}
# Redis, the scheduler, the workers and the dashboard yield the CPU to Orthanc's ingest (docs/benchmarks.md).
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

[include]
files = $workers_conf

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

[program:dashboard]
command=nice -n $niceness $here/.venv/bin/python -m dicomflow.dashboard
priority=50
autorestart=true
stopasgroup=true
stdout_logfile=$home/logs/dashboard.log
redirect_stderr=true
SCONF

write_workers "$workers" "nice -n $niceness $here/.venv/bin/dicomflow-worker"
config_stamp > "$started_stamp"
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
Send DICOM files or folders (non-DICOM files are skipped and listed):
  .venv/bin/dicomflow-send FILE.dcm|FOLDER
Install a service:   bash service.sh install NAME -p PATH
After changing $conf:   bash run.sh restart
Stop:                bash run.sh stop
TXT
