#!/usr/bin/env bash
# One service of the scaled-out stack, in the foreground. The compose file's containers and the local
# cluster of scripts/cluster.sh (the integration tests) run exactly these commands, so what the tests
# start natively is what the containers run.
#
#   docker/services.sh mlflow | airflow-init | api-server | scheduler | dag-processor | triggerer | worker
#
# Settings come from the environment only (see docker/.env.example); nothing secret is in git or params.
set -euo pipefail
need() { for v in "$@"; do [ -n "${!v:-}" ] || { echo "services.sh: $v is not set" >&2; exit 2; }; done; }

case "${1:-}" in
  mlflow)
    # Tracking + registry on PostgreSQL, artifacts served through the server (a folder here; s3://... in
    # production), basic authentication on: the admin comes from MLFLOW_AUTH_ADMIN_USERNAME/_PASSWORD,
    # users and permissions live in MLFLOW_AUTH_DATABASE_URI.
    need MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION MLFLOW_AUTH_DATABASE_URI \
         MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
    conf="${MLFLOW_AUTH_CONFIG_PATH:-${TMPDIR:-/tmp}/mlflow-basic-auth-$$.ini}"
    umask 077
    cat > "$conf" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-NO_PERMISSIONS}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
    export MLFLOW_AUTH_CONFIG_PATH="$conf"
    # no server-side job runner (GenAI evaluation jobs): eight huey consumer processes we do not use
    export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
    exec mlflow server --app-name basic-auth \
      --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
      --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts \
      --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-2}" \
      --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-localhost,localhost:*,127.0.0.1,127.0.0.1:*,mlflow,mlflow:*}" ;;
  airflow-init)
    # Schema migration (idempotent) and the one-slot pool that serialises DVC tasks.
    need AIRFLOW__DATABASE__SQL_ALCHEMY_CONN
    airflow db migrate
    airflow pools set dvc 1 "DVC tasks, one at a time (the repository lock is not a queue)" ;;
  api-server)
    # Authentication on (Airflow's simple auth manager): the users of AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS,
    # the admin's password from AIRFLOW_ADMIN_PASSWORD (written to the passwords file, never to git).
    need AIRFLOW_ADMIN_USERNAME AIRFLOW_ADMIN_PASSWORD AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE
    umask 077
    python - <<PY
import json, os
path = os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
json.dump({os.environ["AIRFLOW_ADMIN_USERNAME"]: os.environ["AIRFLOW_ADMIN_PASSWORD"]}, open(path, "w"))
PY
    exec airflow api-server --host "${AIRFLOW_API_HOST:-0.0.0.0}" --port "${AIRFLOW_API_PORT:-8080}" ;;
  scheduler)     exec airflow scheduler ;;
  dag-processor) exec airflow dag-processor ;;
  triggerer)     exec airflow triggerer ;;
  worker)
    # A CPU worker serves the default queue; the GPU worker serves the training queue
    # (AIRFLOW_WORKER_QUEUES=training). One task at a time by default: training takes the whole device.
    exec airflow celery worker --queues "${AIRFLOW_WORKER_QUEUES:-default}" \
      --concurrency "${AIRFLOW_WORKER_CONCURRENCY:-1}" --celery-hostname "${AIRFLOW_WORKER_NAME:-worker}@%h" ;;
  *)
    echo "usage: $0 mlflow|airflow-init|api-server|scheduler|dag-processor|triggerer|worker" >&2; exit 2 ;;
esac
