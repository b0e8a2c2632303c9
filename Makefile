# The README's commands: `make demo` (the whole pipeline on the embedded default), `make ui` (its UIs) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STATE := .state
# Test processes (pytest-xdist), each with its own embedded stack: most tests wait on runs, so two halve CI on 2 cores.
# --dist loadgroup: tests marked with one xdist_group run in one process, one after the other (the two modules that
# start a whole Airflow deployment: tests/faults/test_scheduler_faults.py, tests/deploy/test_celery_deployment.py).
TEST_WORKERS ?= 2
# Extra pytest arguments, e.g. PYTEST_ARGS=--junitxml=/tmp/junit.xml for benchmarks/suite_durations.py.
PYTEST_ARGS ?=
# The ports `make demo` and `make ui` serve on 127.0.0.1 (the UIs' links use them: keep them across the two).
AIRFLOW_PORT ?= 8080
MLFLOW_PORT ?= 5000
GITHUB_PORT ?= 8070
PROMETHEUS_PORT ?= 9090
PORT_ARGS = --airflow-port $(AIRFLOW_PORT) --mlflow-port $(MLFLOW_PORT) --github-port $(GITHUB_PORT) \
	--prometheus-port $(PROMETHEUS_PORT)

.PHONY: demo test lint unit ui up upload-dataset clean install system-deps smoke-aws
.PHONY: smoke-github test-deploy mutation config-reference

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

## Run the training DAG end to end on the embedded default's local Airflow, watch it live, and summarise.
demo: install system-deps
	PYTHONUNBUFFERED=1 $(BIN)/python -m embedded.cli.demo --state-dir $(STATE) $(PORT_ARGS)

## The same deployment, kept up until Ctrl-C: Airflow, MLflow and the GitHub stand-in UIs (URLs and login printed last).
ui up: install system-deps
	PYTHONUNBUFFERED=1 $(BIN)/python -m embedded.cli.ui --state-dir $(STATE) $(PORT_ARGS)

## Upload a dataset version to the running `make ui`'s S3 (next free v<N>, synthetic data) and say what happens next:
## ec2_retrain, once unpaused, trains it. DATASET_VERSION=v7 names it; DATA_URI=synthetic://?... picks its data.
upload-dataset: install
	$(BIN)/python -m embedded.cli.upload_dataset --state-dir $(STATE) \
		$(if $(DATASET_VERSION),--version '$(DATASET_VERSION)') $(if $(DATA_URI),--data-uri '$(DATA_URI)')

## Lint, type-check and run every test (what CI runs).
test: install
	@$(MAKE) --no-print-directory system-deps WITH_TEST_TOOLS=1
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy dags embedded remote benchmarks
	$(BIN)/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup --durations=15 $(PYTEST_ARGS)

## The inner loop's fast tier: every test but the `slow` ones (whole DAG runs, Airflow deployments, the browser).
unit: install
	$(BIN)/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

## The production deployment alone: the Celery deployment on the local PostgreSQL and Redis, and the compose file.
test-deploy: install system-deps
	$(BIN)/pytest -q -p no:cacheprovider -s tests/deploy

## Read-only smoke test against the real GitHub API (free; anonymous or GITHUB_TOKEN; skips without a network).
smoke-github: install
	EC2_TRAINER_SMOKE=github $(BIN)/pytest -q -p no:cacheprovider -rs -m github tests/orchestrator/ci/test_github_smoke.py

## Opt-in, real AWS and real money (cents): the pipeline on one small CPU instance; see docs/production.md, "Smoke test on AWS".
smoke-aws: install
	EC2_TRAINER_SMOKE_AWS=1 $(BIN)/pytest -q -p no:cacheprovider -s -m aws tests/smoke

## Mutation testing of the safety-critical modules, each on its own unit tests (minutes each; on purpose, not in CI).
## The results stay in .state/mutation/<module>/ (`mutmut results`, `mutmut show <name>` there).
mutation: install
	$(BIN)/python -m pip install -q --disable-pip-version-check mutmut==3.8.1 2>&1 | grep -v '^WARNING: Location' || true
	.ci/mutation.sh $(MODULES)

## docs/configuration.md from the settings model (tests/orchestrator/config/test_settings_reference.py fails when it is stale).
config-reference: install
	PYTHONPATH=dags $(BIN)/python -m orchestrator.config.settings_reference > docs/configuration.md

lint: install
	$(BIN)/ruff format --check . && $(BIN)/ruff check . && $(BIN)/mypy dags embedded remote benchmarks

clean:
	rm -rf $(STATE) .mypy_cache .ruff_cache .pytest_cache
