"""A trigger's classpath follows its class, and a task deferred before the regrouping resumes after it.

The metadata DB holds a deferred task's trigger as a row (classpath, encrypted kwargs); the triggerer imports the
classpath and builds the trigger from the kwargs. A row written before the move names the old module: the shims
there (orchestrator.triggers, orchestrator.ci_gate) must yield the moved class with the same kwargs.
"""

from __future__ import annotations

from typing import Any

import pytest
from airflow.models.trigger import Trigger
from airflow.triggers.base import BaseTrigger

from orchestrator.ci.gate import CiGateTrigger
from orchestrator.instance.triggers import BootstrapTrigger, RemoteJobTrigger

SSH = {"ssh_conn_id": "ssh_default", "host": "203.0.113.7", "port": 22, "user": "ubuntu", "host_public_key": "k"}
TRIGGERS: dict[str, BaseTrigger] = {
    "orchestrator.triggers.BootstrapTrigger": BootstrapTrigger(
        **SSH, state_dir="/var/lib/trainer", poll_s=5.0, started_at=1.0, deadline=2.0
    ),
    "orchestrator.triggers.RemoteJobTrigger": RemoteJobTrigger(
        **SSH, job_dir="/var/lib/trainer/jobs/j", poll_s=5.0, deadline=2.0, timeout_s=60.0, mlflow_run_id="r"
    ),
    "orchestrator.ci_gate.CiGateTrigger": CiGateTrigger(
        conn_id="github_default",
        api_url="https://api.github.com",
        repo="acme/cnn",
        sha="a" * 40,
        poll_interval_s=30.0,
        deadline=2.0,
        no_runs_deadline=1.0,
        allowed_conclusions=["skipped"],
    ),
}


def load_as_the_triggerer_does(row: Trigger) -> BaseTrigger:
    """TriggerRunner.create_triggers: the class by its classpath, the kwargs decrypted and decoded."""
    from airflow.jobs.triggerer_job_runner import TriggerRunner
    from airflow.serialization.decoders import smart_decode_trigger_kwargs

    trigger_class = TriggerRunner().get_trigger_by_classpath(row.classpath)
    kwargs = {k: smart_decode_trigger_kwargs(v) for k, v in Trigger._decrypt_kwargs(row.encrypted_kwargs).items()}
    trigger: BaseTrigger = trigger_class(**kwargs)
    return trigger


@pytest.mark.parametrize("old_classpath", sorted(TRIGGERS))
def test_a_trigger_stored_under_its_old_classpath_resumes_as_the_moved_class(old_classpath: str) -> None:
    trigger = TRIGGERS[old_classpath]
    classpath, kwargs = trigger.serialize()
    stored_before_the_upgrade = Trigger(classpath=old_classpath, kwargs=kwargs)

    resumed = load_as_the_triggerer_does(stored_before_the_upgrade)

    assert type(resumed) is type(trigger)
    assert resumed.serialize() == (classpath, kwargs)


@pytest.mark.parametrize("trigger", TRIGGERS.values(), ids=lambda t: type(t).__name__)
def test_a_triggers_classpath_is_its_class_and_round_trips(trigger: Any) -> None:
    classpath, kwargs = trigger.serialize()
    assert classpath == f"{type(trigger).__module__}.{type(trigger).__qualname__}"
    assert not classpath.startswith(("orchestrator.triggers.", "orchestrator.ci_gate."))

    resumed = load_as_the_triggerer_does(Trigger.from_object(trigger))

    assert type(resumed) is type(trigger)
    assert resumed.serialize() == (classpath, kwargs)
