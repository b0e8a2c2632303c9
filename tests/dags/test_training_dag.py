"""The training DAG end to end through Airflow's `dag.test()`, on the embedded default's real services.

Each scenario asserts the DAG run's state, what each task did, and the final state of every instance the run
launched: whatever happens, nothing may be left running. Faults are injected at the service boundary (the moto server's
EC2 backend, the GitHub stand-in, the instance's bootstrap), never inside the orchestrator.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import threading
from datetime import UTC
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from embedded.deploy.stack import DEPLOYMENT, EmbeddedStack
from orchestrator.cloud.user_data import file_text
from orchestrator.observe.report import PHASES, RunReport
from orchestrator.tracking.views import experiment_url
from tests.conftest import REPO
from tests.orchestrator.observe.test_notify import mail_text
from tests.support.faults import output
from tests.support.leak_scan import (
    SshTraffic,
    disk_places,
    env_upload_pattern,
    mlflow_places,
    planted_found,
    run_job_paths,
)
from tests.support.monitoring import assert_run_in_prometheus, runs_without_an_instance
from tests.support.pipeline import (
    ProcessListSampler,
    assert_all_terminated,
    run_dag,
    secrets_found,
    task_states,
    training_job_command,
)

pytestmark = pytest.mark.slow


def test_happy_path_trains_tracks_terminates_and_leaks_no_secret(
    env: EmbeddedStack,
    sha: str,
    planted: dict[str, str],
    ssh_traffic: SshTraffic,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from mlflow import MlflowClient

    # A registered model of its own: runs earlier in the session (the fault suite's) may have promoted a champion.
    monkeypatch.setenv("TRAINER__MLFLOW__MODEL_NAME", "hurricane-damage-cnn-happy-path")
    # The address a browser uses for MLflow, not the tracking URI Airflow and the instance use.
    ui_url = env.mlflow.url.replace("127.0.0.1", "localhost")
    monkeypatch.setenv("TRAINER__MLFLOW__UI_URL", ui_url)
    with ProcessListSampler() as processes:
        dag_run = run_dag(git_ref=sha)
    task_log = capfd.readouterr().out

    assert dag_run.state == "success", task_states(dag_run)
    assert set(task_states(dag_run).values()) == {"success"}
    (instance,) = assert_all_terminated(env, dag_run, 1).values()
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["ec2-trainer:git_sha"] == sha
    assert_lifetime_bounded(env, instance)
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    run_id = tis["train"].xcom_pull(task_ids="train")
    run = MlflowClient(env.mlflow.url).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.source.git.commit"] == sha
    assert run.data.tags["mlflow.source.git.repoURL"] == f"{env.github_url}/local/ec2-trainer"
    # Named after when and how the DAG run was triggered, tagged with it, in an experiment for model training.
    assert run.info.run_name == f"{dag_run.run_after.astimezone(UTC):%H:%M} manual · {sha[:7]}"
    assert run.data.tags["airflow.run_id"] == dag_run.run_id
    assert (run.data.tags["airflow.dag_id"], run.data.tags["airflow.try_number"]) == ("ec2_training", "1")
    assert run.data.tags["ec2.instance_id"] == instance["InstanceId"]
    assert run.data.tags["ec2.instance_type"] == instance["InstanceType"]
    # The reproducible record: the image, the software stack the job reported, the resolved settings.
    assert run.data.tags["ec2.ami_id"] == instance["ImageId"] and run.data.tags["ec2.ami_name"] != "unknown"
    assert run.data.tags["ec2.market"] == "on-demand"
    assert re.fullmatch(r"[0-9a-f]{64}", run.data.tags["ec2_trainer.settings_digest"])
    env_tags = {"torch", "torchvision", "mlflow", "cuda", "cudnn", "nvidia_driver"}
    assert {f"env.{name}_version" for name in env_tags} <= set(run.data.tags), run.data.tags
    assert run.data.tags["env.nvidia_driver_version"] == "none"  # the stand-in instance has no GPU
    assert run.data.tags["ec2.market"] == "on-demand"
    assert run.data.tags["ci.url"] == f"{env.github_url}/local/ec2-trainer/commit/{sha}/checks"
    assert not [value for value in run.data.params.values() if value.startswith("'")], run.data.params
    client = MlflowClient(env.mlflow.url)
    experiment = client.get_experiment(run.info.experiment_id)
    # A success's small post-mortem bundle: what it ran on, without the full failure set.
    small = {a.path for a in client.list_artifacts(run_id, "postmortem")}
    assert small == {"postmortem/job-output.log", "postmortem/bootstrap.phases", "postmortem/nvidia-smi.txt"}, small
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
    evaluation = tis["evaluate"].xcom_pull(task_ids="evaluate")
    assert evaluation["run_id"] == run_id
    assert evaluation["promoted"] is True  # threshold 0 and no champion for its model yet
    version = client.get_model_version("hurricane-damage-cnn-happy-path", evaluation["model_version"])
    assert version.tags["git_commit"] == sha and version.tags["run_id"] == run_id
    assert evaluation["reason"] in version.description
    assert f"MLflow run {run_id}" in task_log
    # The UI's extra links: the commit's checks page on the gate, the MLflow run on the training task.
    checks_link = tis["ci_gate"].xcom_pull(task_ids="ci_gate", key="_link_GitHubActionsLink")
    assert checks_link == f"{env.github_url}/local/ec2-trainer/commit/{sha}/checks"
    run_link = tis["train"].xcom_pull(task_ids="train", key="_link_MlflowRunLink")
    assert run_link == f"{ui_url}/#/experiments/{run.info.experiment_id}/runs/{run_id}?workflowType=machine_learning"
    assert "train | epoch 1/1" in task_log  # the job's output was streamed into the task log
    assert_reported_success(tis["report"].xcom_pull(task_ids="report"), env, sha, instance, run, tis)
    # The report step pushed the run's series to the stack's Pushgateway; its Prometheus scraped them.
    assert_run_in_prometheus(env.prometheus, RunReport.from_dict(tis["report"].xcom_pull(task_ids="report")))
    mail, post = notifications_of(env, dag_run.run_id, planted)
    assert "ec2_training succeeded: test_accuracy" in mail and ", promoted" in mail
    assert f"Cost:       ${report_cost(tis):.4f}" in mail and run_link in mail
    assert "promoted to champion" in post and "|MLflow run>" in post

    assert processes.saw(training_job_command(env)), "the sampler never saw the training job"
    # The scans cover the job: its control commands and uploads, its folder on the disk, the run's model files.
    assert any(" setsid bash " in command for command in ssh_traffic.commands)
    env_upload = env_upload_pattern(run_job_paths(env, dag_run.dag_id, dag_run.run_id))
    assert any(env_upload.fullmatch(write.path) for write in ssh_traffic.writes), "the env file's upload was not seen"
    inst = env.cloud.instances[instance["InstanceId"]]
    assert any(name.endswith("/output.log") for name in disk_places(env, [inst]))
    # A private repository: the instance got the commit's tree from Airflow, with no git and no credential (the
    # scans below look for the GitHub token in the upload and on the disk), and the token went to the API only.
    assert env.github.private and not env.github.download_auth_seen
    source = env.cloud.host_path(inst, Path(run_job_paths(env, dag_run.dag_id, dag_run.run_id).source_dir))
    shipped = subprocess.run(["git", "show", f"{sha}:MLproject"], cwd=REPO, capture_output=True, text=True, check=True)
    assert (source / "MLproject").read_text() == shipped.stdout
    assert not (source / ".git").exists()
    assert any(name.endswith("artifact MLmodel") for name in mlflow_places(env.mlflow.url, [run_id]))
    assert secrets_found(planted, env, dag_run, task_log, processes, ssh_traffic) == {}


def assert_lifetime_bounded(stack: EmbeddedStack, instance: dict[str, Any]) -> None:
    """The instance's expires_at tag and its watchdog's deadline (the user-data's) are aws.max_lifetime_minutes after
    its launch: a lifetime off by a factor or a deadline other than the tag's fails here."""
    import base64

    import yaml

    from orchestrator.cloud.launch_spec import parse_expires_at
    from orchestrator.config.settings import load_settings
    from orchestrator.contracts import TAG_EXPIRES_AT

    lifetime_s = load_settings().aws.max_lifetime_minutes * 60
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    expires_at = parse_expires_at(tags[TAG_EXPIRES_AT])
    assert expires_at is not None, tags[TAG_EXPIRES_AT]
    # expires_at is computed just before run_instances: at most the launch's own seconds before LaunchTime's lifetime.
    from_launch = expires_at - instance["LaunchTime"].timestamp()
    assert lifetime_s - 300 <= from_launch <= lifetime_s + 1, (from_launch, lifetime_s)
    attribute = stack.cloud.client("ec2").describe_instance_attribute(
        InstanceId=instance["InstanceId"], Attribute="userData"
    )
    user_data = yaml.safe_load(base64.b64decode(attribute["UserData"]["Value"]))
    files = {f["path"].rsplit("/", 1)[-1]: file_text(f) for f in user_data["write_files"]}
    assert files["deadline"] == f"{expires_at}\n"
    assert f"\nFALLBACK_DEADLINE={expires_at}\n" in files["watchdog.sh"]


def notifications_of(stack: EmbeddedStack, run_id: str, planted: dict[str, str]) -> tuple[str, str]:
    """The run's e-mail (its text) in the stack's SMTP server and its message in the Slack webhook stand-in (as
    posted): exactly one each, and no planted secret in either."""
    import json

    mails = [mail_text(m.message) for m in stack.smtp.received if run_id in str(m.message["Subject"])]
    posts = [json.dumps(p) for p in stack.slack.received if run_id in p["text"]]
    assert (len(mails), len(posts)) == (1, 1), (mails, posts)
    assert planted_found(planted, {"e-mail": mails[0], "Slack message": posts[0]}) == {}
    return mails[0], posts[0]


def report_cost(tis: dict[str, Any]) -> float:
    cost = RunReport.from_dict(tis["report"].xcom_pull(task_ids="report")).cost
    assert cost is not None
    return cost.usd


def assert_reported_success(
    data: dict[str, Any], stack: EmbeddedStack, sha: str, instance: dict[str, Any], run: Any, tis: dict[str, Any]
) -> None:
    """The report task's XCom says what the run did and cost, and the cost is on the MLflow run."""
    from mlflow import MlflowClient

    from orchestrator.contracts import PRICE_SOURCE_TAG, USD_PER_HOUR_TAG
    from orchestrator.observe.cost import BY_TEARDOWN, SECONDS_PER_MONTH, transition_time
    from orchestrator.observe.pricing import gp3_usd_per_gb_month

    report = RunReport.from_dict(data)
    assert (report.outcome, report.failed_step, report.error) == ("success", None, None)
    assert (report.git_sha, report.instance_id, report.deployment) == (sha, instance["InstanceId"], DEPLOYMENT)
    assert (report.instance_type, report.market, report.mlflow_run_id) == ("g6.xlarge", "on-demand", run.info.run_id)
    assert report.links == {
        "airflow": f"http://localhost:8080/dags/ec2_training/runs/{quote(report.run_id)}",
        "ci": tis["ci_gate"].xcom_pull(task_ids="ci_gate", key="_link_GitHubActionsLink"),
        "mlflow": tis["train"].xcom_pull(task_ids="train", key="mlflow_run_url"),
        # The experiment's runs table, on the same UI address as the run's link.
        "mlflow_runs": experiment_url(report.links["mlflow"].split("/#/")[0], run.info.experiment_id),
    }
    assert (report.metric_name, report.metric_value) == ("test_accuracy", run.data.metrics["test_accuracy"])
    assert report.promoted is True and report.promotion_reason
    assert report.test_metrics == {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}
    assert report.images_per_s == run.data.metrics["train_images_per_s"] > 0
    breakdowns = {"bootstrap.user", "bootstrap.gpu", "bootstrap.packages", "bootstrap.python"}
    breakdowns.add("training.before_first_epoch")
    assert set(report.phases_s) == set(PHASES) | breakdowns
    assert report.phases_s["training"] == pytest.approx((run.info.end_time - run.info.start_time) / 1000, abs=0.1)
    assert 0 < sum(report.phases_s[phase] for phase in PHASES) <= report.duration_s
    # The bootstrap's steps run partly at once: the longest of them at most its whole.
    assert (
        max(report.phases_s[step] for step in breakdowns if step.startswith("bootstrap."))
        <= report.phases_s["bootstrap"] + 1
    )
    # The job's start (`mlflow run`, data, model) is part of its time; the first epoch began after CI passed.
    assert 0 < report.phases_s["training.before_first_epoch"] < report.phases_s["training"]
    assert report.seconds_to_first_epoch is not None
    assert report.phases_s["training.before_first_epoch"] < report.seconds_to_first_epoch < report.duration_s
    # Billed from EC2's launch time to the termination request, at the fallback table's g6.xlarge price: moto
    # serves no Price List API.
    cost = report.cost
    assert cost is not None
    assert (cost.price_source, cost.usd_per_hour, cost.region) == ("fallback-table", 0.8048, "us-east-1")
    ended = transition_time(instance["StateTransitionReason"])
    assert ended is not None
    assert cost.billed_s == max(60.0, math.ceil(ended - instance["LaunchTime"].timestamp()))
    # One attempt, ended by the teardown; its root volume (the plan's size, gp3) is billed over the same seconds.
    (attempt,) = report.attempts
    assert (attempt["instance_id"], attempt["ended_by"]) == (instance["InstanceId"], BY_TEARDOWN)
    assert attempt["root_volume_gb"] == tis["plan_launch"].xcom_pull(task_ids="plan_launch")["root_volume_gb"]
    volume = attempt["root_volume_gb"] * gp3_usd_per_gb_month("us-east-1") * cost.billed_s / SECONDS_PER_MONTH
    assert cost.volume_usd == pytest.approx(volume, abs=1e-6)
    assert cost.usd == pytest.approx(cost.billed_s / 3600 * 0.8048 + volume, abs=1e-6) == attempt["usd"]
    assert (report.preemptions, report.seconds_lost_to_preemption, cost.saving_vs_on_demand_usd) == ([], 0.0, 0.0)
    assert cost.training_s == report.phases_s["training"]
    assert cost.non_training_s == pytest.approx(cost.billed_s - cost.training_s)
    assert 0 < cost.training_share < 1
    logged = MlflowClient(stack.mlflow.url).get_run(run.info.run_id).data
    assert {k: logged.metrics[k] for k in ("cost_usd", "billed_seconds", "non_training_seconds", "training_share")} == {
        "cost_usd": pytest.approx(cost.usd),
        "billed_seconds": cost.billed_s,
        "non_training_seconds": pytest.approx(cost.non_training_s),
        "training_share": pytest.approx(cost.training_share),
    }
    assert {k: logged.metrics[k] for k in ("attempts", "preemptions", "seconds_lost_to_preemption")} == {
        "attempts": 1.0,
        "preemptions": 0.0,
        "seconds_lost_to_preemption": 0.0,
    }
    assert (logged.tags[PRICE_SOURCE_TAG], logged.tags[USD_PER_HOUR_TAG]) == ("fallback-table", "0.8048")


def test_red_ci_fails_before_anything_is_launched(env: EmbeddedStack, sha: str) -> None:
    failed_before = runs_without_an_instance(env.pushgateway.url, DEPLOYMENT).get("failed", 0.0)
    env.github.set_runs(sha, [{"name": "CI", "status": "completed", "conclusion": "failure"}])
    try:
        dag_run = run_dag(git_ref=sha)
    finally:
        env.github.set_runs(sha, [{"name": "CI", "status": "completed", "conclusion": "success"}])

    states = task_states(dag_run)
    assert dag_run.state == "failed"
    assert states["ci_gate"] == "failed"
    assert states["plan_launch"] == "upstream_failed"
    assert states["launch"] == "upstream_failed"
    assert_all_terminated(env, dag_run, 0)
    # No report task runs without a launch setup: the gate announces the failure itself, with the CI run's link.
    mail, post = notifications_of(env, dag_run.run_id, {})
    assert "ec2_training FAILED at ci_gate" in mail and "Cost:        none (no instance was launched)" in mail
    assert f"CI run: {env.github_url}/local/ec2-trainer/commit/{sha}/checks" in mail and "|CI run>" in post
    # And counts it in the run metrics, in the group of runs that got no instance.
    assert runs_without_an_instance(env.pushgateway.url, DEPLOYMENT)["failed"] == failed_before + 1


def test_unknown_branch_fails_at_the_gate(env: EmbeddedStack) -> None:
    dag_run = run_dag(git_ref="no-such-branch")

    assert dag_run.state == "failed"
    assert task_states(dag_run)["ci_gate"] == "failed"
    assert_all_terminated(env, dag_run, 0)


@pytest.mark.parametrize(
    ("password", "expected"),
    [
        (None, "cannot be read at .* anonymously .* a fine-grained token with 'contents: read'"),
        ("ghp_revoked", r"\(401\): the token in the GitHub connection's password is wrong, expired or revoked"),
    ],
    ids=["no-token", "wrong-token"],
)
def test_a_private_repository_the_connection_cannot_read_fails_before_any_launch(
    env: EmbeddedStack,
    sha: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    password: str | None,
    expected: str,
) -> None:
    conn = {"conn_type": "http", **({"password": password} if password else {})}
    monkeypatch.setenv("AIRFLOW_CONN_GITHUB_DEFAULT", json.dumps(conn))
    dag_run = run_dag(git_ref=sha)
    log = capfd.readouterr().out

    states = task_states(dag_run)
    assert dag_run.state == "failed"
    assert states["ci_gate"] == "failed"
    assert states["plan_launch"] == "upstream_failed"
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    assert tis["ci_gate"].try_number == 1, "no retry can make the repository readable"
    assert re.search(expected, log), log[-3000:]
    assert_all_terminated(env, dag_run, 0)


def test_invalid_param_fails_at_trigger_time(env: EmbeddedStack, sha: str) -> None:
    # Within the form's bounds (10 to 10080), but shorter than the launch, ready and training timeouts together:
    # only resolve_config can tell, before anything is spent.
    dag_run = run_dag(git_ref=sha, max_lifetime_minutes=10)

    states = task_states(dag_run)
    assert dag_run.state == "failed"
    assert states["resolve_config"] == "failed"
    assert states["ci_gate"] == "upstream_failed"
    assert_all_terminated(env, dag_run, 0)


def test_unknown_instance_type_is_refused_before_launch(
    env: EmbeddedStack, sha: str, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A deployment without an allow-list (the embedded default has one): the region's offerings refuse the type.
    monkeypatch.setenv("TRAINER__AWS__ALLOWED_INSTANCE_TYPES", "")
    dag_run = run_dag(git_ref=sha, instance_types=["g6.xlarge", "p9.huge"])

    states = task_states(dag_run)
    assert dag_run.state == "failed"
    assert states["plan_launch"] == "failed"
    assert states["launch"] == "upstream_failed"
    assert "aws.instance_types: ['p9.huge'] not offered in us-east-1" in capfd.readouterr().out
    # A misspelt type is not transient: the task fails on its first try instead of spending its retries.
    (plan,) = (ti for ti in dag_run.get_task_instances() if ti.task_id == "plan_launch")
    assert plan.try_number == 1
    assert_all_terminated(env, dag_run, 0)


def test_no_capacity_anywhere_fails_cleanly(env: EmbeddedStack, sha: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models import EC2Backend

    def none_left(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise EC2ClientError("InsufficientInstanceCapacity", "no capacity")

    monkeypatch.setattr(EC2Backend, "run_instances", none_left)
    dag_run = run_dag(git_ref=sha, instance_types=["g6.xlarge"])

    states = task_states(dag_run)
    assert dag_run.state == "failed"
    assert states["launch"] == "failed"
    assert states["terminate"] == "success"  # the teardown ran although launch failed
    assert_all_terminated(env, dag_run, 0)


def hold_the_only_slot(env: EmbeddedStack, monkeypatch: pytest.MonkeyPatch, wait_minutes: int) -> str:
    """aws.max_instances = 1, taken by another instance of this deployment; returns that instance's id."""
    monkeypatch.setenv("TRAINER__AWS__MAX_INSTANCES", "1")
    monkeypatch.setenv("TRAINER__AWS__INSTANCE_WAIT_MINUTES", str(wait_minutes))
    ec2 = env.cloud.client("ec2")
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    return str(
        ec2.run_instances(
            ImageId=image_id,
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[
                {
                    "ResourceType": "instance",
                    "Tags": [
                        {"Key": "ec2-trainer:project", "Value": "ec2-trainer"},
                        {"Key": "ec2-trainer:deployment", "Value": DEPLOYMENT},
                    ],
                }
            ],
        )["Instances"][0]["InstanceId"]
    )


def test_instance_cap_reached_fails_without_launching_or_retrying(
    env: EmbeddedStack, sha: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Another instance of this deployment holds the only slot for longer than the launch may wait."""
    ec2 = env.cloud.client("ec2")
    holder = hold_the_only_slot(env, monkeypatch, wait_minutes=0)
    try:
        dag_run = run_dag(git_ref=sha)
    finally:
        ec2.terminate_instances(InstanceIds=[holder])
    log = capfd.readouterr().out

    states = task_states(dag_run)
    assert dag_run.state == "failed"
    assert states["launch"] == "failed"
    assert states["terminate"] == "success"
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    assert tis["launch"].try_number == 1, "waiting again on a retry would multiply the configured wait"
    assert "at the cap aws.max_instances = 1" in log and holder in log
    assert_all_terminated(env, dag_run, 0)


def test_launch_at_the_cap_is_rescheduled_until_a_slot_frees(
    env: EmbeddedStack,
    sha: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At the cap, launch gives its worker and pool slot back (up for reschedule) and launches once a slot frees."""
    import time

    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    ec2 = env.cloud.client("ec2")
    holder = hold_the_only_slot(env, monkeypatch, wait_minutes=10)
    rescheduled: list[str] = []

    def free_the_slot_once_launch_waits() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not rescheduled:
            with create_session() as session:
                waiting = select(TaskInstance.run_id).where(
                    TaskInstance.dag_id == "ec2_training",
                    TaskInstance.task_id == "launch",
                    TaskInstance.state == "up_for_reschedule",
                )
                rescheduled.extend(session.scalars(waiting))
            time.sleep(0.5)
        ec2.terminate_instances(InstanceIds=[holder])

    freer = threading.Thread(target=free_the_slot_once_launch_waits, daemon=True)
    freer.start()
    try:
        dag_run = run_dag(git_ref=sha)
    finally:
        freer.join(timeout=310)
        ec2.terminate_instances(InstanceIds=[holder])
    log = output(capfd, caplog)

    assert rescheduled == [dag_run.run_id], "launch never waited up for reschedule at the cap"
    assert dag_run.state == "success", task_states(dag_run)
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    assert tis["launch"].try_number == 1, "rescheduled, not retried"
    assert "1 of at most 1 instances of deployment" in log and holder in log
    assert_all_terminated(env, dag_run, 1)


def test_bootstrap_error_fails_fast_and_terminates(
    env: EmbeddedStack, sha: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRAINER__INSTANCE__PYTHON_BIN", "/nonexistent/bin/python")
    dag_run = run_dag(git_ref=sha)

    states = task_states(dag_run)
    assert dag_run.state == "failed"
    assert states["wait_ready"] == "failed"
    assert states["train"] == "upstream_failed"
    assert states["terminate"] == "success"
    assert_all_terminated(env, dag_run, 1)
    out = capfd.readouterr().out
    assert "error: python" in out  # the bootstrap's own error line reached the task log
    # No MLflow run yet: the post-mortem bundle, read before terminate, is in wait_ready's log, and its error says so.
    assert re.search(r"postmortem \| bootstrap\.log \| .*error: python", out), "no bootstrap log in the bundle"
    assert "postmortem | kernel.log | " in out and "postmortem | nvidia-smi.txt | no nvidia-smi" in out
    assert "The instance's logs are above, prefixed 'postmortem |'" in out


def test_training_failure_fails_the_run_and_terminates(
    env: EmbeddedStack,
    sha: str,
    planted: dict[str, str],
    ssh_traffic: SshTraffic,
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    # Valid for the orchestrator, but the job finds no dataset there and exits non-zero.
    with ProcessListSampler() as processes:
        dag_run = run_dag(git_ref=sha, data_uri="file:///nonexistent/hurricane-data")

    states = task_states(dag_run)
    assert dag_run.state == "failed"
    assert states["train"] == "failed"
    assert states["evaluate"] == "upstream_failed"
    assert states["terminate"] == "success"
    assert states["report"] == "success"  # a teardown: its success does not hide the failed training
    assert states["verdict"] == "failed"  # the teardown that decides the run, from its steps
    assert_all_terminated(env, dag_run, 1)
    report = RunReport.from_dict(dag_run.get_task_instance("report").xcom_pull(task_ids="report"))
    assert (report.outcome, report.failed_step) == ("failed", "train")
    assert re.match(r"training exited with code [1-9]\d* on i-\w+ \(MLflow run \w+\)", report.error or ""), report.error
    assert "the instance's logs are the run's 'postmortem/' artifacts" in (report.error or "")
    # The post-mortem bundle, copied before terminate: the job's log tail (its own error) on the MLflow run.
    from mlflow import MlflowClient

    client = MlflowClient(env.mlflow.url)
    artifacts = {a.path for a in client.list_artifacts(report.mlflow_run_id or "", "postmortem")}
    assert {"postmortem/job-output.log", "postmortem/bootstrap.log", "postmortem/kernel.log"} <= artifacts, artifacts
    job_log = Path(client.download_artifacts(report.mlflow_run_id or "", "postmortem/job-output.log", str(tmp_path)))
    assert "/nonexistent/hurricane-data" in job_log.read_text()
    assert report.promoted is None and report.cost is not None and report.cost.billed_s >= 60
    assert_run_in_prometheus(env.prometheus, report)
    mail, post = notifications_of(env, dag_run.run_id, planted)
    assert "ec2_training FAILED at train" in mail and "Failed step: train" in mail
    assert "Error:       training exited with code " in mail and "training exited with code " in post
    # A failed run too: the planted secrets never reached a command line, a file or MLflow while the job ran.
    assert processes.saw(training_job_command(env)), "the sampler never saw the training job"
    assert secrets_found(planted, env, dag_run, capfd.readouterr().out, processes, ssh_traffic) == {}


def test_retried_launch_adopts_the_instance_it_already_started(
    env: EmbeddedStack, sha: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models import EC2Backend

    original = EC2Backend.run_instances
    calls: list[str] = []

    def lose_first_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        reservation = original(self, *args, **kwargs)
        calls.append(kwargs["instance_type"])
        if len(calls) == 1:
            # The instance exists, but the answer never reached the launch task: its try fails.
            raise EC2ClientError("RequestExpired", "simulated: the response to RunInstances was lost")
        return reservation

    monkeypatch.setattr(EC2Backend, "run_instances", lose_first_response)
    dag_run = run_dag(git_ref=sha)

    assert dag_run.state == "success", task_states(dag_run)
    assert calls == ["g6.xlarge"], "the retried launch must adopt the instance, not start another"
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    assert tis["launch"].try_number == 2
    assert tis["launch"].xcom_pull(task_ids="launch")["reused"] is True
    assert_all_terminated(env, dag_run, 1)


def test_instance_terminated_from_outside_is_reported_promptly(
    env: EmbeddedStack, sha: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """A spot interruption or a person in the console: the train task must say so at once, not hang or retry."""
    import time

    terminated_at: list[float] = []

    def terminate_once_training() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            logs = [job / "output.log" for job in env.job_dirs() if job not in earlier_jobs]
            if logs and logs[0].exists() and "epoch" in logs[0].read_text(errors="replace"):
                ec2 = env.cloud.client("ec2")
                live = ec2.describe_instances(
                    Filters=[
                        {"Name": "tag:ec2-trainer:project", "Values": ["ec2-trainer"]},
                        {"Name": "instance-state-name", "Values": ["running"]},
                    ]
                )["Reservations"]
                ec2.terminate_instances(InstanceIds=[i["InstanceId"] for r in live for i in r["Instances"]])
                terminated_at.append(time.monotonic())
                return
            time.sleep(0.2)

    # Job logs of earlier runs' (terminated) instances must not be mistaken for this run's.
    earlier_jobs = set(env.job_dirs())
    # Long enough to be caught in the middle: many epochs of the tiny set.
    killer = threading.Thread(target=terminate_once_training, daemon=True)
    killer.start()
    dag_run = run_dag(git_ref=sha, epochs=200)
    killer.join(timeout=5)
    log = capfd.readouterr().out

    states = task_states(dag_run)
    assert terminated_at, "the instance was never seen training"
    assert dag_run.state == "failed"
    assert states["train"] == "failed"
    assert states["terminate"] == "success"
    # Reported as ended, and why (EC2's StateReason of a TerminateInstances call), not as an SSH error.
    assert "is terminated (Client.UserInitiatedShutdown: User initiated shutdown): a StopInstances" in log
    assert "It ended while training" in log
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    assert tis["train"].try_number == 1, "a lost instance is final: no retry"
    detected_after_s = tis["train"].end_date.timestamp() - (time.time() - (time.monotonic() - terminated_at[0]))
    assert detected_after_s < 30, f"detected {detected_after_s:.1f}s after the termination"
    assert_all_terminated(env, dag_run, 1)


def test_host_answering_with_another_key_is_refused(
    env: EmbeddedStack, sha: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A man in the middle at the instance's address: refused with a clear error before any login or command."""
    import embedded.cloud
    from orchestrator.cloud.hostkeys import generate_host_key
    from orchestrator.instance.job_script import job_key

    genuine = embedded.cloud.cloud_init.LoopbackSshd
    impostors: list[Any] = []

    def impostor(host_private_key_pem: str, *args: Any, **kwargs: Any) -> Any:
        server = genuine(generate_host_key().private_openssh, *args, **kwargs)
        impostors.append(server)
        return server

    monkeypatch.setattr(embedded.cloud.cloud_init, "LoopbackSshd", impostor)
    dag_run = run_dag(git_ref=sha)
    log = capfd.readouterr().out

    states = task_states(dag_run)
    assert dag_run.state == "failed"
    assert states["wait_ready"] == "failed"
    assert states["train"] == "upstream_failed"
    assert "possible man-in-the-middle" in log
    assert impostors, "the impostor server never started"
    assert "Accepted publickey" not in impostors[0].read_log(), "the client must not even authenticate"
    assert job_key(dag_run.dag_id, dag_run.run_id) not in {job.name for job in env.job_dirs()}, "no job may start"
    assert_all_terminated(env, dag_run, 1)
