"""embedded.services.iam_policy: the evaluator decides as AWS's identity-policy logic does, and docs/iam.md shows
the files."""

from __future__ import annotations

import json
from typing import Any

import pytest

from embedded.services.iam_policy import DOC, POLICIES, doc_blocks, evaluate, load_policy, policy_text, render_doc

VALUES = {
    "REGION": "eu-west-1",
    "ACCOUNT": "123456789012",
    "PROJECT": "ec2-trainer",
    "DEPLOYMENT": "prod",
    "BUCKET": "data",
    "PREFIX": "hurricane-damage",
    "QUEUE": "dataset-events",
    "VPC-ID": "vpc-0abc",
}


def policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def test_doc_shows_each_policy_file_exactly() -> None:
    doc = DOC.read_text()
    assert doc_blocks(doc) == {name: json.loads(policy_text(name)) for name in POLICIES}
    assert render_doc(doc) == doc, "docs/iam.md is stale: run `python -m embedded.services.iam_policy`"
    # The check can fail: a doc whose JSON lost a statement differs from the file.
    stale = doc.replace('"sqs:DeleteMessage"', '"sqs:DeleteMessageBatch"', 1)
    assert doc_blocks(stale)["airflow"] != json.loads(policy_text("airflow"))


def test_placeholders_are_filled_everywhere_but_in_sids() -> None:
    filled = load_policy("airflow", VALUES)
    text = str(filled)
    for placeholder in ("REGION", "ACCOUNT", "PROJECT", "DEPLOYMENT", "BUCKET", "QUEUE", "VPC-ID"):
        assert placeholder not in text, placeholder
    assert "arn:aws:ec2:eu-west-1:123456789012:vpc/vpc-0abc" in text
    assert any(s["Sid"] == "ListTheDatasetPrefix" for s in filled["Statement"])
    with pytest.raises(ValueError, match="no value for the policy placeholders"):
        load_policy("airflow", {"REGION": "eu-west-1"})


def test_default_deny_and_explicit_deny_wins() -> None:
    allow = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
    deny = {"Effect": "Deny", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::data/secret/*"}
    p = policy(allow, deny)
    assert evaluate(p, "s3:GetObject", "arn:aws:s3:::data/public/a") == "Allow"
    assert evaluate(p, "s3:GetObject", "arn:aws:s3:::data/secret/a") == "ExplicitDeny"
    assert evaluate(p, "sqs:ReceiveMessage", "arn:aws:sqs:eu-west-1:1:q") == "ImplicitDeny"
    # Action names compare case-insensitively; resources do not.
    assert evaluate(p, "S3:getobject", "arn:aws:s3:::data/public/a") == "Allow"
    assert evaluate(policy(deny), "s3:GetObject", "arn:aws:s3:::data/SECRET/a") == "ImplicitDeny"


def test_not_action_not_resource_and_wildcards() -> None:
    p = policy({"Effect": "Allow", "NotAction": "iam:*", "NotResource": "arn:aws:s3:::data/?ey"})
    assert evaluate(p, "ec2:RunInstances", "arn:aws:ec2:eu-west-1:1:instance/*") == "Allow"
    assert evaluate(p, "iam:PassRole", "arn:aws:iam::1:role/r") == "ImplicitDeny"
    assert evaluate(p, "s3:GetObject", "arn:aws:s3:::data/key") == "ImplicitDeny"
    assert evaluate(p, "s3:GetObject", "arn:aws:s3:::data/kkey") == "Allow"
    # `[` is literal in IAM, not a character class.
    q = policy({"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::data/[ab]"})
    assert evaluate(q, "s3:GetObject", "arn:aws:s3:::data/a") == "ImplicitDeny"
    assert evaluate(q, "s3:GetObject", "arn:aws:s3:::data/[ab]") == "Allow"


def run_rule(condition: dict[str, Any]) -> dict[str, Any]:
    return policy({"Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "*", "Condition": condition})


def decide(condition: dict[str, Any], context: dict[str, Any]) -> str:
    return evaluate(run_rule(condition), "ec2:RunInstances", "arn:aws:ec2:r:1:instance/*", context)


def test_string_arn_and_bool_operators() -> None:
    tokens = {"StringEquals": {"ec2:MetadataHttpTokens": "required"}}
    assert decide(tokens, {"ec2:MetadataHttpTokens": "required"}) == "Allow"
    assert decide({"StringEquals": {"ec2:MetadataHttpTokens": "required"}}, {"ec2:MetadataHttpTokens": "optional"}) == (
        "ImplicitDeny"
    )
    like = {"StringLike": {"ec2:InstanceType": ["g6.*", "g5.*"]}}
    assert decide(like, {"ec2:InstanceType": "g5.xlarge"}) == "Allow"
    assert decide(like, {"ec2:InstanceType": "p5.48xlarge"}) == "ImplicitDeny"
    assert decide({"Bool": {"ec2:Encrypted": "true"}}, {"ec2:Encrypted": "True"}) == "Allow"
    assert decide({"Bool": {"ec2:Encrypted": True}}, {"ec2:Encrypted": "false"}) == "ImplicitDeny"
    vpc = {"ArnEquals": {"ec2:Vpc": "arn:aws:ec2:r:1:vpc/vpc-1"}}
    assert decide(vpc, {"ec2:Vpc": "arn:aws:ec2:r:1:vpc/vpc-1"}) == "Allow"
    assert decide(vpc, {"ec2:Vpc": "arn:aws:ec2:r:1:vpc/vpc-2"}) == "ImplicitDeny"
    # ArnLike matches part by part: a `*` in the service part does not swallow the rest.
    arn_like = {"ArnLike": {"ec2:InstanceProfile": "arn:aws:*:r:1:instance-profile/p"}}
    assert decide(arn_like, {"ec2:InstanceProfile": "arn:aws:iam:r:1:instance-profile/p"}) == "Allow"
    assert decide(arn_like, {"ec2:InstanceProfile": "arn:aws:iam:x:r:1:instance-profile/p"}) == "ImplicitDeny"
    assert decide({"StringNotEquals": {"aws:RequestTag/a": "b"}}, {"aws:RequestTag/a": "c"}) == "Allow"
    # All operators and all keys must hold.
    both = {"StringEquals": {"aws:RequestTag/a": "1", "aws:RequestTag/b": "2"}}
    assert decide(both, {"aws:RequestTag/a": "1", "aws:RequestTag/b": "2"}) == "Allow"
    assert decide(both, {"aws:RequestTag/a": "1"}) == "ImplicitDeny"


def test_missing_keys_if_exists_and_null() -> None:
    profile = "arn:aws:iam::1:instance-profile/p"
    if_exists = {"ArnEqualsIfExists": {"ec2:InstanceProfile": profile}}
    assert decide(if_exists, {}) == "Allow"
    assert decide(if_exists, {"ec2:InstanceProfile": profile}) == "Allow"
    assert decide(if_exists, {"ec2:InstanceProfile": "arn:aws:iam::1:instance-profile/admin"}) == "ImplicitDeny"
    assert decide({"ArnEquals": {"ec2:InstanceProfile": profile}}, {}) == "ImplicitDeny"
    assert decide({"StringNotEquals": {"aws:RequestTag/a": "b"}}, {}) == "Allow"
    assert decide({"Null": {"aws:RequestTag/a": "true"}}, {}) == "Allow"
    assert decide({"Null": {"aws:RequestTag/a": "false"}}, {}) == "ImplicitDeny"


def test_multi_valued_keys() -> None:
    keys = ["ec2-trainer:project", "Name"]
    assert decide({"ForAnyValue:StringEquals": {"aws:TagKeys": ["Name"]}}, {"aws:TagKeys": keys}) == "Allow"
    assert decide({"ForAllValues:StringEquals": {"aws:TagKeys": ["Name"]}}, {"aws:TagKeys": keys}) == "ImplicitDeny"
    assert decide({"ForAllValues:StringLike": {"aws:TagKeys": ["*"]}}, {"aws:TagKeys": keys}) == "Allow"
    assert decide({"ForAllValues:StringEquals": {"aws:TagKeys": ["Name"]}}, {}) == "Allow"
    # A single-valued operator on a list holds when any value matches (a tag given on two tag specifications).
    assert decide({"StringEquals": {"aws:RequestTag/a": "1"}}, {"aws:RequestTag/a": ["2", "1"]}) == "Allow"


def test_unknown_operator_is_an_error_not_a_decision() -> None:
    with pytest.raises(ValueError, match="does not know the condition operator 'NumericLessThan'"):
        decide({"NumericLessThan": {"ec2:VolumeSize": "200"}}, {"ec2:VolumeSize": "100"})
