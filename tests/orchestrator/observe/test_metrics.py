"""Run metrics: the pure series builder, then the real Debian Pushgateway and Prometheus on loopback, with every panel
of the Grafana dashboard (config/grafana/dashboards) queried against that Prometheus."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from embedded.services.prometheus import Prometheus, Pushgateway, basic_auth_header
from orchestrator.config.settings import load_settings, validate
from orchestrator.errors import ConfigError
from orchestrator.observe.metrics import (
    MAX_SERIES_PER_LABEL,
    PREFIX,
    Totals,
    grouping_key,
    push_run_metrics,
    run_metric_families,
)
from tests.conftest import REPO
from tests.orchestrator.observe.test_report import PREEMPTED
from tests.support.monitoring import (
    GATEWAY_LOGIN,
    INSTANCE_ID,
    RUN_ID,
    SHA,
    assert_run_in_prometheus,
    failed_before_launch,
    get_json,
    metrics_settings,
    query,
    success_report,
    use_connection,
    wait_for,
)

DASHBOARD = REPO / "config" / "grafana" / "dashboards" / "ec2-trainer.json"
# What a label may be called; the grouping key's three come from the gateway's group, `job` from the job name.
ALLOWED_LABELS = {"__name__", "job", "instance", "deployment", "instance_type", "market", "outcome", "phase", "metric"}


def samples(families: list[Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


# ---- settings


def test_metrics_are_off_by_default() -> None:
    assert not load_settings(env={"TRAINER__AWS__DEPLOYMENT": "x"}).metrics.enabled


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"pushgateway_url": "pushgateway:9091"}, r"metrics\.pushgateway_url: 'pushgateway:9091' is invalid"),
        ({"pushgateway_url": "ftp://gw:9091"}, r"metrics\.pushgateway_url: 'ftp://gw:9091' is invalid"),
        ({"pushgateway_url": "http://u:hunter2@gw:9091"}, r"metrics\.pushgateway_url: '<redacted>'.*no credentials"),
        ({"job": "two words"}, r"metrics\.job: 'two words' is invalid; expected a name"),
        ({"job": ""}, r"metrics\.job"),
        ({"conn_id": "has space"}, r"metrics\.conn_id: 'has space' is invalid; expected empty \(no auth\)"),
        ({"timeout_seconds": 0.0}, r"metrics\.timeout_seconds: 0\.0 is invalid"),
        ({"timeout_seconds": 61.0}, r"metrics\.timeout_seconds"),
    ],
)
def test_bad_metrics_settings_name_the_field(changes: dict[str, Any], match: str) -> None:
    s = metrics_settings()
    with pytest.raises(ConfigError, match=match) as caught:
        validate(s.model_copy(update={"metrics": s.metrics.model_copy(update=changes)}))
    assert "hunter2" not in str(caught.value)


# ---- the pure builder


def test_a_success_run_gives_every_series_with_bounded_labels_only() -> None:
    report = success_report()
    got = samples(run_metric_families(report, Totals(), pushed_at=1_800_000_000.0))
    assert got[(f"{PREFIX}last_run_timestamp_seconds", ())] == 1_800_000_000.0
    assert got[(f"{PREFIX}last_run_outcome", (("outcome", "success"),))] == 1.0
    assert got[(f"{PREFIX}last_run_outcome", (("outcome", "failed"),))] == 0.0
    assert got[(f"{PREFIX}last_run_phase_duration_seconds", (("phase", "bootstrap.packages"),))] == 30.0
    assert got[(f"{PREFIX}last_run_test_metric", (("metric", "test_f1"),))] == 0.91
    assert got[(f"{PREFIX}last_run_instance_billed_seconds", ())] == 728.0
    assert got[(f"{PREFIX}last_run_non_training_seconds", ())] == 128.0
    assert got[(f"{PREFIX}last_run_training_ratio", ())] == pytest.approx(600 / 728)
    assert got[(f"{PREFIX}last_run_images_per_second", ())] == 41544.0
    assert got[(f"{PREFIX}last_run_cost_usd", ())] == 0.2024
    assert got[(f"{PREFIX}last_run_promoted", ())] == 1.0
    assert got[(f"{PREFIX}runs_total", (("outcome", "success"),))] == 1.0
    assert got[(f"{PREFIX}runs_total", (("outcome", "failed"),))] == 0.0
    assert got[(f"{PREFIX}cost_usd_total", ())] == 0.2024
    # No `_created` samples: each push rebuilds the counters, so a creation time would read as a reset.
    assert not [name for name, _ in got if name.endswith("_created")]
    labels = {name for _, pairs in got for name, _ in pairs}
    assert labels <= ALLOWED_LABELS
    values = {value for _, pairs in got for _, value in pairs} | set(grouping_key(report).values())
    assert not values & {RUN_ID, INSTANCE_ID, SHA, report.mlflow_run_id}


def test_a_preempted_run_gives_its_attempts_preemptions_seconds_lost_and_saving() -> None:
    recovery = ("attempts", "preemptions", "seconds_lost_to_preemption", "saving_vs_on_demand_usd")
    changes = {k: getattr(PREEMPTED, k) for k in ("cost", "attempts", "preemptions", "seconds_lost_to_preemption")}
    got = samples(run_metric_families(success_report(market="spot", **changes), Totals(), pushed_at=0.0))
    assert PREEMPTED.cost is not None
    assert [got[(f"{PREFIX}last_run_{name}", ())] for name in recovery] == [
        2.0,
        1.0,
        125.0,
        PREEMPTED.cost.saving_vs_on_demand_usd,
    ]
    # A run EC2 never interrupted: none of them.
    names = {name for name, _ in samples(run_metric_families(success_report(), Totals(), pushed_at=0.0))}
    assert not {f"{PREFIX}last_run_{name}" for name in recovery} & names


def test_the_totals_add_this_run_to_what_the_group_held() -> None:
    before = Totals(runs={"success": 4.0, "failed": 2.0}, cost_usd=1.5, billed_s=3000.0, training_s=2000.0)
    got = samples(run_metric_families(success_report(), before, pushed_at=0.0))
    assert got[(f"{PREFIX}runs_total", (("outcome", "success"),))] == 5.0
    assert got[(f"{PREFIX}runs_total", (("outcome", "failed"),))] == 2.0
    assert got[(f"{PREFIX}cost_usd_total", ())] == pytest.approx(1.7024)
    assert got[(f"{PREFIX}instance_billed_seconds_total", ())] == 3728.0
    assert got[(f"{PREFIX}training_seconds_total", ())] == 2600.0


def test_a_run_without_an_instance_has_no_cost_series_and_its_own_group() -> None:
    report = failed_before_launch()
    assert grouping_key(report) == {"deployment": "metrics-test", "instance_type": "none", "market": "none"}
    got = samples(run_metric_families(report, Totals(), pushed_at=0.0))
    names = {name for name, _ in got}
    assert (
        not {f"{PREFIX}last_run_cost_usd", f"{PREFIX}last_run_promoted", f"{PREFIX}last_run_images_per_second"} & names
    )
    assert got[(f"{PREFIX}runs_total", (("outcome", "failed"),))] == 1.0
    assert got[(f"{PREFIX}cost_usd_total", ())] == 0.0
    assert got[(f"{PREFIX}last_run_outcome", (("outcome", "failed"),))] == 1.0


def test_unexpected_label_values_stay_bounded(caplog: pytest.LogCaptureFixture) -> None:
    phases = {f"bootstrap.step{n:02d}": 1.0 for n in range(MAX_SERIES_PER_LABEL + 5)}
    report = success_report(
        instance_type="G6 XLARGE; drop",
        market="reserved",
        phases_s={**phases, "Bootstrap Weird Name": 1.0},
        test_metrics={"test_accuracy": 0.9, "val_accuracy": 0.8, f"test_{'x' * 80}": 0.1},
    )
    assert grouping_key(report) == {"deployment": "metrics-test", "instance_type": "other", "market": "other"}
    with caplog.at_level(logging.WARNING, logger="orchestrator.observe.metrics"):
        got = samples(run_metric_families(report, Totals(), pushed_at=0.0))
    phase_values = [dict(pairs)["phase"] for name, pairs in got if name.endswith("phase_duration_seconds")]
    assert len(phase_values) == MAX_SERIES_PER_LABEL
    metric_values = [dict(pairs)["metric"] for name, pairs in got if name.endswith("test_metric")]
    assert metric_values == ["test_accuracy"]
    assert "'Bootstrap Weird Name' left out" in caplog.text
    assert "'val_accuracy' left out" in caplog.text


# ---- the dashboard


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, with the dashboard's variables set to "All"."""
    board = dashboard()
    variables = {v["name"]: v["allValue"] for v in board["templating"]["list"]}
    # Grafana's own: the dashboard's time range and a rate window.
    variables |= {"__range": "1h", "__rate_interval": "1m", "__interval": "15s"}
    queries = []
    for panel in board["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            expr = re.sub(r"\$\{?(\w+)\}?", lambda m: variables[m.group(1)], target["expr"])
            queries.append((panel["title"], expr))
    return queries


def test_every_series_has_a_panel_and_every_panel_a_series() -> None:
    pushed = {f.name for f in run_metric_families(success_report(), Totals(), 0.0)}
    # A counter family is named without _total; its sample (what a query names) has it.
    pushed = {name if name.startswith(f"{PREFIX}last_run_") else f"{name}_total" for name in pushed}
    shown = {name for _, expr in panel_queries() for name in re.findall(rf"{PREFIX}\w+", expr)}
    assert pushed == shown


def test_the_panels_name_the_provisioned_data_source() -> None:
    provisioned = REPO / "config" / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
    uid = re.search(r"uid: (\S+)", provisioned.read_text())
    assert uid
    board = dashboard()
    for panel in board["panels"]:
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": uid.group(1)}, panel["title"]
    assert all(v["datasource"]["uid"] == uid.group(1) for v in board["templating"]["list"])


# ---- the real Pushgateway and Prometheus


def gateway_group(gateway: Pushgateway, key: dict[str, str], job: str = "ec2_trainer", **auth: Any) -> dict[str, Any]:
    groups = get_json(f"{gateway.url}/api/v1/metrics", **auth)["data"]
    (group,) = [g for g in groups if g["labels"] == {"job": job, **key}]
    return dict(group)


def test_pushed_runs_reach_prometheus_and_every_panel_shows_data(
    monitoring: tuple[Pushgateway, Prometheus], caplog: pytest.LogCaptureFixture
) -> None:
    gateway, prom = monitoring
    settings = metrics_settings(gateway.url)
    success, failed = success_report(), failed_before_launch()
    assert success.cost
    second = success_report(duration_s=700.0, cost=dataclasses.replace(success.cost, usd=0.5))
    with caplog.at_level(logging.INFO, logger="orchestrator.observe.metrics"):
        push_run_metrics(settings, failed)
        push_run_metrics(settings, success)
        push_run_metrics(settings, second)
    assert "WARNING" not in caplog.text
    assert caplog.text.count("Run metrics pushed to the Pushgateway") == 3

    # The gateway holds the group's totals, accumulated over the two successes.
    group = gateway_group(gateway, grouping_key(success))
    runs = {m["labels"]["outcome"]: float(m["value"]) for m in group[f"{PREFIX}runs_total"]["metrics"]}
    assert runs == {"success": 2.0, "failed": 0.0}
    assert float(group[f"{PREFIX}cost_usd_total"]["metrics"][0]["value"]) == pytest.approx(0.7024)
    assert float(group[f"{PREFIX}last_run_cost_usd"]["metrics"][0]["value"]) == 0.5

    # Prometheus scraped them, with the pushed labels kept (honor_labels): each group shows its latest run.
    assert_run_in_prometheus(prom, second)
    assert_run_in_prometheus(prom, failed)
    scraped = wait_for(
        "both groups' totals in Prometheus",
        lambda: {
            (r["metric"]["instance_type"], r["metric"]["outcome"]): float(r["value"][1])
            for r in query(prom, f'{PREFIX}runs_total{{deployment="metrics-test"}} > 0')
        }
        == {("g6.xlarge", "success"): 2.0, ("none", "failed"): 1.0},
    )
    assert scraped
    for title, expr in panel_queries():
        assert query(prom, expr), f"panel {title!r}: no data for {expr}"
    for variable in dashboard()["templating"]["list"]:
        metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"]).groups()  # type: ignore[union-attr]
        values = get_json(f"{prom.url}/api/v1/label/{label}/values?{urllib.parse.urlencode({'match[]': metric})}")
        assert values["data"], f"variable {variable['name']}: no values"

    # Nothing unbounded in any label of any series in Prometheus.
    selector = '{__name__=~"' + PREFIX + '.+"}'
    series = get_json(f"{prom.url}/api/v1/series?{urllib.parse.urlencode({'match[]': selector})}")
    assert series["data"]
    for labels in series["data"]:
        assert set(labels) <= ALLOWED_LABELS, labels
        assert not set(labels.values()) & {RUN_ID, INSTANCE_ID, SHA}, labels


def test_nothing_is_sent_while_the_url_is_empty(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Recorded, not raised: push_run_metrics logs and swallows any exception (metrics never fail a run), so a stub
    # raising AssertionError would pass whatever the code did.
    requests: list[str] = []

    def no_request(*args: object, **kwargs: object) -> None:
        requests.append(repr(args[:1]))

    monkeypatch.setattr(urllib.request, "urlopen", no_request)
    monkeypatch.setattr("prometheus_client.exposition.push_to_gateway", no_request)
    with caplog.at_level(logging.DEBUG, logger="orchestrator.observe.metrics"):
        push_run_metrics(metrics_settings(""), success_report())
    assert requests == []
    assert caplog.records == [], caplog.text


def test_basic_auth_comes_from_the_connection(
    gateway_with_auth: Pushgateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    use_connection(monkeypatch, GATEWAY_LOGIN[1])
    settings = metrics_settings(gateway_with_auth.url, conn_id="pushgateway_test")
    with caplog.at_level(logging.INFO, logger="orchestrator.observe.metrics"):
        push_run_metrics(settings, success_report())
        push_run_metrics(settings, success_report())
    assert "WARNING" not in caplog.text
    assert caplog.text.count("Run metrics pushed to the Pushgateway") == 2
    group = gateway_group(gateway_with_auth, grouping_key(success_report()), headers=auth_headers())
    runs = {m["labels"]["outcome"]: float(m["value"]) for m in group[f"{PREFIX}runs_total"]["metrics"]}
    assert runs["success"] == 2.0
    assert GATEWAY_LOGIN[1] not in caplog.text


def auth_headers() -> dict[str, str]:
    return basic_auth_header(GATEWAY_LOGIN)


def test_the_dashboard_file_is_what_grafana_provisions(tmp_path: Path) -> None:
    provider = (REPO / "config" / "grafana" / "provisioning" / "dashboards" / "ec2-trainer.yaml").read_text()
    assert "path: /var/lib/grafana/dashboards" in provider
    board = dashboard()
    assert board["uid"] and board["title"]
    # Grafana lays panels out on a 24-column grid; ids are unique.
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in board["panels"])
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
