"""The IAM policies of config/iam/ (one source each, rendered into docs/iam.md) and an evaluator of them.

The evaluator decides one request as AWS's policy logic does for an identity policy alone: an explicit Deny wins,
then any Allow, else the implicit deny. It knows Action/NotAction, Resource/NotResource with `*` and `?` wildcards, and
the condition operators these policies use (string, ARN, Bool, Null; IfExists; ForAnyValue/ForAllValues on
multi-valued keys). An operator it does not know raises, so a new policy line cannot be silently mis-evaluated.

`python -m embedded.services.iam_policy` rewrites the policy blocks of docs/iam.md from the files.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[2]
POLICY_DIR = REPO / "config" / "iam"
DOC = REPO / "docs" / "iam.md"
# Each policy's block in the doc follows this marker line.
MARKER = "<!-- generated from config/iam/{name}.json by `python -m embedded.services.iam_policy`; edit that file -->"
POLICIES = ("airflow", "instance")
PLACEHOLDERS = ("REGION", "ACCOUNT", "PROJECT", "DEPLOYMENT", "BUCKET", "PREFIX", "QUEUE", "VPC-ID")

Decision = Literal["Allow", "ImplicitDeny", "ExplicitDeny"]
Context = Mapping[str, str | list[str]]


def policy_text(name: str) -> str:
    return (POLICY_DIR / f"{name}.json").read_text()


def load_policy(name: str, values: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The policy config/iam/<name>.json with its placeholders filled from `values` (all of them, or none)."""
    policy = json.loads(policy_text(name))
    if values is None:
        return dict(policy)
    missing = [p for p in PLACEHOLDERS if p not in values]
    if missing:
        raise ValueError(f"no value for the policy placeholders {missing}: pass every one of {PLACEHOLDERS}")
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, PLACEHOLDERS)) + r")(?![\w-])")

    def fill(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            return {k: fill(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v, key) for v in node]
        if isinstance(node, str) and key != "Sid":
            return pattern.sub(lambda m: values[m.group(1)], node)
        return node

    return dict(fill(policy))


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _wildcard(pattern: str, value: str, *, ignore_case: bool = False) -> bool:
    # IAM's wildcards are `*` and `?` only; fnmatch's `[...]` classes must match literally.
    translated = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(translated, value, re.S | (re.I if ignore_case else 0)) is not None


def _arn_like(pattern: str, value: str) -> bool:
    """ARN matching compares the six colon-separated parts one by one: a `*` never spans a colon before the resource."""
    p_parts, v_parts = pattern.split(":", 5), value.split(":", 5)
    if len(p_parts) != 6 or len(v_parts) != 6:
        return False
    return all(_wildcard(p, v) for p, v in zip(p_parts, v_parts, strict=True))


def _match_one(kind: str, expected: str, actual: str) -> bool:
    if kind == "StringEquals":
        return actual == expected
    if kind == "StringEqualsIgnoreCase":
        return actual.lower() == expected.lower()
    if kind == "StringLike":
        return _wildcard(expected, actual)
    if kind in ("ArnEquals", "ArnLike"):
        return _arn_like(expected, actual)
    if kind == "Bool":
        return actual.lower() == expected.lower()
    raise ValueError(
        f"the evaluator does not know the condition operator {kind!r}: add it to embedded/services/iam_policy.py"
    )


NEGATED = {
    "StringNotEquals": "StringEquals",
    "StringNotEqualsIgnoreCase": "StringEqualsIgnoreCase",
    "StringNotLike": "StringLike",
    "ArnNotEquals": "ArnEquals",
    "ArnNotLike": "ArnLike",
}


def _condition_holds(operator: str, key: str, expected: Any, context: Context) -> bool:
    qualifier, _, op = operator.rpartition(":")
    if_exists = op.endswith("IfExists")
    op = op.removesuffix("IfExists")
    wanted = [str(v).lower() if isinstance(v, bool) else str(v) for v in _as_list(expected)]
    present = key in context
    if op == "Null":
        # "Null": "true" holds when the key is absent.
        return any((w.lower() == "true") == (not present) for w in wanted)
    if not present:
        # A missing key: IfExists and the negated operators hold; ForAllValues holds vacuously.
        return if_exists or op in NEGATED or qualifier == "ForAllValues"
    actual = _as_list(context[key])
    negated = op in NEGATED
    kind = NEGATED.get(op, op)

    def matches(value: str) -> bool:
        return any(_match_one(kind, w, value) for w in wanted)

    if qualifier == "ForAllValues":
        hit = all(matches(v) for v in actual)
    elif qualifier in ("ForAnyValue", ""):
        hit = any(matches(v) for v in actual)
    else:
        raise ValueError(f"unknown condition set qualifier {qualifier!r} in {operator!r}")
    return not hit if negated else hit


def _statement_applies(statement: Mapping[str, Any], action: str, resource: str, context: Context) -> bool:
    if "Action" in statement:
        if not any(_wildcard(a, action, ignore_case=True) for a in _as_list(statement["Action"])):
            return False
    elif any(_wildcard(a, action, ignore_case=True) for a in _as_list(statement["NotAction"])):
        return False
    if "Resource" in statement:
        if not any(_wildcard(r, resource) for r in _as_list(statement["Resource"])):
            return False
    elif any(_wildcard(r, resource) for r in _as_list(statement["NotResource"])):
        return False
    return all(
        _condition_holds(operator, key, expected, context)
        for operator, tests in statement.get("Condition", {}).items()
        for key, expected in tests.items()
    )


def evaluate(policy: Mapping[str, Any], action: str, resource: str, context: Context | None = None) -> Decision:
    """AWS's decision for one action on one resource under this identity policy (no SCP, boundary or resource
    policy): an explicit Deny wins over any Allow, and nothing allowed is denied."""
    applying = [s for s in policy["Statement"] if _statement_applies(s, action, resource, context or {})]
    if any(s["Effect"] == "Deny" for s in applying):
        return "ExplicitDeny"
    return "Allow" if applying else "ImplicitDeny"


def render_doc(doc: str) -> str:
    """docs/iam.md with the JSON block after each policy's marker replaced by that policy's file."""
    for name in POLICIES:
        marker = MARKER.format(name=name)
        if marker not in doc:
            raise ValueError(f"docs/iam.md has no line {marker!r} before the {name} policy's JSON block")
        head, tail = doc.split(marker, 1)
        block = re.match(r"\n```json\n.*?```\n", tail, re.S)
        rest = tail[block.end() :] if block else tail
        doc = f"{head}{marker}\n```json\n{policy_text(name)}```\n{rest}"
    return doc


def doc_blocks(doc: str) -> dict[str, Any]:
    """The JSON of each policy block in the doc, parsed."""
    found = {}
    for name in POLICIES:
        block = re.search(re.escape(MARKER.format(name=name)) + r"\n```json\n(.*?)```", doc, re.S)
        if block:
            found[name] = json.loads(block.group(1))
    return found


if __name__ == "__main__":
    DOC.write_text(render_doc(DOC.read_text()))
    sys.exit(0)
