"""orchestrator.observe.gather: the phases of a run from its steps' durations and what wait_ready measured (pure),
the attempts as EC2 describes them (an in-process AWS); the report against real runs is checked end to end in
tests/dags/test_training_dag.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from orchestrator.config.settings import load_settings
from orchestrator.contracts_steps import Preemption, ReadyInstance
from orchestrator.observe.cost import BY_TEARDOWN, Price
from orchestrator.observe.gather import airflow_run_url, billed_attempts, first_epoch_start, phases_of
from tests.support.aws_cloud import REGION, StrictAws, strict_aws
from tests.support.step_results import READY as READY_XCOM

READY = ReadyInstance.from_xcom(READY_XCOM)


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Iterator[StrictAws]:
    with strict_aws(monkeypatch) as aws:
        conn = {"conn_type": "aws", "login": "testing", "password": "testing", "extra": {"region_name": REGION}}
        monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(conn))
        yield aws


def test_every_phase_of_a_finished_run() -> None:
    durations = {"ci_gate": 120.0, "launch": 14.04, "train": 700.0, "evaluate": 3.0, "terminate": 41.0}
    assert phases_of(durations, READY, 650.0) == {
        "ci_wait": 120.0,
        "launch": 16.0,  # the launch step and the rest of the wait for state running
        "boot": 30.5,  # running to SSH
        "bootstrap": 61.0,  # no total recorded (a bootstrap of before 0124): its steps' sum
        "bootstrap.user": 0.0,
        "bootstrap.gpu": 1.0,
        "bootstrap.packages": 20.0,
        "bootstrap.python": 40.0,
        "training": 650.0,  # the job's own time, not the train task's
        "evaluation": 3.0,
        "teardown": 41.0,
    }


def test_the_bootstrap_phase_is_its_own_total_when_it_recorded_one() -> None:
    """The steps ran partly at once: the whole is less than their sum, and "total" is no step."""
    ready = ReadyInstance.from_xcom({**READY_XCOM, "bootstrap_phases_s": {"user": 0.0, "python": 9.0, "total": 10.0}})
    phases = phases_of({}, ready, None)
    assert (phases["bootstrap"], phases["bootstrap.python"]) == (10.0, 9.0)
    assert "bootstrap.total" not in phases


def test_phases_the_run_never_reached_are_absent() -> None:
    assert phases_of({"ci_gate": 5.0, "launch": 9.0, "terminate": 1.0}, None, None) == {
        "ci_wait": 5.0,
        "launch": 9.0,
        "teardown": 1.0,
    }


def test_the_first_epoch_began_its_own_seconds_before_its_metric() -> None:
    """A resumed run logs later epochs first in no order the reader may trust: the lowest step counts."""
    from mlflow.entities import Metric

    history = [Metric("speed/epoch_time_s", 4.0, 1_000_020_000, 3), Metric("speed/epoch_time_s", 2.5, 1_000_010_000, 1)]
    assert first_epoch_start(history) == 1_000_007.5
    assert first_epoch_start([]) is None


def test_airflow_run_url_quotes_the_run_id() -> None:
    url = airflow_run_url("ec2_training", "manual__2026-11-26T20:00:00+00:00")
    assert url.endswith("/dags/ec2_training/runs/manual__2026-11-26T20%3A00%3A00%2B00%3A00")


def _start(cloud: StrictAws, zone: str) -> str:
    image_id = next(iter(cloud.images.values()))
    found = cloud.ec2.run_instances(
        ImageId=image_id,
        InstanceType="g6.xlarge",
        MinCount=1,
        MaxCount=1,
        Placement={"AvailabilityZone": zone},
        InstanceMarketOptions={"MarketType": "spot"},
    )
    return str(found["Instances"][0]["InstanceId"])


def test_each_attempt_has_its_zone_market_price_root_volume_and_why_it_ended(
    cloud: StrictAws, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.instances import StateReason

    from orchestrator.observe import pricing

    asked: list[tuple[str, str, str | None]] = []

    def price(aws: Any, region: str, instance_type: str, market: str, zone: str | None, at: float) -> Price:
        asked.append((instance_type, market, zone))
        return Price(0.30 if market == "spot" else 0.8048, "fallback-table", "test")

    monkeypatch.setattr(pricing, "instance_price", price)
    lost = _start(cloud, f"{REGION}a")
    # EC2 takes it back: terminated, with its StateReason.
    backend = ec2_backends[DEFAULT_ACCOUNT_ID][REGION]
    backend.terminate_instances([lost])
    code = "Server.SpotInstanceTermination"
    backend.get_instance(lost).state_reason = StateReason(f"{code}: Spot instance termination", code)
    backend.get_instance(lost).launch_time -= timedelta(minutes=10)
    relaunched = _start(cloud, f"{REGION}b")
    cloud.ec2.terminate_instances(InstanceIds=[relaunched])
    s = load_settings(env={"TRAINER__AWS__DEPLOYMENT": "gather-test", "TRAINER__AWS__REGION": REGION})
    preemption = Preemption(lost, "g6.xlarge", "spot", f"{REGION}a", code, time.time())

    attempts = billed_attempts(
        s, [relaunched, lost, "i-0000000000000dead"], time.time(), [preemption], {relaunched}, 120
    )
    # Oldest first; an instance EC2 no longer describes is left out.
    assert [(a.instance_id, a.availability_zone, a.market, a.ended_by) for a in attempts] == [
        (lost, f"{REGION}a", "spot", f"taken back by EC2 ({code})"),
        (relaunched, f"{REGION}b", "spot", BY_TEARDOWN),
    ]
    assert attempts[0].billed_s >= 600.0  # launched ten minutes before its take-back
    for attempt in attempts:
        assert (attempt.price.usd_per_hour, attempt.on_demand_usd_per_hour) == (0.30, 0.8048)
        assert (attempt.root_volume_gb, attempt.volume_usd_per_gb_month) == (120, 0.08)
    # Each spot price in its own zone; the type's on-demand price (for the saving) once.
    assert asked == [
        ("g6.xlarge", "spot", f"{REGION}b"),
        ("g6.xlarge", "on-demand", None),
        ("g6.xlarge", "spot", f"{REGION}a"),
    ]


def test_the_cost_cap_counts_the_instance_taken_back_before_the_one_the_job_runs_on(
    cloud: StrictAws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """observe.cost_cap.run_cost_cap on EC2's launch times: the lost spot instance's ten billed minutes come off the
    budget before the current one's seconds; with the cap off there is no deadline."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    from orchestrator.observe import pricing
    from orchestrator.observe.cost import transition_time
    from orchestrator.observe.cost_cap import run_cost_cap, usd_per_second

    monkeypatch.setattr(pricing, "instance_price", lambda *args: Price(3.6, "fallback-table", "test"))
    lost = _start(cloud, f"{REGION}a")
    backend = ec2_backends[DEFAULT_ACCOUNT_ID][REGION]
    backend.get_instance(lost).launch_time -= timedelta(minutes=10)
    backend.terminate_instances([lost])
    current = _start(cloud, f"{REGION}b")
    env = {"TRAINER__AWS__DEPLOYMENT": "gather-test", "TRAINER__AWS__REGION": REGION}
    assert run_cost_cap(load_settings(env=env), [lost], current, 0) is None
    s = load_settings(env={**env, "TRAINER__TRAINING__MAX_COST_USD": "1.0"})

    cap = run_cost_cap(s, [lost], current, 100)
    assert cap is not None
    described = {i["InstanceId"]: i for r in cloud.ec2.describe_instances()["Reservations"] for i in r["Instances"]}
    # Billed from its launch to its termination request, as the report bills it.
    lost_s = transition_time(described[lost]["StateTransitionReason"]) - described[lost]["LaunchTime"].timestamp()
    assert lost_s >= 600
    rate = usd_per_second(3.6, 100, 0.08)
    expected = described[current]["LaunchTime"].timestamp() + (1.0 - lost_s * rate) / rate
    assert abs(cap.deadline - expected) <= 1, (cap.deadline, expected)
    assert "0.6" in cap.reason and "for 1 earlier instance(s)" in cap.reason


def test_the_job_s_checkpoint_error_tag_is_the_report_s_warning() -> None:
    from types import SimpleNamespace

    from orchestrator.contracts import CHECKPOINT_ERROR_TAG
    from orchestrator.observe.gather import run_warnings

    def run(tags: dict[str, str]) -> Any:
        return SimpleNamespace(data=SimpleNamespace(tags=tags))

    error = "cannot write epoch 1 to s3://b/checkpoints/r1/: AccessDenied: Access Denied\nmore"
    assert run_warnings(run({CHECKPOINT_ERROR_TAG: error})) == [
        "Checkpoints failed, training went on without them: cannot write epoch 1 to s3://b/checkpoints/r1/: "
        "AccessDenied: Access Denied"
    ]
    assert run_warnings(run({})) == [] and run_warnings(None) == []


def test_the_epoch_time_metric_is_the_one_the_job_logs() -> None:
    from orchestrator.contracts import EPOCH_TIME_METRIC
    from remote.engine import EpochResult
    from remote.metrics import epoch_metrics

    fields = {name: 1.0 for name in EpochResult.__dataclass_fields__}
    assert EPOCH_TIME_METRIC in epoch_metrics(EpochResult(**fields))  # type: ignore[arg-type]
