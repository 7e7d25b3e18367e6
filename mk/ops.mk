# Operations: the team's MLflow tracking server (PostgreSQL backend), the Debian packages the
# server and browser tests need, and Airflow's own virtualenv for the DAG factory's test.
# Included by the Makefile; `make test` installs what is missing before pytest starts.

AIRFLOW_VENV ?= .venv-airflow
AIRFLOW_STAMP = $(AIRFLOW_VENV)/.installed
# The same pins as pyproject's `airflow` extra; Airflow runs in its own interpreter.
AIRFLOW_PIP = apache-airflow==3.3.2 'apache-airflow-providers-standard>=1.0'
OPS_DEBIAN = postgresql chromium chromium-driver
SUDO = $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: mlflow-server mlflow-server-stop mlflow-server-status ops-deps airflow-venv

# Start PostgreSQL + `mlflow server` on 127.0.0.1:$(MLFLOW_PORT) (default 5000) in the
# background; returns once /health answers. State under mlflow/state (DEEPTRENDS_STATE_DIR).
mlflow-server: $(STAMP) ops-deps
	bash mlflow/server.sh start

mlflow-server-stop:
	bash mlflow/server.sh stop

mlflow-server-status:
	bash mlflow/server.sh status

# Debian packages, installed only where one is missing (CI machines start without chromium).
ops-deps:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  echo "ops-deps: installing$$missing"; \
	  if command -v apt-get >/dev/null 2>&1; then \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing \
	      >/dev/null || echo "ops-deps: could not install$$missing; their tests will skip"; \
	  else echo "ops-deps: no apt-get; the tests needing$$missing will skip"; fi; \
	fi

$(AIRFLOW_STAMP):
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet $(AIRFLOW_PIP) || \
	  { echo "airflow-venv: Airflow did not install; the Airflow test will skip"; exit 0; }
	touch $(AIRFLOW_STAMP)

airflow-venv: $(AIRFLOW_STAMP)

# The test suite's server, browser and Airflow tests find what they need already there.
test: ops-deps airflow-venv
