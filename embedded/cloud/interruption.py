"""A spot interruption as AWS FIS's `aws:ec2:send-spot-instance-interruptions` delivers one to an emulated instance.

FIS (docs.aws.amazon.com/fis/latest/userguide/fis-actions-reference.html) targets spot instances only: it posts a
rebalance recommendation, then the interruption notice in the instance's metadata two minutes before the
interruption, and then EC2 interrupts the instance: terminated, StateReason `Server.SpotInstanceTermination`. The
project launches one-time spot requests, whose interruption behaviour is always terminate. Here both delays are
parameters, short in tests.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from embedded.cloud.seed import ACCOUNT_ID

if TYPE_CHECKING:
    from embedded.cloud.hypervisor import LocalCloud

log = logging.getLogger(__name__)

# EC2's two-minute warning.
WARNING_S = 120.0
SPOT_TERMINATION = ("Server.SpotInstanceTermination: Spot instance termination", "Server.SpotInstanceTermination")


def send_spot_interruption(
    cloud: LocalCloud, instance_id: str, *, warning_s: float = WARNING_S, rebalance_s: float | None = None
) -> threading.Thread:
    """Interrupts the running spot instance `instance_id`: a rebalance recommendation `rebalance_s` before the notice
    (none when None), the notice, and `warning_s` later the termination. Returns the started thread that does it."""
    from moto.ec2.models import ec2_backends

    backend = ec2_backends[ACCOUNT_ID][cloud.region]
    moto_inst = backend.get_instance(instance_id)
    inst = cloud.instances.get(instance_id)
    # FIS refuses a target it cannot interrupt: an on-demand instance, or one not running.
    if moto_inst.lifecycle != "spot":
        raise ValueError(f"{instance_id} is not a spot instance: FIS interrupts only spot instances")
    if moto_inst.state != "running" or inst is None or inst.imds is None:
        raise ValueError(f"{instance_id} is not a running emulated instance (state {moto_inst.state})")
    imds = inst.imds

    def interrupt() -> None:
        if rebalance_s is not None:
            imds.post_rebalance_recommendation()
            time.sleep(rebalance_s)
        imds.post_interruption_notice("terminate", time.time() + warning_s)
        log.warning("%s: spot interruption notice posted; terminating in %.0f s", instance_id, warning_s)
        time.sleep(warning_s)
        if moto_inst.state != "running":
            return  # gone meanwhile (terminated by its run): nothing left to interrupt
        from moto.ec2.models.instances import StateReason

        backend.terminate_instances([instance_id])
        moto_inst.state_reason = StateReason(*SPOT_TERMINATION)
        # The emulator's next tick powers it off, as any terminated instance.

    thread = threading.Thread(target=interrupt, name=f"spot-interruption-{instance_id}", daemon=True)
    thread.start()
    return thread
