//! Alerts to where people see them: SNS topics and webhooks, besides the alerts table.
//!
//! The engine offers each batch of alerts without waiting: per notifier, a cooldown (on event
//! time, per rule and device) drops repeats of a stuck sensor, and what remains goes to that
//! notifier's bounded queue. One task per notifier sends with retries and backoff. A slow or
//! failing notifier fills its own queue and then drops (counted and logged); it never blocks
//! the data path, and the alert is in the alerts table either way. Delivery is at least once:
//! after a crash, alerts that were sent but not committed are sent again.
//!
//! An alert rule's `action:` is one more notifier (`action:<rule>`) whose target is the
//! commands broker: it sets the alert's device's desired state ([`crate::tools::device`]). A
//! command carries its alert's id (`rule:<rule>:<device>:<event time µs>`) as the document's
//! `by`; one found already retained under that id (sent before a crash) is not published
//! again, so a device gets one version per alert. With `for:` the keys are restored (wall time)
//! unless someone changed the desired state since; a restart loses a pending restore.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::TimestampMicrosecondType;
use aws_sdk_sns::types::MessageAttributeValue;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::aws;
use crate::config::{CommandAction, Notifier, NotifyTarget, Pipeline};
use crate::metrics::Metrics;
use crate::retry::{Backoff, Fault, Retry};

/// Messages waiting per notifier before new ones are dropped.
const QUEUE: usize = 1024;
/// Attempts per message (our own, on top of the SNS client's retries).
const ATTEMPTS: u32 = 5;
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// One alert as sent: the JSON body, and what a subject and attributes need.
#[derive(Debug, Clone)]
struct Message {
    rule: String,
    device: Option<String>,
    event_time: i64,
    body: Arc<str>,
}

struct Outlet {
    name: String,
    rules: Option<Vec<String>>,
    cooldown: i64,
    /// Event time of the last alert sent, per (rule, device).
    last_sent: Mutex<HashMap<(String, Option<String>), i64>>,
    tx: Mutex<Option<mpsc::Sender<Message>>>,
}

/// Every notifier of a pipeline, with its delivery task.
pub struct Notifications {
    pipeline: String,
    outlets: Vec<Outlet>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
}

enum Target {
    Sns {
        client: aws_sdk_sns::Client,
        topic_arn: String,
    },
    Webhook {
        client: reqwest::Client,
        url: String,
        headers: Vec<(String, String)>,
    },
    Command(Box<CommandAction>),
}

impl Notifications {
    /// Starts a delivery task per notifier; `None` when the pipeline has none.
    pub async fn start(p: &Pipeline, metrics: Arc<Metrics>) -> anyhow::Result<Option<Arc<Self>>> {
        if p.notifiers.is_empty() {
            return Ok(None);
        }
        let mut sns = None;
        let mut outlets = Vec::new();
        let mut tasks = Vec::new();
        for n in &p.notifiers {
            let target = match &n.target {
                NotifyTarget::Sns { topic_arn } => {
                    if sns.is_none() {
                        let region = topic_arn.split(':').nth(3).filter(|r| !r.is_empty());
                        sns = Some(aws_sdk_sns::Client::new(&aws::sdk_config(region).await));
                    }
                    Target::Sns {
                        client: sns.clone().expect("set above"),
                        topic_arn: topic_arn.clone(),
                    }
                }
                NotifyTarget::Webhook { url, headers } => Target::Webhook {
                    client: reqwest::Client::builder()
                        .timeout(WEBHOOK_TIMEOUT)
                        .user_agent(concat!("shardlake/", env!("CARGO_PKG_VERSION")))
                        .build()?,
                    url: url.clone(),
                    headers: headers.clone(),
                },
                NotifyTarget::Command(a) => Target::Command(a.clone()),
            };
            let (tx, rx) = mpsc::channel(QUEUE);
            tasks.push(tokio::spawn(deliver(
                n.name.clone(),
                target,
                rx,
                metrics.clone(),
            )));
            outlets.push(outlet(n, tx));
        }
        Ok(Some(Arc::new(Self {
            pipeline: p.name.clone(),
            outlets,
            tasks: Mutex::new(tasks),
            metrics,
        })))
    }

    /// Queues a batch of the alerts table (`rule, kind, event_time, key, detail`) for every
    /// notifier that takes it. Never waits.
    pub fn offer(&self, alerts: &RecordBatch) {
        let rule = alerts.column(0).as_string::<i32>();
        let kind = alerts.column(1).as_string::<i32>();
        let time = alerts.column(2).as_primitive::<TimestampMicrosecondType>();
        let key = alerts.column(3).as_string::<i32>();
        let detail = alerts.column(4).as_string::<i32>();
        for i in 0..alerts.num_rows() {
            let device = key.is_valid(i).then(|| key.value(i).to_string());
            let mut message = None;
            for o in &self.outlets {
                if o.rules
                    .as_ref()
                    .is_some_and(|r| !r.iter().any(|x| x == rule.value(i)))
                {
                    continue;
                }
                if !o.due(rule.value(i), &device, time.value(i)) {
                    Metrics::add(&self.metrics.notifications_suppressed, 1);
                    continue;
                }
                let m = message
                    .get_or_insert_with(|| Message {
                        rule: rule.value(i).to_string(),
                        device: device.clone(),
                        event_time: time.value(i),
                        body: body(
                            &self.pipeline,
                            rule.value(i),
                            kind.value(i),
                            device.as_deref(),
                            time.value(i),
                            detail.value(i),
                        )
                        .into(),
                    })
                    .clone();
                let sent =
                    o.tx.lock()
                        .expect("not poisoned")
                        .as_ref()
                        .map(|tx| tx.try_send(m));
                if let Some(Err(_)) = sent {
                    Metrics::add(&self.metrics.notifications_dropped, 1);
                    tracing::warn!(notifier = %o.name, "notifier queue full: alert not sent (it is in the alerts table)");
                }
            }
        }
    }

    /// Stops taking alerts and waits up to `budget` for the queues to drain.
    pub async fn close(&self, budget: Duration) {
        for o in &self.outlets {
            o.tx.lock().expect("not poisoned").take();
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("not poisoned"));
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(budget, all).await.is_err() {
            tracing::warn!(
                budget_ms = budget.as_millis() as u64,
                "notifiers did not finish sending in time; the rest of their alerts are only in the alerts table"
            );
        }
    }
}

fn outlet(n: &Notifier, tx: mpsc::Sender<Message>) -> Outlet {
    Outlet {
        name: n.name.clone(),
        rules: n.rules.clone(),
        cooldown: n.cooldown,
        last_sent: Mutex::new(HashMap::new()),
        tx: Mutex::new(Some(tx)),
    }
}

impl Outlet {
    /// Whether an alert at `event_time` is out of the cooldown of the last one sent for the
    /// same rule and device; if so it counts as sent.
    fn due(&self, rule: &str, device: &Option<String>, event_time: i64) -> bool {
        let mut last = self.last_sent.lock().expect("not poisoned");
        let k = (rule.to_string(), device.clone());
        match last.get(&k) {
            Some(&t) if event_time < t.saturating_add(self.cooldown) => false,
            _ => {
                last.insert(k, event_time);
                true
            }
        }
    }
}

fn body(
    pipeline: &str,
    rule: &str,
    kind: &str,
    device: Option<&str>,
    event_time_us: i64,
    detail: &str,
) -> String {
    let time = chrono::DateTime::from_timestamp_micros(event_time_us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_default();
    let detail: serde_json::Value =
        serde_json::from_str(detail).unwrap_or(serde_json::Value::String(detail.into()));
    serde_json::json!({
        "pipeline": pipeline,
        "rule": rule,
        "kind": kind,
        "device": device,
        "event_time": time,
        "detail": detail,
    })
    .to_string()
}

async fn deliver(
    name: String,
    target: Target,
    mut rx: mpsc::Receiver<Message>,
    metrics: Arc<Metrics>,
) {
    // After a message failed every attempt, the next ones get a single attempt each until
    // one goes through: a dead receiver must not hold each alert for the whole backoff.
    let mut down = false;
    while let Some(m) = rx.recv().await {
        let retry = Retry {
            backoff: BACKOFF,
            attempts: if down { 1 } else { ATTEMPTS },
        };
        let mut attempts = 1;
        let sent = retry
            .run(
                || target.send(&m),
                |e| if e.retry { Fault::Transient } else { Fault::Permanent },
                |e, _, attempt| {
                    attempts = attempt + 1;
                    tracing::debug!(notifier = %name, attempt, error = %e.text, "notifier failed; retrying");
                },
            )
            .await;
        match sent {
            Ok(()) => {
                Metrics::add(&metrics.notifications_sent, 1);
                if down {
                    tracing::info!(notifier = %name, "notifier delivers again");
                    down = false;
                }
            }
            Err(e) => {
                Metrics::add(&metrics.notifier_failures, 1);
                tracing::warn!(
                    notifier = %name,
                    rule = %m.rule,
                    device = m.device.as_deref().unwrap_or(""),
                    attempts,
                    error = %e.text,
                    "notifier failed; the alert is only in the alerts table"
                );
                if !down {
                    tracing::warn!(notifier = %name, "notifier is down: each alert is now tried once until one goes through");
                    down = true;
                }
            }
        }
    }
}

/// Exponential from 400 ms (twice the first 200 ms step: the first retry already waits
/// one doubling), capped at 10 s, with jitter.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(400), Duration::from_secs(10));

struct SendError {
    retry: bool,
    text: String,
}

impl Target {
    async fn send(&self, m: &Message) -> Result<(), SendError> {
        match self {
            Target::Command(a) => command(a, m).await,
            Target::Sns { client, topic_arn } => {
                let device = m.device.as_deref().unwrap_or("-");
                let attr = |v: &str| {
                    MessageAttributeValue::builder()
                        .data_type("String")
                        .string_value(v)
                        .build()
                        .expect("data type is set")
                };
                client
                    .publish()
                    .topic_arn(topic_arn)
                    .subject(subject(&m.rule, device))
                    .message(&*m.body)
                    .message_attributes("rule", attr(&m.rule))
                    .message_attributes("device", attr(device))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| SendError {
                        // The client retried transient errors already; what is left is
                        // mostly permanent (no topic, no permission), but a few more tries
                        // cost little.
                        retry: true,
                        text: aws::describe(&e),
                    })
            }
            Target::Webhook {
                client,
                url,
                headers,
            } => {
                let mut req = client
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(m.body.to_string());
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                match req.send().await {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => {
                        let s = r.status();
                        Err(SendError {
                            retry: s.is_server_error() || s.as_u16() == 429 || s.as_u16() == 408,
                            text: format!("the receiver answered {s}"),
                        })
                    }
                    // Without the URL: it may hold a token.
                    Err(e) => Err(SendError {
                        retry: true,
                        text: e.without_url().to_string(),
                    }),
                }
            }
        }
    }
}

/// SNS subjects: at most 100 printable ASCII characters.
fn subject(rule: &str, device: &str) -> String {
    let s: String = format!("shardlake alert: {rule} on {device}")
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    s.chars().take(100).collect()
}

/// Commands in force with a `for:`, per desired topic: the values their keys had before the
/// first of them, how many are still in force, and the `by` of the last one written. When the
/// last one expires the keys go back to those values, unless someone else wrote the desired
/// state since: two commands that overlap restore what was there before both.
#[derive(Default)]
struct InForce {
    baseline: std::collections::BTreeMap<String, Option<serde_json::Value>>,
    active: usize,
    last_by: String,
}

static IN_FORCE: std::sync::LazyLock<Mutex<HashMap<String, InForce>>> =
    std::sync::LazyLock::new(Default::default);

/// One writer at a time per desired topic in this worker: two rules firing on one reading
/// would otherwise both read version N and both write N + 1. (A device's alerts come from
/// the one worker that holds its shard.) One entry per device ever commanded.
static WRITING: std::sync::LazyLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> =
    std::sync::LazyLock::new(Default::default);

fn writing(topic: &str) -> Arc<tokio::sync::Mutex<()>> {
    WRITING
        .lock()
        .expect("not poisoned")
        .entry(topic.to_string())
        .or_default()
        .clone()
}

/// An alert action: the device's desired state through the commands broker.
async fn command(a: &CommandAction, m: &Message) -> Result<(), SendError> {
    use crate::tools::device;
    let permanent = |text: String| SendError { retry: false, text };
    let device_id = m
        .device
        .as_deref()
        .ok_or_else(|| permanent("the alert names no device (the schema has no key)".into()))?;
    let b = &a.broker;
    // The same tenant the console and the alerts show for the row.
    let body: serde_json::Value = serde_json::from_str(&m.body).unwrap_or_default();
    let tenant = body["detail"][crate::columns::TENANT]
        .as_str()
        .map(str::to_string)
        .or_else(|| b.tenant.clone())
        .ok_or_else(|| {
            permanent(format!(
                "the alert row has no `{}` and commands.tenant is not set: whose device is {device_id}?",
                crate::columns::TENANT
            ))
        })?;
    let topics = device::Topics::new(&b.desired_topic, &b.reported_topic, &tenant, device_id)
        .map_err(|e| permanent(e.to_string()))?;
    let by = format!("rule:{}:{device_id}:{}", a.rule, m.event_time);
    if a.dry_run {
        tracing::info!(rule = %a.rule, device = device_id, tenant, topic = %topics.desired, set = ?a.set, by, "dry run: command not sent");
        return Ok(());
    }
    let broker = device::Broker::of(b);
    let lock = writing(&topics.desired);
    let guard = lock.lock().await;
    let (sent, before) = device::command(&broker, &topics, &a.set, &by)
        .await
        .map_err(|e| SendError {
            retry: e.downcast_ref::<device::NotRetryable>().is_none(),
            text: format!("{e:#}"),
        })?;
    drop(guard);
    match sent {
        device::Sent::Published(version) => {
            tracing::info!(rule = %a.rule, device = device_id, tenant, version, by, set = ?a.set, "command sent");
            if let Some(after) = a.for_ {
                {
                    let mut in_force = IN_FORCE.lock().expect("not poisoned");
                    let f = in_force.entry(topics.desired.clone()).or_default();
                    for (k, v) in before {
                        f.baseline.entry(k).or_insert(v);
                    }
                    f.active += 1;
                    f.last_by = by.clone();
                }
                let (rule, device_id) = (a.rule.clone(), device_id.to_string());
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let last = {
                        let mut in_force = IN_FORCE.lock().expect("not poisoned");
                        let f = in_force.get_mut(&topics.desired).expect("entered above");
                        f.active -= 1;
                        if f.active > 0 {
                            None
                        } else {
                            in_force.remove(&topics.desired)
                        }
                    };
                    let Some(f) = last else {
                        tracing::info!(
                            rule,
                            device = device_id,
                            by,
                            "command expired; another command is still in force, which restores when it ends"
                        );
                        return;
                    };
                    let lock = writing(&topics.desired);
                    let _guard = lock.lock().await;
                    match device::restore(&broker, &topics, &f.baseline, &f.last_by).await {
                        Ok(Some(v)) => tracing::info!(
                            rule,
                            device = device_id,
                            version = v,
                            by,
                            "command expired: settings restored"
                        ),
                        Ok(None) => tracing::info!(
                            rule,
                            device = device_id,
                            by,
                            "command expired: the desired state changed since; left as it is"
                        ),
                        Err(e) => {
                            tracing::warn!(rule, device = device_id, by, error = %format!("{e:#}"), "command expired, but restoring failed; the device keeps the commanded settings")
                        }
                    }
                });
            }
        }
        device::Sent::AlreadyThere(version) => {
            tracing::info!(rule = %a.rule, device = device_id, version, by, "command already sent before a restart: not sent again");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cooldown_is_per_rule_and_device_on_event_time() {
        let (tx, _rx) = mpsc::channel(1);
        let o = outlet(
            &Notifier {
                name: "n".into(),
                target: NotifyTarget::Sns {
                    topic_arn: "arn:aws:sns:us-east-1:1:t".into(),
                },
                cooldown: 300,
                rules: None,
            },
            tx,
        );
        let d = |s: &str| Some(s.to_string());
        let sent: Vec<bool> = [
            ("r", d("a"), 0),
            ("r", d("a"), 299),
            ("r", d("b"), 10),
            ("q", d("a"), 20),
            ("r", d("a"), 300),
            ("r", None, 0),
            ("r", None, 100),
            ("r", d("a"), 599),
            ("r", d("a"), 600),
        ]
        .iter()
        .map(|(r, dev, t)| o.due(r, dev, *t))
        .collect();
        assert_eq!(
            sent,
            [true, false, true, true, true, true, false, false, true]
        );
    }

    #[test]
    fn bodies_and_subjects() {
        let b: serde_json::Value = serde_json::from_str(&body(
            "p",
            "spike",
            "record",
            Some("well-1"),
            1_767_607_200_000_000,
            r#"{"pressure_psi":6000.5}"#,
        ))
        .unwrap();
        assert_eq!(b["event_time"], "2026-01-05T10:00:00Z");
        assert_eq!(b["detail"]["pressure_psi"], 6000.5);
        assert_eq!(b["device"], "well-1");
        assert_eq!(subject("r", "dév\n"), "shardlake alert: r on d?v?");
        assert_eq!(subject("r", &"x".repeat(200)).len(), 100);
    }
}
