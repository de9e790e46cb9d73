"""The Kinesis source across resharding, on kinesis-local (it reshards as AWS does): a shard is
split and two others merged while a producer writes and a run reads; every record reaches the
lake once, and each device's records in the order they were put, across parent and child
shards.

Run twice: polling GetRecords, and with enhanced fan-out (SubscribeToShard; a shard ends at
the event that names its children).

Exercises src/source/kinesis/ (child shards read after their parents; reader.rs and
fanout.rs).
"""

from __future__ import annotations

import signal
import subprocess
import uuid

import pytest

from harness import check_run, kinesis_pipeline, pipeline_env, simulate, write_test_pipeline
from lake import check_lake_against_put
from servers import create_stream, put_while_resharding
from streamdata import interleave


@pytest.mark.parametrize("read", ["polling", "fan_out"])
def test_split_and_merge_while_producing_keep_each_device_in_order(tmp_path, kinesis_local,
                                                                  agent_bin, shardlake_bin,
                                                                  capsys, read):
    """kinesis-local (it reshards as AWS does): one shard is split and two others merged
    while a producer writes and a run reads. Every record must reach the lake once, and each
    device's records in the order they were put, across the parent and child shards."""
    kinesis = kinesis_local.client()
    name = f"wells-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, name, 3)
    summary = simulate(agent_bin, tmp_path / "sim", shards=3, devices=60, readings=50,
                       seed=37, spikes=2, malformed=6)
    lines = interleave(tmp_path / "sim" / "stream")
    if read == "fan_out":
        pipeline = write_test_pipeline(
            tmp_path / "fan-out.yaml", max_bytes="1MiB", max_age="1s",
            source=f"{{kinesis: {{stream: {name}, fan_out: {{consumer: reshard, renew_after: 3s}}}}}}")
    else:
        pipeline = kinesis_pipeline(tmp_path, name, max_bytes="1MiB", max_age="1s")
    env = pipeline_env(tmp_path, kinesis_local.env())
    run = subprocess.Popen([str(shardlake_bin), "run", str(pipeline)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        put, ids = put_while_resharding(kinesis, name, lines)
        run.send_signal(signal.SIGTERM)
        stderr = run.communicate(timeout=60)[1]
        (tmp_path / "run.log").write_text(stderr)
        assert run.returncode == 0, f"the run did not stop cleanly:\n{stderr[-3000:]}"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()

    # A second run reads what the first did not reach (the children it had not listed yet).
    drained = check_run([str(shardlake_bin), "run", str(pipeline), "--drain"], env=env,
                        timeout=300)
    (tmp_path / "drain.log").write_text(drained.stderr)
    lake = tmp_path / "lake"
    con = check_lake_against_put(put, summary, lake)

    # Each device's records in the order they reached the lake: by commit (the number in the
    # file name), then by hour partition and row within the file.
    files = str(lake / "readings" / "**" / "*.parquet")
    moved, out_of_order = con.execute(f"""
        WITH r AS (
            SELECT device_id, seq, _shard_id,
                   row_number() OVER (PARTITION BY device_id ORDER BY
                       CAST(regexp_extract(filename, 'part-([0-9]+)-', 1) AS BIGINT),
                       filename, file_row_number) AS arrival
            FROM read_parquet('{files}', filename = true, file_row_number = true))
        SELECT (SELECT count(*) FROM (SELECT device_id FROM r GROUP BY device_id
                                      HAVING count(DISTINCT _shard_id) > 1)),
               (SELECT count(*) FROM (SELECT seq, lag(seq) OVER (PARTITION BY device_id
                                                                 ORDER BY arrival) AS prev
                                      FROM r) WHERE seq <= prev)
    """).fetchall()[0]
    assert moved >= 10, f"only {moved} devices moved to a child shard: the test proves little"
    assert out_of_order == 0, f"{out_of_order} records reached the lake before an earlier one of their device"
    with capsys.disabled():
        print(f"\n[reshard, kinesis-local, {read}] {len(put)} records; split {ids[0]}, merged {ids[1]} "
              f"and {ids[2]} while producing; {moved} devices read across parent and child "
              "shards, all in order")
