"""The deployment files, checked here since they cannot be deployed from this machine:
deploy/shardlake.yaml passes cfn-lint; the worker's, the console's and the objects worker's
task roles grant exactly the actions their code calls, each on the resources it touches; each
task runs a pipeline whose variables it sets; uploads reach the objects worker's queue only
from the stack's bucket, and the queue's redrive comes after the worker's own give-up; the
console is reached only through its HTTPS load balancer and signs users in through the stack's
user pool; and the Dockerfile copies files that exist, builds with the lock file as it is, and
runs commands the binary accepts.

Exercises no Rust module at run time: deploy/shardlake.yaml and the Dockerfile are checked
against the SDK calls in src/source/kinesis/, src/source/objects/queue.rs,
src/checkpoint/dynamodb/, src/sink/s3.rs, src/notify.rs and src/console/, against the
object_store calls in src/source/objects/ and src/checkpoint/s3.rs, against the console's
routes and acknowledgement keys, and against the subcommands of src/bin/shardlake.rs.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from harness import REPO, check_run

TEMPLATE = REPO / "deploy" / "shardlake.yaml"
DOCKERFILE = REPO / "Dockerfile"

# Which service each source file's SDK client talks to: the worker's (TaskRole) ...
CLIENT_FILES = {
    "src/source/kinesis/api.rs": "kinesis",
    "src/source/kinesis/fanout.rs": "kinesis",
    "src/checkpoint/dynamodb/manager.rs": "dynamodb",
    "src/checkpoint/dynamodb/store.rs": "dynamodb",
    "src/sink/s3.rs": "s3",
    "src/notify.rs": "sns",
}
# ... and the console's (`shardlake console`, a service of its own with ConsoleTaskRole): the
# lease-table scan that finds the workers, and the acknowledgements beside the lake. (The
# console reads the lake's tables through object_store, not the SDK: GetObject and ListBucket,
# which the acknowledgements need as well.)
CONSOLE_CLIENT_FILES = {
    "src/console/workers.rs": "dynamodb",
    "src/console/acks.rs": "s3",
}
# Files whose SDK calls never run in an ECS task: `shardlake bridge` stands in for the IoT
# rule on one machine (in AWS the rule's own role puts the records), and the agent runs on
# the devices.
NOT_IN_THE_TASK = {"src/tools/bridge.rs", "src/agent/transport/kinesis.rs"}
# ... and the objects worker's (`shardlake run` on pipelines/well-uploads-aws.yaml, a service
# of its own with ObjectsTaskRole, deployed when UploadsPrefix is set): the queue the uploads
# bucket's event notifications go to, and the lake. (Its pipeline has no notifier and keeps its
# checkpoints in S3, so neither SNS nor DynamoDB.)
OBJECTS_CLIENT_FILES = {
    "src/source/objects/queue.rs": "sqs",
    "src/sink/s3.rs": "s3",
}
# The objects themselves and the objects worker's checkpoint object are read and written
# through object_store, not the SDK: the files that call it (`store.<op>(...)`), and the IAM
# action of each call.
OBJECT_STORE_FILES = ["src/source/objects/mod.rs", "src/source/objects/queue.rs",
                      "src/source/objects/read.rs", "src/checkpoint/s3.rs"]
STORE_ACTION_OF = {
    "head": ["s3:GetObject"],
    "get": ["s3:GetObject"],
    "get_opts": ["s3:GetObject"],
    "list": ["s3:ListBucket"],
    "put_opts": ["s3:PutObject"],
}
# SDK operations whose IAM action is not named after them.
ACTION_OF = {
    ("s3", "head_bucket"): ["s3:ListBucket"],
    ("s3", "head_object"): ["s3:GetObject"],
    ("s3", "create_multipart_upload"): ["s3:PutObject"],
    ("s3", "upload_part"): ["s3:PutObject"],
    ("s3", "complete_multipart_upload"): ["s3:PutObject"],
    ("s3", "list_multipart_uploads"): ["s3:ListBucketMultipartUploads"],
    ("s3", "list_objects_v2"): ["s3:ListBucket"],
    # The transaction holds only Update items (each needs UpdateItem on the table).
    ("dynamodb", "transact_write_items"): ["dynamodb:UpdateItem"],
}


TENANTS = ("acme", "borealis")


def _for_each(node, name: str, value: str):
    """`node` with the loop variable `name` replaced, as AWS::LanguageExtensions does:
    `{Ref: name}`, `${name}` in Fn::Sub strings and `&{name}` in keys."""
    if isinstance(node, dict):
        if node == {"Ref": name}:
            return value
        return {k.replace(f"&{{{name}}}", value): _for_each(v, name, value)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_for_each(v, name, value) for v in node]
    if isinstance(node, str):
        return node.replace(f"${{{name}}}", value)
    return node


def template(tenants=TENANTS) -> dict:
    """The template as CloudFormation sees it after its transform, with `Tenants` set to
    `tenants`: each Fn::ForEach loop expanded into its resources."""
    t = yaml.safe_load(TEMPLATE.read_text())
    resources = {}
    for key, value in t["Resources"].items():
        if key.startswith("Fn::ForEach::"):
            name, over, body = value
            assert over == {"Ref": "Tenants"}, over
            for tenant in tenants:
                resources.update(_for_each(body, name, tenant))
        else:
            resources[key] = value
    t["Resources"] = resources
    return t


def test_cfn_lint_passes():
    # cfn-lint comes with moto[server]; its script sits next to this interpreter.
    cfn_lint = Path(sys.executable).with_name("cfn-lint")
    proc = subprocess.run([str(cfn_lint), str(TEMPLATE)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def sdk_calls() -> dict[str, set[str]]:
    """Every SDK operation the code calls, by source file: `client.<op>()`, also when the
    builder chain breaks the line after `client`."""
    calls: dict[str, set[str]] = {}
    for path in sorted((REPO / "src").rglob("*.rs")):
        ops = set(re.findall(r"\bclient\s*\.\s*([a-z0-9_]+)\(\)", path.read_text())) - {"clone"}
        if ops:
            calls[str(path.relative_to(REPO))] = ops
    return calls


def resources() -> dict:
    return template()["Resources"]


def needed_actions(files: dict[str, str], calls: dict[str, set[str]]) -> set[str]:
    needed = set()
    for file, service in files.items():
        for op in calls.get(file, set()):
            needed |= set(ACTION_OF.get((service, op), [
                f"{service}:{''.join(w.title() for w in op.split('_'))}"]))
    return needed


# Granted only when the stack's FanOutConsumer is set (condition FanOut).
FAN_OUT_ONLY = {"kinesis:DescribeStreamSummary", "kinesis:RegisterStreamConsumer",
                "kinesis:DescribeStreamConsumer", "kinesis:SubscribeToShard"}


def statements(role_name: str, conditions: frozenset = frozenset({"FanOut"})) -> list[dict]:
    """The role's statements, each checked to allow named actions on named resources; a
    statement under `Fn::If` counts when its condition is in `conditions`."""
    role = resources()[role_name]["Properties"]
    assert "ManagedPolicyArns" not in role, f"{role_name}: a managed policy grants what no test sees"
    out = []
    for policy in role["Policies"]:
        for st in policy["PolicyDocument"]["Statement"]:
            if "Fn::If" in st:
                cond, yes, no = st["Fn::If"]
                assert no == {"Ref": "AWS::NoValue"}, st
                if cond not in conditions:
                    continue
                st = yes
            assert st["Effect"] == "Allow", st
            assert not {"NotAction", "NotResource"} & set(st), st
            assert st["Resource"] != "*", f"{st['Sid']}: not scoped to a resource"
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            assert not any("*" in a for a in actions), st
            out.append(st)
    return out


def granted_actions(role_name: str) -> set[str]:
    granted = set()
    for st in statements(role_name):
        granted |= set(st["Action"] if isinstance(st["Action"], list) else [st["Action"]])
    return granted


def test_every_file_with_sdk_calls_is_mapped():
    unknown = (set(sdk_calls()) - set(CLIENT_FILES) - set(CONSOLE_CLIENT_FILES)
               - set(OBJECTS_CLIENT_FILES) - NOT_IN_THE_TASK)
    assert not unknown, f"SDK calls in files this test does not map to a service: {unknown}"
    # The queue is the objects worker's alone.
    queue = needed_actions({"src/source/objects/queue.rs": "sqs"}, sdk_calls())
    assert queue, "the objects worker's SQS calls are found"
    for role in ("TaskRole", "ConsoleTaskRole"):
        assert not queue & granted_actions(role), (role, sorted(queue & granted_actions(role)))


def test_task_role_grants_exactly_what_the_code_calls():
    needed = needed_actions(CLIENT_FILES, sdk_calls())
    granted = granted_actions("TaskRole")
    assert granted - needed == set(), f"granted but never called: {sorted(granted - needed)}"
    assert needed - granted == set(), f"called but not granted: {sorted(needed - granted)}"
    # The ones a worker cannot do without, so the mapping above stays honest.
    assert {"kinesis:GetRecords", "dynamodb:UpdateItem", "s3:PutObject", "sns:Publish"} <= needed
    # Without a fan-out consumer, none of the consumer actions.
    polling = set()
    for st in statements("TaskRole", conditions=frozenset()):
        polling |= set(st["Action"] if isinstance(st["Action"], list) else [st["Action"]])
    assert polling == granted - FAN_OUT_ONLY, sorted(granted - polling)
    assert FAN_OUT_ONLY <= needed
    subscribe = next(st for st in statements("TaskRole") if "kinesis:SubscribeToShard" in st["Action"])
    assert subscribe["Resource"] == {"Fn::Sub": "${Stream.Arn}/consumer/${FanOutConsumer}:*"}


def test_the_worker_may_delete_the_snapshots_of_the_pipeline_it_runs_and_nothing_else():
    """The one delete a worker makes is of a replaced detector snapshot, under
    `<lake prefix>/<STATE_OUTPUT>/`: the grant must cover that key for the pipeline the task
    runs (it once named `lake/_state/*`, which the AWS pipeline's `lake/well-telemetry`
    prefix never writes), and no data file."""
    import fnmatch
    pipeline = pipeline_doc(pipeline_of("TaskDefinition"))
    prefix = pipeline["lake"]["s3"]["prefix"]
    deletes = [st for st in statements("TaskRole") if "s3:DeleteObject" in (
        st["Action"] if isinstance(st["Action"], list) else [st["Action"]])]
    assert len(deletes) == 1, deletes
    pattern = deletes[0]["Resource"]["Fn::Sub"].replace("${LakeBucket.Arn}/", "")
    snapshot = f"{prefix}/{state_output()}/{pipeline['name']}/shardId-000000000000/state-1-w0-0000.json.zst"
    assert fnmatch.fnmatchcase(snapshot, pattern), (pattern, snapshot)
    for data in (f"{prefix}/well_telemetry_raw/year=2026/month=12/day=07/hour=05/part.parquet",
                 f"{prefix}/well_telemetry_well_1m/year=2026/month=12/day=07/hour=05/p.parquet"):
        assert not fnmatch.fnmatchcase(data, pattern), (pattern, data)


def acks_key_prefix() -> str:
    """Where the console keeps acknowledgements in the AWS pipeline's lake:
    `<lake.s3.prefix>/<ACKS_PREFIX>/` (src/console/acks.rs; the alerts output has no sink of
    its own there)."""
    code = (REPO / "src" / "console" / "acks.rs").read_text()
    acks = re.search(r'pub const ACKS_PREFIX: &str = "([^"]+)";', code).group(1)
    assert re.search(r"prefix: loc\.object_key\(ACKS_PREFIX\)", code), \
        "the acknowledgements' key layout changed; check ConsoleTaskRole's KeepAcknowledgements"
    pipeline = pipeline_doc(pipeline_of("ConsoleTaskDefinition"))
    assert "sink" not in pipeline["outputs"].get("alerts", {})
    return f"{pipeline['lake']['s3']['prefix']}/{acks}/"


def test_console_task_role_grants_exactly_what_the_console_calls():
    needed = needed_actions(CONSOLE_CLIENT_FILES, sdk_calls())
    assert {"dynamodb:Scan", "s3:PutObject", "s3:GetObject", "s3:ListBucket"} <= needed, needed
    granted = granted_actions("ConsoleTaskRole")
    assert granted - needed == set(), f"granted but never called: {sorted(granted - needed)}"
    assert needed - granted == set(), f"called but not granted: {sorted(needed - granted)}"
    # And on nothing beyond what the console touches: one statement per action, each on
    # exactly these resources.
    acks = acks_key_prefix()
    assert acks.startswith("lake/"), acks  # read back and listed under lake/ (below)
    expected = {
        "dynamodb:Scan": ({"Fn::GetAtt": ["LeaseTable", "Arn"]}, None),
        "s3:ListBucket": ({"Fn::GetAtt": ["LakeBucket", "Arn"]},
                          {"StringLike": {"s3:prefix": ["lake/*"]}}),
        "s3:GetObject": ({"Fn::Sub": "${LakeBucket.Arn}/lake/*"}, None),
        "s3:PutObject": ({"Fn::Sub": f"${{LakeBucket.Arn}}/{acks}*"}, None),
    }
    got = {}
    for st in statements("ConsoleTaskRole"):
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        for a in actions:
            assert a not in got, f"{a} granted twice"
            got[a] = (st["Resource"], st.get("Condition"))
    assert got == expected
    # Each task runs with its own role.
    assert resources()["ConsoleTaskDefinition"]["Properties"]["TaskRoleArn"] == \
        {"Fn::GetAtt": ["ConsoleTaskRole", "Arn"]}
    assert resources()["TaskDefinition"]["Properties"]["TaskRoleArn"] == \
        {"Fn::GetAtt": ["TaskRole", "Arn"]}


def container_of(task_definition: str) -> dict:
    containers = resources()[task_definition]["Properties"]["ContainerDefinitions"]
    assert len(containers) == 1, containers
    return containers[0]


def env_of(task_definition: str) -> dict:
    """The container's environment, its secrets included (by name, with where they come
    from)."""
    c = container_of(task_definition)
    env = {e["Name"]: e["Value"] for e in c.get("Environment", [])}
    for s in c.get("Secrets", []):
        assert s["Name"] not in env, f"{s['Name']} set twice"
        env[s["Name"]] = {"secret": s["ValueFrom"]}
    return env


def pipeline_of(task_definition: str) -> Path:
    command = container_of(task_definition)["Command"]
    baked = Path(command[1])
    assert baked.parts[:3] == ("/", "etc", "shardlake"), command
    pipeline = REPO.joinpath(*baked.parts[3:])
    assert pipeline.is_file(), f"{baked} is not a file of the repository copied into the image"
    return pipeline


def pipeline_text(pipeline: Path) -> str:
    # A variable in a comment is not read.
    return "\n".join(line for line in pipeline.read_text().splitlines()
                     if not line.lstrip().startswith("#"))


def pipeline_doc(pipeline: Path) -> dict:
    return yaml.safe_load(pipeline_text(pipeline))


def variables(node) -> set[str]:
    if isinstance(node, dict):
        return set().union(set(), *(variables(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(set(), *(variables(v) for v in node))
    return set(re.findall(r"\$\{([A-Z0-9_]+)", node)) if isinstance(node, str) else set()


def test_each_task_sets_the_variables_its_part_of_the_pipeline_reads():
    pipeline = pipeline_of("TaskDefinition")
    assert pipeline_of("ConsoleTaskDefinition") == pipeline
    assert container_of("TaskDefinition")["Command"][0] == "run"
    assert container_of("ConsoleTaskDefinition")["Command"][0] == "console"
    doc = pipeline_doc(pipeline)
    text = pipeline_text(pipeline)
    assert variables(doc) == set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    console = variables(doc.get("console", {}))
    assert {"CONSOLE_USER_POOL_ID", "CONSOLE_CLIENT_ID", "CONSOLE_CLIENT_SECRET",
            "CONSOLE_DOMAIN", "CONSOLE_URL"} <= console, console
    # The workers read everything but the console section ...
    worker_reads = variables({k: v for k, v in doc.items() if k != "console"})
    worker_env = set(env_of("TaskDefinition"))
    assert worker_reads and worker_reads <= worker_env, \
        f"the pipeline reads {sorted(worker_reads - worker_env)} which the worker's task does not set"
    # ... and load the console section too, with its defaults.
    for var in variables(doc) - worker_env:
        assert re.search(r"\$\{" + var + r":-[^}]+\}", text), \
            f"{var}: the worker's task does not set it and the pipeline gives no default"
    # The console reads its section, and the lake and lease table it shows.
    console_reads = console | variables(doc["lake"]) | variables(doc["checkpoints"])
    console_env = env_of("ConsoleTaskDefinition")
    assert console_reads <= set(console_env), \
        f"the pipeline reads {sorted(console_reads - set(console_env))} which the console's task does not set"
    assert {k for k, v in console_env.items() if isinstance(v, dict) and "secret" in v} == \
        {"CONSOLE_CLIENT_SECRET"}


def test_the_task_runs_a_pipeline_that_validates(shardlake_bin):
    container = container_of("TaskDefinition")
    check_run([str(shardlake_bin), "validate", str(pipeline_of("TaskDefinition"))])
    check_run([str(shardlake_bin), "console", "--help"])
    health = container["HealthCheck"]["Command"]
    assert health[:2] == ["CMD", "/usr/local/bin/shardlake"] and health[2:] == ["health"]
    assert container["StopTimeout"] == 30 and {"Name": "SHARDLAKE_SHUTDOWN_BUDGET", "Value": "25"} \
        in container["Environment"]


def rules_into(group: str, inline_key: str, resource_type: str) -> list[dict]:
    """Every rule of a security group in one direction: inline and as resources of their own."""
    res = resources()
    rules = list(res[group]["Properties"].get(inline_key, []))
    rules += [r["Properties"] for r in res.values() if r["Type"] == resource_type
              and r["Properties"]["GroupId"] == {"Ref": group}]
    return rules


def test_the_console_is_reached_only_through_its_load_balancer():
    res = resources()
    ingress = rules_into("ConsoleSecurityGroup", "SecurityGroupIngress",
                         "AWS::EC2::SecurityGroupIngress")
    assert ingress, "nothing may reach the console"
    for rule in ingress:
        assert {k: rule[k] for k in ("IpProtocol", "FromPort", "ToPort")} == \
            {"IpProtocol": "tcp", "FromPort": 8080, "ToPort": 8080}, rule
        assert rule.get("SourceSecurityGroupId") == {"Ref": "ConsoleLoadBalancerSecurityGroup"}, rule
        assert not {"CidrIp", "CidrIpv6", "SourcePrefixListId"} & set(rule), rule
    # The console listens where its rule and its target group say.
    listen = env_of("ConsoleTaskDefinition")["SHARDLAKE_CONSOLE_LISTEN"]
    assert listen == "0.0.0.0:8080"
    assert container_of("ConsoleTaskDefinition")["PortMappings"][0]["ContainerPort"] == 8080
    assert res["ConsoleTargetGroup"]["Properties"]["Port"] == 8080
    # Out: HTTPS (AWS APIs, the Cognito domain) and the workers' live state.
    egress = rules_into("ConsoleSecurityGroup", "SecurityGroupEgress", "AWS::EC2::SecurityGroupEgress")
    assert sorted((r["FromPort"], r.get("CidrIp"), str(r.get("DestinationSecurityGroupId")))
                  for r in egress) == [
        (443, "0.0.0.0/0", "None"), (9090, None, str({"Ref": "WorkerSecurityGroup"}))]
    # The load balancer: 443 and 80 from ConsoleCidr, out only to the console.
    lb_in = rules_into("ConsoleLoadBalancerSecurityGroup", "SecurityGroupIngress",
                       "AWS::EC2::SecurityGroupIngress")
    assert sorted((r["FromPort"], r["ToPort"]) for r in lb_in) == [(80, 80), (443, 443)]
    assert all(r["CidrIp"] == {"Ref": "ConsoleCidr"} for r in lb_in), lb_in
    lb_out = rules_into("ConsoleLoadBalancerSecurityGroup", "SecurityGroupEgress",
                        "AWS::EC2::SecurityGroupEgress")
    assert [(r["FromPort"], r["ToPort"], r.get("DestinationSecurityGroupId")) for r in lb_out] == \
        [(8080, 8080, {"Ref": "ConsoleSecurityGroup"})]
    lb = res["ConsoleLoadBalancer"]["Properties"]
    assert lb["Scheme"] == "internet-facing" and lb["Subnets"] == {"Ref": "PublicSubnets"}
    # The workers: only the console, only on their --listen port.
    worker_in = rules_into("WorkerSecurityGroup", "SecurityGroupIngress",
                           "AWS::EC2::SecurityGroupIngress")
    assert [(r["FromPort"], r["ToPort"], r.get("SourceSecurityGroupId"), set(r) & {"CidrIp", "CidrIpv6"})
            for r in worker_in] == [(9090, 9090, {"Ref": "ConsoleSecurityGroup"}, set())]
    assert env_of("TaskDefinition")["SHARDLAKE_LISTEN"].endswith(":9090")
    # The service runs in the tasks' subnets with the console's group, behind the target group.
    svc = res["ConsoleService"]["Properties"]
    assert svc["NetworkConfiguration"]["AwsvpcConfiguration"]["SecurityGroups"] == \
        [{"Ref": "ConsoleSecurityGroup"}]
    assert svc["LoadBalancers"] == [{"ContainerName": "console", "ContainerPort": 8080,
                                     "TargetGroupArn": {"Ref": "ConsoleTargetGroup"}}]


def listeners() -> dict[int, dict]:
    out = {}
    for r in resources().values():
        if r["Type"] == "AWS::ElasticLoadBalancingV2::Listener":
            p = r["Properties"]
            assert p["LoadBalancerArn"] == {"Ref": "ConsoleLoadBalancer"}
            assert p["Port"] not in out
            out[p["Port"]] = p
    return out


def test_port_80_only_redirects_to_https():
    by_port = listeners()
    assert sorted(by_port) == [80, 443]
    http = by_port[80]
    assert http["Protocol"] == "HTTP"
    assert len(http["DefaultActions"]) == 1
    action = http["DefaultActions"][0]
    assert action["Type"] == "redirect" and set(action) == {"Type", "RedirectConfig"}, action
    redirect = action["RedirectConfig"]
    assert redirect["Protocol"] == "HTTPS" and redirect["Port"] == "443"
    assert redirect["StatusCode"] in ("HTTP_301", "HTTP_302")
    # No rule on it forwards anything anywhere.
    assert not [r for r in resources().values()
                if r["Type"] == "AWS::ElasticLoadBalancingV2::ListenerRule"]


def test_https_listener_uses_the_certificate_parameter_and_forwards_to_the_console():
    t = template()
    https = listeners()[443]
    assert https["Protocol"] == "HTTPS"
    assert https["Certificates"] == [{"CertificateArn": {"Ref": "CertificateArn"}}]
    assert "CertificateArn" in t["Parameters"]
    assert https["SslPolicy"].startswith("ELBSecurityPolicy-TLS13-"), https["SslPolicy"]
    assert https["DefaultActions"] == [{"Type": "forward",
                                        "TargetGroupArn": {"Ref": "ConsoleTargetGroup"}}]
    # The health check asks for a page the console serves without sign-in.
    tg = t["Resources"]["ConsoleTargetGroup"]["Properties"]
    path = tg["HealthCheckPath"]
    router = (REPO / "src" / "console" / "mod.rs").read_text()
    route = re.search(r'\.route\(\s*"' + re.escape(path) + r'",\s*get\(page\(', router)
    assert route, f"{path} is not a static page of the console's router"
    assert tg["Matcher"] == {"HttpCode": "200"}


def test_user_pool_has_the_tenant_attribute_and_the_console_groups():
    res = resources()
    doc = pipeline_doc(pipeline_of("ConsoleTaskDefinition"))["console"]
    pool = res["ConsoleUserPool"]["Properties"]
    tenant = [a for a in pool["Schema"] if f"custom:{a['Name']}" == doc["claims"]["tenant"]]
    assert doc["claims"]["tenant"] == "custom:tenant"
    assert len(tenant) == 1 and tenant[0]["AttributeDataType"] == "String", pool["Schema"]
    assert pool["AdminCreateUserConfig"]["AllowAdminCreateUserOnly"] is True
    assert pool["MfaConfiguration"] in ("OPTIONAL", "ON")
    pw = pool["Policies"]["PasswordPolicy"]
    assert pw["MinimumLength"] >= 12 and all(
        pw[k] is True for k in ("RequireLowercase", "RequireUppercase", "RequireNumbers", "RequireSymbols"))
    groups = {r["Properties"]["GroupName"] for r in res.values()
              if r["Type"] == "AWS::Cognito::UserPoolGroup"
              and r["Properties"]["UserPoolId"] == {"Ref": "ConsoleUserPool"}}
    roles = doc["roles"]
    assert groups == {"operators", "platform-admins"}
    assert set(roles["operator"]) | set(roles["admin"]) == groups, roles
    assert doc["claims"]["groups"] == "cognito:groups"
    # The console's task names this pool, in this region, and its hosted UI domain.
    env = env_of("ConsoleTaskDefinition")
    assert env["CONSOLE_USER_POOL_ID"] == {"Ref": "ConsoleUserPool"}
    assert env["CONSOLE_REGION"] == {"Ref": "AWS::Region"}
    assert env["CONSOLE_DOMAIN"] == \
        {"Fn::Sub": "${ConsoleUserPoolDomain}.auth.${AWS::Region}.amazoncognito.com"}
    assert res["ConsoleUserPoolDomain"]["Properties"]["Domain"] == {"Ref": "ConsoleDomainPrefix"}


def test_app_client_uses_the_code_flow_with_a_secret_and_calls_back_to_the_console():
    res = resources()
    client = res["ConsoleUserPoolClient"]["Properties"]
    assert client["UserPoolId"] == {"Ref": "ConsoleUserPool"}
    assert client["AllowedOAuthFlows"] == ["code"]
    assert client["AllowedOAuthFlowsUserPoolClient"] is True
    assert client["GenerateSecret"] is True
    assert client["SupportedIdentityProviders"] == ["COGNITO"]
    assert "openid" in client["AllowedOAuthScopes"]
    assert not {"ALLOW_USER_PASSWORD_AUTH", "ALLOW_ADMIN_USER_PASSWORD_AUTH"} & \
        set(client.get("ExplicitAuthFlows", ["default"])), client.get("ExplicitAuthFlows")
    assert client["CallbackURLs"] == [{"Fn::Sub": "${ConsoleUrl}/auth/callback"}]
    assert all(u["Fn::Sub"].startswith("${ConsoleUrl}/") for u in client["LogoutURLs"])
    # Users cannot move themselves to another tenant; the console reads the attribute.
    assert "custom:tenant" in client["ReadAttributes"]
    assert "custom:tenant" not in client.get("WriteAttributes", ["custom:tenant"])
    # The console sends users back to the same URL, on the path it serves the callback on.
    cognito = pipeline_doc(pipeline_of("ConsoleTaskDefinition"))["console"]["auth"]["cognito"]
    assert re.fullmatch(r"\$\{CONSOLE_URL:-[^}]+\}/auth/callback", cognito["redirect_url"])
    model = (REPO / "src" / "config" / "model.rs").read_text()
    assert re.search(r'CALLBACK_PATH: &\'static str = "/auth/callback"', model)
    env = env_of("ConsoleTaskDefinition")
    assert env["CONSOLE_URL"] == {"Ref": "ConsoleUrl"}
    assert env["CONSOLE_CLIENT_ID"] == {"Ref": "ConsoleUserPoolClient"}
    # The secret reaches the task from Secrets Manager, never as a plain value, and only the
    # console's execution role may read it.
    assert env["CONSOLE_CLIENT_SECRET"] == {"secret": {"Ref": "ConsoleClientSecret"}}
    assert res["ConsoleClientSecret"]["Properties"]["SecretString"] == \
        {"Fn::GetAtt": ["ConsoleUserPoolClient", "ClientSecret"]}
    assert resources()["ConsoleTaskDefinition"]["Properties"]["ExecutionRoleArn"] == \
        {"Fn::GetAtt": ["ConsoleExecutionRole", "Arn"]}
    [st] = [st for p in res["ConsoleExecutionRole"]["Properties"]["Policies"]
            for st in p["PolicyDocument"]["Statement"]]
    assert (st["Action"], st["Resource"]) == ("secretsmanager:GetSecretValue", {"Ref": "ConsoleClientSecret"})
    assert "Policies" not in res["ExecutionRole"]["Properties"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_copies_what_exists_and_builds_locked(shardlake_bin):
    steps = dockerfile_instructions()
    for word, rest in steps:
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _dest = shlex.split(rest)
            for s in sources:
                assert (REPO / s).exists(), f"COPY {s}: not in the repository"
    runs = [rest for word, rest in steps if word == "RUN"]
    assert any("cargo build --release --locked --bin shardlake" in r for r in runs), runs
    # `--locked` fails when Cargo.lock is not current; the same check, without the build.
    # (scripts/test runs the build stage itself with scripts/dockerfile-build-stage.)
    check_run(["cargo", "metadata", "--locked", "--format-version", "1", "--no-deps"])
    # The runtime stage takes the binary where the build stage's cargo leaves it.
    workdir = next(rest for word, rest in steps if word == "WORKDIR")
    copied = [shlex.split(rest) for word, rest in steps
              if word == "COPY" and rest.startswith("--from=build")]
    assert [c[1] for c in copied] == [f"{workdir}/target/release/shardlake"], copied
    # The image's entry point with its command, and its health check, parse as the binary's
    # own subcommands.
    entry = [w for word, rest in steps if word == "ENTRYPOINT" for w in yaml.safe_load(rest)]
    cmd = [w for word, rest in steps if word == "CMD" for w in yaml.safe_load(rest)]
    assert entry == ["/usr/local/bin/shardlake"], entry
    for sub in (cmd[0], "health"):
        check_run([str(shardlake_bin), sub, "--help"])
    pipeline_env = [rest for word, rest in steps if word == "ENV"]
    baked = re.search(r"SHARDLAKE_PIPELINE=(\S+)", " ".join(pipeline_env)).group(1)
    assert (REPO / Path(baked).relative_to("/etc/shardlake")).is_file(), baked


# --------------------------------------------------------------------------------------------
# The objects worker: uploads -> S3 event notifications in SQS -> one ECS task

BACKFILL = REPO / "pipelines" / "well-uploads-backfill-aws.yaml"
# Everything that exists only when UploadsPrefix is set.
UPLOADS_RESOURCES = {"UploadsDeadLetterQueue", "UploadsQueue", "UploadsQueuePolicy", "UploadsBucket",
                     "UploadsBucketPolicy", "ObjectsSecurityGroup", "ObjectsTaskRole",
                     "ObjectsTaskDefinition", "ObjectsService"}


def store_calls() -> dict[str, set[str]]:
    """Every object_store operation the objects worker's files call, by file: `store.<op>(`,
    also when the chain breaks the line, outside their unit tests."""
    def ops_in(path: Path) -> set[str]:
        text = path.read_text().split("#[cfg(test)]\nmod tests")[0]
        return set(re.findall(r"\bstore\s*\.\s*([a-z0-9_]+)\(", text)) - {"clone", "as_ref"}

    calls = {}
    for file in OBJECT_STORE_FILES:
        ops = ops_in(REPO / file)
        assert ops, f"{file}: no object_store call found; OBJECT_STORE_FILES is out of date"
        unmapped = ops - set(STORE_ACTION_OF)
        assert not unmapped, f"{file}: object_store calls with no IAM action in STORE_ACTION_OF: {unmapped}"
        calls[file] = ops
    for path in (REPO / "src" / "source" / "objects").glob("*.rs"):
        file = str(path.relative_to(REPO))
        if path.name != "tests.rs" and ops_in(path):
            assert file in calls, f"{file} calls object_store and is not in OBJECT_STORE_FILES"
    return calls


def store_actions(calls: dict[str, set[str]], files) -> set[str]:
    return {a for f in files for op in calls[f] for a in STORE_ACTION_OF[op]}


def checkpoint_key(doc: dict) -> str:
    """The S3 checkpoint store's one object: `<prefix>/<pipeline>/checkpoint.json`
    (src/checkpoint/s3.rs)."""
    code = (REPO / "src" / "checkpoint" / "s3.rs").read_text()
    assert re.search(r'\[prefix, pipeline, "checkpoint\.json"\]', code), \
        "the S3 checkpoint's key layout changed; check ObjectsTaskRole's Checkpoints"
    return f"{doc['checkpoints']['s3']['prefix']}/{doc['name']}/checkpoint.json"


def state_output() -> str:
    """Where detector snapshots go in the alerts' lake: `<lake prefix>/<STATE_OUTPUT>/...`, the
    only objects the lake deletes (src/sink/mod.rs)."""
    code = (REPO / "src" / "sink" / "mod.rs").read_text()
    return re.search(r'pub const STATE_OUTPUT: &str = "([^"]+)";', code).group(1)


def resolved(value: str, env: dict):
    """What the task sets for a pipeline value that is one `${VAR}` or `${VAR:-default}`."""
    m = re.fullmatch(r"\$\{([A-Z0-9_]+)(?::-[^}]*)?\}", value)
    assert m, f"{value}: not one variable the task sets"
    return env[m.group(1)]


def objects_pipeline() -> dict:
    doc = pipeline_doc(pipeline_of("ObjectsTaskDefinition"))
    # What the worker runs, so which files' calls it makes: the S3 source reading the queue,
    # the lake in S3, checkpoints in S3, and no notifier (src/notify.rs would run too).
    assert set(doc["source"]) == {"s3"} and "notifications" in doc["source"]["s3"], doc["source"]
    assert set(doc["lake"]) == {"s3"} and set(doc["checkpoints"]) == {"s3"}
    assert not doc.get("notifiers") and not any(
        "sink" in (o if isinstance(o, dict) else {}) for o in doc["outputs"].values()), \
        "a notifier or a sink of its own: map its calls and grant them"
    return doc


def test_objects_task_role_grants_exactly_what_the_objects_worker_calls():
    doc = objects_pipeline()
    sdk, store = sdk_calls(), store_calls()
    queue = needed_actions({"src/source/objects/queue.rs": "sqs"}, sdk)
    lake = needed_actions({"src/sink/s3.rs": "s3"}, sdk)
    uploads = store_actions(store, [f for f in OBJECT_STORE_FILES if f.startswith("src/source/")])
    checkpoints = store_actions(store, ["src/checkpoint/s3.rs"])
    assert {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"} <= queue, queue
    assert {"s3:GetObject", "s3:ListBucket"} <= uploads, uploads
    assert {"s3:GetObject", "s3:PutObject"} <= checkpoints, checkpoints
    needed = needed_actions(OBJECTS_CLIENT_FILES, sdk) | uploads | checkpoints
    granted = granted_actions("ObjectsTaskRole")
    assert granted - needed == set(), f"granted but never called: {sorted(granted - needed)}"
    assert needed - granted == set(), f"called but not granted: {sorted(needed - granted)}"
    # And each on exactly what the worker touches with it: the queue; the uploads under
    # UploadsPrefix; the lake bucket and the objects under the pipeline's lake prefix (deletes
    # only of detector snapshots); the one checkpoint object.
    bucket_level = {"s3:ListBucket", "s3:ListBucketMultipartUploads"}
    prefix = doc["lake"]["s3"]["prefix"]
    expected = set()

    def want(actions, resource, condition=None):
        expected.update((a, json.dumps(resource), json.dumps(condition)) for a in actions)

    want(queue, {"Fn::GetAtt": ["UploadsQueue", "Arn"]})
    want(uploads & bucket_level, {"Fn::GetAtt": ["UploadsBucket", "Arn"]},
         {"StringLike": {"s3:prefix": [{"Fn::Sub": "${UploadsPrefix}*"}]}})
    want(uploads - bucket_level, {"Fn::Sub": "${UploadsBucket.Arn}/${UploadsPrefix}*"})
    want(lake & bucket_level, {"Fn::GetAtt": ["LakeBucket", "Arn"]})
    want(lake - bucket_level - {"s3:DeleteObject"}, {"Fn::Sub": f"${{LakeBucket.Arn}}/{prefix}/*"})
    want(lake & {"s3:DeleteObject"}, {"Fn::Sub": f"${{LakeBucket.Arn}}/{prefix}/{state_output()}/*"})
    want(checkpoints, {"Fn::Sub": f"${{LakeBucket.Arn}}/{checkpoint_key(doc)}"})
    got = set()
    for st in statements("ObjectsTaskRole"):
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources_ = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        got.update((a, json.dumps(r), json.dumps(st.get("Condition")))
                   for a in actions for r in resources_)
    assert got == expected, (f"granted beyond what it touches: {sorted(got - expected)}; "
                             f"missing: {sorted(expected - got)}")
    assert resources()["ObjectsTaskDefinition"]["Properties"]["TaskRoleArn"] == \
        {"Fn::GetAtt": ["ObjectsTaskRole", "Arn"]}


def test_the_objects_task_reads_the_stacks_uploads_queue_and_lake_alone():
    res = resources()
    doc = objects_pipeline()
    env = env_of("ObjectsTaskDefinition")
    container = container_of("ObjectsTaskDefinition")
    assert container["Command"][0] == "run" and "--drain" not in container["Command"]
    assert variables(doc) <= set(env), \
        f"the pipeline reads {sorted(variables(doc) - set(env))} which the objects task does not set"
    src = doc["source"]["s3"]
    assert resolved(src["bucket"], env) == {"Ref": "UploadsBucket"}
    assert resolved(src["prefix"], env) == {"Ref": "UploadsPrefix"}
    # The queue's URL (Ref of a queue), so the worker needs no GetQueueUrl call.
    assert resolved(src["notifications"]["queue"], env) == {"Ref": "UploadsQueue"}
    assert resolved(doc["lake"]["s3"]["bucket"], env) == {"Ref": "LakeBucket"}
    assert resolved(doc["checkpoints"]["s3"]["bucket"], env) == {"Ref": "LakeBucket"}
    # The lake bucket is versioned: replaced checkpoints must not pile up.
    key = checkpoint_key(doc)
    rules = res["LakeBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    assert any(key.startswith(r.get("Prefix", "")) and "NoncurrentVersionExpiration" in r
               for r in rules), f"no lifecycle rule expires the replaced versions of {key}"
    assert container["StopTimeout"] == 30 and env["SHARDLAKE_SHUTDOWN_BUDGET"] == "25"
    assert container["HealthCheck"]["Command"] == ["CMD", "/usr/local/bin/shardlake", "health"]
    # One worker reads the queue (leases share Kinesis shards only) and holds its checkpoints:
    # a deployment stops the old task before it starts the new one.
    svc = res["ObjectsService"]["Properties"]
    assert svc["TaskDefinition"] == {"Ref": "ObjectsTaskDefinition"}
    assert svc["DesiredCount"] == 1
    assert svc["DeploymentConfiguration"]["MaximumPercent"] == 100
    assert not [r for r in res.values() if r["Type"] == "AWS::ApplicationAutoScaling::ScalableTarget"
                and "ObjectsService" in json.dumps(r)]
    # Nothing reaches it; out only to AWS APIs.
    assert svc["NetworkConfiguration"]["AwsvpcConfiguration"]["SecurityGroups"] == \
        [{"Ref": "ObjectsSecurityGroup"}]
    assert rules_into("ObjectsSecurityGroup", "SecurityGroupIngress",
                      "AWS::EC2::SecurityGroupIngress") == []
    egress = rules_into("ObjectsSecurityGroup", "SecurityGroupEgress", "AWS::EC2::SecurityGroupEgress")
    assert [(r["FromPort"], r["ToPort"], r["CidrIp"]) for r in egress] == [(443, 443, "0.0.0.0/0")]


def test_uploads_notify_the_queue_whose_redrive_comes_after_the_workers_own_give_up():
    t = template()
    res = t["Resources"]
    # All of it only with UploadsPrefix (cfn-lint checks that nothing else refers to it).
    assert t["Parameters"]["UploadsPrefix"]["Default"] == ""
    assert t["Conditions"]["Uploads"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "UploadsPrefix"}, ""]}]}
    assert {k for k, r in res.items() if r.get("Condition") == "Uploads"} == UPLOADS_RESOURCES
    assert all(o.get("Condition") == "Uploads" for o in t["Outputs"].values()
               if any(name in json.dumps(o["Value"]) for name in UPLOADS_RESOURCES))
    # The worker gives a message up (its objects to dead-letter, the message deleted) on its
    # receive max_receives + 1; SQS delivers a message at most maxReceiveCount times before it
    # moves it to the dead-letter queue, so that must be later.
    session = (REPO / "src" / "pipeline" / "session.rs").read_text()
    assert "if m.receives > max_receives {" in session, "the give-up changed; check the redrive"
    max_receives = objects_pipeline()["source"]["s3"]["notifications"]["max_receives"]
    queue = res["UploadsQueue"]["Properties"]
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == \
        {"Fn::GetAtt": ["UploadsDeadLetterQueue", "Arn"]}
    assert queue["RedrivePolicy"]["maxReceiveCount"] > max_receives + 1, \
        (queue["RedrivePolicy"], max_receives)
    # Encrypted as S3 can send to (SSE-SQS; S3 cannot use the aws/sqs KMS key).
    for q in ("UploadsQueue", "UploadsDeadLetterQueue"):
        assert res[q]["Properties"]["SqsManagedSseEnabled"] is True
        assert "KmsMasterKeyId" not in res[q]["Properties"]
    # Only S3 may send, for the stack's uploads bucket in this account.
    policy = res["UploadsQueuePolicy"]["Properties"]
    assert policy["Queues"] == [{"Ref": "UploadsQueue"}]
    [st] = policy["PolicyDocument"]["Statement"]
    bucket = res["UploadsBucket"]
    name = bucket["Properties"]["BucketName"]["Fn::Sub"]
    assert (st["Effect"], st["Principal"], st["Action"], st["Resource"]) == (
        "Allow", {"Service": "s3.amazonaws.com"}, "sqs:SendMessage",
        {"Fn::GetAtt": ["UploadsQueue", "Arn"]})
    assert st["Condition"] == {
        "ArnEquals": {"aws:SourceArn": {"Fn::Sub": f"arn:${{AWS::Partition}}:s3:::{name}"}},
        "StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}}
    # The bucket's notifications: every created object under the prefix, once the queue's
    # policy lets S3 send (S3 checks it when the configuration is put).
    assert "UploadsQueuePolicy" in bucket["DependsOn"]
    assert bucket["Properties"]["NotificationConfiguration"] == {"QueueConfigurations": [{
        "Event": "s3:ObjectCreated:*", "Queue": {"Fn::GetAtt": ["UploadsQueue", "Arn"]},
        "Filter": {"S3Key": {"Rules": [{"Name": "prefix", "Value": {"Ref": "UploadsPrefix"}}]}}}]}
    assert 'starts_with("ObjectCreated:")' in \
        (REPO / "src" / "source" / "objects" / "queue.rs").read_text()
    # A folder: the listing asks for the prefix's folder, which ListTheUploads must cover;
    # and no IAM wildcard, which would widen the role's resources.
    pattern = t["Parameters"]["UploadsPrefix"]["AllowedPattern"]
    assert re.fullmatch(pattern, "gateways/") and re.fullmatch(pattern, "a/b/")
    for wrong in ("gateways", "/", "*/", "a?/", "a/*/"):
        assert not re.fullmatch(pattern, wrong), wrong


def test_the_backfill_pipeline_is_the_objects_pipeline_listing_its_prefix(shardlake_bin):
    # The same name, lake and checkpoints (so the role covers it, and an object either run read
    # to its end the other skips); only the source lists instead of reading the queue.
    notified = objects_pipeline()
    backfill = pipeline_doc(BACKFILL)
    assert "notifications" not in backfill["source"]["s3"]
    notified["source"]["s3"].pop("notifications")
    assert backfill == notified
    for pipeline in (pipeline_of("ObjectsTaskDefinition"), BACKFILL):
        check_run([str(shardlake_bin), "validate", str(pipeline)])


# --------------------------------------------------------------------------------------------
# Tenants: a role and an Athena workgroup each

STACK = {"AWS::Partition": "aws", "AWS::Region": "us-east-1", "AWS::AccountId": "123456789012",
         "AWS::StackName": "wells", "LakeBucket": "wells-lake", "LakeBucket.Arn":
         "arn:aws:s3:::wells-lake", "GlueDatabase": "wells_lake"}


def resolve(node):
    """Fn::Sub and Fn::GetAtt of the stack's own names, as CloudFormation resolves them."""
    if isinstance(node, dict):
        if "Fn::Sub" in node:
            return re.sub(r"\$\{([^}!]+)\}", lambda m: STACK[m.group(1)], node["Fn::Sub"])
        if node == {"Fn::GetAtt": ["LakeBucket", "Arn"]}:
            return STACK["LakeBucket.Arn"]
        return {k: resolve(v) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v) for v in node]
    return node


def tenant_policy(tenant: str) -> dict:
    role = template()["Resources"][f"TenantRole{tenant}"]
    [policy] = role["Properties"]["Policies"]
    return resolve(policy["PolicyDocument"])


def test_a_tenant_role_grants_nothing_outside_its_tenant():
    res = template()["Resources"]
    for tenant in TENANTS:
        doc = tenant_policy(tenant)
        for st in doc["Statement"]:
            assert st["Effect"] == "Allow", st
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
            assert not any("*" in a for a in actions), st
            for r in resources:
                if r.startswith("arn:aws:s3:::wells-lake/"):
                    key = r.removeprefix("arn:aws:s3:::wells-lake/")
                    assert key in (f"lake/*/tenant={tenant}/*", f"athena-results/{tenant}/*"), r
                elif r.startswith("arn:aws:athena:"):
                    assert r.endswith(f":workgroup/wells-{tenant}"), r
                elif r.startswith("arn:aws:glue:"):
                    assert actions and all(a.startswith("glue:Get") for a in actions), st
                else:
                    assert r == "arn:aws:s3:::wells-lake", r
                    if "s3:ListBucket" in actions:
                        prefixes = st["Condition"]["StringLike"]["s3:prefix"]
                        assert prefixes == [f"lake/*/tenant={tenant}/*",
                                            f"athena-results/{tenant}/*"], prefixes
        assert res[f"TenantRole{tenant}"]["Properties"]["Tags"] == [
            {"Key": "tenant", "Value": tenant}]
        wg = res[f"TenantWorkGroup{tenant}"]["Properties"]
        assert wg["Name"] == {"Fn::Sub": f"${{AWS::StackName}}-{tenant}"}
        conf = wg["WorkGroupConfiguration"]
        assert conf["EnforceWorkGroupConfiguration"] is True
        assert conf["BytesScannedCutoffPerQuery"] == {"Ref": "TenantQueryBytesLimit"}
        assert resolve(conf["ResultConfiguration"]["OutputLocation"]) == (
            f"s3://wells-lake/athena-results/{tenant}/")


@pytest.fixture
def moto_iam(tmp_path_factory):
    """A moto server of this test's own, whose IAM access control is switched on once the
    test has set it up (every request after that is checked against the caller's policies)."""
    from servers import serve_moto
    yield from serve_moto(tmp_path_factory)


def test_moto_refuses_a_tenant_role_another_tenants_objects(moto_iam):
    """The policy proven, not only read: moto evaluates each S3 request against the tenant's
    policy (the role's, as an IAM user's, since moto checks users' and assumed roles' policies
    alike; the ListBucket prefix condition is not one moto evaluates, so it is checked above)."""
    import boto3
    from botocore.exceptions import ClientError

    s3 = moto_iam.client("s3")
    s3.create_bucket(Bucket="wells-lake")
    keys = {t: f"lake/well-telemetry/readings/tenant={t}/year=2026/month=01/day=05/hour=10/"
               f"part-0000000001-w0-0000.parquet" for t in TENANTS}
    for key in keys.values():
        s3.put_object(Bucket="wells-lake", Key=key, Body=b"rows")
    s3.put_object(Bucket="wells-lake", Key="lake/well-telemetry/dead_letter/year=2026/x.parquet",
                  Body=b"unproven rows")
    iam = moto_iam.client("iam")
    creds = {}
    for tenant in TENANTS:
        iam.create_user(UserName=tenant)
        iam.put_user_policy(UserName=tenant, PolicyName="tenant-lake",
                            PolicyDocument=json.dumps(tenant_policy(tenant)))
        k = iam.create_access_key(UserName=tenant)["AccessKey"]
        creds[tenant] = (k["AccessKeyId"], k["SecretAccessKey"])
    req = urllib.request.Request(f"{moto_iam.url}/moto-api/reset-auth", data=b"0", method="POST",
                                 headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200

    def as_tenant(tenant):
        key_id, secret = creds[tenant]
        return boto3.client("s3", endpoint_url=moto_iam.url, region_name="us-east-1",
                            aws_access_key_id=key_id, aws_secret_access_key=secret)

    def refused(call) -> bool:
        try:
            call()
        except ClientError as e:
            assert e.response["Error"]["Code"] in ("AccessDenied", "403"), e.response
            return True
        return False

    for tenant in TENANTS:
        other = next(t for t in TENANTS if t != tenant)
        c = as_tenant(tenant)
        assert c.get_object(Bucket="wells-lake", Key=keys[tenant])["Body"].read() == b"rows"
        assert refused(lambda: c.get_object(Bucket="wells-lake", Key=keys[other]))
        assert refused(lambda: c.get_object(
            Bucket="wells-lake", Key="lake/well-telemetry/dead_letter/year=2026/x.parquet"))
        c.put_object(Bucket="wells-lake", Key=f"athena-results/{tenant}/q1.csv", Body=b"r")
        assert refused(lambda: c.put_object(Bucket="wells-lake",
                                            Key=f"athena-results/{other}/q1.csv", Body=b"r"))
        assert refused(lambda: c.put_object(Bucket="wells-lake", Key=keys[tenant], Body=b"x"))
