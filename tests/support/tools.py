"""A test that needs a tool this machine lacks: skipped on a development machine, failed under `CI=true`.

CI installs every tool (.ci/system-deps.sh, the workflow's services) and runs as root, so a tool missing there is a
broken runner, not an optional test: skipping would turn the gate green without running the check. Opt-in tests
(real AWS, the real GitHub API) skip by their own switch and do not use this.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing_tool(reason: str) -> NoReturn:
    """Skip with `reason` (which says how to install the tool); under CI=true fail with it instead."""
    if in_ci():
        pytest.fail(f"CI=true and {reason}: the CI runner must provide it (.ci/system-deps.sh)")
    pytest.skip(reason)


def require_executable(name: str, install: str) -> str:
    """The path of `name` on PATH, or a skip (a failure under CI=true) saying `install`."""
    path = shutil.which(name)
    if path is None:
        missing_tool(f"{name} not installed ({install})")
    return path


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        missing_tool(f"not root: {why}")
