# The two commands of the README: `make demo` (the whole pipeline on the embedded default) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STATE := .state
# Test processes (pytest-xdist), each with its own embedded stack: most tests wait on runs, so two halve CI on 2 cores.
# --dist loadgroup: tests marked with one xdist_group run in one process, one after the other (the two modules that
# start a whole Airflow deployment: tests/faults/test_scheduler_faults.py, tests/deploy/test_celery_deployment.py).
TEST_WORKERS ?= 2

.PHONY: demo test lint unit ui clean install system-deps smoke-aws
.PHONY: smoke-github test-deploy

# requirements-deploy.lock: the production deployment's set (Celery, PostgreSQL drivers, Redis), which tests/deploy runs.
$(BIN)/.installed: requirements.lock requirements-deploy.lock
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock -r requirements-deploy.lock 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -c "import airflow, mlflow, moto, paramiko, torch, celery, psycopg2, asyncpg, redis" && touch $@

install: $(BIN)/.installed

system-deps:
	@WITH_TEST_TOOLS=$(WITH_TEST_TOOLS) .ci/system-deps.sh

## Run the training DAG end to end on the embedded default (moto, loopback sshd, local MLflow, git daemon) and summarise.
demo: install system-deps
	PYTHONUNBUFFERED=1 $(BIN)/python -m embedded.demo --state-dir $(STATE)

## Lint, type-check and run every test (what CI runs).
test: install
	@$(MAKE) --no-print-directory system-deps WITH_TEST_TOOLS=1
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy dags embedded remote benchmarks
	$(BIN)/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup --durations=15

## The production deployment alone: the Celery deployment on the local PostgreSQL and Redis, and the compose file.
test-deploy: install system-deps
	$(BIN)/pytest -q -p no:cacheprovider -s tests/deploy

## Read-only smoke test against the real GitHub API (free; anonymous or GITHUB_TOKEN; skips without a network).
smoke-github: install
	EC2_TRAINER_SMOKE=github $(BIN)/pytest -q -p no:cacheprovider -rs -m github tests/orchestrator/test_github_smoke.py

## Opt-in, real AWS and real money (cents): the pipeline on one small CPU instance; see README, "Smoke test on AWS".
smoke-aws: install
	EC2_TRAINER_SMOKE_AWS=1 $(BIN)/pytest -q -p no:cacheprovider -s -m aws tests/smoke

lint: install
	$(BIN)/ruff format --check . && $(BIN)/ruff check . && $(BIN)/mypy dags embedded remote benchmarks

## Browse the last demo: the Airflow UI on :8080 and the MLflow UI on :5000 (Ctrl-C stops both).
ui: install
	@test -f $(STATE)/airflow/airflow.db || { echo "No demo data in $(STATE): run make demo first"; exit 1; }
	PATH=$(CURDIR)/$(BIN):$$PATH AIRFLOW_HOME=$(CURDIR)/$(STATE)/airflow AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW__CORE__PARALLELISM=2 \
	  bash -c 'trap "kill 0" EXIT; airflow pools import $(CURDIR)/config/pools.json >/dev/null; \
	    mlflow server --backend-store-uri sqlite:///$(CURDIR)/$(STATE)/services/mlflow/mlflow.db \
	      --artifacts-destination $(CURDIR)/$(STATE)/services/mlflow/artifacts --host 127.0.0.1 --port 5000 --workers 1 & \
	    airflow standalone'

clean:
	rm -rf $(STATE) .mypy_cache .ruff_cache .pytest_cache
