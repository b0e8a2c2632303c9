"""The fault-injection suite's table: each test records one row once its assertions passed; the session prints them.

Set FAULT_TABLE_FILE to also write the table to a file (e.g. for a CI artifact).
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import pytest

from tests.pipeline_fixtures import ProcessListSampler

TABLE_FILE_ENV = "FAULT_TABLE_FILE"
TITLE = "Fault-injection suite"
_ROWS = pytest.StashKey[list["FaultRow"]]()
_CALL_REPORT = pytest.StashKey[pytest.TestReport]()


@dataclass(frozen=True)
class FaultRow:
    scenario: str
    expected: str
    observed: str
    instances_left: int  # the run's instances not terminated at the end
    # occurrences of the planted secrets in logs, XComs, rendered fields, user-data and the process list (sampled
    # for the whole test: the stand-in instance's processes, training included, run on this machine)
    secrets_found: int


class FaultTable:
    """Holds one test's row until the test has passed: a failing test shows as failed, never as a row."""

    def __init__(self) -> None:
        self.row: FaultRow | None = None

    def record(self, scenario: str, expected: str, observed: str, instances_left: int, secrets_found: int) -> None:
        if self.row is not None:
            raise RuntimeError(f"a fault test records one row; {self.row.scenario!r} was already recorded")
        self.row = FaultRow(scenario, expected, observed, instances_left, secrets_found)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_REPORT] = report
    return report


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
    request.config.stash.setdefault(_ROWS, []).append(table.row)


def render_table(rows: list[FaultRow]) -> str:
    header = tuple(f.name for f in fields(FaultRow))
    cells = [header, *(tuple(str(v) for v in astuple(row)) for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]

    def line(values: tuple[str, ...]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([TITLE, line(header), rule, *(line(c) for c in cells[1:])]) + "\n"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return
    table = render_table(rows)
    terminalreporter.write("\n" + table)
    if target := os.environ.get(TABLE_FILE_ENV):
        Path(target).write_text(table)
