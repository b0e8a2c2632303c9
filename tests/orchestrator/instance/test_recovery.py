"""instance.recovery without I/O: which ends are interruptions, and how the run's interruptions are counted against
aws.max_preemptions across wait_ready and train."""

from __future__ import annotations

from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from orchestrator.cloud.ec2_describe import InstanceInfo
from orchestrator.config.settings import Settings, load_settings
from orchestrator.contracts import PREEMPTIONS_KEY, PREEMPTIONS_TAG
from orchestrator.instance.recovery import (
    Preempted,
    preempted,
    preemptions,
    raise_if_recoverable,
    record_preemption,
    recovering,
)


def info(reason: str | None = "Server.SpotInstanceTermination", market: Any = "spot", n: int = 1) -> InstanceInfo:
    return InstanceInfo(
        instance_id=f"i-{n:017x}",
        state="terminated",
        instance_type="g6.xlarge",
        public_ip=None,
        private_ip=None,
        launch_time=None,
        state_reason_code=reason,
        availability_zone="us-east-1a",
        market=market,
    )


class FakeTi:
    """XComs as a task instance keeps them: per (task id, key)."""

    def __init__(self, task_id: str, xcoms: dict[tuple[str, str], Any] | None = None) -> None:
        self.task_id = task_id
        self.xcoms = dict(xcoms or {})

    def xcom_pull(self, task_ids: str, key: str = "return_value") -> Any:
        return self.xcoms.get((task_ids, key))

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[(self.task_id, key)] = value


def settings(max_preemptions: int) -> Settings:
    return load_settings(
        env={"TRAINER__AWS__DEPLOYMENT": "recovery-test", "TRAINER__AWS__MAX_PREEMPTIONS": str(max_preemptions)}
    )


@pytest.mark.parametrize(
    ("reason", "market", "expected"),
    [
        ("Server.SpotInstanceTermination", "spot", True),
        ("Server.SpotInstanceShutdown", "spot", True),
        ("Client.InstanceInitiatedShutdown", "spot", False),  # its own watchdog: meant
        ("Client.UserInitiatedShutdown", "spot", False),  # a person or the reaper: meant
        ("Server.SpotInstanceTermination", "on-demand", False),  # never on-demand's reason; not recovered anyway
        (None, "spot", False),
    ],
)
def test_only_ec2_taking_spot_capacity_back_is_an_interruption(reason: str | None, market: Any, expected: bool) -> None:
    assert preempted(info(reason, market)) is expected
    assert preempted(None) is False


def test_the_bound_counts_wait_ready_s_interruptions_with_train_s(monkeypatch: pytest.MonkeyPatch) -> None:
    tagged: list[tuple[Settings, str, dict[str, str]]] = []
    monkeypatch.setattr(
        "orchestrator.tracking.runs.tag_mlflow_run", lambda s, run_id, tags: tagged.append((s, run_id, tags))
    )
    earlier = {"instance_id": "i-0", "instance_type": "g6.xlarge", "market": "spot", "availability_zone": "a"}
    ti = FakeTi("train", {("wait_ready", PREEMPTIONS_KEY): [earlier]})
    ended: list[str] = []
    s = settings(3)
    record_preemption(s, ti, "run-1", lambda: ended.append("FAILED"), info(n=1))
    record_preemption(s, ti, "run-1", lambda: ended.append("FAILED"), info(n=2))
    own = ti.xcoms[("train", PREEMPTIONS_KEY)]
    assert [r["instance_id"] for r in preemptions(ti)] == ["i-0", info(n=1).instance_id, info(n=2).instance_id]
    assert [r["instance_id"] for r in own] == [info(n=1).instance_id, info(n=2).instance_id], "train keeps its own"
    assert {k: own[0][k] for k in ("instance_type", "market", "availability_zone", "reason")} == {
        "instance_type": "g6.xlarge",
        "market": "spot",
        "availability_zone": "us-east-1a",
        "reason": "Server.SpotInstanceTermination",
    }
    assert own[0]["ended_at"] > 0
    assert [(t[0], t[1], t[2]) for t in tagged] == [
        (s, "run-1", {PREEMPTIONS_TAG: "2"}),
        (s, "run-1", {PREEMPTIONS_TAG: "3"}),
    ]
    with pytest.raises(AirflowFailException, match=r"interruption 4 of this run, more than aws\.max_preemptions = 3"):
        record_preemption(s, ti, "run-1", lambda: ended.append("FAILED"), info(n=3))
    assert ended == ["FAILED"], "past the bound the MLflow run is ended FAILED"
    assert len(preemptions(ti)) == 3, "the interruption past the bound is not recorded as recovered"
    record_preemption(settings(9), FakeTi("wait_ready"), "", lambda: None, info())
    assert len(tagged) == 2, "no MLflow run yet (wait_ready): nothing tagged"


def test_raise_if_recoverable_relaunches_within_the_bound_and_fails_past_it() -> None:
    ti = FakeTi("train")
    with pytest.raises(Preempted):
        raise_if_recoverable(settings(1), ti, info(), lambda: None)
    raise_if_recoverable(settings(1), ti, info("Client.UserInitiatedShutdown"), lambda: None)  # not ours to recover
    ended: list[str] = []
    with pytest.raises(AirflowFailException, match=r"more than aws\.max_preemptions = 0"):
        raise_if_recoverable(settings(0), ti, info(), lambda: ended.append("FAILED"))
    assert ended == ["FAILED"]


def test_recovering_recovers_again_when_the_replacement_is_taken_back_too() -> None:
    lost = iter([info(n=2)])

    def recover(gone: InstanceInfo) -> str:
        seen.append(gone.instance_id)
        if (again := next(lost, None)) is not None:
            raise Preempted(again)
        return "done"

    def body() -> str:
        raise Preempted(info(n=1))

    seen: list[str] = []
    assert recovering(body, recover) == "done"
    assert seen == [info(n=1).instance_id, info(n=2).instance_id]
