from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from embedded.cloud.cloud_init import unit_exec_start
from embedded.cloud.imds import InstanceMetadataService
from orchestrator.cloud.hostkeys import generate_host_key
from orchestrator.cloud.user_data import (
    BAKED_MARKER,
    SSHD_PORT_DROP_IN,
    USER_DATA_MAX_BYTES,
    UserDataSpec,
    UserDataTooLargeError,
    bootstrap_digest,
    file_text,
    readable_user_data,
    render_script,
    render_user_data,
)
from orchestrator.errors import ConfigError
from orchestrator.instance.ssh import parse_phases
from tests.conftest import REPO
from tests.support.tools import require_executable

CURRENT_USER = pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture(scope="module")
def keys():
    return generate_host_key(), generate_host_key()


def make_spec(keys, state_dir: str = "/var/lib/ec2-trainer", **overrides) -> UserDataSpec:
    host, client = keys
    fields = {
        "host_key": host,
        "authorized_public_key": client.public_line + " trainer",
        "ssh_user": CURRENT_USER,
        "deadline_epoch": int(time.time()) + 3600,
        "state_dir": state_dir,
        "python_bin": sys.executable,
        "require_gpu": False,
        "packages": ("tar",),
    }
    fields.update(overrides)
    return UserDataSpec(**fields)


def load(user_data: str) -> dict:
    assert user_data.startswith("#cloud-config\n")
    return yaml.safe_load(user_data)


def install(user_data: str) -> dict[str, Path]:
    """Does what cloud-init's write_files does for the files under the state folder; returns them by name (the
    systemd unit and the sshd drop-in belong to the system: never written here)."""
    written = {}
    for entry in load(user_data)["write_files"]:
        path = Path(entry["path"])
        if path.parts[1] == "etc":
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(file_text(entry))
        path.chmod(int(entry["permissions"], 8))
        written[path.name] = path
    return written


@pytest.fixture
def state_dir(tmp_path) -> Path:
    # A space and a quote prove every value reaches the scripts shell-quoted.
    return tmp_path / "state dir's"


def test_cloud_config_has_every_key_the_instance_relies_on(keys):
    spec = make_spec(keys)
    doc = load(render_user_data(spec))
    host, client = keys
    assert doc["ssh_keys"] == {"ed25519_private": host.private_openssh, "ed25519_public": host.public_line}
    assert doc["ssh_deletekeys"] is True
    assert doc["ssh_genkeytypes"] == ["ed25519"]
    assert doc["ssh_authorized_keys"] == [client.public_line + " trainer"]
    assert doc["disable_root"] is True
    files = {f["path"]: f for f in doc["write_files"]}
    unit = "/etc/systemd/system/ec2-trainer-watchdog.service"
    watcher_unit = "/etc/systemd/system/ec2-trainer-spot-watcher.service"
    guard_unit = "/etc/systemd/system/ec2-trainer-guard.service"
    assert set(files) == {
        "/var/lib/ec2-trainer/bin/guard.sh",
        guard_unit,
        "/var/lib/ec2-trainer/bin/bootstrap.sh",
        "/var/lib/ec2-trainer/bin/watchdog.sh",
        "/var/lib/ec2-trainer/bin/spot_watcher.sh",
        "/var/lib/ec2-trainer/deadline",
        unit,
        watcher_unit,
    }
    for script in ("bootstrap.sh", "watchdog.sh", "spot_watcher.sh", "guard.sh"):
        assert files[f"/var/lib/ec2-trainer/bin/{script}"]["permissions"] == "0755"
    assert files["/var/lib/ec2-trainer/deadline"]["content"].strip() == str(spec.deadline_epoch)
    # The watchdog is not left to runcmd (the last stage, never reached when an earlier one fails): an enabled unit.
    assert doc["runcmd"] == [["bash", "/var/lib/ec2-trainer/bin/bootstrap.sh"]]
    assert unit_exec_start(files[unit]["content"]) == ["/bin/bash", "/var/lib/ec2-trainer/bin/watchdog.sh"]
    assert "WantedBy=multi-user.target" in files[unit]["content"].splitlines()
    assert unit_exec_start(files[watcher_unit]["content"]) == ["/bin/bash", "/var/lib/ec2-trainer/bin/spot_watcher.sh"]
    assert "WantedBy=multi-user.target" in files[watcher_unit]["content"].splitlines()
    assert unit_exec_start(files[guard_unit]["content"]) == ["/bin/bash", "/var/lib/ec2-trainer/bin/guard.sh"]
    # A baked image's status marker (its bake's "ok") goes before sshd starts, so no one reads it as this boot's.
    assert doc["bootcmd"][0] == ["rm", "-f", "/var/lib/ec2-trainer/bootstrap.status"]
    ((*run, shell, flag, script),) = doc["bootcmd"][1:]
    # bootcmd runs before write_files, inside cloud-init.service: the enabling is queued for after it, never awaited.
    assert run[0] == "systemd-run" and "--no-block" in run
    assert (shell, flag) == ("sh", "-c")
    assert (
        "systemctl enable --now ec2-trainer-watchdog.service ec2-trainer-spot-watcher.service "
        "ec2-trainer-guard.service" in script
    )
    # Port 22: no drop-in and no sshd restart.
    assert "ssh" not in script
    assert len(render_user_data(spec).encode()) < USER_DATA_MAX_BYTES
    for script in ("bootstrap.sh", "watchdog.sh", "spot_watcher.sh", "guard.sh"):
        entry = files[f"/var/lib/ec2-trainer/bin/{script}"]
        assert entry["encoding"] == "gz+b64" and file_text(entry).startswith("#!/usr/bin/env bash\n"), script


def test_a_non_default_ssh_port_is_applied_early(keys):
    doc = load(render_user_data(make_spec(keys, ssh_port=2222)))
    files = {f["path"]: f["content"] for f in doc["write_files"]}
    assert files[SSHD_PORT_DROP_IN] == "Port 2222\n"
    assert SSHD_PORT_DROP_IN.startswith("/etc/ssh/sshd_config.d/") and SSHD_PORT_DROP_IN.endswith(".conf")
    ((*_, script),) = doc["bootcmd"][1:]
    # After the reload that re-runs Ubuntu 24.04's ssh.socket generator; on 22.04 ssh.service reads it as it starts.
    steps = script.split("; ")
    assert steps.index("systemctl daemon-reload") < steps.index("systemctl try-restart ssh.socket ssh.service")


def test_the_units_quote_their_script_paths_for_systemd(keys):
    state = "/var/lib/odd dir's $HOME 100%"
    doc = load(render_user_data(make_spec(keys, state)))
    units = [f["content"] for f in doc["write_files"] if f["path"].endswith(".service")]
    assert [unit_exec_start(unit) for unit in units] == [
        ["/bin/bash", f"{state}/bin/watchdog.sh"],
        ["/bin/bash", f"{state}/bin/spot_watcher.sh"],
        ["/bin/bash", f"{state}/bin/guard.sh"],
    ]


@pytest.mark.parametrize("ssh_port", [22, 2222])
def test_cloud_init_schema_accepts_the_user_data(keys, tmp_path, ssh_port):
    require_executable("cloud-init", "apt-get install -y cloud-init")
    path = tmp_path / "user-data"
    path.write_text(render_user_data(make_spec(keys, ssh_port=ssh_port)))
    result = subprocess.run(
        ["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid" in result.stdout


def test_scripts_pass_shellcheck(keys, state_dir):
    require_executable("shellcheck", "apt-get install -y shellcheck")
    files = install(render_user_data(make_spec(keys, str(state_dir))))
    result = subprocess.run(
        ["shellcheck", *(str(files[name]) for name in ("bootstrap.sh", "watchdog.sh", "spot_watcher.sh", "guard.sh"))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout


def test_no_secret_besides_the_host_private_key(keys):
    # As the instance gets it: the compressed scripts too.
    user_data = readable_user_data(render_user_data(make_spec(keys)))
    host, client = keys
    assert user_data.count("PRIVATE KEY-----") == 2  # BEGIN and END of the one host key
    assert host.private_openssh.splitlines()[1] in user_data
    # The first lines of OpenSSH Ed25519 keys are a shared header; the rest is key material.
    client_material = set(client.private_openssh.splitlines()[1:-1]) - set(host.private_openssh.splitlines())
    assert client_material
    for line in client_material:
        assert line not in user_data
    without_host_key = user_data.replace(host.private_openssh.strip(), "").replace(
        "\n    ".join(host.private_openssh.strip().splitlines()), ""
    )
    assert "PRIVATE" not in without_host_key
    # The spot watcher fetches IMDSv2 session tokens at run time: only its words for them may name a token.
    imds_words = r"X-aws-ec2-metadata-token(-ttl-seconds)?|\b(fetch_)?token(_expires)?\b|TOKEN_(TTL|MARGIN)_S"
    scanned = re.sub(imds_words, "", without_host_key)
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret|password|token", scanned, re.IGNORECASE)


def test_oversized_user_data_is_refused(keys):
    # Random names: the scripts are compressed, a repeated pattern would fit.
    spec = make_spec(keys, packages=tuple(f"package-{secrets.token_hex(8)}" for _ in range(3000)))
    with pytest.raises(UserDataTooLargeError, match=f"over EC2's {USER_DATA_MAX_BYTES}-byte limit"):
        render_user_data(spec)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"authorized_public_key": "not a key"}, "not an OpenSSH public key line"),
        ({"ssh_user": "bad user"}, "not a valid Linux user name"),
        ({"state_dir": "relative/dir"}, "must be an absolute path"),
        ({"packages": ("git; rm -rf /",)}, "not valid Debian package names"),
        # Full matches: `re.match` with `$` accepted a trailing newline, which would end a user-data line early.
        ({"ssh_user": "ubuntu\n"}, "not a valid Linux user name"),
        ({"packages": ("git\n",)}, "not valid Debian package names"),
        ({"mlflow_requirement": "mlflow>=3"}, "must pin one version"),
        ({"ssh_port": 0}, "must be a TCP port"),
        ({"min_gpu_utilization": 101}, "a percentage"),
        ({"stall_minutes": -1.0}, "0 \\(off\\) or more"),
    ],
)
def test_invalid_spec_is_refused(keys, override, message):
    with pytest.raises(ConfigError, match=message):
        render_user_data(make_spec(keys, **override))


def fake_bin(tmp_path: Path, name: str, script: str) -> Path:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + script)
    path.chmod(0o755)
    return bin_dir


def test_watchdog_powers_off_at_the_deadline_not_before(keys, state_dir, tmp_path):
    record = tmp_path / "shutdown.calls"
    bin_dir = fake_bin(tmp_path, "shutdown", f'echo "$(date +%s) $*" >> "{record}"\n')
    deadline = int(time.time()) + 2
    files = install(render_user_data(make_spec(keys, str(state_dir), deadline_epoch=deadline)))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.Popen(["bash", str(files["watchdog.sh"])], env=env)
    try:
        while time.time() < deadline - 0.5:
            assert not record.exists(), "the watchdog fired before the deadline"
            time.sleep(0.1)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
    fired_at, args = record.read_text().strip().split(" ", 1)
    assert int(fired_at) >= deadline
    assert args == "-P now"
    assert "reached: powering off" in (state_dir / "watchdog.log").read_text()


def run_bootstrap(keys, state_dir: Path, tmp_path: Path, fake_gpu: bool, **overrides) -> tuple[str, str]:
    """Runs the bootstrap as cloud-init would (as whoever runs the tests); returns its status line and its log."""
    files = install(render_user_data(make_spec(keys, str(state_dir), **overrides)))
    bin_dir = fake_bin(tmp_path, "placeholder", "exit 0\n")
    if fake_gpu:
        fake_bin(tmp_path, "nvidia-smi", 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-test)"\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(files["bootstrap.sh"])], env=env, timeout=60, check=False)
    return (state_dir / "bootstrap.status").read_text().strip(), (state_dir / "bootstrap.log").read_text()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a real nvidia-smi is on PATH")
def test_bootstrap_without_gpu_fails_when_gpu_required(keys, state_dir, tmp_path):
    status, log = run_bootstrap(keys, state_dir, tmp_path, fake_gpu=False, require_gpu=True)
    assert status == ("error: gpu: no NVIDIA GPU/driver: use a GPU instance type and a GPU AMI (Deep Learning AMI)")
    assert "[gpu] begin" in log


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a real nvidia-smi is on PATH")
def test_bootstrap_without_gpu_succeeds_when_gpu_optional(keys, state_dir, tmp_path):
    status, log = run_bootstrap(keys, state_dir, tmp_path, fake_gpu=False, require_gpu=False)
    assert status == "ok", log
    assert "skipped: no GPU (require_gpu=false)" in log
    assert "skipped: tar already installed" in log
    assert "skipped: mlflow 3.17.2 already installed" in log
    assert re.search(r"\[python\] done in \d+s", log)
    # The training job sources env.sh: its python must be the configured interpreter.
    which = subprocess.run(
        ["bash", "-c", f'. "{state_dir}/env.sh" && command -v python'], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert Path(which).parent == Path(sys.executable).parent


def fake_python(
    tmp_path: Path,
    mlflow: str = "3.17.2",
    torchvision: bool = True,
    uv_installable: bool = True,
    job_requirements_met: bool = True,
) -> tuple[str, Path]:
    """An interpreter stand-in (importing torch takes seconds) with `mlflow` installed, meeting the job's requirements
    or not. Its pip "installs" uv into a --target folder (a uv stand-in), answers `--no-index` (the requirements
    check) by whether they are met, and, as its uv, "installs" what it is asked for: the mlflow version named, the
    job's requirements met by any other requirement. Returns its path and the file recording each command line of it
    and of its uv."""
    version, met, calls = tmp_path / "fake-mlflow-version", tmp_path / "fake-requirements-met", tmp_path / "fake.calls"
    version.write_text(mlflow + "\n")
    met.write_text("yes\n" if job_requirements_met else "no\n")
    tv = "0.26.0" if torchvision else "missing (No module named 'torchvision')"
    install = f"""skip=false
for a in "$@"; do
  if $skip; then skip=false; continue; fi
  case "$a" in
    --python|--target) skip=true ;;
    mlflow==*) echo "${{a#mlflow==}}" > {shlex.quote(str(version))} ;;
    -*|pip|install) ;;
    *) echo yes > {shlex.quote(str(met))} ;;
  esac
done"""
    fake_uv = f"""#!/bin/bash
echo "uv $*" >> {shlex.quote(str(calls))}
{install}
"""
    target_install = (
        f'for ((i = 1; i < $#; i++)); do j=$((i + 1)); [[ "${{!i}}" == --target ]] && target="${{!j}}"; done\n'
        f'  mkdir -p "$target/bin" && printf %s {shlex.quote(fake_uv)} > "$target/bin/uv" && chmod +x "$target/bin/uv"'
        if uv_installable
        else "exit 1"
    )
    script = f"""echo "$*" >> {shlex.quote(str(calls))}
case "$*" in
  "-m pip install "*--no-index*)
  echo "config=$PIP_CONFIG_FILE find-links=${{PIP_FIND_LINKS-unset}}" >> {shlex.quote(str(calls))}
  [[ "$(cat {shlex.quote(str(met))})" == yes ]] ;;
  "-m pip install "*--target*)
  {target_install} ;;
  "-m pip install "*)
{install} ;;
  *find_spec*) echo "$(cat {shlex.quote(str(version))}) torch" ;;
  *) echo "python 3 torch 2 cuda True mlflow $(cat {shlex.quote(str(version))}) torchvision {tv}" ;;
esac
"""
    return str(fake_bin(tmp_path, "python-fake", script) / "python-fake"), calls


def fast_python(tmp_path: Path) -> str:
    return fake_python(tmp_path)[0]


def test_bootstrap_with_gpu_logs_the_gpus(keys, state_dir, tmp_path):
    status, log = run_bootstrap(
        keys, state_dir, tmp_path, fake_gpu=True, require_gpu=True, python_bin=fast_python(tmp_path)
    )
    assert status == "ok", log
    assert "GPU 0: NVIDIA H100 80GB HBM3" in log


def test_bootstrap_reports_a_missing_interpreter(keys, state_dir, tmp_path):
    status, _ = run_bootstrap(keys, state_dir, tmp_path, fake_gpu=True, python_bin="/nonexistent/bin/python")
    assert status.startswith("error: python: python interpreter /nonexistent/bin/python not found: set python_bin")


def test_bootstrap_reports_a_missing_ssh_user(keys, state_dir, tmp_path):
    status, _ = run_bootstrap(keys, state_dir, tmp_path, fake_gpu=True, ssh_user="no_such_user_x")
    assert status.startswith("error: user: ssh user 'no_such_user_x' does not exist on this AMI")


def test_bootstrap_reports_an_unexpected_failure_with_its_step(keys, state_dir, tmp_path):
    # A python with an old mlflow whose pip fails: the ERR trap names the step and the failing command.
    script = 'case "$*" in *find_spec*) echo "3.1.0 torch";; *) exit 3;; esac\n'
    interpreter = fake_bin(tmp_path, "python-broken", script)
    status, log = run_bootstrap(keys, state_dir, tmp_path, fake_gpu=True, python_bin=str(interpreter / "python-broken"))
    assert status.startswith("error: python: command failed with exit code 3")
    assert "installing mlflow==3.17.2 into" in log


def test_bootstrap_replaces_an_older_mlflow_with_the_pinned_one(keys, state_dir, tmp_path):
    """A DLAMI ships an older mlflow 3.x: importable, but the job's client must match the server's pin. uv (pinned,
    from PyPI, into the state folder: never into the job's interpreter) installs it."""
    python, calls = fake_python(tmp_path, mlflow="3.1.0")
    status, log = run_bootstrap(keys, state_dir, tmp_path, fake_gpu=True, python_bin=python)
    assert status == "ok", log
    assert "installing mlflow==3.17.2 into" in log
    assert "(found mlflow 3.1.0, pinned 3.17.2)" in log
    lines = calls.read_text().splitlines()
    assert f"-m pip install --quiet --disable-pip-version-check --target {state_dir}/tools/uv uv==0.13.10" in lines
    assert f"uv pip install --quiet --python {python} mlflow==3.17.2" in lines
    assert not [line for line in lines if line.startswith("-m pip install") and "mlflow" in line], lines
    assert "mlflow 3.17.2" in log and "warning" not in log


def test_bootstrap_uses_the_images_own_uv(keys, state_dir, tmp_path):
    python, calls = fake_python(tmp_path, mlflow="3.1.0")
    version = shlex.quote(str(tmp_path / "fake-mlflow-version"))
    fake_bin(tmp_path, "uv", f'echo "uv $*" >> {shlex.quote(str(calls))}\necho 3.17.2 > {version}\n')
    status, log = run_bootstrap(keys, state_dir, tmp_path, fake_gpu=True, python_bin=python)
    assert status == "ok", log
    lines = calls.read_text().splitlines()
    assert f"uv pip install --quiet --python {python} mlflow==3.17.2" in lines
    assert not [line for line in lines if "pip install" in line and not line.startswith("uv ")], lines


def test_bootstrap_installs_with_pip_where_uv_cannot_be_had(keys, state_dir, tmp_path):
    python, calls = fake_python(tmp_path, mlflow="3.1.0", uv_installable=False)
    status, log = run_bootstrap(keys, state_dir, tmp_path, fake_gpu=True, python_bin=python)
    assert status == "ok", log
    assert "warning: could not install uv==0.13.10; installing with pip" in log
    assert "-m pip install --quiet --disable-pip-version-check mlflow==3.17.2" in calls.read_text().splitlines()


def test_bootstrap_falls_back_to_pip_when_uv_fails(keys, state_dir, tmp_path):
    python, calls = fake_python(tmp_path, mlflow="3.1.0")
    fake_bin(tmp_path, "uv", "echo 'error: no index' >&2\nexit 2\n")
    status, log = run_bootstrap(keys, state_dir, tmp_path, fake_gpu=True, python_bin=python)
    assert status == "ok", log
    assert "warning: uv could not install mlflow==3.17.2" in log and "error: no index" in log
    assert "-m pip install --quiet --disable-pip-version-check mlflow==3.17.2" in calls.read_text().splitlines()


def test_bootstrap_runs_the_gpu_check_and_the_python_install_at_once(keys, state_dir, tmp_path):
    """nvidia-smi answers only once the python step has probed the interpreter: one after the other, the GPU check
    would fail."""
    python, calls = fake_python(tmp_path, mlflow="3.1.0")
    fake_bin(
        tmp_path,
        "nvidia-smi",
        f"for _ in $(seq 200); do grep -q importlib {shlex.quote(str(calls))} 2>/dev/null && "
        'echo "GPU 0: NVIDIA L4" && exit 0; sleep 0.1; done; exit 1\n',
    )
    files = install(render_user_data(make_spec(keys, str(state_dir), python_bin=python, require_gpu=True)))
    env = {**os.environ, "PATH": f"{tmp_path / 'fakebin'}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(files["bootstrap.sh"])], env=env, timeout=60, check=False)
    log = (state_dir / "bootstrap.log").read_text()
    assert (state_dir / "bootstrap.status").read_text().strip() == "ok", log
    assert "GPU 0: NVIDIA L4" in log
    assert parse_phases((state_dir / "bootstrap.phases").read_text()).keys() == {
        "user",
        "gpu",
        "packages",
        "python",
        "total",
    }


def test_bootstrap_reports_the_first_failed_step_of_those_run_at_once(keys, state_dir, tmp_path):
    """No GPU and no interpreter: both steps fail; the status names the gpu step (the first in order), every step's
    seconds are recorded, and no step's error file is left behind."""
    fake_bin(tmp_path, "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2; exit 9\n")
    status, log = run_bootstrap(
        keys, state_dir, tmp_path, fake_gpu=False, require_gpu=True, python_bin="/nonexistent/bin/python"
    )
    assert status.startswith("error: gpu: nvidia-smi failed (NVIDIA-SMI has failed)"), status
    assert "[python] error: python interpreter /nonexistent/bin/python not found" in log
    assert parse_phases((state_dir / "bootstrap.phases").read_text()).keys() == {"user", "gpu", "packages", "python"}
    assert not list(state_dir.glob(".bootstrap.*.error"))


# As instance.job_requirements holds them: one with two specifiers (a comma), one with extras.
JOB_REQUIREMENTS = ("boto3>=1.40,<2", "nvidia-ml-py>=12", "moto[s3]>=5")


def test_bootstrap_installs_the_job_requirements_the_image_lacks_with_the_pinned_mlflow(keys, state_dir, tmp_path):
    python, calls = fake_python(tmp_path, mlflow="3.1.0", job_requirements_met=False)
    status, log = run_bootstrap(
        keys, state_dir, tmp_path, fake_gpu=True, python_bin=python, job_requirements=JOB_REQUIREMENTS
    )
    assert status == "ok", log
    wanted = "mlflow==3.17.2 " + " ".join(JOB_REQUIREMENTS)
    assert f"installing {wanted} into {python} (found mlflow 3.1.0, pinned 3.17.2)" in log
    lines = calls.read_text().splitlines()
    # Looked for without an index (nothing installed, no network), then installed in one uv call, then checked.
    # A dry run with no index: whatever pip's config or environment names as find-links is not read either.
    check = "-m pip install --quiet --disable-pip-version-check --dry-run --no-index " + " ".join(JOB_REQUIREMENTS)
    assert lines.count(check) == 2, lines
    assert lines.count("config=/dev/null find-links=unset") == 2, lines
    assert f"uv pip install --quiet --python {python} {wanted}" in lines


def test_bootstrap_installs_only_the_missing_job_requirements_beside_the_pinned_mlflow(keys, state_dir, tmp_path):
    python, calls = fake_python(tmp_path, job_requirements_met=False)
    status, log = run_bootstrap(
        keys, state_dir, tmp_path, fake_gpu=True, python_bin=python, job_requirements=JOB_REQUIREMENTS
    )
    assert status == "ok", log
    assert "skipped: mlflow 3.17.2 already installed" in log
    assert f"uv pip install --quiet --python {python} {' '.join(JOB_REQUIREMENTS)}" in calls.read_text().splitlines()


def test_bootstrap_installs_nothing_when_the_image_meets_the_job_requirements(keys, state_dir, tmp_path):
    python, calls = fake_python(tmp_path)
    status, log = run_bootstrap(
        keys, state_dir, tmp_path, fake_gpu=True, python_bin=python, job_requirements=JOB_REQUIREMENTS
    )
    assert status == "ok", log
    assert f"skipped: {python} already meets the job's requirements ({' '.join(JOB_REQUIREMENTS)})" in log
    assert "uv" not in calls.read_text() and not (state_dir / "tools").exists()


def test_the_default_job_requirements_are_python_env_yaml_less_the_images_and_the_pinned_ones(
    keys, state_dir, tmp_path
):
    """One list, two places: the job's python_env.yaml (what `mlflow run` would install) and the bootstrap's
    default. This test environment is the embedded instance's interpreter: it meets them with nothing to install."""
    import yaml

    from orchestrator.config.settings import load_settings

    env = yaml.safe_load((Path(__file__).resolve().parents[3] / "python_env.yaml").read_text())
    defaults = load_settings(env={"TRAINER__AWS__DEPLOYMENT": "test"}).instance.job_requirements
    images = {"torch", "torchvision", "mlflow"}
    assert list(defaults) == [d for d in env["dependencies"] if re.split(r"[<>=!~\[]", d)[0] not in images]
    status, log = run_bootstrap(keys, state_dir, tmp_path, fake_gpu=False, job_requirements=defaults)
    assert status == "ok", log
    assert f"already meets the job's requirements ({' '.join(defaults)})" in log


def test_bootstrap_fails_when_the_job_requirements_stay_unmet(keys, state_dir, tmp_path):
    """An install that ends without meeting them (a requirement the image's packages conflict with): the boot fails
    naming the setting, before any training starts."""
    python, calls = fake_python(tmp_path, job_requirements_met=False)
    fake_bin(tmp_path, "uv", f'echo "uv $*" >> {shlex.quote(str(calls))}\n')
    status, log = run_bootstrap(
        keys, state_dir, tmp_path, fake_gpu=True, python_bin=python, job_requirements=JOB_REQUIREMENTS
    )
    assert status.startswith("error: python: installing the job's requirements"), log
    assert "check instance.job_requirements" in status


def test_bootstrap_keeps_the_pinned_mlflow(keys, state_dir, tmp_path):
    python, calls = fake_python(tmp_path, mlflow="3.17.2")
    status, log = run_bootstrap(keys, state_dir, tmp_path, fake_gpu=True, python_bin=python)
    assert status == "ok", log
    assert "skipped: mlflow 3.17.2 already installed" in log
    assert "pip" not in calls.read_text() and not (state_dir / "tools").exists()


def test_bootstrap_warns_when_a_gpu_job_has_no_torchvision(keys, state_dir, tmp_path):
    python, _ = fake_python(tmp_path, torchvision=False)
    status, log = run_bootstrap(keys, state_dir, tmp_path, fake_gpu=True, require_gpu=True, python_bin=python)
    assert status == "ok", log
    assert "warning: torchvision is not importable" in log and "nvjpeg" in log


def test_bootstrap_fails_when_pip_does_not_install_the_pin(keys, state_dir, tmp_path):
    script = 'case "$*" in *find_spec*) echo "3.1.0 torch";; esac\n'  # pip "succeeds", nothing changes
    interpreter = fake_bin(tmp_path, "python-stuck", script)
    status, _ = run_bootstrap(keys, state_dir, tmp_path, fake_gpu=True, python_bin=str(interpreter / "python-stuck"))
    assert status.startswith("error: python: installing mlflow==3.17.2 finished but")


def test_bootstrap_gives_the_login_user_its_job_folder_and_readable_markers(keys, state_dir, tmp_path):
    """train creates <state_dir>/jobs/<key> over SSH as the login user; the state folder itself stays root's."""
    status, log = run_bootstrap(keys, state_dir, tmp_path, fake_gpu=True, python_bin=fast_python(tmp_path))
    assert status == "ok", log
    jobs = (state_dir / "jobs").stat()
    assert (pwd.getpwuid(jobs.st_uid).pw_name, stat.S_IMODE(jobs.st_mode)) == (CURRENT_USER, 0o750)
    assert jobs.st_gid == pwd.getpwnam(CURRENT_USER).pw_gid
    # The spot watcher's checkpoint requests land in a folder of the user's, so the job can remove them.
    signals = (state_dir / "signals").stat()
    assert (pwd.getpwuid(signals.st_uid).pw_name, stat.S_IMODE(signals.st_mode)) == (CURRENT_USER, 0o750)
    told = subprocess.run(
        ["bash", "-c", f'. "{state_dir}/env.sh" && echo "$EC2_TRAINER_CHECKPOINT_REQUEST"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert told == f"{state_dir}/signals/checkpoint-request"
    for name in ("bootstrap.status", "bootstrap.log", "bootstrap.phases", "env.sh"):
        assert stat.S_IMODE((state_dir / name).stat().st_mode) == 0o644, name
    # Each step's seconds, for the run's cost report (read with the marker by orchestrator.instance.ssh).
    phases = parse_phases((state_dir / "bootstrap.phases").read_text())
    assert phases.keys() == {"user", "gpu", "packages", "python", "total"}
    assert phases["total"] <= sum(seconds for step, seconds in phases.items() if step != "total") + 1


def test_bootstrap_records_the_failed_steps_seconds_too(keys, state_dir, tmp_path):
    status, _ = run_bootstrap(keys, state_dir, tmp_path, fake_gpu=True, ssh_user="no_such_user_x")
    assert status.startswith("error: user:")
    assert parse_phases((state_dir / "bootstrap.phases").read_text()).keys() == {"user"}


def test_spec_is_frozen(keys):
    spec = make_spec(keys)
    with pytest.raises(AttributeError, match="cannot assign"):
        spec.ssh_user = "x"  # type: ignore[misc]
    assert replace(spec, ssh_user="ubuntu").ssh_user == "ubuntu"


def test_spot_watcher_passes_each_new_notice_on_atomically(keys, state_dir, tmp_path):
    """As the unit runs it: polls IMDSv2 (at AWS's variable's address) every 5 s; nothing before a notice, then the
    notice's JSON in the job's checkpoint request and the orchestrator's marker; the interruption after a rebalance
    recommendation is passed on again."""
    imds = InstanceMetadataService("i-0123456789abcdef0")
    files = install(render_user_data(make_spec(keys, str(state_dir))))
    request, marker = state_dir / "signals" / "checkpoint-request", state_dir / "spot-notice"
    request.parent.mkdir()  # the bootstrap's
    env = {**os.environ, "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.endpoint}
    proc = subprocess.Popen(["bash", str(files["spot_watcher.sh"])], env=env)
    try:
        time.sleep(6)  # more than one poll
        assert not request.exists() and not marker.exists()

        imds.post_rebalance_recommendation()
        rebalance = wait_for_json(request, "noticeTime")
        assert wait_for_json(marker, "noticeTime") == rebalance  # written just after the request
        request.unlink()  # the job, once it has checkpointed

        imds.post_interruption_notice("terminate", time.time() + 120)
        notice = wait_for_json(request, "action")
        assert notice["action"] == "terminate" and notice["time"].endswith("Z")
        assert wait_for_json(marker, "action") == notice
        assert stat.S_IMODE(request.stat().st_mode) == 0o644
    finally:
        proc.kill()
        proc.wait()
        imds.stop()
    log = (state_dir / "spot-watcher.log").read_text()
    assert "notice passed on" in log and "no metadata token" not in log
    assert not list(state_dir.glob(".spot-watcher.*")), "no temporary file is left behind"


def wait_for_json(path: Path, key: str, timeout_s: float = 12.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and key in (found := json.loads(path.read_text())):
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {key} in {path} after {timeout_s:.0f}s")


def test_the_bootstrap_digest_is_the_same_for_every_run_and_mode(keys):
    """Per-run values (host key, deadline) and the mode leave it unchanged; a bootstrap setting changes it."""
    spec = make_spec(keys)
    later = make_spec(
        (generate_host_key(), generate_host_key()), deadline_epoch=spec.deadline_epoch + 3600, mode="bake"
    )
    assert bootstrap_digest(spec) == bootstrap_digest(later)
    assert re.fullmatch(r"[0-9a-f]{64}", bootstrap_digest(spec))
    assert bootstrap_digest(make_spec(keys, mlflow_requirement="mlflow==3.17.1")) != bootstrap_digest(spec)
    assert bootstrap_digest(make_spec(keys, python_bin="/usr/bin/python3")) != bootstrap_digest(spec)
    assert bootstrap_digest(make_spec(keys, job_requirements=("boto3>=1.40,<2",))) != bootstrap_digest(spec)
    assert f"BOOTSTRAP_DIGEST={bootstrap_digest(spec)}" in render_script("bootstrap.sh", spec)
    with pytest.raises(ConfigError, match="mode must be one of"):
        render_user_data(make_spec(keys, mode="warm"))


def test_a_bake_writes_the_marker_and_a_boot_of_its_image_skips_what_it_installed(keys, state_dir, tmp_path):
    python, calls = fake_python(tmp_path, mlflow="3.1.0", job_requirements_met=False)
    status, log = run_bootstrap(
        keys, state_dir, tmp_path, fake_gpu=True, python_bin=python, mode="bake", job_requirements=JOB_REQUIREMENTS
    )
    assert status == "ok", log
    digest = bootstrap_digest(make_spec(keys, str(state_dir), python_bin=python, job_requirements=JOB_REQUIREMENTS))
    assert (state_dir / BAKED_MARKER).read_text() == f"digest {digest}\nmlflow 3.17.2\n"
    assert f"uv pip install --quiet --python {python} mlflow==3.17.2 {' '.join(JOB_REQUIREMENTS)}" in calls.read_text()
    calls.write_text("")
    # The image's boot: same bootstrap settings, another run's keys and deadline.
    status, log = run_bootstrap(
        keys,
        state_dir,
        tmp_path,
        fake_gpu=True,
        python_bin=python,
        deadline_epoch=2**31,
        job_requirements=JOB_REQUIREMENTS,
    )
    assert status == "ok", log
    assert f"baked image of this bootstrap ({digest})" in log
    assert "skipped: mlflow 3.17.2 and the job's requirements baked into the image" in log
    assert "pip" not in calls.read_text()
    assert "[bake]" not in log.split("mode train")[-1]


def test_a_marker_of_another_bootstrap_skips_nothing(keys, state_dir, tmp_path):
    python, calls = fake_python(tmp_path, mlflow="3.1.0")
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / BAKED_MARKER).write_text(f"digest {'0' * 64}\nmlflow 3.17.2\n")
    status, log = run_bootstrap(keys, state_dir, tmp_path, fake_gpu=True, python_bin=python)
    assert status == "ok", log
    assert "baked image" not in log
    assert "installing mlflow==3.17.2 into" in log
    assert "-m pip install" in calls.read_text()


def _versions_probe() -> str:
    """The bootstrap's VERSIONS_PY, as bash hands it to the interpreter."""
    text = (REPO / "userdata" / "bootstrap.sh").read_text()
    return re.search(r"^VERSIONS_PY='(.*?)'$", text, re.S | re.M).group(1)  # type: ignore[union-attr]


@pytest.mark.parametrize("require_gpu", ["false", "true"])
def test_the_versions_probe_imports_torch_only_where_a_gpu_is_required(require_gpu):
    """Importing torch costs seconds of CPU on every boot: an instance that needs no GPU reads the versions from the
    packages' metadata; a GPU instance imports torch to say whether it sees CUDA, and checks torchvision."""
    from importlib.metadata import version
    from importlib.util import find_spec

    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", _versions_probe(), require_gpu],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    expected = f"torch {version('torch')} cuda {{}} mlflow {version('mlflow')} torchvision {{}}"
    if require_gpu == "true":
        assert "torch" in imported
        # This machine has no GPU, and torchvision only where the job's requirements brought it.
        torchvision = version("torchvision") if find_spec("torchvision") else "missing (No module named 'torchvision')"
        assert run.stdout.endswith(expected.format(False, torchvision) + "\n"), run.stdout
    else:
        assert "torch" not in imported and "mlflow" not in imported
        assert run.stdout.endswith(expected.format("not checked", "not checked") + "\n"), run.stdout
    assert run.stdout.startswith(f"python {sys.version.split()[0]} ")
