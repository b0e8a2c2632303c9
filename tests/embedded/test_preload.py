"""The embedded deployments' local settings: only the components that fork tasks load the tasks' libraries."""

from __future__ import annotations

import subprocess
import sys

import pytest

from embedded.deploy.preload import LOCAL_SETTINGS_SOURCE, MODULES, preload_for_tasks
from tests.conftest import REPO


def loaded_by(*argv: str) -> list[str]:
    """Which of MODULES a fresh interpreter holds after running the local settings as the component `argv`."""
    code = (
        f"import sys; sys.argv = {list(argv)!r}\n{LOCAL_SETTINGS_SOURCE}"
        f"print(','.join(m for m in {list(MODULES)!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return [m for m in done.stdout.strip().split(",") if m]


@pytest.mark.parametrize("argv", [("airflow", "scheduler"), ("airflow", "celery", "worker", "-q", "default")])
def test_the_components_that_fork_tasks_load_them(argv: tuple[str, ...]) -> None:
    assert loaded_by(*argv) == list(MODULES)


@pytest.mark.parametrize(
    "argv", [("airflow", "api-server"), ("airflow", "triggerer"), ("airflow", "dag-processor"), ("airflow", "celery")]
)
def test_the_others_load_nothing(argv: tuple[str, ...]) -> None:
    assert preload_for_tasks(argv) == ()
    assert loaded_by(*argv) == []
