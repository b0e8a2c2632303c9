"""S3 event notifications, as SQS delivers them: which dataset versions just got their marker. Pure functions.

Read: S3's own notification body (`{"Records": [...]}`, keys URL-encoded as S3 sends them), the same wrapped in an
SNS envelope (S3 -> SNS -> SQS), and S3's `s3:TestEvent` (sent when the notification is configured: ignored).
Anything else in the queue is an UnreadableNotification: every level is type-checked, so no body, however built,
raises anything else (the watcher logs and deletes it, and goes on with the rest of its batch).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote_plus

from orchestrator.datasets.versions import split_s3_uri, version_folder
from orchestrator.errors import OrchestratorError

# An S3 notification is a few KiB; SQS's classic maximum bounds what is parsed at all.
MAX_BODY_BYTES = 256 * 1024


class UnreadableNotification(OrchestratorError):
    """A queue message that is not an S3 event notification (or its SNS envelope); the message says why."""


def completed_versions(body: object, datasets_uri: str, marker: str) -> list[str]:
    """The version folders under `datasets_uri` whose marker object a message reports created; [] for other
    objects, buckets, events and S3's test event. Raises UnreadableNotification for anything else."""
    bucket, prefix = split_s3_uri(datasets_uri)
    found = []
    for n, record in enumerate(_records(body)):
        where = f"Records[{n}]"
        event = _field(record, "eventName", str, where)
        s3 = _field(record, "s3", dict, where)
        name = _field(_field(s3, "bucket", dict, f"{where}.s3"), "name", str, f"{where}.s3.bucket")
        key = unquote_plus(_field(_field(s3, "object", dict, f"{where}.s3"), "key", str, f"{where}.s3.object"))
        folder = version_folder(key, prefix)
        if event.startswith("ObjectCreated:") and name == bucket and folder is not None and folder[1] == marker:
            found.append(folder[0])
    return sorted(set(found))


def _records(body: object) -> list[dict[str, Any]]:
    data = _json(body, "body")
    if isinstance(data, dict) and data.get("Type") == "Notification":  # an SNS envelope
        data = _json(data.get("Message"), "the SNS envelope's Message")
    if not isinstance(data, dict):
        raise UnreadableNotification(f"the body is a JSON {type(data).__name__}, not an object")
    if "Records" not in data and data.get("Event") == "s3:TestEvent":
        return []
    records = _field(data, "Records", list, "body")
    bad = next((n for n, record in enumerate(records) if not isinstance(record, dict)), None)
    if bad is not None:
        raise UnreadableNotification(f"Records[{bad}] is a {type(records[bad]).__name__}, not an object")
    return records


def _json(text: object, what: str) -> Any:
    if not isinstance(text, str):
        raise UnreadableNotification(f"{what} is a {type(text).__name__}, not JSON text")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BODY_BYTES:
        raise UnreadableNotification(f"{what} is {size} bytes, over the {MAX_BODY_BYTES} an S3 notification fits in")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested deeper than the parser's stack
        raise UnreadableNotification(f"{what} is not JSON ({type(exc).__name__}: {str(exc)[:100]})") from None


def _field(parent: dict[str, Any], name: str, kind: type, where: str) -> Any:
    value = parent.get(name)
    if not isinstance(value, kind):
        raise UnreadableNotification(
            f"{where}.{name} is {'missing' if value is None else 'a ' + type(value).__name__}, not a {kind.__name__}"
        )
    return value
