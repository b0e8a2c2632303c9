"""training.max_cost_usd as a deadline the instance's guard enforces (userdata/guard.sh): the moment the run's cost,
every attempt's instance and root volume billed as observe.cost bills them, would pass the cap.

The earlier attempts (spot instances EC2 took back) cost what they were billed; the current one costs its price per
second, root volume included, from its launch, with EC2's one-minute minimum. Train writes the deadline and its reason
into the job's folder as it starts the job on each instance (docs/decisions/0121-*).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.errors import ConfigError
from orchestrator.observe.cost import SECONDS_PER_MONTH, BilledInstance
from orchestrator.observe.report import MIN_BILLED_S

if TYPE_CHECKING:
    from orchestrator.config.settings import Settings

log = logging.getLogger(__name__)

SETTING = "training.max_cost_usd"


@dataclass(frozen=True)
class CostCap:
    """When the current attempt must stop (epoch seconds) and why, in the words the run fails with."""

    deadline: int
    reason: str

    def passed(self, now: float) -> bool:
        return now >= self.deadline

    def file_text(self) -> str:
        """The job folder's cost-deadline file as the guard reads it: the epoch, then the reason."""
        return f"{self.deadline}\n{self.reason}\n"


def usd_per_second(usd_per_hour: float, root_volume_gb: int, volume_usd_per_gb_month: float) -> float:
    """What one more second of an instance costs, its root volume included (both billed per second)."""
    return usd_per_hour / 3600 + root_volume_gb * volume_usd_per_gb_month / SECONDS_PER_MONTH


def cap_deadline(max_cost_usd: float, launched_at: float, rate_usd_per_s: float, earlier_usd: float) -> int:
    """The last whole second after `launched_at` at which the run's cost (`earlier_usd` plus this attempt's billed
    seconds at `rate_usd_per_s`) is still within the cap; `launched_at` itself when even EC2's minute does not fit."""
    if rate_usd_per_s <= 0:
        # No known price (a type missing from the table): nothing to count against the cap.
        return 2**31 - 1
    budget_s = (max_cost_usd - earlier_usd) / rate_usd_per_s
    if budget_s < MIN_BILLED_S:
        return math.floor(launched_at)
    return math.floor(launched_at + math.floor(budget_s))


def cost_cap(max_cost_usd: float, attempts: Sequence[BilledInstance], current_id: str) -> CostCap:
    """The current attempt's deadline under the cap, after the earlier attempts (every other one in `attempts`)."""
    current = next(a for a in attempts if a.instance_id == current_id)
    earlier = [a for a in attempts if a.instance_id != current_id]
    earlier_usd = sum(a.usd for a in earlier)
    rate = usd_per_second(current.price.usd_per_hour, current.root_volume_gb, current.volume_usd_per_gb_month)
    deadline = cap_deadline(max_cost_usd, current.launched_at, rate, earlier_usd)
    before = f", {earlier_usd:.4f} USD for {len(earlier)} earlier instance(s)" if earlier else ""
    reason = (
        f"cost cap: the run's cost would pass {SETTING} = {max_cost_usd:g} USD ({current.instance_id}, "
        f"{current.instance_type} {current.market} at {current.price.usd_per_hour:g} USD/h with its "
        f"{current.root_volume_gb} GB root volume{before})"
    )
    return CostCap(deadline, reason)


def run_cost_cap(s: Settings, earlier_ids: Sequence[str], current_id: str, root_volume_gb: int) -> CostCap | None:
    """The cap's deadline for the instance the job runs on now (None with the cap off): each attempt's launch from
    EC2 and its price as the report finds them (observe.pricing)."""
    from orchestrator.observe.gather import billed_attempts

    if not s.training.max_cost_usd:
        return None
    ids = [*dict.fromkeys([*earlier_ids, current_id])]
    attempts = billed_attempts(s, ids, time.time(), [], set(), root_volume_gb)
    if not any(a.instance_id == current_id for a in attempts):
        log.warning("EC2 does not describe %s: no cost deadline for its job", current_id)
        return None
    cap = cost_cap(s.training.max_cost_usd, attempts, current_id)
    log.info("Cost cap %s USD: the job on %s stops at %s", s.training.max_cost_usd, current_id, _utc(cap.deadline))
    return cap


def check_cap_covers(max_cost_usd: float, usd_per_hour: float, root_volume_gb: int, gp3: float) -> None:
    """A cap that cannot pay for EC2's minimum billed minute of the cheapest launch option fails now, naming the
    setting: any instance launched would pass it at once."""
    needed = usd_per_second(usd_per_hour, root_volume_gb, gp3) * MIN_BILLED_S
    if max_cost_usd and needed > max_cost_usd:
        raise ConfigError(
            f"{SETTING} = {max_cost_usd:g} USD cannot pay for the minute EC2 bills at least ({needed:.4f} USD at "
            f"{usd_per_hour:g} USD/h, the cheapest launch option, with a {root_volume_gb} GB root volume): raise it, "
            "or set it to 0 for no cap"
        )


def preflight_cost_cap(s: Settings, root_volume_gb: int) -> None:
    """plan_launch's check of the cap, before anything is launched: the cheapest of the run's types and markets."""
    from orchestrator.cloud.launch_spec import launch_markets
    from orchestrator.config.connections import AwsClients
    from orchestrator.observe.pricing import gp3_usd_per_gb_month, instance_price

    if not s.training.max_cost_usd:
        return
    aws, now = AwsClients(s.aws.conn_id, s.aws.region), time.time()
    cheapest = min(
        instance_price(aws, s.aws.region, instance_type, market, None, now).usd_per_hour
        for instance_type in s.aws.instance_types
        for market in launch_markets(s.aws.spot, s.aws.spot_fallback_to_on_demand)
    )
    check_cap_covers(s.training.max_cost_usd, cheapest, root_volume_gb, gp3_usd_per_gb_month(s.aws.region))


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
