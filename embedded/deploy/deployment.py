"""The embedded default as a live local deployment: its services (embedded.deploy.stack) plus a real Airflow.

`make demo` runs one DAG run on it; `make ui` keeps it up for a browser. Both use the same state folder (Airflow's
home and metadata database, MLflow's store, every log) and the same ports on 127.0.0.1, so the links a run stored
(the MLflow run, the commit's checks page) still open on the next start. The Airflow components get the stack's
connections and TRAINER__* settings, so a run triggered from the UI trains against the embedded default.

The Airflow intervals below are the embedded default's only: one person waits on one run on a laptop, where Airflow's
defaults (made for a busy shared scheduler) would add seconds between every two tasks. Production keeps Airflow's.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from embedded.deploy.airflow_local import LocalAirflow
from embedded.deploy.stack import EmbeddedStack, TrainingKnobs
from embedded.process import Managed, free_port, wait_for_http

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DAG_ID = "ec2_training"
ADMIN_USER = "admin"
PASSWORDS_FILE = "simple_auth_manager_passwords.json"

# Airflow settings of the embedded deployment only (never production's: see the module docstring).
EMBEDDED_AIRFLOW_SETTINGS = {
    # The scheduler sleeps this long when a loop found nothing to do (default 1 s): the lag between two tasks.
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
    # The dag-processor looks for new or changed DAG files this often (default 300 s) and re-parses one at most this
    # often (default 30 s): an edited DAG shows up while `make ui` runs.
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
    # The UI's grid and task states refresh this often (default 3 s).
    "AIRFLOW__API__AUTO_REFRESH_INTERVAL": "1",
    # FACTS.md: MLflow's telemetry thread can raise in a task; nothing here should phone out anyway.
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


class DeploymentError(RuntimeError):
    """The deployment cannot start as asked; the message says what to change."""


@dataclass(frozen=True)
class Ports:
    """The ports a browser opens: stable (documented in the README, overridable with make's variables) or free ones."""

    airflow: int = 8080
    mlflow: int = 5000
    github: int = 8070
    prometheus: int = 9090

    @classmethod
    def free(cls) -> Ports:
        return cls(airflow=free_port(), mlflow=free_port(), github=free_port(), prometheus=free_port())

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """`--<name>-port` for each port, defaulting to the stable one: `make demo` and `make ui` take the same."""
        for port in fields(cls):
            parser.add_argument(f"--{port.name}-port", type=int, default=port.default)

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> Ports:
        return cls(**{port.name: getattr(args, f"{port.name}_port") for port in fields(cls)})

    def check_free(self, *, services: bool = True) -> None:
        """Fail before starting anything when a port is taken (another `make ui`, or an unrelated server); only
        Airflow's when `services` is False (they already run)."""
        ports = [("AIRFLOW_PORT", self.airflow)]
        if services:
            ports += [("MLFLOW_PORT", self.mlflow), ("GITHUB_PORT", self.github), ("PROMETHEUS_PORT", self.prometheus)]
        for name, port in ports:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                # As the servers bind: connections of a previous run lingering in TIME_WAIT do not hold the port.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    raise DeploymentError(
                        f"port {port} on 127.0.0.1 is taken (is `make ui` already running?): stop what uses it, "
                        f"or pick another, e.g. make ui {name}={port + 1}"
                    ) from None


def admin_password(passwords_file: Path) -> str:
    """The admin's password in SimpleAuthManager's passwords file: generated on first use, then kept (mode 0600)."""
    passwords: dict[str, str] = {}
    if passwords_file.exists():
        passwords = json.loads(passwords_file.read_text() or "{}")
    if ADMIN_USER not in passwords:
        passwords[ADMIN_USER] = secrets.token_urlsafe(12)
        passwords_file.parent.mkdir(parents=True, exist_ok=True)
        passwords_file.touch(mode=0o600)
        passwords_file.chmod(0o600)
        passwords_file.write_text(json.dumps(passwords) + "\n")
    return passwords[ADMIN_USER]


def airflow_environment(stack_env: dict[str, str], home: Path, branch: str) -> dict[str, str]:
    """What the Airflow components get: the stack's connections and settings, a metadata database in `home` (never
    one inherited from the caller's environment), one admin with a password, the embedded intervals, and the
    checkout's branch as the ref an empty `git_ref` trains."""
    return {
        **stack_env,
        **EMBEDDED_AIRFLOW_SETTINGS,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / PASSWORDS_FILE),
        "TRAINER__GITHUB__BRANCH": branch,
        # Task logs wrapped by default, as docker-compose.yaml has them: an error's sentence is long, never cut.
        "AIRFLOW__API__DEFAULT_WRAP": "true",
    }


def current_branch(repo: Path = REPO) -> str:
    """The checkout's branch (its sha when detached): what the GitHub stand-in resolves and serves."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()

    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    return git("rev-parse", "HEAD") if branch == "HEAD" else branch


def uncommitted_changes(repo: Path = REPO) -> bool:
    out = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=False)
    return bool(out.stdout.strip())


class LocalDeployment(Managed):
    """`with LocalDeployment(state_root, ports=...) as deployment:` the services, then Airflow with the DAG unpaused."""

    def __init__(
        self,
        state_root: Path,
        *,
        ports: Ports,
        knobs: TrainingKnobs | None = None,
        repo_dir: Path = REPO,
        parallelism: int = 4,
        stack: EmbeddedStack | None = None,
    ) -> None:
        """`stack`: services already running (a test process's own: one per process), used and left running; then
        only `ports.airflow` is this deployment's."""
        self.state_root = state_root.resolve()
        self.ports = ports
        self.repo_dir = repo_dir
        self.branch = current_branch(repo_dir)
        self.home = self.state_root / "airflow"
        self.passwords_file = self.home / PASSWORDS_FILE
        self._owns_stack = stack is None
        self.stack = stack or EmbeddedStack(
            self.state_root / "services",
            repo_dir,
            knobs=knobs,
            mlflow_port=ports.mlflow,
            github_port=ports.github,
            prometheus_port=ports.prometheus,
        )
        self.parallelism = parallelism
        self._airflow: LocalAirflow | None = None

    @property
    def airflow(self) -> LocalAirflow:
        if self._airflow is None:
            raise DeploymentError("the deployment is not started")
        return self._airflow

    @property
    def password(self) -> str:
        return admin_password(self.passwords_file)

    def start(self) -> None:
        self.ports.check_free(services=self._owns_stack)
        if self._owns_stack:
            self.stack.start()
        env = airflow_environment(self.stack.environment(), self.home, self.branch)
        self._airflow = LocalAirflow(
            self.home,
            env,
            parallelism=self.parallelism,
            port=self.ports.airflow,
            login=(ADMIN_USER, self.password),
        )
        started = datetime.now(UTC)
        self._airflow.start()
        # The api-server builds its task execution API on that API's first request (3 to 10 s measured here),
        # during which every request waits. Pay it now rather than in the first task of the first run.
        wait_for_http(f"{self._airflow.url}/execution/health", 120, log_file=self._airflow.log_file("api-server"))
        self._airflow.wait_for_dag(DAG_ID)
        self._wait_for_parse_since(started)

    def _wait_for_parse_since(self, moment: datetime, timeout_s: float = 120) -> None:
        """A restarted deployment's database already knows the DAG: wait until this start parsed the file, so a run
        triggered now uses the DAG as it is on disk, not as it was."""

        def parsed_since() -> bool:
            parsed = self.airflow.dag(DAG_ID).get("last_parsed_time")
            return parsed is not None and datetime.fromisoformat(parsed) >= moment

        deadline = time.monotonic() + timeout_s
        while not parsed_since():
            if time.monotonic() > deadline:
                raise DeploymentError(f"{DAG_ID} not parsed again within {timeout_s:.0f}s; see the dag-processor's log")
            time.sleep(0.5)

    def stop(self) -> None:
        # Side by side: the api-server and the MLflow server each take up to 10 s to go, one after the other 20 s.
        with ThreadPoolExecutor(max_workers=2) as pool:
            stopping = [pool.submit(self.stack.stop)] if self._owns_stack else []
            if self._airflow is not None:
                stopping.append(pool.submit(self._airflow.stop))
        for done in stopping:
            done.result()

    def urls(self) -> dict[str, str]:
        from orchestrator.ci.github_protocol import commit_checks_url

        head = subprocess.run(
            ["git", "rev-parse", self.branch], cwd=self.repo_dir, capture_output=True, text=True, check=True
        ).stdout.strip()
        return {
            "Airflow": self.airflow.url,
            "MLflow": self.stack.mlflow.url,
            "GitHub stand-in": commit_checks_url(self.stack.github.url, self.stack.github.repo, head),
            "Prometheus": self.stack.prometheus.url,
        }


def log_to_file(path: Path) -> None:
    """This process's own log (the services' and Airflow's go to their files): a file, so the terminal stays short."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[logging.FileHandler(path)],
        force=True,
    )
