"""The body of each step of the training DAG: plain functions over the run's settings, called by thin Airflow tasks."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from orchestrator.run_params import BY_NAME, RUN_PARAMS, schema_violation
from orchestrator.settings import Settings, load_settings, validate_git_ref

if TYPE_CHECKING:
    from orchestrator.datasets.versions import DatasetVersion
    from orchestrator.ec2 import LaunchedInstance

log = logging.getLogger(__name__)

# The config's keys that are this run's own values, not settings (git_ref, and what ec2_sweep sets on its runs).
RUN_ONLY_KEYS = frozenset(param.name for param in RUN_PARAMS if not param.overrides_setting)
# How long terminate waits to see its instances terminated (EC2 takes seconds to a few minutes): only for the log.
TERMINATE_WAIT_S = 300


def resolve_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate this run's params over the deployment's configuration; fail before anything is spent, on the first
    try: no retry fixes a bad setting."""
    from orchestrator.errors import ConfigError

    with fail_without_retry(ConfigError):
        settings = load_settings(params)
        ref = str(params.get("git_ref") or "").strip() or settings.github.branch
        validate_git_ref(ref)
        resolved = settings.to_dict()
        resolved["git_ref"] = ref
        resolved.update(sweep_child_params(params))
    log.info(
        "Run configuration: repo %s ref %s; instance types %s (%s); epochs %s, batch %s, lr %s, data %s",
        settings.github.repo,
        ref,
        ",".join(settings.aws.instance_types),
        "spot" if settings.aws.spot else "on-demand",
        settings.training.epochs,
        settings.training.batch_size,
        settings.training.learning_rate,
        settings.training.data_uri,
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


@contextlib.contextmanager
def fail_without_retry(*errors: type[Exception]) -> Iterator[None]:
    """Errors no retry can fix fail the task at once: retrying a bad instance type only delays the message."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        yield
    except errors as exc:
        raise AirflowFailException(str(exc)) from None


def settings_of(config: Mapping[str, Any]) -> Settings:
    return Settings.from_dict({k: v for k, v in config.items() if k not in RUN_ONLY_KEYS})


def plan_launch(config: Mapping[str, Any], git_sha: str, dag_id: str, run_id: str) -> dict[str, Any]:
    """Check everything a launch needs before anything is created: the instance types exist here, the AMI (and its
    root volume), the subnet, a security group admitting SSH, and the instance profile."""
    from orchestrator.connections import aws_client
    from orchestrator.ec2 import unoffered_instance_types
    from orchestrator.errors import ConfigError
    from orchestrator.launch import resolve_ami
    from orchestrator.preflight import check_instance_profile, check_network, read_image_root, root_volume_gb

    s = settings_of(config)
    # Fails here, before anything is launched, on missing or half-uploaded data; train reads it again as the job
    # starts (the identity the run records is the data's then).
    training_data(s)
    ec2 = aws_client("ec2", s.aws.conn_id, s.aws.region)
    with fail_without_retry(ConfigError):
        unoffered = unoffered_instance_types(ec2, s.aws.instance_types)
        if unoffered:
            raise ConfigError(
                f"aws.instance_types: {unoffered} not offered in {s.aws.region}: check the spelling "
                "(e.g. g6.xlarge) or choose types this region has"
            )
        ami_id = resolve_ami(aws_client("ssm", s.aws.conn_id, s.aws.region), s.aws.ami_ssm_parameter)
        root = read_image_root(ec2, ami_id)
        volume_gb = root_volume_gb(s.aws.root_volume_gb, root)
        network = check_network(ec2, s.aws.subnet_id, s.aws.security_group_ids, s.instance.ssh_port)
        if s.aws.instance_profile:
            check_instance_profile(aws_client("iam", s.aws.conn_id, s.aws.region), s.aws.instance_profile)
    log.info(
        "AMI %s (from %s), root %s of %s GB (snapshot %s GB); subnet %s in %s (maps public IPs: %s)",
        ami_id,
        s.aws.ami_ssm_parameter,
        root.device_name,
        volume_gb,
        root.snapshot_gb,
        network.subnet_id,
        network.vpc_id,
        network.maps_public_ip,
    )
    return {
        "ami_id": ami_id,
        "ami_name": root.name,
        "root_device_name": root.device_name,
        "root_volume_gb": volume_gb,
        "git_sha": git_sha,
        "dag_id": dag_id,
        "run_id": run_id,
    }


def training_data(s: Settings) -> DatasetVersion | None:
    """The exact data an s3:// training.data_uri holds now (None for other schemes): it must exist and, when it is
    a version under datasets.uri, be complete (its marker written). Fails without retry otherwise."""
    from orchestrator.connections import aws_client
    from orchestrator.datasets.s3 import identify
    from orchestrator.datasets.versions import DatasetError

    if not s.training.data_uri.startswith("s3://"):
        return None
    with fail_without_retry(DatasetError):
        version = identify(aws_client("s3", s.aws.conn_id, s.aws.region), s.training.data_uri, s.datasets)
    log.info(
        "Data %s: %s%d objects, %d bytes, digest %s",
        version.uri,
        f"version {version.name!r}, " if version.name else "",
        len(version.objects),
        sum(o.size for o in version.objects),
        version.digest,
    )
    return version


def launch(config: Mapping[str, Any], plan: Mapping[str, Any], waited_s: float) -> dict[str, Any] | None:
    """Start the run's instance (or adopt the one a previous try started) with a fresh pinned host key; None while
    the deployment is at aws.max_instances (look again later: nothing sleeps here).

    `waited_s` is how long this run has waited for a slot so far; past aws.instance_wait_minutes at the cap it fails.
    A new instance's deadline counts from when it is launched. It is returned running: an instance EC2 takes back
    before it runs (capacity, spot) is replaced on the next option.
    """
    from orchestrator.connections import aws_client
    from orchestrator.ec2 import InstanceCapError, adopt_run_instance, instance_slot_free
    from orchestrator.errors import ConfigError

    s = settings_of(config)
    ec2 = aws_client("ec2", s.aws.conn_id, s.aws.region)
    launched = adopt_run_instance(
        ec2, s.aws.project_tag, s.aws.deployment, plan["dag_id"], plan["run_id"], plan["git_sha"]
    )
    if launched is None:
        # A retry after the cap held too long would wait the whole aws.instance_wait_minutes again.
        with fail_without_retry(InstanceCapError, ConfigError):
            free = instance_slot_free(
                ec2,
                s.aws.project_tag,
                s.aws.deployment,
                s.aws.max_instances,
                waited_s=waited_s,
                timeout_s=s.aws.instance_wait_minutes * 60,
            )
            if not free:
                return None
            launched = _launch_new(s, plan, ec2)
    else:
        log.info("Reusing %s, launched by an earlier try of this run", launched.instance_id)
    return {
        "instance_id": launched.instance_id,
        "instance_type": launched.instance_type,
        "market": launched.market,
        "reused": launched.reused,
        "host_public_key": launched.host_public_key,
    }


def _launch_new(s: Settings, plan: Mapping[str, Any], ec2: Any) -> LaunchedInstance:
    from orchestrator.connections import ssh_private_key
    from orchestrator.ec2 import launch_instance
    from orchestrator.hostkeys import generate_host_key, public_line_from_private
    from orchestrator.launch import LaunchSpec, RunIdentity
    from orchestrator.userdata import UserDataSpec, render_user_data

    expires_at = int(time.time()) + s.aws.max_lifetime_minutes * 60
    identity = RunIdentity(plan["dag_id"], plan["run_id"], plan["git_sha"], expires_at, s.aws.deployment)
    host_key = generate_host_key()
    user_data = render_user_data(
        UserDataSpec(
            host_key=host_key,
            authorized_public_key=public_line_from_private(ssh_private_key(s.instance.ssh_conn_id)),
            ssh_user=s.instance.ssh_user,
            ssh_port=s.instance.ssh_port,
            deadline_epoch=identity.expires_at_epoch,
            state_dir=s.instance.state_dir,
            python_bin=s.instance.python_bin,
            require_gpu=s.instance.require_gpu,
        )
    )
    spec = LaunchSpec(
        ami_id=plan["ami_id"],
        instance_types=s.aws.instance_types,
        spot=s.aws.spot,
        spot_fallback_to_on_demand=s.aws.spot_fallback_to_on_demand,
        subnet_id=s.aws.subnet_id,
        security_group_ids=s.aws.security_group_ids,
        public_ip=s.instance.address == "public_ip",
        instance_profile=s.aws.instance_profile or None,
        root_volume_gb=plan["root_volume_gb"],
        root_device_name=plan["root_device_name"],
        kms_key_id=s.aws.kms_key_id or None,
        project_tag=s.aws.project_tag,
    )
    launched = launch_instance(
        ec2,
        spec,
        identity,
        user_data,
        host_public_key=host_key.public_line,
        # Relaunches after capacity was lost count against the same bound, and never past the run's deadline.
        running_timeout_s=min(s.aws.launch_timeout_minutes * 60, expires_at - time.time()),
        poll_s=s.instance.poll_seconds,
    )
    log.info(
        "Instance %s (%s, %s) for commit %s; host key %s; it must be gone by %s",
        launched.instance_id,
        launched.instance_type,
        launched.market,
        identity.git_sha,
        host_key.fingerprint_sha256,
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at)),
    )
    return launched


def ssh_target(config: Mapping[str, Any], address: str, host_public_key: str) -> Any:
    from orchestrator.connections import ssh_private_key
    from orchestrator.ssh import SshTarget

    s = settings_of(config)
    return SshTarget(
        host=address,
        port=s.instance.ssh_port,
        user=s.instance.ssh_user,
        host_public_key=host_public_key,
        private_key_pem=ssh_private_key(s.instance.ssh_conn_id),
    )


# What no retry of wait_ready can fix: a lost or address-less instance, another host key, a failed or late bootstrap.
def _not_ready_errors() -> tuple[type[Exception], ...]:
    from orchestrator.ec2 import InstanceLostError, InstanceNotReadyError
    from orchestrator.ssh import BootstrapFailedError, BootstrapTimeoutError, HostKeyMismatchError, SshTimeoutError

    return (
        InstanceLostError,
        InstanceNotReadyError,
        HostKeyMismatchError,
        SshTimeoutError,
        BootstrapFailedError,
        BootstrapTimeoutError,
    )


def wait_running(config: Mapping[str, Any], launched: Mapping[str, Any]) -> dict[str, Any]:
    """The instance runs and has its address (launch returns it running, so this is one look, bounded anyway).

    The ready wait's deadline (aws.launch_timeout_minutes + instance.ready_timeout_minutes) counts from the
    instance's launch time as EC2 records it, so a retried wait_ready keeps the first try's bound.
    """
    from orchestrator.connections import aws_client
    from orchestrator.ec2 import InstanceNotReadyError, describe_instance, wait_until_running

    s = settings_of(config)
    started = time.time()
    with fail_without_retry(*_not_ready_errors()):
        ec2 = aws_client("ec2", s.aws.conn_id, s.aws.region)
        known = describe_instance(ec2, launched["instance_id"])
        launched_at = known.launch_time.timestamp() if known is not None and known.launch_time else started
        deadline = launched_at + (s.aws.launch_timeout_minutes + s.instance.ready_timeout_minutes) * 60
        info = wait_until_running(
            ec2,
            launched["instance_id"],
            timeout_s=max(1.0, min(s.aws.launch_timeout_minutes * 60, deadline - started)),
            poll_s=s.instance.poll_seconds,
        )
        address = info.public_ip if s.instance.address == "public_ip" else info.private_ip
        if not address:
            raise InstanceNotReadyError(
                f"{info.instance_id} has no {s.instance.address.replace('_', ' ')}: use a subnet that assigns "
                "public IPs, or set instance.address = private_ip when Airflow runs inside the VPC"
            )
    running_s = time.time() - started
    log.info("%s is running (%s) at %s after %.1f s", info.instance_id, info.instance_type, address, running_s)
    return {
        "instance_id": info.instance_id,
        "instance_type": info.instance_type,
        "market": launched["market"],
        "address": address,
        "started_at": started,
        "deadline": deadline,
        "seconds_to_running": round(running_s, 1),
    }


def ready_result(
    config: Mapping[str, Any],
    launched: Mapping[str, Any],
    running: Mapping[str, Any],
    ssh_s: float,
    ready_s: float,
    bootstrap_phases_s: Mapping[str, float],
) -> dict[str, Any]:
    """wait_ready's XCom: where train logs in (address and pinned host key) and how long each stage took (the
    bootstrap's own steps as the instance timed them)."""
    log.info("Bootstrap finished after %.1f s in all (SSH answered after %.1f s)", ready_s, ssh_s)
    return {
        "instance_id": running["instance_id"],
        "instance_type": running["instance_type"],
        "market": running["market"],
        "address": running["address"],
        "port": settings_of(config).instance.ssh_port,
        "host_public_key": launched["host_public_key"],
        "seconds_to_running": running["seconds_to_running"],
        "seconds_to_ssh": round(ssh_s, 1),
        "seconds_to_ready": round(ready_s, 1),
        "bootstrap_phases_s": dict(bootstrap_phases_s),
    }


def wait_ready_in_worker(
    config: Mapping[str, Any], launched: Mapping[str, Any], running: Mapping[str, Any]
) -> dict[str, Any]:
    """Bounded, in this worker (training.deferrable = false): SSH answers with the pinned host key, and the
    bootstrap succeeded. The deferrable path does the same in the triggerer (orchestrator.triggers)."""
    from orchestrator.ssh import wait_for_bootstrap, wait_for_ssh

    s = settings_of(config)
    started, deadline = float(running["started_at"]), float(running["deadline"])
    target = ssh_target(config, running["address"], launched["host_public_key"])
    with fail_without_retry(*_not_ready_errors()):
        wait_for_ssh(target, timeout_s=max(1.0, deadline - time.time()), poll_s=s.instance.poll_seconds)
        ssh_s = time.time() - started
        log.info("SSH answers on %s:%s with the pinned host key after %.1f s", target.host, target.port, ssh_s)
        bootstrap = wait_for_bootstrap(
            target,
            s.instance.state_dir,
            timeout_s=max(1.0, deadline - time.time()),
            poll_s=s.instance.poll_seconds,
            on_log=lambda line: log.info("bootstrap | %s", line),
        )
    return ready_result(config, launched, running, ssh_s, time.time() - started, bootstrap.phases_s)


def evaluate(config: Mapping[str, Any], mlflow_run_id: str) -> dict[str, Any]:
    """Gate the run's model; a run or champion that cannot be compared fails at once, any other MLflow error retries.

    A sweep's run (promote false) only logs the verdict: the sweep gates its best run (orchestrator.sweeps)."""
    from orchestrator.connections import mlflow_credentials
    from orchestrator.tracking import TrackingError, credentials_in_env, evaluate_and_promote

    s = settings_of(config)
    creds = mlflow_credentials(s.mlflow.conn_id)
    with credentials_in_env(creds.username, creds.password), fail_without_retry(TrackingError):
        result = evaluate_and_promote(
            s.mlflow.tracking_uri,
            mlflow_run_id,
            model_name=s.mlflow.model_name,
            metric=s.mlflow.metric,
            threshold=s.mlflow.threshold,
            greater_is_better=s.mlflow.greater_is_better,
            promote=config.get("promote", True),
        )
    return result.to_dict()


def terminate(config: Mapping[str, Any], dag_id: str, run_id: str, instance_ids: list[str]) -> dict[str, str]:
    """Terminate the run's instances by id and by tag; harmless to repeat; returns each one's final state."""
    from botocore.exceptions import WaiterError

    from orchestrator.connections import aws_client
    from orchestrator.ec2 import describe_instance, terminate_run, waiter_config

    s = settings_of(config)
    ec2 = aws_client("ec2", s.aws.conn_id, s.aws.region)
    asked = terminate_run(ec2, s.aws.project_tag, s.aws.deployment, dag_id, run_id, instance_ids=tuple(instance_ids))
    if asked:
        # Terminating a running instance passes through shutting-down; wait (bounded) so the log shows the end state.
        try:
            ec2.get_waiter("instance_terminated").wait(
                InstanceIds=asked, WaiterConfig=waiter_config(TERMINATE_WAIT_S, s.instance.poll_seconds)
            )
        except WaiterError as exc:
            log.warning("Not every instance is terminated yet after %s s: %s", TERMINATE_WAIT_S, exc)
    states: dict[str, str] = {}
    for instance_id in asked:
        info = describe_instance(ec2, instance_id)
        states[instance_id] = info.state if info else "terminated"
        log.info("Instance %s: %s", instance_id, states[instance_id])
    if not asked:
        log.info("No instance of run %s to terminate", run_id)
    return states


def sweep(config: Mapping[str, Any] | None = None) -> list[str]:
    """Terminate every instance of this deployment (aws.deployment) that outlived its expires_at tag."""
    from orchestrator.connections import aws_client
    from orchestrator.ec2 import sweep_expired

    s = settings_of(config) if config else load_settings()
    ec2 = aws_client("ec2", s.aws.conn_id, s.aws.region)
    swept = sweep_expired(ec2, s.aws.project_tag, s.aws.deployment, time.time())
    for instance_id in swept:
        log.warning("Terminated %s: past its expires_at deadline (its DAG run did not clean it up)", instance_id)
    return swept
