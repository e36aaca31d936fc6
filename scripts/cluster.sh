#!/usr/bin/env bash
# The scaled-out stack as local processes on this machine's PostgreSQL and Redis: the MLflow server
# (PostgreSQL backend, served artifacts, basic auth) and Airflow with the CeleryExecutor (API server,
# scheduler, DAG processor, triggerer, a CPU worker on the default queue and a "GPU" worker on the
# training queue). Each service runs `docker/services.sh <service>`, the command its container runs.
#
#   scripts/cluster.sh start [--fresh]   start (--fresh: drop and recreate the databases first)
#   scripts/cluster.sh stop              stop every service
#   scripts/cluster.sh status            which services run
#   scripts/cluster.sh kill-service NAME | start-service NAME   SIGKILL one service's process group; start it
#   source "$CLUSTER_DIR/env.sh"         the client settings (tracking URI, credentials, API address)
#
# Settings (environment; defaults fit a developer machine with trust auth on 127.0.0.1):
#   CLUSTER_DIR     run folder: logs, pids, AIRFLOW_HOME, artifacts, env.sh     (default: .cluster)
#   CLUSTER_DB      PostgreSQL server URL without a database (default: postgresql://postgres@127.0.0.1:5432)
#   CLUSTER_DB_PREFIX  prefix of the three databases (default: pipeline)
#   CLUSTER_REDIS   Redis URL of the Celery broker (default: redis://127.0.0.1:6379/5)
#   MLFLOW_PORT, AIRFLOW_API_PORT  (default 5055, 8085); PIPELINE_PROJECT (default: this checkout)
#   PIPELINE_PYTHON the interpreter with the pipeline installed (default: .venv/bin/python)
#   Passwords and secrets are generated once per CLUSTER_DIR unless given in the environment.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="$(mkdir -p "${CLUSTER_DIR:-$ROOT/.cluster}" && cd "${CLUSTER_DIR:-$ROOT/.cluster}" && pwd)"
PY="${PIPELINE_PYTHON:-$ROOT/.venv/bin/python}"
BIN="$(dirname "$PY")"
DB="${CLUSTER_DB:-postgresql://postgres@127.0.0.1:5432}"
PREFIX="${CLUSTER_DB_PREFIX:-pipeline}"
REDIS="${CLUSTER_REDIS:-redis://127.0.0.1:6379/5}"
MPORT="${MLFLOW_PORT:-5055}"
APORT="${AIRFLOW_API_PORT:-8085}"
SERVICES=(mlflow api-server scheduler dag-processor triggerer worker-cpu worker-gpu)

secret() { "$PY" -c 'import secrets; print(secrets.token_urlsafe(24))'; }

reachable() {  # host:port of a URL, or a clear error naming what could not be reached
  "$PY" - "$1" "$2" <<'PY'
import socket, sys, urllib.parse
what, url = sys.argv[1], sys.argv[2]
u = urllib.parse.urlsplit(url)
host, port = u.hostname or "127.0.0.1", u.port or {"postgresql": 5432, "redis": 6379}.get(u.scheme.split("+")[0], 80)
try:
    socket.create_connection((host, port), timeout=3).close()
except OSError as e:
    sys.exit(f"cluster: {what} at {host}:{port} could not be reached ({e})")
PY
}

write_env() {  # the settings every service and client reads; generated secrets stay in CLUSTER_DIR
  [ -f "$DIR/secrets.sh" ] || {
    umask 077
    cat > "$DIR/secrets.sh" <<SH
export MLFLOW_AUTH_ADMIN_PASSWORD="\${MLFLOW_AUTH_ADMIN_PASSWORD:-$(secret)}"
export AIRFLOW_ADMIN_PASSWORD="\${AIRFLOW_ADMIN_PASSWORD:-$(secret)}"
export MLFLOW_FLASK_SERVER_SECRET_KEY="\${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(secret)}"
export AIRFLOW__API_AUTH__JWT_SECRET="\${AIRFLOW__API_AUTH__JWT_SECRET:-$(secret)}"
export AIRFLOW__API__SECRET_KEY="\${AIRFLOW__API__SECRET_KEY:-$(secret)}"
export AIRFLOW__CORE__FERNET_KEY="\${AIRFLOW__CORE__FERNET_KEY:-$("$PY" -c 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())')}"
SH
  }
  local pg="${DB#postgresql://}"
  cat > "$DIR/env.sh" <<SH
# written by scripts/cluster.sh; source it to talk to the local cluster
source "$DIR/secrets.sh"
export PATH="$BIN:\$PATH"
export PIPELINE_PROJECT="${PIPELINE_PROJECT:-$ROOT}" PIPELINE_PYTHON="$PY"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
# MLflow server: PostgreSQL stores, artifacts under CLUSTER_DIR, basic auth
export MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://$pg/${PREFIX}_mlflow"
export MLFLOW_AUTH_DATABASE_URI="postgresql+psycopg2://$pg/${PREFIX}_mlflow_auth"
export MLFLOW_ARTIFACTS_DESTINATION="$DIR/mlartifacts"
export MLFLOW_AUTH_ADMIN_USERNAME=admin MLFLOW_AUTH_CONFIG_PATH="$DIR/mlflow_auth.ini"
export MLFLOW_HOST=127.0.0.1 MLFLOW_PORT=$MPORT MLFLOW_WORKERS=1
# clients (the pipeline's tasks): selected by these variables only
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MPORT"
export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD="\$MLFLOW_AUTH_ADMIN_PASSWORD"
# Airflow: PostgreSQL metadata, CeleryExecutor on Redis, the API server for workers and clients
export AIRFLOW_HOME="$DIR/airflow"
export AIRFLOW__CORE__DAGS_FOLDER="\$PIPELINE_PROJECT/dags" AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
export AIRFLOW__CORE__EXECUTOR=CeleryExecutor
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="postgresql+psycopg2://$pg/${PREFIX}_airflow"
export AIRFLOW__CELERY__BROKER_URL="$REDIS"
export AIRFLOW__CELERY__RESULT_BACKEND="db+postgresql+psycopg2://$pg/${PREFIX}_airflow"
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://127.0.0.1:$APORT/execution/"
export AIRFLOW__API__BASE_URL="http://127.0.0.1:$APORT" AIRFLOW__API__WORKERS=1
export AIRFLOW_API_HOST=127.0.0.1 AIRFLOW_API_PORT=$APORT
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE="$DIR/airflow/passwords.json"
export AIRFLOW_ADMIN_USERNAME=admin
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=5 AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL=5
export AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT=\${AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT:-60}
export AIRFLOW__LOGGING__BASE_LOG_FOLDER="$DIR/airflow/logs"
SH
}

# Each service runs under a small supervisor, as `restart: unless-stopped` does in docker/compose.yaml: a
# service that exits after running a while (the scheduler when PostgreSQL restarts under it) is started
# again; one that exits within 30 s of its start is not (a broken configuration fails fast at start).
SUPERVISE='svc="$1"; while :; do t=$SECONDS; bash "$0" "$svc"; code=$?
  if (( SECONDS - t < 30 )); then echo "cluster: $svc exited ($code) within 30 s of its start: not restarted"; exit $code; fi
  echo "cluster: $svc exited ($code); restarting it in 5 s"; sleep 5; done'

start_one() {  # NAME: own process group (setsid), so stop / restart-service take its children too
  local name="$1" svc="$1" extra=()
  case "$name" in
    worker-cpu) svc=worker; extra=(AIRFLOW_WORKER_QUEUES=default AIRFLOW_WORKER_NAME=cpu) ;;
    worker-gpu) svc=worker; extra=(AIRFLOW_WORKER_QUEUES="${PIPELINE_TRAIN_QUEUE:-training}" AIRFLOW_WORKER_NAME=gpu
                                   AIRFLOW__CELERY__WORKER_LOG_SERVER_PORT=8794) ;;
  esac
  ( source "$DIR/env.sh"; cd "$DIR"
    exec env "${extra[@]}" setsid bash -c "$SUPERVISE" "$ROOT/docker/services.sh" "$svc" \
      >> "$DIR/logs/$name.log" 2>&1 < /dev/null ) &
  echo $! > "$DIR/pids/$name"
}

stop_one() {
  local f="$DIR/pids/$1"
  [ -f "$f" ] || return 0
  local pid kids; pid="$(cat "$f")"; kids="$(descendants "$pid")"
  kill -TERM -- "-$pid" $kids 2>/dev/null || true
  for _ in $(seq 50); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- "-$pid" $kids 2>/dev/null || true
  rm -f "$f"
}

descendants() {  # PID: every process under it (tasks run in sessions of their own)
  "$PY" -c 'import sys, psutil
try:
    print(" ".join(str(p.pid) for p in psutil.Process(int(sys.argv[1])).children(recursive=True)))
except psutil.NoSuchProcess:
    pass' "$1"
}

wait_http() {  # NAME URL PIDFILE [SECONDS]
  "$PY" - "$@" <<'PY'
import os, sys, time, urllib.request, urllib.error
name, url, pidfile, limit = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4] if len(sys.argv) > 4 else 180)
end = time.time() + limit
while time.time() < end:
    try:
        os.kill(int(open(pidfile).read()), 0)
    except (OSError, ValueError):
        sys.exit(f"cluster: {name} exited at start; see {os.path.dirname(os.path.dirname(pidfile))}/logs")
    try:
        urllib.request.urlopen(url, timeout=5).read()
        sys.exit(0)
    except urllib.error.HTTPError as e:
        if e.code < 500:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit(f"cluster: {name} did not answer at {url} within {limit:.0f} s (see its log in the cluster folder)")
PY
}

case "${1:-}" in
  start)
    reachable PostgreSQL "$DB"; reachable "Redis (the Celery broker)" "$REDIS"
    mkdir -p "$DIR/logs" "$DIR/pids" "$DIR/airflow" "$DIR/mlartifacts"
    for s in "${SERVICES[@]}"; do [ ! -f "$DIR/pids/$s" ] || { echo "cluster: already running ($DIR); stop it first" >&2; exit 2; }; done
    write_env
    psql=(psql "$DB/postgres" -v ON_ERROR_STOP=1 -qAt)
    for d in airflow mlflow mlflow_auth; do
      if [ "${2:-}" = "--fresh" ]; then "${psql[@]}" -c "DROP DATABASE IF EXISTS ${PREFIX}_$d WITH (FORCE)"; fi
      [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '${PREFIX}_$d'")" = 1 ] \
        || "${psql[@]}" -c "CREATE DATABASE ${PREFIX}_$d"
    done
    [ "${2:-}" != "--fresh" ] || "$PY" -c "import redis, sys; redis.Redis.from_url(sys.argv[1]).flushdb()" "$REDIS"
    ( source "$DIR/env.sh"; cd "$DIR"; bash "$ROOT/docker/services.sh" airflow-init >> "$DIR/logs/airflow-init.log" 2>&1 ) \
      || { echo "cluster: airflow-init failed; see $DIR/logs/airflow-init.log" >&2; exit 1; }
    for s in "${SERVICES[@]}"; do start_one "$s"; done
    wait_http "the MLflow server" "http://127.0.0.1:$MPORT/health" "$DIR/pids/mlflow"
    wait_http "the Airflow API server" "http://127.0.0.1:$APORT/api/v2/monitor/health" "$DIR/pids/api-server"
    echo "cluster up: MLflow http://127.0.0.1:$MPORT  Airflow http://127.0.0.1:$APORT  (source $DIR/env.sh)" ;;
  stop)
    for s in "${SERVICES[@]}"; do stop_one "$s"; done; echo "cluster stopped" ;;
  status)
    for s in "${SERVICES[@]}"; do
      if [ -f "$DIR/pids/$s" ] && kill -0 "$(cat "$DIR/pids/$s")" 2>/dev/null; then echo "$s running"; else echo "$s stopped"; fi
    done ;;
  kill-service)   # SIGKILL one service, its supervisor and every process under it (a crashed machine)
    # (by the process tree, not the group: Airflow's task supervisor starts each task in its own session)
    f="$DIR/pids/${2:?service}"
    "$PY" - "$(cat "$f")" <<'PY'
import sys, psutil
try:
    root = psutil.Process(int(sys.argv[1]))
except psutil.NoSuchProcess:
    sys.exit(0)
procs = [root] + root.children(recursive=True)
for p in procs:
    try:
        p.kill()
    except psutil.NoSuchProcess:
        pass
psutil.wait_procs(procs, timeout=10)
PY
    rm -f "$f" ;;
  start-service)
    start_one "${2:?service}" ;;
  *)
    echo "usage: $0 start [--fresh] | stop | status | kill-service NAME | start-service NAME" >&2; exit 2 ;;
esac
