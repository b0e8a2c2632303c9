"""The browser the UI tests drive: Playwright (PyPI) driving Debian's Chromium."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.tools import missing_tool

# Debian's Chromium by default; EC2_TRAINER_CHROMIUM names another build (the GitHub workflow's Playwright download:
# Ubuntu 24.04's `chromium` package is a snap stub that cannot run on its runners).
CHROMIUM = Path(os.environ.get("EC2_TRAINER_CHROMIUM") or "/usr/bin/chromium")
# FACTS.md: headless Chromium as root in a container needs these.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
UI_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright import sync_api
    except ImportError:
        missing_tool("playwright not installed: it is in requirements.lock, make install")
    if not CHROMIUM.exists():
        missing_tool(
            f"{CHROMIUM} missing: `make test` installs Debian's chromium (.ci/system-deps.sh); "
            "or set EC2_TRAINER_CHROMIUM to a Chromium executable"
        )
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()
