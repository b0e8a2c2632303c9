"""orchestrator.datasets.versions and .notifications: complete versions, identity, and S3 event bodies (pure)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from orchestrator.datasets.notifications import MAX_BODY_BYTES, UnreadableNotification, completed_versions
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
        json.dumps({"Records": []}),
        s3_event("data/../_SUCCESS"),  # a folder name the job refuses is no version
        s3_event("data/./_SUCCESS"),
        s3_event("data//_SUCCESS"),
    ],
)
def test_other_messages_name_no_version(body: str) -> None:
    assert completed_versions(body, ROOT, "_SUCCESS") == []


def _record(**s3: object) -> str:
    return json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": s3}]})


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("not json", r"^body is not JSON \(JSONDecodeError: "),
        ("[" * 100_000 + "]" * 100_000, r"^body is not JSON \(RecursionError: "),
        ('{"Records": [' * 10_000 + "]}" * 10_000, r"^body is not JSON \(RecursionError: "),
        (" " * MAX_BODY_BYTES + "{}", rf"^body is {MAX_BODY_BYTES + 2} bytes, over the {MAX_BODY_BYTES}"),
        (None, r"^body is a NoneType, not JSON text$"),
        ("[1, 2]", r"^the body is a JSON list, not an object$"),
        ('"text"', r"^the body is a JSON str, not an object$"),
        ("{}", r"^body\.Records is missing, not a list$"),
        ('{"Records": {"a": 1}}', r"^body\.Records is a dict, not a list$"),
        ('{"Records": ["x"]}', r"^Records\[0\] is a str, not an object$"),
        ('{"Records": [{"s3": {}}]}', r"^Records\[0\]\.eventName is missing, not a str$"),
        ('{"Records": [{"eventName": 7}]}', r"^Records\[0\]\.eventName is a int, not a str$"),
        (json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": []}]}), r"^Records\[0\]\.s3 is a list,"),
        (_record(bucket=[], object={"key": "k"}), r"^Records\[0\]\.s3\.bucket is a list, not a dict$"),
        (_record(bucket={"name": 1}, object={"key": "k"}), r"^Records\[0\]\.s3\.bucket\.name is a int, not a str$"),
        (_record(bucket={"name": "bkt"}), r"^Records\[0\]\.s3\.object is missing, not a dict$"),
        (_record(bucket={"name": "bkt"}, object={"key": None}), r"^Records\[0\]\.s3\.object\.key is missing,"),
        (_record(bucket={"name": "bkt"}, object={"key": ["k"]}), r"^Records\[0\]\.s3\.object\.key is a list,"),
        (json.dumps({"Type": "Notification", "Message": {"Records": []}}), r"^the SNS envelope's Message is a dict"),
        (json.dumps({"Type": "Notification", "Message": "{"}), r"^the SNS envelope's Message is not JSON"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_malformed_messages_are_unreadable_whatever_their_shape(body: object, reason: str) -> None:
    with pytest.raises(UnreadableNotification, match=reason):
        completed_versions(body, ROOT, "_SUCCESS")


def test_a_marker_beside_a_malformed_record_fails_the_whole_message() -> None:
    good = {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "bkt"}, "object": {"key": "data/v1/_SUCCESS"}}}
    with pytest.raises(UnreadableNotification, match=r"^Records\[1\]\.s3 is a list"):
        completed_versions(json.dumps({"Records": [good, {"eventName": "x", "s3": []}]}), ROOT, "_SUCCESS")


def test_folders_the_job_would_refuse_are_no_versions() -> None:
    listing = [obj("data/../_SUCCESS"), obj("data/../x.jpeg"), obj("data/./_SUCCESS"), obj("data//_SUCCESS")]
    assert complete_versions([*LISTING, *listing], ROOT, "_SUCCESS") == complete_versions(LISTING, ROOT, "_SUCCESS")
    assert incomplete_versions([*LISTING, obj("data/../x.jpeg")], ROOT, "_SUCCESS") == ["v3"]


def test_data_the_job_would_refuse_is_refused_before_launch() -> None:
    with pytest.raises(DatasetError, match=r"^dataset version '\.\.' \(s3://bkt/data/\.\./\) is not a folder name"):
        version_at(
            "s3://bkt/data/../", [obj("data/../_SUCCESS"), obj("data/../a")], datasets_uri=ROOT, marker="_SUCCESS"
        )
    hostile = [*LISTING, obj("data/v1/train_another//b.jpeg"), obj("data/v1/x/../y.jpeg")]
    with pytest.raises(
        DatasetError,
        match=r"^s3://bkt/data/v1/train_another//b\.jpeg has the unsafe path segment '' \(empty, .*which the training",
    ):
        version_at("s3://bkt/data/v1/", hostile, datasets_uri=ROOT, marker="_SUCCESS")
    with pytest.raises(DatasetError, match=r"^s3://bkt/data/v1/x/\.\./y\.jpeg has the unsafe path segment '\.\.'"):
        version_at("s3://bkt/data/v1/", [*LISTING, obj("data/v1/x/../y.jpeg")], datasets_uri="", marker="_SUCCESS")
