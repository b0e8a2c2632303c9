"""The embedded cloud's IAM: every request to the moto server is authorized as AWS authorizes it, against exactly the
documented policies (config/iam/*.json, rendered into docs/iam.md), for the identity whose access key signed it.

moto's own check (INITIAL_NO_AUTH_ACTION_COUNT) matches most requests against resource `*` and evaluates conditions
only in trust-policy style, so this gate, a WSGI middleware in front of moto, derives each request's action, resource
ARNs and the condition keys the policies use (EC2's per-resource RunInstances checks:
embedded.services.authorizer), and decides them with embedded.services.iam_policy. A denial has the service's own error
shape (EC2's UnauthorizedOperation, S3's and the query services' AccessDenied, JSON services' AccessDeniedException),
so the code's error handling runs as on AWS. The admin identity (the stand-in's own set-up, the tests' assertions) is
not checked; a request the gate cannot derive, from any other identity, is denied: the gate fails closed.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import secrets
import string
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote
from xml.sax.saxutils import escape

from embedded.services.authorizer import (
    ACTION_OF,
    Check,
    create_image_checks,
    image_resource_checks,
    run_instances_checks,
    terminate_checks,
)
from embedded.services.iam_policy import evaluate

# The credential scope of a SigV4 signature (Authorization header, or a presigned URL's X-Amz-Credential).
SCOPE = re.compile(r"([^/\s,=]+)/\d{8}/([a-z0-9-]+)/([a-z0-9-]+)/aws4_request")
# S3 query parameters of a plain listing or object read; any other names a sub-resource the gate does not derive.
S3_LIST_PARAMS = frozenset(
    {"list-type", "prefix", "delimiter", "continuation-token", "start-after", "max-keys", "encoding-type", "marker"}
)
S3_READ_PARAMS = frozenset({"versionId", "partNumber"})
StartResponse = Callable[..., Any]


@dataclass(frozen=True)
class Identity:
    """An IAM principal of the stand-in: its access key pair and its policy (config/iam/<policy>.json; None for the
    admin, whose requests are not checked)."""

    name: str
    access_key: str
    secret_key: str
    policy: str | None

    @classmethod
    def new(cls, name: str, policy: str | None) -> Identity:
        # Shaped like AWS's (AKIA + 16 of A-Z2-7), random per cloud so no two identities ever share a key.
        key = "AKIA" + "".join(secrets.choice(string.ascii_uppercase + "234567") for _ in range(16))
        return cls(name, key, secrets.token_urlsafe(30), policy)


class NotFound(Exception):
    """A resource the request names does not exist: AWS answers with the service's NotFound error, which moto gives."""


@dataclass(frozen=True)
class Request:
    service: str  # the signing name: ec2, s3, ssm, sqs, iam, pricing, servicequotas
    region: str
    operation: str  # the API operation (S3: the IAM action's name, derived from the REST call)
    params: dict[str, Any]


class AwsGate:
    """The WSGI middleware. `policy_of(name)` returns config/iam/<name>.json filled with the stand-in's values (read
    per request: the network's ids change when the cloud is seeded again); `lookup` reads moto's state for the
    condition keys that come from existing resources."""

    def __init__(
        self,
        app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]],
        identities: Iterable[Identity],
        policy_of: Callable[[str], Mapping[str, Any]],
        lookup: MotoLookup,
    ) -> None:
        self.app = app
        self.identities = {i.access_key: i for i in identities}
        self.policy_of = policy_of
        self.lookup = lookup

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith("/moto-api"):  # moto's own control API: no AWS service
            return self.app(environ, start_response)
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        scope = SCOPE.search(environ.get("HTTP_AUTHORIZATION", "") or unquote(query.get("X-Amz-Credential", [""])[0]))
        key, region, service = scope.groups() if scope else ("", "", _service_of_unsigned(environ))
        identity = self.identities.get(key)
        if identity is None:
            return _refuse(start_response, service, environ, "InvalidClientTokenId", "unknown", "")
        principal = f"arn:aws:iam::{self.lookup.account}:user/{identity.name}"
        if identity.policy is None:
            return self.app(environ, start_response)
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)
        request = parse_request(service, region, environ, query, body)
        try:
            checks = self.checks(request) if request else None
        except NotFound:
            return self.app(environ, start_response)
        if checks is None:
            action = f"{service}:{request.operation if request else '?'}"
            return _refuse(start_response, service, environ, "unknown action", action, principal)
        policy = self.policy_of(identity.policy)
        for action, resource, context in checks:
            decision = evaluate(policy, action, resource, context)
            if decision != "Allow":
                reason = (
                    "an explicit deny in an identity-based policy"
                    if decision == "ExplicitDeny"
                    else f"no identity-based policy allows the {action} action"
                )
                message = f"User: {principal} is not authorized to perform: {action} on resource: {resource} "
                return _refuse(start_response, service, environ, "AccessDenied", action, message + f"because {reason}")
        return self.app(environ, start_response)

    def checks(self, r: Request) -> list[Check] | None:
        """The (action, resource, condition keys) triples AWS authorizes for this request; None when the gate cannot
        derive them (the request is then denied)."""
        account, p = self.lookup.account, r.params
        action = ACTION_OF.get(f"{r.service}:{r.operation}", f"{r.service}:{r.operation}")
        if r.service == "ec2":
            if r.operation.startswith("Describe"):  # EC2's Describe actions support no resource-level permissions
                return [(action, "*", {})]
            if r.operation == "RunInstances":
                return run_instances_checks(p, region=r.region, account=account, **self.lookup.launch(r.region, p))
            if r.operation in ("TerminateInstances", "StopInstances"):
                tags = self.lookup.instance_tags(r.region, p.get("InstanceIds", []))
                return terminate_checks(tags, region=r.region, account=account, action=action)
            if r.operation == "CreateImage":
                (source,) = self.lookup.instance_tags(r.region, [p.get("InstanceId", "")]).values()
                return create_image_checks(p, source, region=r.region, account=account)
            if r.operation == "DeregisterImage":
                image_tags = {p.get("ImageId", ""): self.lookup.image_tags(r.region, p.get("ImageId", ""))}
                return image_resource_checks(action, "image", image_tags, region=r.region)
            if r.operation == "DeleteSnapshot":
                snapshot_tags = {p.get("SnapshotId", ""): self.lookup.snapshot_tags(r.region, p.get("SnapshotId", ""))}
                return image_resource_checks(action, "snapshot", snapshot_tags, region=r.region)
            return None
        if r.service == "pricing":  # the Price List API has no resources
            return [(action, "*", {})]
        if r.service == "servicequotas" and r.operation == "GetServiceQuota":
            code = f"{p.get('ServiceCode', '')}/{p.get('QuotaCode', '')}"
            return [(action, f"arn:aws:servicequotas:{r.region}:{account}:{code}", {})]
        if r.service == "ssm" and r.operation in ("GetParameter", "GetParameters", "PutParameter"):
            # Public parameters (/aws/service/...) are AWS's, with no account in their ARN.
            return [
                (action, f"arn:aws:ssm:{r.region}:{'' if n.startswith('/aws/') else account}:parameter{n}", {})
                for n in p.get("Names") or [p.get("Name", "")]
            ]
        if r.service == "iam" and r.operation == "GetInstanceProfile":
            return [(action, f"arn:aws:iam::{account}:instance-profile/{p.get('InstanceProfileName', '')}", {})]
        if r.service == "sqs" and "QueueUrl" in p:
            name = str(p["QueueUrl"]).rstrip("/").rsplit("/", 1)[-1]
            return [(action, f"arn:aws:sqs:{r.region}:{account}:{name}", {})]
        if r.service == "s3" and r.operation in ("ListBucket", "GetObject", "PutObject", "DeleteObject"):
            prefix = {"s3:prefix": p["prefix"]} if "prefix" in p else {}
            return [(action, f"arn:aws:s3:::{p['resource']}", prefix if r.operation == "ListBucket" else {})]
        return None


class MotoLookup:
    """What the gate reads from moto's state (this process's): the condition keys of existing resources."""

    def __init__(self, account: str) -> None:
        self.account = account

    def launch(self, region: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """run_instances_checks' keywords: the image's owner, the subnet's VPC, each instance profile's role."""
        from moto.ec2.models import ec2_backends
        from moto.iam.models import iam_backends
        from moto.utilities.utils import get_partition

        ec2 = ec2_backends[self.account][region]
        try:
            (image,) = ec2.describe_images(ami_ids=[request["ImageId"]])
            subnets = [ec2.get_subnet(i["SubnetId"]) for i in request.get("NetworkInterfaces", [])]
        except Exception as exc:  # moto's InvalidAMIID / InvalidSubnetID: the launch fails as on EC2
            raise NotFound from exc
        iam = iam_backends[self.account][get_partition(region)]
        roles = {p.name: p.roles[0].name for p in iam.get_instance_profiles() if p.roles}
        # A profile that does not exist passes no role EC2 could use: checked as a role of its own name, which only a
        # policy allowing that name would pass (moto would launch with it; EC2 refuses it).
        profile = request.get("IamInstanceProfile", {})
        wanted = profile.get("Name") or profile.get("Arn", "").rsplit("/", 1)[-1]
        if wanted:
            roles.setdefault(wanted, wanted)
        return {
            "image_owner": image.owner_alias or image.owner_id,
            "image_tags": _tag_dict(image.get_tags()),
            "vpc_id": subnets[0].vpc_id if subnets else "",
            "role_of_profile": roles,
        }

    def image_tags(self, region: str, image_id: str) -> dict[str, str]:
        from moto.ec2.models import ec2_backends

        try:
            (image,) = ec2_backends[self.account][region].describe_images(ami_ids=[image_id])
        except Exception as exc:  # InvalidAMIID.NotFound / Unavailable, as EC2 answers
            raise NotFound from exc
        return _tag_dict(image.get_tags())

    def snapshot_tags(self, region: str, snapshot_id: str) -> dict[str, str]:
        from moto.ec2.models import ec2_backends

        try:
            snapshot = ec2_backends[self.account][region].get_snapshot(snapshot_id)
        except Exception as exc:  # InvalidSnapshot.NotFound, as EC2 answers
            raise NotFound from exc
        return _tag_dict(snapshot.get_tags())

    def instance_tags(self, region: str, instance_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        from moto.ec2.models import ec2_backends

        ec2 = ec2_backends[self.account][region]
        try:
            instances = [ec2.get_instance(i) for i in instance_ids]
        except Exception as exc:  # InvalidInstanceID.NotFound, as EC2 answers
            raise NotFound from exc
        return {i.id: _tag_dict(i.get_tags()) for i in instances}


def _tag_dict(tags: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """moto's tag list ({"key", "value"} items) as a mapping."""
    return {t["key"]: t["value"] for t in tags}


def parse_request(
    service: str, region: str, environ: Mapping[str, Any], query: Mapping[str, list[str]], body: bytes
) -> Request | None:
    """The operation and its parameters, as the SDK sent them (query, JSON or, for S3, REST)."""
    if service == "s3":
        return _s3_request(region, environ, query)
    target = environ.get("HTTP_X_AMZ_TARGET")
    if target:
        return Request(service, region, target.rsplit(".", 1)[-1], json.loads(body or b"{}"))
    form = {k: v[0] for k, v in {**query, **parse_qs(body.decode(), keep_blank_values=True)}.items()}
    operation = form.pop("Action", "")
    if not operation:
        return None
    params: dict[str, Any] = form
    if service == "ec2":
        params = ec2_params(operation, form)
    return Request(service, region, operation, params)


def ec2_params(operation: str, form: Mapping[str, str]) -> dict[str, Any]:
    """EC2's flattened query parameters (`TagSpecification.1.Tag.1.Key`) back into boto3's shape
    (`TagSpecifications[0]["Tags"][0]["Key"]`), through botocore's model of the operation, as its EC2 serializer
    names them."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("ec2").operation_model(operation)

    def read(shape: Any, prefix: str) -> Any:
        if prefix and not any(k == prefix or k.startswith(prefix + ".") for k in form):
            return None
        if shape.type_name == "structure":
            found = {}
            for name, member in shape.members.items():
                serial = member.serialization
                wire = serial.get("queryName") or (
                    serial["name"][:1].upper() + serial["name"][1:] if "name" in serial else name
                )
                value = read(member, f"{prefix}.{wire}" if prefix else wire)
                if value is not None:
                    found[name] = value
            return found
        if shape.type_name == "list":
            items = (read(shape.member, f"{prefix}.{i}") for i in itertools.count(1))
            return list(itertools.takewhile(lambda item: item is not None, items))
        return form.get(prefix)

    return dict(read(model.input_shape, "") or {}) if model.input_shape else {}


def _s3_request(region: str, environ: Mapping[str, Any], query: Mapping[str, list[str]]) -> Request | None:
    """The IAM action of a path-style S3 call (botocore addresses an IP endpoint path-style): a listing, an object
    read, a whole-object write (PutObject) or delete (DeleteObject, no version); any other call (a sub-resource,
    a copy, a multipart upload, a bucket's creation) is left underived (denied)."""
    bucket, _, key = unquote(environ.get("PATH_INFO", "")).lstrip("/").partition("/")
    method, names = environ.get("REQUEST_METHOD", ""), set(query)
    params: dict[str, Any] = {k: v[0] for k, v in query.items()}
    if not bucket:
        return None
    if method in ("GET", "HEAD"):
        if not key and names <= S3_LIST_PARAMS:  # ListObjects(V2), and HeadBucket, which S3 authorizes as ListBucket
            return Request("s3", region, "ListBucket", {**params, "resource": bucket})
        if key and (names <= S3_READ_PARAMS or all(n.startswith("response-") for n in names - S3_READ_PARAMS)):
            return Request("s3", region, "GetObject", {**params, "resource": f"{bucket}/{key}"})
    # A copy (PUT with x-amz-copy-source) reads another object too: AWS checks both, the gate derives neither.
    plain_put = method == "PUT" and not environ.get("HTTP_X_AMZ_COPY_SOURCE")
    if key and not names and (plain_put or method == "DELETE"):
        return Request("s3", region, "PutObject" if plain_put else "DeleteObject", {"resource": f"{bucket}/{key}"})
    return None


def _service_of_unsigned(environ: Mapping[str, Any]) -> str:
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if target:
        return "json"
    return "ec2" if "Action=" in environ.get("QUERY_STRING", "") else "s3"


# The error each protocol answers an unauthorized request with: (code, HTTP status) for a denial and for a key AWS
# does not know (botocore's models and the services' error references).
DENIAL = {
    "ec2": {"AccessDenied": ("UnauthorizedOperation", 403), "InvalidClientTokenId": ("AuthFailure", 401)},
    "s3": {"AccessDenied": ("AccessDenied", 403), "InvalidClientTokenId": ("InvalidAccessKeyId", 403)},
    "query": {"AccessDenied": ("AccessDenied", 403), "InvalidClientTokenId": ("InvalidClientTokenId", 403)},
    "json": {
        "AccessDenied": ("AccessDeniedException", 400),
        "InvalidClientTokenId": ("UnrecognizedClientException", 400),
    },
}


def _refuse(
    start_response: StartResponse, service: str, environ: Mapping[str, Any], kind: str, action: str, message: str
) -> list[bytes]:
    if kind == "unknown action":
        # Fail closed: an action the gate cannot derive resources for is denied, and the message says where to add it.
        message = (
            f"the embedded cloud's gate cannot authorize {action}: "
            "derive its resources in embedded/services/aws_gate.py"
        )
        kind = "AccessDenied"
    elif kind == "InvalidClientTokenId":
        message = "The security token included in the request is invalid."
    json_protocol = bool(environ.get("HTTP_X_AMZ_TARGET"))
    protocol = service if service in ("ec2", "s3") else "json" if json_protocol else "query"
    code, status = DENIAL[protocol][kind]
    request_id = str(uuid.uuid4())
    headers = [("x-amzn-RequestId", request_id)]
    if protocol == "json":
        if service == "sqs":  # SQS's JSON protocol keeps its query error codes in this header (awsQueryCompatible)
            code, status = DENIAL["query"][kind]
            headers.append(("x-amzn-query-error", f"{code};Sender"))
            body = json.dumps({"__type": f"com.amazon.coral.service#{code}Exception", "message": message})
        else:
            body = json.dumps({"__type": code, "message": message})
        headers.append(("Content-Type", "application/x-amz-json-1.1"))
    else:
        if service == "ec2":
            if code == "UnauthorizedOperation":
                message = f"You are not authorized to perform this operation. {message}"
            error = f"<Errors><Error><Code>{code}</Code><Message>{escape(message)}</Message></Error></Errors>"
            body = f"<Response>{error}<RequestID>{request_id}</RequestID></Response>"
        elif service == "s3":
            error = f"<Code>{code}</Code><Message>{escape(message)}</Message>"
            body = f"<Error>{error}<RequestId>{request_id}</RequestId></Error>"
        else:
            error = f"<Error><Type>Sender</Type><Code>{code}</Code><Message>{escape(message)}</Message></Error>"
            body = f"<ErrorResponse>{error}<RequestId>{request_id}</RequestId></ErrorResponse>"
        body = '<?xml version="1.0" encoding="UTF-8"?>\n' + body
        headers.append(("Content-Type", "text/xml"))
    data = body.encode()
    headers.append(("Content-Length", str(len(data))))
    start_response(
        f"{status} {'Forbidden' if status == 403 else 'Unauthorized' if status == 401 else 'Bad Request'}", headers
    )
    return [data]


# Services the code calls that moto has no backend for: the Price List API (the report's on-demand price). Their
# requests fail, as against any cloud without the API, and the run is priced from the fallback table.
UNSERVED_SERVICES = frozenset({"pricing"})


def quiet_dispatcher() -> Any:
    """moto's dispatcher by host, without the hint for moto's developers it prints on this process's stdout (the
    demo's and `make ui`'s terminal) at each request for an UNSERVED_SERVICES host ("Unable to find appropriate
    backend for pricing.us-east-1.amazonaws.com. Remember to add the URL to urls.py, ..."); it answers them as
    before."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    class QuietDispatcher(DomainDispatcherApplication):
        def get_backend_for_host(self, host: str | None) -> Any:
            if host is not None and host.split(".", 1)[0] in UNSERVED_SERVICES:
                return None  # what moto returns for them, after its print
            return super().get_backend_for_host(host)

    return QuietDispatcher(create_backend_app)


class GatedMotoServer:
    """moto's server (as moto.server.ThreadedMotoServer serves it) with every request passing the gate first."""

    def __init__(self, address: str, port: int, gate: Callable[[Any], AwsGate]) -> None:
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        self.gate = gate(quiet_dispatcher())
        self._server = make_server(address, port, self.gate, threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-server", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()
