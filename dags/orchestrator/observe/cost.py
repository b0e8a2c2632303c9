"""What a run's instances cost: EC2's per-second billing over their lifetimes, times a price. Pure functions.

EC2 bills a Linux instance per second, with a 60-second minimum, from its launch to the moment its state changes to
shutting-down (on-demand and spot alike); the price comes from orchestrator.observe.pricing. Each instance the run
launched is one attempt (a spot instance EC2 took back, then its replacement), billed at its own market and price,
with its root EBS volume (gp3, per GB-month, billed per second over the same span: it is created at the launch and
deleted with the instance).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from orchestrator.cloud.ec2_describe import GONE_STATES
from orchestrator.contracts_steps import Market, Preemption, ReadyInstance
from orchestrator.observe.report import MIN_BILLED_S, Cost

# DescribeInstances' StateTransitionReason once someone asked for a stop or termination: "User initiated
# (2026-11-26 20:01:02 GMT)" (moto writes UTC). The time is when it was asked, i.e. when billing ended.
_TRANSITION_TIME_RE = re.compile(r"\((\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) (?:GMT|UTC)\)")
# The month of EBS's GB-month prices: AWS's pricing calculator counts 730 hours.
SECONDS_PER_MONTH = 730 * 3600.0
BY_TEARDOWN = "terminated by the teardown"


@dataclass(frozen=True)
class Price:
    usd_per_hour: float
    source: str  # one of report.PRICE_SOURCES
    detail: str  # where exactly (the table's date, the spot price's zone and time, why the API was not used)


@dataclass(frozen=True)
class BilledInstance:
    """One attempt of the run: an instance it launched, billed at its own price, and why it ended."""

    instance_id: str
    launched_at: float  # epoch seconds, EC2's LaunchTime
    ended_at: float  # epoch seconds: when its termination was asked (or seen)
    price: Price
    instance_type: str
    market: Market
    availability_zone: str | None
    ended_by: str  # end_reason
    root_volume_gb: int
    volume_usd_per_gb_month: float
    # The type's on-demand price (the instance's own for an on-demand one); None when no source knows it.
    on_demand_usd_per_hour: float | None

    @property
    def billed_s(self) -> float:
        return billed_seconds(self.launched_at, self.ended_at)

    @property
    def instance_usd(self) -> float:
        return self.billed_s / 3600 * self.price.usd_per_hour

    @property
    def volume_usd(self) -> float:
        return self.root_volume_gb * self.volume_usd_per_gb_month * self.billed_s / SECONDS_PER_MONTH

    @property
    def usd(self) -> float:
        return self.instance_usd + self.volume_usd

    @property
    def saving_vs_on_demand_usd(self) -> float | None:
        """Its billed seconds at its type's on-demand price minus its cost (the volume costs the same either way)."""
        if self.on_demand_usd_per_hour is None:
            return None
        return self.billed_s / 3600 * (self.on_demand_usd_per_hour - self.price.usd_per_hour)

    def to_dict(self) -> dict[str, Any]:
        """The report's record of the attempt (RunReport.attempts), JSON-able; `usd` counts its root volume."""
        return {
            "instance_id": self.instance_id,
            "instance_type": self.instance_type,
            "market": self.market,
            "availability_zone": self.availability_zone,
            "launched_at": self.launched_at,
            "ended_at": self.ended_at,
            "billed_s": self.billed_s,
            "usd_per_hour": self.price.usd_per_hour,
            "price_source": self.price.source,
            "root_volume_gb": self.root_volume_gb,
            "usd": round(self.usd, 6),
            "ended_by": self.ended_by,
        }


def transition_time(state_transition_reason: str | None) -> float | None:
    """The epoch seconds in EC2's StateTransitionReason, or None when it holds no time (e.g. a running instance)."""
    match = _TRANSITION_TIME_RE.search(state_transition_reason or "")
    if not match:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()


def billed_seconds(launched_at: float, ended_at: float) -> float:
    """Whole seconds, at least MIN_BILLED_S: EC2 rounds a partial second up and bills a minute at least."""
    return max(MIN_BILLED_S, float(math.ceil(max(0.0, ended_at - launched_at))))


def end_reason(state: str, state_reason: str | None, preemption_reason: str | None, by_teardown: bool) -> str:
    """Why an attempt ended, for people: EC2 took it back (the preemption record's reason), the teardown ended it,
    or what EC2 says (its state reason); one still up when the report ran says so."""
    if preemption_reason is not None:
        return f"taken back by EC2 ({preemption_reason or 'no reason given'})"
    if state not in GONE_STATES:
        return f"still {state} when the report ran"
    if by_teardown:
        return BY_TEARDOWN
    return f"{state}: {state_reason}" if state_reason else state


def run_cost(instances: Sequence[BilledInstance], training_s: float, region: str) -> Cost | None:
    """The run's cost over every attempt (a replaced spot instance is billed too) and their root volumes; None with
    none. `usd` is the sum of the attempts' own `usd` as the report records them (rounded), so the two always agree.

    The hourly price and its source are the first (the training) instance's when all share one; the hourly price is
    the billed-time average across them otherwise (instances only), and the source the first's.
    """
    if not instances:
        return None
    billed_s = sum(i.billed_s for i in instances)
    instance_usd = sum(i.instance_usd for i in instances)
    savings = [s for i in instances if (s := i.saving_vs_on_demand_usd) is not None]
    training_s = min(max(0.0, training_s), billed_s)
    return Cost(
        usd=round(sum(round(i.usd, 6) for i in instances), 6),
        billed_s=billed_s,
        training_s=round(training_s, 1),
        non_training_s=round(billed_s - training_s, 1),
        training_share=round(training_s / billed_s, 4),
        usd_per_hour=round(instance_usd / billed_s * 3600, 6),
        price_source=instances[0].price.source,
        region=region,
        volume_usd=round(sum(i.volume_usd for i in instances), 6),
        saving_vs_on_demand_usd=round(sum(savings), 6) if len(savings) == len(instances) else None,
    )


def seconds_lost_to_preemption(
    attempts: Sequence[BilledInstance], preemptions: Sequence[Preemption], ready: ReadyInstance | None
) -> float:
    """For each take-back, the seconds from it (as the run saw it) to the launch of the next attempt, plus that
    attempt's seconds_to_ready (its boot and bootstrap, timed from the ready wait's start just after the launch) when
    it is the instance the run was last made ready on (`ready`).

    The time a replacement took to get ready is known for that last one only: one that EC2 took back in turn counts
    its own take-back's wait for a relaunch, not its boot. A take-back with no next attempt (the run gave up) adds 0.
    """
    order = sorted(attempts, key=lambda a: a.launched_at)
    position = {a.instance_id: n for n, a in enumerate(order)}
    lost = 0.0
    for preemption in preemptions:
        n = position.get(preemption.instance_id)
        if n is None or n + 1 == len(order):
            continue
        following = order[n + 1]
        lost += max(0.0, following.launched_at - preemption.ended_at)
        if ready is not None and ready.instance_id == following.instance_id:
            lost += ready.seconds_to_ready
    return round(lost, 1)
