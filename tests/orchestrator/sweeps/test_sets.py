"""A sweep's sets: each value checked with the training form's own schema, grids expanded, counts bounded."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.errors import ConfigError
from orchestrator.sweeps.sets import MAX_SETS, SWEEP_KEYS, describe, expand_sets, refuse_duplicates


def test_a_list_of_sets_is_kept_in_order() -> None:
    sets = [{"learning_rate": 0.001}, {"learning_rate": 0.0003, "batch_size": 256}, {}]
    assert expand_sets(sets, None) == tuple(sets)


def test_a_grid_trains_every_combination_in_the_knobs_order() -> None:
    expanded = expand_sets(None, {"model": ["default", "seed"], "learning_rate": [0.001, 0.003]})
    assert expanded == (
        {"model": "default", "learning_rate": 0.001},
        {"model": "default", "learning_rate": 0.003},
        {"model": "seed", "learning_rate": 0.001},
        {"model": "seed", "learning_rate": 0.003},
    )


def test_the_sweepable_knobs_are_the_jobs() -> None:
    assert set(SWEEP_KEYS) == {"data_uri", "model", "epochs", "batch_size", "learning_rate"}


@pytest.mark.parametrize(
    ("sets", "grid", "match"),
    [
        (None, None, r"nothing to train: give sets, e\.g\. .*, or grid"),
        ([], {}, r"nothing to train"),
        ([{}, {"epochs": 2}], {"epochs": [1, 2]}, r"not both: clear one of them"),
        ({"epochs": 2}, None, r"sets must be a list of sets"),
        ([{"epochs": 2}], None, r"sets gives 1 sets; expected 2 to 16: for one set trigger ec2_training itself"),
        ([{"epochs": n} for n in range(1, 18)], None, r"17 sets; expected 2 to 16: split it into several sweeps"),
        ([{"epochs": 1}, 3], None, r"set 2 must be a table of knob values"),
        ([{"epoch": 1}, {}], None, r"set 1: unknown key 'epoch'; did you mean 'epochs'\? a set may vary"),
        ([{"instance_types": ["g6.xlarge"]}, {}], None, r"unknown key 'instance_types'"),
        ([{"epochs": 0}, {}], None, r"set 1: epochs = 0 is invalid; expected a whole number from 1 to 10000"),
        ([{}, {"learning_rate": 2}], None, r"set 2: learning_rate = 2 is invalid; expected a number above 0"),
        ([{}, {"learning_rate": None}], None, r"learning_rate = null is invalid"),
        ([{}, {"epochs": True}], None, r"epochs = true is invalid"),
        ([{}, {"model": "resnet"}], None, r"model = \"resnet\" is invalid; expected one of default, seed"),
        ([{}, {"data_uri": "ftp://x/y"}], None, r"data_uri = \"ftp://x/y\" is invalid; expected one of the schemes"),
        ([{"epochs": 2}, {"epochs": 2}], None, r"sets 1 and 2 train the same values \(epochs=2\): remove one"),
        (None, [1, 2], r"grid must be a table of value lists"),
        (None, {"epochs": 3}, r"grid: epochs must be a non-empty list of values"),
        (None, {"epochs": []}, r"grid: epochs must be a non-empty list"),
        (None, {"epochs": [1, 0]}, r"grid epochs\[1\]: epochs = 0 is invalid"),
        (None, {"lr": [0.1, 0.2]}, r"grid: unknown key 'lr'"),
        (None, {"epochs": [1, 2, 3, 4, 5], "batch_size": [8, 16, 32, 64]}, r"grid gives 20 sets; expected 2 to 16"),
        (None, {"epochs": [1]}, r"grid gives 1 sets"),
        (None, {"epochs": [2, 2]}, r"sets 1 and 2 train the same values"),
        # NaN passes every bound of a JSON schema; the job refuses it on the instance: refused here first.
        ([{}, {"learning_rate": float("nan")}], None, r"set 2: learning_rate = NaN is invalid; expected a number"),
        ([{}, {"learning_rate": float("inf")}], None, r"set 2: learning_rate = Infinity is invalid"),
        (None, {"learning_rate": [0.1, float("nan")]}, r"grid learning_rate\[1\]: learning_rate = NaN is invalid"),
        (None, {"learning_rate": [float("-inf"), 0.1]}, r"grid learning_rate\[0\]: learning_rate = -Infinity"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_bad_sweeps_are_refused_saying_what_to_do(sets: Any, grid: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        expand_sets(sets, grid)


def test_a_huge_grid_is_refused_before_it_is_expanded() -> None:
    values = list(range(1, 1001))
    with pytest.raises(ConfigError, match=r"grid gives 1000000 sets"):
        expand_sets(None, {"epochs": values, "batch_size": values})
    assert MAX_SETS == 16


def test_a_huge_grid_is_counted_before_its_values_are_checked() -> None:
    # Every value is invalid: checked first, the message would name epochs[0] (after a million schema checks).
    with pytest.raises(ConfigError, match=r"^sweep: grid gives 1000000 sets; expected 2 to 16"):
        expand_sets(None, {"epochs": [0] * 1_000_000})


def test_duplicates_compare_values_not_spellings() -> None:
    with pytest.raises(ConfigError, match=r"sets 2 and 3 train the same values \(learning_rate=1\.0\)"):
        refuse_duplicates([{"learning_rate": 0.5}, {"learning_rate": 1}, {"learning_rate": 1.0}])
    refuse_duplicates([{"epochs": 1}, {"epochs": 1, "model": "seed"}])


def test_describe_lists_the_knobs_or_says_configured() -> None:
    assert describe({"learning_rate": 0.001, "epochs": 3}) == "epochs=3, learning_rate=0.001"
    assert describe({}) == "the configured values"


def epochs_sweep(count: int, shape: str) -> tuple[Any, Any]:
    """`count` distinct sets, as a list (`sets`) or as a one-knob grid."""
    values = list(range(1, count + 1))
    return ([{"epochs": n} for n in values], None) if shape == "sets" else (None, {"epochs": values})


@pytest.mark.parametrize("shape", ["sets", "grid"])
@pytest.mark.parametrize("count", [2, 16])
def test_the_bounds_of_a_sweeps_size_are_accepted(count: int, shape: str) -> None:
    # Literal bounds, not MIN_SETS/MAX_SETS: a changed constant or an off-by-one comparison must fail here.
    assert [s["epochs"] for s in expand_sets(*epochs_sweep(count, shape))] == list(range(1, count + 1))


@pytest.mark.parametrize("shape", ["sets", "grid"])
@pytest.mark.parametrize("count", [1, 17])
def test_one_past_the_bounds_of_a_sweeps_size_is_refused(count: int, shape: str) -> None:
    with pytest.raises(ConfigError, match=rf"sweep: {shape} gives {count} sets; expected 2 to 16: "):
        expand_sets(*epochs_sweep(count, shape))
