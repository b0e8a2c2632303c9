#!/usr/bin/env bash
# Instance bootstrap, run once by cloud-init (runcmd) as root: gives the SSH login user the folders it writes, then
# checks the GPU, installs the missing packages, the pinned mlflow and the job's requirements (with uv) at once, and
# writes <state_dir>/bootstrap.status atomically: "ok", or "error: <step>: <message>" (the first failed step in the
# order gpu, packages, python). Each step's seconds go to <state_dir>/bootstrap.phases ("<step> <seconds>" lines,
# complete before the status marker; the steps that run at once overlap), which the orchestrator reads with the
# marker for the run's report. The orchestrator polls that marker over SSH as the login user and shows the tail of
# <state_dir>/bootstrap.log on error: both stay readable by that user (the state folder itself is root's, 0755).
# The placeholder values below are filled in, shell-quoted, by orchestrator.cloud.user_data.
# MODE=bake (ec2_bake_image) also warms the interpreter's caches and writes BAKED_MARKER, which a later boot of the
# image reads: when it names this bootstrap's digest, the packages, mlflow and the job's requirements are there and
# are not looked for.
set -Eeuo pipefail

MODE=@@{mode}
BOOTSTRAP_DIGEST=@@{bootstrap_digest}
BAKED_MARKER=@@{baked_marker}

STATE_DIR=@@{state_dir}
PY=@@{python_bin}
MLFLOW_REQUIREMENT=@@{mlflow_requirement}
MLFLOW_VERSION=@@{mlflow_version}
UV_REQUIREMENT=@@{uv_requirement}
JOB_REQUIREMENTS=(@@{job_requirements})
REQUIRE_GPU=@@{require_gpu}
SSH_USER=@@{ssh_user}
PACKAGES=(@@{packages})
# Where the spot watcher asks the job for a checkpoint; its folder is the login user's, so the job can remove it.
CHECKPOINT_REQUEST=@@{checkpoint_request}
# DLAMI boots hold the apt/dpkg locks for minutes (unattended upgrades): wait, but not forever.
APT_WAIT_S=900
APT_RETRY_S=10

# Made by root, as cloud-init's write_files made it: root:root 0755, readable but not writable by the login user.
mkdir -p "$STATE_DIR"
rm -f "$STATE_DIR/bootstrap.status"
touch "$STATE_DIR/bootstrap.log"
chmod 0644 "$STATE_DIR/bootstrap.log"
: >"$STATE_DIR/bootstrap.phases"
chmod 0644 "$STATE_DIR/bootstrap.phases"
exec </dev/null >>"$STATE_DIR/bootstrap.log" 2>&1

STEP=start
STEP_STARTED=$(date +%s)
BOOTSTRAP_STARTED=$STEP_STARTED
ERROR_MESSAGE=""

log() { printf '%s [%s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$STEP" "$*"; }

# Atomic: a poller sees either no marker or a complete one.
write_status() {
  local tmp
  tmp="$(mktemp "$STATE_DIR/.bootstrap.status.XXXXXX")"
  printf '%s\n' "$1" >"$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$STATE_DIR/bootstrap.status"
}

fail() {
  ERROR_MESSAGE="$*"
  log "error: $ERROR_MESSAGE"
  exit 1
}

begin() {
  STEP="$1"
  STEP_STARTED=$(date +%s)
  log "begin"
}

record_phase() { printf '%s %s\n' "$STEP" "$(($(date +%s) - STEP_STARTED))" >>"$STATE_DIR/bootstrap.phases"; }

end() {
  record_phase
  log "done in $(($(date +%s) - STEP_STARTED))s"
}

on_err() {
  local rc=$?
  if [[ -z "$ERROR_MESSAGE" ]]; then
    ERROR_MESSAGE="command failed with exit code $rc: $BASH_COMMAND (see bootstrap.log)"
  fi
}

on_exit() {
  local rc=$?
  if ((rc != 0)); then
    [[ "$STEP_RECORDED" == true ]] || record_phase
    write_status "error: $STEP: ${ERROR_MESSAGE:-exit code $rc (see bootstrap.log)}"
  fi
}

STEP_RECORDED=false
STEP_PIDS=()
STEP_NAMES=()

# A failed background step leaves its message here for wait_steps (its seconds are already recorded).
step_error_file() { printf '%s/.bootstrap.%s.error' "$STATE_DIR" "$1"; }

on_step_exit() {
  local rc=$?
  if ((rc != 0)); then
    record_phase
    printf '%s\n' "${ERROR_MESSAGE:-exit code $rc (see bootstrap.log)}" >"$(step_error_file "$STEP")"
  fi
}

# Runs one step in the background, timed and logged like the others; the ERR trap and `set -e` carry into it.
start_step() {
  rm -f "$(step_error_file "$1")"
  (
    trap on_step_exit EXIT
    begin "$1"
    "$2"
    end
  ) &
  STEP_PIDS+=("$!")
  STEP_NAMES+=("$1")
}

# Waits for every background step; fails with the first failed one in start order, whatever finished first.
wait_steps() {
  local i name failed=""
  for i in "${!STEP_PIDS[@]}"; do
    if ! wait "${STEP_PIDS[$i]}" && [[ -z "$failed" ]]; then
      failed="${STEP_NAMES[$i]}"
    fi
  done
  if [[ -n "$failed" ]]; then
    STEP="$failed"
    STEP_RECORDED=true
    ERROR_MESSAGE="$(cat "$(step_error_file "$failed")" 2>/dev/null)" || ERROR_MESSAGE=""
  fi
  for name in "${STEP_NAMES[@]}"; do
    rm -f "$(step_error_file "$name")"
  done
  if [[ -n "$failed" ]]; then
    exit 1
  fi
}

trap on_err ERR
trap on_exit EXIT

# Runs an apt-get command, retrying while another apt/dpkg process holds the locks, for at most APT_WAIT_S.
apt_retry() {
  local waited=0
  until DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$APT_RETRY_S" "$@"; do
    if ((waited >= APT_WAIT_S)); then
      fail "apt-get $* kept failing for ${APT_WAIT_S}s (apt/dpkg locks held or no package mirror): see bootstrap.log"
    fi
    log "apt-get $1 failed (locks held?); retrying in ${APT_RETRY_S}s"
    sleep "$APT_RETRY_S"
    waited=$((waited + APT_RETRY_S))
  done
}

log "bootstrap started (pid $$, mode $MODE)"
BAKED=false
if [[ "$MODE" == train ]] && grep -qx "digest $BOOTSTRAP_DIGEST" "$BAKED_MARKER" 2>/dev/null; then
  BAKED=true
  log "baked image of this bootstrap ($BOOTSTRAP_DIGEST): packages and mlflow are not looked for"
fi

begin user
if ! id "$SSH_USER" >/dev/null 2>&1; then
  fail "ssh user '$SSH_USER' does not exist on this AMI: set ssh_user to the AMI's default user (ubuntu on Ubuntu Deep Learning AMIs, ec2-user on Amazon Linux)"
fi
log "ssh user $SSH_USER exists"
# The training job runs as the login user and creates its job folders here (train's `mkdir -p jobs/<key>`).
install -d -o "$SSH_USER" -g "$(id -gn "$SSH_USER")" -m 0750 "$STATE_DIR/jobs"
log "$STATE_DIR/jobs belongs to $SSH_USER"
install -d -o "$SSH_USER" -g "$(id -gn "$SSH_USER")" -m 0750 "$(dirname "$CHECKPOINT_REQUEST")"
end

check_gpu() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    if gpus="$(nvidia-smi -L 2>&1)"; then
      log "GPUs:"
      printf '%s\n' "$gpus"
    elif [[ "$REQUIRE_GPU" == true ]]; then
      fail "nvidia-smi failed ($gpus): the NVIDIA driver is not working; use a GPU instance type and a GPU AMI (Deep Learning AMI)"
    else
      log "skipped: nvidia-smi failed and require_gpu=false ($gpus)"
    fi
  elif [[ "$REQUIRE_GPU" == true ]]; then
    fail "no NVIDIA GPU/driver: use a GPU instance type and a GPU AMI (Deep Learning AMI)"
  else
    log "skipped: no GPU (require_gpu=false)"
  fi
}

install_packages() {
  if [[ "$BAKED" == true ]]; then
    log "skipped: packages baked into the image"
    return 0
  fi
  local missing=()
  for pkg in "${PACKAGES[@]}"; do
    if command -v "$pkg" >/dev/null 2>&1; then
      log "skipped: $pkg already installed"
    else
      missing+=("$pkg")
    fi
  done
  if ((${#missing[@]} > 0)); then
    if ! command -v apt-get >/dev/null 2>&1; then
      fail "apt-get not found, cannot install ${missing[*]}: use an Ubuntu Deep Learning AMI or an AMI that has them"
    fi
    log "installing ${missing[*]}"
    apt_retry update -q
    apt_retry install -y -q --no-install-recommends "${missing[@]}"
  elif ((${#PACKAGES[@]} == 0)); then
    log "skipped: no packages requested"
  fi
}

# Cheap (nothing imported): whether torch is there, and which mlflow. The AMI may ship another mlflow (DLAMIs have an
# older 3.x): the job's client must match the pin, not merely import.
PROBE_PY='import importlib.metadata as m, importlib.util as u
try:
    mlflow = m.version("mlflow")
except m.PackageNotFoundError:
    mlflow = "none"
print(mlflow, "torch" if u.find_spec("torch") else "no-torch")'
# One interpreter start reports every version, read from the installed packages' metadata. Only where a GPU is
# required does it import torch (seconds of CPU on every boot): there, whether this torch build sees CUDA, and
# torchvision, are worth it.
VERSIONS_PY='import importlib.metadata as m, sys
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "missing"
cuda = tv = "not checked"
if sys.argv[1] == "true":
    import torch
    cuda = torch.cuda.is_available()
    try:
        import torchvision
        tv = torchvision.__version__
    except Exception as exc:
        tv = "missing (%s)" % exc
print("python", sys.version.split()[0], "torch", version("torch"), "cuda", cuda, "mlflow", version("mlflow"), "torchvision", tv)'

# Installs its arguments into $PY. uv resolves and downloads in parallel: several times faster than pip for mlflow's
# ~80 dependencies. It comes from PyPI, pinned, into the state folder (never into the job's interpreter); where it
# cannot be had, pip does the work.
install_requirements() {
  local uv
  uv="$(command -v uv)" || uv=""
  if [[ -z "$uv" ]]; then
    if "$PY" -m pip install --quiet --disable-pip-version-check --target "$STATE_DIR/tools/uv" "$UV_REQUIREMENT"; then
      uv="$STATE_DIR/tools/uv/bin/uv"
    else
      log "warning: could not install $UV_REQUIREMENT; installing with pip"
    fi
  fi
  if [[ -n "$uv" ]]; then
    if "$uv" pip install --quiet --python "$PY" "$@"; then
      return 0
    fi
    log "warning: uv could not install $* (see above); trying pip"
  fi
  "$PY" -m pip install --quiet --disable-pip-version-check "$@"
}

# Whether $PY already meets every job requirement: pip resolves them against what is installed only (a dry run, no
# index, no find-links from a pip config or the environment), so it installs nothing and reaches no network.
job_requirements_met() {
  ((${#JOB_REQUIREMENTS[@]} == 0)) ||
    env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$PY" -m pip install --quiet --disable-pip-version-check \
      --dry-run --no-index "${JOB_REQUIREMENTS[@]}" >/dev/null 2>&1
}

prepare_python() {
  local probe installed torch_found versions py_bin_dir tmp wanted
  if ! command -v "$PY" >/dev/null 2>&1; then
    fail "python interpreter $PY not found: set python_bin to the AMI's interpreter that has torch (/opt/pytorch/bin/python on the PyTorch Deep Learning AMI)"
  fi
  probe="$("$PY" -c "$PROBE_PY")"
  read -r installed torch_found <<<"$probe"
  if [[ "$torch_found" != torch ]]; then
    fail "torch is not importable by $PY: use a PyTorch Deep Learning AMI or set python_bin to an interpreter that has torch"
  fi
  if [[ "$BAKED" == true ]]; then
    log "skipped: mlflow $installed and the job's requirements baked into the image"
  else
    wanted=()
    if [[ "$installed" == "$MLFLOW_VERSION" ]]; then
      log "skipped: mlflow $installed already installed in $PY (pinned $MLFLOW_VERSION)"
    else
      wanted+=("$MLFLOW_REQUIREMENT")
    fi
    if job_requirements_met; then
      log "skipped: $PY already meets the job's requirements (${JOB_REQUIREMENTS[*]:-none})"
    else
      wanted+=("${JOB_REQUIREMENTS[@]}")
    fi
    if ((${#wanted[@]} > 0)); then
      log "installing ${wanted[*]} into $PY (found mlflow $installed, pinned $MLFLOW_VERSION)"
      install_requirements "${wanted[@]}"
      probe="$("$PY" -c "$PROBE_PY")"
      read -r installed torch_found <<<"$probe"
      if [[ "$installed" != "$MLFLOW_VERSION" ]]; then
        fail "installing $MLFLOW_REQUIREMENT finished but $PY reports mlflow $installed: check that $PY is the environment uv and pip install into (see bootstrap.log)"
      fi
      if ! job_requirements_met; then
        fail "installing the job's requirements (${JOB_REQUIREMENTS[*]}) finished but $PY does not meet them: check instance.job_requirements against the image's packages (see bootstrap.log)"
      fi
    fi
  fi
  versions="$("$PY" -c "$VERSIONS_PY" "$REQUIRE_GPU")"
  log "$versions"
  if [[ "$versions" == *"torchvision missing"* ]]; then
    log "warning: torchvision is not importable by $PY: the job decodes JPEGs on the CPU instead of the GPU (nvjpeg); use a PyTorch Deep Learning AMI or install torchvision matching torch"
  fi
  # The training job sources env.sh so that `python` and `mlflow` are this interpreter's, and to find where a
  # checkpoint is asked for.
  py_bin_dir="$(dirname "$(command -v "$PY")")"
  tmp="$(mktemp "$STATE_DIR/.env.sh.XXXXXX")"
  # shellcheck disable=SC2016 # $PATH must expand when env.sh is sourced, not now.
  printf 'export PATH=%q:"$PATH"\n' "$py_bin_dir" >"$tmp"
  printf 'export EC2_TRAINER_CHECKPOINT_REQUEST=%q\n' "$CHECKPOINT_REQUEST" >>"$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$STATE_DIR/env.sh"
  log "wrote $STATE_DIR/env.sh (PATH starts with $py_bin_dir)"
}

# Independent of each other: the driver check, apt and the Python install overlap instead of adding up.
start_step gpu check_gpu
start_step packages install_packages
start_step python prepare_python
STEP=steps
wait_steps

if [[ "$MODE" == bake ]]; then
  begin bake
  # Byte-compiled now, so a training boot imports them at once.
  "$PY" -m compileall -q "$("$PY" -c 'import mlflow, os; print(os.path.dirname(mlflow.__file__))')" || true
  tmp="$(mktemp "$STATE_DIR/.baked.XXXXXX")"
  printf 'digest %s\nmlflow %s\n' "$BOOTSTRAP_DIGEST" "$MLFLOW_VERSION" >"$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$BAKED_MARKER"
  log "wrote $BAKED_MARKER (digest $BOOTSTRAP_DIGEST, mlflow $MLFLOW_VERSION)"
  end
fi

STEP=finish
# The whole bootstrap's seconds: less than its steps' sum, some of them ran at once.
printf 'total %s\n' "$(($(date +%s) - BOOTSTRAP_STARTED))" >>"$STATE_DIR/bootstrap.phases"
write_status ok
log "bootstrap ok"
