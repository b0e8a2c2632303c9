"""Triggers that notice new dataset versions: from S3 event notifications in SQS (an asset watcher), or by looking
at S3 (the poll DAG's deferred check). Each blocking boto3 call runs in a thread (`asyncio.to_thread`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TriggerEvent

# Bounded back-off while the queue cannot be read (network, credentials, a deleted queue): the watcher keeps trying.
MAX_BACKOFF_S = 300.0


class DatasetQueueTrigger(BaseEventTrigger):
    """Reads S3 event notifications from SQS; fires once per batch that reports a marker under `datasets_uri`.

    Messages are deleted after the event is handed over (at least once: a triggerer that dies in between fires it
    again, and ec2_retrain starts one training per commit and data anyway). Messages about other objects are
    deleted unused. The Amazon provider's SqsSensorTrigger (behind common-messaging's MessageQueueTrigger) would
    need aiobotocore and fires on any message; this one filters the markers itself (docs/decisions.md).
    """

    def __init__(
        self,
        *,
        queue_url: str,
        datasets_uri: str,
        marker: str,
        aws_conn_id: str,
        region: str,
        wait_s: int = 20,
    ) -> None:
        super().__init__()
        self.queue_url = queue_url
        self.datasets_uri = datasets_uri
        self.marker = marker
        self.aws_conn_id = aws_conn_id
        self.region = region
        self.wait_s = wait_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "queue_url": self.queue_url,
                "datasets_uri": self.datasets_uri,
                "marker": self.marker,
                "aws_conn_id": self.aws_conn_id,
                "region": self.region,
                "wait_s": self.wait_s,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from orchestrator.connections import aws_client
        from orchestrator.datasets.notifications import completed_versions

        client: Any = None
        failures = 0
        while True:
            try:
                if client is None:
                    client = await asyncio.to_thread(aws_client, "sqs", self.aws_conn_id, self.region)
                answer = await asyncio.to_thread(
                    client.receive_message, QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=self.wait_s
                )
            except Exception as exc:  # the watcher must outlive any outage; each one is logged
                failures += 1
                delay = min(MAX_BACKOFF_S, 2.0**failures)
                self.log.warning(
                    "Cannot read the dataset queue %s (%s): no new dataset version is noticed until it answers; "
                    "check datasets.sqs_queue_url and the aws connection's sqs:ReceiveMessage. Next try in %.0f s",
                    self.queue_url,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            messages = answer.get("Messages", [])
            versions = sorted(
                {v for m in messages for v in completed_versions(m.get("Body", ""), self.datasets_uri, self.marker)}
            )
            if versions:
                self.log.info("Dataset versions completed under %s: %s", self.datasets_uri, ", ".join(versions))
                yield TriggerEvent({"versions": versions, "datasets_uri": self.datasets_uri})
            if messages:
                entries = [{"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(messages)]
                await asyncio.to_thread(client.delete_message_batch, QueueUrl=self.queue_url, Entries=entries)


class DatasetPollTrigger(BaseTrigger):
    """Looks at S3 every `every_s` until the latest complete version differs from `known_digest` (fires "new"), or
    until `deadline` (fires "unchanged"); a DatasetError (bucket missing, access denied) fires "error"."""

    def __init__(
        self,
        *,
        datasets_uri: str,
        marker: str,
        aws_conn_id: str,
        region: str,
        known_digest: str | None,
        every_s: float,
        deadline: float,
    ) -> None:
        super().__init__()
        self.datasets_uri = datasets_uri
        self.marker = marker
        self.aws_conn_id = aws_conn_id
        self.region = region
        self.known_digest = known_digest
        self.every_s = every_s
        self.deadline = deadline

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "datasets_uri": self.datasets_uri,
                "marker": self.marker,
                "aws_conn_id": self.aws_conn_id,
                "region": self.region,
                "known_digest": self.known_digest,
                "every_s": self.every_s,
                "deadline": self.deadline,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from orchestrator.connections import aws_client
        from orchestrator.datasets.s3 import scan
        from orchestrator.datasets.versions import DatasetError, latest
        from orchestrator.settings import DatasetSettings

        where = DatasetSettings(uri=self.datasets_uri, marker=self.marker)
        client = await asyncio.to_thread(aws_client, "s3", self.aws_conn_id, self.region)
        while True:
            try:
                complete, incomplete = await asyncio.to_thread(scan, client, where)
            except DatasetError as exc:
                yield TriggerEvent({"status": "error", "message": str(exc)})
                return
            newest = latest(complete)
            if newest is not None and newest.digest != self.known_digest:
                yield TriggerEvent(
                    {"status": "new", "version": newest.name, "uri": newest.uri, "digest": newest.digest}
                )
                return
            if time.time() >= self.deadline:
                yield TriggerEvent(
                    {"status": "unchanged", "version": newest.name if newest else None, "incomplete": incomplete}
                )
                return
            await asyncio.sleep(max(0.0, min(self.every_s, self.deadline - time.time())))
