#!/usr/bin/env bash
# Launch an MLflow tracking server over the project's SQLite store and a local artifact root.
# Usage: mlflow/server.sh [PORT]   (then export MLFLOW_TRACKING_URI=http://127.0.0.1:PORT)
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${1:-5000}"
exec .venv/bin/mlflow server \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlflow.db}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}" \
  --host 127.0.0.1 --port "$PORT"
