"""A real Airflow deployment on this machine: api-server, scheduler (LocalExecutor), dag-processor and triggerer.

`dag.test()` runs one DAG run at a time in one process; this runs them the way production does, several at once,
each task in its own supervised process, pools and retries enforced by the scheduler. It serves the load test and
the test that kills a task's process, and `make ui`-style exploration. Everything listens on 127.0.0.1.

As a supervisor (systemd, compose's `restart: always`) would, it starts again the api-server, scheduler,
dag-processor or triggerer when one dies, after a back-off; one that keeps dying as soon as it starts is given up,
and waiting on a run then fails naming it. On SQLite it raises the busy timeout: a lock held for seconds (a backup,
a long write) delays the components instead of ending them on "database is locked".

With `workers=N` and the CeleryExecutor in `env` (embedded.deploy.production.celery_environment: PostgreSQL, Redis), it
also runs N Celery workers, each named and killable as a whole process tree: the production topology (tests/deploy).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from embedded.deploy.preload import LOCAL_SETTINGS, LOCAL_SETTINGS_SOURCE
from embedded.deploy.production import deployment_settings
from embedded.process import Managed, free_port, start_logged, stop_process, wait_for_http

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
COMPONENTS = ("scheduler", "dag-processor", "triggerer")
SUPERVISED = ("api-server", *COMPONENTS)
# A dead component is started again after RESTART_BACKOFF_S, doubled for each death in a row that came within
# FAST_DEATH_S of its start (at most MAX_RESTART_DELAY_S); after MAX_FAST_DEATHS such deaths it is given up.
RESTART_BACKOFF_S = 1.0
MAX_RESTART_DELAY_S = 30.0
FAST_DEATH_S = 30.0
MAX_FAST_DEATHS = 5
SUPERVISE_INTERVAL_S = 0.5
# The execution-API retries of the production deployment (config/deployment.env), the same here.
EXECUTION_API_RETRIES = "AIRFLOW__WORKERS__EXECUTION_API_RETRIES"
# [database] sql_alchemy_connect_args(_async) of a SQLite metadata database: how long a statement waits for another
# connection's lock (Python's default, 5 s, ended the scheduler under a 16 s lock). Airflow imports it by path.
SQLITE_CONNECT_ARGS: dict[str, Any] = {"timeout": 60}
FINISHED = frozenset({"success", "failed"})
# Each Celery worker's name, in its environment: the task hostname it reports (worker_hostname).
WORKER_NAME_VAR = "EC2_TRAINER_WORKER_NAME"


def worker_hostname() -> str:
    """`[core] hostname_callable` of the harness's workers: on one machine every worker would report the same host
    name, so each reports the name the harness gave it (a task instance's `hostname` tells which worker ran it)."""
    return os.environ.get(WORKER_NAME_VAR) or socket.getfqdn()


class AirflowError(RuntimeError):
    """The local Airflow did not start or answered unexpectedly; the message names the log to read."""


class LocalAirflow(Managed):
    """Start with `with LocalAirflow(home, env) as airflow:`; `env` carries the connections and TRAINER__ settings.

    `env` is applied last: an AIRFLOW__ variable in it overrides this class's default for that setting (the executor,
    the metadata database, intervals). `port` None picks a free one. `workers` Celery workers (named worker-1, ...)
    run `worker_concurrency` tasks each; they need the CeleryExecutor and its broker in `env`. `login` (user,
    password): the harness signs in as that user, for a deployment whose `env` turns the all-admins default off.
    """

    def __init__(
        self,
        home: Path,
        env: Mapping[str, str],
        *,
        parallelism: int = 8,
        port: int | None = None,
        workers: int = 0,
        worker_concurrency: int = 4,
        login: tuple[str, str] | None = None,
    ) -> None:
        self.home = home.resolve()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            # A throwaway deployment on loopback: every caller is admin, so the harness needs no login.
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            # Links to the UI (notifications, run reports, Airflow's own log links) on the host it is served from:
            # Airflow's fallback, localhost, is another origin than 127.0.0.1, where the login does not carry over.
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__WORKERS": "1",
            # The triggerer imports the CI gate's trigger by its class path, as in production; Airflow imports
            # SQLITE_CONNECT_ARGS and the workers' hostname callable from this package.
            "PYTHONPATH": f"{REPO / 'dags'}:{REPO}",
            EXECUTION_API_RETRIES: deployment_settings()[EXECUTION_API_RETRIES],
            **env,
        }
        if self.env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "sqlite").startswith("sqlite"):
            for key in (
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC",
            ):
                self.env.setdefault(key, f"{__name__}.SQLITE_CONNECT_ARGS")
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._token = ""
        self.workers = [f"worker-{n}" for n in range(1, workers + 1)]
        self.worker_concurrency = worker_concurrency
        # Applied over `env` in the workers only; restart_workers() changes it.
        self.worker_env: dict[str, str] = {}
        # Where each worker's current start begins in its log (a restart appends to it).
        self._worker_log_offsets: dict[str, int] = {}
        self._login = login
        # The supervisor's state, guarded by _lock: components stopped on purpose, given up, and each one's start
        # time, deaths in a row soon after starting, and when a dead one is due to start again.
        self._lock = threading.Lock()
        self._held: set[str] = set()
        self.given_up: dict[str, str] = {}
        self._started_at: dict[str, float] = {}
        self._fast_deaths: dict[str, int] = {}
        self._restart_at: dict[str, float] = {}
        self._stopping = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="airflow-supervisor", daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        (self.home / "config").mkdir(parents=True, exist_ok=True)
        (self.home / "config" / LOCAL_SETTINGS).write_text(LOCAL_SETTINGS_SOURCE)
        self._cli("db", "migrate")
        self._cli("pools", "import", str(REPO / "config" / "pools.json"))
        for name in SUPERVISED:
            self._start_component(name)
        self._supervisor.start()
        wait_for_http(
            f"{self.url}/api/v2/monitor/health",
            timeout_s=120,
            proc=self._procs["api-server"],
            log_file=self.log_file("api-server"),
        )
        if self._login:
            user, password = self._login
            body = {"username": user, "password": password}
            self._token = self._request("POST", "/auth/token", body, authorized=False)["access_token"]
        else:
            self._token = self._request("GET", "/auth/token", authorized=False)["access_token"]
        for name in self.workers:
            self._start_worker(name)
        for name in self.workers:
            self._wait_worker_ready(name)
        log.info("Airflow at %s (AIRFLOW_HOME %s)", self.url, self.home)

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor.is_alive():
            self._supervisor.join(timeout=30)
        for name in (*self.workers, *COMPONENTS, "api-server"):
            stop_process(self._procs.pop(name, None), timeout_s=20)

    def log_file(self, component: str) -> Path:
        return self.home / "components" / f"{component}.log"

    def component_pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self._procs.items() if proc.poll() is None}

    def restart_component(self, name: str) -> int:
        """Stop a component as a deployment's restart does (SIGTERM to its process group, waited for) and start
        another in its place, logging to `<name>-restarted.log`. Returns the stopped one's PID."""
        with self.component_down(name, log_name=f"{name}-restarted") as pid:
            return pid

    @contextlib.contextmanager
    def component_down(self, name: str, *, log_name: str | None = None) -> Iterator[int]:
        """Stop a supervised component (as restart_component does) and keep it down, unrestarted by the supervisor,
        until the block ends; then start it again (logging to `log_name`, its own log by default). Yields the stopped
        one's PID."""
        with self._lock:
            self._held.add(name)
            proc = self._procs.pop(name)
        try:
            stop_process(proc, timeout_s=60)
            yield proc.pid
        finally:
            with self._lock:
                self._start_component(name, log_name)
                self._held.discard(name)

    def _command(self, name: str) -> list[str]:
        if name == "api-server":
            return ["airflow", "api-server", "--host", "127.0.0.1", "--port", str(self.port)]
        return ["airflow", name]

    def _start_component(self, name: str, log_name: str | None = None) -> None:
        self._procs[name] = start_logged(self._command(name), self.log_file(log_name or name), env=self.env)
        self._started_at[name] = time.monotonic()
        self._restart_at.pop(name, None)

    def _supervise(self) -> None:
        """Until stop(): start again, after a back-off, each supervised component that died (not one held down)."""
        while not self._stopping.wait(SUPERVISE_INTERVAL_S):
            with self._lock:
                for name in [n for n in SUPERVISED if n in self._procs and n not in self._held | set(self.given_up)]:
                    self._look_after(name, self._procs[name])

    def _look_after(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        now = time.monotonic()
        if proc.poll() is None:
            return
        if name not in self._restart_at:
            ran_s = now - self._started_at[name]
            deaths = self._fast_deaths.get(name, 0) + 1 if ran_s < FAST_DEATH_S else 0
            self._fast_deaths[name] = deaths
            if deaths >= MAX_FAST_DEATHS:
                self.given_up[name] = (
                    f"{name} exited {deaths} times in a row within {FAST_DEATH_S:.0f}s of starting (last exit code "
                    f"{proc.returncode}): given up; see {self.log_file(name)}"
                )
                log.error("%s", self.given_up[name])
                return
            delay = min(RESTART_BACKOFF_S * 2**deaths, MAX_RESTART_DELAY_S)
            self._restart_at[name] = now + delay
            log.warning(
                "%s exited with code %s after %.0fs; starting it again in %.0fs", name, proc.returncode, ran_s, delay
            )
        if now >= self._restart_at[name]:
            del self._restart_at[name]
            self._start_component(name)
            log.warning("%s started again (pid %d)", name, self._procs[name].pid)

    def _raise_if_a_component_was_given_up(self) -> None:
        """A run waited for cannot end without the scheduler or, once deferred, the triggerer: once the supervisor
        gave one up, say so at once."""
        with self._lock:
            if self.given_up:
                raise AirflowError("; ".join(self.given_up.values()))

    # ---- Celery workers --------------------------------------------------------------------------------------------

    def _start_worker(self, name: str) -> None:
        env = {
            **self.env,
            **self.worker_env,
            WORKER_NAME_VAR: name,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": f"{__name__}.worker_hostname",
        }
        log_file = self.log_file(name)
        self._worker_log_offsets[name] = log_file.stat().st_size if log_file.exists() else 0
        self._procs[name] = start_logged(
            [
                "airflow",
                "celery",
                "worker",
                "--celery-hostname",
                name,
                "--concurrency",
                str(self.worker_concurrency),
                "--pid",
                str(self.home / f"{name}.pid"),
                # Task logs are files in the one AIRFLOW_HOME every component shares: no log server needed.
                "--skip-serve-logs",
            ],
            log_file,
            env=env,
        )

    def _wait_worker_ready(self, name: str, timeout_s: float = 180) -> None:
        """Until the worker consumes from the broker (Celery logs `<nodename> ready.`)."""
        deadline = time.monotonic() + timeout_s
        proc, log_file = self._procs[name], self.log_file(name)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AirflowError(f"{name} exited with code {proc.returncode}; see {log_file}")
            if " ready." in self.worker_log(name):
                return
            time.sleep(0.5)
        raise AirflowError(f"{name} not ready within {timeout_s:.0f}s; see {log_file}")

    def worker_log(self, name: str) -> str:
        """What the worker logged since its last start."""
        with self.log_file(name).open("rb") as out:
            out.seek(self._worker_log_offsets[name])
            return out.read().decode(errors="replace")

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL the worker's whole process tree (Celery's pool, task supervisors, task processes): no task of it
        gets to clean up, as when its machine dies. Returns the PIDs killed."""
        import psutil

        proc = self._procs.pop(name)
        tree = [proc.pid, *(child.pid for child in psutil.Process(proc.pid).children(recursive=True))]
        # The group first, at once (nothing forks in between), then any process that left it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while alive := [pid for pid in tree if _running(pid)]:
            if time.monotonic() > deadline:
                raise AirflowError(f"{name}: processes {alive} survived SIGKILL")
            time.sleep(0.2)
        return tree

    def restart_workers(self, env: Mapping[str, str] | None = None) -> None:
        """Stop every worker (a killed one too), apply `env` over their environment, start them, wait until ready."""
        self.worker_env.update(env or {})
        for name in self.workers:
            stop_process(self._procs.pop(name, None), timeout_s=60)
        for name in self.workers:
            self._start_worker(name)
        for name in self.workers:
            self._wait_worker_ready(name)

    # ---- the REST API ----------------------------------------------------------------------------------------------

    def wait_for_dag(self, dag_id: str, timeout_s: float = 120) -> None:
        """Until the dag-processor has parsed the DAG; then unpause it."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._request("GET", f"/api/v2/dags/{dag_id}")
                break
            except AirflowError:
                if time.monotonic() > deadline:
                    raise AirflowError(
                        f"DAG {dag_id} not parsed within {timeout_s:.0f}s; see {self.log_file('dag-processor')}"
                    ) from None
                time.sleep(1)
        self._request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def trigger(self, dag_id: str, run_id: str, conf: Mapping[str, Any]) -> None:
        self._request(
            "POST", f"/api/v2/dags/{dag_id}/dagRuns", {"dag_run_id": run_id, "logical_date": None, "conf": conf}
        )

    def mark_run(self, dag_id: str, run_id: str, state: str) -> None:
        """What a user's "Mark run as failed" (or success) in the UI sends."""
        self._request("PATCH", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}", {"state": state})

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")

    def dag(self, dag_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/v2/dags/{dag_id}")

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        """Every run of the DAG, however it was triggered (the REST API, the UI's form), oldest first."""
        return list(self._request("GET", f"/api/v2/dags/{dag_id}/dagRuns?order_by=run_after&limit=100")["dag_runs"])

    def wait_for_runs(self, dag_id: str, run_ids: list[str], timeout_s: float) -> dict[str, str]:
        """Each run's final state; raises once timeout_s passes with any run unfinished."""
        deadline = time.monotonic() + timeout_s
        states: dict[str, str] = {}
        while True:
            for run_id in run_ids:
                if states.get(run_id) not in FINISHED:
                    try:
                        states[run_id] = str(self.dag_run(dag_id, run_id)["state"])
                    except (TimeoutError, urllib.error.URLError) as exc:
                        # A busy machine can hold one answer past the request's timeout: look again, within the bound.
                        log.warning("Reading run %s of %s failed (%s); looking again", run_id, dag_id, exc)
            if all(states.get(run_id) in FINISHED for run_id in run_ids):
                return states
            self._raise_if_a_component_was_given_up()
            if time.monotonic() > deadline:
                raise AirflowError(f"runs not finished after {timeout_s:.0f}s: {states}")
            time.sleep(1)

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
        found = self._request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        return {ti["task_id"]: ti for ti in found["task_instances"]}

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}?deserialize=true"
        return self._request("GET", path)["value"]

    def task_log(self, dag_id: str, run_id: str, task_id: str = "*") -> str:
        """Every try's log file of the task (of every task by default), concatenated."""
        folder = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
        return "".join(path.read_text(errors="replace") for path in sorted(folder.glob(f"task_id={task_id}/*.log")))

    def stored_outputs(self, dag_id: str, run_id: str) -> str:
        """Every XCom value and rendered template field the run left in Airflow, as JSON text."""
        base = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
        entries = self._request("GET", f"{base}/~/xcomEntries?limit=1000")["xcom_entries"]
        xcoms = [
            self._request("GET", f"{base}/{e['task_id']}/xcomEntries/{e['key']}?deserialize=true")["value"]
            for e in entries
        ]
        rendered = [ti.get("rendered_fields") for ti in self.task_instances(dag_id, run_id).values()]
        if not xcoms or not any(rendered):
            raise AirflowError(f"run {run_id} stored no XCom or rendered field: a scan of them would prove nothing")
        return json.dumps([xcoms, rendered], default=str)

    def _request(self, method: str, path: str, body: Any = None, *, authorized: bool = True) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)  # noqa: S310 - loopback
        request.add_header("Content-Type", "application/json")
        if authorized:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise AirflowError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:500]!r}") from None

    def _cli(self, *args: str) -> None:
        result = subprocess.run(["airflow", *args], env=self.env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise AirflowError(f"airflow {' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}")


def _running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for its reaper does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
