"""A new user's walk through the UIs, in a real browser: Playwright (PyPI) driving Debian's Chromium.

The embedded default's local deployment (embedded.deploy.deployment, what `make demo` and `make ui` run) on free ports;
the demo's watch loop runs one DAG run; then the browser logs in to Airflow with the admin password, opens that run,
reads the `train` task's epochs in its log, follows the task's "MLflow run" and the CI gate's "GitHub Actions" extra
links to where they land, reads evaluate's log (no ERROR line), opens the run's "MLflow runs" link (the runs table with
the gate's metric), sees a run that fails before launch counted in Prometheus, has the trigger form refuse epochs=0
and a misspelt instance type (each field's description showing the configured value), submits the form with its
defaults, whose run must train and succeed, and finally uploads new data with `make upload-dataset`'s command, which
starts an ec2_retrain run and its training.

Screenshots of every step go to .state/browser-test/ in the repository (ignored by git), for a person to look at.
One test, not five: each step needs the one before, and one deployment is minutes of a 2-core CI machine.
"""

from __future__ import annotations

import ast
import io
import json
import re
import shutil
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from embedded.cli import running, upload_dataset
from embedded.cli.demo import fill_in, watch
from embedded.cli.ui import running_ui
from embedded.cli.upload_dataset import RETRAIN_DAG_ID
from embedded.deploy.airflow_local import AirflowError
from embedded.deploy.deployment import ADMIN_USER, DAG_ID, LocalDeployment, Ports
from embedded.deploy.stack import EMBEDDED_INSTANCE_TYPES, TINY_DATA_URI, EmbeddedStack
from orchestrator.ci.github_protocol import commit_checks_url
from tests.conftest import REPO
from tests.ui.conftest import UI_TIMEOUT_MS

pytestmark = pytest.mark.slow

SHOTS = REPO / ".state" / "browser-test"
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def deployment(
    browser: Any, stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalDeployment]:
    # The test process's stack (one per process: moto's state is), with the deployment's own Airflow on top.
    with LocalDeployment(tmp_path_factory.mktemp("deployment"), ports=Ports.free(), stack=stack) as running:
        yield running


class Journey:
    """The browser page plus a numbered screenshot per step (and one of wherever a failure left it)."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.step = 0
        shutil.rmtree(SHOTS, ignore_errors=True)
        SHOTS.mkdir(parents=True)

    def shot(self, name: str, page: Any = None) -> None:
        self.step += 1
        (page or self.page).screenshot(path=str(SHOTS / f"{self.step:02d}-{name}.png"))


@pytest.fixture
def journey(browser: Any) -> Iterator[Journey]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(UI_TIMEOUT_MS)
    walk = Journey(context.new_page())
    try:
        yield walk
    finally:
        for n, page in enumerate(context.pages):
            page.screenshot(path=str(SHOTS / f"last-{n}.png"))
        context.close()


def run_name(deployment: LocalDeployment, run_id: str) -> str:
    """The name the MLflow UI shows on the run's page."""
    from mlflow import MlflowClient

    return str(MlflowClient(deployment.stack.mlflow.url).get_run(run_id).info.run_name)


def wait_for(found: Callable[[], list[Any]], timeout_s: float) -> list[Any]:
    """What `found` returns once it is not empty; fails after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not (result := found()):
        assert time.monotonic() < deadline, f"nothing found within {timeout_s:.0f}s"
        time.sleep(0.5)
    return result


def open_section(dialog: Any, name: str) -> None:
    """The trigger form's Params come in sections (orchestrator/config/run_params.py), folded."""
    section = dialog.get_by_role("button", name=name)
    if section.get_attribute("aria-expanded") != "true":
        section.click()


def trigger_form(page: Any, airflow_url: str, section: str) -> Any:
    """A fresh trigger dialog of the training DAG with `section` open."""
    page.goto(f"{airflow_url}/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    open_section(dialog, section)
    return dialog


def failed_runs(deployment: LocalDeployment, runs_page: Any) -> float:
    """ec2_trainer_runs_total{outcome="failed"} of the embedded deployment, as Prometheus answers it in the browser."""
    query = urllib.parse.quote('sum(ec2_trainer_runs_total{outcome="failed"})')
    runs_page.goto(f"{deployment.stack.prometheus.url}/api/v1/query?query={query}")
    result = json.loads(runs_page.locator("body").inner_text())["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


# Start-up, four DAG runs and the browser: 6-8 minutes on a busy 2-core machine; the suite's default is 10.
@pytest.mark.timeout(1200)
def test_a_new_user_finds_the_logs_links_and_form_working(
    deployment: LocalDeployment, journey: Journey, sha: str, tmp_path: Path
) -> None:
    airflow = deployment.airflow
    run_id = "demo__browser"
    airflow.trigger(DAG_ID, run_id, {"git_ref": sha, "epochs": 2})
    terminal = io.StringIO()
    summary = watch(deployment, run_id, RUN_TIMEOUT_S, out=terminal)
    fill_in(summary, deployment)
    live = terminal.getvalue()
    assert summary.state == "success", f"the demo's run failed: {summary.task_states}\n{live}"
    # The live view: each state change once, the epochs as the job reported them, and the timing split.
    assert re.search(r"^ +[\d.]+s  train +running$", live, re.M), live
    assert re.search(r"^ +[\d.]+s  train +epoch 2/2 train_loss=", live, re.M), live
    assert 0 < summary.train_s < summary.run_s

    page = journey.page
    page.goto(airflow.url)
    page.get_by_label("Username").fill(ADMIN_USER)
    page.get_by_label("Password").fill(deployment.password)
    journey.shot("login")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(rf"^{re.escape(airflow.url)}/(?!auth)"))
    journey.shot("home")

    # The demo's run, then its train task (a click on its cell in the grid): the log holds the job's epoch reports.
    page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{run_id}")
    page.get_by_text("Success").first.wait_for()
    journey.shot("demo-run")
    page.locator(f"a[href='/dags/{DAG_ID}/runs/{run_id}/tasks/train']").first.click()
    page.get_by_text(re.compile(r"epoch 2/2 train_loss=")).first.wait_for()
    journey.shot("train-log")

    # The train task's extra link, in its Details tab, opens the MLflow run page of that run.
    page.get_by_role("link", name="Details").click()
    mlflow_link = page.get_by_role("link", name="MLflow run")
    assert mlflow_link.get_attribute("href") == summary.mlflow_run_url
    journey.shot("train-details")
    with page.expect_popup() as opened:
        mlflow_link.click()
    mlflow_page = opened.value
    mlflow_page.wait_for_function(f"document.title.includes({summary.mlflow_run_id!r})", timeout=UI_TIMEOUT_MS)
    mlflow_page.get_by_text(run_name(deployment, summary.mlflow_run_id or "")).first.wait_for()
    assert mlflow_page.url.startswith(deployment.stack.mlflow.url)
    assert f"/runs/{summary.mlflow_run_id}" in mlflow_page.url
    journey.shot("mlflow-run", mlflow_page)
    mlflow_page.close()

    # The CI gate's extra link opens the commit's checks page (the GitHub stand-in's, as github.com's would).
    page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{run_id}/tasks/ci_gate/details")
    with page.expect_popup() as opened:
        page.get_by_role("link", name="GitHub Actions").click()
    checks = opened.value
    checks.wait_for_load_state()
    assert checks.url == commit_checks_url(deployment.stack.github.url, deployment.stack.github.repo, sha)
    assert checks.locator("#sha").inner_text() == sha
    assert "success" in checks.locator("tbody").inner_text()
    journey.shot("checks", checks)
    checks.close()

    # evaluate's log on success: MLflow's own messages ("Successfully registered model ...") are INFO, not ERROR.
    page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{run_id}/tasks/evaluate")
    page.get_by_text(re.compile(r"Run \w+: (champion|not promoted)")).first.wait_for()
    journey.shot("evaluate-log")
    shown = page.locator("body").inner_text()
    assert not re.search(r"\b(ERROR|WARNING)\b", shown), shown
    assert not re.search(r'"level":"(error|warning)"', airflow.task_log(DAG_ID, run_id, "evaluate"))

    # The run's "MLflow runs" link (report, notifications) opens MLflow's runs table, not its GenAI overview, with the
    # gate's metric as a column.
    assert summary.evaluation is not None
    runs_link = airflow.xcom(DAG_ID, run_id, "report")["links"]["mlflow_runs"]
    runs_page = page.context.new_page()
    runs_page.goto(runs_link)
    runs_page.locator(f'[role=columnheader][col-id="metrics.`{summary.evaluation.metric}`"]').first.wait_for()
    assert "/runs" in runs_page.url and "overview" not in runs_page.url
    journey.shot("mlflow-runs-table", runs_page)
    runs_page.close()

    # A run that fails before launch (a branch CI never ran on) still counts in Prometheus as failed.
    failed_before = failed_runs(deployment, runs_page=page)
    airflow.trigger(DAG_ID, "browser_early_failure", {"git_ref": "no-such-branch"})
    assert airflow.wait_for_runs(DAG_ID, ["browser_early_failure"], timeout_s=RUN_TIMEOUT_S) == {
        "browser_early_failure": "failed"
    }
    wait_for(lambda: [True] if failed_runs(deployment, runs_page=page) > failed_before else [], 120)
    journey.shot("prometheus-failed-runs")

    # The trigger form refuses what it cannot run, with a sentence, and starts nothing.
    before = {run["dag_run_id"] for run in airflow.dag_runs(DAG_ID)}
    dialog = trigger_form(page, airflow.url, "Training")
    configured_epochs = deployment.stack.environment()["TRAINER__TRAINING__EPOCHS"]
    dialog.get_by_text(f"Empty: the configured value, {configured_epochs} (training.epochs).").first.wait_for()
    epochs = dialog.locator('input[name="element_epochs"]').or_(dialog.get_by_role("spinbutton", name="Epochs")).first
    epochs.fill("0")
    epochs.press("Tab")
    assert epochs.input_value() == "0", "the form changed an out-of-range value instead of refusing it"
    dialog.get_by_role("button", name="Trigger").click()
    dialog.get_by_text("Invalid input for param epochs: 0 is less than the minimum of 1").first.wait_for()
    journey.shot("form-refuses-epochs-0")
    # The deployment allows some instance types: the form offers those and no misspelt one.
    open_section(dialog, "Instance")
    types = dialog.locator("#element_instance_types input").first
    types.fill("G6 XL")
    dialog.get_by_text("No options").first.wait_for()
    journey.shot("form-offers-only-allowed-types")
    types.fill("g4dn")
    dialog.get_by_text("g4dn.xlarge", exact=True).first.wait_for()
    assert {run["dag_run_id"] for run in airflow.dag_runs(DAG_ID)} == before, "a refused form started a run"
    # Sent anyway (the REST API, the form's JSON), a misspelt type is refused with one sentence, no pattern.
    with pytest.raises(AirflowError) as refused:
        airflow.trigger(DAG_ID, "browser_bad_type", {"instance_types": ["G6 XL"]})
    detail = json.loads(ast.literal_eval(str(refused.value).split("HTTP 400: ", 1)[1]))["detail"]
    allowed = ", ".join(repr(name) for name in EMBEDDED_INSTANCE_TYPES)
    assert detail.splitlines()[0] == f"Invalid input for param instance_types: 'G6 XL' is not one of [{allowed}]"
    assert "pattern" not in detail, detail

    # The trigger form, submitted with its defaults, starts a run that trains against the embedded default.
    before = {run["dag_run_id"] for run in airflow.dag_runs(DAG_ID)}
    dialog = trigger_form(page, airflow.url, "What to train")
    dialog.get_by_text("Branch, tag or commit").first.wait_for()
    journey.shot("trigger-form")
    submit = dialog.get_by_role("button", name="Trigger")
    assert submit.is_enabled(), "the form's defaults do not validate: the Trigger button is disabled"
    submit.click()
    started = wait_for(lambda: [run for run in airflow.dag_runs(DAG_ID) if run["dag_run_id"] not in before], 60)
    assert len(started) == 1 and started[0]["triggered_by"] == "ui", started
    form_run = started[0]["dag_run_id"]
    page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{form_run}")
    journey.shot("triggered")
    states = airflow.wait_for_runs(DAG_ID, [form_run], timeout_s=RUN_TIMEOUT_S)
    page.reload()
    journey.shot("form-run-finished")
    assert states[form_run] == "success", airflow.task_instances(DAG_ID, form_run)

    # New data, as the README says: with ec2_retrain unpaused (the command says to), `make upload-dataset` against
    # this deployment starts an ec2_retrain run, which trains that version on the branch's latest commit.
    airflow.wait_for_dag(RETRAIN_DAG_ID)
    state_dir = tmp_path / "ui-state"
    running.write(state_dir, running_ui(deployment))
    told = io.StringIO()
    tiny_new_data = TINY_DATA_URI.replace("seed=0", f"seed={time.time_ns() % 100_000 + 1}")
    assert upload_dataset.main(["--state-dir", str(state_dir), "--data-uri", tiny_new_data], out=told) == 0
    assert "What happens next:" in told.getvalue() and "is paused" not in told.getvalue(), told.getvalue()
    retrains = wait_for(lambda: airflow.dag_runs(RETRAIN_DAG_ID), 180)
    page.goto(f"{airflow.url}/dags/{RETRAIN_DAG_ID}/runs/{retrains[0]['dag_run_id']}")
    journey.shot("retrain-started")
    retrained = wait_for(lambda: [r for r in airflow.dag_runs(DAG_ID) if r["dag_run_id"].startswith("retrain__")], 180)
    retrained_id = retrained[0]["dag_run_id"]
    assert airflow.wait_for_runs(DAG_ID, [retrained_id], RUN_TIMEOUT_S)[retrained_id] == "success"
