"""The cluster: cluster.yaml / cluster.local.yaml checked offline, then rehearsed end to end.

Offline (seconds): Ray's own validation (``prepare_config`` + ``validate_config``) of both
files; a security lint of the AWS config (head on demand, GPUs on every worker, nothing open to
the world but SSH, token auth on, no secrets) and of the IAM policies in ``cluster/``; Ray's
own AWS bootstrap of cluster.yaml against a moto EC2, to see the security group Ray really
creates from it.

End to end (slow, about 2-3 min): the fake-GPU rehearsal cluster of cluster.local.yaml and a
moto S3 on 127.0.0.1; the tune job's smoke sweep submitted through Ray's job-submission API
with the working tree as ``working_dir``; the autoscaler must add a fake GPU node, the trial's
record must land in the bucket, then the report job must read it back from the bucket. Every
process the rehearsal started is stopped by pid, whatever happens.
"""

from __future__ import annotations

import copy
import fnmatch
import ipaddress
import json
import importlib.util
import re
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from cifar_core import cluster as local_cluster
from tests.conftest import write_image_folder



def _script(name: str):
    """A script of cluster/ (a folder of scripts, not a package), loaded as a module."""
    path = Path(__file__).resolve().parent.parent / "cluster" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


restrict_ssh = _script("ssh_from").restrict_ssh

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO / "cluster.yaml"
LOCAL_YAML = REPO / "cluster.local.yaml"
NODE_POLICY = REPO / "cluster" / "iam-policy.json"
WORKER_POLICY = REPO / "cluster" / "iam-worker-policy.json"
HEAD_POLICY = REPO / "cluster" / "iam-head-policy.json"
TRUST_POLICY = REPO / "cluster" / "ec2-trust-policy.json"
#: Ray's GCS, dashboard/job API and Ray-client ports: never reachable from outside the cluster.
CLUSTER_PORTS = (6379, 8265, 10001)
#: GPUs of the instance types a worker may use (AWS: g5.xlarge 1x A10G, g5.12xlarge 4x A10G).
GPU_INSTANCES = {"g5.xlarge": 1, "g5.12xlarge": 4}
#: The results location cluster/iam-policy.json is written for (README: replace the bucket).
RESULTS_BUCKET, RESULTS_PREFIX = "cifar-fleet-results", "cifar-fleet"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def worker_types(config: dict) -> dict[str, dict]:
    return {name: node for name, node in config["available_node_types"].items()
            if name != config["head_node_type"]}


def is_spot(node_type: dict) -> bool:
    market = node_type["node_config"].get("InstanceMarketOptions") or {}
    return market.get("MarketType") == "spot"


# ---------------------------------------------------------------------------- Ray's validation
@pytest.mark.parametrize("path", [CLUSTER_YAML, LOCAL_YAML], ids=lambda p: p.name)
def test_ray_validates_the_config(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(path)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # raises jsonschema.ValidationError naming the bad key
    assert set(prepared["available_node_types"]) == set(config["available_node_types"])


def test_the_rehearsal_has_the_same_node_types():
    aws, local = load(CLUSTER_YAML), load(LOCAL_YAML)
    assert aws["head_node_type"] == local["head_node_type"] == "ray.head.default"
    assert set(aws["available_node_types"]) == set(local["available_node_types"])
    for name, node in aws["available_node_types"].items():
        fake = local["available_node_types"][name]
        for resource in ("CPU", "GPU"):
            assert node["resources"].get(resource, 0) == fake["resources"].get(resource, 0), \
                f"{name}: {resource} differs between cluster.yaml and cluster.local.yaml"
        assert node.get("priority", 0) == fake.get("priority", 0), f"{name}: priority differs"
    for name in worker_types(aws):
        assert worker_types(local)[name].get("min_workers", 0) == 0, f"{name}: scale from zero"


# ---------------------------------------------------------------------------- the AWS config
def test_head_is_on_demand_and_every_worker_has_gpus():
    config = load(CLUSTER_YAML)
    head = config["available_node_types"][config["head_node_type"]]
    assert not is_spot(head), "the head must not be spot: losing it loses the cluster"
    assert head["node_config"]["InstanceType"] == "m5.2xlarge"
    workers = worker_types(config)
    assert workers
    for name, node in workers.items():
        instance = node["node_config"]["InstanceType"]
        assert instance in GPU_INSTANCES, f"{name}: {instance} is not a GPU instance type"
        gpus = node["resources"].get("GPU", 0)
        assert gpus == GPU_INSTANCES[instance], \
            f"{name}: advertises {gpus} GPUs, {instance} has {GPU_INSTANCES[instance]}"
        assert node.get("min_workers", 0) == 0, f"{name}: must scale from zero"
    assert config["idle_timeout_minutes"] > 0


def test_spot_workers_have_an_on_demand_fallback_of_lower_priority():
    workers = worker_types(load(CLUSTER_YAML))
    spot = {n: w for n, w in workers.items() if is_spot(w)}
    on_demand = {n: w for n, w in workers.items() if not is_spot(w)}
    assert spot and on_demand
    for name, fallback in on_demand.items():
        same_shape = [s for s in spot.values()
                      if s["node_config"]["InstanceType"] == fallback["node_config"]["InstanceType"]]
        assert same_shape, f"{name}: no spot type of the same instance type to fall back from"
        assert all(s.get("priority", 0) > fallback.get("priority", 0) for s in same_shape), \
            f"{name}: the on-demand fallback must rank below the spot types"


def inbound_rules(config: dict) -> list[dict]:
    return list((config["provider"].get("security_group") or {}).get("IpPermissions") or [])


def opens_to_world(rule: dict) -> bool:
    cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])]
    cidrs += [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
    return any(ipaddress.ip_network(c).prefixlen == 0 for c in cidrs)


def covers_port(rule: dict, port: int) -> bool:
    if str(rule.get("IpProtocol")) == "-1":
        return True
    return rule.get("FromPort", 0) <= port <= rule.get("ToPort", 65535)


def check_rules(rules: list[dict], own_groups: set[str] = frozenset()) -> None:
    """Nothing but SSH open to the world; the cluster ports open to nobody outside it."""
    for rule in rules:
        if opens_to_world(rule):
            assert (str(rule.get("IpProtocol")), rule.get("FromPort"), rule.get("ToPort")) == \
                ("tcp", 22, 22), f"rule open to the world that is not SSH: {rule}"
        outside = rule.get("IpRanges") or rule.get("Ipv6Ranges") or [
            pair for pair in rule.get("UserIdGroupPairs", []) if pair["GroupId"] not in own_groups]
        for port in CLUSTER_PORTS:
            assert not (outside and covers_port(rule, port)), f"rule opens port {port}: {rule}"


def test_security_group_rules_open_nothing_but_ssh():
    config = load(CLUSTER_YAML)
    check_rules(inbound_rules(config))
    for name, node in config["available_node_types"].items():
        assert "SecurityGroupIds" not in node["node_config"], \
            f"{name}: a hand-picked security group escapes this check; use provider.security_group"


def test_dashboard_stays_on_localhost_and_token_auth_is_on():
    config = load(CLUSTER_YAML)
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start + worker_start
    assert "RAY_AUTH_MODE=token ray start --head" in head_start
    assert "RAY_AUTH_MODE=token ray start --address" in worker_start
    assert any("export RAY_AUTH_MODE=token" in c for c in config["initialization_commands"])
    mounts = config["file_mounts"]
    assert mounts.get("/home/ubuntu/.ray/auth_token") == "~/.ray/auth_token", \
        "every node needs the cluster's token (Ray docs: file_mounts of ~/.ray/auth_token)"


def test_setup_installs_this_project_with_its_cuda_extra():
    config = load(CLUSTER_YAML)
    assert config["file_mounts"].get("/home/ubuntu/cifar-fleet") == "."
    assert any('cifar-fleet[cuda]"' in c for c in config["worker_setup_commands"])
    assert any("cifar-fleet" in c for c in config["head_setup_commands"])
    assert ".gitignore" in config["rsync_filter"]
    assert {".data", ".venv"} <= set(config["rsync_exclude"])  # CI unpacks CIFAR-10 to .data/


SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"aws_secret_access_key|SecretAccessKey", re.I),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "Ray token value": re.compile(r"RAY_AUTH_TOKEN\s*[=:]"),
    "hex token": re.compile(r"\b[0-9a-f]{64}\b"),
    "AWS account id": re.compile(r"arn:aws:[a-z0-9-]+:[a-z0-9-]*:\d{12}:"),
}


def test_no_secrets_in_the_cluster_files():
    files = [CLUSTER_YAML, LOCAL_YAML, *sorted((REPO / "cluster").iterdir())]
    for path in files:
        text = path.read_text()
        for what, pattern in SECRET_PATTERNS.items():
            assert not pattern.search(text), f"{path.name}: looks like it holds a {what}"


# ---------------------------------------------------------------------------- IAM
def statements(path: Path) -> list[dict]:
    policy = json.loads(path.read_text())
    assert policy["Version"] == "2012-10-17"
    return policy["Statement"]


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _condition_holds(condition: dict, context: dict) -> bool:
    """IAM condition operators these policies use; keys AND together, values OR."""
    for operator, tests in condition.items():
        for key, values in tests.items():
            present, value = key in context, context.get(key)
            values = as_list(values)
            if operator == "StringEquals":
                ok = present and value in values
            elif operator == "StringNotEquals":
                ok = not present or value not in values  # AWS: a missing key passes
            elif operator == "StringLike":
                ok = present and any(fnmatch.fnmatchcase(value, v) for v in values)
            elif operator == "Null":
                ok = (not present) == (values == ["true"])
            else:
                raise AssertionError(f"operator {operator} is not modelled by this check")
            if not ok:
                return False
    return True


def iam_allows(policies: list[Path], action: str, resource: str, **context) -> bool:
    """IAM's evaluation for one request: an explicit Deny wins, else any Allow, else deny."""
    allowed = False
    for path in policies:
        for statement in statements(path):
            if not any(fnmatch.fnmatch(action.lower(), a.lower())
                       for a in as_list(statement["Action"])):
                continue
            if not any(fnmatch.fnmatchcase(resource, r) for r in as_list(statement["Resource"])):
                continue
            if not _condition_holds(statement.get("Condition", {}), context):
                continue
            if statement["Effect"] == "Deny":
                return False
            allowed = True
    return allowed


BUCKET = f"arn:aws:s3:::{RESULTS_BUCKET}"
OURS = f"{BUCKET}/{RESULTS_PREFIX}"
WORKER = [NODE_POLICY, WORKER_POLICY]
HEAD = [NODE_POLICY, HEAD_POLICY]
INSTANCE = "arn:aws:ec2:us-east-1:111122223333:instance/i-0abc"
LAUNCH = {"aws:RequestedRegion": "us-east-1", "aws:RequestTag/ray-cluster-name": "cifar-fleet",
          "ec2:InstanceType": "g5.xlarge"}

#: (role, action, resource, request context, allowed?): what the cluster's roles may do.
IAM_CASES = [
    ("worker", "s3:GetObject", f"{OURS}/runs/ladder/trials/M1-x/trial.json", {}, True),
    ("worker", "s3:PutObject", f"{OURS}/runs/ladder/trials/M1-x/trial.json", {}, True),
    ("worker", "s3:DeleteObject", f"{OURS}/runs/ladder/M1-x_1/checkpoint_000001/x", {}, True),
    ("worker", "s3:ListBucket", BUCKET, {"s3:prefix": "cifar-fleet/runs/"}, True),
    ("worker", "s3:ListBucket", BUCKET, {}, False),                      # the whole bucket
    ("worker", "s3:ListBucket", BUCKET, {"s3:prefix": "other-team/"}, False),
    ("worker", "s3:GetObject", f"{BUCKET}/other-team/secret", {}, False),
    ("worker", "s3:PutObject", f"{OURS}/published/manifest.json", {}, False),
    ("worker", "s3:DeleteObject", f"{OURS}/published/manifest.json", {}, False),
    ("worker", "s3:GetObject", f"{OURS}/published/manifest.json", {}, True),
    ("worker", "ec2:RunInstances", INSTANCE, LAUNCH, False),
    ("head", "s3:PutObject", f"{OURS}/published/manifest.json", {}, True),
    ("head", "s3:DeleteObject", f"{OURS}/published/manifest.json", {}, False),
    ("head", "s3:PutBucketPolicy", BUCKET, {}, False),
    ("head", "ec2:RunInstances", INSTANCE, LAUNCH, True),
    ("head", "ec2:RunInstances", INSTANCE, {**LAUNCH, "ec2:InstanceType": "p4d.24xlarge"},
     False),
    ("head", "ec2:RunInstances", INSTANCE,                              # untagged: unkillable
     {k: v for k, v in LAUNCH.items() if "RequestTag" not in k}, False),
    ("head", "ec2:RunInstances", INSTANCE.replace("us-east-1", "eu-west-1"), LAUNCH, False),
    ("head", "ec2:RunInstances", "arn:aws:ec2:us-east-1::image/ami-1", {"ec2:Owner": "amazon"},
     True),
    ("head", "ec2:RunInstances", "arn:aws:ec2:us-east-1::image/ami-1",
     {"ec2:Owner": "444455556666"}, False),                             # anyone's AMI
    ("head", "ec2:RunInstances", "arn:aws:ec2:us-east-1:1:security-group/sg-1",
     {"ec2:ResourceTag/ray-cluster-name": "cifar-fleet"}, True),
    ("head", "ec2:RunInstances", "arn:aws:ec2:us-east-1:1:security-group/sg-2", {}, False),
    ("head", "ec2:TerminateInstances", INSTANCE,
     {"ec2:ResourceTag/ray-cluster-name": "cifar-fleet"}, True),
    ("head", "ec2:TerminateInstances", INSTANCE, {"ec2:ResourceTag/ray-cluster-name": "x"},
     False),
    ("head", "ec2:CreateTags", INSTANCE, {"ec2:CreateAction": "RunInstances"}, True),
    ("head", "ec2:CreateTags", INSTANCE, {}, False),                     # retag someone's
    ("head", "iam:PassRole", "arn:aws:iam::1:role/cifar-fleet-node",
     {"iam:PassedToService": "ec2.amazonaws.com"}, True),
    ("head", "iam:PassRole", "arn:aws:iam::1:role/cifar-fleet-node",
     {"iam:PassedToService": "lambda.amazonaws.com"}, False),
    ("head", "iam:PassRole", "arn:aws:iam::1:role/cifar-fleet-head",
     {"iam:PassedToService": "ec2.amazonaws.com"}, False),
    ("head", "iam:CreateUser", "arn:aws:iam::1:user/x", {}, False),
]


@pytest.mark.parametrize("role, action, resource, context, expected", IAM_CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(IAM_CASES)])
def test_iam_policies_allow_exactly_what_the_cluster_needs(role, action, resource, context,
                                                           expected):
    policies = WORKER if role == "worker" else HEAD
    assert iam_allows(policies, action, resource, **context) is expected


def test_policies_name_the_clusters_own_names():
    config = load(CLUSTER_YAML)
    name, region = config["cluster_name"], config["provider"]["region"]
    profiles = {w["node_config"]["IamInstanceProfile"]["Name"]
                for w in worker_types(config).values()}
    assert profiles == {"cifar-fleet-node"}
    text = HEAD_POLICY.read_text()
    assert f'ray-cluster-name": "{name}"' in text and region in text
    launched = {w["node_config"]["InstanceType"] for w in worker_types(config).values()}
    allowed = next(s for s in statements(HEAD_POLICY)
                   if s["Sid"] == "LaunchOnlyTaggedWorkersOfTheWorkerTypes")
    assert set(allowed["Condition"]["StringEquals"]["ec2:InstanceType"]) == launched


def test_iam_roles_and_profiles_can_be_created_from_the_repo_json(moto_endpoint, monkeypatch):
    """The README's `aws iam` steps, against moto (which rejects malformed policy documents)."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    iam = boto3.client("iam", region_name="us-east-1")
    for role, policies in (("cifar-fleet-node", WORKER), ("cifar-fleet-head", HEAD)):
        iam.create_role(RoleName=role, AssumeRolePolicyDocument=TRUST_POLICY.read_text())
        for policy in policies:
            iam.put_role_policy(RoleName=role, PolicyName=policy.stem,
                                PolicyDocument=policy.read_text())
        iam.create_instance_profile(InstanceProfileName=role)
        iam.add_role_to_instance_profile(InstanceProfileName=role, RoleName=role)
    config = load(CLUSTER_YAML)
    for node in config["available_node_types"].values():
        profile = node["node_config"]["IamInstanceProfile"]["Name"]
        roles = iam.get_instance_profile(InstanceProfileName=profile)["InstanceProfile"]["Roles"]
        assert [r["RoleName"] for r in roles] == [profile]


def test_ray_aws_bootstrap_creates_a_group_open_only_to_ssh(moto_endpoint, monkeypatch, tmp_path):
    """Ray's own bootstrap of cluster.yaml (what `ray up` does first) against a moto EC2."""
    import boto3
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.aws.utils import client_cache, resource_cache
    from ray.autoscaler._private.util import prepare_config

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("HOME", str(tmp_path))  # Ray writes the new SSH key to ~/.ssh
    client_cache.cache_clear()
    resource_cache.cache_clear()
    config = bootstrap_aws(prepare_config(load(CLUSTER_YAML)))
    groups = {gid for node in config["available_node_types"].values()
              for gid in node["node_config"]["SecurityGroupIds"]}
    assert len(groups) == 1
    ec2 = boto3.client("ec2", region_name="us-east-1")
    (group,) = ec2.describe_security_groups(GroupIds=sorted(groups))["SecurityGroups"]
    assert group["GroupName"] == "cifar-fleet-sg"
    rules = group["IpPermissions"]
    check_rules(rules, own_groups=groups)
    world = [r for r in rules if opens_to_world(r)]
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in world] == [("tcp", 22, 22)]
    assert (tmp_path / ".ssh").is_dir()  # the SSH key went to the (redirected) home only

    # cluster/ssh_from.py: SSH from one address, in one command; a later `ray up` keeps it.
    (group_id,) = groups
    assert restrict_ssh("203.0.113.7/32", "us-east-1", "cifar-fleet-sg", "cifar-fleet",
                        ec2) == group_id
    bootstrap_aws(prepare_config(load(CLUSTER_YAML)))
    (group,) = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    assert not [r for r in group["IpPermissions"] if opens_to_world(r)], group["IpPermissions"]
    check_rules(group["IpPermissions"], own_groups=groups)
    assert any(r.get("IpRanges") == [{"CidrIp": "203.0.113.7/32"}] for r in group["IpPermissions"])


def test_ssh_from_one_address_before_the_first_ray_up(moto_endpoint, monkeypatch, tmp_path):
    """Run before `ray up`: the group Ray then uses has no world-open rule at all."""
    import boto3
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.aws.utils import client_cache, resource_cache
    from ray.autoscaler._private.util import prepare_config

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("HOME", str(tmp_path))
    client_cache.cache_clear()
    resource_cache.cache_clear()
    ec2 = boto3.client("ec2", region_name="us-east-1")
    for group in ec2.describe_security_groups(Filters=[
            {"Name": "group-name", "Values": ["cifar-fleet-sg"]}])["SecurityGroups"]:
        ec2.delete_security_group(GroupId=group["GroupId"])  # a fresh account's state
    with pytest.raises(ValueError, match="whole internet"):
        restrict_ssh("0.0.0.0/0", "us-east-1", "cifar-fleet-sg", "cifar-fleet", ec2)
    group_id = restrict_ssh("198.51.100.0/24", "us-east-1", "cifar-fleet-sg", "cifar-fleet",
                            ec2)
    config = bootstrap_aws(prepare_config(load(CLUSTER_YAML)))
    used = {gid for node in config["available_node_types"].values()
            for gid in node["node_config"]["SecurityGroupIds"]}
    assert used == {group_id}
    (group,) = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    assert not [r for r in group["IpPermissions"] if opens_to_world(r)]
    check_rules(group["IpPermissions"], own_groups={group_id})
    tags = {t["Key"]: t["Value"] for t in group.get("Tags", [])}
    assert tags.get("ray-cluster-name") == "cifar-fleet"  # the head policy's launch condition


# ---------------------------------------------------------------------------- end to end
def wait_for_job(client, job_id: str, timeout_s: float) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(2)
    client.stop_job(job_id)
    return "TIMED OUT"


def get_json(url: str, headers: dict) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_rehearsal_tune_then_report_on_fake_gpu_cluster(s3_bucket, tmp_path, monkeypatch):
    """Submit the tune smoke sweep and the report to the fake-GPU cluster; results via S3."""
    import os

    from ray.job_submission import JobSubmissionClient

    from cifar_core import storage
    from cifar_core.provenance import git_commit
    from cifar_core.records import TrialRecord

    root = f"s3://{s3_bucket}/{RESULTS_PREFIX}"
    data_uri, runs_uri = f"{root}/data/images", f"{root}/runs"
    storage.upload_tree(write_image_folder(tmp_path / "images"), data_uri)
    # The README's runtime_env.yaml (working tree minus .rayignore's list; no commit passed:
    # provenance must find it in the shipped .git/HEAD), plus, for moto only, the endpoint
    # and dummy credentials (AWS nodes use their instance profile).
    runtime_env = load(REPO / "runtime_env.yaml")
    # docs/cluster.md's one export: .rayignore, not Ray's default list, decides about .git.
    monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", ".venv,venv,__pycache__")
    runtime_env["working_dir"] = str(REPO)
    runtime_env["env_vars"].update({
        "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"], "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"})

    rehearsal = local_cluster.start_local_cluster(LOCAL_YAML)
    try:
        client = JobSubmissionClient(rehearsal.address, headers=rehearsal.auth_headers())
        tune = client.submit_job(
            entrypoint=f"python -m jobs.tune --smoke-test --models M1 --use-gpu "
                       f"--storage {runs_uri} --name rehearsal --data {data_uri}",
            runtime_env=runtime_env)
        status = wait_for_job(client, tune, timeout_s=420)
        assert status == "SUCCEEDED", f"tune job {status}:\n{client.get_job_logs(tune)[-5000:]}"

        nodes = get_json(f"{rehearsal.address}/api/v0/nodes?detail=1&limit=100",
                         rehearsal.auth_headers())["data"]["result"]["result"]
        gpu_nodes = [n for n in nodes if n["resources_total"].get("GPU", 0) >= 1]
        assert gpu_nodes, f"the autoscaler added no GPU node: {nodes}"

        records = storage.find_files(f"{runs_uri}/rehearsal", "trial.json")
        assert len(records) == 1, f"expected one trial record in {runs_uri}: {records}"
        record = TrialRecord.from_json(storage.read_text(records[0]))
        assert record.status == "completed" and record.model == "M1"
        assert record.resources.get("GPU", 0) > 0, record.resources
        assert record.provenance["git_commit"] == git_commit().removesuffix("-dirty")

        report_dir = tmp_path / "report"
        report = client.submit_job(
            entrypoint=f"python -m jobs.report --runs {runs_uri} --out {report_dir} "
                       f"--publish {root}/published",
            runtime_env=runtime_env)
        status = wait_for_job(client, report, timeout_s=240)
        assert status == "SUCCEEDED", f"report job {status}:\n{client.get_job_logs(report)}"
        assert (report_dir / "leaderboard.csv").is_file()
        assert storage.exists(f"{root}/published/manifest.json")
    finally:
        stopped = local_cluster.stop_local_cluster(rehearsal, remove_files=True)
    assert stopped, "stop found no processes of the rehearsal cluster"
    assert not local_cluster._alive(rehearsal)


def test_rehearsal_state_is_private_and_fresh(tmp_path, monkeypatch):
    """The rehearsal's token is never written through a link a neighbour planted in its
    folder (O_EXCL | O_NOFOLLOW), and stop/env with no cluster known say so."""
    from cifar_core.cluster import start_local_cluster

    planted = tmp_path / "planted"
    planted.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("not yours")
    (planted / "auth_token").symlink_to(victim)
    with pytest.raises(FileExistsError):  # refused before any Ray process starts
        start_local_cluster(temp_dir=planted, timeout_s=1)
    assert victim.read_text() == "not yours"
    monkeypatch.setenv("CIFAR_FLEET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CIFAR_FLEET_REHEARSAL_DIR", raising=False)
    assert local_cluster.main(["stop"]) == 2  # no fixed /tmp folder to guess at


def test_job_packaging_ships_the_code_and_the_commit_but_not_data_or_history(tmp_path):
    """runtime_env.yaml + .rayignore: what `ray job submit --runtime-env runtime_env.yaml`
    uploads, by Ray's own matcher; and the commit read back from the shipped files alone."""
    import shutil

    from ray._private.thirdparty.pathspec import PathSpec

    from cifar_core import KERAS_ENV_VARS
    from cifar_core.provenance import commit_from_files, git_commit

    env = load(REPO / "runtime_env.yaml")
    assert env["working_dir"] == "." and KERAS_ENV_VARS.items() <= env["env_vars"].items()
    assert env["env_vars"]["AWS_DEFAULT_REGION"] == load(CLUSTER_YAML)["provider"]["region"]
    spec = PathSpec.from_lines("gitwildmatch", (REPO / ".rayignore").read_text().splitlines())
    for path in (".data/cifar10", ".venv/bin/python", "runs/x", "results/runs/x",
                 ".git/objects", ".git/index", ".git/logs"):
        assert spec.match_file(path), path
    for path in ("cifar_core/train.py", "jobs/tune.py", "results/report.md", ".git/HEAD",
                 ".git/refs", ".git/refs/heads/main", ".git/packed-refs"):
        assert not spec.match_file(path), path
    # A shipped copy: .git/HEAD and refs only (what .rayignore keeps), no git program needed.
    git = REPO / ".git"
    shipped = tmp_path / ".git"
    shipped.mkdir()
    shutil.copy(git / "HEAD", shipped / "HEAD")
    if (git / "refs").is_dir():
        shutil.copytree(git / "refs", shipped / "refs")
    if (git / "packed-refs").exists():
        shutil.copy(git / "packed-refs", shipped / "packed-refs")
    assert commit_from_files(shipped) == git_commit().removesuffix("-dirty")
    (shipped / "HEAD").write_text("0123abc\n")  # detached
    assert commit_from_files(shipped) == "0123abc"
    assert commit_from_files(tmp_path / "nothing") is None
