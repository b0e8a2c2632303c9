from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from orchestrator.errors import ConfigError
from orchestrator.hostkeys import generate_host_key
from orchestrator.userdata import (
    USER_DATA_MAX_BYTES,
    UserDataSpec,
    UserDataTooLargeError,
    render_user_data,
)

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
        "packages": ("git",),
    }
    fields.update(overrides)
    return UserDataSpec(**fields)


def load(user_data: str) -> dict:
    assert user_data.startswith("#cloud-config\n")
    return yaml.safe_load(user_data)


def install(user_data: str) -> dict[str, Path]:
    """Does what cloud-init's write_files does; returns the written files by name."""
    written = {}
    for entry in load(user_data)["write_files"]:
        path = Path(entry["path"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(entry["content"])
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
    assert set(files) == {
        "/var/lib/ec2-trainer/bin/bootstrap.sh",
        "/var/lib/ec2-trainer/bin/watchdog.sh",
        "/var/lib/ec2-trainer/deadline",
    }
    assert files["/var/lib/ec2-trainer/bin/bootstrap.sh"]["permissions"] == "0755"
    assert files["/var/lib/ec2-trainer/bin/watchdog.sh"]["permissions"] == "0755"
    assert files["/var/lib/ec2-trainer/deadline"]["content"].strip() == str(spec.deadline_epoch)
    assert doc["runcmd"] == [
        ["setsid", "-f", "bash", "/var/lib/ec2-trainer/bin/watchdog.sh"],
        ["bash", "/var/lib/ec2-trainer/bin/bootstrap.sh"],
    ]


def test_cloud_init_schema_accepts_the_user_data(keys, tmp_path):
    if shutil.which("cloud-init") is None:
        pytest.skip("cloud-init not installed (apt-get install -y cloud-init)")
    path = tmp_path / "user-data"
    path.write_text(render_user_data(make_spec(keys)))
    result = subprocess.run(
        ["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid" in result.stdout


def test_scripts_pass_shellcheck(keys, state_dir):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install -y shellcheck)")
    files = install(render_user_data(make_spec(keys, str(state_dir))))
    result = subprocess.run(
        ["shellcheck", str(files["bootstrap.sh"]), str(files["watchdog.sh"])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout


def test_no_secret_besides_the_host_private_key(keys):
    user_data = render_user_data(make_spec(keys))
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
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret|password|token", without_host_key, re.IGNORECASE)


def test_oversized_user_data_is_refused(keys):
    spec = make_spec(keys, packages=tuple(f"package{i}" for i in range(2000)))
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
    assert "skipped: git already installed" in log
    assert "skipped: torch and mlflow already importable" in log
    assert re.search(r"\[python\] done in \d+s", log)
    # The training job sources env.sh: its python must be the configured interpreter.
    which = subprocess.run(
        ["bash", "-c", f'. "{state_dir}/env.sh" && command -v python'], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert Path(which).parent == Path(sys.executable).parent


def fast_python(tmp_path: Path) -> str:
    """An interpreter stand-in for tests about other steps: importing torch takes seconds."""
    return str(fake_bin(tmp_path, "python-fast", 'echo "python 3 torch 2 cuda True mlflow 3"\n') / "python-fast")


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
    # A python without mlflow whose pip fails: the ERR trap names the step and the failing command.
    interpreter = fake_bin(tmp_path, "python-broken", 'case "$2" in "import torch") exit 0;; esac\nexit 3\n')
    status, log = run_bootstrap(keys, state_dir, tmp_path, fake_gpu=True, python_bin=str(interpreter / "python-broken"))
    assert status.startswith("error: python: command failed with exit code 3")
    assert "installing mlflow==3.17.2 into" in log


def test_spec_is_frozen(keys):
    spec = make_spec(keys)
    with pytest.raises(AttributeError, match="cannot assign"):
        spec.ssh_user = "x"  # type: ignore[misc]
    assert replace(spec, ssh_user="ubuntu").ssh_user == "ubuntu"
