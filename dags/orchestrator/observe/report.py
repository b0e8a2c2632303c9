"""What one DAG run did, cost and produced: the run report every publisher (MLflow, notifications, metrics) reads.

Pure and standard-library only: the `report` task assembles it, `to_dict` makes it an XCom, `from_dict` reads it back.
Field names are a contract between publishers (docs/decisions/0081-*.md): add fields, never rename them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from orchestrator.redaction import scrub

OUTCOMES = ("success", "failed")
PRICE_SOURCES = ("aws-price-list", "spot-price-history", "fallback-table")
LINK_KEYS = ("airflow", "ci", "mlflow", "mlflow_runs")
# The fixed phase names, in order. Breakdowns of one are "<phase>.<part>": "bootstrap.<step>" (the steps
# userdata/bootstrap.sh records, some of them at once, so they may add up to more than "bootstrap"), and
# "training.before_first_epoch" (the job's start: `mlflow run`, the data, the model, up to its first epoch).
PHASES = ("ci_wait", "launch", "boot", "bootstrap", "training", "evaluation", "teardown")
BOOTSTRAP_PHASE_PREFIX = "bootstrap."
BEFORE_FIRST_EPOCH_PHASE = "training.before_first_epoch"
# EC2 bills Linux instances per second with a one-minute minimum.
MIN_BILLED_S = 60.0
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class Cost:
    # Every attempt's billed seconds at its own price, plus their root volumes (volume_usd): the sum of the
    # attempts' own usd (RunReport.attempts).
    usd: float
    billed_s: float  # EC2 per-second billing, 60 s minimum, from each instance's launch to its termination, summed
    training_s: float  # seconds the training job ran on it
    non_training_s: float  # billed_s - training_s
    training_share: float  # training_s / billed_s (0..1)
    usd_per_hour: float  # the instances' price (averaged over billed time when the attempts' prices differ)
    price_source: str  # one of PRICE_SOURCES
    region: str
    volume_usd: float = 0.0  # the root EBS volumes' share of usd
    # The same instances' billed seconds at their types' on-demand prices minus what they cost (the volumes cost the
    # same either way): what spot saved. None when an on-demand price is unknown.
    saving_vs_on_demand_usd: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cost:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class RunReport:
    dag_id: str
    run_id: str
    deployment: str  # aws.deployment (a bounded label)
    outcome: str  # one of OUTCOMES
    failed_step: str | None  # task id of the step that failed (None on success)
    error: str | None  # first line of that step's error, never a secret (error_line)
    git_sha: str | None
    instance_id: str | None
    instance_type: str | None  # bounded label
    market: str | None  # "spot" | "on-demand" (bounded label)
    links: dict[str, str]  # keys among LINK_KEYS: URLs for people (absent when unknown)
    metric_name: str | None  # mlflow.metric (e.g. test_accuracy)
    metric_value: float | None
    promoted: bool | None  # None when the gate did not run
    promotion_reason: str | None
    duration_s: float  # the DAG run, from its start to the report
    phases_s: dict[str, float]  # keys among PHASES and their breakdowns; absent when the run never got there
    images_per_s: float | None  # training throughput
    test_metrics: dict[str, float]  # the run's test_* metrics from MLflow
    cost: Cost | None  # None when no instance was launched
    mlflow_run_id: str | None = None  # the training's MLflow run, where the cost is logged
    # The spot instances EC2 took back while the run bootstrapped or trained (contracts_steps.Preemption records of
    # wait_ready, then train, oldest first); the cost counts each of them too.
    preemptions: list[dict[str, Any]] = field(default_factory=list)
    # Every instance the run launched, oldest first (observe.cost.BilledInstance.to_dict: id, zone, type, market,
    # billed seconds, usd, ended_by); cost sums them.
    attempts: list[dict[str, Any]] = field(default_factory=list)
    seconds_lost_to_preemption: float = 0.0  # observe.cost.seconds_lost_to_preemption
    # From the CI gate seeing the commit pass to the job's first epoch beginning: what a person waits after a push's
    # CI turns green. None when the run never trained (or the CI gate left no time).
    seconds_to_first_epoch: float | None = None
    # What went wrong without failing the run (a checkpoint that could not be written), one line each, never a secret.
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # room for later additions without a contract change

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (an XCom)."""
        data = asdict(self)
        data["cost"] = self.cost.to_dict() if self.cost else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunReport:
        values = _known(cls, data)
        cost = values.get("cost")
        values["cost"] = Cost.from_dict(cost) if cost else None
        return cls(**values)

    @property
    def succeeded(self) -> bool:
        return self.outcome == "success"


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The fields `cls` declares; a missing one without a default is a KeyError naming it."""
    names = {f.name for f in fields(cls)}
    missing = sorted(
        f.name for f in fields(cls) if f.name not in data and f.default is MISSING and f.default_factory is MISSING
    )
    if missing:
        raise KeyError(f"{cls.__name__}: missing fields {missing}")
    return {key: value for key, value in data.items() if key in names}


def error_line(error: BaseException | str | None, redact: Callable[[str], str] | None = None) -> str | None:
    """The first non-empty line of an error, scrubbed (and passed through `redact`, e.g. Airflow's secrets masker,
    before it is cut) and cut to MAX_ERROR_CHARS: what a report may say."""
    if error is None:
        return None
    if isinstance(error, BaseException):
        # Airflow's own wrappers (AirflowFailException around a ConfigError's text) add nothing a person needs.
        name = type(error).__name__
        text = str(error) if name.startswith("Airflow") and str(error) else f"{name}: {error}".rstrip(": ")
    else:
        text = error
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = scrub(redact(line) if redact else line)
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 1] + "…"
