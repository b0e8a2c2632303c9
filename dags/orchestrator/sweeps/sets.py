"""A sweep's hyperparameter sets: validated, expanded from a grid, bounded. Pure.

Each set is a mapping of some of the training job's knobs (orchestrator/run_params.py, the ones passed to the job as
`-P`) to a value, checked with that knob's own schema: a set accepts exactly what one ec2_training run accepts.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.config.run_params import BY_NAME, JOB_PARAMS, schema_violation
from orchestrator.errors import ConfigError

# The knobs a set may vary: the training job's hyperparameters and data. Instance types, spot and the lifetime are
# how a run is hosted, not what it learns: they stay the deployment's for every set.
SWEEP_KEYS: tuple[str, ...] = JOB_PARAMS
# One set is a plain ec2_training run. Sixteen bounds what a typo in a grid can cost (each set is a GPU instance
# and a DAG run); more sets than aws.max_instances simply wait for a slot.
MIN_SETS = 2
MAX_SETS = 16

EXAMPLE_SETS = '[{"learning_rate": 0.001}, {"learning_rate": 0.0003, "batch_size": 256}]'
EXAMPLE_GRID = '{"learning_rate": [0.0003, 0.001, 0.003], "model": ["default", "seed"]}'


def expand_sets(sets: Any, grid: Any) -> tuple[dict[str, Any], ...]:
    """The sets to train, from either an explicit list (`sets`) or a `grid` (each key's values, all combinations).

    Raises ConfigError naming the set, key and value at fault and what would be right.
    """
    if sets and grid:
        raise ConfigError("sweep: give either sets (a list) or grid (a table of lists), not both: clear one of them")
    if sets:
        if not isinstance(sets, list):
            raise ConfigError(f"sweep: sets must be a list of sets, e.g. {EXAMPLE_SETS}; got {_short(sets)}")
        _check_count(len(sets), "sets")
        expanded = tuple(_checked_set(item, n) for n, item in enumerate(sets, start=1))
    elif grid:
        expanded = _expand_grid(grid)
    else:
        raise ConfigError(
            f"sweep: nothing to train: give sets, e.g. {EXAMPLE_SETS}, or grid, e.g. {EXAMPLE_GRID}; "
            f"the keys are {', '.join(SWEEP_KEYS)}"
        )
    refuse_duplicates(expanded)
    return expanded


def refuse_duplicates(sets: Sequence[Mapping[str, Any]]) -> None:
    """Two sets that train the same values would cost twice for one result: refuse, naming both (1-based)."""
    for later, values in enumerate(sets):
        for earlier in range(later):
            if dict(sets[earlier]) == dict(values):
                raise ConfigError(
                    f"sweep: sets {earlier + 1} and {later + 1} train the same values ({describe(values)}): "
                    "remove one of them"
                )


def describe(values: Mapping[str, Any]) -> str:
    """`learning_rate=0.001, epochs=3`, in the knobs' order; an empty set trains the configured values."""
    parts = [f"{key}={values[key]}" for key in SWEEP_KEYS if key in values]
    return ", ".join(parts) if parts else "the configured values"


def _check_count(count: int, what: str) -> None:
    if not MIN_SETS <= count <= MAX_SETS:
        advice = "for one set trigger ec2_training itself" if count < MIN_SETS else "split it into several sweeps"
        raise ConfigError(f"sweep: {what} gives {count} sets; expected {MIN_SETS} to {MAX_SETS}: {advice}")


def _checked_key(key: Any, where: str) -> str:
    if key not in SWEEP_KEYS:
        close = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"sweep: {where}: unknown key {key!r}; {hint}a set may vary {', '.join(SWEEP_KEYS)}")
    return str(key)


def _checked_value(key: str, value: Any, where: str) -> Any:
    param = BY_NAME[key]
    if value is None or schema_violation(value, param.schema):
        raise ConfigError(f"sweep: {where}: {key} = {_short(value)} is invalid; expected {param.range_text}")
    return value


def _checked_set(item: Any, number: int) -> dict[str, Any]:
    where = f"set {number}"
    if not isinstance(item, Mapping):
        raise ConfigError(f'sweep: {where} must be a table of knob values, e.g. {{"epochs": 3}}; got {_short(item)}')
    return {_checked_key(key, where): _checked_value(str(key), value, where) for key, value in item.items()}


def _expand_grid(grid: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(grid, Mapping):
        raise ConfigError(f"sweep: grid must be a table of value lists, e.g. {EXAMPLE_GRID}; got {_short(grid)}")
    axes: dict[str, list[Any]] = {}
    for key, values in grid.items():
        name = _checked_key(key, "grid")
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"sweep: grid: {name} must be a non-empty list of values, e.g. [1, 3]; got {_short(values)}"
            )
        axes[name] = values
    # Counted before the values are checked or expanded: a million-value grid is refused at once, not after a
    # million schema checks (docs/benchmarks.md).
    _check_count(math.prod(len(values) for values in axes.values()), "grid")
    for name, values in axes.items():
        for n, value in enumerate(values):
            _checked_value(name, value, f"grid {name}[{n}]")
    names = [key for key in SWEEP_KEYS if key in axes]
    return tuple(dict(zip(names, combo, strict=True)) for combo in itertools.product(*(axes[k] for k in names)))


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
