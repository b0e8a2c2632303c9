"""orchestrator.observe.cost_cap: the deadline the guard enforces, counted as the report bills (every attempt, the root
volumes, EC2's minute), and the check before launch."""

from __future__ import annotations

import pytest

from orchestrator.errors import ConfigError
from orchestrator.observe.cost import SECONDS_PER_MONTH, BilledInstance, Price, run_cost
from orchestrator.observe.cost_cap import cap_deadline, check_cap_covers, cost_cap, usd_per_second

LAUNCHED = 1_800_000_000.0
GP3 = 0.08


def attempt(
    instance_id: str, launched_at: float, ended_at: float, usd_per_hour: float, gb: int = 100
) -> BilledInstance:
    return BilledInstance(
        instance_id,
        launched_at,
        ended_at,
        Price(usd_per_hour, "fallback-table", "test"),
        instance_type="g6.xlarge",
        market="spot",
        availability_zone="us-east-1a",
        ended_by="test",
        root_volume_gb=gb,
        volume_usd_per_gb_month=GP3,
        on_demand_usd_per_hour=None,
    )


def test_the_rate_counts_the_root_volume_per_second():
    assert usd_per_second(3.6, 0, GP3) == pytest.approx(0.001)
    assert usd_per_second(3.6, 100, GP3) == pytest.approx(0.001 + 100 * GP3 / SECONDS_PER_MONTH)


def test_the_deadline_is_the_last_second_within_the_cap():
    # 3.6 USD/h = 0.001 USD/s: 0.5 USD buys 500 s.
    assert cap_deadline(0.5, LAUNCHED, 0.001, 0.0) == LAUNCHED + 500
    # Earlier attempts' cost comes off the budget first.
    assert cap_deadline(0.5, LAUNCHED, 0.001, 0.2) == LAUNCHED + 300
    # A fraction of a second is not bought: EC2 bills it whole.
    assert cap_deadline(0.5005, LAUNCHED, 0.001, 0.0) == LAUNCHED + 500


def test_a_budget_under_ec2s_minute_is_spent_at_the_launch():
    assert cap_deadline(0.059, LAUNCHED, 0.001, 0.0) == LAUNCHED
    assert cap_deadline(0.5, LAUNCHED, 0.001, 0.45) == LAUNCHED
    assert cap_deadline(0.5, LAUNCHED, 0.001, 0.6) == LAUNCHED


def test_the_cost_at_the_deadline_as_the_report_bills_it_stays_within_the_cap():
    """The report's own arithmetic (observe.cost.run_cost) at the deadline: within the cap, and past it a second
    later. The earlier attempt (a spot instance taken back) is billed with its volume too."""
    earlier = attempt("i-earlier", LAUNCHED - 2000, LAUNCHED - 1500, 1.006)
    current = attempt("i-current", LAUNCHED, LAUNCHED, 0.8048)
    cap = cost_cap(0.25, [earlier, current], "i-current")
    at_deadline = run_cost([earlier, attempt("i-current", LAUNCHED, cap.deadline, 0.8048)], 0, "us-east-1")
    past = run_cost([earlier, attempt("i-current", LAUNCHED, cap.deadline + 1, 0.8048)], 0, "us-east-1")
    assert at_deadline is not None and past is not None
    assert at_deadline.usd <= 0.25 < past.usd
    assert cap.reason.startswith("cost cap: the run's cost would pass training.max_cost_usd = 0.25 USD (i-current")
    assert "1 earlier instance(s)" in cap.reason and "100 GB root volume" in cap.reason
    assert cap.file_text() == f"{cap.deadline}\n{cap.reason}\n"
    assert not cap.passed(cap.deadline - 1) and cap.passed(cap.deadline)


def test_an_instance_with_no_known_price_has_no_deadline():
    cap = cost_cap(0.25, [attempt("i-free", LAUNCHED, LAUNCHED, 0.0, gb=0)], "i-free")
    assert not cap.passed(LAUNCHED + 10**8)


def test_a_cap_that_cannot_pay_a_minute_fails_before_launch_naming_the_setting():
    check_cap_covers(0.02, 0.8048, 100, GP3)  # a minute costs 0.0135 USD
    check_cap_covers(0.0, 100.0, 100, GP3)  # off
    with pytest.raises(ConfigError, match=r"training.max_cost_usd = 0.01 USD cannot pay for the minute EC2 bills"):
        check_cap_covers(0.01, 0.8048, 100, GP3)


def test_plan_launch_s_check_prices_the_cheapest_launch_option(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.config.settings import load_settings
    from orchestrator.observe import pricing
    from orchestrator.observe.cost_cap import preflight_cost_cap

    asked: list[tuple[str, str]] = []

    def price(aws: object, region: str, instance_type: str, market: str, zone: object, at: float) -> Price:
        asked.append((instance_type, market))
        return Price(0.3 if market == "spot" else 0.8048, "fallback-table", "test")

    monkeypatch.setattr(pricing, "instance_price", price)
    env = {
        "TRAINER__AWS__DEPLOYMENT": "cap-test",
        "TRAINER__AWS__INSTANCE_TYPES": "g6.xlarge,g5.xlarge",
        "TRAINER__AWS__SPOT": "true",
        "TRAINER__AWS__SPOT_FALLBACK_TO_ON_DEMAND": "true",
    }
    # The cheapest minute is spot's: 0.3 USD/h + 100 GB, 0.0052 USD.
    preflight_cost_cap(load_settings(env={**env, "TRAINER__TRAINING__MAX_COST_USD": "0.006"}), 100)
    assert sorted(asked) == sorted([(t, m) for t in ("g6.xlarge", "g5.xlarge") for m in ("spot", "on-demand")])
    with pytest.raises(ConfigError, match=r"training.max_cost_usd = 0.005 USD cannot pay .* at 0.3 USD/h"):
        preflight_cost_cap(load_settings(env={**env, "TRAINER__TRAINING__MAX_COST_USD": "0.005"}), 100)
    asked.clear()
    preflight_cost_cap(load_settings(env=env), 100)
    assert not asked, "no cap, no price asked"
