"""What a run's instances cost: EC2's per-second billing over their lifetimes, times a price. Pure functions.

EC2 bills a Linux instance per second, with a 60-second minimum, from its launch to the moment its state changes to
shutting-down (on-demand and spot alike); the price comes from orchestrator.observe.pricing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from orchestrator.observe.report import MIN_BILLED_S, Cost

# DescribeInstances' StateTransitionReason once someone asked for a stop or termination: "User initiated
# (2026-11-26 20:01:02 GMT)" (moto writes UTC). The time is when it was asked, i.e. when billing ended.
_TRANSITION_TIME_RE = re.compile(r"\((\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) (?:GMT|UTC)\)")


@dataclass(frozen=True)
class Price:
    usd_per_hour: float
    source: str  # one of report.PRICE_SOURCES
    detail: str  # where exactly (the table's date, the spot price's zone and time, why the API was not used)


@dataclass(frozen=True)
class BilledInstance:
    instance_id: str
    launched_at: float  # epoch seconds, EC2's LaunchTime
    ended_at: float  # epoch seconds: when its termination was asked (or seen)
    price: Price

    @property
    def billed_s(self) -> float:
        return billed_seconds(self.launched_at, self.ended_at)

    @property
    def usd(self) -> float:
        return self.billed_s / 3600 * self.price.usd_per_hour


def transition_time(state_transition_reason: str | None) -> float | None:
    """The epoch seconds in EC2's StateTransitionReason, or None when it holds no time (e.g. a running instance)."""
    match = _TRANSITION_TIME_RE.search(state_transition_reason or "")
    if not match:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()


def billed_seconds(launched_at: float, ended_at: float) -> float:
    """Whole seconds, at least MIN_BILLED_S: EC2 rounds a partial second up and bills a minute at least."""
    return max(MIN_BILLED_S, float(math.ceil(max(0.0, ended_at - launched_at))))


def run_cost(instances: Sequence[BilledInstance], training_s: float, region: str) -> Cost | None:
    """The run's cost over every instance it had (a replaced spot instance is billed too); None with none.

    The price and its source are the first (the training) instance's when all share one; the hourly price is the
    billed-time average across them otherwise, and the source the first's.
    """
    if not instances:
        return None
    billed_s = sum(i.billed_s for i in instances)
    usd = sum(i.usd for i in instances)
    training_s = min(max(0.0, training_s), billed_s)
    return Cost(
        usd=round(usd, 6),
        billed_s=billed_s,
        training_s=round(training_s, 1),
        non_training_s=round(billed_s - training_s, 1),
        training_share=round(training_s / billed_s, 4),
        usd_per_hour=round(usd / billed_s * 3600, 6),
        price_source=instances[0].price.source,
        region=region,
    )
