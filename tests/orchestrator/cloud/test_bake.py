"""orchestrator.cloud.bake on a strict moto: the image a bake makes, records and prunes, and the image a training
boots (the baked one only when it holds what the current bootstrap installs)."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest

from orchestrator.config.settings import Settings, load_settings
from orchestrator.contracts import (
    TAG_BASE,
    TAG_BOOTSTRAP_DIGEST,
    TAG_DEPLOYMENT,
    TAG_MLFLOW_VERSION,
    TAG_PROJECT,
    TAG_SOURCE_IMAGE,
)
from tests.support.aws_cloud import PROFILE, REGION, SSH_PORT, StrictAws, http_errors, strict_aws
from tests.support.zone import machine_zone

BAKE_DAG = "ec2_bake_image"


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Any:
    # Airflow configures logging on its first import, which drops caplog's handler: import it before a test's caplog.
    import airflow  # noqa: F401

    with strict_aws(monkeypatch) as aws:
        conn = {"conn_type": "aws", "login": "testing", "password": "testing", "extra": {"region_name": REGION}}
        monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(conn))
        yield aws


def settings_for(cloud: StrictAws, deployment: str = "bake-test", **env: str) -> Settings:
    return load_settings(
        env={
            "TRAINER__AWS__DEPLOYMENT": deployment,
            "TRAINER__AWS__REGION": REGION,
            "TRAINER__AWS__SUBNET_ID": cloud.network.subnet_id,
            "TRAINER__AWS__SECURITY_GROUP_IDS": cloud.network.security_group_id,
            "TRAINER__AWS__INSTANCE_PROFILE": PROFILE,
            "TRAINER__INSTANCE__SSH_PORT": str(SSH_PORT),
            "TRAINER__TRAINING__DATA_URI": "synthetic://",
            **env,
        }
    )


@pytest.fixture
def settings(cloud: StrictAws) -> Settings:
    return settings_for(cloud)


def bake(cloud: StrictAws, s: Settings, run_id: str) -> Any:
    """One bake's steps without Airflow: the plan, a builder with the run's tags (what launch makes), its image."""
    from orchestrator.cloud.bake import BUILDER_COMMIT, make_image
    from orchestrator.cloud.launch_spec import run_scope_tags
    from orchestrator.cloud.tasks import plan_launch

    plan = plan_launch(s, BUILDER_COMMIT, BAKE_DAG, run_id, bake=True)
    tags = run_scope_tags(s.aws.project_tag, s.aws.deployment, BAKE_DAG, run_id)
    builder = cloud.ec2.run_instances(
        ImageId=plan.ami_id,
        MinCount=1,
        MaxCount=1,
        InstanceType="g6.xlarge",
        BlockDeviceMappings=[{"DeviceName": plan.root_device_name, "Ebs": {"VolumeSize": plan.root_volume_gb}}],
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )["Instances"][0]["InstanceId"]
    return plan, builder, make_image(s, plan, builder)


def image(cloud: StrictAws, image_id: str) -> dict[str, Any]:
    (found,) = cloud.ec2.describe_images(ImageIds=[image_id])["Images"]
    return dict(found)


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def baked_images(cloud: StrictAws) -> list[Any]:
    """Every deployment's baked images (the stand-in images are listed as the account's own by moto)."""
    from orchestrator.cloud.bake import BakedImage

    found = cloud.ec2.describe_images(Owners=["self"], Filters=[{"Name": "tag-key", "Values": [TAG_BOOTSTRAP_DIGEST]}])
    return [BakedImage.from_description(i) for i in found["Images"]]


def recorded(cloud: StrictAws, deployment: str = "bake-test") -> str:
    return str(cloud.ssm.get_parameter(Name=f"/ec2-trainer/{deployment}/baked-image")["Parameter"]["Value"])


def test_a_bake_stops_its_builder_and_records_a_tagged_image_of_it(
    cloud: StrictAws, settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.cloud import bake as bake_module
    from orchestrator.cloud.bake import make_image
    from orchestrator.cloud.user_data import settings_digest

    waits: list[float] = []
    wait = bake_module.wait_image_available

    def recorded_wait(ec2: Any, image_id: str, timeout_s: float, poll_s: float) -> None:
        waits.append(timeout_s)
        wait(ec2, image_id, timeout_s, poll_s)

    monkeypatch.setattr(bake_module, "wait_image_available", recorded_wait)
    # Another instance of the account keeps running: the bake waits for its builder only.
    other = cloud.ec2.run_instances(ImageId=cloud.images[settings.aws.ami_ssm_parameter], MinCount=1, MaxCount=1)
    with caplog.at_level(logging.INFO, logger="orchestrator.cloud.bake"):
        plan, builder, baked = bake(cloud, settings, "manual__1")
    (running,) = cloud.ec2.describe_instances(InstanceIds=[other["Instances"][0]["InstanceId"]])["Reservations"]
    assert running["Instances"][0]["State"]["Name"] == "running"
    # The image wait is bounded by bake.image_wait_minutes.
    assert waits == [settings.bake.image_wait_minutes * 60]
    assert plan.bake and plan.ami_id == cloud.images[settings.aws.ami_ssm_parameter]
    state = cloud.ec2.describe_instances(InstanceIds=[builder])["Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state == "stopped"
    made = image(cloud, baked.image_id)
    assert made["State"] == "available"
    tags = tags_of(made)
    assert tags[TAG_SOURCE_IMAGE] == plan.ami_id
    assert tags[TAG_BASE] == settings.aws.ami_ssm_parameter
    assert tags[TAG_BOOTSTRAP_DIGEST] == baked.digest == settings_digest(settings)
    assert tags[TAG_MLFLOW_VERSION] == "3.17.2"
    assert (tags[TAG_PROJECT], tags[TAG_DEPLOYMENT]) == ("ec2-trainer", "bake-test")
    # As EC2 makes it: the base image's root device, a snapshot of the builder's root volume, tagged alike.
    (root,) = made["BlockDeviceMappings"]
    assert (root["DeviceName"], root["Ebs"]["VolumeSize"]) == (plan.root_device_name, plan.root_volume_gb)
    (snapshot,) = cloud.ec2.describe_snapshots(SnapshotIds=list(baked.snapshot_ids))["Snapshots"]
    assert tags_of(snapshot)[TAG_BOOTSTRAP_DIGEST] == baked.digest
    assert recorded(cloud) == baked.image_id
    parameter = cloud.ssm.get_parameter(Name="/ec2-trainer/bake-test/baked-image")["Parameter"]
    assert parameter["Type"] == "String"
    assert re.fullmatch(r"ec2-trainer-bake-test-baked-\d{10}", made["Name"])
    assert made["Description"] == f"{plan.ami_id} with the bootstrap {baked.digest[:12]} baked in"
    assert f"Creating {baked.image_id} ({made['Name']}) from {builder} (base image {plan.ami_id})" in caplog.text
    assert (
        f"Recorded {baked.image_id} in /ec2-trainer/bake-test/baked-image: trainings whose bootstrap digest is "
        f"{baked.digest} boot it" in caplog.text
    )
    # A retry of the step finds the image its run made: no second one.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="orchestrator.cloud.bake"):
        assert make_image(settings, plan, builder).image_id == baked.image_id
    assert f"Found {baked.image_id}, created by an earlier try of this run" in caplog.text
    assert [i.image_id for i in baked_images(cloud)] == [baked.image_id]


def test_the_image_tags_say_when_it_was_baked_in_utc_whatever_the_machine_zone(
    cloud: StrictAws, settings: Settings
) -> None:
    from orchestrator.cloud.bake import BUILDER_COMMIT, create_image_request, image_tags
    from orchestrator.cloud.tasks import plan_launch
    from orchestrator.contracts import TAG_BAKED_AT, TAG_DAG_ID, TAG_RUN_ID

    plan = plan_launch(settings, BUILDER_COMMIT, BAKE_DAG, "manual__1", bake=True)
    digest = "d" * 64
    with machine_zone("America/New_York"):
        tags = image_tags(settings, plan, digest, "3.17.2", 1_800_000_000.25)
        request = create_image_request(settings, plan, "i-0123456789abcdef0", digest, "3.17.2", 1_800_000_000.25)
    assert tags == {
        TAG_PROJECT: "ec2-trainer",
        TAG_DEPLOYMENT: "bake-test",
        TAG_DAG_ID: BAKE_DAG,
        TAG_RUN_ID: "manual__1",
        TAG_SOURCE_IMAGE: plan.ami_id,
        TAG_BASE: settings.aws.ami_ssm_parameter,
        TAG_BOOTSTRAP_DIGEST: digest,
        TAG_MLFLOW_VERSION: "3.17.2",
        TAG_BAKED_AT: "2027-01-15T08:00:00.250000Z",
    }
    listed = [{"Key": k, "Value": v} for k, v in tags.items()]
    assert request == {
        "InstanceId": "i-0123456789abcdef0",
        "Name": "ec2-trainer-bake-test-baked-1800000000",
        "Description": f"{plan.ami_id} with the bootstrap dddddddddddd baked in",
        "TagSpecifications": [{"ResourceType": "image", "Tags": listed}, {"ResourceType": "snapshot", "Tags": listed}],
    }


def test_an_image_is_read_from_its_description_without_optional_fields() -> None:
    from orchestrator.cloud.bake import BakedImage

    described = {
        "ImageId": "ami-1",
        "CreationDate": "2026-12-01T00:00:00.000Z",
        "BlockDeviceMappings": [
            {"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": "snap-1", "VolumeSize": 60}},
            {"DeviceName": "/dev/sdb", "VirtualName": "ephemeral0"},
        ],
    }
    # No tags (an image tagged after its creation, or by hand): EC2's creation date orders it.
    assert BakedImage.from_description(described) == BakedImage("ami-1", "2026-12-01T00:00:00.000Z", "", ("snap-1",))
    assert BakedImage.from_description({"ImageId": "ami-2"}) == BakedImage("ami-2", "", "", ())


@pytest.mark.parametrize("action", ["StopInstances", "CreateImage"])
def test_a_refused_bake_call_is_terminal_and_records_nothing(
    action: str, cloud: StrictAws, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.cloud.bake import BakeDeniedError

    refused = http_errors(monkeypatch, action, "UnauthorizedOperation", 403)
    with pytest.raises(BakeDeniedError, match=rf"ec2:{action} was refused \(UnauthorizedOperation") as raised:
        bake(cloud, settings, "manual__1")
    # Refused once, not retried by botocore; terminal, so make_image fails without Airflow's retries.
    assert refused == [403] and raised.value.terminal
    assert "config/iam/airflow.json" in str(raised.value)
    assert baked_images(cloud) == []
    assert cloud.ssm.get_parameters(Names=["/ec2-trainer/bake-test/baked-image"])["Parameters"] == []


def test_a_refused_record_is_terminal_and_leaves_the_parameter_as_it_was(
    cloud: StrictAws, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto.ssm.exceptions import AccessDeniedException
    from moto.ssm.models import SimpleSystemManagerBackend

    from orchestrator.cloud.bake import BakeDeniedError

    _, _, first = bake(cloud, settings, "manual__1")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AccessDeniedException("User: airflow is not authorized to perform: ssm:PutParameter")

    monkeypatch.setattr(SimpleSystemManagerBackend, "put_parameter", refuse)
    with pytest.raises(BakeDeniedError, match=r"ssm:PutParameter was refused \(AccessDeniedException") as raised:
        bake(cloud, settings, "manual__2")
    assert raised.value.terminal
    # The new image stays unrecorded (prune deregisters it in its turn); trainings keep booting the first.
    assert recorded(cloud) == first.image_id
    assert len(baked_images(cloud)) == 2


def test_the_image_wait_is_bounded(cloud: StrictAws, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.cloud.bake import BakeError, wait_image_available

    _, _, baked = bake(cloud, settings, "manual__1")
    from moto.ec2.models import ec2_backends

    amis = ec2_backends["123456789012"][REGION].amis
    # Another image still pending (a second bake, another deployment's) does not hold up the wait for ours.
    _, _, other = bake(cloud, settings_for(cloud, "staging"), "manual__2")
    amis[other.image_id].state = "pending"
    wait_image_available(cloud.ec2, baked.image_id, 2, 1)
    amis[baked.image_id].state = "pending"
    with pytest.raises(BakeError, match="not available after 2 s"):
        wait_image_available(cloud.ec2, baked.image_id, 2, 1)


def test_a_training_boots_the_baked_image_only_while_it_holds_the_current_bootstrap(
    cloud: StrictAws, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    from orchestrator.cloud.bake import training_image
    from orchestrator.cloud.tasks import plan_launch

    base = cloud.images[settings.aws.ami_ssm_parameter]
    with caplog.at_level(logging.INFO, logger="orchestrator.cloud.bake"):
        assert plan_launch(settings, "a" * 40, "ec2_training", "manual__t0").ami_id == base
    assert "Booting the base image, not a baked one: no baked image is recorded in" in caplog.text
    _, _, baked = bake(cloud, settings, "manual__1")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="orchestrator.cloud.bake"):
        planned = plan_launch(settings, "a" * 40, "ec2_training", "manual__t1")
    assert planned.ami_id == baked.image_id and not planned.bake
    assert (
        f"Booting the baked image {baked.image_id} (/ec2-trainer/bake-test/baked-image): it holds what this "
        "bootstrap installs" in caplog.text
    )
    # Another bootstrap (a setting it renders changed): the base image, and why.
    changed = settings_for(cloud, **{"TRAINER__INSTANCE__PYTHON_BIN": "/usr/bin/python3"})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="orchestrator.cloud.bake"):
        assert plan_launch(changed, "a" * 40, "ec2_training", "manual__t2").ami_id == base
    assert f"{baked.image_id} was baked by bootstrap {baked.digest[:12]}, the current one is" in caplog.text
    # Another base configured (another OS, say): its own image, not one baked from the old base.
    other_base = next(p for p in cloud.images if p != settings.aws.ami_ssm_parameter)
    switched = settings_for(cloud, **{"TRAINER__AWS__AMI_SSM_PARAMETER": other_base})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="orchestrator.cloud.bake"):
        assert plan_launch(switched, "a" * 40, "ec2_training", "manual__t5").ami_id == cloud.images[other_base]
    assert f"{baked.image_id} was baked from {settings.aws.ami_ssm_parameter}, the base is now {other_base}" in (
        caplog.text
    )
    # An explicit image wins; bake.use = false never looks.
    explicit = settings_for(cloud, **{"TRAINER__AWS__AMI_ID": base})
    assert plan_launch(explicit, "a" * 40, "ec2_training", "manual__t3").ami_id == base
    assert training_image(explicit, cloud.ec2, cloud.ssm) == (base, "aws.ami_id")
    off = settings_for(cloud, **{"TRAINER__BAKE__USE": "false"})
    assert plan_launch(off, "a" * 40, "ec2_training", "manual__t4").ami_id == base


def test_a_baked_image_of_another_deployment_or_gone_is_not_booted(cloud: StrictAws, settings: Settings) -> None:
    from moto.ec2.models import ec2_backends

    from orchestrator.cloud.bake import training_image, usable_baked_image
    from orchestrator.cloud.user_data import settings_digest

    def why_not(deployment: str) -> str:
        parameter = f"/ec2-trainer/{deployment}/baked-image"
        base = settings.aws.ami_ssm_parameter
        image, why = usable_baked_image(cloud.ec2, cloud.ssm, parameter, "ec2-trainer", deployment, digest, base)
        assert image is None
        return why

    _, _, theirs = bake(cloud, settings_for(cloud, "staging"), "manual__1")
    base = cloud.images[settings.aws.ami_ssm_parameter]
    digest = settings_digest(settings)
    # Our parameter pointed at their image (a copy-paste, a restore): refused by its tags, whatever its digest.
    assert digest == theirs.digest
    cloud.ssm.put_parameter(Name="/ec2-trainer/bake-test/baked-image", Value=theirs.image_id, Type="String")
    assert training_image(settings, cloud.ec2, cloud.ssm) == (base, "aws.ami_ssm_parameter")
    assert why_not("bake-test").startswith(f"{theirs.image_id} in /ec2-trainer/bake-test/baked-image is not tagged")
    # Theirs while it is still pending, then once deregistered (EC2 no longer knows the id).
    ec2_backends["123456789012"][REGION].amis[theirs.image_id].state = "pending"
    assert (
        why_not("staging") == f"/ec2-trainer/staging/baked-image names {theirs.image_id}, which is pending (bake again)"
    )
    ec2_backends["123456789012"][REGION].amis[theirs.image_id].state = "available"
    cloud.ec2.deregister_image(ImageId=theirs.image_id)
    assert why_not("staging") == f"/ec2-trainer/staging/baked-image names {theirs.image_id}, which is gone (bake again)"
    staging = settings_for(cloud, "staging")
    assert training_image(staging, cloud.ec2, cloud.ssm) == (base, "aws.ami_ssm_parameter")
    # An id EC2 never knew (a typo in the parameter): InvalidAMIID.NotFound, not an empty answer.
    unknown = "ami-0123456789abcdef0"
    cloud.ssm.put_parameter(Name="/ec2-trainer/staging/baked-image", Value=unknown, Type="String", Overwrite=True)
    assert why_not("staging") == f"/ec2-trainer/staging/baked-image names {unknown}, which is gone (bake again)"
    cloud.ssm.delete_parameter(Name="/ec2-trainer/staging/baked-image")
    assert why_not("staging").startswith("no baked image is recorded in /ec2-trainer/staging/baked-image")


def test_a_baked_image_missing_its_base_or_digest_tag_is_not_booted(cloud: StrictAws, settings: Settings) -> None:
    from orchestrator.cloud.bake import usable_baked_image
    from orchestrator.cloud.user_data import settings_digest

    _, _, baked = bake(cloud, settings, "manual__1")
    parameter, base, digest = (
        "/ec2-trainer/bake-test/baked-image",
        settings.aws.ami_ssm_parameter,
        settings_digest(settings),
    )

    def usable() -> tuple[str | None, str]:
        return usable_baked_image(cloud.ec2, cloud.ssm, parameter, "ec2-trainer", "bake-test", digest, base)

    assert usable() == (baked.image_id, "")
    cloud.ec2.delete_tags(Resources=[baked.image_id], Tags=[{"Key": TAG_BOOTSTRAP_DIGEST}])
    assert usable() == (
        None,
        f"{baked.image_id} was baked by bootstrap (none), the current one is {digest[:12]} (userdata/bootstrap.sh "
        "or the instance settings changed since): run ec2_bake_image again",
    )
    cloud.ec2.delete_tags(Resources=[baked.image_id], Tags=[{"Key": TAG_BASE}])
    assert usable() == (
        None,
        f"{baked.image_id} was baked from (unknown), the base is now {base} (aws.ami_ssm_parameter or aws.ami_id "
        "changed): run ec2_bake_image again",
    )


def test_only_this_accounts_images_are_listed_for_pruning(cloud: StrictAws, settings: Settings) -> None:
    from orchestrator.cloud.bake import baked_images as listed

    requests: list[dict[str, Any]] = []
    cloud.ec2.meta.events.register(
        "provide-client-params.ec2.DescribeImages", lambda params, **_: requests.append(dict(params))
    )
    assert listed(cloud.ec2, "ec2-trainer", "bake-test") == []
    assert [r["Owners"] for r in requests] == [["self"]]


def test_a_third_bake_prunes_the_oldest_image_and_its_snapshots_only(cloud: StrictAws, settings: Settings) -> None:
    from orchestrator.cloud.bake import prune

    _, _, other = bake(cloud, settings_for(cloud, "staging"), "manual__0")
    baked = [bake(cloud, settings, f"manual__{n}")[2] for n in (1, 2)]
    assert prune(settings) == []
    baked.append(bake(cloud, settings, "manual__3")[2])
    assert recorded(cloud) == baked[2].image_id
    assert prune(settings) == [baked[0].image_id]
    left = {i.image_id for i in baked_images(cloud)}
    assert left == {other.image_id, baked[1].image_id, baked[2].image_id}
    snapshots = {s["SnapshotId"] for s in cloud.ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
    assert not set(baked[0].snapshot_ids) & snapshots
    assert set(baked[1].snapshot_ids) | set(other.snapshot_ids) <= snapshots
    # Pruning again changes nothing.
    assert prune(settings) == []


def test_the_recorded_image_is_kept_whatever_its_age(cloud: StrictAws, settings: Settings) -> None:
    from orchestrator.cloud.bake import prune

    baked = [bake(cloud, settings, f"manual__{n}")[2] for n in (1, 2, 3)]
    cloud.ssm.put_parameter(
        Name="/ec2-trainer/bake-test/baked-image", Value=baked[0].image_id, Type="String", Overwrite=True
    )
    one = settings_for(cloud, **{"TRAINER__BAKE__KEEP": "1"})
    assert prune(one) == [baked[1].image_id]


def test_prune_passes_over_the_recorded_image_and_goes_on(cloud: StrictAws, settings: Settings) -> None:
    from orchestrator.cloud.bake import prune

    baked = [bake(cloud, settings, f"manual__{n}")[2] for n in (1, 2, 3, 4)]
    cloud.ssm.put_parameter(
        Name="/ec2-trainer/bake-test/baked-image", Value=baked[2].image_id, Type="String", Overwrite=True
    )
    one = settings_for(cloud, **{"TRAINER__BAKE__KEEP": "1"})
    assert prune(one) == [baked[1].image_id, baked[0].image_id]


def test_prune_without_a_recorded_image_keeps_the_newest(cloud: StrictAws, settings: Settings) -> None:
    from orchestrator.cloud.bake import prune

    baked = [bake(cloud, settings, f"manual__{n}")[2] for n in (1, 2)]
    cloud.ssm.delete_parameter(Name="/ec2-trainer/bake-test/baked-image")
    one = settings_for(cloud, **{"TRAINER__BAKE__KEEP": "1"})
    assert prune(one) == [baked[0].image_id]


def test_a_bake_runs_on_demand_and_its_schedule_is_read_with_the_watch_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A one-time spot instance cannot be stopped to be imaged: the bake's config asks for on-demand whatever
    aws.spot says. Its schedule is read, as the retrain DAG's, from the sections its DAG file parses."""
    from orchestrator.cloud.bake import bake_config
    from orchestrator.config.resolve import settings_of
    from orchestrator.config.settings import load_watch_settings

    monkeypatch.setenv("TRAINER__AWS__DEPLOYMENT", "bake-test")
    monkeypatch.setenv("TRAINER__AWS__SPOT", "true")
    assert settings_of(bake_config()).aws.spot is False
    assert load_watch_settings(env={"TRAINER__BAKE__SCHEDULE": "0 3 * * 1"}).bake.schedule == "0 3 * * 1"
    assert load_watch_settings(env={}).bake.schedule == ""


def test_the_strict_cloud_images_only_a_running_or_stopped_instance(cloud: StrictAws, settings: Settings) -> None:
    """As EC2: a terminated builder cannot be imaged (moto would image it)."""
    from botocore.exceptions import ClientError

    _, builder, _ = bake(cloud, settings, "manual__1")
    cloud.ec2.terminate_instances(InstanceIds=[builder])
    with pytest.raises(ClientError, match="IncorrectInstanceState"):
        cloud.ec2.create_image(InstanceId=builder, Name="too-late")


def test_the_strict_cloud_checks_a_parameters_type_as_ssm_does(cloud: StrictAws) -> None:
    """As SSM: Type is one of its three, Overwrite or not, and a new parameter needs one (moto checks neither with
    Overwrite)."""
    from botocore.exceptions import ClientError

    name = "/ec2-trainer/bake-test/baked-image"
    with pytest.raises(ClientError, match="failed to satisfy constraint: Member must satisfy enum value set"):
        cloud.ssm.put_parameter(Name=name, Value="ami-1", Type="string", Overwrite=True)
    with pytest.raises(ClientError, match="A parameter type is required when you create a parameter"):
        cloud.ssm.put_parameter(Name=name, Value="ami-1", Overwrite=True)
    cloud.ssm.put_parameter(Name=name, Value="ami-1", Type="String", Overwrite=True)
    cloud.ssm.put_parameter(Name=name, Value="ami-2", Overwrite=True)
    assert cloud.ssm.get_parameter(Name=name)["Parameter"]["Value"] == "ami-2"
