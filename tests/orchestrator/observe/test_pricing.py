"""orchestrator.observe.pricing: the Price List API answer parsed as AWS shapes it, spot prices and the fallback
table, against the embedded stack's moto server (which serves DescribeSpotPriceHistory but no Price List API)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from unittest.mock import Mock

import pytest

from embedded.deploy.stack import EmbeddedStack
from orchestrator.config.connections import AwsClients
from orchestrator.observe.pricing import (
    FALLBACK_FILE,
    PRICE_LOOKUP_ATTEMPTS,
    PriceNotFoundError,
    fallback_price,
    gp3_usd_per_gb_month,
    instance_price,
    on_demand_price,
    on_demand_usd_per_hour,
    read_price_table,
    spot_price,
)


def _product(usd: str, sku: str = "ABC") -> str:
    """One PriceList entry as GetProducts returns it: a JSON document per product, terms keyed by SKU.offer."""
    return json.dumps(
        {
            "product": {"sku": sku, "attributes": {"instanceType": "g6.xlarge", "regionCode": "us-east-1"}},
            "terms": {
                "OnDemand": {
                    f"{sku}.JRTCKXETXF": {
                        "priceDimensions": {
                            f"{sku}.JRTCKXETXF.6YS6EN2CT7": {
                                "unit": "Hrs",
                                "pricePerUnit": {"USD": usd},
                                "description": "$0.8048 per On Demand Linux g6.xlarge Instance Hour",
                            }
                        }
                    }
                }
            },
        }
    )


def test_on_demand_price_list_parsing() -> None:
    assert on_demand_usd_per_hour([_product("0.8048000000")], "g6.xlarge") == 0.8048
    # The same price twice (two products of one type) is one price; two prices or none are refused.
    assert on_demand_usd_per_hour([_product("0.8048"), _product("0.8048", "DEF")], "x") == 0.8048
    with pytest.raises(PriceNotFoundError, match=r"2 distinct on-demand hourly prices for x"):
        on_demand_usd_per_hour([_product("0.8048"), _product("0.9", "DEF")], "x")
    with pytest.raises(PriceNotFoundError, match=r"0 distinct"):
        on_demand_usd_per_hour([_product("0.0000000000")], "x")  # e.g. a reserved-capacity line


def test_on_demand_price_asks_for_one_linux_product(stack: EmbeddedStack) -> None:
    pricing = stack.cloud.client("pricing", stack.cloud.airflow)
    asked: list[dict[str, Any]] = []

    def ask(params: dict[str, Any], **kwargs: Any) -> None:
        asked.append(dict(params))

    def answer(**kwargs: Any) -> Any:
        return Mock(status_code=200), {"PriceList": [_product("0.8048")], "FormatVersion": "aws_v1"}

    # Answered at the client boundary: moto serves no Price List API (checked in the next test).
    events = (("before-parameter-build.pricing.GetProducts", ask), ("before-call.pricing.GetProducts", answer))
    for event, handler in events:
        pricing.meta.events.register(event, handler)
    try:
        price = on_demand_price(pricing, "g6.xlarge", "eu-west-1")
    finally:
        for event, handler in events:
            pricing.meta.events.unregister(event, handler)
    assert (price.usd_per_hour, price.source) == (0.8048, "aws-price-list")
    filters = {f["Field"]: f["Value"] for f in asked[0]["Filters"]}
    assert filters == {
        "instanceType": "g6.xlarge",
        "regionCode": "eu-west-1",
        "operatingSystem": "Linux",
        "preInstalledSw": "NA",
        "tenancy": "Shared",
        "capacitystatus": "Used",
        "licenseModel": "No License required",
        "marketoption": "OnDemand",
    }


def test_moto_serves_no_price_list_so_the_table_prices_the_embedded_default(
    env: EmbeddedStack,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    made = AwsClients.client
    sent: list[str] = []

    def counting(self: AwsClients, service: str, **kwargs: Any) -> Any:
        client = made(self, service, **kwargs)
        client.meta.events.register("before-send.pricing.GetProducts", lambda **kw: sent.append("GetProducts"))
        return client

    monkeypatch.setattr(AwsClients, "client", counting)
    aws = AwsClients("aws_default", env.cloud.region)
    price = instance_price(aws, env.cloud.region, "g6.xlarge", "on-demand", None, time.time())
    assert (price.usd_per_hour, price.source) == (0.8048, "fallback-table")
    assert "the AWS Price List API (pricing:GetProducts)" in price.detail
    assert "No price for g6.xlarge (on-demand)" in caplog.text
    # An endpoint that keeps failing gets one retry, not botocore's whole back-off, before the table answers.
    assert sent == ["GetProducts"] * PRICE_LOOKUP_ATTEMPTS
    # Quietly: moto, in this process as in the demo's, printed a hint for its developers at each attempt.
    assert "Unable to find appropriate backend" not in capsys.readouterr().out


def test_access_denied_falls_back_with_the_reason(
    env: EmbeddedStack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    made = AwsClients.client

    denied = {"Code": "AccessDeniedException", "Message": "not authorized to perform pricing:GetProducts"}

    def denying(self: AwsClients, service: str, **kwargs: Any) -> Any:
        client = made(self, service, **kwargs)
        client.meta.events.register(
            "before-call.pricing.GetProducts", lambda **kwargs: (Mock(status_code=400), {"Error": denied})
        )
        return client

    monkeypatch.setattr(AwsClients, "client", denying)
    price = instance_price(
        AwsClients("aws_default", "us-east-1"), "us-east-1", "g5.xlarge", "on-demand", None, time.time()
    )
    assert (price.usd_per_hour, price.source) == (1.006, "fallback-table")
    assert "AccessDeniedException: not authorized to perform pricing:GetProducts" in price.detail


def test_spot_price_of_the_instance_zone_from_the_moto_server(env: EmbeddedStack) -> None:
    # moto answers every zone (ignoring the zone filter) with a fixed price; only the instance's zone counts.
    price = spot_price(env.cloud.client("ec2", env.cloud.airflow), "g6.xlarge", f"{env.cloud.region}b", time.time())
    assert price.source == "spot-price-history"
    assert price.usd_per_hour == pytest.approx(0.00001)
    assert f"{env.cloud.region}b" in price.detail
    with pytest.raises(PriceNotFoundError, match=r"no spot price for g6.xlarge in mars-1a"):
        spot_price(env.cloud.client("ec2", env.cloud.airflow), "g6.xlarge", "mars-1a", time.time())
    # Through instance_price: a spot price that cannot be found falls back to the on-demand table.
    aws = AwsClients("aws_default", env.cloud.region)
    fallback = instance_price(aws, env.cloud.region, "g6.xlarge", "spot", "mars-1a", time.time())
    assert (fallback.source, fallback.usd_per_hour) == ("fallback-table", 0.8048)


def test_the_reports_lookups_read_the_connection_once(env: EmbeddedStack, capsys: pytest.CaptureFixture[str]) -> None:
    """The report's cost takes an EC2 client and a price per instance, all from its one AwsClients: the provider's
    "credentials retrieved" line, said once per hook, showed twice in the report's log with a hook per client."""
    capsys.readouterr()
    aws = AwsClients("aws_default", env.cloud.region)
    aws.client("ec2")
    instance_price(aws, env.cloud.region, "g6.xlarge", "spot", f"{env.cloud.region}b", time.time())
    instance_price(aws, env.cloud.region, "g6.xlarge", "on-demand", None, time.time())
    # Airflow's own loggers (structlog) write to stdout outside a task.
    out = capsys.readouterr().out
    assert out.count("credentials retrieved from login and password") == 1, out


def test_fallback_table(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    table = read_price_table()
    assert table["read_on"] and table["regions"]["us-east-1"]["g6.xlarge"] == 0.8048
    # Another region: us-east-1's price, said to be approximate; an unknown type: 0, said too.
    assert fallback_price("g6.xlarge", "eu-west-1", "why").usd_per_hour == 0.8048
    assert "has no eu-west-1 price for g6.xlarge" in caplog.text
    unknown = fallback_price("x9.huge", "us-east-1", "why")
    assert (unknown.usd_per_hour, unknown.source) == (0.0, "fallback-table")
    assert f"{FALLBACK_FILE.name} has no price for x9.huge" in caplog.text
    bad = tmp_path / "prices.toml"
    bad.write_text(
        'read_on = "2025-06"\n[regions.us-east-1]\n"g6.xlarge" = -1\n[gp3_usd_per_gb_month]\n"us-east-1" = 0.08\n'
    )
    with pytest.raises(Exception, match=r"regions.us-east-1.g6.xlarge must be a positive USD price"):
        read_price_table(bad)


def test_root_volume_price_from_the_table(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert gp3_usd_per_gb_month("us-east-1") == 0.08
    assert gp3_usd_per_gb_month("eu-west-1") == 0.08
    assert "has no gp3 price for eu-west-1: using us-east-1's" in caplog.text
    bad = tmp_path / "prices.toml"
    bad.write_text('read_on = "2025-06"\n[regions.us-east-1]\n"g6.xlarge" = 1\n')
    with pytest.raises(Exception, match=r"\[gp3_usd_per_gb_month\] tables"):
        read_price_table(bad)
    bad.write_text('read_on = "2025-06"\n[regions.us-east-1]\n[gp3_usd_per_gb_month]\n"eu-west-1" = 0.08\n')
    with pytest.raises(Exception, match="gp3_usd_per_gb_month has no us-east-1 price"):
        read_price_table(bad)
    bad.write_text('read_on = "2025-06"\n[regions.us-east-1]\n[gp3_usd_per_gb_month]\n"us-east-1" = 0\n')
    with pytest.raises(Exception, match=r"gp3_usd_per_gb_month.us-east-1 must be a positive USD price"):
        read_price_table(bad)
