"""orchestrator.observe.cost: EC2's per-second billing and the run's cost over its instances (pure)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from orchestrator.contracts_steps import Preemption, ReadyInstance
from orchestrator.observe.cost import (
    BY_TEARDOWN,
    SECONDS_PER_MONTH,
    BilledInstance,
    Price,
    billed_seconds,
    end_reason,
    run_cost,
    seconds_lost_to_preemption,
    transition_time,
)
from tests.support.step_results import READY
from tests.support.zone import machine_zone

TABLE = Price(0.8048, "fallback-table", "prices.toml")
SPOT = Price(0.30, "spot-price-history", "us-east-1a")


def attempt(
    instance_id: str, launched_at: float, ended_at: float, price: Price = TABLE, **changes: Any
) -> BilledInstance:
    """An on-demand g6.xlarge without a root volume, unless `changes` say otherwise."""
    values: dict[str, Any] = {
        "instance_type": "g6.xlarge",
        "market": "on-demand",
        "availability_zone": "us-east-1a",
        "ended_by": BY_TEARDOWN,
        "root_volume_gb": 0,
        "volume_usd_per_gb_month": 0.08,
        "on_demand_usd_per_hour": price.usd_per_hour,
        **changes,
    }
    return BilledInstance(instance_id, launched_at, ended_at, price, **values)


def taken_back(instance_id: str, launched_at: float, ended_at: float, **changes: Any) -> BilledInstance:
    """A spot attempt EC2 took back, priced 0.30 USD/h against 0.8048 on demand."""
    spot = {
        "market": "spot",
        "on_demand_usd_per_hour": 0.8048,
        "ended_by": "taken back by EC2 (Server.SpotInstanceTermination)",
    }
    return attempt(instance_id, launched_at, ended_at, SPOT, **{**spot, **changes})


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("User initiated (2026-11-26 20:01:02 GMT)", datetime(2026, 11, 26, 20, 1, 2, tzinfo=UTC)),  # AWS
        ("User initiated (2026-11-26 20:01:02 UTC)", datetime(2026, 11, 26, 20, 1, 2, tzinfo=UTC)),  # moto
        ("", None),
        (None, None),
        ("Server.SpotInstanceTermination", None),
    ],
)
def test_transition_time(reason: str | None, expected: datetime | None) -> None:
    assert transition_time(reason) == (expected.timestamp() if expected else None)


@pytest.mark.parametrize(
    ("seconds", "billed"), [(0.0, 60.0), (12.0, 60.0), (60.0, 60.0), (60.2, 61.0), (899.0, 899.0), (-5.0, 60.0)]
)
def test_billed_seconds_per_second_with_a_minute_minimum(seconds: float, billed: float) -> None:
    assert billed_seconds(1000.0, 1000.0 + seconds) == billed


def test_run_cost_of_one_instance() -> None:
    cost = run_cost([attempt("i-1", 0.0, 900.0)], training_s=855.0, region="us-east-1")
    assert cost is not None
    assert cost.usd == pytest.approx(900 / 3600 * 0.8048)
    assert (cost.billed_s, cost.training_s, cost.non_training_s) == (900.0, 855.0, 45.0)
    assert cost.training_share == 0.95
    assert (cost.usd_per_hour, cost.price_source, cost.region) == (0.8048, "fallback-table", "us-east-1")


def test_run_cost_sums_every_instance_and_bounds_training() -> None:
    replaced = taken_back("i-1", 0.0, 20.0)  # taken back before it ran: a minute is billed anyway
    cost = run_cost([replaced, taken_back("i-2", 100.0, 700.0)], training_s=1e6, region="us-east-1")
    assert cost is not None
    assert cost.billed_s == 660.0
    assert cost.usd == pytest.approx(660 / 3600 * 0.30)
    assert (cost.training_s, cost.non_training_s, cost.training_share) == (660.0, 0.0, 1.0)
    assert cost.price_source == "spot-price-history"
    assert run_cost([], 10.0, "us-east-1") is None


def test_the_reason_time_is_utc_whatever_the_machine_zone() -> None:
    with machine_zone("America/New_York"):
        assert transition_time("User initiated (2026-11-26 20:01:02 GMT)") == 1795723262.0


def test_run_cost_rounds_each_figure_to_its_own_precision() -> None:
    # Figures chosen so that one digit more or fewer in any rounding changes the Cost.
    instance = attempt("i-1", 0.0, 90.0, Price(1.23456789, "fallback-table", "prices.toml"))
    cost = run_cost([instance], 30.34, "us-east-1")
    assert cost is not None
    assert cost.to_dict() == {
        "usd": 0.030864,
        "billed_s": 90.0,
        "training_s": 30.3,
        "non_training_s": 59.7,
        "training_share": 0.3371,
        "usd_per_hour": 1.234568,
        "price_source": "fallback-table",
        "region": "us-east-1",
        "volume_usd": 0.0,
        "saving_vs_on_demand_usd": 0.0,
    }


def test_a_run_that_never_trained_has_no_training_seconds() -> None:
    cost = run_cost([attempt("i-1", 0.0, 90.0)], 0.0, "us-east-1")
    assert cost is not None and (cost.training_s, cost.non_training_s, cost.training_share) == (0.0, 90.0, 0.0)


def test_the_cost_is_the_sum_of_its_attempts_each_at_its_own_price_with_its_root_volume() -> None:
    attempts = [
        taken_back("i-1", 0.0, 1800.0, availability_zone="us-east-1a", root_volume_gb=100),
        # The relaunch went on demand in zone b: its own market and price.
        attempt("i-2", 1850.0, 3650.0, availability_zone="us-east-1b", root_volume_gb=100),
    ]
    cost = run_cost(attempts, training_s=3000.0, region="us-east-1")
    assert cost is not None
    records = [a.to_dict() for a in attempts]
    assert cost.usd == round(sum(r["usd"] for r in records), 6)
    assert cost.billed_s == sum(r["billed_s"] for r in records) == 3600.0
    volumes = 2 * 100 * 0.08 * 1800 / SECONDS_PER_MONTH
    assert cost.volume_usd == round(volumes, 6)
    assert cost.usd == pytest.approx(0.5 * 0.30 + 0.5 * 0.8048 + volumes, abs=1e-6)
    assert cost.usd_per_hour == pytest.approx((0.30 + 0.8048) / 2)  # the instances' price, without the volumes
    # The same seconds on demand: the spot attempt's half hour at 0.8048 instead of 0.30.
    assert cost.saving_vs_on_demand_usd == round(0.5 * (0.8048 - 0.30), 6)
    assert records[0] == {
        "instance_id": "i-1",
        "instance_type": "g6.xlarge",
        "market": "spot",
        "availability_zone": "us-east-1a",
        "launched_at": 0.0,
        "ended_at": 1800.0,
        "billed_s": 1800.0,
        "usd_per_hour": 0.30,
        "price_source": "spot-price-history",
        "root_volume_gb": 100,
        "usd": round(0.5 * 0.30 + volumes / 2, 6),
        "ended_by": "taken back by EC2 (Server.SpotInstanceTermination)",
    }


def test_no_saving_without_every_on_demand_price() -> None:
    cost = run_cost([taken_back("i-1", 0.0, 600.0, on_demand_usd_per_hour=None)], 0.0, "us-east-1")
    assert cost is not None and cost.saving_vs_on_demand_usd is None


@pytest.mark.parametrize(
    ("state", "state_reason", "preemption", "by_teardown", "expected"),
    [
        (
            "terminated",
            "Server.SpotInstanceTermination",
            "Server.SpotInstanceTermination",
            False,
            "taken back by EC2 (Server.SpotInstanceTermination)",
        ),
        ("terminated", None, "", True, "taken back by EC2 (no reason given)"),
        ("terminated", "Client.UserInitiatedShutdown: User initiated shutdown", None, True, BY_TEARDOWN),
        (
            "terminated",
            "Client.InstanceInitiatedShutdown: Instance initiated shutdown",
            None,
            False,
            "terminated: Client.InstanceInitiatedShutdown: Instance initiated shutdown",
        ),
        ("shutting-down", None, None, False, "shutting-down"),
        ("running", None, None, False, "still running when the report ran"),
    ],
)
def test_end_reason(
    state: str, state_reason: str | None, preemption: str | None, by_teardown: bool, expected: str
) -> None:
    assert end_reason(state, state_reason, preemption, by_teardown) == expected


def _preemption(instance_id: str, ended_at: float) -> Preemption:
    return Preemption(instance_id, "g6.xlarge", "spot", "us-east-1a", "Server.SpotInstanceTermination", ended_at)


def test_seconds_lost_run_from_each_take_back_to_the_next_launch_and_the_last_one_ready() -> None:
    ready = ReadyInstance.from_xcom({**READY, "instance_id": "i-3", "seconds_to_ready": 95.0})
    attempts = [attempt("i-3", 2000.0, 3000.0), taken_back("i-1", 0.0, 1000.0), taken_back("i-2", 1030.0, 1900.0)]
    preemptions = [_preemption("i-1", 1010.0), _preemption("i-2", 1950.0)]
    # i-1 seen gone at 1010, i-2 launched at 1030; i-2 seen gone at 1950, i-3 launched at 2000 and ready 95 s later.
    assert seconds_lost_to_preemption(attempts, preemptions, ready) == 20.0 + 50.0 + 95.0
    # The last ready instance is not the relaunch (wait_ready's, before the take-backs): no boot time is known.
    assert seconds_lost_to_preemption(attempts, preemptions, None) == 70.0
    # A take-back that ended the run, or an instance EC2 no longer describes, adds nothing.
    assert seconds_lost_to_preemption(attempts[1:], preemptions, ready) == 20.0
    assert seconds_lost_to_preemption([], preemptions, ready) == 0.0
