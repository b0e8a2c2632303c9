#!/usr/bin/env bash
# MLproject's wrapper of the training command: when a signal killed it, say which. `mlflow run` turns any failure of
# its child into exit code 1, so the signal (9 for the kernel's out-of-memory kill) would otherwise be lost; the
# orchestrator reads this line from the job's log (training_command.exit_description).
"$@"
code=$?
if [ "$code" -gt 128 ]; then
  echo "=== training process killed by signal $((code - 128)) ===" >&2
fi
exit "$code"
