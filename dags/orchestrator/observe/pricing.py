"""The hourly price of an instance: the AWS Price List API (on-demand), DescribeSpotPriceHistory (spot), or the
fallback table config/prices.toml when AWS does not answer (no permission, throttled, or a stand-in that does not
serve the API, like the embedded default's moto). The Price always says which source it came from, and why.
The root volumes' gp3 price per GB-month always comes from that table."""

from __future__ import annotations

import json
import logging
import tomllib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import OrchestratorError, aws_error_code, aws_error_message
from orchestrator.observe.cost import Price

if TYPE_CHECKING:
    from orchestrator.config.connections import AwsClients

log = logging.getLogger(__name__)

FALLBACK_FILE = Path(__file__).resolve().parents[3] / "config" / "prices.toml"
FALLBACK_REGION = "us-east-1"
VOLUME_PRICES = "gp3_usd_per_gb_month"  # the table of the root volumes' price
# The Price List API answers in a few regions only; us-east-1's endpoint serves the prices of every region.
PRICING_API_REGION = "us-east-1"
# A price only refines the report, which waits on it after the run: one retry, then the table (saying why), rather
# than botocore's full back-off against an endpoint that keeps failing.
PRICE_LOOKUP_ATTEMPTS = 2
# One product per instance type and region once these are fixed: Linux, no SQL/pre-installed software, shared
# tenancy, a used (not reserved-capacity) on-demand instance.
_PRODUCT_FILTERS = {
    "operatingSystem": "Linux",
    "preInstalledSw": "NA",
    "tenancy": "Shared",
    "capacitystatus": "Used",
    "licenseModel": "No License required",
    "marketoption": "OnDemand",
}


class PriceNotFoundError(OrchestratorError):
    """AWS answered, but not with one clear price for this instance."""


def instance_price(
    aws: AwsClients, region: str, instance_type: str, market: str, availability_zone: str | None, launched_at: float
) -> Price:
    """The price the instance was billed at; falls back to the table, with the reason logged, on any AWS error."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        if market == "spot":
            ec2 = aws.client("ec2", region=region, total_attempts=PRICE_LOOKUP_ATTEMPTS)
            return spot_price(ec2, instance_type, availability_zone, launched_at)
        pricing = aws.client("pricing", region=PRICING_API_REGION, total_attempts=PRICE_LOOKUP_ATTEMPTS)
        return on_demand_price(pricing, instance_type, region)
    except (ClientError, BotoCoreError, PriceNotFoundError) as exc:
        api = "DescribeSpotPriceHistory" if market == "spot" else "the AWS Price List API (pricing:GetProducts)"
        code = aws_error_code(exc)
        reason = f"{api}: {code + ': ' if code else ''}{aws_error_message(exc).splitlines()[0][:200]}"
        log.warning("No price for %s (%s) from %s; using %s", instance_type, market, reason, FALLBACK_FILE.name)
        return fallback_price(instance_type, region, reason)


def on_demand_price(pricing: Any, instance_type: str, region: str) -> Price:
    """The on-demand Linux price from the Price List API (`pricing` is a client of its us-east-1 endpoint)."""
    filters = {"instanceType": instance_type, "regionCode": region, **_PRODUCT_FILTERS}
    response = pricing.get_products(
        ServiceCode="AmazonEC2",
        Filters=[{"Type": "TERM_MATCH", "Field": field, "Value": value} for field, value in filters.items()],
        MaxResults=10,
    )
    usd = on_demand_usd_per_hour(response.get("PriceList", []), f"{instance_type} in {region}")
    return Price(usd, "aws-price-list", f"Price List API, {instance_type} on-demand Linux in {region}")


def on_demand_usd_per_hour(price_list: Sequence[str | Mapping[str, Any]], what: str) -> float:
    """The one hourly USD price in GetProducts' PriceList (JSON documents); PriceNotFoundError if none or several."""
    prices: set[float] = set()
    for item in price_list:
        product = json.loads(item) if isinstance(item, str) else item
        for term in (product.get("terms", {}).get("OnDemand") or {}).values():
            for dimension in (term.get("priceDimensions") or {}).values():
                usd = dimension.get("pricePerUnit", {}).get("USD")
                if dimension.get("unit") == "Hrs" and usd is not None and float(usd) > 0:
                    prices.add(float(usd))
    if len(prices) != 1:
        raise PriceNotFoundError(
            f"{len(prices)} distinct on-demand hourly prices for {what} ({sorted(prices)}): expected exactly one"
        )
    return prices.pop()


def spot_price(ec2: Any, instance_type: str, availability_zone: str | None, launched_at: float) -> Price:
    """The spot price in effect in the instance's zone when it launched (AWS returns the price then in effect)."""
    at = datetime.fromtimestamp(launched_at, tz=UTC)
    request: dict[str, Any] = {
        "InstanceTypes": [instance_type],
        "ProductDescriptions": ["Linux/UNIX"],
        "StartTime": at,
        "EndTime": at,
    }
    if availability_zone:
        request["AvailabilityZone"] = availability_zone
    history = ec2.describe_spot_price_history(**request).get("SpotPriceHistory", [])
    # Filtered here too: a zone filter that a stand-in ignores must not price another zone.
    found = [h for h in history if not availability_zone or h.get("AvailabilityZone") == availability_zone]
    if not found:
        raise PriceNotFoundError(f"no spot price for {instance_type} in {availability_zone or 'any zone'} at {at}")
    latest = max(found, key=lambda h: h["Timestamp"])
    return Price(
        float(latest["SpotPrice"]),
        "spot-price-history",
        f"spot price in {latest.get('AvailabilityZone')} since {latest['Timestamp']}",
    )


def fallback_price(instance_type: str, region: str, reason: str, path: Path = FALLBACK_FILE) -> Price:
    """The table's price; another region's falls back to us-east-1's (logged), an unknown type to 0 (logged)."""
    table = read_price_table(path)
    regions = table["regions"]
    prices = regions.get(region)
    if prices is None or instance_type not in prices:
        if instance_type in regions.get(FALLBACK_REGION, {}):
            log.warning("%s has no %s price for %s: using %s's", path.name, region, instance_type, FALLBACK_REGION)
            prices = regions[FALLBACK_REGION]
        else:
            log.warning(
                "%s has no price for %s: the run's cost is reported as 0 USD; add the type to the table",
                path.name,
                instance_type,
            )
            return Price(0.0, "fallback-table", f"{path.name} has no price for {instance_type} ({reason})")
    return Price(float(prices[instance_type]), "fallback-table", f"{path.name}, read on {table['read_on']} ({reason})")


def gp3_usd_per_gb_month(region: str, path: Path = FALLBACK_FILE) -> float:
    """The table's gp3 price for the region; us-east-1's (logged) for a region it lacks."""
    prices = read_price_table(path)[VOLUME_PRICES]
    if region not in prices:
        log.warning("%s has no gp3 price for %s: using %s's", path.name, region, FALLBACK_REGION)
        region = FALLBACK_REGION
    return float(prices[region])


def read_price_table(path: Path = FALLBACK_FILE) -> dict[str, Any]:
    """The fallback table, checked: `read_on`, `[regions.<region>]` tables of positive USD/h prices, and a
    `[gp3_usd_per_gb_month]` table of positive prices by region, us-east-1's among them."""
    with path.open("rb") as fh:
        table = tomllib.load(fh)
    regions, volumes = table.get("regions"), table.get(VOLUME_PRICES)
    if not isinstance(table.get("read_on"), str) or not isinstance(regions, dict) or not isinstance(volumes, dict):
        raise OrchestratorError(
            f'{path}: expected read_on = "YYYY-MM", [regions.<region>] and [{VOLUME_PRICES}] tables'
        )
    if FALLBACK_REGION not in volumes:
        raise OrchestratorError(f"{path}: {VOLUME_PRICES} has no {FALLBACK_REGION} price (the fallback region's)")
    priced = [
        (f"regions.{region}.{name}", usd) for region, prices in regions.items() for name, usd in (prices or {}).items()
    ]
    for name, usd in [*priced, *((f"{VOLUME_PRICES}.{region}", usd) for region, usd in volumes.items())]:
        if isinstance(usd, bool) or not isinstance(usd, int | float) or usd <= 0:
            raise OrchestratorError(f"{path}: {name} must be a positive USD price")
    return table
