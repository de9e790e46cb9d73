"""The input, parsed independently of shardlake: the validity filter of
schemas/well-reading.yaml written again in Python, the lines of a local stream with the
sequence numbers it gives them, and those lines interleaved across shards for putting on
Kinesis. The lake checks (lake.py) compare shardlake's output with what this module reads.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))$"
)
_INT64 = (-(2**63), 2**63 - 1)


def rfc3339_to_us(text: str) -> int | None:
    """Microseconds since the epoch of an RFC 3339 timestamp, None if it is not one."""
    m = _RFC3339.match(text)
    if not m:
        return None
    y, mo, d, h, mi, s, frac, z, sign, oh, om = m.groups()
    try:
        offset = dt.timedelta(0) if z else (1 if sign == "+" else -1) * dt.timedelta(
            hours=int(oh), minutes=int(om))
        t = dt.datetime(int(y), int(mo), int(d), int(h), int(mi), int(s),
                        tzinfo=dt.timezone(offset))
    except ValueError:
        return None
    us = int(((frac or "") + "000000")[:6])
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    delta = t - epoch
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + us


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_record(line: bytes) -> dict | None:
    """The record if it satisfies schemas/well-reading.yaml, else None."""
    try:
        obj = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(obj, dict):
        return None
    device, tenant, seq, ts = (obj.get(k) for k in ("device_id", "tenant", "seq", "ts"))
    if not (isinstance(device, str) and isinstance(tenant, str)):
        return None
    if not (isinstance(seq, int) and not isinstance(seq, bool) and _INT64[0] <= seq <= _INT64[1]):
        return None
    if not isinstance(ts, str):
        return None
    ts_us = rfc3339_to_us(ts)
    if ts_us is None:
        return None
    for k in ("barrels_per_s", "pressure_psi", "temp_c"):
        v = obj.get(k)
        if v is not None and not _is_number(v):
            return None
    status = obj.get("status")
    if status is not None and not isinstance(status, str):
        return None
    return {
        "device_id": device,
        "tenant": tenant,
        "seq": seq,
        "ts_us": ts_us,
        "barrels_per_s": None if obj.get("barrels_per_s") is None else float(obj["barrels_per_s"]),
        "pressure_psi": None if obj.get("pressure_psi") is None else float(obj["pressure_psi"]),
        "temp_c": None if obj.get("temp_c") is None else float(obj["temp_c"]),
        "status": status,
    }


@dataclass
class StreamData:
    """Every whole line of a local stream, split by the independent validity filter."""

    valid: list[dict] = field(default_factory=list)
    # (shard id, sequence number) of each invalid line.
    invalid: list[tuple[str, str]] = field(default_factory=list)

    def table(self) -> pa.Table:
        cols = {k: [r[k] for r in self.valid] for k in (
            "device_id", "tenant", "seq", "barrels_per_s", "pressure_psi", "temp_c", "status",
            "shard", "seqno")}
        ts = pa.array([r["ts_us"] for r in self.valid], pa.int64())
        return pa.table({
            "device_id": pa.array(cols["device_id"], pa.string()),
            "tenant": pa.array(cols["tenant"], pa.string()),
            "seq": pa.array(cols["seq"], pa.int64()),
            # Naive timestamp holding UTC wall time: DuckDB's date_trunc is then plain UTC.
            "ts": ts.cast(pa.timestamp("us")),
            "ts_us": ts,
            "barrels_per_s": pa.array(cols["barrels_per_s"], pa.float64()),
            "pressure_psi": pa.array(cols["pressure_psi"], pa.float64()),
            "temp_c": pa.array(cols["temp_c"], pa.float64()),
            "status": pa.array(cols["status"], pa.string()),
            "shard": pa.array(cols["shard"], pa.string()),
            "seqno": pa.array(cols["seqno"], pa.string()),
        })


def stream_data(records) -> StreamData:
    """`(bytes, shard id, sequence number)` of every record, split by the validity filter."""
    out = StreamData()
    for line, shard, seqno in records:
        rec = parse_record(line)
        if rec is None:
            out.invalid.append((shard, seqno))
        else:
            rec["shard"] = shard
            rec["seqno"] = seqno
            out.valid.append(rec)
    return out


def stream_lines(stream_dir: Path):
    """`(line, shard id, sequence number)` of every whole line of every `shardId-*.ndjson`
    file. A line's sequence number is the byte offset just past its newline (the local
    stream's definition)."""
    files = sorted(stream_dir.glob("shardId-*.ndjson"))
    assert files, f"no shard files in {stream_dir}"
    for path in files:
        shard = path.name[: -len(".ndjson")]
        data = path.read_bytes()
        offset = 0
        while True:
            nl = data.find(b"\n", offset)
            if nl < 0:
                break
            line = data[offset:nl]
            offset = nl + 1
            yield line, shard, str(offset)


def read_stream(stream_dir: Path) -> StreamData:
    return stream_data(stream_lines(stream_dir))


def interleave(stream_dir: Path) -> list[bytes]:
    """The lines of a simulated local stream, shard files interleaved (each file's order,
    and so each device's, is kept)."""
    per_file: dict[str, list[bytes]] = {}
    for line, shard, _ in stream_lines(stream_dir):
        per_file.setdefault(shard, []).append(line)
    out: list[bytes] = []
    i = 0
    while True:
        chunks = [q[i:i + 50] for q in per_file.values()]
        if not any(chunks):
            return out
        for c in chunks:
            out += c
        i += 50
