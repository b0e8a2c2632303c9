"""The training run's outcome from its steps' real states, whatever its teardowns did. Pure.

Airflow decides a run from its leaves minus teardowns. A run marked failed by hand while `train` is deferred has its
pending steps skipped (`evaluate`), its teardowns left to run, and is then decided from that skipped leaf: success.
The `verdict` teardown (`on_failure_fail_dagrun`) fails the run from `decide`; the sweep counts a set by it too.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

SUCCESS = "success"


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    stopped: bool = False  # a step was stopped by hand (the run marked failed or success while it ran)


def decide(states: Mapping[str, str | None], teardowns: Collection[str]) -> Verdict:
    """Whether every step of the run (each task but the teardowns) succeeded, and if not, why.

    `states`: every task of the run and its state, None for one that never finished. In the training DAG no step
    skips itself: a skipped step was stopped by hand (Airflow skips the pending steps of a run marked by hand, and
    fails its running ones).
    """
    steps = {task_id: state for task_id, state in states.items() if task_id not in teardowns}
    if not steps:
        return Verdict(False, "the run has no step besides its teardowns")
    by_state: dict[str, list[str]] = {}
    for task_id, state in sorted(steps.items()):
        by_state.setdefault(state or "no state", []).append(task_id)
    failed = ", ".join(by_state.get("failed", []))
    if "skipped" in by_state:
        ended = f"{failed} failed, " if failed else ""
        skipped = ", ".join(by_state["skipped"])
        return Verdict(False, f"the run was stopped by hand: {ended}{skipped} never ran", stopped=True)
    if failed:
        return Verdict(False, f"{failed} failed")
    if "upstream_failed" in by_state:
        return Verdict(False, f"{', '.join(by_state['upstream_failed'])} did not run: a step before failed")
    unfinished = {state: task_ids for state, task_ids in by_state.items() if state != SUCCESS}
    if unfinished:
        which = "; ".join(f"{', '.join(task_ids)}: {state}" for state, task_ids in unfinished.items())
        return Verdict(False, f"steps did not finish ({which})")
    return Verdict(True, f"all {len(steps)} steps succeeded")


def unfinished_run_end(mlflow_status: str, train_state: str, stopped: bool) -> str | None:
    """The status to end a training's MLflow run with, None to leave it: a run still RUNNING after `train` ended
    other than in success was not ended by its job (stopped by hand, lost instance, lost job), and the experiment
    must not list it as running for ever. KILLED when the run was stopped by hand, FAILED otherwise."""
    if mlflow_status != "RUNNING" or train_state in ("", SUCCESS):
        return None
    return "KILLED" if stopped else "FAILED"
