"""Test DAG for the CI gate: the API URL comes from an Airflow Variable and the token from a connection.

tests/orchestrator/ci/test_gate.py starts a GitHub stand-in and sets AIRFLOW_VAR_CI_GATE_TEST_API_URL and
AIRFLOW_CONN_GITHUB_CI_GATE_TEST before running this DAG with dag.test().
"""

from __future__ import annotations

from airflow.sdk import DAG

from orchestrator.ci.gate import CiGateOperator

with DAG(
    dag_id="ci_gate_test",
    schedule=None,
    catchup=False,
    params={"git_ref": "main", "timeout_s": 30, "no_runs_timeout_s": 30, "allowed_conclusions": ""},
) as dag:
    CiGateOperator(
        task_id="ci_gate",
        git_ref="{{ params.git_ref }}",
        repo="local/ec2-trainer",
        api_url="{{ var.value.ci_gate_test_api_url }}",
        github_conn_id="github_ci_gate_test",
        allowed_conclusions="{{ params.allowed_conclusions }}",
        timeout_s="{{ params.timeout_s }}",
        no_runs_timeout_s="{{ params.no_runs_timeout_s }}",
        poll_interval_s="0.2",
        retries=0,
    )
