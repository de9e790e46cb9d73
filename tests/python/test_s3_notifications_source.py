"""Objects named by S3 event notifications: moto's S3 sends a notification to moto's SQS for
each upload (`s3:ObjectCreated:*`), and `source: {s3: {..., notifications: {queue: ...}}}`
reads each object it names once, deleting the message only after the object's records are
committed. Objects that are gone, overwritten since, outside the prefix, of an unknown format
or too large are skipped or dead-lettered and the worker goes on; a message that came back
more than `max_receives` times sends its object to dead-letter whole (`object_unreadable`)
instead of coming back forever; SIGKILLs mid-run never lose a message before its object is
committed, and every reading lands once.

Objects, expected rows and checks come from test_s3_files_source (the same readings, the
same DuckDB checks of the lake).
"""

from __future__ import annotations

import random
import signal
import subprocess
import time

import test_s3_files_source as files
from crash import no_core_dumps
from harness import pipeline_env, wait_until
from lake import duck, inprogress_files, lake_count, lake_source

BUCKET, PREFIX = files.BUCKET, files.PREFIX
QUEUE = "uploads-created"


def notifying_bucket(moto) -> tuple:
    """The bucket, its queue, and S3 → SQS notifications of every created object."""
    s3, sqs = moto.client("s3"), moto.client("sqs")
    s3.create_bucket(Bucket=BUCKET)
    url = sqs.create_queue(QueueName=QUEUE)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"]
    s3.put_bucket_notification_configuration(Bucket=BUCKET, NotificationConfiguration={
        "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]})
    return s3, sqs, url


def messages_left(sqs, url: str) -> int:
    a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return int(a["ApproximateNumberOfMessages"]) + int(a["ApproximateNumberOfMessagesNotVisible"])


def notified_pipeline(tmp_path, *, max_receives: int = 5, max_object_bytes: str = "10GiB",
                      **rollover):
    source = (f"{{s3: {{bucket: {BUCKET}, prefix: {PREFIX}, max_object_bytes: {max_object_bytes}, "
              f"notifications: {{queue: {QUEUE}, visibility_timeout: 10s, "
              f"max_receives: {max_receives}}}}}}}")
    return files.objects_pipeline(tmp_path, source, **rollover)


def test_notified_objects_are_read_once_and_skipped_or_dead_lettered_when_they_cannot_be(
        tmp_path, moto, shardlake_bin, capsys):
    s3, sqs, url = notifying_bucket(moto)
    rng = random.Random(20261203)
    # A poison object first: its message is received twice by someone who never deletes it
    # (a worker that crashed on it), so the worker's receive is its third (max_receives: 2).
    poison = files.ndjson_object("site-p/poison.ndjson", files.readings(rng, "p", 5, 20))
    poison.whole, poison.records = "object_unreadable", []
    poison_etag = files.put(s3, PREFIX + poison.key, poison.body)
    received = 0
    for _ in range(2):
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0)
        received += sum("poison" in m["Body"] for m in got.get("Messages", []))
    assert received == 2, "the poison object's notification was not received twice"

    objs = [
        files.ndjson_object("site-a/readings.ndjson", files.readings(rng, "a", 10, 60)),
        files.compressed(files.ndjson_object("site-b/readings.ndjson.gz",
                                             files.readings(rng, "b", 10, 60)), "gzip"),
        files.compressed(files.csv_object("site-c/readings.csv.zst",
                                          files.readings(rng, "c", 10, 60)), "zstd"),
    ]
    unknown = files.Obj("site-d/readings.bin", body=b"\x00\x01binary", whole="unknown_format")
    huge = files.ndjson_object("site-e/huge.ndjson", files.readings(rng, "e", 40, 60))
    huge.whole, huge.records = "object_too_large", []
    assert len(huge.body) > files.MAX_OBJECT_BYTES
    shard_of = {poison.key: f"{PREFIX}{poison.key}@{poison_etag}"}
    for o in objs + [unknown, huge]:
        shard_of[o.key] = f"{PREFIX}{o.key}@{files.put(s3, PREFIX + o.key, o.body)}"
    # Overwritten before it was read: the first version's notification names an old ETag and
    # is skipped; the second's is read.
    first = files.ndjson_object("site-f/readings.ndjson", files.readings(rng, "f-old", 5, 30))
    files.put(s3, PREFIX + first.key, first.body)
    second = files.ndjson_object(first.key, files.readings(rng, "f", 5, 30))
    shard_of[second.key] = f"{PREFIX}{second.key}@{files.put(s3, PREFIX + second.key, second.body)}"
    # Gone before it was read, and outside the prefix: each skipped, nothing of them read.
    gone = files.ndjson_object("site-g/gone.ndjson", files.readings(rng, "g", 5, 30))
    files.put(s3, PREFIX + gone.key, gone.body)
    s3.delete_object(Bucket=BUCKET, Key=PREFIX + gone.key)
    outside = files.ndjson_object("x", files.readings(rng, "out", 5, 30))
    s3.put_object(Bucket=BUCKET, Key="elsewhere/readings.ndjson", Body=outside.body)
    everything = objs + [unknown, huge, poison, second]
    assert messages_left(sqs, url) >= len(everything) + 3

    pipeline = notified_pipeline(tmp_path, max_receives=2, max_object_bytes="256KiB")
    took = files.run_drain(shardlake_bin, pipeline, tmp_path, moto.env())
    con, lake = duck(), tmp_path / "lake"
    assert inprogress_files(lake) == []
    data, raw_differs = files.check_objects(con, lake, everything, shard_of)
    read = files.shard_counts(con, lake)
    assert set(read) == {shard_of[o.key] for o in objs + [second]}, (
        f"shards read: {sorted(read)}; the old version, the deleted object and the one outside "
        "the prefix must not be")
    # The poison object's dead letter says why.
    dl = lake_source(lake, "dead_letter")
    why = con.execute(f"SELECT reason FROM {dl} WHERE _shard_id = ?",
                      [shard_of[poison.key]]).fetchall()
    assert len(why) == 1 and "received 3 times" in why[0][0], why
    # Every message deleted: the objects are committed (or skipped for good).
    wait_until("the queue to be empty", lambda: messages_left(sqs, url) == 0, timeout=30)

    # A new upload while nothing is left: read alone, once.
    later = files.ndjson_object("site-a/later.ndjson", files.readings(
        rng, "a2", 10, 30, start_ms=files.T0_MS + 3600_000))
    shard_of[later.key] = f"{PREFIX}{later.key}@{files.put(s3, PREFIX + later.key, later.body)}"
    # A drained run ends at a receive that finds nothing visible. The last run's final long
    # poll may still have been open at moto when it exited and taken the new message (as a
    # receive in flight would on SQS): then it is invisible for its 10 s. Wait until it is
    # visible.
    wait_until("the new object's notification to be visible", lambda: int(
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"][
            "ApproximateNumberOfMessages"]) >= 1, timeout=30, every=0.2)
    before = files.lake_totals(con, lake)
    took2 = files.run_drain(shardlake_bin, pipeline, tmp_path, moto.env())
    after = files.lake_totals(con, lake)
    assert after["readings"] == before["readings"] + len(later.records)
    assert after["dead_letter"] == before["dead_letter"]
    files.check_objects(con, lake, everything + [later], shard_of)
    wait_until("the queue to be empty", lambda: messages_left(sqs, url) == 0, timeout=30)
    with capsys.disabled():
        print(f"\n[s3 notifications] {len(data.valid)} readings from {len(read)} objects, "
              f"{before['dead_letter']} dead letters; runs took {took:.1f}s, {took2:.1f}s")
    files.assert_raw_as_read(raw_differs)


def test_sigkill_during_a_notification_run_deletes_no_message_before_its_commit(
        tmp_path, moto, shardlake_bin, capsys):
    s3, sqs, url = notifying_bucket(moto)
    rng = random.Random(7)
    # Ten objects of 20,000 readings over the same five minutes (none can be late whichever
    # is read first), gzip and plain.
    objs = []
    for i in range(10):
        o = files.ndjson_object(f"site-{i}/readings.ndjson" + (".gz" if i % 2 else ""),
                                files.readings(rng, f"k{i}", 100, 200, spikes=1))
        objs.append(files.compressed(o, "gzip") if i % 2 else o)
    shard_of = {o.key: f"{PREFIX}{o.key}@{files.put(s3, PREFIX + o.key, o.body)}" for o in objs}
    pipeline = notified_pipeline(tmp_path, max_bytes="1MiB", max_age="1s")
    con, lake = duck(), tmp_path / "lake"
    cmd = [str(shardlake_bin), "run", str(pipeline), "--drain"]
    rnd = random.Random(20261203)
    kills, runs, extensions, events = 0, 0, 0, []
    deadline = time.monotonic() + 600
    while True:
        runs += 1
        assert runs <= 40 and time.monotonic() < deadline, "\n".join(events)
        counts = files.shard_counts(con, lake)
        done_before = sum(counts.get(shard_of[o.key], 0) == len(o.records) for o in objs)
        log_path = tmp_path / f"run-{runs:02}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, env=pipeline_env(tmp_path, moto.env()), cwd=tmp_path,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=no_core_dumps)
            try:
                if kills < 6:
                    # Once a commit made progress (an object more, or more of one), at a random
                    # moment after it.
                    had = sum(counts.values())
                    wait_until(f"run {runs} to commit more than {had} readings",
                               lambda: proc.poll() is not None
                               or sum(files.shard_counts(con, lake).values()) > had,
                               timeout=120, every=0.1)
                    rc = proc.wait(timeout=rnd.uniform(0.0, 0.8))
                else:
                    rc = proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                rc = proc.wait()
        if rc not in (0, -signal.SIGKILL):
            raise AssertionError(f"run {runs} exited {rc}:\n"
                                 f"{log_path.read_text(errors='replace')[-4000:]}")
        kills += rc == -signal.SIGKILL
        counts = files.shard_counts(con, lake)
        src = lake_source(lake, "readings")
        if src:
            dups = con.execute(f"SELECT count(*) - count(DISTINCT (device_id, seq)) "
                               f"FROM {src}").fetchall()[0][0]
            assert dups == 0, f"after run {runs} the readings have {dups} duplicates"
        unfinished = sum(counts.get(shard_of[o.key], 0) < len(o.records) for o in objs)
        left = messages_left(sqs, url)
        # One message per object (and S3's test event): a message of an object not wholly
        # committed must still be there.
        assert left >= unfinished, (
            f"after run {runs}: {unfinished} objects not wholly committed but {left} messages "
            f"left: one was deleted before its object was committed\n" + "\n".join(events))
        events.append(f"run {runs:2}: {'SIGKILL' if rc else 'exited'}; objects done "
                      f"{done_before} -> {len(objs) - unfinished}, messages left {left}")
        if unfinished == 0 and rc == 0:
            if kills >= 6:
                break
            # Drained before enough kills (a fast machine): one more object, of later readings
            # (windows after every window already emitted), once its message is visible.
            extensions += 1
            assert extensions <= 8, "\n".join(events)
            o = files.compressed(files.ndjson_object(
                f"more-{extensions}/readings.ndjson.gz",
                files.readings(rng, f"m{extensions}", 200, 600, spikes=1,
                               start_ms=files.T0_MS + extensions * 1200_000)), "gzip")
            objs.append(o)
            shard_of[o.key] = f"{PREFIX}{o.key}@{files.put(s3, PREFIX + o.key, o.body)}"
            events.append(f"drained after {kills} kills: one more object")
            wait_until("the new object's notification to be visible", lambda: int(
                sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"][
                    "ApproximateNumberOfMessages"]) >= 1, timeout=30, every=0.2)
            continue
        if rc == 0 and left > 0:
            # A drained run ends at an empty queue: the killed runs' messages are still
            # invisible for their 10 s; wait until they are back before the next run.
            wait_until("the messages of the killed runs to be visible again", lambda: int(
                sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"][
                    "ApproximateNumberOfMessages"]) > 0, timeout=60, every=0.5)
    with capsys.disabled():
        print(f"\n[s3 notifications crashes] {kills} SIGKILLs in {runs} runs:\n  "
              + "\n  ".join(events))
    assert kills >= 5, "\n".join(events)
    files.check_objects(con, lake, objs, shard_of)
    # The last run may have finished objects whose messages the killed runs held (invisible
    # for their 10 s): once they are back, a run deletes them without reading anything again.
    totals = files.lake_totals(con, lake)
    if messages_left(sqs, url):
        wait_until("the held messages to be visible again", lambda: int(
            sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"][
                "ApproximateNumberOfMessagesNotVisible"]) == 0, timeout=60, every=0.5)
        files.run_drain(shardlake_bin, pipeline, tmp_path, moto.env())
        assert files.lake_totals(con, lake) == totals, "a redelivered message read its object again"
    wait_until("the queue to be empty", lambda: messages_left(sqs, url) == 0, timeout=30)
    assert lake_count(con, lake, "dead_letter") == 0
