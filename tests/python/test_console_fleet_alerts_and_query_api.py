"""The console (issue 23): the fleet page, the alert feed and acknowledgements in a real
browser (Debian's headless Chromium through Selenium), the event stream's resume, and the
query API's limits, against a real worker and a real console over a local stream and lake.

Exercises src/console/, src/live.rs and the worker's GET /live (src/ops.rs).
"""

from __future__ import annotations

import io
import json
import subprocess

import pyarrow.ipc
import pytest

from console import ConsoleRun, EventStream, chromium_driver, shoot, wait_in_page
from harness import free_port, pipeline_env, wait_until
from lake import duck

XSS = '<img src=x onerror="window.__xss=1">'


@pytest.fixture
def run(tmp_path, shardlake_bin, agent_bin):
    r = ConsoleRun(shardlake_bin, agent_bin, tmp_path)
    yield r
    r.close()


@pytest.fixture
def browsers():
    drivers = []

    def make():
        d = chromium_driver()
        drivers.append(d)
        return d
    yield make
    for d in drivers:
        d.quit()


def fleet_value(device: str, field: str) -> str:
    return (f"(document.querySelector('#fleet-body tr[data-device=\"{device}\"] "
            f"td[data-field=\"{field}\"]') || {{textContent: ''}}).textContent")


def alert_rows(device: str) -> str:
    """The ids of the alert feed's rows for a device, as the page shows them."""
    return ("[...document.querySelectorAll('#alerts-body tr')].filter(tr => "
            f"tr.children[2].textContent === {json.dumps(device)}).map(tr => tr.dataset.alert)")


def test_fleet_page_updates_live_alerts_arrive_and_acknowledgements_are_shared(
        run, browsers, tmp_path):
    page = browsers()
    page.get(run.base + "/#/fleet")
    n = run.devices
    wait_in_page(page, "every device listed",
                 f"document.getElementById('fleet-count').textContent === '{n} of {n} devices'")
    # Marks this page load: still there later means nothing reloaded.
    page.execute_script("window.__same_page = 'yes';")
    shoot(page, tmp_path, "fleet")

    # A reading changes a device's row; a spike raises an alert; neither needs a reload.
    run.append("well-0003", pressure=4321.5)
    wait_in_page(page, "well-0003's new pressure", fleet_value("well-0003", "pressure_psi") + " === '4321.50'")
    run.append("well-0004", pressure=6543.0)
    run.append(XSS, pressure=1234.0)
    page.execute_script("location.hash = '#/alerts'")
    ids = wait_in_page(page, "the spike's alert in the feed", alert_rows("well-0004") + ".length ? " + alert_rows("well-0004") + " : null")
    assert len(ids) == 1, ids
    assert page.execute_script("return window.__same_page") == "yes", "the page reloaded"
    shoot(page, tmp_path, "alerts")

    # A device id that looks like markup is shown as text, and no script ran.
    page.execute_script("location.hash = '#/fleet'")
    wait_in_page(page, "the markup-named device as text",
                 "[...document.querySelectorAll('#fleet-body td.device')].some(td => td.textContent === "
                 + json.dumps(XSS) + ")")
    assert page.execute_script("return window.__xss") is None
    assert page.execute_script("return document.querySelectorAll('#fleet-body img').length") == 0
    csp = run.api("GET", "/")[1]["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp, csp

    # Acknowledged on one page, seen on another user's page.
    page.execute_script("location.hash = '#/alerts'")
    page.execute_script(f"document.querySelector('#alerts-body tr[data-alert=\"{ids[0]}\"] button').click()")
    ack_cell = f"(document.querySelector('#alerts-body tr[data-alert=\"{ids[0]}\"] td.ack') || {{textContent: ''}}).textContent"
    wait_in_page(page, "the acknowledgement on the page that made it", ack_cell + ".startsWith('by local')")
    other = browsers()
    other.get(run.base + "/#/alerts")
    wait_in_page(other, "the acknowledgement on another page", ack_cell + ".startsWith('by local')")
    shoot(other, tmp_path, "alerts-acknowledged")

    # The device page: aggregates from the lake (through the merged view) and recent readings.
    page.execute_script("location.hash = '#/device/well-0003'")
    wait_in_page(page, "the device chart", "Number(document.getElementById('chart').dataset.points || 0) > 0", timeout=60)
    wait_in_page(page, "recent readings", "document.querySelectorAll('#readings-body tr').length > 0")
    shoot(page, tmp_path, "device")

    # The console restarts while the page stays open (a dropped connection that the server
    # side forgot); an alert raised meanwhile arrives once, and the acknowledgement survived.
    page.execute_script("location.hash = '#/alerts'")
    run.stop_console()
    run.append("well-0005", pressure=7000.0)
    run.start_console()
    again = wait_in_page(page, "the alert raised while the console was down",
                         alert_rows("well-0005") + ".length ? " + alert_rows("well-0005") + " : null",
                         timeout=60)
    assert len(again) == 1, again
    assert page.execute_script("return window.__same_page") == "yes", "the page reloaded"
    every = page.execute_script("return [...document.querySelectorAll('#alerts-body tr')].map(tr => tr.dataset.alert)")
    assert len(every) == len(set(every)), "an alert is shown twice"
    wait_in_page(page, "the acknowledgement after the restart", ack_cell + ".startsWith('by local')")

    # The query page shows a table.
    page.execute_script("location.hash = '#/query'")
    page.execute_script("document.getElementById('sql').value = 'SELECT count(*) AS n FROM readings'")
    page.execute_script("document.getElementById('run-query').click()")
    wait_in_page(page, "the query's answer", "document.querySelectorAll('#result-body tr').length === 1")
    shoot(page, tmp_path, "query")
    errors = [e for e in page.get_log("browser")
              if e["level"] == "SEVERE" and "favicon" not in e["message"]
              and "api/events" not in e["message"]]
    assert not errors, errors


def test_event_stream_resumes_after_last_event_id_without_gap_or_double(run):
    first = EventStream(run.listen)
    seen: dict[str, int] = {}
    last = None

    def take(stream, until):
        nonlocal last
        while not until():
            name, ident, data = stream.next_event()
            assert name == "changes", (name, data)
            epoch, version = ident.split(".")
            if last is not None:
                assert epoch == last.split(".")[0] and int(version) > int(last.split(".")[1]), (
                    "event ids go forward", last, ident)
            last = ident
            for a in json.loads(data)["alerts"]:
                seen[a["device"]] = seen.get(a["device"], 0) + 1

    run.append("well-0001", pressure=9001.0)
    take(first, lambda: "well-0001" in seen)
    first.close()
    # While no one listens: three more spikes.
    for d in ("well-0002", "well-0006", "well-0007"):
        run.append(d, pressure=8000.0)
    wait_until("the console to have them", lambda: sum(
        1 for a in json.loads(run.api("GET", "/api/fleet")[2])["alerts"]
        if a["device"] in ("well-0002", "well-0006", "well-0007")) == 3, timeout=30)
    resumed = EventStream(run.listen, last_event_id=last)
    take(resumed, lambda: all(d in seen for d in ("well-0002", "well-0006", "well-0007")))
    resumed.close()
    assert seen == {"well-0001": 1, "well-0002": 1, "well-0006": 1, "well-0007": 1}, seen
    # A cursor of another numbering (a console that restarted) is told to start again.
    other = EventStream(run.listen, last_event_id="0." + last.split(".")[1])
    assert other.next_event()[0] == "reset"
    other.close()


def test_query_api_answers_read_only_sql_in_three_formats_and_refuses_the_rest(run, tmp_path):
    wait_until("readings committed", lambda: json.loads(
        run.query("SELECT count(*) AS n FROM readings")[2])[0]["n"] == run.summary["readings"],
        timeout=60, every=0.3)
    sql = "SELECT device_id, count(*) AS n, round(sum(pressure_psi), 3) AS p FROM readings GROUP BY device_id ORDER BY device_id"
    con = duck()
    truth = con.execute(
        f"SELECT device_id, count(*), round(sum(pressure_psi), 3) FROM read_parquet('{tmp_path}/lake/readings/**/*.parquet') GROUP BY 1 ORDER BY 1").fetchall()
    status, headers, body = run.query(sql)
    assert status == 200 and headers["content-type"] == "application/json"
    assert [(r["device_id"], r["n"], r["p"]) for r in json.loads(body)] == truth
    status, headers, body = run.query(sql, accept="text/csv")
    assert status == 200 and headers["content-type"].startswith("text/csv")
    lines = body.decode().strip().splitlines()
    assert lines[0] == "device_id,n,p" and len(lines) == len(truth) + 1
    status, headers, body = run.query(sql, accept="application/vnd.apache.arrow.stream")
    table = pyarrow.ipc.open_stream(io.BytesIO(body)).read_all()
    assert list(zip(*[table.column(c).to_pylist() for c in ("device_id", "n", "p")])) == truth

    # The row limit cuts and says so.
    status, headers, body = run.query("SELECT * FROM readings", limit=7)
    assert status == 200 and len(json.loads(body)) == 7 and headers["x-shardlake-truncated"] == "true"

    for bad, status_wanted, says in [
        ("INSERT INTO readings SELECT * FROM readings", 403, "writes"),
        ("COPY readings TO '/tmp/out.parquet'", 403, "COPY"),
        ("CREATE EXTERNAL TABLE pw STORED AS CSV LOCATION '/etc/passwd'", 403, "CREATE EXTERNAL TABLE"),
        ("DROP TABLE readings", 403, "DDL"),
        ("SELECT * FROM '/etc/passwd'", 400, "/etc/passwd"),
        ("SELECT * FROM 's3://another-bucket/x.parquet'", 400, "another-bucket"),
        ("SELECT * FROM information_schema.tables", 400, "information_schema"),
        ("SELECT * FROM nowhere", 400, "nowhere"),
        ("SELECT no_such_column FROM readings", 400, "no_such_column"),
        ("SELEC 1", 400, "SELEC"),
        ("SELECT 1; DROP TABLE readings", 403, "one statement"),
    ]:
        status, _, body = run.query(bad)
        message = json.loads(body)["error"]
        assert (status, says in message) == (status_wanted, True), (bad, status, message)
    status, _, body = run.api("POST", "/api/query", b"not json", {"content-type": "application/json"})
    assert status == 400 and "JSON" in json.loads(body)["error"]
    status, _, body = run.api("GET", "/api/nothing")
    assert status == 404 and "error" in json.loads(body)


def test_a_slow_query_is_cancelled_and_says_so(tmp_path, shardlake_bin, agent_bin):
    r = ConsoleRun(shardlake_bin, agent_bin, tmp_path, devices=3,
                   console_args=("--query-timeout", "300ms"))
    try:
        status, _, body = r.query("SELECT count(*) FROM generate_series(1, 5000000000)")
        message = json.loads(body)["error"]
        assert status == 503 and "cancelled" in message, (status, message)
    finally:
        r.close()


def test_without_sign_in_the_console_serves_only_loopback(tmp_path, shardlake_bin):
    from harness import write_test_pipeline
    pipeline = write_test_pipeline(tmp_path / "p.yaml", max_bytes="1MiB", max_age="1s")
    proc = subprocess.run([str(shardlake_bin), "console", str(pipeline), "--listen",
                           f"0.0.0.0:{free_port()}"], env=pipeline_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "loopback" in proc.stderr and "console.auth" in proc.stderr, proc.stderr


def test_the_console_finds_workers_through_the_lease_table_and_follows_a_moved_lease(
        tmp_path, kinesalite, moto, agent_bin, shardlake_bin):
    """Two workers share a stream through leases; the console, given no --worker, finds
    both through the lease table and shows every device; after one is SIGKILLed, the other
    takes its leases, and new readings of that worker's devices still reach the page."""
    import signal
    import uuid
    from datetime import datetime, timedelta, timezone

    from harness import get, simulate, write_test_pipeline
    from servers import AWS_TEST_ENV, create_stream, put_lines
    from streamdata import interleave

    kinesis, ddb = kinesalite.client(), moto.client("dynamodb")
    name, table = f"wells-{uuid.uuid4().hex[:8]}", f"leases-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, name, 4)
    start = (datetime.now(timezone.utc) - timedelta(minutes=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    simulate(agent_bin, tmp_path / "sim", shards=4, devices=40, readings=30, seed=5,
             spikes=0, malformed=0, start=start, jitter_ms=0)
    put_lines(kinesis, name, interleave(tmp_path / "sim" / "stream"))
    pipeline = write_test_pipeline(
        tmp_path / "leases.yaml", max_bytes="4MiB", max_age="2s",
        source=f"{{kinesis: {{stream: {name}}}}}",
        checkpoints=f"{{dynamodb: {{table: {table}, failover_time: 4s, shard_sync_interval: 5s}}}}")
    env = pipeline_env(tmp_path, {**AWS_TEST_ENV, "AWS_ENDPOINT_URL_KINESIS": kinesalite.url,
                                  "AWS_ENDPOINT_URL_DYNAMODB": moto.url})
    ports = [free_port(), free_port()]
    workers = [subprocess.Popen([str(shardlake_bin), "run", str(pipeline), "--worker-id", f"w{i}",
                                 "--listen", f"127.0.0.1:{p}"], env=env,
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"w{i}.log", "w"))
               for i, p in enumerate(ports)]
    listen = f"127.0.0.1:{free_port()}"
    console = subprocess.Popen([str(shardlake_bin), "console", str(pipeline), "--listen", listen],
                               env=env, stdout=subprocess.DEVNULL,
                               stderr=open(tmp_path / "console.log", "w"))

    def leases():
        try:
            items = ddb.scan(TableName=table, ConsistentRead=True)["Items"]
        except ddb.exceptions.ResourceNotFoundException:
            return []
        return [{k: next(iter(v.values())) for k, v in i.items()} for i in items]

    def fleet():
        status, _, body = get(f"http://{listen}/api/fleet")
        return {d["device"]: d for d in json.loads(body)["devices"]} if status == 200 else {}

    try:
        wait_until("both workers holding leases with their addresses", lambda: {
            it.get("shardlakeLiveAddr") for it in leases() if it.get("leaseOwner")}
            == {f"http://127.0.0.1:{p}" for p in ports}, timeout=90, every=0.5)
        wait_until("every device on the console", lambda: len(fleet()) == 40, timeout=60,
                   every=0.3)
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        wait_until("the survivor to hold every lease", lambda: {
            it.get("shardlakeLiveAddr") for it in leases()} == {f"http://127.0.0.1:{ports[1]}"}
            and all(it.get("leaseOwner") for it in leases()), timeout=40, every=0.5)
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        fresh = [json.dumps({"device_id": d, "tenant": "acme", "seq": 100_000, "ts": now,
                             "pressure_psi": 3333.25, "barrels_per_s": 1.0, "temp_c": 50.0,
                             "status": "ok"}).encode() for d in sorted(fleet())]
        put_lines(kinesis, name, fresh)
        wait_until("every device's new reading on the console", lambda: all(
            d["values"].get("pressure_psi") == 3333.25 for d in fleet().values()),
            timeout=60, every=0.3)
    finally:
        for p in (console, *workers):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (console, *workers):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def test_acknowledgements_beside_an_s3_lake_survive_a_restart_and_the_first_stands(
        tmp_path, moto, shardlake_bin, agent_bin):
    import uuid
    bucket = f"lake-{uuid.uuid4().hex[:8]}"
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=bucket)
    r = ConsoleRun(shardlake_bin, agent_bin, tmp_path, devices=4,
                   lake=f"{{s3: {{bucket: {bucket}, prefix: wells}}}}", env=moto.env())
    try:
        r.append("well-0001", pressure=9999.0)
        alert = wait_until("the spike's alert", lambda: next(
            (a for a in json.loads(r.api("GET", "/api/fleet")[2])["alerts"]
             if a["device"] == "well-0001"), None), timeout=60, every=0.2)
        status, _, body = r.api("POST", f"/api/alerts/{alert['id']}/ack")
        assert status == 200, body
        first = json.loads(body)
        key = f"wells/_console/acks/{alert['id']}.json"
        assert json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())["by"] == first["by"]
        r.stop_console()
        r.start_console()
        acks = wait_until("the acknowledgement after a restart", lambda: [
            a for a in json.loads(r.api("GET", "/api/fleet")[2])["acks"]
            if a["alert"] == alert["id"]], timeout=30)
        assert (acks[0]["by"], acks[0]["at_us"]) == (first["by"], first["at_us"])
        wait_until("the alert back on the restarted console", lambda: any(
            a["id"] == alert["id"] for a in json.loads(r.api("GET", "/api/fleet")[2])["alerts"]),
            timeout=30)
        # Acknowledged again (another console, another user): the first one stands.
        status, _, body = r.api("POST", f"/api/alerts/{alert['id']}/ack")
        assert status == 200 and json.loads(body)["at_us"] == first["at_us"], body
        status, _, body = r.api("POST", "/api/alerts/not-an-id/ack")
        assert status == 404, body
    finally:
        r.close()


def test_each_tenant_sees_only_its_own_devices_alerts_and_rows(tmp_path, moto, shardlake_bin,
                                                               agent_bin):
    """Signed in through a Cognito pool on moto (Bearer access tokens; the tenant from
    GetUser), a tenant's user sees its devices and alerts only, cannot acknowledge another
    tenant's alert, and every attempt to reach other rows through the query API answers with
    its own rows or a refusal."""
    from oidc import CognitoPool
    pool = CognitoPool.create(moto)
    pool.add_user("ann", "Passw0rd!ann", tenant="acme")
    pool.add_user("bob", "Passw0rd!bob", tenant="borealis", groups=["operators"])
    r = ConsoleRun(shardlake_bin, agent_bin, tmp_path, devices=6, env=moto.env(),
                   extra=pool.console_auth("http://127.0.0.1:1/auth/callback")
                   + "  query: {tenants: {acme: {max_rows: 3, timeout: 20s}}}\n")
    try:
        ann = pool.tokens("ann", "Passw0rd!ann")["AccessToken"]
        bob = pool.tokens("bob", "Passw0rd!bob")["AccessToken"]
        assert r.api("GET", "/api/fleet")[0] == 401

        def fleet(token):
            status, _, body = r.api("GET", "/api/fleet", token=token)
            assert status == 200, body
            return json.loads(body)
        wait_until("ann's devices", lambda: len(fleet(ann)["devices"]) == 2, timeout=60)
        assert {d["tenant"] for d in fleet(ann)["devices"]} == {"acme"}
        assert {d["tenant"] for d in fleet(bob)["devices"]} == {"borealis"}

        r.append("well-0003", pressure=9500.0, tenant="acme")
        alert = wait_until("ann's alert", lambda: next(iter(fleet(ann)["alerts"]), None),
                           timeout=60, every=0.2)
        assert alert["device"] == "well-0003"
        assert fleet(bob)["alerts"] == []
        status, _, body = r.api("POST", f"/api/alerts/{alert['id']}/ack", token=bob)
        assert status == 404, body
        status, _, body = r.api("POST", f"/api/alerts/{alert['id']}/ack", token=ann)
        assert status == 403 and "operator" in json.loads(body)["error"], body
        assert r.api("GET", "/api/devices/well-0003", token=bob)[0] == 404
        assert r.api("GET", "/api/devices/well-0003", token=ann)[0] == 200

        wait_until("ann's rows committed", lambda: r.query(
            "SELECT count(*) AS n FROM readings", token=ann)[0] == 200 and json.loads(r.query(
                "SELECT count(*) AS n FROM readings", token=ann)[2])[0]["n"] > 0, timeout=60)
        tenants_of = [
            "SELECT DISTINCT tenant FROM readings",
            "SELECT tenant FROM readings UNION SELECT tenant FROM well_1m",
            "WITH x AS (SELECT * FROM readings) SELECT DISTINCT tenant FROM x",
            "SELECT DISTINCT tenant FROM (SELECT * FROM \"readings\") /* tenant = 'borealis' */",
            "SELECT DISTINCT tenant FROM readings WHERE tenant = 'borealis' OR 1 = 1",
            "SELECT DISTINCT tenant FROM well_5m_hop",
        ]
        for sql in tenants_of:
            status, _, body = r.query(sql, token=ann)
            assert status == 200, (sql, body)
            assert {row["tenant"] for row in json.loads(body)} == {"acme"}, (sql, body)
        # Each tenant's own limits: acme's queries return 3 rows at most (and say so);
        # borealis keeps the console's.
        status, headers, body = r.query("SELECT * FROM readings", token=ann)
        assert status == 200 and len(json.loads(body)) == 3, body
        assert headers.get("x-shardlake-truncated") == "true", headers
        wait_until("more than 3 of bob's rows", lambda: len(json.loads(r.query(
            "SELECT * FROM readings LIMIT 10", token=bob)[2])) > 3, timeout=60)
        for sql in ["SELECT * FROM dead_letter", "SELECT * FROM alerts",
                    "SELECT * FROM well_1m_parts", "SELECT * FROM information_schema.tables",
                    f"SELECT * FROM '{tmp_path}/lake/readings'"]:
            status, _, body = r.query(sql, token=ann)
            assert status in (400, 403), (sql, status, body)
    finally:
        r.close()
