"""wait_ready's body: the login to the instance, its XCom, and the wait in a worker."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from orchestrator.contracts_steps import LaunchedInstance, ReadyInstance, RunningInstance
from orchestrator.errors import fail_without_retry

if TYPE_CHECKING:
    from orchestrator.config.settings import Settings

log = logging.getLogger(__name__)


def ssh_target(s: Settings, address: str, host_public_key: str) -> Any:
    from orchestrator.config.connections import ssh_private_key
    from orchestrator.instance.ssh import SshTarget

    return SshTarget(
        host=address,
        port=s.instance.ssh_port,
        user=s.instance.ssh_user,
        host_public_key=host_public_key,
        private_key_pem=ssh_private_key(s.instance.ssh_conn_id),
    )


def ready_result(
    s: Settings,
    launched: LaunchedInstance,
    running: RunningInstance,
    ssh_s: float,
    ready_s: float,
    bootstrap_phases_s: Mapping[str, float],
) -> ReadyInstance:
    """wait_ready's result: where train logs in (address and pinned host key) and how long each stage took (the
    bootstrap's own steps as the instance timed them)."""
    log.info("Bootstrap finished after %.1f s in all (SSH answered after %.1f s)", ready_s, ssh_s)
    return ReadyInstance(
        instance_id=running.instance_id,
        instance_type=running.instance_type,
        market=running.market,
        address=running.address,
        port=s.instance.ssh_port,
        host_public_key=launched.host_public_key,
        seconds_to_running=running.seconds_to_running,
        seconds_to_ssh=round(ssh_s, 1),
        seconds_to_ready=round(ready_s, 1),
        bootstrap_phases_s=dict(bootstrap_phases_s),
    )


def wait_ready_in_worker(s: Settings, launched: LaunchedInstance, running: RunningInstance) -> ReadyInstance:
    """Bounded, in this worker (training.deferrable = false): SSH answers with the pinned host key, and the
    bootstrap succeeded. The deferrable path does the same in the triggerer (instance.triggers)."""
    from orchestrator.cloud.tasks import instance_gone
    from orchestrator.instance.ssh import (
        HostKeyMismatchError,
        InstanceUnreachableError,
        wait_for_bootstrap,
        wait_for_ssh,
    )

    started, deadline = running.started_at, running.deadline
    target = ssh_target(s, running.address, launched.host_public_key)
    # A late or failed SSH or bootstrap is terminal; another host key is named here, not terminal: train retries it.
    with fail_without_retry(HostKeyMismatchError):
        wait_for_ssh(target, timeout_s=max(1.0, deadline - time.time()), poll_s=s.instance.poll_seconds)
        ssh_s = time.time() - started
        log.info("SSH answers on %s:%s with the pinned host key after %.1f s", target.host, target.port, ssh_s)
        log_offset = 0
        while True:
            try:
                bootstrap = wait_for_bootstrap(
                    target,
                    s.instance.state_dir,
                    timeout_s=max(1.0, deadline - time.time()),
                    poll_s=s.instance.poll_seconds,
                    on_log=lambda line: log.info("bootstrap | %s", line),
                    log_offset=log_offset,
                )
                break
            except InstanceUnreachableError as exc:
                # Gone: the caller reads why (a spot interruption relaunches); still there: wait on.
                if instance_gone(s, launched.instance_id):
                    raise
                log.warning("%s, but EC2 says %s still runs: waiting on", exc, launched.instance_id)
                log_offset = exc.log_offset
    return ready_result(s, launched, running, ssh_s, time.time() - started, bootstrap.phases_s)
