"""A real Airflow deployment on this machine: api-server, scheduler (LocalExecutor), dag-processor and triggerer.

`dag.test()` runs one DAG run at a time in one process; this runs them the way production does, several at once,
each task in its own supervised process, pools and retries enforced by the scheduler. It serves the load test and
the test that kills a task's process, and `make ui`-style exploration. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from embedded.process import Managed, free_port, start_logged, stop_process, wait_for_http

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = ("scheduler", "dag-processor", "triggerer")
FINISHED = frozenset({"success", "failed"})


class AirflowError(RuntimeError):
    """The local Airflow did not start or answered unexpectedly; the message names the log to read."""


class LocalAirflow(Managed):
    """Start with `with LocalAirflow(home, env) as airflow:`; `env` carries the connections and TRAINER__ settings.

    `env` is applied last: an AIRFLOW__ variable in it overrides this class's default for that setting (the executor,
    the metadata database, intervals). `port` None picks a free one. `login` (user, password): the harness signs in as
    that user, for a deployment whose `env` turns the all-admins default off.
    """

    def __init__(
        self,
        home: Path,
        env: Mapping[str, str],
        *,
        parallelism: int = 8,
        port: int | None = None,
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
            "AIRFLOW__API__WORKERS": "1",
            # The triggerer imports the CI gate's trigger by its class path, as in production.
            "PYTHONPATH": str(REPO / "dags"),
            **env,
        }
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._token = ""
        self._login = login

    # ---- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self._cli("db", "migrate")
        self._cli("pools", "import", str(REPO / "config" / "pools.json"))
        self._procs["api-server"] = start_logged(
            ["airflow", "api-server", "--host", "127.0.0.1", "--port", str(self.port)],
            self.log_file("api-server"),
            env=self.env,
        )
        for name in COMPONENTS:
            self._procs[name] = start_logged(["airflow", name], self.log_file(name), env=self.env)
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
        log.info("Airflow at %s (AIRFLOW_HOME %s)", self.url, self.home)

    def stop(self) -> None:
        for name in (*COMPONENTS, "api-server"):
            stop_process(self._procs.pop(name, None), timeout_s=20)

    def log_file(self, component: str) -> Path:
        return self.home / "components" / f"{component}.log"

    def component_pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self._procs.items() if proc.poll() is None}

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
                    states[run_id] = str(self.dag_run(dag_id, run_id)["state"])
            if all(state in FINISHED for state in states.values()):
                return states
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
