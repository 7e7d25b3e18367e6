#!/usr/bin/env bash
# The team's MLflow tracking server: PostgreSQL (backend store) + `mlflow server` (REST API,
# UI, proxied artifacts), both bound to 127.0.0.1, state under one folder of the project.
#
#   mlflow/server.sh start     # initdb on first use, start PostgreSQL, create the databases,
#                              # `mlflow db upgrade`, start `mlflow server` in the background,
#                              # return once /health answers
#   mlflow/server.sh stop      # stop both
#   mlflow/server.sh status    # exit 0 when /health answers
#   mlflow/server.sh uri       # print the backend store URI (no password in it)
#
# Then: export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
#
# Environment (defaults in brackets):
#   MLFLOW_PORT [5000]          the tracking server's port
#   MLFLOW_PG_PORT [5433]       PostgreSQL's port (5432 is left to a system cluster)
#   MLFLOW_WORKERS [2]          uvicorn workers (mlflow's default is 4; this machine has 2 cores)
#   DEEPTRENDS_STATE_DIR [mlflow/state]  PostgreSQL data, artifacts, logs, pid files, secrets
#   MLFLOW_AUTH [0]             1: basic auth (`--app-name basic-auth`); the first start needs
#                               MLFLOW_AUTH_ADMIN_PASSWORD (and MLFLOW_AUTH_ADMIN_USERNAME [admin])
#   MLFLOW_FLASK_SERVER_SECRET_KEY  auth sessions; generated into the state folder when unset
#   MLFLOW_ALLOWED_HOSTS        passed to --allowed-hosts (behind a reverse proxy: its host name)
#   MLFLOW_UVICORN_OPTS [--timeout-worker-healthcheck 60]  passed to --uvicorn-opts
#   MLFLOW_BIN [.venv/bin/mlflow]
#
# The database password is generated on first start into $DEEPTRENDS_STATE_DIR/secrets/pgpass
# (mode 600, read by libpq through PGPASSFILE); no password is in any file of the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

CMD="${1:-start}"
if [[ "$CMD" =~ ^[0-9]+$ ]]; then  # the old usage: mlflow/server.sh PORT
  MLFLOW_PORT="$CMD"
  CMD=start
fi

PORT="${MLFLOW_PORT:-5000}"
PG_PORT="${MLFLOW_PG_PORT:-5433}"
WORKERS="${MLFLOW_WORKERS:-2}"
STATE="${DEEPTRENDS_STATE_DIR:-$ROOT/mlflow/state}"
MLFLOW="${MLFLOW_BIN:-$ROOT/.venv/bin/mlflow}"
AUTH="${MLFLOW_AUTH:-0}"
DB_USER=mlflow
DB_NAME=mlflow
AUTH_DB_NAME=mlflow_auth

PGDATA="$STATE/postgres"
SECRETS="$STATE/secrets"
export PGPASSFILE="$SECRETS/pgpass"
URI="postgresql+psycopg://$DB_USER@127.0.0.1:$PG_PORT/$DB_NAME"
AUTH_URI="postgresql+psycopg://$DB_USER@127.0.0.1:$PG_PORT/$AUTH_DB_NAME"

say() { echo "mlflow/server.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

pg_bin() {
  local dir
  if command -v pg_ctl >/dev/null 2>&1; then dirname "$(readlink -f "$(command -v pg_ctl)")"; return; fi
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
  [ -n "$dir" ] || die "PostgreSQL is not installed (Debian: apt-get install postgresql; or make ops-deps)"
  echo "$dir"
}

# PostgreSQL refuses to run as root: as root, its commands run as the 'postgres' user.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

health() {
  curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$PORT/health" 2>/dev/null
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

init_postgres() {
  local bin="$1" pwfile
  mkdir -p "$STATE" "$SECRETS"
  chmod 755 "$STATE"
  chmod 700 "$SECRETS"
  if [ ! -s "$PGPASSFILE" ]; then
    umask 077
    printf '127.0.0.1:*:*:%s:%s\n' "$DB_USER" "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
      >"$PGPASSFILE"
    umask 022
  fi
  [ -f "$PGDATA/PG_VERSION" ] && return 0
  mkdir -p "$PGDATA"
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres:postgres "$PGDATA"
    runuser -u postgres -- test -x "$STATE" ||
      die "the postgres user cannot enter $STATE: choose a DEEPTRENDS_STATE_DIR whose parents are world-executable"
  fi
  chmod 700 "$PGDATA"
  pwfile="$STATE/.initdb-pwfile"  # readable by initdb only, removed right after
  (umask 077; cut -d: -f5 "$PGPASSFILE" >"$pwfile")
  [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$pwfile"
  say "initdb $PGDATA"
  as_pg "$bin/initdb" -D "$PGDATA" -U "$DB_USER" --pwfile="$pwfile" --auth-local=peer \
    --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$STATE/initdb.log" 2>&1 ||
    { rm -f "$pwfile"; cat "$STATE/initdb.log" >&2; die "initdb failed"; }
  rm -f "$pwfile"
}

start_postgres() {
  local bin
  bin="$(pg_bin)"
  init_postgres "$bin"
  mkdir -p "$STATE/run"
  [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$STATE/run"
  if as_pg "$bin/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
    say "PostgreSQL already running on 127.0.0.1:$PG_PORT"
  else
    touch "$STATE/postgres.log"
    [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$STATE/postgres.log"
    say "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    as_pg "$bin/pg_ctl" -D "$PGDATA" -l "$STATE/postgres.log" -w -t 60 \
      -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $STATE/run" start >/dev/null ||
      { tail -20 "$STATE/postgres.log" >&2; die "PostgreSQL did not start"; }
  fi
  local db
  for db in "$DB_NAME" "$AUTH_DB_NAME"; do
    if ! "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$DB_USER" -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
      "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$DB_USER" "$db"
      say "created database $db"
    fi
  done
}

stop_postgres() {
  local bin
  bin="$(pg_bin)"
  if [ -f "$PGDATA/PG_VERSION" ] && as_pg "$bin/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
    as_pg "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
    say "PostgreSQL stopped"
  fi
}

write_auth_config() {
  cat >"$STATE/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = $AUTH_URI
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
  export MLFLOW_AUTH_CONFIG_PATH="$STATE/basic_auth.ini"
  if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
    if [ ! -s "$SECRETS/flask_secret_key" ]; then
      (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$SECRETS/flask_secret_key")
    fi
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$SECRETS/flask_secret_key")"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
}

start() {
  [ -x "$MLFLOW" ] || die "$MLFLOW not found (make install)"
  if pid_alive "$STATE/mlflow.pid" && health; then
    say "already serving on http://127.0.0.1:$PORT"
    return 0
  fi
  start_postgres
  say "mlflow db upgrade"
  "$MLFLOW" db upgrade "$URI" >"$STATE/db-upgrade.log" 2>&1 ||
    { tail -20 "$STATE/db-upgrade.log" >&2; die "mlflow db upgrade failed"; }
  local extra=()
  if [ "$AUTH" = 1 ]; then
    write_auth_config
    extra+=(--app-name basic-auth)
  fi
  [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ] && extra+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
  # uvicorn restarts a worker that misses a 5 s health check; a loaded machine's workers take
  # longer than that to import MLflow, and would be restarted forever
  extra+=(--uvicorn-opts "${MLFLOW_UVICORN_OPTS:---timeout-worker-healthcheck 60}")
  mkdir -p "$STATE/artifacts"
  say "starting mlflow server on http://127.0.0.1:$PORT (auth: $AUTH, workers: $WORKERS)"
  setsid "$MLFLOW" server --backend-store-uri "$URI" --artifacts-destination "$STATE/artifacts" \
    --host 127.0.0.1 --port "$PORT" --workers "$WORKERS" "${extra[@]}" \
    >"$STATE/mlflow.log" 2>&1 </dev/null &
  echo $! >"$STATE/mlflow.pid"
  local i
  for i in $(seq 1 600); do
    if health; then
      say "ready: export MLFLOW_TRACKING_URI=http://127.0.0.1:$PORT"
      return 0
    fi
    pid_alive "$STATE/mlflow.pid" || { tail -30 "$STATE/mlflow.log" >&2; die "mlflow server exited"; }
    sleep 0.5
  done
  tail -30 "$STATE/mlflow.log" >&2
  die "mlflow server did not answer /health within 300 s"
}

stop() {
  if [ -f "$STATE/mlflow.pid" ]; then
    local pid i
    pid="$(cat "$STATE/mlflow.pid")"
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      for i in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -KILL -- "-$pid" 2>/dev/null || true
      say "mlflow server stopped"
    fi
    rm -f "$STATE/mlflow.pid"
  fi
  stop_postgres
}

case "$CMD" in
  start) start ;;
  stop) stop ;;
  status) health && say "serving on http://127.0.0.1:$PORT" ;;
  uri) echo "$URI" ;;
  *) die "unknown command $CMD (start, stop, status, uri)" ;;
esac
