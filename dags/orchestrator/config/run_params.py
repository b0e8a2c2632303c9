"""The per-run knobs of the training DAG and their bounds: the one place they are declared.

Derived from this table: the DAG's trigger form (Params with titles, descriptions and JSON-schema constraints), the
validation of the settings they override (the same schema, so the form and `resolve_config` agree), and the `-P`
params the DAG passes to the job. The job itself (remote/config.py) runs from the trained commit on the instance and
cannot import this module: tests/remote/test_parameter_sources.py fails when its bounds or MLproject drift from here.

Pure data, importing the standard library only (jsonschema lazily): the DAG file reads it at parse time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# `(?![\s\S])`: the end of the text both in Python (jsonschema's re.search) and in the browser's regex; `$` lets a
# trailing newline through in Python, and `\Z` is no anchor in JavaScript.
_END = "(?![\\s\\S])"
# Each type is one more launch attempt (two with spot first): a bound keeps a pasted list from looping for hours.
MAX_INSTANCE_TYPES = 20
INSTANCE_TYPE_PATTERN = "^[a-z][a-z0-9-]*\\.[a-z0-9-]+" + _END
MODELS = ("default", "seed")
DATA_URI_SCHEMES = ("s3", "file", "synthetic")
MAX_DATA_URI = 1024
# The form's section of the knobs that ec2_sweep sets on each of its runs (a person triggering one run leaves them).
SWEEP_SECTION = "Sweep (set by ec2_sweep)"
# Airflow's number field hands a schema's own `minimum`/`maximum` to its NumberInput, which clamps an out-of-range
# entry on blur without a word (docs/decisions/0112): inside `allOf` the form does not see them, so the value stays
# as typed and the trigger is refused, jsonschema checking the same bounds.
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


@dataclass(frozen=True)
class RunParam:
    """One trigger-form knob: the JSON schema of a value that is set, and the setting used when it is left empty."""

    name: str
    title: str
    description: str  # what it is, with its units; the range and the "empty" meaning are added from the fields below
    schema: Mapping[str, Any]  # JSON schema of a set value (never null)
    setting: str  # `section.key` it overrides; for git_ref the setting used when it is empty; "" for none
    section: str
    range_text: str  # the schema in words, as "expected ...": for the form and for settings' error messages
    job_param: bool = False  # passed to the training job as `-P name=value`
    overrides_setting: bool = True  # False: a value for this run only, not a setting (git_ref)
    choices_display: Mapping[str, str] = field(default_factory=dict)
    # What an empty field means, for a knob that stands for no setting; by default the setting's configured value.
    empty: str = ""
    otherwise: str = ""  # what an empty setting means in turn, after the setting's name

    def empty_text(self, configured: str = "") -> str:
        """What an empty field stands for; `configured`: the setting's value as text, where it is known."""
        if self.empty:
            return self.empty
        value = f", {configured}" if configured else ""
        return f"the configured value{value} ({self.setting}){self.otherwise}"

    def form_schema(self, choices: Sequence[str] = ()) -> dict[str, Any]:
        """The Param's schema: nullable, since empty means the configured value, and shown as Airflow's form can.

        Airflow 3's form renders a boolean as a switch that cannot go back to empty, so a boolean is offered as a
        drop-down of the texts "true"/"false" (settings read them as booleans) plus "configured". A number's bounds
        sit in `allOf`, out of the form's sight, so that it refuses instead of clamping. `choices`, the items a
        deployment allows for a list: offered as the form's options (a multi-select) and required of each item.
        """
        schema = dict(self.schema)
        kind = schema.pop("type")
        bounds = {key: schema.pop(key) for key in _BOUNDS if key in schema}
        if kind == "boolean":
            schema = {"enum": [None, "true", "false"]}
            kind = "string"
        elif "enum" in schema:
            schema["enum"] = [None, *schema["enum"]]
        if choices and kind == "array":
            # Only the choices' own refusal, which names them (the settings held each choice to the item's pattern).
            schema["items"] = {"type": schema["items"]["type"], "enum": list(choices)}
            schema["examples"] = list(choices)
        return {"type": ["null", kind], **schema, **({"allOf": [bounds]} if bounds else {})}

    def form_kwargs(self, configured: str = "", note: str = "", choices: Sequence[str] = ()) -> dict[str, Any]:
        """Everything but the default (None, i.e. configured) that an Airflow `Param` takes; `note` ends the
        description of a knob that stands for a setting (why its configured value is not shown)."""
        description = self.form_description(configured, note if self.setting and not self.empty else "")
        kwargs: dict[str, Any] = {"title": self.title, "description": description, "section": self.section}
        display = self.values_display(configured)
        if display:
            kwargs["values_display"] = display
        return {**kwargs, **self.form_schema(choices)}

    def form_description(self, configured: str = "", note: str = "") -> str:
        range_text = self.range_text[0].upper() + self.range_text[1:]
        return " ".join(filter(None, (f"{self.description} {range_text}. Empty: {self.empty_text(configured)}.", note)))

    def values_display(self, configured: str = "") -> dict[Any, str] | None:
        """Labels of a drop-down's choices, the empty one naming the setting it stands for (and its value)."""
        if not self.choices_display:
            return None
        value = f", {configured}" if configured else ""
        return {None: self.empty or f"configured{value} ({self.setting})", **self.choices_display}


RUN_PARAMS: tuple[RunParam, ...] = (
    RunParam(
        name="git_ref",
        title="Branch, tag or commit",
        description="What to train: a branch, a tag or a commit sha (7 to 40 hex digits); its CI must be green.",
        # Empty is allowed here: the form may send "" for a cleared field, and "" means the configured branch.
        schema={"type": "string", "maxLength": 255, "pattern": "^(?:[A-Za-z0-9][A-Za-z0-9._/-]*)?" + _END},
        setting="github.branch",
        section="What to train",
        overrides_setting=False,
        range_text="letters, digits and '._/-' (starting with a letter or digit), up to 255 characters",
    ),
    RunParam(
        name="data_uri",
        title="Training data",
        description="Where the dataset is: s3://bucket/prefix/ (or .../data.zip), file:///path on the instance, "
        "or synthetic:// (generated images, options in MLproject).",
        schema={
            "type": "string",
            "maxLength": MAX_DATA_URI,
            # A scheme, if any, is one of DATA_URI_SCHEMES; never a leading '-' (the job would read an option).
            "pattern": "^(?:s3://[^/\\s]+|file://|synthetic://|(?![A-Za-z][A-Za-z0-9+.-]*:|-))\\S*" + _END,
        },
        setting="training.data_uri",
        section="What to train",
        range_text=f"one of the schemes {', '.join(DATA_URI_SCHEMES)}, no spaces, up to {MAX_DATA_URI} characters",
        job_param=True,
    ),
    RunParam(
        name="model",
        title="Network",
        description="Which network to train.",
        schema={"type": "string", "enum": list(MODELS)},
        setting="training.model",
        section="Training",
        range_text=f"one of {', '.join(MODELS)}",
        job_param=True,
        choices_display={"default": "default: the 32-64-128-128 CNN", "seed": "seed: the original small network"},
    ),
    RunParam(
        name="epochs",
        title="Epochs",
        description="Passes over the training set.",
        schema={"type": "integer", "minimum": 1, "maximum": 10_000},
        setting="training.epochs",
        section="Training",
        range_text="a whole number from 1 to 10000",
        job_param=True,
    ),
    RunParam(
        name="batch_size",
        title="Batch size",
        description="Images per optimiser step (512 suits one H100).",
        schema={"type": "integer", "minimum": 1, "maximum": 65_536},
        setting="training.batch_size",
        section="Training",
        range_text="a whole number from 1 to 65536",
        job_param=True,
    ),
    RunParam(
        name="learning_rate",
        title="Learning rate",
        description="Adam's step size.",
        schema={"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        setting="training.learning_rate",
        section="Training",
        range_text="a number above 0 and at most 1, e.g. 0.001",
        job_param=True,
    ),
    RunParam(
        name="instance_types",
        title="EC2 instance types",
        description="GPU instance types to try, in order of preference (the next is tried when EC2 has no "
        "capacity for one): one per line, or picked from the list where the deployment allows only some.",
        schema={
            "type": "array",
            "maxItems": MAX_INSTANCE_TYPES,
            "uniqueItems": True,
            "items": {"type": "string", "pattern": INSTANCE_TYPE_PATTERN},
        },
        setting="aws.instance_types",
        section="Instance",
        range_text=f"EC2 type names such as g6.xlarge, no repeats, up to {MAX_INSTANCE_TYPES}",
    ),
    RunParam(
        name="spot",
        title="Spot capacity",
        description="Ask for spot capacity first (cheaper, may be interrupted; falls back to on-demand when "
        "aws.spot_fallback_to_on_demand).",
        schema={"type": "boolean"},
        setting="aws.spot",
        section="Instance",
        range_text="either true (spot first) or false (on-demand only)",
        choices_display={"true": "spot first", "false": "on-demand only"},
    ),
    RunParam(
        name="ami_id",
        title="Image (AMI id)",
        description="The exact image to launch, e.g. an earlier run's ec2.ami_id tag to repeat it; it must exist in "
        "the region, be available and suit the instance types (checked before launch).",
        # EC2's ids: "ami-" and 8 (older) or 17 hex digits; "" as for git_ref (a cleared field).
        schema={"type": "string", "pattern": "^(?:ami-(?:[0-9a-f]{8}|[0-9a-f]{17}))?" + _END},
        setting="aws.ami_id",
        section="Instance",
        range_text="an AMI id: ami- and 8 or 17 hex digits",
        otherwise=", else the newest image of aws.ami_ssm_parameter",
    ),
    RunParam(
        name="max_lifetime_minutes",
        title="Instance lifetime limit (minutes)",
        description="The instance powers itself off (and is terminated) this many minutes after launch, whatever "
        "happens; it must cover the launch, ready and training timeouts.",
        schema={"type": "integer", "minimum": 10, "maximum": 7 * 24 * 60},
        setting="aws.max_lifetime_minutes",
        section="Instance",
        range_text="a whole number of minutes from 10 to 10080 (7 days)",
    ),
    RunParam(
        name="mlflow_parent_run_id",
        title="Parent MLflow run",
        description="The sweep's MLflow run: this run's MLflow run is created nested under it (tag "
        "mlflow.parentRunId), so the MLflow UI compares a sweep's sets side by side.",
        # MLflow's run ids are 32 lowercase hex digits; "" as for git_ref (the form may send it for a cleared field).
        schema={"type": "string", "pattern": "^(?:[0-9a-f]{32})?" + _END},
        setting="",
        section=SWEEP_SECTION,
        overrides_setting=False,
        range_text="an MLflow run id (32 hex digits)",
        empty="none, a run of its own",
    ),
    RunParam(
        name="promote",
        title="Move the champion alias",
        description="Whether evaluate may register the model and move the champion alias; a sweep's runs say "
        "false (evaluate still logs its verdict) and the sweep gates its best run only.",
        schema={"type": "boolean"},
        setting="",
        section=SWEEP_SECTION,
        overrides_setting=False,
        range_text="either true (the run's own gate decides) or false (the verdict is only logged)",
        choices_display={"true": "true: evaluate decides", "false": "false: left to the sweep"},
        empty="true, evaluate decides",
    ),
)
BY_NAME: Mapping[str, RunParam] = {param.name: param for param in RUN_PARAMS}
# The job's `-P` params that come from these knobs; the DAG adds git_sha, the commit the CI gate resolved.
JOB_PARAMS: tuple[str, ...] = tuple(param.name for param in RUN_PARAMS if param.job_param)
# The job's checkpoint params, from the checkpoints section (no trigger-form knob: Settings.checkpoint_uri).
CHECKPOINT_PARAMS = ("checkpoint_uri", "checkpoint_minutes")
# The -P params the DAG sets: the trigger form's job knobs (from their settings), the checkpoints and the commit the
# CI gate resolved. training.extra_params may add others, never replace these (settings refuses them): a run's
# recorded params must say what it really trained.
DAG_PARAMS = frozenset((*JOB_PARAMS, *CHECKPOINT_PARAMS, "git_sha"))


def schema_violation(value: Any, schema: Mapping[str, Any]) -> tuple[str, Any] | None:
    """The first part of `value` that `schema` refuses, as (its index path such as "[1]" or "", that part); None if
    valid. Checked with jsonschema, as Airflow checks Params, so the form and the settings agree. A NaN or
    infinite number is refused first: JSON has none, yet Python's json, TOML and env parsing produce them, and NaN
    passes every bound, so only the job would refuse it, on a paid instance."""
    from jsonschema import Draft202012Validator

    if isinstance(value, float) and not math.isfinite(value):  # no knob holds numbers deeper than its top level
        return "", value
    for error in Draft202012Validator(schema).iter_errors(value):
        return "".join(f"[{step}]" for step in error.absolute_path), error.instance
    return None
