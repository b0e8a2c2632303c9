"""The embedded default's cloud: a moto server as AWS behind an IAM gate, and an emulator that boots each launched
instance on loopback (hypervisor), applying its user-data as cloud-init would (cloud_init).

The account's standing resources are in seed, the moto patches that make it behave as EC2 in strict_moto, this
machine's side of the instances (login user, mount namespaces, power-off) in host, each instance's metadata service
in imds and a spot interruption as FIS sends one in interruption; the systemd and shutdown stand-ins
the instances run are the shell scripts in bin/. Importers use the names below.
"""

from __future__ import annotations

from embedded.cloud.hypervisor import LocalCloud, running_cloud
from embedded.cloud.instance import EmulatedInstance
from embedded.cloud.interruption import send_spot_interruption
from embedded.cloud.seed import (
    ACCOUNT_ID,
    AMAZON_LINUX_DLAMI,
    DATASET_BUCKET,
    DATASET_PREFIX,
    UBUNTU_DLAMI,
)

__all__ = [
    "ACCOUNT_ID",
    "AMAZON_LINUX_DLAMI",
    "DATASET_BUCKET",
    "DATASET_PREFIX",
    "UBUNTU_DLAMI",
    "EmulatedInstance",
    "LocalCloud",
    "running_cloud",
    "send_spot_interruption",
]
