"""embedded.cloud.imds: an emulated instance's metadata service is as strict as EC2's IMDSv2."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import requests

from embedded.cloud.imds import MAX_TTL_S, TOKEN_HEADER, TTL_HEADER, InstanceMetadataService


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def imds(clock: Clock) -> Iterator[InstanceMetadataService]:
    service = InstanceMetadataService("i-0123456789abcdef0", clock)
    yield service
    service.stop()


def token(imds: InstanceMetadataService, ttl: str = "60") -> str:
    response = requests.put(f"{imds.endpoint}latest/api/token", headers={TTL_HEADER: ttl}, timeout=5)
    assert response.status_code == 200, response.text
    assert response.headers[TTL_HEADER] == ttl
    return response.text


def get(imds: InstanceMetadataService, path: str, with_token: str | None) -> requests.Response:
    headers = {TOKEN_HEADER: with_token} if with_token is not None else {}
    return requests.get(f"{imds.endpoint}latest/meta-data/{path}", headers=headers, timeout=5)


def test_served_on_loopback_never_at_the_link_local_address(imds: InstanceMetadataService) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", imds.endpoint)


def test_a_token_is_required_and_expires(imds: InstanceMetadataService, clock: Clock) -> None:
    assert get(imds, "instance-id", None).status_code == 401
    assert get(imds, "instance-id", "made-up").status_code == 401
    live = token(imds, "60")
    response = get(imds, "instance-id", live)
    assert (response.status_code, response.text) == (200, "i-0123456789abcdef0")
    clock.now += 61
    assert get(imds, "instance-id", live).status_code == 401


@pytest.mark.parametrize("ttl", [None, "", "0", str(MAX_TTL_S + 1), "-5", "ten"])
def test_a_token_needs_a_ttl_of_1_to_21600_seconds(imds: InstanceMetadataService, ttl: str | None) -> None:
    headers = {TTL_HEADER: ttl} if ttl is not None else {}
    assert requests.put(f"{imds.endpoint}latest/api/token", headers=headers, timeout=5).status_code == 400


def test_a_token_is_never_issued_through_a_proxy(imds: InstanceMetadataService) -> None:
    headers = {TTL_HEADER: "60", "X-Forwarded-For": "10.0.0.1"}
    assert requests.put(f"{imds.endpoint}latest/api/token", headers=headers, timeout=5).status_code == 403
    assert token(imds, str(MAX_TTL_S))


def test_notices_are_404_until_posted_then_json(imds: InstanceMetadataService, clock: Clock) -> None:
    live = token(imds)
    for path in ("spot/instance-action", "spot/termination-time", "events/recommendations/rebalance", "nothing"):
        assert get(imds, path, live).status_code == 404, path

    imds.post_rebalance_recommendation()
    assert json.loads(get(imds, "events/recommendations/rebalance", live).text) == {
        "noticeTime": "2027-01-15T08:00:00Z"
    }
    assert get(imds, "spot/instance-action", live).status_code == 404

    imds.post_interruption_notice("terminate", clock.now + 120)
    assert json.loads(get(imds, "spot/instance-action", live).text) == {
        "action": "terminate",
        "time": "2027-01-15T08:02:00Z",
    }
    assert get(imds, "spot/termination-time", live).text == "2027-01-15T08:02:00Z"


def test_only_ec2s_interruption_actions(imds: InstanceMetadataService) -> None:
    with pytest.raises(ValueError, match="terminate, stop or hibernate"):
        imds.post_interruption_notice("reboot", 0)
