//! A Kinesis endpoint that answers from memory, for measuring the consumer's own cost: the
//! SDK's HTTP and JSON parsing, base64, and turning a GetRecords answer into a chunk.
//!
//! It speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies) and of the Kinesis
//! JSON protocol: ListShards, GetShardIterator, GetRecords. Every shard holds
//! `records_per_shard` well readings; each GetRecords answer holds up to `per_call` of them,
//! made for that call (sequence numbers, event times advancing `step_us` per record), so a
//! reader never sees a record twice. A shard ends (no next iterator) after its last record.
//! When `paced`, a record is served only once the wall clock has reached its event time, so a
//! shard produces `1 / step_us` records per microsecond, live, as a device fleet would.
//! It runs on its own threads, named `canned-kinesis`, so a caller can tell its CPU time
//! apart from the consumer's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Canned {
    pub shards: usize,
    pub records_per_shard: u64,
    pub per_call: usize,
    pub devices_per_shard: usize,
    /// Event time of a shard's first record, microseconds since the epoch.
    pub start_us: i64,
    pub step_us: i64,
    /// Serve a record only once its event time has come.
    pub paced: bool,
    /// Records handed out per shard so far.
    served: Vec<AtomicU64>,
}

impl Canned {
    pub fn new(
        shards: usize,
        records_per_shard: u64,
        per_call: usize,
        start_us: i64,
        step_us: i64,
    ) -> Self {
        Self {
            shards,
            records_per_shard,
            per_call,
            devices_per_shard: 32,
            start_us,
            step_us,
            paced: false,
            served: (0..shards).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Binds 127.0.0.1 on a free port, serves on a thread of its own; returns the endpoint URL.
    pub fn start(self: Arc<Self>, threads: usize) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::Builder::new()
            .name("canned-kinesis".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .thread_name("canned-kinesis")
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener).unwrap();
                    loop {
                        let (conn, _) = listener.accept().await.unwrap();
                        conn.set_nodelay(true).unwrap();
                        tokio::spawn(self.clone().connection(conn));
                    }
                });
            })
            .unwrap();
        url
    }

    async fn connection(self: Arc<Self>, mut conn: TcpStream) {
        let mut buf = Vec::with_capacity(8192);
        let mut out = Vec::new();
        while let Some((target, body)) = read_request(&mut conn, &mut buf).await {
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            out.clear();
            if target.ends_with(".listshards") {
                self.list_shards(&mut out);
            } else if target.ends_with(".getsharditerator") {
                let shard = body["ShardId"].as_str().unwrap_or_default();
                out.extend_from_slice(format!(r#"{{"ShardIterator":"{shard}"}}"#).as_bytes());
            } else if target.ends_with(".getrecords") {
                let it = body["ShardIterator"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let limit = body["Limit"].as_u64().unwrap_or(10_000) as usize;
                self.get_records(&it, limit, &mut out);
            } else {
                out.extend_from_slice(b"{}");
            }
            if !respond(&mut conn, &out).await {
                return;
            }
        }
    }

    fn list_shards(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"Shards\":[");
        for s in 0..self.shards {
            if s > 0 {
                out.push(b',');
            }
            out.extend_from_slice(
                format!(
                    r#"{{"ShardId":"{}","HashKeyRange":{{"StartingHashKey":"0","EndingHashKey":"1"}},"SequenceNumberRange":{{"StartingSequenceNumber":"0"}}}}"#,
                    shard_id(s)
                )
                .as_bytes(),
            );
        }
        out.extend_from_slice(b"]}");
    }

    fn get_records(&self, iterator: &str, limit: usize, out: &mut Vec<u8>) {
        let s: usize = iterator
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let want = limit.min(self.per_call) as u64;
        let mut avail = self.records_per_shard;
        if self.paced {
            let now = chrono::Utc::now().timestamp_micros();
            avail = avail.min(((now - self.start_us) / self.step_us).max(0) as u64 + 1);
        }
        // One reader per shard: its calls never overlap.
        let first = self.served[s].load(Ordering::Relaxed).min(avail);
        let end = (first + want).min(avail);
        self.served[s].store(end, Ordering::Relaxed);
        out.extend_from_slice(b"{\"Records\":[");
        let mut record = Vec::with_capacity(256);
        for k in first..end {
            if k > first {
                out.push(b',');
            }
            record.clear();
            let device = s * self.devices_per_shard + (k as usize % self.devices_per_shard);
            let ts = self.start_us + k as i64 * self.step_us;
            let t = chrono::DateTime::from_timestamp_micros(ts).unwrap();
            let pressure = 1800.0 + (k % 997) as f64 * 0.5;
            record.extend_from_slice(
                format!(
                    r#"{{"device_id":"well-{device:05}","tenant":"acme","seq":{k},"ts":"{}","barrels_per_s":0.52,"pressure_psi":{pressure:.1},"temp_c":70.1,"status":"ok"}}"#,
                    t.format("%Y-%m-%dT%H:%M:%S%.3fZ")
                )
                .as_bytes(),
            );
            out.extend_from_slice(b"{\"Data\":\"");
            base64(&record, out);
            out.extend_from_slice(
                format!(
                    r#"","PartitionKey":"well-{device:05}","SequenceNumber":"49{k:054}","ApproximateArrivalTimestamp":{}}}"#,
                    ts / 1_000_000
                )
                .as_bytes(),
            );
        }
        let left = self.records_per_shard.saturating_sub(end);
        let left = if self.paced { avail - end } else { left };
        if end >= self.records_per_shard {
            out.extend_from_slice(b"],\"MillisBehindLatest\":0}");
        } else {
            out.extend_from_slice(
                format!(
                    r#"],"NextShardIterator":"{iterator}","MillisBehindLatest":{}}}"#,
                    left * self.step_us as u64 / 1000
                )
                .as_bytes(),
            );
        }
    }
}

/// The next request on a keep-alive connection: its `x-amz-target` header (lower case) and
/// body. None when the peer closed it.
async fn read_request(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        let mut tmp = [0u8; 8192];
        match conn.read(&mut tmp).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let len: usize = header("content-length:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let target = header("x-amz-target:").unwrap_or_default();
    while buf.len() < head_end + len {
        let mut tmp = [0u8; 8192];
        match conn.read(&mut tmp).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    Some((target, body))
}

async fn respond(conn: &mut TcpStream, body: &[u8]) -> bool {
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/x-amz-json-1.1\r\nx-amzn-requestid: canned\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.is_ok() && conn.write_all(body).await.is_ok()
}

/// Receives webhook POSTs on 127.0.0.1 (threads named `webhook`) and records, per alert,
/// how long after its `event_time` it arrived, in seconds. Returns the URL.
pub fn receive_webhooks(latencies: Arc<std::sync::Mutex<Vec<f64>>>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    std::thread::Builder::new()
        .name("webhook".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                loop {
                    let (mut conn, _) = listener.accept().await.unwrap();
                    let latencies = latencies.clone();
                    tokio::spawn(async move {
                        let mut buf = Vec::new();
                        while let Some((_, body)) = read_request(&mut conn, &mut buf).await {
                            let now = chrono::Utc::now();
                            let alert: serde_json::Value =
                                serde_json::from_slice(&body).unwrap_or_default();
                            if let Some(t) = alert["event_time"]
                                .as_str()
                                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                            {
                                let late = (now - t.to_utc()).num_microseconds().unwrap_or(0);
                                latencies.lock().unwrap().push(late as f64 / 1e6);
                            }
                            if !respond(&mut conn, b"").await {
                                return;
                            }
                        }
                    });
                }
            });
        })
        .unwrap();
    url
}

pub fn shard_id(s: usize) -> String {
    format!("shardId-{s:012}")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn base64(data: &[u8], out: &mut Vec<u8>) {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        out.push(T[(n >> 18) as usize & 63]);
        out.push(T[(n >> 12) as usize & 63]);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63]
        } else {
            b'='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63]
        } else {
            b'='
        });
    }
}

/// CPU seconds (user + system) used so far by this process's threads whose name starts
/// with `prefix` (`/proc/self/task/*/comm`).
pub fn cpu_seconds(prefix: &str) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    let mut named = 0.0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split(' ').collect();
        let t = (f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0)) / tick;
        if comm.trim().starts_with(prefix) {
            named += t;
        }
    }
    named
}
