"""A new user's walk through the UIs, in a real browser: Playwright (PyPI) driving Debian's Chromium.

The embedded default's local deployment (embedded.deploy.deployment, what `make demo` and `make ui` run) on free ports;
the demo's watch loop runs one DAG run; then the browser logs in to Airflow with the admin password, opens that run,
reads the `train` task's epochs in its log, follows the task's "MLflow run" and the CI gate's "GitHub Actions" extra
links to where they land, and submits the trigger form with its defaults, whose run must train and succeed.

Screenshots of every step go to .state/browser-test/ in the repository (ignored by git), for a person to look at.
One test, not five: each step needs the one before, and one deployment is minutes of a 2-core CI machine.
"""

from __future__ import annotations

import io
import re
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from embedded.cli.demo import fill_in, watch
from embedded.deploy.deployment import ADMIN_USER, DAG_ID, LocalDeployment, Ports
from embedded.deploy.stack import EmbeddedStack
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


# Start-up, two DAG runs and the browser: 4-5 minutes on a busy 2-core machine; the suite's default is 10.
@pytest.mark.timeout(900)
def test_a_new_user_finds_the_logs_links_and_form_working(
    deployment: LocalDeployment, journey: Journey, sha: str
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

    # The trigger form, submitted with its defaults, starts a run that trains against the embedded default.
    before = {run["dag_run_id"] for run in airflow.dag_runs(DAG_ID)}
    page.goto(f"{airflow.url}/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    # The Params come in sections (orchestrator/run_params.py); open the first to show its titled, described fields.
    section = dialog.get_by_role("button", name="What to train")
    if section.get_attribute("aria-expanded") != "true":
        section.click()
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
