//! A worker's live state for the console: the latest reading of every device it has read,
//! a per-minute history of each numeric field for the sparklines, and the alerts it raised
//! most recently.
//!
//! When the worker serves a console ([`crate::engine::Engine::set_live`]), each shard task
//! offers it the records it decodes as soon as they are decoded (after the replay cut: records
//! up to the shard's last commit, read again for open windows, are not offered twice), so
//! what a console shows does not wait for the engine to take the chunk (a window closing or
//! a commit keeps the engine's task busy for a while); the engine offers the alerts its rules
//! raise. Nothing here is durable and nothing here
//! is exactly once: it is what the worker has seen, for people to watch. The lake stays the
//! record of truth; an alert's [`alert_id`] is computed from its row, so the console recognises
//! an alert raised again after a crash, and finds the same alert in the alerts table.
//!
//! Every change takes the next number of one counter (`version`): a device's row carries the
//! version of its last change and an alert the version it arrived at, so a reader that saw
//! everything up to version `v` asks for what changed after `v` ([`Live::since`]) and gets
//! neither a gap nor a double. `GET /live?since=v` on the worker's ops port serves it to the
//! console ([`routes`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int32Type, Int64Type, TimestampMicrosecondType,
};
use serde::{Deserialize, Serialize};

/// Minutes of per-minute history kept per field.
pub const HISTORY_MINUTES: usize = 30;
/// Alerts kept for readers that catch up.
pub const ALERTS_KEPT: usize = 2000;

/// The latest reading of a device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceRow {
    pub device: String,
    pub tenant: Option<String>,
    /// Event time of the latest reading, µs since the epoch.
    pub event_us: i64,
    /// Each field of the latest reading (numbers and text; nulls left out).
    pub values: serde_json::Map<String, serde_json::Value>,
    /// Per numeric field: `(minute, average)` pairs, oldest first, at most
    /// [`HISTORY_MINUTES`] (the minute is µs since the epoch at the minute's start).
    pub history: HashMap<String, Vec<(i64, f64)>>,
    pub version: u64,
}

/// An alert as the console shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AlertRow {
    /// Stable over replays: see [`alert_id`].
    pub id: String,
    pub rule: String,
    pub kind: String,
    pub device: Option<String>,
    pub tenant: Option<String>,
    pub event_us: i64,
    /// The row that fired it, as JSON.
    pub detail: String,
    pub version: u64,
}

/// What changed after a version.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Changes {
    /// The version of the newest change included (ask for `since` this next time).
    pub version: u64,
    /// The oldest version whose alerts are still kept: a reader behind it missed alerts
    /// (it should say so and start again from a snapshot).
    pub alerts_from: u64,
    pub devices: Vec<DeviceRow>,
    pub alerts: Vec<AlertRow>,
}

/// A field's minutes: `(minute, sum, count, version of the minute's last change)`, oldest first.
type Minutes = VecDeque<(i64, f64, u32, u64)>;

#[derive(Debug)]
struct Device {
    row: DeviceRow,
    /// Per field, by its slot in [`State::fields`] (empty for a field never seen as a number).
    minutes: Vec<Minutes>,
}

#[derive(Debug, Default)]
struct State {
    version: u64,
    /// hashbrown's map with its foldhash hasher: one short-key lookup per reading, several
    /// times faster than SipHash, and the key copied only for a new device.
    devices: hashbrown::HashMap<String, Device>,
    /// The names of the fields a device's `minutes` hold, by slot (a handful, fixed by the
    /// schema: looked up once per batch, not per reading).
    fields: Vec<String>,
    alerts: VecDeque<AlertRow>,
    alert_ids: HashMap<String, u64>,
    /// Versions of alerts dropped from the front.
    dropped_through: u64,
}

/// Which columns of a decoded batch mean what.
#[derive(Debug, Clone)]
pub struct Columns {
    pub key: String,
    pub tenant: Option<String>,
    pub event_time: usize,
    /// Columns shown as values (the schema's fields but the key, tenant and event time).
    pub fields: Vec<usize>,
}

/// One worker's live state. Cheap to share; every method takes the lock briefly.
#[derive(Debug, Default)]
pub struct Live {
    state: Mutex<State>,
    /// Woken at every change.
    pub changed: tokio::sync::Notify,
}

const MINUTE_US: i64 = 60_000_000;

impl Live {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Takes in decoded records: a device's row moves to its newest reading by event time
    /// (an older reading read later only adds to the history).
    pub fn observe(&self, batch: &RecordBatch, cols: &Columns) {
        let n = batch.num_rows();
        if n == 0 {
            return;
        }
        let Some(keys) = batch.column_by_name(&cols.key) else {
            return;
        };
        let keys = arrow::compute::cast(keys, &DataType::Utf8).expect("any column casts to text");
        let keys = keys.as_string::<i32>();
        let tenants = cols
            .tenant
            .as_ref()
            .and_then(|t| batch.column_by_name(t))
            .map(|c| arrow::compute::cast(c, &DataType::Utf8).expect("text"));
        let tenants = tenants.as_ref().map(|c| c.as_string::<i32>());
        let Some(times) = batch
            .column(cols.event_time)
            .as_primitive_opt::<TimestampMicrosecondType>()
        else {
            return;
        };
        let schema = batch.schema();
        let mut s = self.state.lock().expect("not poisoned");
        let s = &mut *s;
        // (name, column, slot of its minutes)
        let fields: Vec<(&str, &dyn Array, usize)> = (cols.fields.iter())
            .map(|&i| {
                let name = schema.field(i).name().as_str();
                let slot = match s.fields.iter().position(|f| f == name) {
                    Some(slot) => slot,
                    None => {
                        s.fields.push(name.to_string());
                        s.fields.len() - 1
                    }
                };
                (name, batch.column(i).as_ref(), slot)
            })
            .collect();
        let slots = s.fields.len();
        for i in 0..n {
            if keys.is_null(i) || times.is_null(i) {
                continue;
            }
            let t = times.value(i);
            let key = keys.value(i);
            let d = s.devices.entry_ref(key).or_insert_with(|| Device {
                row: DeviceRow {
                    device: key.to_string(),
                    tenant: None,
                    event_us: i64::MIN,
                    values: Default::default(),
                    history: Default::default(),
                    version: 0,
                },
                minutes: Vec::new(),
            });
            if d.minutes.len() < slots {
                d.minutes.resize_with(slots, VecDeque::new);
            }
            s.version += 1;
            d.row.version = s.version;
            let newest = t >= d.row.event_us;
            if newest {
                d.row.event_us = t;
                // Allocates only when the tenant changes (a device's rarely does).
                if let Some(c) = tenants
                    && c.is_valid(i)
                    && d.row.tenant.as_deref() != Some(c.value(i))
                {
                    d.row.tenant = Some(c.value(i).to_string());
                }
            }
            let minute = t.div_euclid(MINUTE_US) * MINUTE_US;
            for &(name, col, slot) in &fields {
                let number = match col.data_type() {
                    DataType::Float64 => {
                        let a = col.as_primitive::<Float64Type>();
                        a.is_valid(i).then(|| a.value(i))
                    }
                    DataType::Int64 => {
                        let a = col.as_primitive::<Int64Type>();
                        a.is_valid(i).then(|| a.value(i) as f64)
                    }
                    DataType::Float32 => {
                        let a = col.as_primitive::<Float32Type>();
                        a.is_valid(i).then(|| f64::from(a.value(i)))
                    }
                    DataType::Int32 => {
                        let a = col.as_primitive::<Int32Type>();
                        a.is_valid(i).then(|| f64::from(a.value(i)))
                    }
                    _ => None,
                };
                if let Some(v) = number {
                    add_minute(&mut d.minutes[slot], minute, v, d.row.version);
                }
                if newest {
                    // One lookup of the field's value; text that did not change (a status)
                    // is not copied again.
                    match d.row.values.get_mut(name) {
                        Some(old) => match number {
                            Some(v) => match serde_json::Number::from_f64(v) {
                                Some(v) => *old = serde_json::Value::Number(v),
                                None => {
                                    d.row.values.remove(name);
                                }
                            },
                            None => {
                                if let (serde_json::Value::String(old), DataType::Utf8) =
                                    (&*old, col.data_type())
                                    && col.is_valid(i)
                                    && old == col.as_string::<i32>().value(i)
                                {
                                    continue;
                                }
                                match text(col, i) {
                                    Some(v) => *old = serde_json::Value::String(v),
                                    None => {
                                        d.row.values.remove(name);
                                    }
                                }
                            }
                        },
                        None => {
                            let value = match number {
                                Some(v) => {
                                    serde_json::Number::from_f64(v).map(serde_json::Value::Number)
                                }
                                None => text(col, i).map(serde_json::Value::String),
                            };
                            if let Some(v) = value {
                                d.row.values.insert(name.to_string(), v);
                            }
                        }
                    }
                }
            }
        }
        drop(fields);
        self.changed.notify_waiters();
    }

    /// Takes in a batch of the alerts table's rows (rule, kind, event_time, key, detail);
    /// `tenant_field` names the tenant field of the row that fired (read from `detail`).
    pub fn alerts(&self, alerts: &RecordBatch, tenant_field: Option<&str>) {
        let mut s = self.state.lock().expect("not poisoned");
        for mut row in alert_rows(alerts, tenant_field) {
            if s.alert_ids.contains_key(&row.id) {
                continue;
            }
            s.version += 1;
            row.version = s.version;
            let id = row.id.clone();
            s.alert_ids.insert(id, row.version);
            s.alerts.push_back(row);
            while s.alerts.len() > ALERTS_KEPT {
                let old = s.alerts.pop_front().expect("not empty");
                s.alert_ids.remove(&old.id);
                s.dropped_through = old.version;
            }
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// Everything that changed after version `since` (0: everything kept, with each
    /// device's whole history; otherwise the minutes of its history that changed after
    /// `since`: usually the newest alone, but every minute read since when the worker
    /// catches up, or a minute that turned between two reads).
    pub fn since(&self, since: u64) -> Changes {
        let s = self.state.lock().expect("not poisoned");
        let devices = s
            .devices
            .values()
            .filter(|d| d.row.version > since)
            .map(|d| {
                let mut row = d.row.clone();
                row.history = (s.fields.iter().zip(&d.minutes))
                    .map(|(f, m)| {
                        // A snapshot carries the whole history; an update only the minutes
                        // that changed after `since` (the reader keeps the rest).
                        let points: Vec<(i64, f64)> = m
                            .iter()
                            .filter(|p| p.3 > since)
                            .map(|&(t, sum, n, _)| (t, sum / f64::from(n)))
                            .collect();
                        (f.clone(), points)
                    })
                    .filter(|(_, points)| !points.is_empty())
                    .collect();
                row
            })
            .collect();
        let from = s.alerts.partition_point(|a| a.version <= since);
        Changes {
            version: s.version,
            alerts_from: s.dropped_through + 1,
            devices,
            alerts: s.alerts.range(from..).cloned().collect(),
        }
    }

    /// [`Live::since`] as the JSON `GET /live` answers, with its version: serialised from the
    /// state under its lock, without copying a row (at 100k records/s every device changes
    /// between two asks, and copying the whole fleet ten times a second was most of what the
    /// live state cost the worker).
    pub fn since_json(&self, since: u64) -> (u64, Vec<u8>) {
        let s = self.state.lock().expect("not poisoned");
        let from = s.alerts.partition_point(|a| a.version <= since);
        let view = ChangesRef {
            version: s.version,
            alerts_from: s.dropped_through + 1,
            devices: DevicesRef { s: &s, since },
            alerts: Seq::new(s.alerts.range(from..)),
        };
        let mut out = Vec::with_capacity(4096);
        serde_json::to_writer(&mut out, &view).expect("serialisable");
        (s.version, out)
    }

    /// The version of the newest change.
    pub fn version(&self) -> u64 {
        self.state.lock().expect("not poisoned").version
    }

    /// How many devices are tracked.
    pub fn devices(&self) -> usize {
        self.state.lock().expect("not poisoned").devices.len()
    }
}

/// [`Changes`] borrowed from the state: the same JSON.
#[derive(Serialize)]
struct ChangesRef<'a> {
    version: u64,
    alerts_from: u64,
    devices: DevicesRef<'a>,
    alerts: Seq<std::collections::vec_deque::Iter<'a, AlertRow>>,
}

/// The devices that changed after `since`, each as [`Live::since`] makes its row.
struct DevicesRef<'a> {
    s: &'a State,
    since: u64,
}

impl Serialize for DevicesRef<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let since = self.since;
        ser.collect_seq(
            (self.s.devices.values())
                .filter(|d| d.row.version > since)
                .map(|d| RowRef {
                    device: &d.row.device,
                    tenant: &d.row.tenant,
                    event_us: d.row.event_us,
                    values: &d.row.values,
                    history: MinutesRef {
                        fields: &self.s.fields,
                        minutes: &d.minutes,
                        since,
                    },
                    version: d.row.version,
                }),
        )
    }
}

/// A device's row borrowed for serialising, its history as `H` serialises it: the JSON of a
/// [`DeviceRow`] (the worker's `/live` answer, and the console's updates).
#[derive(Serialize)]
pub(crate) struct RowRef<'a, H> {
    pub device: &'a str,
    pub tenant: &'a Option<String>,
    pub event_us: i64,
    pub values: &'a serde_json::Map<String, serde_json::Value>,
    pub history: H,
    pub version: u64,
}

/// A device's per-minute history as [`DeviceRow::history`]: per field, the minutes that
/// changed after `since`, as `(minute, average)`; fields with none are left out.
struct MinutesRef<'a> {
    fields: &'a [String],
    minutes: &'a [Minutes],
    since: u64,
}

impl Serialize for MinutesRef<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let since = self.since;
        let changed = |m: &Minutes| m.iter().any(|p| p.3 > since);
        let fields = self.minutes.iter().filter(|m| changed(m)).count();
        let mut map = ser.serialize_map(Some(fields))?;
        for (field, m) in (self.fields.iter().zip(self.minutes)).filter(|(_, m)| changed(m)) {
            let points = (m.iter())
                .filter(|p| p.3 > since)
                .map(|&(t, sum, n, _)| (t, sum / f64::from(n)));
            map.serialize_entry(field, &Seq::new(points))?;
        }
        map.end()
    }
}

/// An iterator serialised as a sequence (once).
pub(crate) struct Seq<I>(std::cell::Cell<Option<I>>);

impl<I> Seq<I> {
    pub(crate) fn new(items: I) -> Self {
        Self(std::cell::Cell::new(Some(items)))
    }
}

impl<I: Iterator<Item = T>, T: Serialize> Serialize for Seq<I> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_seq(self.0.take().expect("serialised once"))
    }
}

fn add_minute(m: &mut Minutes, minute: i64, v: f64, version: u64) {
    match m.iter_mut().rev().find(|(t, _, _, _)| *t == minute) {
        Some(slot) => {
            slot.1 += v;
            slot.2 += 1;
            slot.3 = version;
        }
        None => {
            let at = m.partition_point(|(t, _, _, _)| *t < minute);
            if at == 0 && m.len() >= HISTORY_MINUTES {
                return; // older than everything kept
            }
            m.insert(at, (minute, v, 1, version));
            while m.len() > HISTORY_MINUTES {
                m.pop_front();
            }
        }
    }
}

fn text(col: &dyn Array, i: usize) -> Option<String> {
    if col.is_null(i) {
        return None;
    }
    match col.data_type() {
        DataType::Utf8 => Some(col.as_string::<i32>().value(i).to_string()),
        DataType::Boolean => Some(col.as_boolean().value(i).to_string()),
        _ => arrow::util::display::ArrayFormatter::try_new(col, &Default::default())
            .ok()
            .map(|f| f.value(i).to_string()),
    }
}

/// The rows of an alerts-table batch (rule, kind, event_time, key, detail) as the console
/// shows them (version 0: the holder numbers them).
pub fn alert_rows(alerts: &RecordBatch, tenant_field: Option<&str>) -> Vec<AlertRow> {
    let rule = alerts.column(0).as_string::<i32>();
    let kind = alerts.column(1).as_string::<i32>();
    let time = alerts.column(2).as_primitive::<TimestampMicrosecondType>();
    let key = alerts.column(3).as_string::<i32>();
    let detail = alerts.column(4).as_string::<i32>();
    (0..alerts.num_rows())
        .map(|i| {
            let device = key.is_valid(i).then(|| key.value(i).to_string());
            AlertRow {
                id: alert_id(
                    rule.value(i),
                    kind.value(i),
                    device.as_deref(),
                    time.value(i),
                    detail.value(i),
                ),
                rule: rule.value(i).to_string(),
                kind: kind.value(i).to_string(),
                device,
                tenant: tenant_field.and_then(|f| tenant_of(detail.value(i), f)),
                event_us: time.value(i),
                detail: detail.value(i).to_string(),
                version: 0,
            }
        })
        .collect()
}

/// The tenant an alert's `detail` (the row that fired, as JSON) names in `field`.
pub fn tenant_of(detail: &str, field: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(detail)
        .ok()?
        .get(field)?
        .as_str()
        .map(str::to_string)
}

/// An alert's identity: the same row raised again (after a restart replayed its record)
/// has the same id, here and when read back from the alerts table.
pub fn alert_id(
    rule: &str,
    kind: &str,
    device: Option<&str>,
    event_us: i64,
    detail: &str,
) -> String {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    for part in [
        rule,
        kind,
        device.unwrap_or("\u{0}"),
        &event_us.to_string(),
        detail,
    ] {
        h.update(part.as_bytes());
        h.update([0x1f]);
    }
    let digest = h.finalize();
    digest[..10].iter().map(|b| format!("{b:02x}")).collect()
}

/// The longest a `GET /live` waits for a change.
const LIVE_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// `GET /live?since=V[&wait_ms=MS]` on the ops port: [`Live::since`] as JSON. With `wait_ms`
/// and nothing new after `V`, the answer waits for the next change (up to `wait_ms`, at most
/// 5 s): a console following the worker sees a change as soon as it happens, without asking
/// again and again while nothing does.
pub fn routes(live: Arc<Live>) -> axum::Router {
    use axum::extract::{Query, State};
    #[derive(Deserialize)]
    struct Since {
        #[serde(default)]
        since: u64,
        #[serde(default)]
        wait_ms: u64,
    }
    axum::Router::new()
        .route(
            "/live",
            axum::routing::get(
                |State(live): State<Arc<Live>>, Query(q): Query<Since>| async move {
                    let woken = live.changed.notified();
                    tokio::pin!(woken);
                    woken.as_mut().enable();
                    if live.version() == q.since && q.wait_ms > 0 {
                        let wait = std::time::Duration::from_millis(q.wait_ms).min(LIVE_WAIT_MAX);
                        let _ = tokio::time::timeout(wait, woken).await;
                    }
                    let (_, body) = live.since_json(q.since);
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        body,
                    )
                },
            ),
        )
        .with_state(live)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, Schema, TimeUnit};

    fn batch(rows: &[(&str, i64, Option<f64>)]) -> RecordBatch {
        let schema = Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                false,
            ),
            Field::new("pressure", DataType::Float64, true),
        ]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(TimestampMicrosecondArray::from_iter_values(
                    rows.iter().map(|r| r.1),
                )),
                Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.2))),
            ],
        )
        .unwrap()
    }

    fn cols() -> Columns {
        Columns {
            key: "device_id".into(),
            tenant: None,
            event_time: 1,
            fields: vec![2],
        }
    }

    #[tokio::test]
    async fn a_waiting_request_answers_at_the_next_change() {
        let live = Live::new();
        live.observe(&batch(&[("a", MINUTE_US, Some(1.0))]), &cols());
        let seen = live.since(0).version;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/live", listener.local_addr().unwrap());
        tokio::spawn(axum::serve(listener, routes(live.clone())).into_future());
        let get = |q: String| {
            let url = format!("{url}?{q}");
            async move {
                let body = reqwest::get(url).await.unwrap().bytes().await.unwrap();
                serde_json::from_slice::<Changes>(&body).unwrap()
            }
        };
        // Nothing new and no wait: answered at once, empty.
        assert_eq!(get(format!("since={seen}")).await.version, seen);
        // Nothing new, a wait: the answer is the change made while it waited.
        let waiting = tokio::spawn(get(format!("since={seen}&wait_ms=5000")));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "answered before anything changed");
        let started = std::time::Instant::now();
        live.observe(&batch(&[("b", MINUTE_US, Some(2.0))]), &cols());
        let c = waiting.await.unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(c.devices.len(), 1);
        assert_eq!(c.devices[0].device, "b");
    }

    #[test]
    fn latest_by_event_time_and_minute_history() {
        let live = Live::new();
        live.observe(
            &batch(&[
                ("a", 2 * MINUTE_US, Some(1.0)),
                ("a", 2 * MINUTE_US + 1, Some(3.0)),
            ]),
            &cols(),
        );
        // An older reading read later: history only.
        live.observe(&batch(&[("a", MINUTE_US, Some(10.0))]), &cols());
        let c = live.since(0);
        assert_eq!(c.devices.len(), 1);
        let a = &c.devices[0];
        assert_eq!(a.event_us, 2 * MINUTE_US + 1);
        assert_eq!(a.values["pressure"], serde_json::json!(3.0));
        assert_eq!(
            a.history["pressure"],
            vec![(MINUTE_US, 10.0), (2 * MINUTE_US, 2.0)]
        );
        assert_eq!(a.version, 3);
        assert!(live.since(3).devices.is_empty());
        live.observe(&batch(&[("b", 0, None)]), &cols());
        let c = live.since(3);
        assert_eq!(
            c.devices
                .iter()
                .map(|d| d.device.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
        assert!(!c.devices[0].values.contains_key("pressure"));
    }

    #[test]
    fn an_update_carries_every_minute_that_changed() {
        let live = Live::new();
        live.observe(&batch(&[("a", MINUTE_US, Some(1.0))]), &cols());
        let seen = live.since(0).version;
        // Read between two polls: the rest of minute 1, then minutes 2 and 3.
        live.observe(
            &batch(&[
                ("a", MINUTE_US + 1, Some(3.0)),
                ("a", 2 * MINUTE_US, Some(5.0)),
                ("a", 3 * MINUTE_US, Some(7.0)),
            ]),
            &cols(),
        );
        let c = live.since(seen);
        assert_eq!(
            c.devices[0].history["pressure"],
            vec![(MINUTE_US, 2.0), (2 * MINUTE_US, 5.0), (3 * MINUTE_US, 7.0)]
        );
        live.observe(&batch(&[("a", 3 * MINUTE_US + 1, Some(9.0))]), &cols());
        let c2 = live.since(c.version);
        assert_eq!(
            c2.devices[0].history["pressure"],
            vec![(3 * MINUTE_US, 8.0)]
        );
    }

    #[test]
    fn history_keeps_the_newest_minutes() {
        let live = Live::new();
        let rows: Vec<_> = (0..HISTORY_MINUTES as i64 + 5)
            .map(|m| ("a", m * MINUTE_US, Some(m as f64)))
            .collect();
        live.observe(&batch(&rows), &cols());
        let h = &live.since(0).devices[0].history["pressure"];
        assert_eq!(h.len(), HISTORY_MINUTES);
        assert_eq!(h[0].0, 5 * MINUTE_US);
    }

    #[test]
    fn the_live_answer_serialised_from_the_state_is_since_as_json() {
        // Two numeric fields, so a device can have a field with no minute changed.
        let schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                false,
            ),
            Field::new("pressure", DataType::Float64, true),
            Field::new("temp", DataType::Float64, true),
        ]));
        let cols = Columns {
            fields: vec![2, 3],
            ..cols()
        };
        let rows = |r: &[(&str, i64, Option<f64>, Option<f64>)]| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from_iter_values(r.iter().map(|x| x.0))),
                    Arc::new(TimestampMicrosecondArray::from_iter_values(
                        r.iter().map(|x| x.1),
                    )),
                    Arc::new(Float64Array::from_iter(r.iter().map(|x| x.2))),
                    Arc::new(Float64Array::from_iter(r.iter().map(|x| x.3))),
                ],
            )
            .unwrap()
        };
        let live = Live::new();
        live.observe(
            &rows(&[
                ("a", MINUTE_US, Some(1.0), Some(10.0)),
                ("b", MINUTE_US, Some(2.0), None),
            ]),
            &cols,
        );
        live.alerts(&alerts_batch(), Some("tenant"));
        live.observe(
            &rows(&[
                ("a", 2 * MINUTE_US, Some(3.0), None),
                ("c", 3 * MINUTE_US, None, Some(4.0)),
                ("a", MINUTE_US + 5, None, Some(12.0)),
            ]),
            &cols,
        );
        let newest = live.version();
        assert!(newest >= 7);
        for since in 0..=newest + 1 {
            let (version, body) = live.since_json(since);
            assert_eq!(version, newest);
            let got: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let want = serde_json::to_value(live.since(since)).unwrap();
            assert_eq!(got, want, "since {since}");
        }
    }

    fn alerts_batch() -> RecordBatch {
        let schema = Schema::new(vec![
            Field::new("rule", DataType::Utf8, false),
            Field::new("kind", DataType::Utf8, false),
            Field::new(
                "event_time",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                false,
            ),
            Field::new("key", DataType::Utf8, true),
            Field::new("detail", DataType::Utf8, false),
        ]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(StringArray::from(vec!["spike", "spike"])),
                Arc::new(StringArray::from(vec!["record", "record"])),
                Arc::new(TimestampMicrosecondArray::from(vec![5, 6])),
                Arc::new(StringArray::from(vec![Some("a"), None])),
                Arc::new(StringArray::from(vec![r#"{"tenant":"t1"}"#, "{}"])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn alerts_are_kept_once_in_version_order() {
        let alerts = alerts_batch();
        let live = Live::new();
        live.alerts(&alerts, Some("tenant"));
        live.alerts(&alerts, Some("tenant")); // replayed after a restart
        let c = live.since(0);
        assert_eq!(c.alerts.len(), 2);
        assert_eq!(c.alerts[0].tenant.as_deref(), Some("t1"));
        assert_eq!(
            c.alerts[0].id,
            alert_id("spike", "record", Some("a"), 5, r#"{"tenant":"t1"}"#)
        );
        assert_ne!(c.alerts[0].id, c.alerts[1].id);
        assert_eq!(live.since(c.alerts[0].version).alerts.len(), 1);
        assert_eq!(c.alerts_from, 1);
    }
}
