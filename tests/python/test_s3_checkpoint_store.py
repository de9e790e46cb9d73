"""`checkpoints: {s3: ...}` on moto's S3: a worker with no disk of its own (an ECS task) keeps
its checkpoints in one object, so a run on a fresh machine (the local state directory gone)
reads nothing twice; and two workers started on the same checkpoints never both commit: the
second fails at its first write (a conditional put) with the error that says so, and the lake
holds every reading once.
"""

from __future__ import annotations

import json
import random
import subprocess

import test_s3_files_source as files
from harness import pipeline_env
from lake import duck, lake_count, lake_source

BUCKET, PREFIX = files.BUCKET, files.PREFIX


def pipeline(tmp_path, **rollover):
    source = f"{{s3: {{bucket: {BUCKET}, prefix: {PREFIX}}}}}"
    path = files.objects_pipeline(tmp_path, source, **rollover)
    text = path.read_text()
    checkpoints = f"checkpoints: {{s3: {{bucket: {BUCKET}, prefix: state}}}}\n"
    lines = text.splitlines(keepends=True)
    start = next(i for i, l in enumerate(lines) if l.startswith("checkpoints:"))
    end = start + 1
    while end < len(lines) and lines[end].startswith((" ", "\t")):
        end += 1
    path.write_text("".join(lines[:start]) + checkpoints + "".join(lines[end:]))
    return path


def upload(s3, objs) -> dict[str, str]:
    return {o.key: f"{PREFIX}{o.key}@{files.put(s3, PREFIX + o.key, o.body)}" for o in objs}


def test_checkpoints_in_s3_outlive_the_machine(tmp_path, moto, shardlake_bin):
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    rng = random.Random(5)
    objs = [files.ndjson_object(f"site-{i}/readings.ndjson", files.readings(rng, f"s{i}", 10, 60))
            for i in range(3)]
    shard_of = upload(s3, objs)
    p = pipeline(tmp_path)
    files.run_drain(shardlake_bin, p, tmp_path, moto.env())
    con, lake = duck(), tmp_path / "lake"
    files.check_objects(con, lake, objs, shard_of)
    stored = json.loads(s3.get_object(Bucket=BUCKET, Key="state/well-telemetry/checkpoint.json")
                        ["Body"].read())
    assert set(stored["committed"]["shards"]) == set(shard_of.values())
    assert not (tmp_path / "state").exists(), "nothing of the checkpoints is on local disk"
    totals = files.lake_totals(con, lake)

    # Another run (any machine: it finds its checkpoints in the bucket): nothing is read twice;
    # a new object is read alone.
    more = files.ndjson_object("site-9/readings.ndjson", files.readings(
        rng, "s9", 10, 60, start_ms=files.T0_MS + 3600_000))
    shard_of.update(upload(s3, [more]))
    files.run_drain(shardlake_bin, p, tmp_path, moto.env())
    assert files.lake_totals(con, lake)["readings"] == totals["readings"] + len(more.records)
    files.check_objects(con, lake, objs + [more], shard_of)


def test_a_second_worker_on_the_same_checkpoints_fails_instead_of_committing(
        tmp_path, moto, shardlake_bin):
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    rng = random.Random(6)
    objs = [files.ndjson_object(f"site-{i}/readings.ndjson", files.readings(rng, f"w{i}", 200, 100))
            for i in range(4)]
    upload(s3, objs)
    # Commits every second: both workers get to write while the other still runs.
    p = pipeline(tmp_path, max_bytes="1MiB", max_age="1s")
    cmd = [str(shardlake_bin), "run", str(p), "--drain"]
    env = pipeline_env(tmp_path, moto.env())
    procs = [subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(proc.wait(timeout=300), proc.stderr.read()) for proc in procs]
    failed = [err for rc, err in results if rc != 0]
    assert len(failed) == 1, f"exit codes {[rc for rc, _ in results]}: exactly one must fail"
    assert "another worker wrote these checkpoints" in failed[0], failed[0][-2000:]
    # The winner read everything; what the loser staged was never published.
    con, lake = duck(), tmp_path / "lake"
    total = sum(len(o.records) for o in objs)
    assert lake_count(con, lake, "readings") == total
    dups = con.execute(f"SELECT count(*) - count(DISTINCT (device_id, seq)) "
                       f"FROM {lake_source(lake, 'readings')}").fetchall()[0][0]
    assert dups == 0, f"{dups} readings twice"
    # And a run afterwards finds every object committed.
    files.run_drain(shardlake_bin, p, tmp_path, moto.env())
    assert lake_count(con, lake, "readings") == total
