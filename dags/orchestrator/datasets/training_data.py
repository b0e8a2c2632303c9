"""The training data a run reads: identified (and checked complete) before anything is launched."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from orchestrator.errors import fail_without_retry

if TYPE_CHECKING:
    from orchestrator.config.connections import AwsClients
    from orchestrator.config.settings import Settings
    from orchestrator.datasets.versions import DatasetVersion
log = logging.getLogger(__name__)


def training_data(s: Settings, aws: AwsClients | None = None) -> DatasetVersion | None:
    """The exact data an s3:// training.data_uri holds now (None for other schemes): it must exist and, when it is
    a version under datasets.uri, be complete (its marker written). Fails without retry otherwise. `aws`: the
    calling step's clients, when it has some."""
    from orchestrator.config.connections import AwsClients
    from orchestrator.datasets.s3 import identify

    if not s.training.data_uri.startswith("s3://"):
        return None
    s3 = (aws or AwsClients(s.aws.conn_id, s.aws.region)).client("s3")
    with fail_without_retry():
        version = identify(s3, s.training.data_uri, s.datasets)
    log.info(
        "Data %s: %s%d objects, %d bytes, digest %s",
        version.uri,
        f"version {version.name!r}, " if version.name else "",
        len(version.objects),
        sum(o.size for o in version.objects),
        version.digest,
    )
    return version
