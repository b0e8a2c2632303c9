"""Triggers that notice new dataset versions: from S3 event notifications in SQS (an asset watcher), or by looking
at S3 (the poll DAG's deferred check). Each blocking boto3 call runs in a thread (`asyncio.to_thread`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TriggerEvent

from orchestrator.contracts import classpath

# Bounded back-off while the queue cannot be read (network, credentials, a deleted queue): the watcher keeps trying.
MAX_BACKOFF_S = 300.0


class DatasetQueueTrigger(BaseEventTrigger):
    """Reads S3 event notifications from SQS; fires once per batch that reports a marker under `datasets_uri`.

    Messages are deleted after the event is handed over (at least once: a triggerer that dies in between fires it
    again, and ec2_retrain starts one training per commit and data anyway). Messages about other objects are
    deleted unused; messages that are no S3 notification (malformed, oversized) are logged and deleted too. The
    Amazon provider's SqsSensorTrigger (behind common-messaging's MessageQueueTrigger) would need aiobotocore and
    fires on any message; this one filters the markers itself (docs/decisions/0092-*.md).
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
            classpath(self),
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
        from orchestrator.config.connections import aws_client

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
            versions = sorted({version for message in messages for version in self._versions_in(message)})
            if versions:
                self.log.info("Dataset versions completed under %s: %s", self.datasets_uri, ", ".join(versions))
                yield TriggerEvent({"versions": versions, "datasets_uri": self.datasets_uri})
            if messages:
                await self._delete(client, messages)

    async def _delete(self, client: Any, messages: list[dict[str, Any]]) -> None:
        """Deletes a read batch. One that cannot be deleted (an outage, a missing sqs:DeleteMessage) comes back after
        the queue's visibility timeout and fires again, which costs no training (ec2_retrain skips a trained
        version): logged, never the end of the watcher."""
        entries = [{"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(messages)]
        try:
            answer = await asyncio.to_thread(client.delete_message_batch, QueueUrl=self.queue_url, Entries=entries)
        except Exception as exc:
            failed = [f"all {len(entries)}: {exc}"]
        else:
            # SQS answers 200 with per-entry failures.
            failed = [f"{f.get('Id')}: {f.get('Code')}" for f in answer.get("Failed", [])]
        if failed:
            self.log.warning(
                "Cannot delete messages from the dataset queue %s (%s): they come back after the queue's visibility "
                "timeout and fire again; check the aws connection's sqs:DeleteMessage",
                self.queue_url,
                "; ".join(failed),
            )

    def _versions_in(self, message: dict[str, Any]) -> list[str]:
        """The versions one message reports; [] (logged) for a message that is no S3 notification, so one poison
        message can neither stop the batch's valid markers nor, redelivered, the watcher."""
        from orchestrator.datasets.notifications import UnreadableNotification, completed_versions

        try:
            return completed_versions(message.get("Body"), self.datasets_uri, self.marker)
        except UnreadableNotification as exc:
            self.log.warning(
                "Deleting the unreadable message %s from the dataset queue %s: %s. Only S3 event notifications "
                "(or their SNS envelopes) belong in this queue",
                message.get("MessageId"),
                self.queue_url,
                exc,
            )
            return []


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
            classpath(self),
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
        from orchestrator.config.connections import aws_client
        from orchestrator.config.settings import DatasetSettings
        from orchestrator.datasets.s3 import scan
        from orchestrator.datasets.versions import DatasetError, latest

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
