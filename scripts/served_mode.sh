#!/usr/bin/env bash
# Served mode on one machine, without Docker: the topology of docker-compose.yml
# (MLflow tracking server, gunicorn, an RQ worker per queue, the reaper's
# scheduler) as local processes on this machine's PostgreSQL and Redis.
#
#   scripts/served_mode.sh start     migrate, collect static files, start everything,
#                                    wait until /healthz is ok (exit 1 and stop if not)
#   scripts/served_mode.sh stop      stop everything (TERM, then KILL after STOP_TIMEOUT)
#   scripts/served_mode.sh status    which processes run, and /healthz
#
# Every service comes from the environment (defaults in brackets):
#   DATABASE_URL        [postgres://postgres@127.0.0.1:5432/mlops]  created if missing
#   REDIS_URL           [redis://127.0.0.1:6379/0]
#   WEB_HOST, WEB_PORT  [127.0.0.1, 8000]       gunicorn
#   MLFLOW_HOST, MLFLOW_PORT [127.0.0.1, 5000]  mlflow server; MLFLOW_TRACKING_URI follows
#   MLFLOW_BACKEND_STORE_URI     [sqlite:///$SERVED_DIR/mlflow.db]
#   MLFLOW_ARTIFACTS_DESTINATION [$SERVED_DIR/mlflow-artifacts]
#   MLFLOW_WORKERS      [2]
#   SERVED_DIR          [var/served]  pid files, logs/<process>.log, the MLflow store
#   VENV                [.venv]       where python, gunicorn and mlflow come from
#   START_TIMEOUT, STOP_TIMEOUT [180, 30] seconds
# and every setting of mlops_site/settings.py (SECRET_KEY, HEARTBEAT_SECONDS, ...)
# reaches all processes the same way.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

VENV="${VENV:-$ROOT/.venv}"
PYTHON="$VENV/bin/python"
SERVED_DIR="${SERVED_DIR:-$ROOT/var/served}"
PID_DIR="$SERVED_DIR/pids"
LOG_DIR="$SERVED_DIR/logs"
WEB_HOST="${WEB_HOST:-127.0.0.1}"
WEB_PORT="${WEB_PORT:-8000}"
MLFLOW_HOST="${MLFLOW_HOST:-127.0.0.1}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
MLFLOW_WORKERS="${MLFLOW_WORKERS:-2}"
MLFLOW_BACKEND_STORE_URI="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$SERVED_DIR/mlflow.db}"
MLFLOW_ARTIFACTS_DESTINATION="${MLFLOW_ARTIFACTS_DESTINATION:-$SERVED_DIR/mlflow-artifacts}"
START_TIMEOUT="${START_TIMEOUT:-180}"
STOP_TIMEOUT="${STOP_TIMEOUT:-30}"

export DJANGO_SETTINGS_MODULE=mlops_site.settings
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/mlops}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-http://$MLFLOW_HOST:$MLFLOW_PORT}"
export RAGAS_DO_NOT_TRACK="${RAGAS_DO_NOT_TRACK:-true}" TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
export PYTHONUNBUFFERED=1

# Started in this order, stopped in the reverse one.
PROCESSES=(mlflow web worker-gpu worker-cpu scheduler)

say() { printf 'served_mode: %s\n' "$*"; }

pid_of() {  # the pid a process was started with, if its pid file exists
  [[ -s "$PID_DIR/$1.pid" ]] && cat "$PID_DIR/$1.pid"
}

session_pids() {  # every process left in the session started for $1 (an RQ work-horse has its
  local pid       # own process group, but stays in the session of its worker)
  pid="$(pid_of "$1")" || return 1
  pgrep -s "$pid"
}

alive() { session_pids "$1" >/dev/null; }

signal_session() {  # signal_session SIGNAL NAME
  local pids
  pids="$(session_pids "$2")" || return 0
  # shellcheck disable=SC2086 # one pid per word
  kill "-$1" $pids 2>/dev/null || true
}

launch() {  # launch NAME COMMAND...: in its own session, so stop can end it with all its children
  local name="$1"; shift
  rm -f "$PID_DIR/$name.pid"
  # The pid is written by the process itself: it is then the session (and group) id.
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$PID_DIR/$name.pid" "$@" >>"$LOG_DIR/$name.log" 2>&1 </dev/null &
  for _ in $(seq 50); do [[ -s "$PID_DIR/$name.pid" ]] && break; sleep 0.1; done
  say "$name started (pid $(pid_of "$name"), log $LOG_DIR/$name.log)"
}

http_ok() {  # http_ok URL: does it answer 200?
  "$PYTHON" - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
    sys.exit(0 if response.status == 200 else 1)
EOF
}

wait_for() {  # wait_for WHAT URL PROCESS...: until URL answers 200, while the processes live
  local what="$1" url="$2"; shift 2
  local deadline=$((SECONDS + START_TIMEOUT)) name
  until http_ok "$url"; do
    for name in "$@"; do
      if ! alive "$name"; then say "$name exited; its log:"; tail -n 40 "$LOG_DIR/$name.log" >&2 || true; return 1; fi
    done
    if ((SECONDS >= deadline)); then say "$what not ready after ${START_TIMEOUT}s ($url)"; return 1; fi
    sleep 0.5
  done
}

port_in_use() {  # port_in_use HOST PORT: does something listen there already?
  "$PYTHON" -c 'import socket, sys; s = socket.socket(); s.settimeout(2); sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)' "$1" "$2"
}

ensure_database() {  # create the PostgreSQL database of DATABASE_URL if it does not exist yet
  "$PYTHON" - <<'EOF'
import os

import dj_database_url

db = dj_database_url.parse(os.environ["DATABASE_URL"])
if db["ENGINE"].endswith("postgresql"):
    import psycopg
    from psycopg import sql

    params = {"host": db["HOST"] or None, "port": db["PORT"] or None, "user": db["USER"] or None, "password": db["PASSWORD"] or None}
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [db["NAME"]]).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db["NAME"])))
            print(f"served_mode: created database {db['NAME']}")
EOF
}

on_start_failure() {
  trap - ERR
  say "start failed; stopping what was started"
  cmd_stop >&2 || true
  exit 1
}

cmd_start() {
  local name
  for name in "${PROCESSES[@]}"; do
    if alive "$name"; then say "already running ($name, pid $(pid_of "$name")); run '$0 stop' first"; exit 1; fi
  done
  # Another server on our ports would answer our health checks in our place.
  if port_in_use "$MLFLOW_HOST" "$MLFLOW_PORT"; then say "port $MLFLOW_PORT is taken (set MLFLOW_PORT)"; exit 1; fi
  if port_in_use "$WEB_HOST" "$WEB_PORT"; then say "port $WEB_PORT is taken (set WEB_PORT)"; exit 1; fi
  mkdir -p "$PID_DIR" "$LOG_DIR"
  [[ "$MLFLOW_ARTIFACTS_DESTINATION" == *://* ]] || mkdir -p "$MLFLOW_ARTIFACTS_DESTINATION"
  # A failed start leaves nothing running behind it.
  trap on_start_failure ERR

  ensure_database
  "$PYTHON" manage.py migrate --noinput >>"$LOG_DIR/migrate.log" 2>&1 || { tail -n 40 "$LOG_DIR/migrate.log" >&2; false; }
  "$PYTHON" manage.py collectstatic --noinput >>"$LOG_DIR/collectstatic.log" 2>&1 || { tail -n 40 "$LOG_DIR/collectstatic.log" >&2; false; }
  say "database migrated, static files collected"

  launch mlflow "$VENV/bin/mlflow" server --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS"
  wait_for "MLflow" "http://$MLFLOW_HOST:$MLFLOW_PORT/health" mlflow

  launch web "$VENV/bin/gunicorn" -c python:mlops_site.gunicorn_conf --bind "$WEB_HOST:$WEB_PORT" mlops_site.wsgi
  launch worker-gpu "$PYTHON" manage.py rqworker gpu
  launch worker-cpu "$PYTHON" manage.py rqworker cpu
  launch scheduler "$PYTHON" manage.py rqcron runs.cron
  wait_for "the platform" "http://$WEB_HOST:$WEB_PORT/healthz" web worker-gpu worker-cpu scheduler
  trap - ERR
  say "ready: web http://$WEB_HOST:$WEB_PORT (health /healthz), MLflow $MLFLOW_TRACKING_URI"
}

stop_one() {  # stop_one NAME: TERM the main process (graceful), then its leftovers, then KILL
  local name="$1" pid deadline
  pid="$(pid_of "$name")" || return 0
  if alive "$name"; then
    # gunicorn finishes its requests on TERM, an RQ worker its current job (a job
    # still running at STOP_TIMEOUT is killed; the reaper fails its run later).
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_TIMEOUT))
    while alive "$name" && ((SECONDS < deadline)); do
      kill -0 "$pid" 2>/dev/null || signal_session TERM "$name"  # children that outlived it
      sleep 0.2
    done
    if alive "$name"; then
      say "$name did not stop within ${STOP_TIMEOUT}s; killing it"
      deadline=$((SECONDS + 10))
      while alive "$name" && ((SECONDS < deadline)); do signal_session KILL "$name"; sleep 0.2; done
    fi
    if alive "$name"; then say "$name: could not stop pids $(session_pids "$name" | tr '\n' ' ')"; return 1; fi
    say "$name stopped"
  fi
  rm -f "$PID_DIR/$name.pid"
}

cmd_stop() {
  local i failed=0
  for ((i = ${#PROCESSES[@]} - 1; i >= 0; i--)); do
    stop_one "${PROCESSES[$i]}" || failed=1
  done
  return "$failed"
}

cmd_status() {
  local name running=0
  for name in "${PROCESSES[@]}"; do
    if alive "$name"; then
      say "$name: running (pid $(pid_of "$name"))"; running=$((running + 1))
    else
      say "$name: stopped"
    fi
  done
  if ((running)); then
    "$PYTHON" - "http://$WEB_HOST:$WEB_PORT/healthz" <<'EOF' || true
import sys, urllib.error, urllib.request
try:
    body = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
except urllib.error.HTTPError as exc:
    body = exc.read().decode()
except OSError as exc:
    body = f"unreachable ({exc})"
print(f"served_mode: /healthz: {body}")
EOF
  fi
  ((running == ${#PROCESSES[@]}))
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  restart) cmd_stop; cmd_start ;;
  *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
