"""The CI verdict: pure functions over GitHub Actions workflow runs, with no I/O.

A commit is green when the latest attempt of every workflow that ran on it concluded ``success`` (or one of the
conclusions the caller allows, such as ``skipped``). One red workflow decides at once, even while others still run:
waiting for them would only delay a failure that cannot turn green.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from orchestrator.errors import ConfigError, OrchestratorError

# Every conclusion GitHub documents for a workflow run.
KNOWN_CONCLUSIONS = frozenset(
    {
        "success",
        "failure",
        "neutral",
        "cancelled",
        "skipped",
        "timed_out",
        "action_required",
        "stale",
        "startup_failure",
    }
)
COMPLETED = "completed"

CiState = Literal["success", "pending", "failed", "no_runs"]


class MalformedRunError(OrchestratorError):
    """The GitHub API answered a workflow run this code cannot read (a field it needs is missing or mistyped)."""


@dataclass(frozen=True)
class WorkflowRun:
    """One GitHub Actions workflow run, at the attempt the runs API reports (its latest).

    Shaped by GitHub's REST description: ``name`` is optional and nullable (runs recorded in 2020-2021 have none),
    ``status`` and ``conclusion`` are nullable, ``run_attempt`` and ``run_started_at`` are optional.
    """

    id: int
    name: str | None
    workflow_id: int
    head_sha: str
    status: str | None
    conclusion: str | None
    run_attempt: int
    html_url: str
    created_at: str
    run_started_at: str | None = None
    path: str | None = None

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> WorkflowRun:
        """Read one element of ``workflow_runs[]``; raise `MalformedRunError` naming the bad field."""
        if not isinstance(data, Mapping):
            raise MalformedRunError(f"expected a workflow run object, got {type(data).__name__}")
        try:
            run = cls(
                id=_int(data, "id"),
                name=_optional_str(data, "name"),
                workflow_id=_int(data, "workflow_id"),
                head_sha=_str(data, "head_sha"),
                status=_optional_str(data, "status"),
                conclusion=_optional_str(data, "conclusion"),
                run_attempt=_int(data, "run_attempt", default=1),
                html_url=_str(data, "html_url"),
                created_at=_str(data, "created_at"),
                run_started_at=_optional_str(data, "run_started_at"),
                path=_optional_str(data, "path"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedRunError(f"malformed workflow run {data.get('id', '?')!r}: {exc}") from exc
        return run

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict that `from_api` reads back (used in trigger events)."""
        return {
            "id": self.id,
            "name": self.name,
            "workflow_id": self.workflow_id,
            "head_sha": self.head_sha,
            "status": self.status,
            "conclusion": self.conclusion,
            "run_attempt": self.run_attempt,
            "html_url": self.html_url,
            "created_at": self.created_at,
            "run_started_at": self.run_started_at,
            "path": self.path,
        }

    @property
    def label(self) -> str:
        """The run's name; for runs without one, its workflow file (``path``), else its workflow id."""
        if self.name:
            return self.name
        if self.path:
            # "owner/repo/.github/workflows/ci.yml@main" or ".github/workflows/ci.yml": the file is what people know.
            return self.path.split("@", 1)[0].rsplit("/", 1)[-1]
        return f"workflow {self.workflow_id}"

    @property
    def started_at(self) -> str:
        """When the run's latest attempt started (``run_started_at`` resets on a re-run; older runs lack it)."""
        return self.run_started_at or self.created_at

    def describe(self) -> str:
        """``'CI' completed/failure`` for log lines and messages."""
        return f"{self.label!r} {self.status or '-'}/{self.conclusion or '-'}"


def _int(data: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = data.get(key, default)
    if value is None:
        raise KeyError(f"field {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"field {key!r} must be an integer, got {value!r}")
    return value


def _str(data: Mapping[str, Any], key: str) -> str:
    if key not in data:
        raise KeyError(f"field {key!r} is missing")
    value = data[key]
    if not isinstance(value, str):
        raise TypeError(f"field {key!r} must be a string, got {value!r}")
    return value


def _optional_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"field {key!r} must be a string or null, got {value!r}")
    return value


@dataclass(frozen=True)
class CiVerdict:
    """What the runs of one commit say: the state, a human message, the runs that failed and the deciding runs."""

    state: CiState
    message: str
    failing: tuple[WorkflowRun, ...]
    runs: tuple[WorkflowRun, ...]


def parse_allowed_conclusions(value: str | Iterable[str] | None) -> frozenset[str]:
    """Conclusions accepted besides ``success``, from a list or a comma-separated string (templated params)."""
    if value is None:
        return frozenset()
    items = value.split(",") if isinstance(value, str) else list(value)
    allowed = frozenset(item.strip().lower() for item in items if item.strip())
    unknown = sorted(allowed - KNOWN_CONCLUSIONS)
    if unknown:
        raise ConfigError(
            f"allowed_conclusions has unknown value(s) {unknown}; use some of {sorted(KNOWN_CONCLUSIONS)}"
        )
    return allowed


def latest_attempts(runs: Iterable[WorkflowRun]) -> tuple[WorkflowRun, ...]:
    """The run that decides for each workflow: the latest attempt of each run id, then the newest run per workflow.

    "Newest" is the latest attempt's start (``run_started_at``, which a re-run resets), not ``created_at`` (which
    stays the first attempt's): a re-run of an older run that turned green after a newer red run decides.
    """
    attempts: dict[int, WorkflowRun] = {}
    for run in runs:
        current = attempts.get(run.id)
        if current is None or (run.run_attempt, run.started_at) > (current.run_attempt, current.started_at):
            attempts[run.id] = run
    latest: dict[int, WorkflowRun] = {}
    for run in attempts.values():
        current = latest.get(run.workflow_id)
        # Timestamps are ISO-8601 UTC and sort as strings; run ids grow over time and break ties.
        if current is None or (run.started_at, run.id) > (current.started_at, current.id):
            latest[run.workflow_id] = run
    return tuple(sorted(latest.values(), key=lambda r: (r.label, r.workflow_id)))


def evaluate_ci(runs: Iterable[WorkflowRun], allowed_conclusions: Iterable[str] = ()) -> CiVerdict:
    """Decide the CI state of one commit from all its workflow runs (every attempt may be present)."""
    accepted = {"success", *allowed_conclusions}
    deciding = latest_attempts(runs)
    if not deciding:
        return CiVerdict("no_runs", "no GitHub Actions workflow run found for this commit yet", (), ())
    failing = tuple(r for r in deciding if r.status == COMPLETED and r.conclusion not in accepted)
    if failing:
        details = "; ".join(f"workflow {r.describe()}: {r.html_url}" for r in failing)
        return CiVerdict("failed", f"CI failed: {details}", failing, deciding)
    pending = [r for r in deciding if r.status != COMPLETED]
    if pending:
        waiting = ", ".join(r.describe() for r in pending)
        return CiVerdict(
            "pending", f"waiting for {len(pending)} of {len(deciding)} workflow(s): {waiting}", (), deciding
        )
    names = ", ".join(r.describe() for r in deciding)
    return CiVerdict("success", f"all {len(deciding)} workflow(s) passed: {names}", (), deciding)
