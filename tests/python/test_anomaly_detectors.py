"""Detectors that learn each device (`alerts[].detect`), run as a user runs them: the agent's
simulator writes the local stream, `shardlake run --drain` reads it, DuckDB reads the alerts.

- After ten or more SIGKILLs and failpoint aborts, the alerts table equals a clean run's on
  the same stream, row for row (the detectors' state is in every commit's snapshot).
- `silent` waits for a lagging shard instead of calling the whole fleet silent, and still
  finds the one device that stopped while the others went on.
- `limits.detector_series` bounds what a flood of new device ids can make a worker hold.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

from crash import crash_runs, simulator_extension
import pyarrow as pa

from harness import check_run, pipeline_env, run_log, simulate, write_test_pipeline
from lake import duck, inprogress_files, lake_source
from servers import AWS_TEST_ENV

DETECTORS = """
  - name: pressure_z
    detect: {kind: zscore, value: pressure_psi}
  - name: pressure_mad
    detect: {kind: mad, value: pressure_psi, where: "status = 'ok'"}
  - name: pressure_shift
    detect: {kind: cusum, value: pressure_psi}
  - name: pressure_climb
    detect: {kind: rate, value: pressure_psi, max_per_second: 2000, cooldown: 1m}
  - name: temp_stuck
    detect: {kind: stuck, value: temp_c, readings: 8, epsilon: 0.2}
  - name: quiet
    detect: {kind: silent, after: 5m}
"""


def detector_pipeline(dest: Path, rules: str = DETECTORS, extra: str = "", **kw) -> Path:
    """The shipped pipeline, with these detector rules added to its alert rules."""
    path = write_test_pipeline(dest, **kw)
    text = path.read_text()
    assert text.count("\nalerts:\n") == 1
    text = text.replace("\nalerts:\n", "\nalerts:\n" + rules.lstrip("\n"), 1)
    path.write_text(text + extra)
    return path


def alerts(con, lake: Path) -> list[tuple]:
    src = lake_source(lake, "alerts")
    if src is None:
        return []
    return con.execute(f"SELECT rule, kind, epoch_us(event_time), key, detail FROM {src} "
                       "ORDER BY ALL").fetchall()


def same_alerts(got: list[tuple], want: list[tuple]) -> bool:
    """The same alerts: rule, kind, event time and key exactly, and the same row, its numbers
    equal to 1e-12 relative. A window a crash split is folded from other chunks than in a
    clean run, so a sum or an average may differ in its last bit (0.4845868852459016 against
    0.4845868852459017); an alert missing, extra or with another value is still a difference."""
    import json
    import math

    def close(a, b) -> bool:
        if isinstance(a, float) or isinstance(b, float):
            return (isinstance(a, (int, float)) and isinstance(b, (int, float))
                    and math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
        return a == b

    def parsed(detail):
        try:
            return json.loads(detail)
        except (TypeError, ValueError):
            return detail

    def order(a: tuple):
        return (a[:4], json.dumps(rounded(parsed(a[4])), sort_keys=True))

    def rounded(v):
        if isinstance(v, float):
            return float(f"{v:.9g}")
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rounded(x) for x in v]
        return v
    if len(got) != len(want):
        return False
    return all(g[:4] == w[:4] and close(parsed(g[4]), parsed(w[4]))
               for g, w in zip(sorted(got, key=order), sorted(want, key=order)))


def snapshots(lake: Path) -> list[Path]:
    return sorted((lake / "_state").rglob("state-*.json.zst"))


def test_detector_alerts_after_ten_crashes_equal_a_clean_run(tmp_path, agent_bin, shardlake_bin,
                                                             capsys):
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    crashed.mkdir()
    simulate(agent_bin, crashed, shards=4, devices=60, readings=600, seed=7, spikes=40,
             malformed=5)
    # Ten minutes later the wells go on: every well was silent for longer than `after`.
    more = simulator_extension(agent_bin, crashed, shards=4, devices=60, after=600,
                               readings=600, seed=7)
    valid = 60 * 600 + more()
    pipeline = detector_pipeline(tmp_path / "detect.yaml", max_bytes="1MiB", max_age="1s")
    lake = crashed / "lake"
    con = duck()
    crashes = crash_runs(shardlake_bin, pipeline, crashed, con, lake, valid=valid, seed=26,
                         staged=lambda: f"{len(inprogress_files(lake))} files", extend=more)
    check_run([str(shardlake_bin), "run", str(pipeline), "--drain"],
              env=pipeline_env(crashed), timeout=300)

    clean.mkdir()
    shutil.copytree(crashed / "stream", clean / "stream")
    started = time.monotonic()
    proc = check_run([str(shardlake_bin), "run", str(pipeline), "--drain"],
                     env=pipeline_env(clean), timeout=300)
    took = time.monotonic() - started
    want = alerts(con, clean / "lake")
    got = alerts(con, lake)
    kinds = {}
    for rule, kind, *_ in want:
        kinds[kind] = kinds.get(kind, 0) + 1
    with capsys.disabled():
        print(f"\n[detectors] {crashes.report()}\n  clean run {took:.1f}s, alerts by kind: {kinds}")
    assert crashes.kills >= 10
    # Every detector had something to find, so the comparison compares something.
    assert {"zscore", "mad", "cusum", "rate", "stuck", "silent"} <= set(kinds), kinds
    # 60 wells were silent once in each 10-minute gap: the first, and each extension's.
    assert sum(1 for a in want if a[0] == "quiet") == 60 * (1 + crashes.extensions)
    missing = sorted(set(want) - set(got))[:5]
    extra = sorted(set(got) - set(want))[:5]
    assert same_alerts(got, want), (
        f"{len(got)} vs {len(want)} alerts; missing {missing}; extra {extra}")

    # An alert explains itself.
    z = next(json.loads(a[4]) for a in want if a[1] == "zscore")
    assert set(z) == {"series", "value", "baseline", "score", "threshold", "held_for_s"}, z
    assert z["score"] > z["threshold"] == 6 and set(z["baseline"]) == {"mean", "std"}, z
    # The clean run leaves one snapshot per shard; the checkpoint names each one it keeps.
    assert len(snapshots(clean / "lake")) == 4, snapshots(clean / "lake")
    assert any(e.get("message") == "run finished" and e.get("alerts") == len(want)
               for e in run_log(proc))
    checkpoint = json.loads((crashed / "state" / "well-telemetry" / "checkpoint.json").read_text())
    named = {cp["detectors"] for cp in checkpoint["committed"]["shards"].values()}
    assert len(named) == 4 and all((lake / key).is_file() for key in named), named


def write_stream(where: Path, shards: list[list[dict]]) -> None:
    """A local stream with these records on these shards (appended to what is there)."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "stream.json").write_text(json.dumps({"shards": len(shards)}))
    for i, records in enumerate(shards):
        with open(where / f"shardId-{i:012}.ndjson", "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


def readings(device: str, minutes: range, seq0: int = 0) -> list[dict]:
    """One reading every 10 s for these minutes of 2026-01-05 10:00 UTC on."""
    out = []
    for n, s in enumerate(range(minutes.start * 60, minutes.stop * 60, 10)):
        out.append({"device_id": device, "tenant": "acme", "seq": seq0 + n + 1,
                    "ts": f"2026-01-05T{10 + s // 3600:02}:{s // 60 % 60:02}:{s % 60:02}Z",
                    "pressure_psi": 2000.0 + n % 7, "temp_c": 60.0 + n % 5, "status": "ok"})
    return out


def test_silent_waits_for_a_lagging_shard_and_finds_the_one_that_stopped(tmp_path, shardlake_bin):
    rule = "\n  - name: quiet\n    detect: {kind: silent, after: 5m}\n"
    pipeline = detector_pipeline(tmp_path / "silent.yaml", rules=rule, max_bytes="1MiB",
                                 max_age="1s")
    # Shard 0 lags: its wells have sent 10 minutes while shard 1's went on for an hour, except
    # well-stop, which stopped at minute 20.
    lagging = [readings(f"lag-{i}", range(0, 10)) for i in range(3)]
    ahead = [readings(f"run-{i}", range(0, 60)) for i in range(3)] + [
        readings("well-stop", range(0, 20))]
    write_stream(tmp_path / "stream", [sum(lagging, []), sum(ahead, [])])
    con = duck()
    env = pipeline_env(tmp_path)
    check_run([str(shardlake_bin), "run", str(pipeline), "--drain"], env=env, timeout=120)
    # The watermark waits for shard 0: nobody is silent yet, although shard 1 is 50 minutes on.
    assert alerts(con, tmp_path / "lake") == []

    # Shard 0 catches up: only the well that stopped is silent, at its last reading + 5 min.
    caught_up = [readings(f"lag-{i}", range(10, 60), seq0=60) for i in range(3)]
    write_stream(tmp_path / "stream", [sum(caught_up, []), []])
    check_run([str(shardlake_bin), "run", str(pipeline), "--drain"], env=env, timeout=120)
    got = alerts(con, tmp_path / "lake")
    assert [(r, k, key) for r, k, _, key, _ in got] == [("quiet", "silent", "well-stop")], got
    last_seen_us = (1767607200 + 19 * 60 + 50) * 1_000_000  # 10:19:50
    assert got[0][2] == last_seen_us + 300 * 1_000_000
    detail = json.loads(got[0][4])
    assert detail["baseline"]["last_seen"].startswith("2026-01-05T10:19:50"), detail


def test_a_flood_of_new_devices_stays_within_the_series_bound(tmp_path, agent_bin, shardlake_bin):
    simulate(agent_bin, tmp_path, shards=2, devices=20_000, readings=3, seed=3, spikes=0,
             malformed=0)
    rule = "\n  - name: pressure_z\n    detect: {kind: zscore, value: pressure_psi}\n"
    bounded = detector_pipeline(tmp_path / "bounded.yaml", rules=rule, max_bytes="64MiB",
                                max_age="5m", extra="limits: {detector_series: 5000}\n")
    proc = check_run([str(shardlake_bin), "run", str(bounded), "--drain"],
                     env=pipeline_env(tmp_path), timeout=300)
    summary = next(e for e in run_log(proc) if e.get("message") == "run finished")
    # 20,000 series, each well's readings 20,000 records apart: every well is forgotten
    # before its next reading comes, and starts again.
    evicted = summary["detector_series_evicted"]
    # Each shard's snapshot holds what it kept: together no more than the bound.
    kept = 0
    for snap in snapshots(tmp_path / "lake"):
        with pa.input_stream(str(snap), compression="zstd") as f:
            state = json.loads(f.read())
        kept += sum(len(r["series"]) for r in state["rules"].values())
    # At most 5,000 kept (a flood evicts down to 1% below the bound at once); every other
    # series made was forgotten, and no more series were made than readings.
    assert 4_950 <= kept <= 5_000, kept
    assert 20_000 <= evicted + kept <= 60_000, (evicted, kept)
    assert evicted >= 15_000, evicted


def test_detector_alerts_after_lease_moves_equal_a_clean_run(tmp_path, kinesalite, moto,
                                                             agent_bin, shardlake_bin, capsys):
    """Two workers share a 4-shard kinesalite stream through moto's DynamoDB leases: w1 joins
    while w0 reads (two leases move to it), then w0 is SIGKILLed (its leases move to w1), and
    a last bounded run takes every lease. Each move hands a shard's learned state over through
    the snapshot its checkpoint names, so the alerts equal those of one worker reading the
    same stream alone."""
    import threading
    import uuid

    from servers import create_stream, put_lines
    from streamdata import interleave
    from test_dynamodb_leases_failover_resharding_and_faults import (
        kill_all, lease_table, owners, wait_until, worker_of)
    kinesis, ddb = kinesalite.client(), moto.client("dynamodb")
    name = f"wells-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, name, 4)
    sim = tmp_path / "sim"
    simulate(agent_bin, sim, shards=4, devices=60, readings=600, seed=7, spikes=40,
             malformed=5)
    # Ten minutes later the wells go on: every well is silent once.
    simulator_extension(agent_bin, sim, shards=4, devices=60, after=600, readings=600,
                        seed=7)()
    lines = interleave(sim / "stream")

    def run_dir(sub: str, table: str):
        where = tmp_path / sub
        where.mkdir()
        pipeline = detector_pipeline(
            where / "detect.yaml", max_bytes="1MiB", max_age="1s",
            source=f"{{kinesis: {{stream: {name}}}}}",
            checkpoints=f"{{dynamodb: {{table: {table}, failover_time: 4s, "
                        "shard_sync_interval: 5s}}")
        env = pipeline_env(where, {**AWS_TEST_ENV, "AWS_ENDPOINT_URL_KINESIS": kinesalite.url,
                                   "AWS_ENDPOINT_URL_DYNAMODB": moto.url})
        return where, pipeline, env

    third = len(lines) // 3
    put = put_lines(kinesis, name, lines[:third])
    table = f"leases-{uuid.uuid4().hex[:8]}"
    moved, pipeline, env = run_dir("moved", table)
    rest: list = []
    producer = threading.Thread(target=lambda: rest.extend(put_lines(kinesis, name,
                                                                      lines[third:])))
    logs: list = []

    def start(worker: str) -> subprocess.Popen:
        logs.append(open(moved / f"{worker}.log", "w"))
        return subprocess.Popen([str(shardlake_bin), "run", str(pipeline), "--worker-id", worker],
                                env=env, stdout=subprocess.DEVNULL, stderr=logs[-1])

    def held() -> dict[str, int]:
        """Worker → number of leases it holds."""
        out: dict[str, int] = {}
        for owner, keys in owners(lease_table(ddb, table)).items():
            out[worker_of(owner)] = out.get(worker_of(owner), 0) + len(keys)
        return out

    workers = [start("w0")]
    try:
        def committed():
            try:
                leases = lease_table(ddb, table)
            except ddb.exceptions.ResourceNotFoundException:  # not created yet
                return False
            return len(leases) == 4 and all(it["checkpoint"].isdigit() for it in leases.values())
        wait_until("w0 to commit from every shard", committed, timeout=90, every=0.2)
        producer.start()
        # w1 joins: the leases are shared 2/2, two of them taken from w0 mid-stream.
        workers.append(start("w1"))
        wait_until("w1 to take two of w0's leases", lambda: held() == {"w0": 2, "w1": 2},
                   timeout=60, every=0.2)
        before = {k: it["checkpoint"] for k, it in lease_table(ddb, table).items()}
        wait_until("w1 to commit on a shard it took",
                   lambda: any(it["checkpoint"] != before[k]
                               for k, it in lease_table(ddb, table).items()
                               if worker_of(it.get("leaseOwner", "-")) == "w1"),
                   timeout=60, every=0.2)
        workers[0].kill()
        workers[0].wait()
        wait_until("w1 to take the killed worker's leases", lambda: held() == {"w1": 4},
                   timeout=60, every=0.2)
        producer.join(timeout=300)
        assert not producer.is_alive()
        workers[1].terminate()
        assert workers[1].wait(timeout=60) == 0
    finally:
        kill_all(workers, logs)
    put += rest
    assert len(put) == len(lines)
    check_run([str(shardlake_bin), "run", str(pipeline), "--drain", "--worker-id", "last"],
              env=env, timeout=300)

    clean, clean_pipeline, clean_env = run_dir("clean", f"leases-{uuid.uuid4().hex[:8]}")
    check_run([str(shardlake_bin), "run", str(clean_pipeline), "--drain", "--worker-id", "solo"],
              env=clean_env, timeout=300)
    con = duck()
    want, got = alerts(con, clean / "lake"), alerts(con, moved / "lake")
    kinds: dict[str, int] = {}
    for _, kind, *_ in want:
        kinds[kind] = kinds.get(kind, 0) + 1
    sessions = {f"w{i}": (moved / f"w{i}.log").read_text().count('"reading shard"')
                for i in range(2)}
    with capsys.disabled():
        print(f"\n[detectors, leases] {len(put)} records; shard reads started per worker "
              f"{sessions}; alerts by kind {kinds}")
    # Every detector had something to find, and every well was silent once.
    assert {"zscore", "mad", "cusum", "rate", "stuck", "silent"} <= set(kinds), kinds
    assert sum(1 for a in want if a[0] == "quiet") == 60
    missing = sorted(set(want) - set(got))[:5]
    extra = sorted(set(got) - set(want))[:5]
    assert same_alerts(got, want), (
        f"{len(got)} vs {len(want)} alerts; missing {missing}; extra {extra}")


RESHARD_DETECTORS = DETECTORS.replace("after: 5m", "after: 30s")


def test_a_device_keeps_its_detector_state_across_a_split_and_a_merge(tmp_path, kinesis_local,
                                                                     moto, agent_bin,
                                                                     shardlake_bin, capsys):
    """kinesis-local splits a shard and merges two others while a worker with DynamoDB leases
    reads (its children are read in later lease sessions, their parents' state taken from the
    snapshots the parents' items name), then a bounded run finishes. Each device's state
    follows it to the child it goes to, so the alerts are those of one run over the same
    records on one unsplit shard: no warm-up starts again, and no device that moved is called
    silent on the shard it left."""
    import uuid

    from servers import create_stream, put_while_resharding
    from streamdata import interleave
    from test_dynamodb_leases_failover_resharding_and_faults import (
        kill_all, last_sequence, lease_run, lease_table, start_workers, wait_until)
    kinesis, ddb = kinesis_local.client(), moto.client("dynamodb")
    name, table = f"wells-{uuid.uuid4().hex[:8]}", f"leases-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, name, 3)
    simulate(agent_bin, tmp_path / "sim", shards=3, devices=60, readings=150, seed=43,
             spikes=30, malformed=6)
    lines = interleave(tmp_path / "sim" / "stream")
    resharded = tmp_path / "resharded"
    resharded.mkdir()
    pipeline, env = lease_run(resharded, "reshard.yaml", name, table, kinesis_local.url,
                              moto.url, sync_s=2)
    text = pipeline.read_text()
    pipeline.write_text(text.replace("\nalerts:\n", "\nalerts:\n" + RESHARD_DETECTORS.lstrip("\n"), 1))
    workers, logs = start_workers(shardlake_bin, pipeline, env, resharded, 1)
    try:
        put, ids = put_while_resharding(kinesis, name, lines)
        last = last_sequence(put)
        children = [s["ShardId"] for s in kinesis.list_shards(StreamName=name)["Shards"]
                    if s["ShardId"] not in ids]

        def done():
            leases = lease_table(ddb, table)
            return (all(leases.get(p, {}).get("checkpoint") == "SHARD_END" for p in ids)
                    and all(c in leases and leases[c]["checkpoint"] == str(last[c])
                            for c in children if c in last))
        wait_until("the parents to end and every child to reach its last record", done,
                   timeout=180, every=0.5)
        workers[0].terminate()
        assert workers[0].wait(timeout=60) == 0
    finally:
        kill_all(workers, logs)
    check_run([str(shardlake_bin), "run", str(pipeline), "--drain", "--worker-id", "last"],
              env=env, timeout=300)
    log = (resharded / "w0.log").read_text()
    assert log.count("start from its parents' state") >= 3, "every child inherits"

    # The same records, each device's in the order put, on one local shard.
    clean = tmp_path / "clean"
    (clean / "stream").mkdir(parents=True)
    (clean / "stream" / "stream.json").write_text(json.dumps({"shards": 1}))
    with open(clean / "stream" / "shardId-000000000000.ndjson", "wb") as f:
        for line, _, _ in put:
            f.write(line.rstrip(b"\n") + b"\n")
    clean_pipeline = detector_pipeline(clean / "detect.yaml", rules=RESHARD_DETECTORS,
                                       max_bytes="1MiB", max_age="1s")
    check_run([str(shardlake_bin), "run", str(clean_pipeline), "--drain"],
              env=pipeline_env(clean), timeout=300)
    con = duck()
    def unplaced(rows: list[tuple]) -> list[tuple]:
        """A record alert's row names the shard and sequence number it was read at, which
        differ between the streams; everything else must not."""
        out = []
        for *head, detail in rows:
            try:
                d = json.loads(detail)
            except (TypeError, ValueError):
                d = None
            if isinstance(d, dict) and "_shard_id" in d:
                d.pop("_shard_id")
                d.pop("_sequence_number", None)
                detail = json.dumps(d, sort_keys=True)
            out.append((*head, detail))
        return out
    want = unplaced(alerts(con, clean / "lake"))
    got = unplaced(alerts(con, resharded / "lake"))
    kinds: dict[str, int] = {}
    for _, kind, *_ in want:
        kinds[kind] = kinds.get(kind, 0) + 1
    with capsys.disabled():
        print(f"\n[detectors, reshard] {len(put)} records; split {ids[0]}, merged {ids[1]} and "
              f"{ids[2]}; alerts by kind {kinds}")
    assert {"zscore", "mad", "cusum", "rate"} <= set(kinds), kinds
    missing = sorted(set(want) - set(got))[:5]
    extra = sorted(set(got) - set(want))[:5]
    assert same_alerts(got, want), (
        f"{len(got)} vs {len(want)} alerts; missing {missing}; extra {extra}")


def shard_of(partition_key: str, shards: int) -> int:
    """The shard a local stream (like Kinesis) puts a partition key on: its MD5's top bits."""
    h = int.from_bytes(hashlib.md5(partition_key.encode()).digest(), "big")
    return ((h >> 64) * shards) >> 64


def test_a_known_device_that_never_reports_is_found_silent_once(tmp_path, shardlake_bin):
    """`known:` lists the wells expected to report: the ones that never did are silent too,
    each found once, by the worker whose shard their partition key hashes to, and not again
    after a restart."""
    devices = ["on-0", "on-1", "on-2", "on-3", "stops", "never-a", "never-b", "never-c"]
    (tmp_path / "wells.csv").write_text(
        "tenant,device_id,site\n" + "".join(f"acme,{d},north\n" for d in devices))
    rule = ("\n  - name: quiet\n    detect:\n      kind: silent\n      after: 5m\n"
            f"      known: {{file: {tmp_path / 'wells.csv'}, partition_key: \"{{tenant}}/{{device_id}}\"}}\n")
    pipeline = detector_pipeline(tmp_path / "known.yaml", rules=rule, max_bytes="1MiB",
                                 max_age="1s")
    shards = [[], []]
    for d in devices:
        if d.startswith("on-"):
            shards[shard_of(f"acme/{d}", 2)] += readings(d, range(0, 30))
        elif d == "stops":
            shards[shard_of(f"acme/{d}", 2)] += readings(d, range(0, 10))
    never = [d for d in devices if d.startswith("never-")]
    assert {shard_of(f"acme/{d}", 2) for d in never} == {0, 1}, "never-* on both shards"
    assert all(shards), "both shards have readings"
    write_stream(tmp_path / "stream", shards)
    env = pipeline_env(tmp_path)
    check_run([str(shardlake_bin), "run", str(pipeline), "--drain"], env=env, timeout=120)
    con = duck()
    got = alerts(con, tmp_path / "lake")
    start_us = 1767607200 * 1_000_000  # 10:00:00, each shard's first reading
    assert [(r, k, key, t) for r, k, t, key, _ in got] == sorted(
        [("quiet", "silent", d, start_us + 300 * 1_000_000) for d in never]
        + [("quiet", "silent", "stops", start_us + (9 * 60 + 50 + 300) * 1_000_000)]), got
    for _, _, _, key, detail in got:
        base = json.loads(detail)["baseline"]
        if key.startswith("never-"):
            assert base["last_seen"] is None and base["watched_since"].startswith(
                "2026-01-05T10:00:00"), base
        else:
            assert base["last_seen"].startswith("2026-01-05T10:09:50"), base

    # A restart with more readings: nobody is found silent twice, and never-a, reporting at
    # last, is not silent again while it reports.
    more = [[], []]
    for d in devices:
        if d.startswith("on-") or d == "never-a":
            more[shard_of(f"acme/{d}", 2)] += readings(d, range(30, 40), seq0=1000)
    write_stream(tmp_path / "stream", more)
    check_run([str(shardlake_bin), "run", str(pipeline), "--drain"], env=env, timeout=120)
    assert alerts(con, tmp_path / "lake") == got


def test_known_devices_on_kinesis_are_watched_by_the_shard_their_key_hashes_to(
        tmp_path, kinesis_local, shardlake_bin):
    """On Kinesis the shard that watches a listed device is the one whose ListShards
    HashKeyRange holds its partition key's MD5: each listed device that never reported is
    found silent exactly once over the stream's two shards."""
    import uuid

    from harness import kinesis_pipeline
    from servers import create_stream, put_lines
    kinesis = kinesis_local.client()
    name = f"known-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, name, 2)
    reporting = [f"on-{i}" for i in range(6)]
    never = [f"never-{c}" for c in "abcd"]
    (tmp_path / "wells.csv").write_text(
        "device_id,tenant\n" + "".join(f"{d},acme\n" for d in reporting + never))
    rows = sorted((r for d in reporting for r in readings(d, range(0, 15))),
                  key=lambda r: (r["ts"], r["device_id"]))
    put = put_lines(kinesis, name, [json.dumps(r).encode() for r in rows],
                    key=lambda line: "acme/" + json.loads(line)["device_id"])
    assert len({shard for _, shard, _ in put}) == 2, "readings on both shards"
    pipeline = kinesis_pipeline(tmp_path, name, max_bytes="1MiB", max_age="1s")
    text = pipeline.read_text()
    rule = ("  - name: quiet\n    detect:\n      kind: silent\n      after: 5m\n"
            f"      known: {{file: {tmp_path / 'wells.csv'}, partition_key: \"acme/{{device_id}}\"}}\n")
    pipeline.write_text(text.replace("\nalerts:\n", "\nalerts:\n" + rule, 1))
    check_run([str(shardlake_bin), "run", str(pipeline), "--drain"],
              env=pipeline_env(tmp_path, kinesis_local.env()), timeout=180)
    got = alerts(duck(), tmp_path / "lake")
    start_us = 1767607200 * 1_000_000  # 10:00:00, each shard's first reading
    assert [(r, key, t) for r, _, t, key, _ in got] == [
        ("quiet", d, start_us + 300 * 1_000_000) for d in never], got
