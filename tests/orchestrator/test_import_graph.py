"""The package tree is the architecture: no import cycle between modules, and no package imports one above it.

Every `orchestrator...` import counts, at module level or inside a function (the operators import at call time to
keep DAG parsing cheap, but the dependency is the same).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "dags" / "orchestrator"

# Lowest first; a package may import its own modules and anything in a lower layer, never a peer or a higher one.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"errors", "retries", "pathnames", "redaction", "dag_docs"}),
    # What crosses task and package boundaries; the step results raise the project's own error when malformed.
    frozenset({"contracts", "contracts_steps"}),
    frozenset({"ci"}),
    frozenset({"config"}),
    frozenset({"tracking"}),
    frozenset({"datasets"}),
    frozenset({"cloud"}),
    # The train step reads the cost cap (observe.cost_cap) off the run's prices.
    frozenset({"observe"}),
    frozenset({"instance"}),
    # The DAGs' one wiring of the launch (cloud) and the ready wait (instance).
    frozenset({"sweeps", "instance_steps"}),
    # Shims at the old classpaths of moved triggers (tasks deferred before the upgrade): nothing imports them.
    frozenset({"triggers", "ci_gate"}),
)
LAYER_OF = {part: rank for rank, layer in enumerate(LAYERS) for part in layer}


def module_name(path: Path) -> str:
    parts = ["orchestrator", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(source: str) -> set[str]:
    """The orchestrator modules `source` imports anywhere in it (`from orchestrator.ci import github` is ci.github)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("orchestrator.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "orchestrator":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return found


def graph(modules: dict[str, str]) -> dict[str, set[str]]:
    return {name: imports_of(source) - {name} for name, source in modules.items()}


def sources() -> dict[str, str]:
    return {name: path.read_text() for name, path in MODULES.items()}


def package_of(module: str) -> str:
    """The top-level part under orchestrator: `cloud` for orchestrator.cloud.tasks, `errors` for orchestrator.errors."""
    return module.split(".")[1] if "." in module else ""


def climbing_imports(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in edges.items():
        source_package = package_of(module)
        for target in sorted(targets):
            target_package = package_of(target)
            if source_package in ("", target_package) or target_package == "":
                continue
            if LAYER_OF[target_package] >= LAYER_OF[source_package]:
                wrong.append(f"{module} imports {target}: {target_package} is not below {source_package}")
    return wrong


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle found by a depth-first walk, as the modules along it (the first repeated at the end)."""
    found: list[list[str]] = []
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        if module in path:
            found.append([*path[path.index(module) :], module])
            return
        if module in done:
            return
        for target in sorted(edges.get(module, ())):
            walk(target, [*path, module])
        done.add(module)

    for module in sorted(edges):
        walk(module, [])
    return found


def test_every_package_is_in_a_layer() -> None:
    assert {package_of(module) for module in MODULES} - {""} == set(LAYER_OF)


def test_no_import_cycle() -> None:
    assert cycles(graph(sources())) == []


def test_no_import_climbs_the_layers() -> None:
    assert climbing_imports(graph(sources())) == []


@pytest.mark.parametrize(
    ("module", "planted", "check"),
    [
        ("orchestrator.tracking.runs", "from orchestrator.observe.report import Cost", climbing_imports),
        ("orchestrator.observe.gather", "from orchestrator.instance.operators import MlflowRunLink", climbing_imports),
        ("orchestrator.config.run_params", "from orchestrator.config.resolve import settings_of", cycles),
    ],
)
def test_the_checks_catch_a_planted_import(module: str, planted: str, check: object) -> None:
    """The checks themselves work: one import added by hand is reported."""
    modules = sources()
    modules[module] += f"\n\ndef planted() -> None:\n    {planted}\n"
    assert callable(check) and check(graph(modules))
