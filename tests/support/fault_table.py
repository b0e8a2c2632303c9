"""The fault-injection suite's table: each fault test records one row once its assertions passed; the run prints them.

A row travels in its test's teardown report (as a user property), so the table is whole when the tests run in
pytest-xdist workers (`make test` runs two). Set FAULT_TABLE_FILE to also write the table to a file (a CI artifact).
Registered for the whole test tree through `pytest_plugins` in tests/conftest.py: the `fault_table` fixture serves
tests/faults and the Celery deployment's batch (tests/deploy/test_celery_deployment.py).
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import pytest

TABLE_FILE_ENV = "FAULT_TABLE_FILE"
TITLE = "Fault-injection suite"
ROW_PROPERTY = "fault_table_row"
_CALL_REPORT = pytest.StashKey[pytest.TestReport]()


@dataclass(frozen=True)
class FaultRow:
    scenario: str
    expected: str
    observed: str
    instances_left: int  # the run's instances not terminated at the end
    # occurrences of the planted secrets in logs, XComs, rendered fields, user-data, the process list (sampled for
    # the whole test), commands and SFTP writes sent over SSH, the instance's disk and the MLflow run (leak_scan.py)
    secrets_found: int


class FaultTable:
    """Holds one test's row until the test has passed: a failing test shows as failed, never as a row."""

    def __init__(self) -> None:
        self.row: FaultRow | None = None

    def record(self, scenario: str, expected: str, observed: str, instances_left: int, secrets_found: int) -> None:
        if self.row is not None:
            raise RuntimeError(f"a fault test records one row; {self.row.scenario!r} was already recorded")
        self.row = FaultRow(scenario, expected, observed, instances_left, secrets_found)

    def as_property(self) -> tuple[str, tuple[object, ...]]:
        if self.row is None:
            raise RuntimeError("no row recorded")
        return ROW_PROPERTY, astuple(self.row)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_REPORT] = report
    return report


@pytest.fixture
def fault_table(request: pytest.FixtureRequest) -> Iterator[FaultTable]:
    table = FaultTable()
    yield table
    report = request.node.stash.get(_CALL_REPORT, None)
    if report is None or not report.passed:
        return
    if table.row is None:
        pytest.fail(f"{request.node.name} passed but recorded no row in the fault table")
    # The teardown report carries it to the process that prints the table.
    request.node.user_properties.append(table.as_property())


def render_table(rows: list[FaultRow]) -> str:
    header = tuple(f.name for f in fields(FaultRow))
    cells = [header, *(tuple(str(v) for v in astuple(row)) for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]

    def line(values: tuple[str, ...]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([TITLE, line(header), rule, *(line(c) for c in cells[1:])]) + "\n"


class _TablePrinter:
    """Collects rows from the reports where they arrive (the controller, under xdist) and prints them at the end."""

    def __init__(self) -> None:
        self.rows: dict[str, FaultRow] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for name, value in report.user_properties:
            if name == ROW_PROPERTY and isinstance(value, (tuple, list)):  # a list once it crossed from a worker
                self.rows[report.nodeid] = FaultRow(*value)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.rows:
            return
        table = render_table([self.rows[nodeid] for nodeid in sorted(self.rows)])  # one order however they ran
        terminalreporter.write("\n" + table)
        if target := os.environ.get(TABLE_FILE_ENV):
            Path(target).write_text(table)


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # not an xdist worker: the process that reports
        config.pluginmanager.register(_TablePrinter(), "fault-table-printer")
