"""The training DAG's trigger inputs through `dag.test()`: refs that look like numbers reach the CI gate as text and
resolve; a misspelt conf key fails the run before anything is spent.

The GitHub stand-in resolves refs with `git rev-parse` in a repository of its own; each test points it at a shared
clone of the project (the project's refs stay untouched) holding a tag `1.0`, a branch `2024` and a commit whose
7-digit abbreviation reads as a whole number (all digits, no leading zero). A type no region offers stops each run at
plan_launch, right after the gate: what is under test ends there, and nothing is launched.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from embedded.deploy.stack import EmbeddedStack
from tests.conftest import REPO
from tests.support.pipeline import assert_all_terminated, run_dag, task_states

pytestmark = pytest.mark.slow

_GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com"}
_GIT_ENV |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
# A random commit's 7-hex abbreviation is a whole number with odds 9/16 * (10/16)**6, about 1 in 30: this bound is
# never reached.
_MAX_TRIES = 2000


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, env={**os.environ, **_GIT_ENV}
    )
    return out.stdout.strip()


def _commit_abbreviated_as_a_number(repo: Path, parent: str) -> str:
    tree = _git(repo, "rev-parse", f"{parent}^{{tree}}")
    for n in range(_MAX_TRIES):
        sha = _git(repo, "commit-tree", tree, "-p", parent, "-m", f"numeric abbreviation {n}")
        # A leading zero would make it no Python literal, so native rendering would have left it a string.
        if sha[:7].isdigit() and sha[0] != "0":
            return sha
    raise AssertionError(f"no commit with a number for abbreviation in {_MAX_TRIES} tries")


@pytest.fixture(scope="module")
def refs_repo(tmp_path_factory: pytest.TempPathFactory, sha: str) -> tuple[Path, dict[str, tuple[str, str]]]:
    """A clone holding the number-like refs; for each kind, the ref and the full sha it must resolve to."""
    clone = tmp_path_factory.mktemp("refs") / "repo.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", "--shared", str(REPO), str(clone)], check=True)
    _git(clone, "tag", "1.0", sha)
    _git(clone, "branch", "2024", sha)
    numeric = _commit_abbreviated_as_a_number(clone, sha)
    return clone, {"tag": ("1.0", sha), "branch": ("2024", sha), "short sha": (numeric[:7], numeric)}


@pytest.mark.parametrize("kind", ["tag", "branch", "short sha"])
def test_a_number_like_ref_resolves_at_the_gate(
    env: EmbeddedStack, refs_repo: tuple[Path, dict[str, tuple[str, str]]], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    from airflow.models.renderedtifields import RenderedTaskInstanceFields

    clone, refs = refs_repo
    ref, expected_sha = refs[kind]
    monkeypatch.setattr(env.github, "repo_dir", clone)
    # No allow-list (the embedded default has one, which would refuse the type at the trigger, before the gate).
    monkeypatch.setenv("TRAINER__AWS__ALLOWED_INSTANCE_TYPES", "")

    dag_run = run_dag(git_ref=ref, instance_types=["p9.huge"])

    states = task_states(dag_run)
    assert states["ci_gate"] == "success", states
    (gate,) = (ti for ti in dag_run.get_task_instances() if ti.task_id == "ci_gate")
    rendered = RenderedTaskInstanceFields.get_templated_fields(gate)
    assert rendered is not None and rendered["git_ref"] == ref
    assert gate.xcom_pull(task_ids="ci_gate") == expected_sha
    # The run went no further than planned: the unknown type stopped it before any launch.
    assert states["plan_launch"] == "failed"
    assert_all_terminated(env, dag_run, 0)


def test_a_misspelt_conf_key_fails_at_trigger_time(
    env: EmbeddedStack, sha: str, capfd: pytest.CaptureFixture[str]
) -> None:
    dag_run = run_dag(git_ref=sha, epoch=3)

    states = task_states(dag_run)
    assert dag_run.state == "failed"
    assert states["resolve_config"] == "failed"
    assert states["ci_gate"] == "upstream_failed"
    assert "params: unknown key 'epoch'; did you mean 'epochs'?" in capfd.readouterr().out
    assert_all_terminated(env, dag_run, 0)
