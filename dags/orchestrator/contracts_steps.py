"""The step results that travel between the training DAG's tasks by XCom, typed.

Each producer returns `X.to_xcom()`; each consumer reads `X.from_xcom(value)` once, at its task boundary, and uses
attributes from there on. The JSON keys and value types are the XCom format: a task deferred or queued before an
upgrade reads what its upstream wrote before it, so a field is never renamed or retyped, only added with a default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal, Self, get_args, get_type_hints

from orchestrator.errors import OrchestratorError

Market = Literal["spot", "on-demand"]

# What every error here ends with: the upstream step must write its XCom again.
_CLEAR_UPSTREAM = "clear that step (and what follows it) so it runs again"


class StepResultError(OrchestratorError):
    """A step's XCom lacks a key or holds a value of another type: written by another version of the DAG, or by hand.
    No retry can fix it: the upstream step must run again."""

    terminal = True


class _Reader:
    """One step's XCom as read back: each key is checked for presence and type, and an error names the step and key."""

    def __init__(self, step: str, what: str, value: object) -> None:
        self.where = f"{step}'s XCom ({what})"
        if not isinstance(value, Mapping):
            raise StepResultError(f"{self.where} is {type(value).__name__}, not a JSON object: {_CLEAR_UPSTREAM}")
        self.value = value

    def _get(self, key: str, types: tuple[type, ...], expected: str) -> Any:
        if key not in self.value:
            raise StepResultError(f"{self.where} has no key {key!r}: {_CLEAR_UPSTREAM}")
        found = self.value[key]
        # bool is an int to isinstance: a flag where a number belongs is malformed all the same.
        if not isinstance(found, types) or (isinstance(found, bool) and bool not in types):
            raise StepResultError(f"{self.where}: {key!r} is {found!r}, not {expected}: {_CLEAR_UPSTREAM}")
        return found

    def as_type(self, key: str, annotation: object) -> Any:
        """`key`'s value, read as a field annotated `annotation` is."""
        readers: dict[object, Any] = {
            str: self.text,
            str | None: self.text_or_none,
            int: self.integer,
            float: self.number,
            float | None: self.number_or_none,
            bool: self.flag,
            Market: self.market,
            dict[str, float]: self.numbers,
        }
        return readers[annotation](key)

    def text(self, key: str) -> str:
        return str(self._get(key, (str,), "a string"))

    def text_or_none(self, key: str) -> str | None:
        found = self._get(key, (str, type(None)), "a string or null")
        return None if found is None else str(found)

    def integer(self, key: str) -> int:
        return int(self._get(key, (int,), "an integer"))

    def number(self, key: str) -> float:
        return float(self._get(key, (int, float), "a number"))

    def number_or_none(self, key: str) -> float | None:
        found = self._get(key, (int, float, type(None)), "a number or null")
        return None if found is None else float(found)

    def flag(self, key: str) -> bool:
        return bool(self._get(key, (bool,), "true or false"))

    def market(self, key: str) -> Market:
        found = self.text(key)
        for market in get_args(Market):
            if found == market:
                return market
        raise StepResultError(f"{self.where}: {key!r} is {found!r}, not one of {get_args(Market)}: {_CLEAR_UPSTREAM}")

    def numbers(self, key: str) -> dict[str, float]:
        found = self._get(key, (Mapping,), "a JSON object")
        if not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in found.items()
        ):
            raise StepResultError(f"{self.where}: {key!r} is {found!r}, not names to numbers: {_CLEAR_UPSTREAM}")
        return {k: float(v) for k, v in found.items()}


class _StepResult:
    """to_xcom / from_xcom for a frozen dataclass of step results: the fields are the XCom's keys, and each value is
    read with the check its field's type calls for (every field required, as the producers always write it)."""

    STEP: ClassVar[str]
    WHAT: ClassVar[str]

    def to_xcom(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_xcom(cls, value: object) -> Self:
        read = _Reader(cls.STEP, cls.WHAT, value)
        hints = get_type_hints(cls)
        return cls(**{f.name: read.as_type(f.name, hints[f.name]) for f in fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True)
class LaunchPlan(_StepResult):
    """plan_launch's result: the image the instance boots (checked before anything is launched) and the run's
    identity, which every launch try tags its instance with."""

    STEP: ClassVar[str] = "plan_launch"

    ami_id: str
    # The image's name, recorded on the MLflow run: the id alone says nothing once the image is gone ("" if unnamed).
    ami_name: str
    root_device_name: str
    root_volume_gb: int
    git_sha: str
    dag_id: str
    run_id: str
    # An image bake's builder (ec2_bake_image): its bootstrap runs in bake mode.
    bake: bool = False

    WHAT: ClassVar[str] = "the launch plan"


@dataclass(frozen=True)
class LaunchedInstance(_StepResult):
    """launch's result: the run's instance, running, and the host key it was launched with."""

    STEP: ClassVar[str] = "launch"

    instance_id: str
    instance_type: str
    market: Market
    # True when an earlier try's live instance was found and adopted instead of launching another.
    reused: bool
    # The SSH host key the instance was launched with (from its tag when adopted), to pin on connect.
    host_public_key: str = ""

    WHAT: ClassVar[str] = "the launched instance"


@dataclass(frozen=True)
class RunningInstance(_StepResult):
    """wait_ready's view of the running instance (contracts.RUNNING_KEY), kept for its resumption after a deferral:
    where it answers, and the ready wait's bounds (epoch seconds; the deadline counts from EC2's launch time)."""

    STEP: ClassVar[str] = "wait_ready"

    instance_id: str
    instance_type: str
    market: Market
    address: str
    started_at: float
    deadline: float
    seconds_to_running: float

    WHAT: ClassVar[str] = "the running instance"


@dataclass(frozen=True)
class ReadyInstance(_StepResult):
    """wait_ready's result: where train logs in (address, port and pinned host key) and how long each stage took
    (the bootstrap's own steps as the instance timed them)."""

    STEP: ClassVar[str] = "wait_ready"

    instance_id: str
    instance_type: str
    market: Market
    address: str
    port: int
    host_public_key: str
    seconds_to_running: float
    seconds_to_ssh: float
    seconds_to_ready: float
    bootstrap_phases_s: dict[str, float]

    WHAT: ClassVar[str] = "the ready instance"


@dataclass(frozen=True)
class Preemption(_StepResult):
    """One spot instance EC2 took back while the run booted or trained on it: what it was, where, and when it ended
    (epoch seconds), for the bound aws.max_preemptions and the report's attempts and cost."""

    # Each of these steps lists the interruptions it recovered from under contracts.PREEMPTIONS_KEY, in the run's
    # order: wait_ready before the job started, train while it ran.
    STEPS: ClassVar[tuple[str, ...]] = ("wait_ready", "train")
    STEP: ClassVar[str] = "wait_ready or train"

    instance_id: str
    instance_type: str
    market: Market
    availability_zone: str
    # EC2's StateReason code, e.g. Server.SpotInstanceTermination.
    reason: str
    ended_at: float

    WHAT: ClassVar[str] = "a preemption record"


@dataclass(frozen=True)
class Evaluation(_StepResult):
    """The champion gate's verdict on a run (evaluate's result; a sweep's gate_best_set nests it as "evaluation")."""

    STEP: ClassVar[str] = "evaluate"

    run_id: str
    metric: str
    value: float
    # None: there was no champion to beat.
    champion_value: float | None
    promoted: bool
    reason: str
    # The registered version; None when the run was not registered (it lost, or a sweep's run left it to the sweep).
    model_version: str | None

    WHAT: ClassVar[str] = "the evaluation"
