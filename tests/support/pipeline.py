"""Fixtures and helpers for tests that run the training DAG on the embedded default (registered in conftest).

One embedded stack serves the whole session; a test that changes its state (scripted CI runs, injected faults)
restores it before it ends.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from collections.abc import Generator, Iterator, Mapping, Sequence
from datetime import timedelta
from secrets import token_hex
from typing import Any

import pytest

from embedded.deploy.stack import EmbeddedStack, TrainingKnobs
from orchestrator.cloud.user_data import readable_user_data
from tests.conftest import REPO
from tests.support.leak_scan import SshTraffic, leaks_beyond_logs, planted_found


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, airflow_db: Any) -> Iterator[EmbeddedStack]:
    with EmbeddedStack(tmp_path_factory.mktemp("embedded"), REPO, knobs=TrainingKnobs.tiny()) as running:
        yield running


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that used the stack shows what the emulator did with each instance, last, where CI's tail is."""
    report = yield
    running = getattr(item, "funcargs", {}).get("stack")
    if report.failed and isinstance(running, EmbeddedStack):
        report.sections.append(("emulated instances", running.cloud.boot_report()))
    return report


@pytest.fixture
def env(stack: EmbeddedStack, monkeypatch: pytest.MonkeyPatch) -> EmbeddedStack:
    for name, value in stack.environment().items():
        monkeypatch.setenv(name, value)
    return stack


@pytest.fixture
def no_baked_image_after(stack: EmbeddedStack) -> Iterator[None]:
    """A test that bakes leaves no baked image behind: the tests after it in this process boot the base image."""
    from embedded.deploy.stack import DEPLOYMENT
    from orchestrator.contracts import TAG_BOOTSTRAP_DIGEST

    yield
    ec2 = stack.cloud.client("ec2")
    stack.cloud.client("ssm").delete_parameters(Names=[f"/ec2-trainer/{DEPLOYMENT}/baked-image"])
    baked = [{"Name": "tag-key", "Values": [TAG_BOOTSTRAP_DIGEST]}]
    for image in ec2.describe_images(Owners=["self"], Filters=baked)["Images"]:
        ec2.deregister_image(ImageId=image["ImageId"])
        for mapping in image["BlockDeviceMappings"]:
            ec2.delete_snapshot(SnapshotId=mapping["Ebs"]["SnapshotId"])


@pytest.fixture(scope="session")
def sha() -> str:
    """The commit under test: the GitHub stand-in answers for it and serves its tree, which train ships."""
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.strip()


# Drawn per test process: another xdist worker's runs never carry this process's values, so its scans cannot be
# confused by a test here that shows a planted value on purpose, nor ours by its.
_PLANTED_SUFFIX = token_hex(8)


def training_job_command(stack: EmbeddedStack) -> str:
    """The start of any training job's command line on the stack's instances: `mlflow run` on a shipped tree."""
    return f"mlflow run {stack.state_dir}/jobs/"


def planted_connections(stack: EmbeddedStack) -> tuple[dict[str, str], dict[str, str]]:
    """Known secret values, and the AIRFLOW_CONN_* variables that carry them in every connection the run uses."""
    secrets = {
        # Airflow's own identity in the stand-in (drawn per cloud, so per process): the cloud refuses a key it does
        # not know, as AWS does.
        "aws": stack.cloud.airflow.secret_key,
        "mlflow": f"planted-mlflow-password-{_PLANTED_SUFFIX}",
        "github": stack.github_token,
        "ssh": stack.ssh_private_key.splitlines()[2],  # a line of the key's base64 body
        "slack webhook": stack.slack.path.rsplit("/", 1)[1],  # the token part of the webhook's URL
    }
    connections = {
        "AIRFLOW_CONN_AWS_DEFAULT": stack.environment()["AIRFLOW_CONN_AWS_DEFAULT"],
        "AIRFLOW_CONN_MLFLOW_DEFAULT": json.dumps(
            {"conn_type": "http", "login": "trainer", "password": secrets["mlflow"]}
        ),
    }
    return secrets, connections


@pytest.fixture
def planted_in_airflow(stack: EmbeddedStack) -> dict[str, str]:
    """The secrets planted_connections plants, for a deployment whose environment carries its connections."""
    return planted_connections(stack)[0]


@pytest.fixture
def planted(env: EmbeddedStack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Known secret values set in every connection the run uses; none may show up anywhere readable."""
    secrets, connections = planted_connections(env)
    for name, value in connections.items():
        monkeypatch.setenv(name, value)
    return secrets


@pytest.fixture
def ssh_traffic(monkeypatch: pytest.MonkeyPatch) -> SshTraffic:
    """Every command and SFTP write the test's SSH clients send: secrets_found scans them for the planted values."""
    traffic = SshTraffic()
    traffic.install(monkeypatch)
    return traffic


# `dag.test()` waits out each retry delay for real. These tests check which tries happen and what each does, not
# Airflow's timing (the DAGs' delays are checked in tests/dags/test_dag_integrity.py): a second keeps every try.
TEST_RETRY_DELAY = timedelta(seconds=1)


def with_quick_retries(dag: Any) -> Any:
    """`dag` with each task's retry delay (and its back-off's cap) cut to TEST_RETRY_DELAY; the tries stay."""
    for task in dag.tasks:
        task.retry_delay = TEST_RETRY_DELAY
        if task.max_retry_delay:
            task.max_retry_delay = TEST_RETRY_DELAY
    return dag


def run_dag(dag_id: str = "ec2_training", /, **conf: Any) -> Any:
    """One run of a DAG (the training DAG unless named) in this process with `dag.test()`; its DagRun's state says
    whether it failed."""
    import os

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    if dag_id not in bag.dags:
        raise RuntimeError(f"DAG {dag_id} did not load: {bag.import_errors}")
    return with_quick_retries(bag.dags[dag_id]).test(run_conf=conf)


def task_states(dag_run: Any) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def instances_of(stack: EmbeddedStack, dag_run: Any) -> dict[str, dict[str, Any]]:
    ec2 = stack.cloud.client("ec2")
    found = {}
    for reservation in ec2.describe_instances(Filters=[{"Name": "tag:ec2-trainer:run_id", "Values": [dag_run.run_id]}])[
        "Reservations"
    ]:
        for inst in reservation["Instances"]:
            found[inst["InstanceId"]] = inst
    return found


def assert_all_terminated(stack: EmbeddedStack, dag_run: Any, expected_count: int) -> dict[str, dict[str, Any]]:
    found = instances_of(stack, dag_run)
    assert len(found) == expected_count, f"expected {expected_count} instance(s), found {sorted(found)}"
    assert {i["State"]["Name"] for i in found.values()} <= {"terminated"}, {
        k: v["State"]["Name"] for k, v in found.items()
    }
    return found


def stored_task_outputs(dag_run: Any) -> str:
    """Every XCom and every rendered template field the run left in Airflow's database, as text."""
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        xcoms: Sequence[Any] = session.scalars(
            select(XComModel.value).where(XComModel.dag_id == dag_run.dag_id, XComModel.run_id == dag_run.run_id)
        ).all()
        rendered: Sequence[Any] = session.scalars(
            select(RenderedTaskInstanceFields.rendered_fields).where(
                RenderedTaskInstanceFields.dag_id == dag_run.dag_id,
                RenderedTaskInstanceFields.run_id == dag_run.run_id,
            )
        ).all()
    assert xcoms and rendered, "nothing stored: the scan would prove nothing"
    return json.dumps([xcoms, rendered], default=str)


class ProcessListSampler:
    """Samples every process's command line while a run goes on: the stand-in instance shares this machine.

    `ps` runs at once, then every `interval_s`; lines can be read while sampling goes on.
    """

    def __init__(self, interval_s: float = 0.2) -> None:
        self.samples = 0
        self._seen: set[str] = set()
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sampled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-list-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            # -ww: never cut a command line to a display width (a secret could sit past the cut).
            out = subprocess.run(["ps", "-eww", "-o", "args="], capture_output=True, text=True, check=False)
            if out.returncode == 0:
                with self._lock:
                    self._seen.update(out.stdout.splitlines())
                    self.samples += 1
                self._sampled.set()
            if self._stop.wait(self._interval_s):
                return

    def lines(self) -> set[str]:
        """Every distinct command line seen so far."""
        with self._lock:
            return set(self._seen)

    def text(self) -> str:
        """The command lines seen so far, one a line; fails if no sample was taken, as a scan would prove nothing."""
        # A short test can end before the first `ps` on a loaded machine has: wait for it, bounded.
        self._sampled.wait(timeout=120)
        lines = self.lines()
        assert self.samples, "the process list was never sampled: the scan would prove nothing"
        return "\n".join(sorted(lines))

    def saw(self, fragment: str) -> bool:
        return any(fragment in line for line in self.lines())

    def __enter__(self) -> ProcessListSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def processes() -> Iterator[ProcessListSampler]:
    """Every command line seen on this machine while the test runs: the leak scans read it for planted secrets."""
    with ProcessListSampler() as sampler:
        yield sampler


def secrets_found(
    planted: Mapping[str, str],
    stack: EmbeddedStack,
    dag_run: Any,
    task_log: str,
    processes: ProcessListSampler,
    traffic: SshTraffic,
) -> dict[str, int]:
    """Where the planted values occur, as planted_found counts them; empty when nowhere.

    Scanned: the task log, XComs, rendered fields, every instance's user-data, the process list sampled during the
    run (the stand-in instance's processes included), and what tests/support/leak_scan.py reads: every command
    and SFTP write sent over SSH, the instances' disks after the run, and the MLflow run's params, tags and artifacts.
    """
    ec2 = stack.cloud.client("ec2")
    instances = instances_of(stack, dag_run)
    places = {"task log": task_log, "XComs and rendered fields": stored_task_outputs(dag_run)}
    for instance_id in instances:
        attr = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        places[f"user-data of {instance_id}"] = readable_user_data(base64.b64decode(attr["UserData"]["Value"]).decode())
    places["process list"] = processes.text()
    found = planted_found(planted, places)
    return found | leaks_beyond_logs(planted, stack, dag_run.dag_id, dag_run.run_id, instances, traffic)
