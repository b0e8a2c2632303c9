"""What crosses task and package boundaries: XCom keys, MLflow tag and artifact names, EC2 tag names.

A name one package writes and another reads lives here, so neither imports the other for it; names used inside one
package only (the sweep's parent-run tags, a dataset version's tags) stay with it. The steps' results themselves,
typed, are contracts_steps.
"""

from __future__ import annotations


def classpath(trigger: object) -> str:
    """A trigger's classpath as the metadata DB stores it, derived from its class so a move can never leave it stale
    (the old path keeps working through an import shim for one release)."""
    return f"{type(trigger).__module__}.{type(trigger).__qualname__}"


# XCom keys (besides each task's return value): the commit the CI gate resolved, the training's MLflow run and its
# URL (read by the report), a failed task's failure (observe.failures), and wait_ready's view of the running instance
# (contracts_steps.RunningInstance: address, when the wait began, its deadline), kept for its resumption.
SHA_XCOM_KEY = "ci_gate_sha"
# When (epoch seconds) the CI gate saw the commit's CI pass: the start of "green CI to first epoch" in the report.
CI_PASSED_AT_KEY = "ci_passed_at"
MLFLOW_RUN_ID_KEY = "mlflow_run_id"
MLFLOW_RUN_URL_KEY = "mlflow_run_url"
FAILURE_KEY = "failure"
RUNNING_KEY = "running"
# train's spot recovery: the instances EC2 took back while it trained (contracts_steps.Preemption, oldest first), and
# the instance it trains on after the last relaunch (a ReadyInstance), read again after each deferral.
PREEMPTIONS_KEY = "preemptions"
RECOVERED_READY_KEY = "recovered_ready"

# ec2_training run ids made by the DAGs that start it: a sweep's set (its number, from 1), a retraining on new data.
# The run's MLflow name says which (tracking.runs.training_run_lead).
SET_RUN_ID = "{run_id}__set{number}"
RETRAIN_RUN_PREFIX = "retrain__"

# MLflow run tags and artifacts.
DAG_ID_TAG = "airflow.dag_id"
DAG_RUN_ID_TAG = "airflow.run_id"

# The remote job's key (job_script.job_key: letters, digits, '._-'): a retry finds the run its first try created by
# this tag. A run id may hold characters (quotes) that MLflow's search filter cannot carry; the key never does.
JOB_KEY_TAG = "ec2_trainer.job_key"
# How many times EC2 took the run's spot instance back while it trained (the job resumed each time).
PREEMPTIONS_TAG = "ec2_trainer.preemptions"
# Set by the job (remote/checkpoints.py) when a checkpoint could not be written: it trained on without them.
CHECKPOINT_ERROR_TAG = "ec2_trainer.checkpoint_error"
# Why the instance's guard stopped the job (a stall, idle GPUs, the cost cap): userdata/guard.sh's reason line.
GUARD_TAG = "ec2_trainer.guard"

# The bootstrap.phases line (userdata/bootstrap.sh) with the whole bootstrap's seconds, beside its steps' own.
BOOTSTRAP_TOTAL = "total"

# The per-epoch metric the job logs with each epoch's seconds (remote/metrics.py): the first one's timestamp less its
# value is when training proper began.
EPOCH_TIME_METRIC = "speed/epoch_time_s"

# MLflow's own tag for a nested run: its UI lists the run under that parent (a sweep's run under the sweep's).
PARENT_RUN_TAG = "mlflow.parentRunId"
SETTINGS_DIGEST_TAG = "ec2_trainer.settings_digest"

# Model version tag: until when the version contends for the alias, ISO 8601 UTC (epoch seconds before: still read,
# tracking.promotion.contends_until); compared across workers' clocks.
CONTENDER_TAG = "ec2_trainer.contends_until"
# Model version tag: when (epoch seconds) the gate moved the champion alias onto the version: its own record, so a
# retry trusts "already holds the alias" only when the gate, not a hand in the UI, put it there.
ALIAS_MOVED_TAG = "ec2_trainer.alias_moved_at"

# MLflow 3 opens an experiment on its GenAI view (traces, prompts) unless this tag says it holds model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"

# Run tags of the gate's outcome. A sweep's run (promote=False) records its verdict as LEFT_TO_SWEEP: the sweep
# gates its best run only, which then gets "promoted" or "not_promoted".
PROMOTION_TAG = "ec2_trainer.promotion"
PROMOTION_REASON_TAG = "ec2_trainer.promotion_reason"
LEFT_TO_SWEEP = "left_to_sweep"

# Names of the cost on the training's MLflow run: metrics (comparable across runs) and tags (overwritten on a retry,
# where params would refuse a second value).
COST_METRICS = ("cost_usd", "billed_seconds", "non_training_seconds", "training_share")
# Beside them, what spot recovery cost and spot saved: the instances launched, EC2's take-backs, the seconds lost to
# them and the saving against on-demand (observe.publish.cost_metrics).
RECOVERY_METRICS = ("attempts", "preemptions", "seconds_lost_to_preemption", "saving_vs_on_demand")
PRICE_SOURCE_TAG = "ec2_trainer.price_source"
USD_PER_HOUR_TAG = "ec2_trainer.usd_per_hour"

# The MLflow artifact holding the full manifest (every key, ETag and size).
MANIFEST_ARTIFACT = "dataset/manifest.json"

# EC2 tags: identity by tag, every lookup and terminate filters on them.
TAG_PREFIX = "ec2-trainer:"
TAG_PROJECT = TAG_PREFIX + "project"

# Which Airflow deployment owns the instance: two deployments in one account never count, reap, terminate or adopt
# each other's instances, because every lookup filters on it (aws.deployment).
TAG_DEPLOYMENT = TAG_PREFIX + "deployment"
TAG_DAG_ID = TAG_PREFIX + "dag_id"
TAG_RUN_ID = TAG_PREFIX + "run_id"
TAG_GIT_SHA = TAG_PREFIX + "git_sha"
TAG_EXPIRES_AT = TAG_PREFIX + "expires_at"

# The instance's pinned SSH host key (public half, no secret): a retried launch that adopts the instance reads it here.
TAG_HOST_KEY = TAG_PREFIX + "host_key"

# A baked image's tags (ec2_bake_image): what it was made from and by. Training launches from it only when its
# bootstrap digest is the current bootstrap's (orchestrator.cloud.user_data.bootstrap_digest).
TAG_SOURCE_IMAGE = TAG_PREFIX + "source_image"
# The base it was baked from as configured (aws.ami_id, else aws.ami_ssm_parameter's name, not its moving value).
TAG_BASE = TAG_PREFIX + "base"
TAG_BOOTSTRAP_DIGEST = TAG_PREFIX + "bootstrap_digest"
TAG_MLFLOW_VERSION = TAG_PREFIX + "mlflow_version"
# When it was baked, to the microsecond (ISO 8601 UTC): the order pruning keeps, finer than EC2's CreationDate.
TAG_BAKED_AT = TAG_PREFIX + "baked_at"
