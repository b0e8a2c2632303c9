"""Fixtures of the fault-injection suite: the SSH traffic recorder, the process-list sampler and the row each test
adds to the fault table."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from tests.fault_table import FaultTable
from tests.leak_scan import SshTraffic
from tests.pipeline_fixtures import ProcessListSampler

_CALL_REPORT = pytest.StashKey[pytest.TestReport]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_REPORT] = report
    return report


@pytest.fixture(autouse=True)
def recorded_ssh(ssh_traffic: SshTraffic) -> SshTraffic:
    """Every fault test records its SSH traffic: record_run reaches it through SshTraffic.active()."""
    return ssh_traffic


@pytest.fixture
def processes() -> Iterator[ProcessListSampler]:
    """Every command line seen on this machine while the test runs: record_run scans it for the planted secrets."""
    with ProcessListSampler() as sampler:
        yield sampler


@pytest.fixture
def fault_table(request: pytest.FixtureRequest) -> Iterator[FaultTable]:
    table = FaultTable()
    yield table
    report = request.node.stash.get(_CALL_REPORT, None)
    if report is None or not report.passed:
        return
    if table.row is None:
        pytest.fail(f"{request.node.name} passed but recorded no row in the fault table")
    # The teardown report carries it to the process that prints the table (tests/fault_table.py).
    request.node.user_properties.append(table.as_property())
