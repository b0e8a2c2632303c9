"""Service Quotas' GetServiceQuota for EC2's G and VT instance quotas, which moto 5.2 lacks (it serves a few of VPC's
quotas, and answers any ec2 code NoSuchResourceException): moto's backend is patched to answer them from QUOTA_VALUES,
which a test changes with `quota_values`; every other call is moto's own.

The answer has the shapes of the Service Quotas API reference (GetServiceQuota, ServiceQuota): the applied quota's
ARN with the account, the value in vCPUs as a number, Unit "None", the usage metric EC2 reports it with. An unknown
service code or quota code is NoSuchResourceException, as Service Quotas answers it. The JSON 1.1 protocol
(`X-Amz-Target: ServiceQuotasV20190624.GetServiceQuota`) and the routing are moto's; the IAM gate authorizes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

# Quota code -> (name, the usage metric's Class dimension).
EC2_QUOTAS = {
    "L-DB2E81BA": ("Running On-Demand G and VT instances", "G/OnDemand"),
    "L-3819A6DF": ("All G and VT Spot Instance Requests", "G/Spot"),
}
# vCPUs, as applied to this account: enough for the embedded default's instances (a g6.xlarge has 4).
DEFAULT_VALUES = {"L-DB2E81BA": 64.0, "L-3819A6DF": 64.0}
QUOTA_VALUES: dict[str, float] = dict(DEFAULT_VALUES)


@contextlib.contextmanager
def quota_values(values: Mapping[str, float]) -> Iterator[None]:
    """Meanwhile the account's G and VT quotas are `values` (quota code -> vCPUs), as after an increase or a cut."""
    unknown = set(values) - set(EC2_QUOTAS)
    if unknown:
        raise ValueError(f"no emulated ec2 quota {sorted(unknown)}: the emulated ones are {sorted(EC2_QUOTAS)}")
    previous = dict(QUOTA_VALUES)
    QUOTA_VALUES.update(values)
    try:
        yield
    finally:
        QUOTA_VALUES.clear()
        QUOTA_VALUES.update(previous)


def ec2_quota(region: str, account: str, code: str) -> dict[str, Any]:
    name, usage_class = EC2_QUOTAS[code]
    return {
        "ServiceCode": "ec2",
        "ServiceName": "Amazon Elastic Compute Cloud (Amazon EC2)",
        "QuotaArn": f"arn:aws:servicequotas:{region}:{account}:ec2/{code}",
        "QuotaCode": code,
        "QuotaName": name,
        "Value": QUOTA_VALUES[code],
        "Unit": "None",
        "Adjustable": True,
        "GlobalQuota": False,
        "UsageMetric": {
            "MetricNamespace": "AWS/Usage",
            "MetricName": "ResourceCount",
            "MetricDimensions": {"Class": usage_class, "Resource": "vCPU", "Service": "EC2", "Type": "Resource"},
            "MetricStatisticRecommendation": "Maximum",
        },
        "QuotaAppliedAtLevel": "ACCOUNT",
    }


def install_service_quotas() -> Callable[[], None]:
    """Patches moto's Service Quotas backend to answer the ec2 codes of EC2_QUOTAS; returns the undo."""
    from moto.core.exceptions import JsonRESTError
    from moto.servicequotas.models import ServiceQuotasBackend

    original = ServiceQuotasBackend.get_service_quota

    def get_service_quota(backend: Any, service_code: str, quota_code: str) -> dict[str, Any]:
        if service_code != "ec2":
            return original(backend, service_code, quota_code)
        if quota_code not in EC2_QUOTAS:
            raise JsonRESTError(
                "NoSuchResourceException", "The request failed because the specified quota does not exist."
            )
        return ec2_quota(backend.region_name, backend.account_id, quota_code)

    ServiceQuotasBackend.get_service_quota = get_service_quota  # type: ignore[method-assign,assignment]

    def uninstall() -> None:
        ServiceQuotasBackend.get_service_quota = original  # type: ignore[method-assign]

    return uninstall
