"""The lake in S3 (moto's server), checked from outside: pyarrow's S3FileSystem reads the
objects with hive partitioning, DuckDB compares them with the input, boto3 lists what is
left behind; crashes and a fault-injecting proxy must not lose or duplicate a record. Also: a
missing bucket is a clear error, and objects carry the KMS key and the storage class asked
for.

Exercises src/sink/s3.rs (multipart uploads, their recovery after a crash), with the commit
protocol of src/checkpoint/commit.rs.
"""

from __future__ import annotations

import re
import subprocess
import time

from crash import crash_runs, simulator_extension
from faultproxy import FaultProxy
from harness import check_run, pipeline_env, run_log, simulate, write_test_pipeline
from lake import S3LakeView, check_whole_lake, duck
from streamdata import read_stream

BUCKET = "lake"
PREFIX = "tables/well-telemetry"
QUARANTINE = "quarantine"
KEY = re.compile(r"^(?:(?P<prefix>.+)/)?(?P<output>[a-z_0-9]+)/year=(\d{4})/month=(\d{2})/"
                 r"day=(\d{2})/hour=(\d{2})/part-[^/]+\.parquet$")
S3_LAKE = f"{{s3: {{bucket: {BUCKET}, prefix: {PREFIX}}}}}"


def all_keys(s3, bucket: str) -> list[dict]:
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out += page.get("Contents", [])
    return out


def uploads(s3, bucket: str) -> list[str]:
    """Multipart uploads not completed nor aborted."""
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def s3_env(tmp_path, endpoint: str, moto) -> dict[str, str]:
    return pipeline_env(tmp_path, moto.env(endpoint))


def test_s3_lake_read_by_pyarrow_and_duckdb(tmp_path, moto, agent_bin, shardlake_bin):
    s3 = moto.client("s3")
    for b in (BUCKET, QUARANTINE):
        s3.create_bucket(Bucket=b)
    # 600,000 readings from 10:56 UTC: hours 10 and 11, and the hour-10 `readings` file
    # (~14 bytes a reading) above the smallest part size S3 takes (5 MiB, set here; the
    # default is 8 MiB), so it is uploaded in several parts.
    summary = simulate(agent_bin, tmp_path, shards=4, devices=2000, readings=300, seed=41,
                       spikes=12, malformed=15, start="2026-01-05T10:56:00Z")
    pipeline = write_test_pipeline(
        tmp_path / "s3.yaml", max_bytes="128MiB", max_age="5m",
        lake=f"{{s3: {{bucket: {BUCKET}, prefix: {PREFIX}, part_size: 5MiB}}}}")
    # The dead letters go to a bucket of their own (a per-output sink).
    text = pipeline.read_text()
    text = text.replace("outputs:\n", "outputs:\n  dead_letter: {name: dead_letter, sink: "
                        f"{{s3: {{bucket: {QUARANTINE}, prefix: dlq}}}}}}\n", 1)
    pipeline.write_text(text)
    env = s3_env(tmp_path, moto.url, moto)
    check_run([str(shardlake_bin), "run", str(pipeline), "--drain"], env=env, timeout=600)
    assert not (tmp_path / "lake").exists(), "the S3 run wrote a local lake"

    # Keys: the local lake's layout under the prefix; nothing staged is left.
    objects = {b: all_keys(s3, b) for b in (BUCKET, QUARANTINE)}
    outputs = {}
    for bucket, objs in objects.items():
        for o in objs:
            m = KEY.match(o["Key"])
            assert m, f"s3://{bucket}/{o['Key']} is not <prefix>/<output>/year=/month=/day=/hour=/"
            outputs.setdefault((bucket, m["prefix"]), set()).add(m["output"])
        assert uploads(s3, bucket) == [], f"unfinished multipart uploads in {bucket}"
    assert outputs == {
        (BUCKET, PREFIX): {"readings", "well_1m", "well_5m_hop", "alerts"},
        (QUARANTINE, "dlq"): {"dead_letter"},
    }, outputs
    # A multipart object's ETag ends in -<parts>.
    parts = [int(o["ETag"].strip('"').rsplit("-", 1)[1]) for o in objects[BUCKET]
             if "-" in o["ETag"]]
    assert len(parts) == len(objects[BUCKET]), "an object was not made by a multipart upload"
    sizes = sorted(o["Size"] for o in objects[BUCKET])
    assert max(parts) >= 2, f"no file was uploaded in two parts: {parts}, sizes {sizes}"

    stream = read_stream(tmp_path / "stream")
    assert len(stream.valid) == summary["readings"] and len(stream.invalid) == summary["malformed"]
    con = duck()
    con.register("src", stream.table())
    view = S3LakeView(con, moto, BUCKET, PREFIX, elsewhere={"dead_letter": f"{QUARANTINE}/dlq"})
    check_whole_lake(con, view, stream)

    # Hive partitioning as pyarrow infers it: the partition values are the rows' UTC hours.
    readings = view.source("readings")
    bad = con.execute(f"""SELECT count(*) FROM {readings}
        WHERE year <> year(ts) OR month <> month(ts) OR day <> day(ts) OR hour <> hour(ts)
    """).fetchall()[0][0]
    assert bad == 0, f"{bad} readings in a partition other than their event time's hour"
    hours = dict(con.execute(f"SELECT hour, count(*) FROM {readings} GROUP BY ALL").fetchall())
    expected = dict(con.execute("SELECT hour(ts), count(*) FROM src GROUP BY ALL").fetchall())
    assert hours == expected and set(hours) == {10, 11}, (hours, expected)

    # `shardlake query` reads the S3 lake (through object_store, not the SDK).
    for where, n in (("WHERE hour = '11'", expected[11]), ("", len(stream.valid))):
        out = check_run([str(shardlake_bin), "query", str(pipeline),
                         f"SELECT count(*) AS n FROM readings {where}"], env=env).stdout
        rows = [line.strip().strip("|").strip() for line in out.splitlines()
                if line.startswith("|")]
        assert rows[0] == "n" and int(rows[1]) == n, (where, out)


def test_s3_sigkill_crash_exactly_once(tmp_path, moto, agent_bin, shardlake_bin, capsys):
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    summary = simulate(agent_bin, tmp_path, shards=4, devices=300, readings=1000, seed=29,
                       spikes=8, malformed=20)
    stream = read_stream(tmp_path / "stream")
    assert (len(stream.valid), len(stream.invalid)) == (summary["readings"],
                                                        summary["malformed"])
    pipeline = write_test_pipeline(tmp_path / "s3.yaml", max_bytes="1MiB", max_age="1s",
                                   lake=S3_LAKE)
    con = duck()
    view = S3LakeView(con, moto, BUCKET, PREFIX)
    seen: list[int] = []

    def staged() -> str:
        seen.append(len(uploads(s3, BUCKET)))
        return f"{seen[-1]} uploads"

    crashes = crash_runs(shardlake_bin, pipeline, tmp_path, con, view,
                         valid=len(stream.valid), seed=20260106, staged=staged,
                         env=moto.env(), kill_window=(0.3, 4.0),
                         extend=simulator_extension(agent_bin, tmp_path, shards=4, devices=300,
                                                    after=1000, readings=1000, seed=29))
    stream = read_stream(tmp_path / "stream")
    left = uploads(s3, BUCKET)
    started = time.monotonic()
    check_run([str(shardlake_bin), "run", str(pipeline), "--drain"],
              env=s3_env(tmp_path, moto.url, moto), timeout=600)
    with capsys.disabled():
        print(f"\n[crash test, S3 lake] {crashes.report()}\n"
              f"  final run: finished in {time.monotonic() - started:.1f}s, "
              f"{len(left)} uploads left by the crashes before it")
    assert crashes.mid_stream >= 1, "no crash left the lake part-way through the stream"
    # Uploads left by a crash are completed (intent pending) or aborted by the next run.
    assert sum(1 for n in seen if n) >= 3, (
        f"fewer than 3 crashes left staged uploads behind ({seen}): recovery was hardly "
        "exercised")
    assert uploads(s3, BUCKET) == [], "orphaned multipart uploads after recovery"

    view.refresh()
    con.register("src", stream.table())
    check_whole_lake(con, view, stream)


def test_s3_faults_lose_and_duplicate_nothing(tmp_path, moto, agent_bin, shardlake_bin, capsys):
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    summary = simulate(agent_bin, tmp_path, shards=4, devices=300, readings=2000, seed=31,
                       spikes=8, malformed=12)
    stream = read_stream(tmp_path / "stream")
    assert len(stream.valid) == summary["readings"]
    # Files roll at the smallest size allowed: about ten commits, so many uploads, completions
    # and sweeps go through the proxy. The sizes, not the clock, set how many (~150 requests):
    # with a rollover by age the count fell as the engine got faster, and the seeded faults
    # with it, below the floor asserted below.
    pipeline = write_test_pipeline(tmp_path / "s3.yaml", max_bytes="64KiB", max_age="1h",
                                   lake=S3_LAKE)
    kinds = ["slowdown", "reset_before", "reset_after"]
    with FaultProxy(moto.host, moto.port, rate=0.2, kinds=kinds, seed=7) as proxy:
        proc = check_run([str(shardlake_bin), "run", str(pipeline), "--drain"],
                         env=s3_env(tmp_path, proxy.url, moto), timeout=900)
        faults = dict(proxy.injected)
        with capsys.disabled():
            print(f"\n[S3 fault proxy] {proxy.summary()}")
    assert all(faults.get(k, 0) > 0 for k in kinds), f"not every fault was injected: {faults}"
    assert sum(faults.values()) >= 30, f"too few faults to mean anything: {faults}"
    assert uploads(s3, BUCKET) == [], "multipart uploads left behind"
    assert "ERROR" not in proc.stdout + proc.stderr
    # The SDK retried every fault; the run counted each one.
    finished = [e for e in run_log(proc) if e.get("message") == "run finished"]
    assert len(finished) == 1, finished
    assert (finished[0]["s3_throttled"], finished[0]["s3_errors_retried"]) == (
        faults["slowdown"], faults["reset_before"] + faults["reset_after"]), (faults, finished[0])

    con = duck()
    con.register("src", stream.table())
    view = S3LakeView(con, moto, BUCKET, PREFIX)
    check_whole_lake(con, view, stream)


def test_s3_missing_bucket_is_a_clear_error(tmp_path, moto, agent_bin, shardlake_bin):
    simulate(agent_bin, tmp_path, shards=1, devices=2, readings=2, seed=1, spikes=0,
             malformed=0)
    pipeline = write_test_pipeline(tmp_path / "s3.yaml", max_bytes="1MiB", max_age="1s",
                                   lake="{s3: {bucket: no-such-bucket}}")
    proc = subprocess.run([str(shardlake_bin), "run", str(pipeline), "--drain"],
                          env=s3_env(tmp_path, moto.url, moto), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "S3 bucket `no-such-bucket` does not exist" in text, text[-2000:]


def test_s3_objects_carry_kms_encryption_and_storage_class(tmp_path, moto, agent_bin,
                                                           shardlake_bin):
    s3, kms = moto.client("s3"), moto.client("kms")
    s3.create_bucket(Bucket=BUCKET)
    key_id = kms.create_key(Description="lake key")["KeyMetadata"]["KeyId"]
    simulate(agent_bin, tmp_path, shards=2, devices=20, readings=60, seed=3, spikes=1,
             malformed=2)
    lake = (f"{{s3: {{bucket: {BUCKET}, prefix: {PREFIX}, kms_key_id: {key_id}, "
            f"storage_class: STANDARD_IA}}}}")
    pipeline = write_test_pipeline(tmp_path / "s3.yaml", max_bytes="128MiB", max_age="5m",
                                   lake=lake)
    check_run([str(shardlake_bin), "run", str(pipeline), "--drain"],
              env=s3_env(tmp_path, moto.url, moto))
    objects = all_keys(s3, BUCKET)
    assert objects, "no object written"
    for o in objects:
        head = s3.head_object(Bucket=BUCKET, Key=o["Key"])
        assert head.get("ServerSideEncryption") == "aws:kms", (o["Key"], head)
        assert head.get("SSEKMSKeyId", "").endswith(key_id), (o["Key"], head)
        assert head.get("StorageClass") == "STANDARD_IA", (o["Key"], head)
        assert head.get("ContentType") == "application/vnd.apache.parquet", head
