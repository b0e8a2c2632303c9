"""orchestrator.datasets.versions and .notifications: complete versions, identity, and S3 event bodies (pure)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from orchestrator.datasets.notifications import completed_versions
from orchestrator.datasets.versions import (
    DatasetError,
    IncompleteVersionError,
    S3Object,
    complete_versions,
    incomplete_versions,
    latest,
    version_at,
    version_name,
)

ROOT = "s3://bkt/data/"


def obj(key: str, etag: str = "e", size: int = 1, at: float = 0.0) -> S3Object:
    return S3Object(key, etag, size, at)


LISTING = [
    obj("data/v1/train_another/damage/a.jpeg", "e1", 10, 1.0),
    obj("data/v1/_SUCCESS", "m", 0, 5.0),
    obj("data/v2/data.zip", "z2", 99, 6.0),
    obj("data/v2/_SUCCESS", "m", 0, 7.0),
    obj("data/v3/train_another/damage/a.jpeg", "e3", 10, 9.0),  # uploading: no marker
    obj("data/readme.txt"),  # beside the versions: no version
    obj("database/v9/_SUCCESS"),  # another prefix that merely starts alike
]


def test_a_version_is_complete_once_its_marker_exists() -> None:
    versions = complete_versions(LISTING, ROOT, "_SUCCESS")
    assert [(v.name, v.uri) for v in versions] == [("v1", "s3://bkt/data/v1/"), ("v2", "s3://bkt/data/v2/data.zip")]
    assert incomplete_versions(LISTING, ROOT, "_SUCCESS") == ["v3"]
    assert complete_versions(LISTING, ROOT, "DONE") == []


def test_the_latest_is_the_last_completed_then_the_greatest_name() -> None:
    versions = complete_versions(LISTING, ROOT, "_SUCCESS")
    assert latest(versions).name == "v2"  # type: ignore[union-attr]
    tied = complete_versions(
        [obj("data/a/x", at=1), obj("data/a/_SUCCESS", at=3), obj("data/b/x"), obj("data/b/_SUCCESS", at=3)],
        ROOT,
        "_SUCCESS",
    )
    assert latest(tied).name == "b"  # type: ignore[union-attr]
    assert latest([]) is None


def test_identity_leaves_the_marker_and_the_version_name_out() -> None:
    v1 = complete_versions(LISTING, ROOT, "_SUCCESS")[0]
    assert [o.key for o in v1.objects] == ["train_another/damage/a.jpeg"]
    again = complete_versions(
        [obj("data/v7/train_another/damage/a.jpeg", "e1", 10, 50.0), obj("data/v7/_SUCCESS", "other", 0, 60.0)],
        ROOT,
        "_SUCCESS",
    )[0]
    assert again.digest == v1.digest  # the same data, uploaded again under another name
    changed = complete_versions(
        [obj("data/v1/train_another/damage/a.jpeg", "e9", 10), obj("data/v1/_SUCCESS")], ROOT, "_SUCCESS"
    )
    assert changed[0].digest != v1.digest
    assert v1.tags() == {
        "dataset.uri": "s3://bkt/data/v1/",
        "dataset.version": "v1",
        "dataset.digest": v1.digest,
        "dataset.objects": "1",
        "dataset.bytes": "10",
    }
    manifest = v1.manifest()
    assert manifest["objects"] == [{"key": "train_another/damage/a.jpeg", "etag": "e1", "size": 10}]
    json.dumps(manifest)


def test_a_zip_version_is_named_by_its_etag() -> None:
    v2 = complete_versions(LISTING, ROOT, "_SUCCESS")[1]
    assert v2.zip_etag == "z2" and v2.tags()["dataset.zip_etag"] == "z2"


def test_the_data_a_run_names_must_be_a_complete_version() -> None:
    assert version_name("s3://bkt/data/v1/", ROOT) == "v1"
    assert version_name("s3://bkt/data/v2/data.zip", ROOT) == "v2"
    assert version_name("s3://other/v1/", ROOT) is None
    v1 = version_at("s3://bkt/data/v1/", LISTING, datasets_uri=ROOT, marker="_SUCCESS")
    assert (v1.name, v1.completed_at, len(v1.objects)) == ("v1", 5.0, 1)
    zipped = version_at("s3://bkt/data/v2/data.zip", LISTING, datasets_uri=ROOT, marker="_SUCCESS")
    assert zipped.zip_etag == "z2"
    with pytest.raises(
        IncompleteVersionError, match=r"'v3' .* is incomplete: its marker s3://bkt/data/v3/_SUCCESS is missing. Wait"
    ):
        version_at("s3://bkt/data/v3/", LISTING, datasets_uri=ROOT, marker="_SUCCESS")
    elsewhere = version_at("s3://bkt/data/v3", LISTING, datasets_uri="", marker="_SUCCESS")
    assert elsewhere.name == "" and [o.key for o in elsewhere.objects] == ["train_another/damage/a.jpeg"]
    with pytest.raises(DatasetError, match=r"no objects at s3://bkt/nothing/"):
        version_at("s3://bkt/nothing/", LISTING, datasets_uri="", marker="_SUCCESS")


def test_listing_entries_are_read_as_s3_gives_them() -> None:
    item = {"Key": "k", "ETag": '"abc"', "Size": 3, "LastModified": datetime(2026, 1, 1, tzinfo=UTC)}
    assert S3Object.from_listing(item) == S3Object("k", "abc", 3, datetime(2026, 1, 1, tzinfo=UTC).timestamp())


def s3_event(key: str, bucket: str = "bkt", name: str = "ObjectCreated:Put") -> str:
    record = {"eventName": name, "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 0}}}
    return json.dumps({"Records": [record]})


def test_notifications_name_the_versions_whose_marker_was_written() -> None:
    assert completed_versions(s3_event("data%2Fv1%2F_SUCCESS"), ROOT, "_SUCCESS") == ["v1"]
    assert completed_versions(s3_event("data/my+version/_SUCCESS"), ROOT, "_SUCCESS") == ["my version"]
    # SNS in between (S3 -> SNS -> SQS)
    envelope = json.dumps({"Type": "Notification", "Message": s3_event("data/v2/_SUCCESS")})
    assert completed_versions(envelope, ROOT, "_SUCCESS") == ["v2"]


@pytest.mark.parametrize(
    "body",
    [
        s3_event("data/v1/train_another/damage/a.jpeg"),  # not the marker
        s3_event("data/v1/_SUCCESS", bucket="other"),
        s3_event("database/v1/_SUCCESS"),
        s3_event("data/_SUCCESS"),  # a marker beside the versions
        s3_event("data/v1/_SUCCESS", name="ObjectRemoved:Delete"),
        json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "bkt"}),
        "not json",
        "[1, 2]",
    ],
)
def test_other_messages_name_no_version(body: str) -> None:
    assert completed_versions(body, ROOT, "_SUCCESS") == []
