"""The vCPU quota preflight (orchestrator.cloud.quotas): its arithmetic, then against a strict in-process AWS whose
Service Quotas answers the G and VT quotas a test sets (embedded.cloud.service_quotas)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from embedded.cloud.service_quotas import quota_values
from orchestrator.cloud.quotas import (
    QUOTA_GROUPS,
    Quota,
    QuotaState,
    check_quotas,
    quota_error,
    quota_group,
    shortfall,
    vcpus_in_use,
)
from orchestrator.errors import ConfigError
from tests.support.aws_cloud import REGION, StrictAws, strict_aws

ON_DEMAND = Quota("L-DB2E81BA", "Running On-Demand G and VT instances")
SPOT = Quota("L-3819A6DF", "All G and VT Spot Instance Requests")
VCPUS = {"g6.xlarge": 4, "g6.2xlarge": 8, "g5.xlarge": 4, "m5.large": 2}


def test_the_g_and_vt_families_share_one_quota_per_market_and_others_have_none() -> None:
    for instance_type in ("g6.xlarge", "g4dn.xlarge", "g5g.xlarge", "gr6.4xlarge", "vt1.3xlarge"):
        group = quota_group(instance_type)
        assert group is not None and group.quotas == {"on-demand": ON_DEMAND, "spot": SPOT}, instance_type
    for instance_type in ("p4d.24xlarge", "m5.large", "inf2.xlarge", "trn1.2xlarge"):
        assert quota_group(instance_type) is None, instance_type
    assert [g.name for g in QUOTA_GROUPS] == ["G and VT"]


def test_the_vcpus_in_use_are_summed_per_quota_and_market() -> None:
    running = [("g6.xlarge", "on-demand"), ("g6.2xlarge", "on-demand"), ("g5.xlarge", "spot"), ("m5.large", "spot")]
    assert vcpus_in_use(running, VCPUS) == {ON_DEMAND.code: 12, SPOT.code: 4}
    assert vcpus_in_use([], VCPUS) == {}


def test_an_option_fits_up_to_the_quota_and_misses_what_goes_past_it() -> None:
    states = {ON_DEMAND.code: QuotaState(ON_DEMAND, 8.0, 4)}
    assert shortfall("g6.xlarge", "on-demand", VCPUS, states) is None  # 4 + 4 = 8: exactly the quota
    short = shortfall("g6.2xlarge", "on-demand", VCPUS, states)
    assert short is not None and (short.needed, short.missing) == (8, 4)
    assert str(short) == "g6.2xlarge (on-demand) needs 8 (4 missing)"
    # No quota read for spot (not asked, or not readable), none for another family: nothing is known to be short.
    assert shortfall("g6.2xlarge", "spot", VCPUS, states) is None
    assert shortfall("m5.large", "on-demand", VCPUS, states) is None


def test_the_error_names_each_quota_its_value_use_what_is_missing_and_the_increase() -> None:
    od, spot = QuotaState(ON_DEMAND, 6.0, 4), QuotaState(SPOT, 0.0, 0)
    shorts = [
        shortfall(t, m, VCPUS, {ON_DEMAND.code: od, SPOT.code: spot})
        for m in ("spot", "on-demand")
        for t in ("g6.2xlarge", "g6.xlarge")
    ]
    message = str(quota_error([s for s in shorts if s], REGION, ["spot", "on-demand"]))
    assert message.startswith(f"aws.instance_types: no launch option fits the account's EC2 vCPU quotas in {REGION}")
    assert (
        "L-3819A6DF (All G and VT Spot Instance Requests) = 0 vCPUs, 0 in use: g6.2xlarge (spot) needs 8 (8 missing), "
        "g6.xlarge (spot) needs 4 (4 missing); L-DB2E81BA (Running On-Demand G and VT instances) = 6 vCPUs, 4 in use: "
        "g6.2xlarge (on-demand) needs 8 (6 missing), g6.xlarge (on-demand) needs 4 (2 missing)"
    ) in message
    # The increase that fits the preferred (first) type of each market.
    assert (
        "aws service-quotas request-service-quota-increase --service-code ec2 --quota-code L-DB2E81BA "
        f"--desired-value 12 --region {REGION}"
    ) in message
    assert "--quota-code L-3819A6DF --desired-value 8" in message
    assert f"https://{REGION}.console.aws.amazon.com/servicequotas/home/services/ec2/quotas/L-DB2E81BA" in message
    assert message.endswith("or choose smaller instance types")
    assert "aws.spot_fallback_to_on_demand" not in message
    spot_only = str(quota_error([s for s in shorts[:2] if s], REGION, ["spot"]))
    assert "let spot fall back to on-demand (aws.spot_fallback_to_on_demand)" in spot_only


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Any:
    with strict_aws(monkeypatch) as aws:
        yield aws


def service_quotas() -> Any:
    import boto3

    return boto3.client("service-quotas", region_name=REGION)


def start(cloud: StrictAws, instance_type: str, market: str = "on-demand") -> str:
    options = {"InstanceMarketOptions": {"MarketType": "spot"}} if market == "spot" else {}
    image_id = next(iter(cloud.images.values()))
    found = cloud.ec2.run_instances(ImageId=image_id, InstanceType=instance_type, MinCount=1, MaxCount=1, **options)
    return str(found["Instances"][0]["InstanceId"])


def test_a_quota_too_small_for_every_option_fails_naming_it(cloud: StrictAws) -> None:
    with quota_values({ON_DEMAND.code: 2.0}), pytest.raises(ConfigError) as raised:
        check_quotas(cloud.ec2, service_quotas(), ("g6.xlarge", "g5.xlarge"), ["on-demand"], REGION)
    message = str(raised.value)
    assert (
        "L-DB2E81BA (Running On-Demand G and VT instances) = 2 vCPUs, 0 in use: g6.xlarge (on-demand) needs 4 "
        "(2 missing), g5.xlarge (on-demand) needs 4 (2 missing)"
    ) in message
    assert "--quota-code L-DB2E81BA --desired-value 4" in message


def test_the_accounts_running_instances_count_by_market_and_family(cloud: StrictAws) -> None:
    """Pending and running instances of the G and VT families take their vCPUs from their market's quota; other
    families and ended instances take none."""
    start(cloud, "g6.xlarge")
    start(cloud, "g5.xlarge", "spot")
    start(cloud, "m5.large")
    cloud.ec2.terminate_instances(InstanceIds=[start(cloud, "g6.2xlarge")])
    with quota_values({ON_DEMAND.code: 8.0, SPOT.code: 8.0}):
        summary = check_quotas(cloud.ec2, service_quotas(), ("g6.xlarge",), ["spot", "on-demand"], REGION)
        assert summary == (
            f"the vCPU quotas in {REGION}: L-3819A6DF (All G and VT Spot Instance Requests) = 8 vCPUs, 4 in use; "
            "L-DB2E81BA (Running On-Demand G and VT instances) = 8 vCPUs, 4 in use; vCPUs per instance: g6.xlarge 4"
        )
        with pytest.raises(ConfigError, match=r"L-DB2E81BA .* = 8 vCPUs, 4 in use: g6.2xlarge \(on-demand\) needs 8"):
            check_quotas(cloud.ec2, service_quotas(), ("g6.2xlarge",), ["on-demand"], REGION)


def test_enough_quota_passes_quietly(cloud: StrictAws, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="orchestrator.cloud.quotas"):
        summary = check_quotas(cloud.ec2, service_quotas(), ("g6.xlarge", "g5.xlarge"), ["on-demand"], REGION)
    assert "L-DB2E81BA (Running On-Demand G and VT instances) = 64 vCPUs, 0 in use" in summary
    assert "no room" not in summary
    assert caplog.records == [], caplog.text


def test_a_first_type_too_big_warns_and_the_launch_goes_on_with_the_next(
    cloud: StrictAws, caplog: pytest.LogCaptureFixture
) -> None:
    with quota_values({ON_DEMAND.code: 4.0}), caplog.at_level(logging.WARNING, logger="orchestrator.cloud.quotas"):
        summary = check_quotas(cloud.ec2, service_quotas(), ("g6.2xlarge", "g6.xlarge"), ["on-demand"], REGION)
    assert summary.endswith("; no room for g6.2xlarge (on-demand)")
    (warning,) = caplog.records
    assert warning.levelno == logging.WARNING
    assert warning.getMessage().startswith(
        "vCPU quotas leave no room for g6.2xlarge (on-demand) needs 8 (4 missing) under L-DB2E81BA "
        "(Running On-Demand G and VT instances) = 4 vCPUs, 0 in use; the launch goes on"
    )


def test_spot_exhausted_passes_when_on_demand_may_follow_and_fails_when_not(
    cloud: StrictAws, caplog: pytest.LogCaptureFixture
) -> None:
    with quota_values({SPOT.code: 0.0}):
        with caplog.at_level(logging.WARNING, logger="orchestrator.cloud.quotas"):
            check_quotas(cloud.ec2, service_quotas(), ("g6.xlarge",), ["spot", "on-demand"], REGION)
        assert "no room for g6.xlarge (spot) needs 4 (4 missing) under L-3819A6DF" in caplog.text
        with pytest.raises(ConfigError, match=r"L-3819A6DF .* = 0 vCPUs.*aws.spot_fallback_to_on_demand"):
            check_quotas(cloud.ec2, service_quotas(), ("g6.xlarge",), ["spot"], REGION)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("AccessDeniedException", "User is not authorized to perform servicequotas:GetServiceQuota"),
        ("NoSuchResourceException", "The request failed because the specified quota does not exist."),
    ],
)
def test_a_quota_that_cannot_be_read_is_skipped_with_a_warning(
    cloud: StrictAws, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, code: str, message: str
) -> None:
    from moto.core.exceptions import JsonRESTError
    from moto.servicequotas.models import ServiceQuotasBackend

    def refuse(backend: Any, service_code: str, quota_code: str) -> Any:
        raise JsonRESTError(code, message)

    monkeypatch.setattr(ServiceQuotasBackend, "get_service_quota", refuse)
    with quota_values({ON_DEMAND.code: 0.0}), caplog.at_level(logging.WARNING, logger="orchestrator.cloud.quotas"):
        summary = check_quotas(cloud.ec2, service_quotas(), ("g6.xlarge",), ["on-demand"], REGION)
    assert "none readable" in summary
    (warning,) = caplog.records
    assert warning.getMessage().startswith(
        f"vCPU quota L-DB2E81BA (Running On-Demand G and VT instances) not checked: Service Quotas answered {code}: "
        f"{message}. Airflow's role reads it with servicequotas:GetServiceQuota (statement ReadGpuInstanceQuotas"
    )


def test_another_error_of_service_quotas_is_raised(cloud: StrictAws, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a denial or an unknown quota is skipped: anything else fails as any other AWS error of the step."""
    from botocore.exceptions import ClientError
    from moto.core.exceptions import JsonRESTError
    from moto.servicequotas.models import ServiceQuotasBackend

    def fail(backend: Any, service_code: str, quota_code: str) -> Any:
        raise JsonRESTError("IllegalArgumentException", "injected")

    monkeypatch.setattr(ServiceQuotasBackend, "get_service_quota", fail)
    with pytest.raises(ClientError, match="IllegalArgumentException"):
        check_quotas(cloud.ec2, service_quotas(), ("g6.xlarge",), ["on-demand"], REGION)


def test_types_of_no_quota_group_are_not_checked(cloud: StrictAws, caplog: pytest.LogCaptureFixture) -> None:
    with quota_values({ON_DEMAND.code: 0.0}), caplog.at_level(logging.INFO, logger="orchestrator.cloud.quotas"):
        summary = check_quotas(cloud.ec2, service_quotas(), ("m5.large",), ["on-demand"], REGION)
    assert summary == "no vCPU quota (none applies to ['m5.large'])"
    assert "No vCPU quota check applies to ['m5.large']: only the G and VT families' quotas are checked" in caplog.text
    # A G type beside it whose quota is too small: the other type may still launch, so the run goes on.
    with quota_values({ON_DEMAND.code: 0.0}):
        check_quotas(cloud.ec2, service_quotas(), ("g6.xlarge", "m5.large"), ["on-demand"], REGION)
