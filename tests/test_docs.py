"""The docs a newcomer reads: a README short enough for ten minutes, and no relative link that leads nowhere.

Links are checked as GitHub renders them: a target relative to the linking file, and an `#anchor` into a Markdown
file must be one of its headings' slugs. Links inside code (fenced blocks, inline spans) are text, not links.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200

DOCS = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def prose(path: Path) -> str:
    """The file's text without code, where `[a](b)` is not a link."""
    return CODE_SPAN.sub("", FENCE.sub("", path.read_text()))


def anchors(path: Path) -> set[str]:
    """GitHub's heading slugs: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    slugs: set[str] = set()
    repeats: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        repeat = repeats.get(slug, 0)
        repeats[slug] = repeat + 1
        slugs.add(f"{slug}-{repeat}" if repeat else slug)
    return slugs


def relative_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(prose(path)) if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]


def test_readme_reads_in_ten_minutes() -> None:
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}: move detail to docs/"


@pytest.mark.parametrize("doc", DOCS, ids=[str(doc.relative_to(REPO)) for doc in DOCS])
def test_every_relative_link_resolves(doc: Path) -> None:
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, f"{doc.relative_to(REPO)} links to nothing: {broken}"


def test_every_decision_record_is_indexed() -> None:
    decisions = REPO / "docs" / "decisions"
    indexed = set(relative_links(decisions / "README.md"))
    records = {record.name for record in decisions.glob("[0-9][0-9][0-9][0-9]-*.md")}
    assert records, "docs/decisions/ holds no NNNN-title.md record"
    assert records <= indexed, f"records missing from docs/decisions/README.md: {sorted(records - indexed)}"
