"""A run's configuration: its Params validated over the deployment's settings, and the settings again from it."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from orchestrator.config.run_params import BY_NAME, RUN_PARAMS, schema_violation
from orchestrator.config.settings import Settings, load_settings, validate_git_ref
from orchestrator.errors import fail_without_retry

log = logging.getLogger(__name__)


# The config's keys that are this run's own values, not settings (git_ref, and what ec2_sweep sets on its runs).
RUN_ONLY_KEYS = frozenset(param.name for param in RUN_PARAMS if not param.overrides_setting)


def resolve_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate this run's params over the deployment's configuration; fail before anything is spent, on the first
    try: no retry fixes a bad setting."""
    with fail_without_retry():
        settings = load_settings(params)
        ref = str(params.get("git_ref") or "").strip() or settings.github.branch
        validate_git_ref(ref)
        resolved = settings.to_dict()
        resolved["git_ref"] = ref
        resolved.update(sweep_child_params(params))
    log.info(
        "Run configuration: repo %s ref %s; instance types %s (%s); epochs %s, batch %s, lr %s, data %s; "
        "checkpoints %s",
        settings.github.repo,
        ref,
        ",".join(settings.aws.instance_types),
        "spot" if settings.aws.spot else "on-demand",
        settings.training.epochs,
        settings.training.batch_size,
        settings.training.learning_rate,
        settings.training.data_uri,
        f"{settings.checkpoint_uri} every {settings.checkpoints.minutes:g} min" if settings.checkpoint_uri else "off",
    )
    return resolved


def sweep_child_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """What ec2_sweep sets on each of its runs: the parent MLflow run ("" for none) and whether evaluate may move
    the champion alias (True unless "false"). Checked against their Params' schemas, as the form checks them."""
    from orchestrator.errors import ConfigError

    values = {name: params.get(name) for name in ("mlflow_parent_run_id", "promote")}
    for name, value in values.items():
        param = BY_NAME[name]
        if value not in (None, "") and schema_violation(value, param.form_schema()):
            raise ConfigError(f"params: {name}: {value!r} is invalid; expected {param.range_text}")
    if values["mlflow_parent_run_id"]:
        log.info("Nested under MLflow run %s; promote: %s", values["mlflow_parent_run_id"], values["promote"] or "true")
    return {"mlflow_parent_run_id": values["mlflow_parent_run_id"] or "", "promote": values["promote"] != "false"}


def run_config(config: Mapping[str, Any] | str) -> dict[str, Any]:
    """The run's resolved config: resolve_config's XCom value, or the JSON text the DAG's templates render from it
    (a template, unlike an XComArg, draws no graph edge from resolve_config to every task)."""
    return json.loads(config) if isinstance(config, str) else dict(config)


def settings_of(config: Mapping[str, Any] | str) -> Settings:
    return Settings.from_dict({k: v for k, v in run_config(config).items() if k not in RUN_ONLY_KEYS})
