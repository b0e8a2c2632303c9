"""`make demo`'s terminal: each task's state as it changes, the training's epochs as they stream, then a summary.

The full logs stay in their files under .state/ (Airflow's task logs, its components', the services'); this module
only picks from them what a person watching the run wants, and formats the summary. Everything here but
`LogFollower` is a pure function of its inputs (tests/embedded/test_live_view.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Only a type here: `python -m embedded.cli.demo` puts dags/ on the path after importing this module.
    from orchestrator.contracts_steps import Evaluation

# An epoch report of the training job (remote/progress.py), wherever the task log prefixes it ("train | ...").
_EPOCH_RE = re.compile(r"(?:^|\| )(epoch \d+/\d+ .*)$")


def state_changes(before: Mapping[str, str | None], now: Mapping[str, str | None]) -> list[tuple[str, str]]:
    """The tasks whose state differs from the last look, in the order the API listed them; a task with no state
    yet (not scheduled) is not news."""
    return [(task, state) for task, state in now.items() if state and state != before.get(task)]


def log_messages(lines: Iterable[str]) -> Iterator[str]:
    """The message of each task-log line: Airflow 3 writes JSON lines (`{"event": ..., "level": ...}`); any other
    line (a plain one, a line cut mid-write) passes as it is."""
    for line in lines:
        text = line.rstrip("\n")
        if text.startswith("{"):
            try:
                record = json.loads(text)
            except ValueError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("event"), str):
                yield record["event"]
                continue
        yield text


def epoch_progress(message: str) -> str | None:
    """'train | epoch 2/3 train_loss=0.61 ...' -> 'epoch 2/3 train_loss=0.61 ...'; None for every other message."""
    match = _EPOCH_RE.search(message)
    return match.group(1) if match else None


class LogFollower:
    """The lines appended to a task's log files since the last call: its tries' files (`attempt=N.log`) and the
    triggerer's (`attempt=N.log.trigger.<id>.log`) appear while the run goes on; a line is returned once complete."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._offsets: dict[Path, int] = {}

    def new_lines(self) -> list[str]:
        lines: list[str] = []
        for path in sorted(self.folder.glob("attempt=*")):
            with path.open("rb") as fh:
                fh.seek(self._offsets.get(path, 0))
                chunk = fh.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self._offsets[path] = self._offsets.get(path, 0) + len(complete)
            lines += complete.decode(errors="replace").splitlines()
        return lines


def progress_line(elapsed_s: float, text: str) -> str:
    return f"{elapsed_s:6.1f}s  {text}"


@dataclass
class RunSummary:
    dag_run_id: str
    state: str
    task_states: dict[str, str]
    task_seconds: dict[str, float] = field(default_factory=dict)
    git_sha: str | None = None
    instance_id: str | None = None
    instance_type: str | None = None
    instance_states: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    mlflow_run_url: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    evaluation: Evaluation | None = None
    bootstrap_skipped: list[str] = field(default_factory=list)
    # Where the run's notifications landed: "e-mail" / "Slack" -> what arrived and where it is kept.
    notifications: dict[str, str] = field(default_factory=dict)
    # The run report's cost (orchestrator.observe.report.Cost as a dict); None when the run launched nothing.
    cost: dict[str, Any] | None = None
    phases: dict[str, float] = field(default_factory=dict)  # the run report's phases_s
    seconds_to_first_epoch: float | None = None  # the run report's: from CI passing to the first epoch
    # Seconds: bringing the deployment up, the DAG run from trigger to its end, and the training task within it.
    startup_s: float = 0.0
    run_s: float = 0.0
    train_s: float = 0.0

    @property
    def outside_training_s(self) -> float:
        return self.run_s - self.train_s


def render(summary: RunSummary, *, urls: Mapping[str, str], login: tuple[str, str], state_root: Path) -> str:
    s = summary
    lines = [
        "",
        "=" * 78,
        f"DAG run      {s.dag_run_id}: {s.state.upper()}",
        "tasks        " + ", ".join(f"{t}={state}" for t, state in s.task_states.items()),
        f"commit       {s.git_sha or '-'}",
        f"instance     {s.instance_id or '-'} ({s.instance_type or '-'})",
        "final state  " + (", ".join(f"{i}: {state}" for i, state in s.instance_states.items()) or "no instance"),
        f"MLflow run   {s.mlflow_run_id or '-'}",
        f"             {s.mlflow_run_url or ''}",
        "metrics      " + (", ".join(f"{k}={v}" for k, v in s.metrics.items()) or "-"),
    ]
    if s.evaluation:
        verdict = "promoted to champion" if s.evaluation.promoted else "not promoted"
        lines.append(f"model gate   {verdict}: {s.evaluation.reason}")
    if s.cost:
        c = s.cost
        lines.append(
            f"cost         {c['usd']:.4f} USD: {c['billed_s']:.0f} s billed at {c['usd_per_hour']:g} USD/h "
            f"({c['price_source']}); training {c['training_share']:.0%} of it, {c['non_training_s']:.0f} s not"
        )
    if s.phases:
        lines.append("phases       " + ", ".join(f"{phase} {sec:.1f}s" for phase, sec in s.phases.items()))
    if s.seconds_to_first_epoch is not None:
        lines.append(f"first epoch  {s.seconds_to_first_epoch:.1f}s after CI passed")
    lines += [
        *(
            f"{'notified' if n == 0 else '':<12} {channel}: {where}"
            for n, (channel, where) in enumerate(s.notifications.items())
        ),
        "skipped here " + ("; ".join(s.bootstrap_skipped) or "nothing"),
        f"time         DAG run {s.run_s:.1f} s: training {s.train_s:.1f} s, "
        f"outside training {s.outside_training_s:.1f} s (start-up before it {s.startup_s:.1f} s)",
        "task times   " + ", ".join(f"{t} {sec:.1f}s" for t, sec in s.task_seconds.items()),
        f"logs         {state_root}/airflow/logs (task logs), {state_root}/airflow/components, "
        f"{state_root}/services, {state_root}/demo.log",
        "",
        "Look closer: `make ui` starts this deployment again and keeps it up, then open",
        *(f"  {name:<16} {url}" for name, url in urls.items()),
        f"  login            {login[0]} / {login[1]}",
        "=" * 78,
    ]
    return "\n".join(lines)
