"""The DAG files: they import cleanly through Airflow's DagBag, wire the expected tasks, stay cheap to parse, and
their trigger-form Params accept good values and refuse bad ones."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest

from orchestrator.retries import OUTAGE_RETRIES
from tests.conftest import REPO

DAGS_DIR = REPO / "dags"
DAG_FILES = sorted(p.name for p in DAGS_DIR.glob("*.py"))
HEAVY_MODULES = ("torch", "mlflow", "boto3", "botocore", "paramiko", "requests", "numpy", "pandas")
PARSE_BOUND_S = 10.0
SHA = "0123456789abcdef0123456789abcdef01234567"

# Imports one DAG file as a DAG processor would, and reports its parse time and the heavy modules it pulled in.
_PROBE = """
import importlib.util, json, sys, time
sys.path.insert(0, sys.argv[1])
import airflow.sdk  # loaded by every DAG processor anyway: not part of the file's own cost
started = time.perf_counter()
spec = importlib.util.spec_from_file_location("dag_under_test", sys.argv[2])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
elapsed = time.perf_counter() - started
heavy = sorted(m for m in json.loads(sys.argv[3]) if m in sys.modules)
print(json.dumps({"parse_s": elapsed, "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def dagbag(airflow_db: Any) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_DIR))


@pytest.fixture(scope="module")
def training_dag(dagbag: Any) -> Any:
    return dagbag.dags["ec2_training"]


def test_dag_files_import_without_errors(dagbag: Any) -> None:
    assert dagbag.import_errors == {}
    assert sorted(dagbag.dags) == ["ec2_bake_image", "ec2_reaper", "ec2_retrain", "ec2_sweep", "ec2_training"]


def test_every_dag_file_was_collected(dagbag: Any) -> None:
    files = {dag.fileloc.rsplit("/", 1)[-1] for dag in dagbag.dags.values()}
    assert files == set(DAG_FILES)


def test_training_dag_tasks_and_dependencies(training_dag: Any) -> None:
    from orchestrator.instance.training_operator import RemoteTrainingOperator

    tasks = {t.task_id: t for t in training_dag.tasks}
    assert set(tasks) == {
        "resolve_config",
        "ci_gate",
        "plan_launch",
        "launch",
        "wait_ready",
        "train",
        "evaluate",
        "terminate",
        "report",
        "verdict",
    }
    assert "resolve_config" in tasks["ci_gate"].upstream_task_ids
    assert "ci_gate" in tasks["plan_launch"].upstream_task_ids
    assert "plan_launch" in tasks["launch"].upstream_task_ids
    assert "launch" in tasks["wait_ready"].upstream_task_ids
    assert "wait_ready" in tasks["train"].upstream_task_ids
    assert "train" in tasks["evaluate"].upstream_task_ids
    # The instance goes as soon as the training's result is in MLflow: evaluate (MLflow only) does not hold it.
    assert {"train", "plan_launch"} <= tasks["terminate"].upstream_task_ids
    assert "evaluate" not in training_dag.get_task("terminate").get_flat_relative_ids(upstream=True)

    assert tasks["plan_launch"].is_setup
    assert tasks["terminate"].is_teardown
    assert [t.task_id for t in tasks["terminate"].upstream_list if t.is_setup] == ["plan_launch"]
    # The report comes after terminate and evaluate, whatever happened; as a teardown it never decides the run.
    assert tasks["report"].is_teardown and not tasks["report"].on_failure_fail_dagrun
    assert tasks["report"].upstream_task_ids == {"plan_launch", "terminate", "evaluate"}
    # The verdict is the last task and the one teardown that decides the run, from every step's state.
    verdict = tasks["verdict"]
    assert verdict.is_teardown and verdict.on_failure_fail_dagrun
    assert verdict.upstream_task_ids == {"report"} and not verdict.downstream_task_ids
    assert verdict.get_flat_relative_ids(upstream=True) == set(tasks) - {"verdict"}
    # Its retries ride out a control-plane blip; its own failure is final (AirflowFailException).
    assert verdict.retries >= 3
    assert not any(
        t.is_setup or t.is_teardown
        for name, t in tasks.items()
        if name not in ("plan_launch", "terminate", "report", "verdict")
    )
    # Every step records why it failed for the run report.
    assert all(t.on_failure_callback for t in tasks.values())

    train = tasks["train"]
    assert isinstance(train, RemoteTrainingOperator)
    assert len(train.operator_extra_links) == 1
    assert train.operator_extra_links[0].name


def test_bake_dag_reuses_the_launch_steps_and_always_terminates_its_builder(dagbag: Any) -> None:
    from orchestrator.cloud.operators import InstanceLaunchSensor
    from orchestrator.instance.operators import InstanceReadyOperator

    dag = dagbag.dags["ec2_bake_image"]
    tasks = {t.task_id: t for t in dag.tasks}
    assert set(tasks) == {"resolve_config", "plan_launch", "launch", "wait_ready", "make_image", "prune", "terminate"}
    assert isinstance(tasks["launch"], InstanceLaunchSensor) and tasks["launch"].pool == "ec2_trainer_launch"
    assert isinstance(tasks["wait_ready"], InstanceReadyOperator)
    assert tasks["plan_launch"].is_setup
    # Torn down once the plan succeeded, whatever failed after it; after the image is made, never before.
    assert tasks["terminate"].is_teardown and "plan_launch" in tasks["terminate"].upstream_task_ids
    assert "make_image" in tasks["terminate"].upstream_task_ids
    assert {"wait_ready", "launch"} <= tasks["make_image"].upstream_task_ids
    assert "make_image" in tasks["prune"].upstream_task_ids
    assert dag.schedule is None and dag.max_active_runs == 1


def test_the_sweeps_list_of_training_teardowns_is_the_dags(training_dag: Any) -> None:
    """A sweep counts a set by its steps: every task of ec2_training but these."""
    from orchestrator.tracking.training_runs import TRAINING_TEARDOWNS

    assert set(TRAINING_TEARDOWNS) == {t.task_id for t in training_dag.tasks if t.is_teardown}


def test_a_failure_before_the_launch_setup_is_announced_by_the_failing_step(training_dag: Any) -> None:
    """Such a run has no report (its setup never succeeded), so its failing step sends the notice itself."""
    from orchestrator.observe.early_failure import announce_early_failure, report_will_run

    early = {"resolve_config", "ci_gate", "plan_launch"}
    for task in training_dag.tasks:
        assert report_will_run(training_dag, task.task_id) is (task.task_id not in early), task.task_id
        assert announce_early_failure in task.on_failure_callback


def test_only_launch_takes_turns_in_the_shipped_one_slot_pool(training_dag: Any) -> None:
    pools = json.loads((REPO / "config" / "pools.json").read_text())
    in_pools = {t.task_id: t.pool for t in training_dag.tasks if t.pool != "default_pool"}
    assert in_pools == {"launch": "ec2_trainer_launch"}
    assert pools["ec2_trainer_launch"]["slots"] == 1
    # Waiting runs hold no slot: only launch (the count-then-launch step) is serialised, never the cleanup.
    assert training_dag.max_active_runs >= 8


def test_the_steps_an_outage_interrupts_retry_over_minutes(training_dag: Any) -> None:
    """A control-plane outage kills whatever try is running: train and evaluate back off over minutes (issue 19)."""
    delays = [
        min(
            OUTAGE_RETRIES["retry_delay"] * OUTAGE_RETRIES["retry_exponential_backoff"] ** n,
            OUTAGE_RETRIES["max_retry_delay"],
        )
        for n in range(OUTAGE_RETRIES["retries"])
    ]
    assert delays[0] <= timedelta(seconds=30), "a lost worker's retry comes soon"
    assert sum(delays, timedelta()) >= timedelta(minutes=10), "tries span a long outage"
    tasks = {t.task_id: t for t in training_dag.tasks}
    for task_id in ("train", "evaluate"):
        assert {k: getattr(tasks[task_id], k) for k in OUTAGE_RETRIES} == OUTAGE_RETRIES, task_id


def test_reaper_dag_is_scheduled_and_single(dagbag: Any) -> None:
    reaper = dagbag.dags["ec2_reaper"]
    assert [t.task_id for t in reaper.tasks] == ["reap_expired_instances"]
    assert reaper.max_active_runs == 1
    assert reaper.schedule == timedelta(minutes=5)


def test_sweep_dag_gates_ci_once_then_maps_one_training_run_per_set(dagbag: Any) -> None:
    from orchestrator.sweeps.operators import SweepSetOperator

    sweep = dagbag.dags["ec2_sweep"]
    tasks = {t.task_id: t for t in sweep.tasks}
    assert set(tasks) == {"resolve_sweep", "ci_gate", "start_sweep", "train_set", "gate_best_set", "summary"}
    assert tasks["ci_gate"].upstream_task_ids == {"resolve_sweep"}
    # Nothing is created (parent MLflow run, any set's run) before the commit's CI passed.
    # The graph draws the sweep's order: start_sweep pulls resolve_sweep's value instead of taking its XComArg.
    assert tasks["start_sweep"].upstream_task_ids == {"ci_gate"}
    assert tasks["train_set"].upstream_task_ids == {"start_sweep"}
    assert tasks["gate_best_set"].upstream_task_ids == {"train_set"}
    assert tasks["summary"].upstream_task_ids == {"gate_best_set"}
    # A failed set must not stop the gate and the summary; the summary is the one leaf, so it sets the run's state.
    assert tasks["gate_best_set"].trigger_rule == tasks["summary"].trigger_rule == "all_done"
    assert [t.task_id for t in sweep.tasks if not t.downstream_task_ids] == ["summary"]
    mapped = tasks["train_set"]
    assert mapped.operator_class is SweepSetOperator or issubclass(mapped.operator_class, SweepSetOperator)
    assert {k: mapped.partial_kwargs[k] for k in OUTAGE_RETRIES} == OUTAGE_RETRIES
    assert all(getattr(tasks["gate_best_set"], k) == v for k, v in OUTAGE_RETRIES.items())
    default = SweepSetOperator(task_id="t", trigger_run_id="r")
    assert (default.trigger_dag_id, default.wait_for_completion, default.deferrable) == ("ec2_training", True, True)
    assert default.fail_when_dag_is_paused


def test_sweep_params_check_each_knob_with_the_training_forms_schema(dagbag: Any) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    params = copy.deepcopy(dagbag.dags["ec2_sweep"].params)
    assert params.validate() == {"git_ref": None, "sets": None, "grid": None}
    sets = [{"learning_rate": 0.001}, {"learning_rate": 0.003, "epochs": 2}]
    assert params.get_param("sets").resolve(sets) == sets
    assert params.get_param("grid").resolve({"model": ["default", "seed"]}) == {"model": ["default", "seed"]}
    with pytest.raises(ParamValidationError, match=r"0 is less than the minimum of 1"):
        copy.deepcopy(params.get_param("sets")).resolve([{"epochs": 0}, {}])
    with pytest.raises(ParamValidationError, match=r"is too long"):
        copy.deepcopy(params.get_param("sets")).resolve([{"epochs": n} for n in range(1, 18)])
    with pytest.raises(ParamValidationError, match=r"Additional properties are not allowed \('epoch' was unexpected"):
        copy.deepcopy(params.get_param("grid")).resolve({"epoch": [1, 2]})


@pytest.fixture(scope="module")
def every_dag(dagbag: Any, airflow_db: Any) -> dict[str, Any]:
    """Every DAG a deployment may show: the folder's, plus ec2_dataset_poll, parsed only with datasets.poll_minutes."""
    from airflow.dag_processing.dagbag import DagBag

    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRAINER__DATASETS__URI", "s3://bkt/versions/")
        env.setenv("TRAINER__DATASETS__POLL_MINUTES", "10")
        retrain = DagBag(dag_folder=str(DAGS_DIR / "ec2_retrain.py"))
    assert not retrain.import_errors, retrain.import_errors
    return {**dagbag.dags, **retrain.dags}


def test_every_dag_explains_itself_to_a_user(every_dag: dict[str, Any]) -> None:
    """The DAG list's card and the Docs panel: what it does, each of its params, where the results land."""
    assert "ec2_dataset_poll" in every_dag
    for dag_id, dag in every_dag.items():
        assert dag.description and len(dag.description) > 30, dag_id
        doc = dag.doc_md or ""
        for heading in ("# ", "## Parameters", "## Where the results land"):
            assert f"\n{heading}" in f"\n{doc}", f"{dag_id}'s doc has no {heading!r}"
        assert "<!--" not in doc, f"{dag_id}'s doc kept a placeholder"
        for name in dag.params:
            param = dag.params.get_param(name)
            assert f"(`{name}`): {param.description}" in doc, f"{dag_id}'s doc does not name its param {name}"
        if not dag.params:
            assert "## Parameters\n\nNone" in doc, f"{dag_id}'s doc does not say it takes no parameters"


@pytest.mark.parametrize("dag_file", DAG_FILES)
def test_dag_file_parses_cheaply_without_heavy_modules(dag_file: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(DAGS_DIR), str(DAGS_DIR / dag_file), json.dumps(HEAVY_MODULES)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # Shown with `pytest -s`, and in the captured output of a failure.
    sys.stdout.write(f"\n{dag_file}: parsed in {report['parse_s']:.3f}s (after airflow.sdk)\n")
    assert report["heavy"] == [], f"{dag_file} imports {report['heavy']} at parse time: import them inside tasks"
    assert report["parse_s"] < PARSE_BOUND_S


# ---- trigger-form Params


def test_default_params_validate(training_dag: Any) -> None:
    # Every knob empty means the configured value; none is required, so the form's Trigger button is enabled.
    resolved = copy.deepcopy(training_dag.params).validate()
    assert resolved == dict.fromkeys(training_dag.params)


def test_every_param_explains_itself_and_can_go_back_to_configured(training_dag: Any) -> None:
    for name in training_dag.params:
        param = training_dag.params.get_param(name)
        schema = param.schema
        assert schema["title"] and schema["section"], name
        # What it is, its range and what empty means, e.g. "... from 1 to 10000. Empty: the configured value (...)."
        # (or, for what ec2_sweep sets, what a run of its own does).
        assert re.search(r"Empty: (the configured value[ ,]|none, |true, )", str(param.description)), name
        assert len(str(param.description)) > 60, name
        # Airflow's form marks a field required unless its type admits null, and clears a field back to null.
        assert "null" in schema["type"], name
        if "enum" in schema:
            assert schema["enum"][0] is None, name
            assert schema["values_display"][None].startswith(("configured", "true, evaluate decides")), name


@pytest.mark.parametrize(
    ("env", "shown"),
    [
        ({"TRAINER__AWS__DEPLOYMENT": "test", "TRAINER__TRAINING__EPOCHS": "12"}, "the configured value, 12 ("),
        (
            {"TRAINER__AWS__DEPLOYMENT": "test", "TRAINER__TRAINING__EPOCHS": "0"},
            "not shown: the settings did not load",
        ),
    ],
)
def test_the_form_shows_the_configured_values_as_parsed(airflow_db: Any, env: dict[str, str], shown: str) -> None:
    """Read when the DAG file is parsed; settings that do not load leave the DAG importable, saying so."""
    from airflow.dag_processing.dagbag import DagBag

    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        parsed = DagBag(dag_folder=str(DAGS_DIR / "ec2_training.py"))
    assert parsed.import_errors == {}
    assert shown in str(parsed.dags["ec2_training"].params.get_param("epochs").description)


def test_the_api_server_checks_a_trigger_as_the_form_shows_it(training_dag: Any) -> None:
    """The api-server validates a trigger's conf against the serialized DAG: the same schema survives the trip, and
    a refusal names the Param (the form shows this message above the Trigger button)."""
    from airflow.exceptions import ParamValidationError
    from airflow.serialization.serialized_objects import DagSerialization

    served = DagSerialization.from_dict(json.loads(json.dumps(DagSerialization.to_dict(training_dag)))).params
    assert served.deep_merge({}).validate() == dict.fromkeys(training_dag.params)
    assert served.deep_merge({"spot": "true", "epochs": 3}).validate()["spot"] == "true"
    spot = served.get_param("spot").schema
    assert spot["enum"] == [None, "true", "false"] and spot["values_display"]["None"] == "configured (aws.spot)"
    with pytest.raises(ParamValidationError, match=r"Invalid input for param epochs: 0 is less than the minimum of 1"):
        served.deep_merge({"epochs": 0}).validate()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("git_ref", "feature/x"),
        ("git_ref", SHA),
        ("git_ref", "1.0"),
        ("git_ref", ""),
        ("instance_types", ["g6.xlarge", "p4d.24xlarge"]),
        ("spot", "true"),
        ("spot", "false"),
        ("spot", None),
        ("epochs", 1),
        ("epochs", 10000),
        ("batch_size", 512),
        ("learning_rate", 1),
        ("learning_rate", 0.0001),
        ("model", "seed"),
        ("data_uri", "synthetic://?size=64&seed=1"),
        ("data_uri", "s3://bucket/prefix/"),
        ("data_uri", "file:///data/hurricane"),
        ("data_uri", "/data/hurricane.zip"),
        ("data_uri", ""),
        ("max_lifetime_minutes", 10),
    ],
)
def test_good_param_values_are_accepted(training_dag: Any, name: str, value: Any) -> None:
    param = copy.deepcopy(training_dag.params.get_param(name))
    assert param.resolve(value) == value


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("git_ref", "x" * 256, r"is too long"),
        ("git_ref", 5, r"5 is not of type 'null', 'string'"),
        ("git_ref", "-x", r"'-x' does not match"),
        ("git_ref", "main; id", r"'main; id' does not match"),
        ("instance_types", ["not a type!"], r"'not a type!' does not match"),
        ("instance_types", "g6.xlarge", r"'g6\.xlarge' is not of type 'null', 'array'"),
        ("instance_types", ["g6.xlarge", "g6.xlarge"], r"has non-unique elements"),
        ("spot", "yes", r"'yes' is not one of \[None, 'true', 'false'\]"),
        ("spot", True, r"True is not of type 'null', 'string'"),
        ("epochs", -1, r"-1 is less than the minimum of 1"),
        ("epochs", 0, r"0 is less than the minimum of 1"),
        ("epochs", 10001, r"10001 is greater than the maximum of 10000"),
        ("epochs", 1.5, r"1\.5 is not of type 'null', 'integer'"),
        ("batch_size", 0, r"0 is less than the minimum of 1"),
        ("learning_rate", 0, r"0 is less than or equal to the minimum of 0"),
        ("learning_rate", 1.5, r"1\.5 is greater than the maximum of 1"),
        ("model", "resnet", r"'resnet' is not one of \[None, 'default', 'seed'\]"),
        ("data_uri", "s3://b/" + "x" * 1024, r"is too long"),
        ("data_uri", "ftp://host/data", r"'ftp://host/data' does not match"),
        ("data_uri", "s3://", r"'s3://' does not match"),
        ("data_uri", "-rf", r"'-rf' does not match"),
        ("data_uri", "synthetic:// x", r"does not match"),
        ("instance_types", [f"g{n}.xlarge" for n in range(21)], r"is too long"),
        # The form's pattern must match the whole value: `$` let a trailing newline through.
        ("instance_types", ["g6.xlarge\n"], r"'g6\.xlarge\\n' does not match"),
        ("max_lifetime_minutes", 9, r"9 is less than the minimum of 10"),
    ],
    ids=lambda v: str(v)[:20],
)
def test_bad_param_values_are_refused(training_dag: Any, name: str, value: Any, match: str) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    param = copy.deepcopy(training_dag.params.get_param(name))
    with pytest.raises(ParamValidationError, match=match):
        param.resolve(value)


def test_params_are_the_keys_the_configuration_knows(training_dag: Any) -> None:
    from orchestrator.config.settings import PARAM_NAMES

    # resolve_config refuses any other trigger key, so a param declared here but unknown there could never be used.
    assert set(training_dag.params) == PARAM_NAMES


# ---- values between tasks keep their types


class _XComs:
    """The part of a task instance that templates and XComArgs read: return values by task id."""

    _upstream_map_indexes: dict[str, Any] = {}

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def xcom_pull(self, task_ids: str, key: str = "return_value", **_: Any) -> Any:
        assert key == "return_value", key
        return self.values[task_ids]


def _rendered(task: Any, xcoms: dict[str, Any]) -> Any:
    task = copy.deepcopy(task)
    task.render_template_fields({"ti": _XComs(xcoms)})
    return task


# Each would come out of native rendering as a number: 1.0, 2024, 1234567, 100000.0, 16, 1000.
NUMBER_LIKE = ["1.0", "2024", "1234567", "1e5", "0x10", "1_000"]


@pytest.mark.parametrize("ref", NUMBER_LIKE)
def test_the_ci_gate_receives_the_ref_as_text(training_dag: Any, ref: str) -> None:
    from orchestrator.ci.verdict import parse_allowed_conclusions
    from orchestrator.config.settings import load_settings

    config = load_settings(
        {"git_ref": ref}, env={"TRAINER__GITHUB__CONN_ID": "2024", "TRAINER__AWS__DEPLOYMENT": "test"}
    ).to_dict() | {"git_ref": ref}
    gate = _rendered(training_dag.get_task("ci_gate"), {"resolve_config": config})
    assert gate.git_ref == ref
    assert gate.github_conn_id == "2024"
    assert (gate.repo, gate.api_url) == (config["github"]["repo"], config["github"]["api_url"])
    assert parse_allowed_conclusions(gate.allowed_conclusions) == set(config["github"]["allowed_conclusions"])
    assert float(gate.timeout_s) == config["github"]["ci_timeout_minutes"] * 60


def test_train_receives_the_upstream_values_unchanged(training_dag: Any) -> None:
    from orchestrator.config.resolve import run_config

    sha = "1234567890" * 4  # all digits: native rendering would make it an int
    config = {"git_ref": "2024", "training": {"extra_params": {"note": "1.0", "tag": "<a & 'b'>"}}}
    ready = {"instance_id": "i-0123", "address": "127.0.0.1", "host_public_key": "ssh-ed25519 AAAA"}
    train = _rendered(training_dag.get_task("train"), {"resolve_config": config, "wait_ready": ready, "ci_gate": sha})
    assert (run_config(train.config), train.ready, train.git_sha) == (config, ready, sha)


def test_the_graph_draws_the_pipelines_order_not_an_edge_from_resolve_config_to_every_task(training_dag: Any) -> None:
    """Each task still gets the run's config (a template renders resolve_config's value), with no edge for it."""
    from orchestrator.config.resolve import run_config

    upstream = {t.task_id: t.upstream_task_ids for t in training_dag.tasks}
    assert upstream == {
        "resolve_config": set(),
        "ci_gate": {"resolve_config"},
        "plan_launch": {"ci_gate"},
        "launch": {"plan_launch"},
        "wait_ready": {"launch"},
        "train": {"wait_ready"},
        "terminate": {"plan_launch", "train"},
        "evaluate": {"train"},
        "report": {"plan_launch", "terminate", "evaluate"},
        "verdict": {"report"},
    }
    config = {"git_ref": "main", "promote": False, "aws": {"instance_types": ["g6.xlarge"]}}
    xcoms = {"resolve_config": config, "ci_gate": "0" * 40, "plan_launch": {}, "launch": {}, "wait_ready": {}}
    for task_id in ("launch", "wait_ready", "train"):
        assert run_config(_rendered(training_dag.get_task(task_id), xcoms).config) == config, task_id
    for task_id in ("plan_launch", "evaluate", "terminate", "report"):
        assert run_config(_rendered(training_dag.get_task(task_id), xcoms | {"train": "r"}).op_args[0]) == config
