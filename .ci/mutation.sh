#!/usr/bin/env bash
# `make mutation`: mutmut over one safety-critical module at a time, each on its own fast unit tests. Run on purpose,
# never in CI (minutes per module). mutmut 3 only maps a test's import to a mutant for sources under ./ or src/, so
# the tracked tree is copied to .state/mutation/<module>/ with dags/ as src/ (dags kept as a link for tests/conftest).
# Usage: .ci/mutation.sh [module:tests[,tests...] ...]; results: `mutmut results` in that folder.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY="$ROOT/.venv/bin/python"
"$PY" -c "import mutmut" 2>/dev/null || { echo "mutmut missing: $PY -m pip install mutmut==3.8.1" >&2; exit 1; }
PAIRS=("$@")
[ ${#PAIRS[@]} -gt 0 ] || PAIRS=(
  orchestrator/ci/verdict.py:tests/orchestrator/ci/test_verdict.py
  orchestrator/cloud/hostkeys.py:tests/orchestrator/cloud/test_hostkeys.py
  orchestrator/cloud/launch_spec.py:tests/orchestrator/cloud/test_launch_spec.py
  orchestrator/config/run_params.py:tests/orchestrator/config/test_run_params.py,tests/orchestrator/config/test_settings.py
  orchestrator/observe/cost.py:tests/orchestrator/observe/test_cost.py
  orchestrator/sweeps/sets.py:tests/orchestrator/sweeps/test_sets.py
  orchestrator/instance/source_tree.py:tests/orchestrator/instance/test_source_tree.py
  orchestrator/instance/recovery.py:tests/orchestrator/instance/test_recovery.py
  orchestrator/observe/cost_cap.py:tests/orchestrator/observe/test_cost_cap.py
  orchestrator/cloud/bake.py:tests/orchestrator/cloud/test_bake.py
)
for pair in "${PAIRS[@]}"; do
  module=${pair%%:*} tests=${pair#*:}
  work="$ROOT/.state/mutation/$(basename "$module" .py)"
  rm -rf "$work" && mkdir -p "$work"
  (cd "$ROOT" && git ls-files -z | xargs -0 tar -cf - | tar -xf - -C "$work")
  cd "$work"
  mv dags src && ln -s src dags && ln -s "$ROOT/.venv" .venv
  sed -i 's/^pythonpath = \[".", "dags"\]/pythonpath = [".", "src"]/' pyproject.toml
  cat >> pyproject.toml <<TOML

[tool.mutmut]
paths_to_mutate = ["src/$module"]
tests_dir = ["${tests//,/\", \"}"]
also_copy = ["dags", "src", "tests", "config", "userdata", "embedded", "remote"]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]
TOML
  nice "$PY" -m mutmut run >/dev/null 2>&1 || true
  echo "== $module ($tests)"
  "$PY" -W ignore -m mutmut results --all true 2>/dev/null | sed 's/.*: //' | sort | uniq -c
  "$PY" -W ignore -m mutmut results 2>/dev/null | grep ': survived$' || true
done
