"""The dataset's folder layout and its label mapping.

`damage` is the positive class (label 1). A pipeline this one replaces had the mapping reversed, so its precision,
recall and F1 scored the wrong class; tests pin this mapping.
"""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = ("no_damage", "damage")
LABELS: dict[str, int] = {name: index for index, name in enumerate(CLASS_NAMES)}
POSITIVE_CLASS = "damage"

TRAIN_SPLIT = "train_another"
VALIDATION_SPLIT = "validation_another"
TEST_SPLIT = "test"
UNBALANCED_TEST_SPLIT = "test_another"
REQUIRED_SPLITS: tuple[str, ...] = (TRAIN_SPLIT, VALIDATION_SPLIT, TEST_SPLIT)
OPTIONAL_SPLITS: tuple[str, ...] = (UNBALANCED_TEST_SPLIT,)

# metric-name prefix for each held-out split
TEST_PREFIXES: dict[str, str] = {TEST_SPLIT: "test_", UNBALANCED_TEST_SPLIT: "test_another_"}
