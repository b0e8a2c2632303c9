"""A finished run's metrics, pushed to a Prometheus Pushgateway for Prometheus to scrape and Grafana to show.

One Pushgateway group per (deployment, instance_type, market): bounded labels only, never a run id. The gateway keeps
the LAST push of a group, so the group holds two kinds of series (docs/decisions/0085-* to 0088-*):
- `ec2_trainer_last_run_*` gauges: the latest run of that group, stamped with `ec2_trainer_last_run_timestamp_seconds`.
  A push replaces the whole group (HTTP PUT): a run that stopped early leaves no phase or cost of an earlier run behind.
- `ec2_trainer_*_total` counters: runs by outcome, cost, billed and training seconds since the group began. The
  gateway cannot add, so each push reads the group's totals and pushes them plus this run.

`run_metric_families` is the pure builder; `push_run_metrics` reads the totals, pushes, and never raises.
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.observe.report import error_line

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from orchestrator.config.connections import BasicAuth
    from orchestrator.config.settings import MetricsSettings, Settings
    from orchestrator.observe.report import RunReport

log = logging.getLogger(__name__)

PREFIX = "ec2_trainer_"
OUTCOMES = ("success", "failed")
MARKETS = ("spot", "on-demand")
# The grouping key's value for a run that never got an instance (no type, no market) and for anything unexpected.
NONE = "none"
OTHER = "other"
# Instance types, phase and metric names as label values: short plain names. Anything else becomes OTHER (types) or is
# left out with a warning (phases, metrics): a label must never take an unbounded set of values.
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_TEST_METRIC_RE = re.compile(r"test_[a-z0-9_]{1,59}")
# Phases come from the DAG's steps and userdata/bootstrap.sh, test metrics from the training job: a few each.
MAX_SERIES_PER_LABEL = 32

RUNS_TOTAL = f"{PREFIX}runs_total"
COST_TOTAL = f"{PREFIX}cost_usd_total"
BILLED_TOTAL = f"{PREFIX}instance_billed_seconds_total"
TRAINING_TOTAL = f"{PREFIX}training_seconds_total"


@dataclass(frozen=True)
class Totals:
    """A group's accumulated counters as the gateway holds them before this run's push."""

    runs: Mapping[str, float] = field(default_factory=dict)  # by outcome
    cost_usd: float = 0.0
    billed_s: float = 0.0
    training_s: float = 0.0


def grouping_key(report: RunReport) -> dict[str, str]:
    """The run's Pushgateway group (the job aside): the deployment, the instance type and the market."""
    instance_type = report.instance_type or NONE
    if instance_type != NONE and not _NAME_RE.fullmatch(instance_type):
        instance_type = OTHER
    market = report.market or NONE
    if market not in (*MARKETS, NONE):
        market = OTHER
    return {"deployment": report.deployment, "instance_type": instance_type, "market": market}


def _bounded(values: Mapping[str, float], pattern: re.Pattern[str], what: str) -> Iterator[tuple[str, float]]:
    kept = 0
    for name, value in sorted(values.items()):
        if not pattern.fullmatch(name) or kept >= MAX_SERIES_PER_LABEL:
            log.warning(
                "Metrics: %s %r left out (not a short plain name, or past %d)", what, name, MAX_SERIES_PER_LABEL
            )
            continue
        kept += 1
        yield name, float(value)


def run_metric_families(report: RunReport, before: Totals, pushed_at: float) -> list[Metric]:
    """Every series of the run's group: the last-run gauges of `report`, and `before`'s totals plus this run."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def gauge(name: str, doc: str, value: float | None) -> Iterator[GaugeMetricFamily]:
        if value is not None:
            yield GaugeMetricFamily(f"{PREFIX}last_run_{name}", doc, value=float(value))

    def labelled(name: str, doc: str, label: str, values: Iterable[tuple[str, float]]) -> GaugeMetricFamily:
        family = GaugeMetricFamily(f"{PREFIX}last_run_{name}", doc, labels=[label])
        for key, value in values:
            family.add_metric([key], value)
        return family

    cost = report.cost
    billed, training, usd = (cost.billed_s, cost.training_s, cost.usd) if cost else (0.0, 0.0, 0.0)
    families: list[Metric] = [
        *gauge("timestamp_seconds", "Unix time the latest run of this group was reported.", pushed_at),
        labelled(
            "outcome",
            "1 for the latest run's outcome (success or failed), 0 for the other.",
            "outcome",
            ((outcome, float(outcome == report.outcome)) for outcome in OUTCOMES),
        ),
        *gauge("duration_seconds", "The latest run's DAG run, from its start to its report.", report.duration_s),
        labelled(
            "phase_duration_seconds",
            "Seconds each phase of the latest run took (ci_wait, launch, boot, bootstrap.<step>, training, "
            "evaluation, teardown); phases it never reached are absent.",
            "phase",
            _bounded(report.phases_s, _NAME_RE, "phase"),
        ),
        *gauge("images_per_second", "The latest run's training throughput.", report.images_per_s),
        labelled(
            "test_metric",
            "The latest run's test metrics from MLflow (test_accuracy, test_f1, ...).",
            "metric",
            _bounded(report.test_metrics, _TEST_METRIC_RE, "test metric"),
        ),
        *gauge(
            "promoted",
            "1 if the latest run's model became the champion, 0 if not; absent when the gate did not run.",
            None if report.promoted is None else float(report.promoted),
        ),
    ]
    if cost is not None:
        families += [
            *gauge("instance_billed_seconds", "Instance seconds EC2 billed for the latest run.", cost.billed_s),
            *gauge(
                "non_training_seconds",
                "Billed instance seconds of the latest run spent not training (boot, setup, evaluation, idle).",
                cost.non_training_s,
            ),
            *gauge("training_ratio", "Share of the latest run's billed seconds spent training.", cost.training_share),
            *gauge("cost_usd", "Estimated cost of the latest run's instance.", cost.usd),
            *gauge("price_usd_per_hour", "The hourly price the latest run's cost was estimated at.", cost.usd_per_hour),
        ]
    if report.preemptions:
        # Only for a run EC2 interrupted: one without has one instance, nothing lost and its spot saving in its cost.
        families += [
            *gauge(
                "attempts", "Instances the latest run launched (only when EC2 took one back).", len(report.attempts)
            ),
            *gauge("preemptions", "Spot instances EC2 took back during the latest run.", len(report.preemptions)),
            *gauge(
                "seconds_lost_to_preemption",
                "The latest run's seconds from each take-back to the next launch, plus the last relaunch's boot.",
                report.seconds_lost_to_preemption,
            ),
            *gauge(
                "saving_vs_on_demand_usd",
                "The latest run's instances' billed seconds at on-demand prices minus their estimated cost.",
                cost.saving_vs_on_demand_usd if cost else None,
            ),
        ]
    runs = CounterMetricFamily(RUNS_TOTAL, "Runs reported in this group, by outcome.", labels=["outcome"])
    for outcome in OUTCOMES:
        # Both outcomes always exist, so the first failure shows as an increase from 0 rather than a new series.
        runs.add_metric([outcome], before.runs.get(outcome, 0.0) + float(outcome == report.outcome))
    families += [
        runs,
        _counter(COST_TOTAL, "Estimated cost of every run's instance in this group.", before.cost_usd + usd),
        _counter(BILLED_TOTAL, "Instance seconds billed for every run in this group.", before.billed_s + billed),
        _counter(TRAINING_TOTAL, "Seconds every run in this group spent training.", before.training_s + training),
    ]
    return families


def _counter(name: str, doc: str, value: float) -> Metric:
    from prometheus_client.core import CounterMetricFamily

    # No `_created` sample (prometheus_client's Counter would add one): the family is rebuilt at each push, so its
    # creation time would be this push's, not the group's.
    return CounterMetricFamily(name, doc, value=value)


class _Families:
    """A collector over fixed families, so a registry of them can be pushed."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def build_registry(families: list[Metric]) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Families(families))
    return registry


def totals_of(groups: Any, job: str, key: Mapping[str, str]) -> Totals:
    """The group's counters in the answer of the gateway's /api/v1/metrics; zeros for a group it does not hold."""
    wanted = {"job": job, **key}
    group = next((g for g in groups.get("data") or [] if g.get("labels") == wanted), None)
    if group is None:
        return Totals()

    def values(name: str) -> list[tuple[dict[str, str], float]]:
        return [(m.get("labels", {}), float(m["value"])) for m in (group.get(name) or {}).get("metrics", [])]

    return Totals(
        runs={labels["outcome"]: v for labels, v in values(RUNS_TOTAL) if labels.get("outcome") in OUTCOMES},
        cost_usd=sum(v for _, v in values(COST_TOTAL)),
        billed_s=sum(v for _, v in values(BILLED_TOTAL)),
        training_s=sum(v for _, v in values(TRAINING_TOTAL)),
    )


def read_totals(m: MetricsSettings, key: Mapping[str, str], auth: BasicAuth | None) -> Totals:
    request = urllib.request.Request(  # noqa: S310 - metrics.pushgateway_url is validated as http(s)
        f"{m.pushgateway_url.rstrip('/')}/api/v1/metrics", headers=auth.header() if auth else {}
    )
    with urllib.request.urlopen(request, timeout=m.timeout_seconds) as resp:  # noqa: S310 - as above
        return totals_of(json.load(resp), m.job, key)


def push(m: MetricsSettings, key: Mapping[str, str], families: list[Metric], auth: BasicAuth | None) -> None:
    """PUT the group: the gateway replaces every series it held for that job and grouping key."""
    from prometheus_client.exposition import basic_auth_handler, default_handler, push_to_gateway

    def handler(url: str, method: str, timeout: float | None, headers: list[tuple[str, str]], data: bytes) -> Any:
        if auth is None:
            return default_handler(url, method, timeout, headers, data)
        return basic_auth_handler(url, method, timeout, headers, data, auth.username, auth.password)

    push_to_gateway(
        m.pushgateway_url,
        job=m.job,
        registry=build_registry(families),
        grouping_key=dict(key),
        timeout=m.timeout_seconds,
        handler=handler,
    )


def push_run_metrics(settings: Settings, report: RunReport) -> None:
    """Push the run's series to the Pushgateway of `metrics.pushgateway_url`; off when it is empty. A gateway that
    is down, slow or refuses is logged as a warning: metrics never change a run's outcome."""
    from orchestrator.config.connections import basic_auth

    m = settings.metrics
    if not m.enabled:
        return
    key = grouping_key(report)
    try:
        auth = basic_auth(m.conn_id, "metrics.conn_id") if m.conn_id else None
        before = read_totals(m, key, auth)
        push(m, key, run_metric_families(report, before, time.time()), auth)
    except Exception as exc:
        log.warning("Run metrics not pushed to the Pushgateway %s: %s", m.pushgateway_url, error_line(exc))
        return
    log.info("Run metrics pushed to the Pushgateway %s (job %s, group %s)", m.pushgateway_url, m.job, key)
