"""The account's EC2 vCPU quotas against a run's launch options, checked by plan_launch before anything is launched.

EC2 limits running instances by vCPUs per group of instance families, per market (Service Quotas, service code ec2):
a launch past the quota fails only at RunInstances (VcpuLimitExceeded, MaxSpotInstanceCountExceeded), option after
option. Here the quotas (GetServiceQuota), the vCPUs each type needs (DescribeInstanceTypes, VCpuInfo.DefaultVCpus)
and the vCPUs the account already runs (DescribeInstances, pending and running) are read instead, and plan_launch
fails when no launch option could fit. A quota that cannot be read is not checked: the launch is not blocked by it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.contracts_steps import Market
from orchestrator.errors import ConfigError, aws_error_code, aws_error_message

log = logging.getLogger(__name__)

# What Service Quotas answers when Airflow's role may not read a quota, or when it knows no such quota here: the
# check is then skipped, not the launch.
UNREADABLE_QUOTA_CODES = frozenset({"AccessDeniedException", "NoSuchResourceException"})
# The instance states whose vCPUs count against a quota.
COUNTED_STATES = ("pending", "running")


@dataclass(frozen=True)
class Quota:
    code: str
    name: str

    def __str__(self) -> str:
        return f"{self.code} ({self.name})"

    def console_url(self, region: str) -> str:
        return f"https://{region}.console.aws.amazon.com/servicequotas/home/services/ec2/quotas/{self.code}"

    def increase_command(self, region: str, desired_vcpus: int) -> str:
        return (
            f"aws service-quotas request-service-quota-increase --service-code ec2 --quota-code {self.code} "
            f"--desired-value {desired_vcpus} --region {region}"
        )


@dataclass(frozen=True)
class QuotaGroup:
    """Instance families whose instances' vCPUs count against one quota per market."""

    name: str
    prefixes: tuple[str, ...]  # the instance type names' beginnings: g6.xlarge, g4dn.xlarge, gr6.4xlarge, vt1.3xlarge
    quotas: Mapping[Market, Quota]


# The groups checked; other families (P, Inf, standard...) are launched unchecked. Airflow's policy may read only
# these quotas (config/iam/airflow.json, ReadGpuInstanceQuotas): a group added here needs its codes there too.
QUOTA_GROUPS: tuple[QuotaGroup, ...] = (
    QuotaGroup(
        "G and VT",
        ("g", "vt"),
        {
            "on-demand": Quota("L-DB2E81BA", "Running On-Demand G and VT instances"),
            "spot": Quota("L-3819A6DF", "All G and VT Spot Instance Requests"),
        },
    ),
)


def quota_group(instance_type: str) -> QuotaGroup | None:
    return next((g for g in QUOTA_GROUPS if instance_type.startswith(g.prefixes)), None)


def quota_of(instance_type: str, market: Market) -> Quota | None:
    group = quota_group(instance_type)
    return group.quotas[market] if group else None


@dataclass(frozen=True)
class QuotaState:
    quota: Quota
    value: float  # vCPUs, as applied to the account
    in_use: int  # vCPUs of the account's pending and running instances that count against it

    def __str__(self) -> str:
        return f"{self.quota} = {_vcpus(self.value)} vCPUs, {self.in_use} in use"


@dataclass(frozen=True)
class Shortfall:
    """A launch option (a type in a market) that its quota has no room for."""

    instance_type: str
    market: Market
    needed: int  # the type's vCPUs
    state: QuotaState

    @property
    def missing(self) -> int:
        return math.ceil(self.state.in_use + self.needed - self.state.value)

    def __str__(self) -> str:
        return f"{self.instance_type} ({self.market}) needs {self.needed} ({self.missing} missing)"


def _vcpus(value: float) -> str:
    return f"{value:g}"


def vcpus_in_use(instances: Iterable[tuple[str, Market]], vcpus: Mapping[str, int]) -> dict[str, int]:
    """The vCPUs counted against each quota (by code) of instances given as (type, market); other families count
    against no quota checked here."""
    in_use: dict[str, int] = {}
    for instance_type, market in instances:
        quota = quota_of(instance_type, market)
        if quota is not None:
            in_use[quota.code] = in_use.get(quota.code, 0) + vcpus[instance_type]
    return in_use


def shortfall(
    instance_type: str, market: Market, vcpus: Mapping[str, int], states: Mapping[str, QuotaState]
) -> Shortfall | None:
    """Why this option cannot launch within its quota; None when it fits, or when no quota is known for it (another
    family, or a quota that could not be read)."""
    quota = quota_of(instance_type, market)
    state = states.get(quota.code) if quota else None
    if state is None or state.in_use + vcpus[instance_type] <= state.value:
        return None
    return Shortfall(instance_type, market, vcpus[instance_type], state)


def quota_error(shortfalls: Sequence[Shortfall], region: str, markets: Sequence[Market]) -> ConfigError:
    """Every option is short: each quota with its value, use and what each option misses, and how to raise it to
    fit the preferred option (the first of its market)."""
    by_quota: dict[str, list[Shortfall]] = {}
    for short in shortfalls:
        by_quota.setdefault(short.state.quota.code, []).append(short)
    found = "; ".join(f"{shorts[0].state}: {', '.join(str(s) for s in shorts)}" for shorts in by_quota.values())
    increases = "; ".join(
        f"{shorts[0].state.quota.console_url(region)} or "
        f"`{shorts[0].state.quota.increase_command(region, shorts[0].state.in_use + shorts[0].needed)}`"
        for shorts in by_quota.values()
    )
    fallback = (
        " or let spot fall back to on-demand (aws.spot_fallback_to_on_demand)," if list(markets) == ["spot"] else ""
    )
    return ConfigError(
        f"aws.instance_types: no launch option fits the account's EC2 vCPU quotas in {region}, so every launch "
        f"would be refused: {found}. To fix: request an increase in Service Quotas ({increases}),{fallback} or "
        "choose smaller instance types"
    )


def default_vcpus(ec2: Any, instance_types: Iterable[str]) -> dict[str, int]:
    """Each type's vCPUs as the quotas count them (DescribeInstanceTypes' VCpuInfo.DefaultVCpus)."""
    pages = ec2.get_paginator("describe_instance_types").paginate(InstanceTypes=sorted(set(instance_types)))
    return {
        t["InstanceType"]: int(t["VCpuInfo"]["DefaultVCpus"]) for page in pages for t in page.get("InstanceTypes", [])
    }


def quota_value(service_quotas: Any, quota: Quota) -> float | None:
    """The quota's value for this account in vCPUs; None, with a warning, when Service Quotas will not say."""
    from botocore.exceptions import ClientError

    try:
        return float(service_quotas.get_service_quota(ServiceCode="ec2", QuotaCode=quota.code)["Quota"]["Value"])
    except ClientError as exc:
        if aws_error_code(exc) not in UNREADABLE_QUOTA_CODES:
            raise
        log.warning(
            "vCPU quota %s not checked: Service Quotas answered %s: %s. Airflow's role reads it with "
            "servicequotas:GetServiceQuota (statement ReadGpuInstanceQuotas, docs/iam.md); launching without the check",
            quota,
            aws_error_code(exc),
            aws_error_message(exc),
        )
        return None


def check_quotas(
    ec2: Any, service_quotas: Any, instance_types: Sequence[str], markets: Sequence[Market], region: str
) -> str:
    """Fail (ConfigError) when no launch option (each type in each market, in launch order) fits within its vCPU
    quota beside what the account already runs; warn about the options that do not fit when another may. Returns
    what was checked, for the step's log.

    The spot quota counts spot requests; pending and running spot instances stand for them (a one-time request
    that RunInstances makes ends with its instance)."""
    from orchestrator.cloud.ec2_describe import describe_matching, market_of

    unchecked = [t for t in instance_types if quota_group(t) is None]
    if unchecked:
        log.info(
            "No vCPU quota check applies to %s: only the %s families' quotas are checked",
            unchecked,
            ", ".join(g.name for g in QUOTA_GROUPS),
        )
    checked = [t for t in instance_types if t not in unchecked]
    if not checked:
        return f"no vCPU quota (none applies to {list(instance_types)})"
    running = [
        (i["InstanceType"], market_of(i))
        for i in describe_matching(ec2, [{"Name": "instance-state-name", "Values": list(COUNTED_STATES)}])
        if quota_group(i["InstanceType"]) is not None
    ]
    vcpus = default_vcpus(ec2, [*checked, *(t for t, _ in running)])
    in_use = vcpus_in_use(running, vcpus)
    quotas = {q.code: q for m in markets for t in checked if (q := quota_of(t, m)) is not None}
    states = {
        code: QuotaState(quota, value, in_use.get(code, 0))
        for code, quota in quotas.items()
        if (value := quota_value(service_quotas, quota)) is not None
    }
    options = [(t, m) for m in markets for t in instance_types]
    shorts = [s for t, m in options if (s := shortfall(t, m, vcpus, states)) is not None]
    if len(shorts) == len(options):
        raise quota_error(shorts, region, markets)
    if shorts:
        log.warning(
            "vCPU quotas leave no room for %s; the launch goes on with the options that may fit",
            "; ".join(f"{s} under {s.state}" for s in shorts),
        )
    return (
        f"the vCPU quotas in {region}: {'; '.join(str(s) for s in states.values()) or 'none readable'}; "
        f"vCPUs per instance: {', '.join(f'{t} {vcpus[t]}' for t in checked)}"
        + (f"; no room for {', '.join(f'{s.instance_type} ({s.market})' for s in shorts)}" if shorts else "")
    )
