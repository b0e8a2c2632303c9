"""The local deployment's pure parts: the admin password, the Airflow environment, the port check.

The deployment itself (services plus a real Airflow) is exercised by tests/ui/test_browser.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import socket
import stat
from pathlib import Path

import pytest

from embedded.deploy.deployment import (
    ADMIN_USER,
    EMBEDDED_AIRFLOW_SETTINGS,
    REPO,
    DeploymentError,
    LocalDeployment,
    Ports,
    admin_password,
    airflow_environment,
)


def test_admin_password_is_generated_once_then_kept_private(tmp_path: Path) -> None:
    passwords_file = tmp_path / "airflow" / "passwords.json"
    first = admin_password(passwords_file)
    assert len(first) >= 16
    assert admin_password(passwords_file) == first
    assert stat.S_IMODE(passwords_file.stat().st_mode) == 0o600
    # Airflow's SimpleAuthManager reads the same file: a JSON object of user -> password.
    assert json.loads(passwords_file.read_text()) == {ADMIN_USER: first}


def test_admin_password_keeps_other_users_of_the_file(tmp_path: Path) -> None:
    passwords_file = tmp_path / "passwords.json"
    passwords_file.write_text(json.dumps({"viewer": "v"}))
    password = admin_password(passwords_file)
    assert json.loads(passwords_file.read_text()) == {"viewer": "v", ADMIN_USER: password}


def test_airflow_environment_logs_in_keeps_its_own_database_and_tunes_only_itself(tmp_path: Path) -> None:
    stack_env = {"TRAINER__AWS__DEPLOYMENT": "embedded", "AIRFLOW_CONN_AWS_DEFAULT": "{}"}
    env = airflow_environment(stack_env, tmp_path, "feature/x")
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "False"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == f"{ADMIN_USER}:admin"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"].startswith(str(tmp_path))
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == f"sqlite:///{tmp_path / 'airflow.db'}"
    assert env["TRAINER__GITHUB__BRANCH"] == "feature/x"
    assert stack_env.items() <= env.items()
    assert EMBEDDED_AIRFLOW_SETTINGS.items() <= env.items()


def test_the_tuned_intervals_are_the_embedded_defaults_not_production() -> None:
    """Production's Airflow settings come from Airflow's defaults or docker-compose.yaml, never from this module."""
    compose = (Path(__file__).resolve().parents[2] / "docker-compose.yaml").read_text()
    for name in EMBEDDED_AIRFLOW_SETTINGS:
        assert name not in compose


def test_a_taken_port_is_refused_with_the_variable_to_change() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        free = Ports.free()
        with pytest.raises(DeploymentError, match=rf"port {port} on 127\.0\.0\.1 is taken.*MLFLOW_PORT={port + 1}"):
            Ports(airflow=free.airflow, mlflow=port, github=free.github).check_free()
    Ports.free().check_free()


def test_demo_and_ui_serve_every_ui_on_the_same_stable_ports(tmp_path: Path) -> None:
    """The Makefile gives both commands every port, Prometheus's too: a URL the demo prints still opens under
    `make ui` (before, Prometheus took a free port at each start)."""
    makefile = (REPO / "Makefile").read_text()
    defaults = dict(re.findall(r"^([A-Z]+_PORT) \?= (\d+)$", makefile, re.MULTILINE))
    port_args = re.search(r"^PORT_ARGS = ((?:.*\\\n)*.*)$", makefile, re.MULTILINE)
    assert port_args is not None
    argv = re.sub(r"\$\((\w+)\)", lambda var: defaults[var[1]], port_args[1].replace("\\\n", " ")).split()
    parser = argparse.ArgumentParser()
    Ports.add_arguments(parser)
    assert Ports.from_arguments(parser.parse_args(argv)) == Ports()
    assert {f"{port.name.upper()}_PORT" for port in dataclasses.fields(Ports)} == set(defaults)
    assert re.search(r"^demo:.*\n.*embedded\.cli\.demo .*\$\(PORT_ARGS\)$", makefile, re.MULTILINE)
    assert re.search(r"^ui up:.*\n.*embedded\.cli\.ui .*\$\(PORT_ARGS\)$", makefile, re.MULTILINE)

    port = Ports.free().prometheus
    deployment = LocalDeployment(tmp_path, ports=dataclasses.replace(Ports.free(), prometheus=port))
    try:
        assert deployment.stack.prometheus.url == f"http://127.0.0.1:{port}"
    finally:
        shutil.rmtree(deployment.stack.instance_area)


def test_a_taken_prometheus_port_is_refused_too() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DeploymentError, match=rf"port {port} .* is taken.*PROMETHEUS_PORT={port + 1}"):
            dataclasses.replace(Ports.free(), prometheus=port).check_free()
