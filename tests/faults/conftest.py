"""Fixtures of the fault-injection suite: the SSH traffic recorder. The process-list sampler (`processes`) and the
fault table's `fault_table` are the whole tree's (tests/support/pipeline.py, tests/support/fault_table.py): the Celery
deployment's batch uses them too."""

from __future__ import annotations

import pytest

from tests.support.leak_scan import SshTraffic


@pytest.fixture(autouse=True)
def recorded_ssh(ssh_traffic: SshTraffic) -> SshTraffic:
    """Every fault test records its SSH traffic: record_run reaches it through SshTraffic.active()."""
    return ssh_traffic
