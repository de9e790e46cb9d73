//! The agent's run loop: one task per sensor samples on its own interval; one task appends
//! the readings to the durable queue; one task sends the queue, oldest first, and removes
//! what the transport acknowledged. A sensor that fails is logged (on its first failure and
//! when it recovers), counted and sampled again at its next interval; the others go on.
//!
//! With `commands:`, one more task handles the desired state the transport receives
//! ([`super::commands`]): each sensor's loop follows its settings (interval, enabled) through
//! a watch channel, and the reported state goes back through the transport.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use tokio::sync::{Notify, mpsc, watch};
use tracing::{info, warn};

use super::commands::{Commands, Settings};
use super::config::AgentConfig;
use super::queue::Queue;
use super::sensor::{Sensor, Value};
use super::transport::{Incoming, Outbound, Sender};

/// One sample of one sensor, before it gets its `seq`.
struct Sample {
    sensor: Arc<str>,
    ts: DateTime<Utc>,
    values: Vec<Value>,
}

/// A reading as it is queued and sent (`schemas/sensor-reading.yaml`).
#[derive(Serialize)]
struct Reading<'a> {
    device_id: &'a str,
    tenant: &'a str,
    seq: u64,
    ts: String,
    sensor: &'a str,
    field: &'a str,
    value: f64,
    unit: &'a str,
}

/// What a run did, printed as JSON when the agent stops.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub samples: u64,
    /// Failed samples per sensor.
    pub sensor_failures: BTreeMap<String, u64>,
    pub readings_queued: u64,
    pub readings_sent: u64,
    /// Readings dropped unsent because the queue was full.
    pub readings_dropped: u64,
    pub send_failures: u64,
    /// Readings in batches that failed after (maybe) reaching the broker and were sent again.
    pub readings_resent: u64,
    /// Bytes still queued (sent at the next start).
    pub pending_bytes: u64,
    pub next_seq: u64,
}

#[derive(Default)]
struct Counters {
    samples: AtomicU64,
    send_failures: AtomicU64,
    failures: Mutex<BTreeMap<String, u64>>,
}

/// Runs the agent until `shutdown` completes, then sends what it can within `drain` and
/// closes the queue (what is left is sent at the next start).
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> anyhow::Result<Summary> {
    let queue = Arc::new(Mutex::new(open_queue(&cfg).await?));
    let counters = Arc::new(Counters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (tx, rx) = mpsc::channel::<Sample>(4096);
    let queued = Arc::new(Notify::new());

    // The applied state is in force before the first sample.
    let (commands, mut settings) = match &cfg.commands {
        Some(c) => {
            let (commands, rx) = Commands::open(c.clone(), &cfg.sensors).await?;
            (Some(commands), rx)
        }
        None => (None, BTreeMap::new()),
    };
    let mut samplers = Vec::new();
    for sc in &cfg.sensors {
        let sensor = Sensor::new(sc.clone(), &cfg.sysfs_root);
        let settings = settings.remove(&sc.name).unwrap_or_else(|| {
            watch::channel(Settings {
                interval: sc.interval,
                enabled: true,
            })
            .1
        });
        samplers.push(tokio::spawn(sample_loop(
            sensor,
            settings,
            tx.clone(),
            stop_rx.clone(),
            counters.clone(),
        )));
    }
    drop(tx);
    let cfg = Arc::new(cfg);
    let appender = tokio::spawn(append_loop(cfg.clone(), rx, queue.clone(), queued.clone()));
    let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
    let mut transport = Sender::open(&cfg, commands.is_some().then_some(incoming_tx)).await?;
    let commander = commands.map(|c| {
        let reports = transport.reports();
        tokio::spawn(command_loop(c, incoming_rx, reports))
    });
    let sender = {
        let (cfg, queue, queued, counters) =
            (cfg.clone(), queue.clone(), queued.clone(), counters.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            send_loop(&cfg, &mut transport, &queue, &queued, &counters, &mut stop).await;
            transport
        })
    };

    shutdown.await;
    info!("stopping: sampling ends, the queue is sent for up to {drain:?}");
    let _ = stop_tx.send(true);
    for s in samplers {
        let _ = s.await;
    }
    appender.await??;
    let mut transport = sender.await?;
    send_remaining(&cfg, &mut transport, &queue, drain).await;
    if let Some(c) = commander {
        c.abort();
    }
    close(queue, &counters, &transport).await
}

/// Opens the queue (off the runtime: it scans its segments) and logs what it holds.
async fn open_queue(cfg: &AgentConfig) -> anyhow::Result<Queue> {
    let queue_dir = cfg.queue.path.clone();
    let (max_bytes, fsync) = (cfg.queue.max_bytes, cfg.queue.fsync);
    let queue = tokio::task::spawn_blocking(move || Queue::open(&queue_dir, max_bytes, fsync))
        .await?
        .map_err(|e| {
            anyhow::anyhow!("cannot open the queue in {}: {e}", cfg.queue.path.display())
        })?;
    if queue.stats.truncated_bytes > 0 {
        warn!(
            bytes = queue.stats.truncated_bytes,
            "the queue ended in a torn entry (power cut?); cut it off"
        );
    }
    info!(
        device_id = %cfg.device_id,
        sensors = cfg.sensors.len(),
        pending_bytes = queue.pending_bytes(),
        next_seq = queue.next_seq(),
        "agent started"
    );
    Ok(queue)
}

/// One last pass over what is queued after the stop signal, bounded by the drain budget.
async fn send_remaining(
    cfg: &AgentConfig,
    transport: &mut Sender,
    queue: &Arc<Mutex<Queue>>,
    drain: Duration,
) {
    let _ = tokio::time::timeout(drain, async {
        loop {
            match send_once(cfg, transport, queue).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "not sent before stopping; kept in the queue");
                    break;
                }
            }
        }
    })
    .await;
}

/// Closes the queue once every task has let go of it; what the run did.
async fn close(
    queue: Arc<Mutex<Queue>>,
    counters: &Counters,
    transport: &Sender,
) -> anyhow::Result<Summary> {
    let queue = Arc::try_unwrap(queue)
        .map_err(|_| anyhow::anyhow!("the queue is still in use"))?
        .into_inner()
        .expect("not poisoned");
    let summary = Summary {
        samples: counters.samples.load(Ordering::Relaxed),
        sensor_failures: counters.failures.lock().expect("not poisoned").clone(),
        readings_queued: queue.stats.appended,
        readings_sent: queue.stats.acked,
        readings_dropped: queue.stats.dropped,
        send_failures: counters.send_failures.load(Ordering::Relaxed),
        readings_resent: transport.resent_readings(),
        pending_bytes: queue.pending_bytes(),
        next_seq: queue.next_seq(),
    };
    tokio::task::spawn_blocking(move || queue.close()).await??;
    Ok(summary)
}

/// A sampling clock at `interval`; a slow sample (a 1-wire conversion) delays the next one,
/// it does not cause a burst.
fn ticker(interval: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick
}

async fn sample_loop(
    mut sensor: Sensor,
    mut settings: watch::Receiver<Settings>,
    tx: mpsc::Sender<Sample>,
    mut stop: watch::Receiver<bool>,
    counters: Arc<Counters>,
) {
    let name: Arc<str> = sensor.config.name.as_str().into();
    let mut current = *settings.borrow_and_update();
    let mut tick = ticker(current.interval);
    let mut failing = false;
    let mut watching = true;
    loop {
        tokio::select! {
            _ = tick.tick(), if current.enabled => {}
            changed = settings.changed(), if watching => {
                if changed.is_ok() {
                    let new = *settings.borrow_and_update();
                    if new != current {
                        info!(sensor = %name, interval = ?new.interval, enabled = new.enabled, "sampling changed by command");
                        current = new;
                        tick = ticker(current.interval);
                    }
                } else {
                    // No commands any more: keep sampling as now.
                    watching = false;
                }
                continue;
            }
            _ = stop.changed() => return,
        }
        let ts = Utc::now();
        counters.samples.fetch_add(1, Ordering::Relaxed);
        match sensor.sample().await {
            Ok(values) => {
                if failing {
                    info!(sensor = %name, "sensor recovered");
                    failing = false;
                }
                let sample = Sample {
                    sensor: name.clone(),
                    ts,
                    values,
                };
                if tx.send(sample).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                *counters
                    .failures
                    .lock()
                    .expect("not poisoned")
                    .entry(name.to_string())
                    .or_default() += 1;
                if !failing {
                    warn!(sensor = %name, error = %e, "sensor failed; retrying at its interval");
                    failing = true;
                }
            }
        }
    }
}

/// Appends whatever samples are waiting in one write, until every sampler has stopped.
async fn append_loop(
    cfg: Arc<AgentConfig>,
    mut rx: mpsc::Receiver<Sample>,
    queue: Arc<Mutex<Queue>>,
    queued: Arc<Notify>,
) -> anyhow::Result<()> {
    let period = super::queue::sync_period(cfg.queue.fsync).unwrap_or(Duration::from_secs(3600));
    let mut sync = tokio::time::interval(period);
    let mut buf = Vec::new();
    loop {
        tokio::select! {
            n = rx.recv_many(&mut buf, 1024) => if n == 0 { return Ok(()) },
            _ = sync.tick() => {
                let q = queue.clone();
                tokio::task::spawn_blocking(move || q.lock().expect("not poisoned").sync_if_due()).await??;
                continue;
            }
        }
        let samples = std::mem::take(&mut buf);
        let (q, cfg2) = (queue.clone(), cfg.clone());
        let dropped = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            let mut q = q.lock().expect("not poisoned");
            let before = q.stats.dropped;
            let flat: Vec<(&Sample, &Value)> = samples
                .iter()
                .flat_map(|s| s.values.iter().map(move |v| (s, v)))
                .collect();
            q.append(&flat, |(s, v), seq| encode(&cfg2, s, v, seq))?;
            Ok(q.stats.dropped - before)
        })
        .await??;
        if dropped > 0 {
            warn!(
                dropped,
                "the queue is full (queue.max_bytes): dropped its oldest readings"
            );
        }
        queued.notify_one();
    }
}

fn encode(cfg: &AgentConfig, s: &Sample, v: &Value, seq: u64) -> Vec<u8> {
    serde_json::to_vec(&Reading {
        device_id: &cfg.device_id,
        tenant: &cfg.tenant,
        seq,
        ts: s.ts.to_rfc3339_opts(SecondsFormat::Millis, true),
        sensor: &s.sensor,
        field: &v.field,
        value: v.value,
        unit: &v.unit,
    })
    .expect("a reading serializes")
}

/// How often an idle sender checks that its transport is still connected.
const MAINTAIN_EVERY: Duration = Duration::from_secs(5);

/// Sends the queue in order while the agent runs; a failed send is retried with backoff.
async fn send_loop(
    cfg: &AgentConfig,
    transport: &mut Sender,
    queue: &Arc<Mutex<Queue>>,
    queued: &Notify,
    counters: &Counters,
    stop: &mut watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match send_once(cfg, transport, queue).await {
            Ok(n) if n > 0 => {
                backoff = Duration::from_millis(200);
                continue;
            }
            Ok(_) => {
                // Empty: wait for readings, then let a batch fill for up to max_age. A
                // transport that receives commands stays connected meanwhile.
                tokio::select! {
                    _ = queued.notified() => {}
                    _ = tokio::time::sleep(MAINTAIN_EVERY) => {
                        tokio::select! {
                            _ = transport.maintain() => {}
                            _ = stop.changed() => return,
                        }
                        continue;
                    }
                    _ = stop.changed() => return,
                }
                tokio::select! {
                    _ = tokio::time::sleep(cfg.batch.max_age) => {}
                    _ = stop.changed() => return,
                }
            }
            Err(e) => {
                counters.send_failures.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, retry_in = ?backoff, "send failed; the readings stay queued");
                let jitter = backoff.mul_f64(fastrand::f64() * 0.5);
                tokio::select! {
                    _ = tokio::time::sleep(backoff + jitter) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Sends one batch from the head of the queue; returns how many readings were acknowledged.
async fn send_once(
    cfg: &AgentConfig,
    transport: &mut Sender,
    queue: &Arc<Mutex<Queue>>,
) -> anyhow::Result<usize> {
    let (q, n, bytes) = (queue.clone(), cfg.batch.max_readings, cfg.batch.max_bytes);
    let batch = tokio::task::spawn_blocking(move || q.lock().expect("not poisoned").read(n, bytes))
        .await??;
    let Some(last) = batch.last() else {
        return Ok(0);
    };
    transport.send(&cfg.device_id, &batch).await?;
    let (q, upto, n) = (queue.clone(), last.next, batch.len());
    tokio::task::spawn_blocking(move || q.lock().expect("not poisoned").ack(upto, n as u64))
        .await??;
    Ok(n)
}

/// Handles each desired state the transport receives, in order, and sends the report back;
/// passes each sync marker on behind the reports before it (the transport waits for it on a
/// new connection before it sends readings).
async fn command_loop(
    mut commands: Commands,
    mut incoming: mpsc::UnboundedReceiver<Incoming>,
    reports: mpsc::UnboundedSender<Outbound>,
) {
    while let Some(msg) = incoming.recv().await {
        match msg {
            Incoming::Desired(payload) => {
                if let Some(report) = commands.handle(&payload).await {
                    let bytes = serde_json::to_vec(&report).expect("a report serialises");
                    let _ = reports.send(Outbound::Report(bytes));
                }
            }
            Incoming::Synced(done) => {
                let _ = reports.send(Outbound::Flush(done));
            }
        }
    }
}
