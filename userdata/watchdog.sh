#!/usr/bin/env bash
# Max-lifetime backstop, started detached by cloud-init: powers the instance off at the deadline even when
# Airflow, the network or the training job is gone. The launch sets InstanceInitiatedShutdownBehavior=terminate,
# so this power-off terminates the instance and nothing keeps billing.
# The placeholder values below are filled in, shell-quoted, by orchestrator.cloud.user_data.
# No `set -e`: a failed read or sleep must never end the backstop early.
set -uo pipefail

STATE_DIR=@@{state_dir}
# Used when <state_dir>/deadline is missing or garbled; the file may be rewritten to move the deadline.
FALLBACK_DEADLINE=@@{deadline_epoch}
MAX_STEP_S=60
RETRY_S=30

exec </dev/null >>"$STATE_DIR/watchdog.log" 2>&1

log() { printf '%s watchdog: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

read_deadline() {
  local value
  value="$(cat "$STATE_DIR/deadline" 2>/dev/null)" || value=""
  value="${value//[[:space:]]/}"
  if [[ "$value" =~ ^[0-9]+$ ]]; then
    echo "$value"
  else
    echo "$FALLBACK_DEADLINE"
  fi
}

log "started (pid $$), deadline epoch $(read_deadline)"
while true; do
  deadline="$(read_deadline)"
  remaining=$((deadline - $(date +%s)))
  if ((remaining <= 0)); then
    break
  fi
  # Bounded steps: a moved deadline or a clock jump is noticed within a minute.
  sleep "$((remaining < MAX_STEP_S ? remaining : MAX_STEP_S))"
done

log "deadline epoch $deadline reached: powering off (shutdown terminates this instance)"
# `shutdown` through PATH, never an absolute path: the embedded default puts its stand-in first on PATH.
until shutdown -P now; do
  log "shutdown failed; retrying in ${RETRY_S}s"
  sleep "$RETRY_S"
done
