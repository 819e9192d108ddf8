"""Allow SSH to the cluster from one network only, in one command that `ray up` keeps.

    python cluster/ssh_from.py 203.0.113.7/32          # your address (curl -s ifconfig.me)

Ray creates the cluster's security group (cluster.yaml: provider.security_group.GroupName)
with SSH open to 0.0.0.0/0, but only when the group has no rules yet: a group that already
has rules is used as it is. So this script, run before the first `ray up` (or any time
after), makes the group hold exactly: all traffic between the cluster's own nodes, and
tcp/22 from CIDR. It creates the group in the default VPC if needed, tagged with the
cluster's name (the head's IAM policy launches only into such a group), and otherwise
replaces any world-open SSH rule. AWS credentials and region come from the usual AWS sources
(``--region`` overrides); ``AWS_ENDPOINT_URL`` points it at a test endpoint.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

import boto3
import yaml

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"
WORLD = ("0.0.0.0/0", "::/0")


def restrict_ssh(cidr: str, region: str, group_name: str, cluster_name: str, ec2=None) -> str:
    """Make ``group_name`` allow SSH from ``cidr`` only (plus the cluster's own traffic);
    return its id."""
    network = ipaddress.ip_network(cidr, strict=True)
    if network.prefixlen == 0:
        raise ValueError(f"{cidr}: that is the whole internet; give your own address or range")
    ec2 = ec2 or boto3.client("ec2", region_name=region)
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]
    found = ec2.describe_security_groups(Filters=[
        {"Name": "group-name", "Values": [group_name]},
        {"Name": "vpc-id", "Values": [vpc["VpcId"]]}])["SecurityGroups"]
    if found:
        group_id = found[0]["GroupId"]
        for rule in found[0]["IpPermissions"]:
            ranges = [r for r in rule.get("IpRanges", []) if r["CidrIp"] in WORLD]
            ranges6 = [r for r in rule.get("Ipv6Ranges", []) if r["CidrIpv6"] in WORLD]
            if ranges or ranges6:
                ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=[{
                    "IpProtocol": rule["IpProtocol"], "FromPort": rule.get("FromPort"),
                    "ToPort": rule.get("ToPort"), "IpRanges": ranges, "Ipv6Ranges": ranges6}])
    else:
        group_id = ec2.create_security_group(
            GroupName=group_name, Description=f"Ray cluster {cluster_name}: SSH from {cidr}",
            VpcId=vpc["VpcId"], TagSpecifications=[{"ResourceType": "security-group", "Tags": [
                {"Key": "ray-cluster-name", "Value": cluster_name}]}])["GroupId"]
        ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[{
            "IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id}]}])
    key = "Ipv6Ranges" if network.version == 6 else "IpRanges"
    field = "CidrIpv6" if network.version == 6 else "CidrIp"
    try:
        ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[{
            "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, key: [{field: str(network)}]}])
    except ec2.exceptions.ClientError as error:
        if "Duplicate" not in str(error):
            raise
    return group_id


def main(argv: list[str] | None = None) -> int:
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cidr", help="The network SSH may come from, e.g. 203.0.113.7/32.")
    parser.add_argument("--region", default=config["provider"]["region"])
    parser.add_argument("--group", default=config["provider"]["security_group"]["GroupName"])
    args = parser.parse_args(argv)
    try:
        group_id = restrict_ssh(args.cidr, args.region, args.group, config["cluster_name"])
    except ValueError as error:
        print(f"ssh_from: error: {error}", file=sys.stderr)
        return 2
    print(f"{args.group} ({group_id}): SSH from {args.cidr} only; `ray up` keeps these rules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
