"""embedded.cloud.service_quotas: GetServiceQuota for EC2's G and VT quotas, through the gate, in Service Quotas'
own shapes and errors, with values a test sets."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from embedded.cloud import ACCOUNT_ID
from embedded.cloud.service_quotas import quota_values
from embedded.deploy.stack import EmbeddedStack


def test_the_g_and_vt_quotas_in_service_quotas_shape(stack: EmbeddedStack) -> None:
    quotas = stack.cloud.client("service-quotas", stack.cloud.airflow)
    quota = quotas.get_service_quota(ServiceCode="ec2", QuotaCode="L-DB2E81BA")["Quota"]
    assert quota["QuotaArn"] == f"arn:aws:servicequotas:{stack.cloud.region}:{ACCOUNT_ID}:ec2/L-DB2E81BA"
    assert {k: quota[k] for k in ("ServiceCode", "QuotaCode", "QuotaName", "Unit", "Adjustable", "GlobalQuota")} == {
        "ServiceCode": "ec2",
        "QuotaCode": "L-DB2E81BA",
        "QuotaName": "Running On-Demand G and VT instances",
        "Unit": "None",
        "Adjustable": True,
        "GlobalQuota": False,
    }
    assert isinstance(quota["Value"], float) and quota["Value"] > 0
    spot = quotas.get_service_quota(ServiceCode="ec2", QuotaCode="L-3819A6DF")["Quota"]
    assert spot["QuotaName"] == "All G and VT Spot Instance Requests"
    assert spot["UsageMetric"]["MetricDimensions"]["Class"] == "G/Spot"


def test_a_test_sets_the_values_and_they_come_back(stack: EmbeddedStack) -> None:
    quotas = stack.cloud.client("service-quotas", stack.cloud.airflow)
    before = quotas.get_service_quota(ServiceCode="ec2", QuotaCode="L-3819A6DF")["Quota"]["Value"]
    with quota_values({"L-3819A6DF": 0.0, "L-DB2E81BA": 8.0}):
        assert quotas.get_service_quota(ServiceCode="ec2", QuotaCode="L-3819A6DF")["Quota"]["Value"] == 0.0
        assert quotas.get_service_quota(ServiceCode="ec2", QuotaCode="L-DB2E81BA")["Quota"]["Value"] == 8.0
    assert quotas.get_service_quota(ServiceCode="ec2", QuotaCode="L-3819A6DF")["Quota"]["Value"] == before
    with pytest.raises(ValueError, match="no emulated ec2 quota"), quota_values({"L-1216C47A": 5.0}):
        pass


def test_an_unknown_quota_is_no_such_resource(stack: EmbeddedStack) -> None:
    quotas = stack.cloud.client("service-quotas")  # the admin: what the service answers, not what the gate does
    with pytest.raises(ClientError) as raised:
        quotas.get_service_quota(ServiceCode="ec2", QuotaCode="L-00000000")
    assert raised.value.response["Error"]["Code"] == "NoSuchResourceException"


def test_the_policy_reads_only_the_g_and_vt_quotas(stack: EmbeddedStack) -> None:
    quotas = stack.cloud.client("service-quotas", stack.cloud.airflow)
    with pytest.raises(ClientError) as raised:
        quotas.get_service_quota(ServiceCode="ec2", QuotaCode="L-1216C47A")  # standard instances: not ours
    assert raised.value.response["Error"]["Code"] == "AccessDeniedException"
    with pytest.raises(ClientError) as raised:
        stack.cloud.client("service-quotas", stack.cloud.instance_role).get_service_quota(
            ServiceCode="ec2", QuotaCode="L-DB2E81BA"
        )
    assert raised.value.response["Error"]["Code"] == "AccessDeniedException"
