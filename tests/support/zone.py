"""The machine's time zone for one test: what runs on a worker in another zone must still write UTC."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def machine_zone(zone: str) -> Iterator[None]:
    """Run the block with TZ=`zone` in effect for the C library (time.tzset), then restore the zone it had."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = zone
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = before
        time.tzset()
