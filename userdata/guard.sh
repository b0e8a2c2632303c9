#!/usr/bin/env bash
# Stall, GPU-idle and cost guard (a unit, as the watchdog): watches the running training job and, on a breach, writes
# the reason for the orchestrator (GUARD_REASON, root's, readable), stops the job's process group and powers the
# instance off (shutdown terminates it). It needs no orchestrator: it holds while Airflow is down.
# - stall: the job's output.log (every log line and epoch line) unchanged for STALL_S (0: off);
# - GPU idle: every GPU under GPU_MIN_UTIL percent (nvidia-smi) for GPU_IDLE_S (0: off; no nvidia-smi: skipped);
# - cost: the epoch in the job's cost-deadline file (line 1; line 2 is the reason to report), written by the
#   orchestrator as it starts the job: when the run's cost would pass training.max_cost_usd. The job's user owns that
#   folder, so the guard keeps the earliest deadline it has read for the job: moving or rewriting the file later
#   never lifts the cap. Once it holds one, it names the job's folder in GUARD_COST_HELD (root's): the job waits for
#   that before its command runs, so no job can remove the file before the guard has read it.
# The placeholders are filled in, shell-quoted, by orchestrator.cloud.user_data. No `set -e`: it must never end early.
set -uo pipefail

STATE_DIR=@@{state_dir}
GUARD_REASON=@@{guard_reason}
GUARD_COST_HELD=@@{guard_cost_held}
STALL_S=@@{stall_s}
GPU_MIN_UTIL=@@{gpu_min_util}
GPU_IDLE_S=@@{gpu_idle_s}
# The tests shorten these; the unit never sets them.
POLL_S="${EC2_TRAINER_GUARD_POLL_S:-5}"
# After SIGTERM, before SIGKILL; then before the power-off, so a following orchestrator reads the reason first.
KILL_GRACE_S=10
POWEROFF_GRACE_S="${EC2_TRAINER_GUARD_POWEROFF_GRACE_S:-30}"
RETRY_S=30

exec </dev/null >>"$STATE_DIR/guard.log" 2>&1

log() { printf '%s guard: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

# True while a non-zombie process of group $1 exists (zombies would fool `kill -0`).
group_alive() {
  ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {f = 1} END {exit !f}'
}

# The job folder of the running job (a pid, no exit code, its group alive), if any.
running_job() {
  local dir pg
  for dir in "$STATE_DIR"/jobs/*/; do
    dir="${dir%/}"
    [[ -s "$dir/pid" && ! -e "$dir/exit_code" ]] || continue
    pg="$(cat "$dir/pid" 2>/dev/null)" || continue
    if [[ "$pg" =~ ^[0-9]+$ ]] && group_alive "$pg"; then
      echo "$dir"
      return 0
    fi
  done
  return 1
}

mtime() { stat -c %Y "$1" 2>/dev/null || echo 0; }

# tmp in root's folder, then mv on one filesystem: a whole file or none.
write_atomic() {
  local tmp
  tmp="$(mktemp "$STATE_DIR/.guard.XXXXXX")" || return 1
  if printf '%s\n' "$2" >"$tmp" && chmod 0644 "$tmp" && mv -fT "$tmp" "$1"; then
    return 0
  fi
  rm -f "$tmp"
  return 1
}

# Every GPU's utilisation under GPU_MIN_UTIL: 0 idle, 1 busy, 2 unknown (nvidia-smi failed).
gpus_idle() {
  local out value busy=false
  out="$(nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits 2>/dev/null)" || return 2
  [[ -n "$out" ]] || return 2
  while read -r value; do
    value="${value//[^0-9]/}"
    [[ -n "$value" ]] || return 2
    ((value >= GPU_MIN_UTIL)) && busy=true
  done <<<"$out"
  $busy && return 1
  return 0
}

# Seconds as minutes with two decimals (bash has no floats).
minutes() { awk -v s="$1" 'BEGIN {printf "%.2f", s / 60}'; }

# $1 the job folder; the rest: the reason, in words.
breach() {
  local job="$1" reason="${*:2}" pg
  until write_atomic "$GUARD_REASON" "$reason"; do
    log "cannot write $GUARD_REASON; retrying"
    sleep 1
  done
  log "$reason: stopping the job in $job, then powering off"
  # Into the job's own log too: train streams it into the task log.
  printf 'guard: %s: the job is stopped and the instance powered off\n' "$reason" >>"$job/output.log"
  pg="$(cat "$job/pid")"
  kill -TERM -- "-$pg" 2>/dev/null
  # As systemd does: a stopped (hung) process only acts on SIGTERM once continued.
  kill -CONT -- "-$pg" 2>/dev/null
  for _ in $(seq $((KILL_GRACE_S * 5))); do
    group_alive "$pg" || break
    sleep 0.2
  done
  if group_alive "$pg"; then
    kill -KILL -- "-$pg" 2>/dev/null
  fi
  sleep "$POWEROFF_GRACE_S"
  log "powering off (shutdown terminates this instance)"
  # `shutdown` through PATH, never an absolute path: the embedded default puts its stand-in first on PATH.
  until shutdown -P now; do
    log "shutdown failed; retrying in ${RETRY_S}s"
    sleep "$RETRY_S"
  done
  exit 0
}

gpu_guard=false
if ((GPU_MIN_UTIL > 0 && GPU_IDLE_S > 0)); then
  if command -v nvidia-smi >/dev/null; then
    gpu_guard=true
  else
    log "no nvidia-smi on this instance: the GPU idle guard is skipped"
  fi
fi
log "started (pid $$): stall after ${STALL_S}s, GPU idle under ${GPU_MIN_UTIL}% for ${GPU_IDLE_S}s" \
  "($($gpu_guard && echo on || echo off)), cost deadline from the job's cost-deadline file"
watched=""
idle_since=0
cost_deadline=0
cost_reason=""
held_for=""
gpu_unknown_logged=false
while true; do
  now="$(date +%s)"
  step="$POLL_S"
  if job="$(running_job)"; then
    if [[ "$job" != "$watched" ]]; then
      log "watching the job in $job"
      watched="$job"
      idle_since=0
      cost_deadline=0
      cost_reason=""
    fi
    if ((STALL_S > 0)); then
      last="$(mtime "$job/output.log")"
      started="$(mtime "$job/pid")"
      ((started > last)) && last="$started"
      if ((now - last >= STALL_S)); then
        breach "$job" "stalled: no log line or epoch for $(minutes $((now - last))) min (training.stall_minutes)"
      fi
    fi
    if $gpu_guard; then
      gpus_idle
      case $? in
        0)
          ((idle_since > 0)) || idle_since="$now"
          if ((now - idle_since >= GPU_IDLE_S)); then
            breach "$job" "GPU utilisation under ${GPU_MIN_UTIL}% for $(minutes $((now - idle_since))) min" \
              "(training.min_gpu_utilization, training.gpu_idle_minutes)"
          fi
          ;;
        1) idle_since=0 ;;
        *)
          if ! $gpu_unknown_logged; then
            log "nvidia-smi gave no utilisation: the GPU idle guard waits for one"
            gpu_unknown_logged=true
          fi
          ;;
      esac
    fi
    deadline="$(sed -n 1p "$job/cost-deadline" 2>/dev/null)"
    deadline="${deadline//[[:space:]]/}"
    if [[ "$deadline" =~ ^[0-9]+$ ]] && ((cost_deadline == 0 || deadline < cost_deadline)); then
      log "cost deadline $deadline ($((deadline - now)) s from now)"
      cost_deadline="$deadline"
      cost_reason="$(sed -n 2p "$job/cost-deadline" 2>/dev/null)"
    fi
    if ((cost_deadline > 0)); then
      if [[ "$held_for" != "$job" ]] && write_atomic "$GUARD_COST_HELD" "$job"; then
        held_for="$job"
      fi
      if ((now >= cost_deadline)); then
        breach "$job" "${cost_reason:-cost cap: the cost of the run would pass training.max_cost_usd}"
      fi
      # Wakes at the deadline itself: stopped within one poll of it.
      ((cost_deadline - now < step)) && step=$((cost_deadline - now))
    fi
  fi
  sleep "$step"
done
