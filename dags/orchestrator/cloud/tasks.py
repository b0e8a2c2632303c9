"""The cloud steps of the training DAG (plan_launch, launch, wait_running, terminate) and the expired-instance reaper:
plain functions over the run's settings, called by thin Airflow tasks, which turn their typed results into XComs
(orchestrator.contracts_steps)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from orchestrator.config.settings import Settings
from orchestrator.contracts_steps import LaunchedInstance, LaunchPlan, RunningInstance
from orchestrator.datasets.training_data import training_data
from orchestrator.errors import ConfigError, fail_without_retry

if TYPE_CHECKING:
    from orchestrator.cloud.ec2_describe import InstanceInfo
    from orchestrator.cloud.launch_spec import LaunchAttempt, Recovery

log = logging.getLogger(__name__)

# How long terminate waits to see its instances terminated (EC2 takes seconds to a few minutes): only for the log.
TERMINATE_WAIT_S = 300


def plan_launch(s: Settings, git_sha: str, dag_id: str, run_id: str, *, bake: bool = False) -> LaunchPlan:
    """Check everything a launch needs before anything is created: the instance types exist here, the AMI (aws.ami_id
    when a run repeats an image, else this deployment's baked image when it holds what the current bootstrap
    installs, else the newest of aws.ami_ssm_parameter: available, of the types' architecture, its root volume), every
    subnet, a security group admitting SSH, the instance profile, and room in the account's vCPU quotas for at least
    one launch option. `bake`: the plan of an image bake's builder, on the base image (orchestrator.cloud.bake)."""
    from orchestrator.cloud.bake import base_image, training_image
    from orchestrator.cloud.ec2_describe import unoffered_instance_types
    from orchestrator.cloud.launch_spec import launch_markets
    from orchestrator.cloud.preflight import (
        check_architecture,
        check_instance_profile,
        check_network,
        read_image_root,
        root_volume_gb,
    )
    from orchestrator.cloud.quotas import check_quotas
    from orchestrator.config.connections import AwsClients

    aws = AwsClients(s.aws.conn_id, s.aws.region)
    # Fails here, before anything is launched, on missing or half-uploaded data; train reads it again as the job
    # starts (the identity the run records is the data's then).
    training_data(s, aws)
    ec2 = aws.client("ec2")
    with fail_without_retry():
        unoffered = unoffered_instance_types(ec2, s.aws.instance_types)
        if unoffered:
            raise ConfigError(
                f"aws.instance_types: {unoffered} not offered in {s.aws.region}: check the spelling "
                "(e.g. g6.xlarge) or choose types this region has"
            )
        ssm = aws.client("ssm")
        ami_id, source = base_image(s, ssm) if bake else training_image(s, ec2, ssm)
        root = read_image_root(ec2, ami_id, source)
        check_architecture(ec2, ami_id, root, s.aws.instance_types, source)
        volume_gb = root_volume_gb(s.aws.root_volume_gb, root)
        subnet_setting = "aws.subnet_ids" if s.aws.subnet_ids else "aws.subnet_id"
        network = check_network(ec2, s.aws.subnets, s.aws.security_group_ids, s.instance.ssh_port, subnet_setting)
        if s.aws.instance_profile:
            check_instance_profile(aws.client("iam"), s.aws.instance_profile)
        quotas = check_quotas(
            ec2,
            aws.client("service-quotas"),
            s.aws.instance_types,
            launch_markets(s.aws.spot, s.aws.spot_fallback_to_on_demand),
            s.aws.region,
        )
    log.info("Checked %s", quotas)
    log.info(
        "AMI %s (from %s), root %s of %s GB (snapshot %s GB); in %s: %s",
        ami_id,
        s.aws.ami_ssm_parameter if source == "aws.ami_ssm_parameter" else source,
        root.device_name,
        volume_gb,
        root.snapshot_gb,
        network.vpc_id,
        ", ".join(
            f"{n.subnet_id} ({n.availability_zone}, maps public IPs: {str(n.maps_public_ip).lower()})"
            for n in network.subnets
        ),
    )
    return LaunchPlan(
        ami_id=ami_id,
        ami_name=root.name,
        root_device_name=root.device_name,
        root_volume_gb=volume_gb,
        git_sha=git_sha,
        dag_id=dag_id,
        run_id=run_id,
        bake=bake,
    )


def launch(s: Settings, plan: LaunchPlan, waited_s: float) -> LaunchedInstance | None:
    """Start the run's instance (or adopt the one a previous try started) with a fresh pinned host key; None while
    the deployment is at aws.max_instances (look again later: nothing sleeps here).

    `waited_s` is how long this run has waited for a slot so far; past aws.instance_wait_minutes at the cap it fails.
    A new instance's deadline counts from when it is launched. It is returned running: an instance EC2 takes back
    before it runs (capacity, spot) is replaced on the next option.
    """
    from orchestrator.cloud.ec2 import adopt_run_instance, instance_slot_free
    from orchestrator.config.connections import aws_client

    ec2 = aws_client("ec2", s.aws.conn_id, s.aws.region)
    launched = adopt_run_instance(ec2, s.aws.project_tag, s.aws.deployment, plan.dag_id, plan.run_id, plan.git_sha)
    if launched is None:
        # The cap held too long (InstanceCapError) fails now: a retry would wait the whole time again.
        with fail_without_retry():
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
    return launched


def relaunch(s: Settings, plan: LaunchPlan, lost: InstanceInfo) -> LaunchedInstance:
    """After EC2 took back the run's spot instance `lost`: a new instance, with its own host key, on the launch
    options aws.recovery allows after the lost one, once the deployment has a free slot under aws.max_instances
    (waited for up to aws.instance_wait_minutes). It carries the run's tags, so teardown finds it whatever happens.
    A live instance of the run that an earlier recovery launched before its task was cleared or killed is adopted
    instead: the run never holds two, and the one already booting is not wasted."""
    from orchestrator.cloud.ec2 import adopt_run_instance, instance_slot_free
    from orchestrator.cloud.launch_spec import LaunchAttempt
    from orchestrator.config.connections import aws_client

    ec2 = aws_client("ec2", s.aws.conn_id, s.aws.region)
    left = adopt_run_instance(ec2, s.aws.project_tag, s.aws.deployment, plan.dag_id, plan.run_id, plan.git_sha)
    if left is not None and left.instance_id != lost.instance_id:
        return left
    lost_attempt = LaunchAttempt(lost.instance_type, lost.market, lost.subnet_id or "")
    started = time.monotonic()
    with fail_without_retry():
        while not instance_slot_free(
            ec2,
            s.aws.project_tag,
            s.aws.deployment,
            s.aws.max_instances,
            waited_s=time.monotonic() - started,
            timeout_s=s.aws.instance_wait_minutes * 60,
        ):
            time.sleep(max(s.instance.poll_seconds, 1.0))
        return _launch_new(s, plan, ec2, after=lost_attempt)


def _launch_new(s: Settings, plan: LaunchPlan, ec2: Any, after: LaunchAttempt | None = None) -> LaunchedInstance:
    from orchestrator.cloud.ec2 import launch_instance
    from orchestrator.cloud.hostkeys import generate_host_key, public_line_from_private
    from orchestrator.cloud.launch_spec import LaunchSpec, RunIdentity, recovery_attempts
    from orchestrator.cloud.user_data import render_user_data, spec_from_settings
    from orchestrator.config.connections import ssh_private_key

    expires_at = int(time.time()) + s.aws.max_lifetime_minutes * 60
    identity = RunIdentity(plan.dag_id, plan.run_id, plan.git_sha, expires_at, s.aws.deployment)
    host_key = generate_host_key()
    user_data = render_user_data(
        spec_from_settings(
            s,
            host_key=host_key,
            authorized_public_key=public_line_from_private(ssh_private_key(s.instance.ssh_conn_id)),
            deadline_epoch=identity.expires_at_epoch,
            mode="bake" if plan.bake else "train",
        )
    )
    spec = LaunchSpec(
        ami_id=plan.ami_id,
        instance_types=s.aws.instance_types,
        spot=s.aws.spot,
        spot_fallback_to_on_demand=s.aws.spot_fallback_to_on_demand,
        subnet_ids=s.aws.subnets,
        security_group_ids=s.aws.security_group_ids,
        public_ip=s.instance.address == "public_ip",
        instance_profile=s.aws.instance_profile or None,
        root_volume_gb=plan.root_volume_gb,
        root_device_name=plan.root_device_name,
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
        attempts=None if after is None else recovery_attempts(spec, after, cast("Recovery", s.aws.recovery)),
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


def instance_state(s: Settings, instance_id: str) -> InstanceInfo | None:
    """The instance as EC2 describes it now; None when EC2 does not know it (any more)."""
    from orchestrator.cloud.ec2_describe import describe_instance
    from orchestrator.config.connections import aws_client

    return describe_instance(aws_client("ec2", s.aws.conn_id, s.aws.region), instance_id)


def instance_gone(s: Settings, instance_id: str) -> str | None:
    """Why the run's instance can no longer answer (its state and EC2's reason, explained), or None while it may:
    asked when SSH fails, so an instance ended while nobody watched is reported as ended, not as an SSH error."""
    from orchestrator.cloud.ec2_describe import instance_gone_message

    return instance_gone_message(instance_id, instance_state(s, instance_id))


def wait_running(s: Settings, launched: LaunchedInstance) -> RunningInstance:
    """The instance runs and has its address (launch returns it running, so this is one look, bounded anyway).

    The ready wait's deadline (aws.launch_timeout_minutes + instance.ready_timeout_minutes) counts from the
    instance's launch time as EC2 records it, so a retried wait_ready keeps the first try's bound.
    """
    from orchestrator.cloud.ec2 import InstanceNotReadyError, wait_until_running
    from orchestrator.cloud.ec2_describe import describe_instance
    from orchestrator.config.connections import aws_client

    started = time.time()
    # Named here, not terminal: launch retries an instance that was lost or slow to run (InstanceLostError too).
    with fail_without_retry(InstanceNotReadyError):
        ec2 = aws_client("ec2", s.aws.conn_id, s.aws.region)
        known = describe_instance(ec2, launched.instance_id)
        launched_at = known.launch_time.timestamp() if known is not None and known.launch_time else started
        deadline = launched_at + (s.aws.launch_timeout_minutes + s.instance.ready_timeout_minutes) * 60
        info = wait_until_running(
            ec2,
            launched.instance_id,
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
    return RunningInstance(
        instance_id=info.instance_id,
        instance_type=info.instance_type,
        market=launched.market,
        address=address,
        started_at=started,
        deadline=deadline,
        seconds_to_running=round(running_s, 1),
    )


def terminate(s: Settings, dag_id: str, run_id: str, instance_ids: list[str]) -> dict[str, str]:
    """Terminate the run's instances by id and by tag; harmless to repeat; returns each one's final state."""
    from botocore.exceptions import WaiterError

    from orchestrator.cloud.ec2 import terminate_run, waiter_config
    from orchestrator.cloud.ec2_describe import describe_instance
    from orchestrator.config.connections import aws_client

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


def terminate_launched(s: Settings, context: Mapping[str, Any]) -> dict[str, str]:
    """terminate() for the DAG run of a teardown's `context`: the instance its launch step returned, if any, and
    every instance with the run's tags."""
    launched = context["ti"].xcom_pull(task_ids=LaunchedInstance.STEP)
    instance_ids = [LaunchedInstance.from_xcom(launched).instance_id] if launched else []
    return terminate(s, context["dag"].dag_id, context["run_id"], instance_ids)


def reap_expired(s: Settings) -> list[str]:
    """Terminate every instance of this deployment (aws.deployment) that outlived its expires_at tag."""
    from orchestrator.cloud.ec2 import terminate_expired
    from orchestrator.config.connections import aws_client

    ec2 = aws_client("ec2", s.aws.conn_id, s.aws.region)
    reaped = terminate_expired(ec2, s.aws.project_tag, s.aws.deployment, time.time())
    for instance_id in reaped:
        log.warning("Terminated %s: past its expires_at deadline (its DAG run did not clean it up)", instance_id)
    return reaped
