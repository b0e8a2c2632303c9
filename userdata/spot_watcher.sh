#!/usr/bin/env bash
# Spot watcher (a unit, as the watchdog): every 5 s asks IMDSv2 for a spot interruption notice, else a rebalance
# recommendation, and writes a new one to the job's checkpoint request and the orchestrator's marker (see
# orchestrator.cloud.user_data, which fills the placeholders). No `set -e`: a failed curl must never end it.
set -uo pipefail

STATE_DIR=@@{state_dir}
CHECKPOINT_REQUEST=@@{checkpoint_request}
SPOT_NOTICE=@@{spot_notice}
IMDS="${AWS_EC2_METADATA_SERVICE_ENDPOINT:-http://169.254.169.254/}"
IMDS="${IMDS%/}"
POLL_S=5
TOKEN_TTL_S=21600
# Renewed this long before it expires.
TOKEN_MARGIN_S=300
CURL=(curl --silent --max-time 2)

exec </dev/null >>"$STATE_DIR/spot-watcher.log" 2>&1

log() { printf '%s spot-watcher: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

token=""
token_expires=0
fetch_token() {
  local new
  if new="$("${CURL[@]}" --fail -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: $TOKEN_TTL_S" "$IMDS/latest/api/token")" &&
    [[ -n "$new" ]]; then
    token="$new"
    token_expires=$(($(date +%s) + TOKEN_TTL_S))
  else
    token=""
  fi
}

# Sets CODE (000: no answer) and BODY for one metadata item.
get_item() {
  local out
  out="$("${CURL[@]}" -w '\n%{http_code}' -H "X-aws-ec2-metadata-token: $token" "$IMDS/latest/meta-data/$1")" ||
    out=$'\n000'
  CODE="${out##*$'\n'}"
  BODY="${out%$'\n'*}"
}

# tmp in root's folder (the job's could swap it for a link), then mv on one filesystem: a whole file or none.
write_atomic() {
  local tmp
  tmp="$(mktemp "$STATE_DIR/.spot-watcher.XXXXXX")" || return 1
  if printf '%s\n' "$2" >"$tmp" && chmod 0644 "$tmp" && mv -fT "$tmp" "$1"; then
    return 0
  fi
  rm -f "$tmp"
  return 1
}

log "started (pid $$), metadata service $IMDS"
delivered=""
failing=false
while true; do
  if [[ -z "$token" ]] || (($(date +%s) >= token_expires - TOKEN_MARGIN_S)); then
    fetch_token
  fi
  notice=""
  if [[ -n "$token" ]]; then
    for item in spot/instance-action events/recommendations/rebalance; do
      get_item "$item"
      if [[ "$CODE" == 200 && -n "$BODY" ]]; then
        notice="$BODY"
        break
      elif [[ "$CODE" == 401 ]]; then
        token="" # expired or unknown: a new one next poll
        break
      fi
    done
  fi
  # Once per outage, not every poll.
  if [[ -z "$token" ]] && ! $failing; then
    log "no metadata token from $IMDS: retrying every ${POLL_S}s"
    failing=true
  elif [[ -n "$token" ]] && $failing; then
    log "metadata service reachable again"
    failing=false
  fi
  # Each new notice once both files are written (the bootstrap makes the request's folder: maybe not yet).
  if [[ -n "$notice" && "$notice" != "$delivered" ]]; then
    if write_atomic "$CHECKPOINT_REQUEST" "$notice" && write_atomic "$SPOT_NOTICE" "$notice"; then
      delivered="$notice"
      log "notice passed on: $notice"
    fi
  fi
  sleep "$POLL_S"
done
