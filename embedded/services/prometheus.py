"""Debian's Prometheus Pushgateway and Prometheus on loopback: where the embedded default's run metrics go.

The report step pushes each run's series to the Pushgateway (orchestrator.observe.metrics); Prometheus scrapes it
with config/prometheus/prometheus.yml, the file docker-compose.yaml mounts, with only the target and the interval
replaced. Both keep their data under `workdir`, so `make ui` after `make demo` still shows the demo's series.
"""

from __future__ import annotations

import base64
import logging
import subprocess
from pathlib import Path

import yaml

from embedded.process import Managed, ServiceError, free_port, start_logged, stop_process, wait_for_http

log = logging.getLogger(__name__)

PUSHGATEWAY_BIN = Path("/usr/bin/prometheus-pushgateway")
PROMETHEUS_BIN = Path("/usr/bin/prometheus")
PROMETHEUS_CONFIG = Path(__file__).resolve().parents[2] / "config" / "prometheus" / "prometheus.yml"
# Loopback scrapes cost nothing; a short interval makes a pushed run visible in Prometheus within a second or two.
SCRAPE_INTERVAL = "1s"


def _binary(path: Path, package: str) -> str:
    if not path.exists():
        raise ServiceError(f"{path} not found: install Debian's {package} package (make system-deps)")
    return str(path)


def basic_auth_header(login: tuple[str, str]) -> dict[str, str]:
    token = base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


class Pushgateway(Managed):
    """`web_config`: a Prometheus web configuration file (e.g. basic_auth_users); `login` then answers its check."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        web_config: Path | None = None,
        login: tuple[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.web_config = web_config
        self.login = login
        self.log_file = workdir / "pushgateway.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            _binary(PUSHGATEWAY_BIN, "prometheus-pushgateway"),
            f"--web.listen-address={self.address}",
            # Kept on disk (its default file is a system path): the accumulated run counts survive a restart.
            f"--persistence.file={self.workdir / 'pushgateway.data'}",
            "--persistence.interval=5s",
        ]
        if self.web_config:
            argv.append(f"--web.config.file={self.web_config}")
        self._proc = start_logged(argv, self.log_file)
        headers = basic_auth_header(self.login) if self.login else None
        wait_for_http(f"{self.url}/-/ready", timeout_s, proc=self._proc, log_file=self.log_file, headers=headers)
        log.info("Pushgateway at %s", self.url)

    def stop(self) -> None:
        stop_process(self._proc)


def prometheus_config(targets: list[str], scrape_interval: str = SCRAPE_INTERVAL) -> str:
    """config/prometheus/prometheus.yml with its Pushgateway target(s) and intervals replaced, as YAML."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["evaluation_interval"] = scrape_interval
    (job,) = (job for job in config["scrape_configs"] if job["job_name"] == "pushgateway")
    job["static_configs"] = [{"targets": targets}]
    return str(yaml.safe_dump(config, sort_keys=False))


class Prometheus(Managed):
    """Scrapes `targets` (the Pushgateway's host:port) every `scrape_interval`."""

    def __init__(
        self, workdir: Path, targets: list[str], *, port: int | None = None, scrape_interval: str = SCRAPE_INTERVAL
    ) -> None:
        self.workdir = workdir
        self.targets = targets
        self.scrape_interval = scrape_interval
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_file = workdir / "prometheus.yml"
        self.log_file = workdir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(prometheus_config(self.targets, self.scrape_interval))
        self._proc = start_logged(
            [
                _binary(PROMETHEUS_BIN, "prometheus"),
                f"--config.file={self.config_file}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            self.log_file,
        )
        wait_for_http(f"{self.url}/-/ready", timeout_s, proc=self._proc, log_file=self.log_file)
        log.info("Prometheus at %s, scraping %s every %s", self.url, ", ".join(self.targets), self.scrape_interval)

    def stop(self) -> None:
        stop_process(self._proc)
