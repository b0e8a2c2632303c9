"""orchestrator.observe.cost: EC2's per-second billing and the run's cost over its instances (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from orchestrator.observe.cost import BilledInstance, Price, billed_seconds, run_cost, transition_time

TABLE = Price(0.8048, "fallback-table", "prices.toml")


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
    cost = run_cost([BilledInstance("i-1", 0.0, 900.0, TABLE)], training_s=855.0, region="us-east-1")
    assert cost is not None
    assert cost.usd == pytest.approx(900 / 3600 * 0.8048)
    assert (cost.billed_s, cost.training_s, cost.non_training_s) == (900.0, 855.0, 45.0)
    assert cost.training_share == 0.95
    assert (cost.usd_per_hour, cost.price_source, cost.region) == (0.8048, "fallback-table", "us-east-1")


def test_run_cost_sums_every_instance_and_bounds_training() -> None:
    spot = Price(0.30, "spot-price-history", "us-east-1a")
    replaced = BilledInstance("i-1", 0.0, 20.0, spot)  # taken back before it ran: a minute is billed anyway
    cost = run_cost([replaced, BilledInstance("i-2", 100.0, 700.0, spot)], training_s=1e6, region="us-east-1")
    assert cost is not None
    assert cost.billed_s == 660.0
    assert cost.usd == pytest.approx(660 / 3600 * 0.30)
    assert (cost.training_s, cost.non_training_s, cost.training_share) == (660.0, 0.0, 1.0)
    assert cost.price_source == "spot-price-history"
    assert run_cost([], 10.0, "us-east-1") is None


def test_the_reason_time_is_utc_whatever_the_machine_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert transition_time("User initiated (2026-11-26 20:01:02 GMT)") == 1795723262.0
    finally:
        monkeypatch.undo()
        time.tzset()


def test_run_cost_rounds_each_figure_to_its_own_precision() -> None:
    # Figures chosen so that one digit more or fewer in any rounding changes the Cost.
    instance = BilledInstance("i-1", 0.0, 90.0, Price(1.23456789, "fallback-table", "prices.toml"))
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
    }


def test_a_run_that_never_trained_has_no_training_seconds() -> None:
    cost = run_cost([BilledInstance("i-1", 0.0, 90.0, TABLE)], 0.0, "us-east-1")
    assert cost is not None and (cost.training_s, cost.non_training_s, cost.training_share) == (0.0, 90.0, 0.0)
