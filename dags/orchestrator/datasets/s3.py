"""Reading dataset versions from S3 (a boto3 client from connections.aws_client); the rules are in versions.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.datasets.versions import (
    DatasetError,
    DatasetVersion,
    S3Object,
    complete_versions,
    incomplete_versions,
    split_s3_uri,
    version_at,
    version_name,
)
from orchestrator.errors import AWS_DENIED_CODES, aws_error_code, aws_error_message

if TYPE_CHECKING:
    from orchestrator.config.settings import DatasetSettings

# Answers no retry changes: the bucket or the permission is wrong.
_TERMINAL_CODES = AWS_DENIED_CODES | {"NoSuchBucket", "AllAccessDisabled", "InvalidBucketName"}


def list_objects(s3: Any, uri: str) -> list[S3Object]:
    """Every object whose key starts with the URI's prefix (all pages)."""
    bucket, prefix = split_s3_uri(uri)
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [S3Object.from_listing(item) for page in pages for item in page.get("Contents", [])]
    except Exception as exc:
        if aws_error_code(exc) in _TERMINAL_CODES:
            raise DatasetError(
                f"cannot list s3://{bucket}/{prefix} ({aws_error_code(exc)}: {aws_error_message(exc)}): check the "
                "bucket name and that the aws connection may s3:ListBucket on it"
            ) from None
        raise


def scan(s3: Any, datasets: DatasetSettings) -> tuple[list[DatasetVersion], list[str]]:
    """The complete versions under datasets.uri, and the names of those still without their marker."""
    listed = list_objects(s3, datasets.uri)
    return (
        complete_versions(listed, datasets.uri, datasets.marker),
        incomplete_versions(listed, datasets.uri, datasets.marker),
    )


def identify(s3: Any, data_uri: str, datasets: DatasetSettings) -> DatasetVersion:
    """The data at `data_uri` as it is now; a version under datasets.uri must be complete (IncompleteVersionError)."""
    name = version_name(data_uri, datasets.uri)
    listed_uri = f"{datasets.uri}{name}/" if name is not None else data_uri
    return version_at(data_uri, list_objects(s3, listed_uri), datasets_uri=datasets.uri, marker=datasets.marker)
