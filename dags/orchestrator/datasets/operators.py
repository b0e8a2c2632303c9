"""The poll DAG's check: deferred to the triggerer until a new complete version appears or its window ends."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Asset, Context


class DatasetPollOperator(BaseOperator):
    """Updates `asset` (extra: version, uri, digest) when the latest complete version under it differs from the one
    its last event named; skips, saying why, when none appeared within `window_s`."""

    template_fields: Sequence[str] = ()

    def __init__(
        self,
        *,
        asset: Asset,
        datasets_uri: str,
        marker: str,
        aws_conn_id: str,
        region: str,
        window_s: float,
        every_s: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(inlets=[asset], outlets=[asset], **kwargs)
        self.asset = asset
        # Not asset.uri: Airflow normalises that one (drops the trailing '/' a prefix needs).
        self.datasets_uri = datasets_uri
        self.marker = marker
        self.aws_conn_id = aws_conn_id
        self.region = region
        self.window_s = window_s
        self.every_s = every_s

    def execute(self, context: Context) -> None:
        from orchestrator.datasets.triggers import DatasetPollTrigger

        known = last_digest(context["inlet_events"][self.asset])
        self.log.info("Looking for a complete version under %s other than digest %s", self.datasets_uri, known)
        self.defer(
            trigger=DatasetPollTrigger(
                datasets_uri=self.datasets_uri,
                marker=self.marker,
                aws_conn_id=self.aws_conn_id,
                region=self.region,
                known_digest=known,
                every_s=self.every_s,
                deadline=time.time() + self.window_s,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.window_s + 600),
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        if event["status"] == "error":
            raise AirflowFailException(event["message"])
        if event["status"] == "unchanged":
            waiting = event.get("incomplete") or []
            reason = (
                f"no new complete dataset version under {self.datasets_uri} within {self.window_s:.0f} s (latest: "
                f"{event.get('version')!r}; without their marker {self.marker!r}: {waiting or 'none'})"
            )
            self.log.info("%s", reason)
            raise AirflowSkipException(reason)
        extra = {"version": event["version"], "uri": event["uri"], "digest": event["digest"]}
        context["outlet_events"][self.asset].extra = extra
        self.log.info(
            "New complete version %r (%s, digest %s): asset updated", extra["version"], extra["uri"], extra["digest"]
        )
        return extra


def last_digest(events: Any) -> str | None:
    """The digest the asset's latest event names (the poll's own events carry one; the SQS watcher's do not)."""
    latest = list(events.ascending(False).limit(1))
    extra = latest[0].extra if latest else {}
    digest = (extra or {}).get("digest")
    return str(digest) if digest else None
