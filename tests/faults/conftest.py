"""Fixtures of the fault-injection suite: the SSH traffic recorder, and `dag_faults` for the tests that run the training
DAG in this process. The process-list sampler (`processes`) and the fault table's `fault_table` are the whole tree's
(tests/support/pipeline.py, tests/support/fault_table.py): the Celery deployment's batch uses them too."""

from __future__ import annotations

import pytest

from embedded.deploy.stack import EmbeddedStack
from tests.support.fault_table import FaultTable
from tests.support.faults import DagRunFaults
from tests.support.leak_scan import SshTraffic
from tests.support.pipeline import ProcessListSampler


@pytest.fixture(autouse=True)
def recorded_ssh(ssh_traffic: SshTraffic) -> SshTraffic:
    """Every fault test records its SSH traffic: record_run reaches it through SshTraffic.active()."""
    return ssh_traffic


@pytest.fixture
def dag_faults(
    env: EmbeddedStack,
    planted: dict[str, str],
    processes: ProcessListSampler,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    fault_table: FaultTable,
) -> DagRunFaults:
    """The stack with the planted secrets in its connections, the process list sampled, the output captured and the
    test's fault-table row: a test names it where it named those fixtures, so they are set up in the same order."""
    return DagRunFaults(env, planted, processes, fault_table, capfd, caplog)
