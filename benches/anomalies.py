#!/usr/bin/env python3
"""How good the anomaly detectors are (issue 26): labelled anomalies in simulated wells, the
detectors of benches/pipelines/anomalies.yaml and two streaming peers from PyPI, scored alike.

The readings: `shardlake-agent simulate --well-noise --diurnal --anomalies N --labels FILE`
(seeded: the same every run), --devices wells x --readings readings, one every --interval-ms,
4 local shards; N anomalies of each kind (spike, level_shift, drift, stuck, dropout,
noise_burst), each on a well of its own, the other wells clean. noise_burst (more noise for a
while) is a distractor, not an anomaly: alerts on it count as false positives, and the table
shows how many bursts each detector flagged.

shardlake: `shardlake run --drain benches/pipelines/anomalies.yaml`, then the alerts table
read with DuckDB; each rule is one detector. The peers, per device, streaming over
pressure_psi in event-time order (no alert in a device's first --warmup readings):

- river's HalfSpaceTrees (river.anomaly; n_trees 10, height 8, window 250), fed a shingle of
  the last 4 pressures, min-max scaled per device (river.preprocessing.MinMaxScaler), as
  river's documentation asks for features in [0, 1];
- rrcf, a robust random cut forest (--rrcf-trees trees of 256 points, shingles of 4, the
  streaming recipe of rrcf's documentation), score: the mean collusive displacement.

A peer flags a reading when its score is above the --quantile quantile of all its scores
after warm-up, fleet-wide (so about 1 - quantile of the readings are flagged); each flagged
reading is one alert.

Matching: an alert matches a label when it is for the same device and its event time lies
in [start, end + --tolerance-s]. An alert matching no label, or only a noise_burst label,
is a false positive. Precision: matching alerts / alerts. Recall: labels (noise bursts
excepted) with at least one matching alert / labels. Delay: the first matching alert's event
time - the label's start; the median per kind.

    python3 -m venv .venv-anom
    .venv-anom/bin/pip install -r benches/requirements-anomalies.txt
    cargo build --bin shardlake --bin shardlake-agent
    .venv-anom/bin/python benches/anomalies.py --shardlake target/debug/shardlake \\
        --agent target/debug/shardlake-agent [--devices 200] [--readings 3000] [--peers-only]

Prints a markdown table and writes the results as JSON (--json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import REPO, run_shardlake  # noqa: E402

KINDS = ["spike", "level_shift", "drift", "stuck", "dropout", "noise_burst"]
DISTRACTORS = {"noise_burst"}
START = "2026-01-05T10:00:00Z"
SHINGLE = 4


# --------------------------------------------------------------------------------------------
# The readings and their labels


def simulate(agent: Path, data: Path, args) -> list[dict]:
    labels = data / "labels.ndjson"
    subprocess.run([str(agent), "simulate", "--stream", str(data / "stream"), "--shards", "4",
                    "--devices", str(args.devices), "--readings", str(args.readings),
                    "--interval-ms", str(args.interval_ms), "--start", START,
                    "--spikes", "0", "--malformed", "0", "--seed", str(args.seed),
                    "--diurnal", "--anomalies", str(args.anomalies), "--labels", str(labels)],
                   check=True, stdout=subprocess.DEVNULL)
    out = []
    for line in labels.read_text().splitlines():
        label = json.loads(line)
        label["start_t"] = parse_time(label["start"])
        label["end_t"] = parse_time(label["end"])
        out.append(label)
    return out


def parse_time(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def readings(data: Path) -> dict[str, tuple[list[dt.datetime], list[float]]]:
    """Per device: event times and pressures, in event-time order."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    rows = con.execute(f"""
        SELECT device_id, ts, pressure_psi FROM read_json('{data}/stream/*.ndjson',
            format = 'newline_delimited',
            columns = {{device_id: 'VARCHAR', seq: 'BIGINT', ts: 'TIMESTAMPTZ',
                        pressure_psi: 'DOUBLE'}})
        WHERE pressure_psi IS NOT NULL ORDER BY device_id, ts, seq""").fetchall()
    out: dict[str, tuple[list, list]] = {}
    for device, ts, p in rows:
        times, values = out.setdefault(device, ([], []))
        times.append(ts)
        values.append(p)
    return out


# --------------------------------------------------------------------------------------------
# shardlake


def shardlake_alerts(binary: Path, data: Path) -> tuple[dict[str, list], float]:
    """Per rule: (device, event time) of every alert; and the run's seconds."""
    import duckdb

    t = time.perf_counter()
    run_shardlake(binary, data, None, "anomalies.yaml")
    seconds = time.perf_counter() - t
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    rows = con.execute(f"""
        SELECT rule, key, event_time FROM read_parquet('{data}/lake/alerts/**/*.parquet',
            hive_partitioning = true) ORDER BY rule, key, event_time""").fetchall()
    out: dict[str, list] = defaultdict(list)
    for rule, key, ts in rows:
        out[f"shardlake {rule}"].append((key, ts))
    return out, seconds


# --------------------------------------------------------------------------------------------
# The peers


def shingles(values: list[float]):
    """Each reading's shingle: it and the SHINGLE - 1 before it (the first repeated)."""
    window = [values[0]] * SHINGLE
    for v in values:
        window = window[1:] + [v]
        yield window


def hst_scores(values: list[float]) -> list[float]:
    from river import anomaly, compose, preprocessing

    model = compose.Pipeline(preprocessing.MinMaxScaler(),
                             anomaly.HalfSpaceTrees(n_trees=10, height=8, window_size=250, seed=42))
    out = []
    for sh in shingles(values):
        x = {f"p{i}": v for i, v in enumerate(sh)}
        out.append(model.score_one(x))
        model.learn_one(x)
    return out


def rrcf_scores(job: tuple[list[float], int]) -> list[float]:
    import numpy as np
    import rrcf

    values, trees = job
    tree_size = 256
    rng = np.random.default_rng(42)
    np.random.seed(int(rng.integers(1 << 31)))
    forest = [rrcf.RCTree() for _ in range(trees)]
    out = []
    for index, sh in enumerate(shingles(values)):
        point = np.asarray(sh)
        codisp = 0.0
        for tree in forest:
            if len(tree.leaves) > tree_size:
                tree.forget_point(index - tree_size)
            tree.insert_point(point, index=index, tolerance=1e-9)
            codisp += tree.codisp(index)
        out.append(codisp / trees)
    return out


def peer_alerts(name: str, series: dict, scores: dict[str, list[float]], args) -> list:
    after = [s for d in scores for s in scores[d][args.warmup:]]
    threshold = quantile(after, args.quantile)
    alerts = []
    for device, (times, _) in series.items():
        for i, s in enumerate(scores[device]):
            if i >= args.warmup and s > threshold:
                alerts.append((device, times[i]))
    print(f"{name}: threshold {threshold:.4g} ({args.quantile} quantile), {len(alerts)} alerts",
          file=sys.stderr)
    return alerts


def quantile(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, int(q * len(s)))]


def run_peers(series: dict, args) -> tuple[dict[str, list], dict[str, float]]:
    devices = sorted(series)
    alerts, seconds = {}, {}
    with Pool(args.jobs) as pool:
        t = time.perf_counter()
        hst = dict(zip(devices, pool.map(hst_scores, [series[d][1] for d in devices])))
        seconds["river HalfSpaceTrees"] = time.perf_counter() - t
        alerts["river HalfSpaceTrees"] = peer_alerts("river HalfSpaceTrees", series, hst, args)
        t = time.perf_counter()
        rc = dict(zip(devices, pool.map(rrcf_scores,
                                         [(series[d][1], args.rrcf_trees) for d in devices])))
        seconds["rrcf"] = time.perf_counter() - t
        alerts["rrcf"] = peer_alerts("rrcf", series, rc, args)
    return alerts, seconds


# --------------------------------------------------------------------------------------------
# Scoring


def score(alerts: list, labels: list[dict], tolerance: dt.timedelta) -> dict:
    by_device = defaultdict(list)
    for label in labels:
        by_device[label["device_id"]].append(label)
    first: dict[int, dt.datetime] = {}
    true_alerts = 0
    for device, t in alerts:
        hit = False
        for label in by_device.get(device, ()):
            if label["start_t"] <= t <= label["end_t"] + tolerance:
                key = id(label)
                first[key] = min(first.get(key, t), t)
                hit = hit or label["kind"] not in DISTRACTORS
        true_alerts += hit
    kinds = {}
    for kind in KINDS:
        of_kind = [lb for lb in labels if lb["kind"] == kind]
        found = [lb for lb in of_kind if id(lb) in first]
        delays = [(first[id(lb)] - lb["start_t"]).total_seconds() for lb in found]
        kinds[kind] = {"labels": len(of_kind), "detected": len(found),
                       "recall": len(found) / len(of_kind) if of_kind else None,
                       "median_delay_s": statistics.median(delays) if delays else None}
    real = [k for k in KINDS if k not in DISTRACTORS]
    n_real = sum(kinds[k]["labels"] for k in real)
    return {"alerts": len(alerts), "true_alerts": true_alerts,
            "false_positives": len(alerts) - true_alerts,
            "precision": true_alerts / len(alerts) if alerts else None,
            "recall": sum(kinds[k]["detected"] for k in real) / n_real if n_real else None,
            "kinds": kinds}


def fmt(v, pct=False) -> str:
    if v is None:
        return "–"
    if pct:
        return f"{100 * v:.0f}%"
    return f"{v:.0f}" if isinstance(v, (int, float)) and not math.isnan(v) else str(v)


def table(results: dict) -> str:
    real = [k for k in KINDS if k not in DISTRACTORS]
    head = (["detector", "alerts", "precision", "recall"]
            + [f"{k} recall / delay" for k in real] + ["noise bursts flagged"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [name, str(r["alerts"]), fmt(r["precision"], True), fmt(r["recall"], True)]
        for k in real:
            kr = r["kinds"][k]
            delay = kr["median_delay_s"]
            cells.append(f"{fmt(kr['recall'], True)} / {fmt(delay)} s" if delay is not None
                         else f"{fmt(kr['recall'], True)}")
        nb = r["kinds"]["noise_burst"]
        cells.append(f"{nb['detected']}/{nb['labels']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--readings", type=int, default=3000, help="per device")
    ap.add_argument("--interval-ms", type=int, default=1000)
    ap.add_argument("--anomalies", type=int, default=10, help="of each kind")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--tolerance-s", type=float, default=120,
                    help="an alert up to this long after a label's end still matches it")
    ap.add_argument("--warmup", type=int, default=300, help="peers: readings before alerting")
    ap.add_argument("--quantile", type=float, default=0.999,
                    help="peers: flag scores above this quantile of all scores after warm-up")
    ap.add_argument("--rrcf-trees", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2, help="peers: processes")
    ap.add_argument("--shardlake", type=Path, default=REPO / "target/release/shardlake")
    ap.add_argument("--agent", type=Path, default=REPO / "target/release/shardlake-agent")
    ap.add_argument("--peers-only", action="store_true", help="skip the shardlake run")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--json", type=Path, default=Path("anomalies-results.json"))
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    args = ap.parse_args()

    data = Path(tempfile.mkdtemp(prefix="shardlake-anomalies-"))
    labels = simulate(args.agent, data, args)
    series = readings(data)
    n = sum(len(v[1]) for v in series.values())
    print(f"input: {n} readings, {len(series)} devices, {len(labels)} labels, {data}",
          file=sys.stderr)
    tolerance = dt.timedelta(seconds=args.tolerance_s)
    alerts: dict[str, list] = {}
    seconds: dict[str, float] = {}
    if not args.peers_only:
        sl, s = shardlake_alerts(args.shardlake, data)
        alerts.update(sl)
        seconds["shardlake run"] = s
    if not args.skip_peers:
        peers, s = run_peers(series, args)
        alerts.update(peers)
        seconds.update(s)
    results = {name: score(a, labels, tolerance) for name, a in alerts.items()}
    print(table(results))
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()), file=sys.stderr)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.json.write_text(json.dumps({"config": config, "readings": n, "labels": len(labels),
                                     "seconds": seconds, "results": results}, indent=2) + "\n")
    print(f"results: {args.json}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(data)


if __name__ == "__main__":
    main()
