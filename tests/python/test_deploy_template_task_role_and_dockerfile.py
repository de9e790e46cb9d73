"""The deployment files, checked here since they cannot be deployed from this machine:
deploy/shardlake.yaml passes cfn-lint; the task role grants exactly the actions shardlake's
code calls; the task runs a pipeline whose variables it sets; and the Dockerfile copies files
that exist, builds with the lock file as it is, and runs commands the binary accepts.

Exercises no Rust module at run time: deploy/shardlake.yaml and the Dockerfile are checked
against the SDK calls in src/source/kinesis/, src/checkpoint/dynamodb/, src/sink/s3.rs and
src/notify.rs, and against the subcommands of src/bin/shardlake.rs.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from harness import REPO, check_run

TEMPLATE = REPO / "deploy" / "shardlake.yaml"
DOCKERFILE = REPO / "Dockerfile"

# Which service each source file's SDK client talks to.
CLIENT_FILES = {
    "src/source/kinesis/api.rs": "kinesis",
    "src/checkpoint/dynamodb/manager.rs": "dynamodb",
    "src/checkpoint/dynamodb/store.rs": "dynamodb",
    "src/sink/s3.rs": "s3",
    "src/notify.rs": "sns",
}
# Files whose SDK calls never run in the ECS task: `shardlake bridge` stands in for the IoT
# rule on one machine (in AWS the rule's own role puts the records).
# The bridge runs only locally and the agent on the devices: neither is in the ECS task.
# The console (`shardlake console`: the lease-table scan that finds the workers, and the
# acknowledgements beside the lake) runs as a service of its own with a role of its own, not
# in the worker's task.
NOT_IN_THE_TASK = {"src/tools/bridge.rs", "src/agent/transport/kinesis.rs",
                   "src/console/workers.rs", "src/console/acks.rs"}
# SDK operations whose IAM action is not named after them.
ACTION_OF = {
    ("s3", "head_bucket"): ["s3:ListBucket"],
    ("s3", "head_object"): ["s3:GetObject"],
    ("s3", "create_multipart_upload"): ["s3:PutObject"],
    ("s3", "upload_part"): ["s3:PutObject"],
    ("s3", "complete_multipart_upload"): ["s3:PutObject"],
    ("s3", "list_multipart_uploads"): ["s3:ListBucketMultipartUploads"],
    # The transaction holds only Update items (each needs UpdateItem on the table).
    ("dynamodb", "transact_write_items"): ["dynamodb:UpdateItem"],
}


def template() -> dict:
    return yaml.safe_load(TEMPLATE.read_text())


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
        ops = set(re.findall(r"\bclient\s*\.\s*([a-z_]+)\(\)", path.read_text())) - {"clone"}
        if ops:
            calls[str(path.relative_to(REPO))] = ops
    return calls


def test_task_role_grants_exactly_what_the_code_calls():
    calls = {f: ops for f, ops in sdk_calls().items() if f not in NOT_IN_THE_TASK}
    unknown = set(calls) - set(CLIENT_FILES)
    assert not unknown, f"SDK calls in files this test does not map to a service: {unknown}"
    needed = set()
    for file, ops in calls.items():
        service = CLIENT_FILES[file]
        for op in ops:
            needed |= set(ACTION_OF.get((service, op), [
                f"{service}:{''.join(w.title() for w in op.split('_'))}"]))
    role = template()["Resources"]["TaskRole"]["Properties"]
    granted = set()
    for policy in role["Policies"]:
        for st in policy["PolicyDocument"]["Statement"]:
            assert st["Effect"] == "Allow", st
            assert st["Resource"] != "*", f"{st['Sid']}: not scoped to a resource"
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            assert not any("*" in a for a in actions), st
            granted |= set(actions)
    assert granted - needed == set(), f"granted but never called: {sorted(granted - needed)}"
    assert needed - granted == set(), f"called but not granted: {sorted(needed - granted)}"
    # The ones a worker cannot do without, so the mapping above stays honest.
    assert {"kinesis:GetRecords", "dynamodb:UpdateItem", "s3:PutObject", "sns:Publish"} <= needed


def test_the_task_sets_every_variable_its_pipeline_reads(shardlake_bin):
    container = template()["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    env = {e["Name"] for e in container["Environment"]}
    command = container["Command"]
    assert command[0] == "run"
    baked = Path(command[1])
    assert baked.parts[:3] == ("/", "etc", "shardlake"), command
    pipeline = REPO.joinpath(*baked.parts[3:])
    assert pipeline.is_file(), f"{baked} is not a file of the repository copied into the image"
    # A variable in a comment is not read.
    text = "\n".join(line for line in pipeline.read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    assert used and used <= env, f"the pipeline reads {sorted(used - env)} which the task does not set"
    check_run([str(shardlake_bin), "validate", str(pipeline)])
    health = container["HealthCheck"]["Command"]
    assert health[:2] == ["CMD", "/usr/local/bin/shardlake"] and health[2:] == ["health"]
    assert container["StopTimeout"] == 30 and {"Name": "SHARDLAKE_SHUTDOWN_BUDGET", "Value": "25"} \
        in container["Environment"]


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
