"""The project's GitHub Actions workflow (the CI that gates training), parsed: what its runner needs to run the
suite as `make test` does here, with CI=true reaching the tests through sudo and a Chromium that runs."""

from __future__ import annotations

import shlex
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.support.tools import require_executable

WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"


def steps() -> list[dict[str, Any]]:
    doc = yaml.safe_load(WORKFLOW.read_text())
    (job,) = doc["jobs"].values()
    return list(job["steps"])


def run_lines(step: dict[str, Any]) -> list[list[str]]:
    return [shlex.split(line) for line in str(step.get("run", "")).splitlines() if line.strip()]


def test_the_tests_run_as_root_with_ci_set_through_sudo():
    (command,) = (cmd for step in steps() for cmd in run_lines(step) if "make" in cmd and "test" in cmd)
    assert command[:2] == ["sudo", "env"], command
    # sudo resets the environment: each variable the tests need is passed by `env NAME=value`.
    passed = {arg.split("=", 1)[0]: arg.split("=", 1)[1] for arg in command[2:] if "=" in arg}
    assert passed.get("CI") == "$CI", command
    assert passed.get("EC2_TRAINER_CHROMIUM") == "$EC2_TRAINER_CHROMIUM", command
    assert passed.get("PATH") == "$PATH", command


def test_the_browser_is_playwrights_not_ubuntus_snap_stub():
    packages = [arg for step in steps() for cmd in run_lines(step) if "apt-get" in cmd for arg in cmd]
    assert "chromium" not in packages and "chromium-browser" not in packages, packages
    (browser,) = (step for step in steps() if "playwright" in str(step.get("run", "")))
    assert "install --with-deps chromium" in browser["run"]
    assert "EC2_TRAINER_CHROMIUM=" in browser["run"] and "GITHUB_ENV" in browser["run"]
    # The download goes where root (the tests) reads it, not into the runner user's home.
    assert browser["env"]["PLAYWRIGHT_BROWSERS_PATH"].startswith("/opt/")
    names = [step.get("name", "") for step in steps()]
    assert names.index(browser["name"]) < next(n for n, name in enumerate(names) if name.startswith("Tests"))


def test_a_missing_tool_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    for ci, outcome in (("true", pytest.fail.Exception), ("", pytest.skip.Exception)):
        monkeypatch.setenv("CI", ci)
        # BaseException: a skip raised where a failure is due must fail this test, not skip it.
        with pytest.raises(BaseException, match="shellcheck not installed") as raised:
            require_executable("shellcheck", "apt-get install -y shellcheck")
        assert raised.type is outcome, (ci, raised.type)
