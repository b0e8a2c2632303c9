"""S3 event notifications, as SQS delivers them: which dataset versions just got their marker. Pure functions.

Read: S3's own notification body (`{"Records": [...]}`, keys URL-encoded as S3 sends them), the same wrapped in an
SNS envelope (S3 -> SNS -> SQS), and S3's `s3:TestEvent` (sent when the notification is configured: ignored).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote_plus

from orchestrator.datasets.versions import split_s3_uri


def completed_versions(body: str, datasets_uri: str, marker: str) -> list[str]:
    """The version folders under `datasets_uri` whose marker object a message reports created; [] for anything
    else (another key, another bucket, a test event, a body that is not an S3 notification)."""
    bucket, prefix = split_s3_uri(datasets_uri)
    found = []
    for record in _records(body):
        if not str(record.get("eventName", "")).startswith("ObjectCreated:"):
            continue
        s3 = record.get("s3") or {}
        if (s3.get("bucket") or {}).get("name") != bucket:
            continue
        key = unquote_plus(str((s3.get("object") or {}).get("key", "")))
        name, sep, rest = key[len(prefix) :].partition("/")
        if key.startswith(prefix) and sep and name and rest == marker:
            found.append(name)
    return sorted(set(found))


def _records(body: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(body)
        if isinstance(data, dict) and data.get("Type") == "Notification" and isinstance(data.get("Message"), str):
            data = json.loads(data["Message"])  # an SNS envelope
    except ValueError:
        return []
    records = data.get("Records") if isinstance(data, dict) else None
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []
