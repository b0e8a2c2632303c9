"""The DAGs' user-facing docs (Airflow's *Docs* panel): dags/docs/<dag_id>.md, read when the DAG file is parsed.

The markdown says what the DAG does and where its results land; its `<!-- parameters -->` line becomes the list of
the DAG's Params, each with its title and description from the Param itself, so the doc never drifts from the
trigger form. Standard library only: reading one small file is all a parse pays.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[1] / "docs"
PARAMETERS = "<!-- parameters -->"


def dag_doc(dag_id: str, params: Mapping[str, Any] | None = None) -> str:
    """dags/docs/<dag_id>.md with `params` (name -> airflow Param) listed in place of its parameters line."""
    listed = "\n".join(
        f"- **{p.schema.get('title', name)}** (`{name}`): {p.description}" for name, p in (params or {}).items()
    )
    return (DOCS / f"{dag_id}.md").read_text().replace(PARAMETERS, listed)
