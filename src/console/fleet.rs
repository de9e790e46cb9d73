//! The whole fleet as the console shows it: every worker's live state merged, plus the
//! acknowledgements of alerts.
//!
//! Workers are read through their [`crate::live`] state: in the same process
//! ([`Feed::InProcess`], `shardlake demo --live`) or over `GET /live?since=` on each worker's
//! ops port ([`Feed::Remote`]). The console is not a consumer of the stream: it takes no read
//! capacity from the shards, and the alerts it shows are the pipeline's own (the same rows as
//! the alerts table, with the same [`crate::live::alert_id`]).
//!
//! A device's row is the newest by event time whichever worker sent it, so a lease that moves
//! from one worker to another moves nothing on the page. Like a worker's live state, the
//! merged state numbers every change with one counter, so a browser that saw everything up to
//! version `v` gets exactly what changed after it: the page's event stream resumes with
//! `Last-Event-ID` without a gap or a double.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::live::{AlertRow, Changes, DeviceRow, HISTORY_MINUTES, Live, RowRef, Seq};

/// Alerts the console keeps in memory (older ones are in the alerts table).
pub const ALERTS_KEPT: usize = 5000;

/// An acknowledgement of an alert.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Ack {
    pub alert: String,
    pub by: String,
    /// Wall clock, µs since the epoch.
    pub at_us: i64,
    #[serde(default)]
    pub version: u64,
}

#[derive(Debug, Default)]
struct State {
    version: u64,
    devices: HashMap<String, DeviceRow>,
    /// Each device under the version of its last change: an update finds the devices that
    /// changed after a reader's version without scanning the fleet.
    by_version: BTreeMap<u64, String>,
    /// Per device and field: the version at which each minute of its history last changed,
    /// so an update carries every minute that changed after the reader's version (a worker
    /// catching up sends several minutes at once), not only the newest.
    /// (Aligned with the history's points, index by index.)
    point_versions: HashMap<String, HashMap<String, Vec<u64>>>,
    alerts: VecDeque<AlertRow>,
    alert_ids: HashMap<String, u64>,
    acks: HashMap<String, Ack>,
    alerts_dropped_through: u64,
}

/// What a reader that saw everything up to a version needs next.
#[derive(Debug, Clone, Default, Serialize)]
pub struct View {
    pub version: u64,
    /// A reader behind this version missed alerts: it must start again from a snapshot.
    pub alerts_from: u64,
    pub devices: Vec<DeviceRow>,
    pub alerts: Vec<AlertRow>,
    pub acks: Vec<Ack>,
}

/// An update as the event stream sends it: serialised once per (reader's version, version,
/// scope) and shared by every reader at that point, however many there are.
#[derive(Debug)]
pub struct Update {
    pub version: u64,
    pub alerts_from: u64,
    /// Nothing in the reader's scope changed (the changes were other tenants').
    pub empty: bool,
    /// The [`View`] as JSON.
    pub json: Arc<str>,
}

/// Which update: (reader's version, version, scope).
type UpdateKey = (u64, u64, Scope);

/// Updates kept for readers that ask for the same one: readers woken by one change ask
/// within milliseconds of each other, so a few entries serve them all.
const UPDATES_KEPT: usize = 32;

/// Who may see what: a tenant, or every tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    All,
    Tenant(String),
}

impl Scope {
    fn admits(&self, tenant: Option<&str>) -> bool {
        match self {
            Scope::All => true,
            Scope::Tenant(t) => tenant == Some(t.as_str()),
        }
    }
}

#[derive(Debug, Default)]
pub struct Fleet {
    state: Mutex<State>,
    /// The latest updates, by (reader's version, version, scope), newest last.
    updates: Mutex<VecDeque<(UpdateKey, Arc<Update>)>>,
    /// Woken at every change.
    pub changed: tokio::sync::Notify,
}

impl Fleet {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Merges what a worker reported.
    pub fn merge(&self, c: Changes) {
        if c.devices.is_empty() && c.alerts.is_empty() {
            return;
        }
        let mut s = self.state.lock().expect("not poisoned");
        for mut d in c.devices {
            s.version += 1;
            let version = s.version;
            let State {
                devices,
                point_versions,
                by_version,
                ..
            } = &mut *s;
            if !point_versions.contains_key(&d.device) {
                point_versions.insert(d.device.clone(), HashMap::new());
            }
            let versions = point_versions.get_mut(&d.device).expect("inserted");
            match devices.get_mut(&d.device) {
                Some(old) => {
                    for (field, points) in std::mem::take(&mut d.history) {
                        if !old.history.contains_key(&field) {
                            old.history.insert(field.clone(), Vec::new());
                        }
                        let into = old.history.get_mut(&field).expect("inserted");
                        merge_points(into, versions.entry(field).or_default(), points, version);
                    }
                    if d.event_us >= old.event_us {
                        old.event_us = d.event_us;
                        old.values = d.values;
                        old.tenant = d.tenant.or(old.tenant.take());
                    }
                    by_version.remove(&old.version);
                    old.version = version;
                    by_version.insert(version, d.device);
                }
                None => {
                    for (field, points) in &d.history {
                        versions.insert(field.clone(), vec![version; points.len()]);
                    }
                    d.version = version;
                    by_version.insert(version, d.device.clone());
                    devices.insert(d.device.clone(), d);
                }
            }
        }
        for a in c.alerts {
            self.add_alert(&mut s, a);
        }
        drop(s);
        self.changed.notify_waiters();
    }

    fn add_alert(&self, s: &mut State, mut a: AlertRow) {
        if s.alert_ids.contains_key(&a.id) {
            return;
        }
        s.version += 1;
        a.version = s.version;
        s.alert_ids.insert(a.id.clone(), a.version);
        // Kept in version order; the page sorts by event time.
        s.alerts.push_back(a);
        while s.alerts.len() > ALERTS_KEPT {
            let old = s.alerts.pop_front().expect("not empty");
            s.alert_ids.remove(&old.id);
            s.alerts_dropped_through = old.version;
        }
    }

    /// Alerts read back from the lake when the console starts (oldest first): the feed then
    /// shows what was raised before it started, with its acknowledgements.
    pub fn backfill(&self, alerts: Vec<AlertRow>) {
        let mut s = self.state.lock().expect("not poisoned");
        for a in alerts {
            self.add_alert(&mut s, a);
        }
    }

    /// Records an acknowledgement (already made durable by the caller); false if the alert is
    /// not known. The first acknowledgement stands.
    pub fn ack(&self, mut ack: Ack) -> Option<Ack> {
        let mut s = self.state.lock().expect("not poisoned");
        if let Some(old) = s.acks.get(&ack.alert) {
            return Some(old.clone());
        }
        s.version += 1;
        ack.version = s.version;
        s.acks.insert(ack.alert.clone(), ack.clone());
        drop(s);
        self.changed.notify_waiters();
        Some(ack)
    }

    pub fn alert(&self, id: &str) -> Option<AlertRow> {
        let s = self.state.lock().expect("not poisoned");
        let v = *s.alert_ids.get(id)?;
        let at = s.alerts.partition_point(|a| a.version < v);
        s.alerts.get(at).cloned()
    }

    /// One device as the fleet page shows it (with its whole history), if in `scope`.
    pub fn device(&self, id: &str, scope: &Scope) -> Option<DeviceRow> {
        let s = self.state.lock().expect("not poisoned");
        s.devices
            .get(id)
            .filter(|d| scope.admits(d.tenant.as_deref()))
            .cloned()
    }

    /// [`Fleet::since`] as the event stream sends it, serialised once and shared by every
    /// reader at the same version in the same scope.
    pub fn update(&self, since: u64, scope: &Scope) -> Arc<Update> {
        let version = self.state.lock().expect("not poisoned").version;
        let key = (since, version, scope.clone());
        if let Some((_, u)) = self
            .updates
            .lock()
            .expect("not poisoned")
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
        {
            return u.clone();
        }
        let view = {
            // Serialised from the state under its lock: no copy of the rows (with every
            // device changing, an update is the whole fleet, and copying it was most of the
            // console's work).
            let s = self.state.lock().expect("not poisoned");
            let view = ViewRef::of(&s, since, scope);
            Update {
                version: view.version,
                alerts_from: view.alerts_from,
                empty: view.devices.is_empty() && view.alerts.is_empty() && view.acks.is_empty(),
                json: serde_json::to_string(&view).expect("serialisable").into(),
            }
        };
        let update = Arc::new(view);
        // Keyed by the version the view was taken at (a change may have come in between).
        let mut updates = self.updates.lock().expect("not poisoned");
        updates.push_back(((since, update.version, scope.clone()), update.clone()));
        while updates.len() > UPDATES_KEPT {
            updates.pop_front();
        }
        update
    }

    /// Everything in `scope` that changed after `since`; `history` says whether devices carry
    /// their whole per-minute history (a snapshot) or only the minutes that changed after
    /// `since` (an update).
    pub fn since(&self, since: u64, scope: &Scope, history: bool) -> View {
        let s = self.state.lock().expect("not poisoned");
        let devices = s
            .by_version
            .range(since.saturating_add(1)..)
            .filter_map(|(_, id)| s.devices.get(id))
            .filter(|d| scope.admits(d.tenant.as_deref()))
            .map(|d| {
                if history {
                    return d.clone();
                }
                // An update: only the minutes changed after `since`, without copying the rest.
                let versions = s.point_versions.get(&d.device);
                let changed = d
                    .history
                    .iter()
                    .map(|(field, points)| {
                        let points = match versions.and_then(|v| v.get(field)) {
                            Some(pv) => points
                                .iter()
                                .zip(pv)
                                .filter(|(_, v)| **v > since)
                                .map(|(p, _)| *p)
                                .collect(),
                            None => points.clone(),
                        };
                        (field.clone(), points)
                    })
                    .collect();
                DeviceRow {
                    device: d.device.clone(),
                    tenant: d.tenant.clone(),
                    event_us: d.event_us,
                    values: d.values.clone(),
                    history: changed,
                    version: d.version,
                }
            })
            .collect();
        let from = s.alerts.partition_point(|a| a.version <= since);
        let alerts = s
            .alerts
            .range(from..)
            .filter(|a| scope.admits(a.tenant.as_deref()))
            .cloned()
            .collect();
        let acks = s
            .acks
            .values()
            .filter(|a| a.version > since && acked_in_scope(&s, a, scope))
            .cloned()
            .collect();
        View {
            version: s.version,
            alerts_from: s.alerts_dropped_through + 1,
            devices,
            alerts,
            acks,
        }
    }

    /// Every acknowledgement (to restore the acknowledgement store's view at start).
    pub fn load_acks(&self, acks: Vec<Ack>) {
        let mut s = self.state.lock().expect("not poisoned");
        for mut a in acks {
            s.version += 1;
            a.version = s.version;
            s.acks.entry(a.alert.clone()).or_insert(a);
        }
    }

    pub fn device_count(&self) -> usize {
        self.state.lock().expect("not poisoned").devices.len()
    }
}

/// [`View`] as an update serialises it, borrowed from the state: the same JSON as
/// `Fleet::since(since, scope, false)`.
#[derive(Serialize)]
struct ViewRef<'a> {
    version: u64,
    alerts_from: u64,
    devices: Vec<RowRef<'a, HistoryRef<'a>>>,
    alerts: Vec<&'a AlertRow>,
    acks: Vec<&'a Ack>,
}

/// A device's history with only the minutes changed after `since`.
struct HistoryRef<'a> {
    row: &'a DeviceRow,
    versions: Option<&'a HashMap<String, Vec<u64>>>,
    since: u64,
}

impl Serialize for HistoryRef<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = ser.serialize_map(Some(self.row.history.len()))?;
        for (field, points) in &self.row.history {
            match self.versions.and_then(|v| v.get(field)) {
                Some(pv) => {
                    let changed = (points.iter().zip(pv))
                        .filter(|(_, v)| **v > self.since)
                        .map(|(p, _)| p);
                    m.serialize_entry(field, &Seq::new(changed))?
                }
                None => m.serialize_entry(field, points)?,
            }
        }
        m.end()
    }
}

impl<'a> ViewRef<'a> {
    fn of(s: &'a State, since: u64, scope: &Scope) -> Self {
        let devices = (s.by_version.range(since.saturating_add(1)..))
            .filter_map(|(_, id)| s.devices.get(id))
            .filter(|d| scope.admits(d.tenant.as_deref()))
            .map(|d| RowRef {
                device: &d.device,
                tenant: &d.tenant,
                event_us: d.event_us,
                values: &d.values,
                history: HistoryRef {
                    row: d,
                    versions: s.point_versions.get(&d.device),
                    since,
                },
                version: d.version,
            })
            .collect();
        let from = s.alerts.partition_point(|a| a.version <= since);
        let alerts = (s.alerts.range(from..))
            .filter(|a| scope.admits(a.tenant.as_deref()))
            .collect();
        let acks = (s.acks.values())
            .filter(|a| a.version > since && acked_in_scope(s, a, scope))
            .collect();
        ViewRef {
            version: s.version,
            alerts_from: s.alerts_dropped_through + 1,
            devices,
            alerts,
            acks,
        }
    }
}

/// An acknowledgement is shown to a scope that sees its alert (or when the alert is no longer
/// kept).
fn acked_in_scope(s: &State, a: &Ack, scope: &Scope) -> bool {
    s.alert_ids.get(&a.alert).is_none_or(|v| {
        let at = s.alerts.partition_point(|x| x.version < *v);
        s.alerts
            .get(at)
            .is_none_or(|x| scope.admits(x.tenant.as_deref()))
    })
}

/// Adds a worker's `(minute, average)` points to the console's history of a field: a minute
/// already there is replaced (the worker's figure covers everything it read of that minute).
/// `versions` is kept aligned with `into`: each point's version of its last change.
fn merge_points(
    into: &mut Vec<(i64, f64)>,
    versions: &mut Vec<u64>,
    points: Vec<(i64, f64)>,
    version: u64,
) {
    versions.resize(into.len(), 0);
    for p in points {
        match into.binary_search_by_key(&p.0, |x| x.0) {
            Ok(i) => {
                into[i] = p;
                versions[i] = version;
            }
            Err(i) => {
                into.insert(i, p);
                versions.insert(i, version);
            }
        }
    }
    let excess = into.len().saturating_sub(HISTORY_MINUTES);
    into.drain(..excess);
    versions.drain(..excess);
}

/// Where a worker's live state is read.
#[derive(Clone)]
pub enum Feed {
    InProcess(Arc<Live>),
    /// A worker's ops address: `http://host:port`.
    Remote(String),
}

/// The shortest gap between two updates of the fleet from one worker, and between two events
/// to one page: well under the 1 s the console promises from event to page. (A quiet worker is
/// not asked again and again: its answer waits for the next change, [`LIVE_WAIT`].)
pub const POLL: Duration = Duration::from_millis(100);

/// How long a worker's `/live` answer may wait for a change.
const LIVE_WAIT: Duration = Duration::from_secs(2);

/// Follows a worker's live state into `fleet` until the process ends.
pub fn follow(feed: Feed, fleet: Arc<Fleet>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client");
        let mut since = 0u64;
        let mut failing = false;
        loop {
            // The gap is counted from the ask, not from the merge: a large answer (every
            // device changed) is not followed by a full gap on top of its own time.
            let asked = tokio::time::Instant::now();
            let changes = match &feed {
                Feed::InProcess(live) => {
                    let woken = live.changed.notified();
                    let c = live.since(since);
                    if c.version == since {
                        let _ = tokio::time::timeout(POLL, woken).await;
                        continue;
                    }
                    Ok(c)
                }
                Feed::Remote(base) => {
                    let url = format!(
                        "{}/live?since={since}&wait_ms={}",
                        base.trim_end_matches('/'),
                        LIVE_WAIT.as_millis()
                    );
                    match http
                        .get(&url)
                        .send()
                        .await
                        .and_then(|r| r.error_for_status())
                    {
                        Ok(r) => match r.bytes().await {
                            Ok(b) => {
                                serde_json::from_slice::<Changes>(&b).map_err(|e| e.to_string())
                            }
                            Err(e) => Err(e.to_string()),
                        },
                        Err(e) => Err(e.to_string()),
                    }
                }
            };
            match changes {
                Ok(c) => {
                    if failing {
                        tracing::info!("a worker's live state answers again");
                        failing = false;
                    }
                    if c.version < since {
                        // The worker restarted: its numbering did too.
                        since = 0;
                        continue;
                    }
                    since = c.version;
                    fleet.merge(c);
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "reading a worker's live state failed; retrying");
                        failing = true;
                    }
                }
            }
            if matches!(feed, Feed::Remote(_)) {
                tokio::time::sleep_until(asked + POLL).await;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str, tenant: &str, t: i64, v: f64) -> DeviceRow {
        DeviceRow {
            device: name.into(),
            tenant: Some(tenant.into()),
            event_us: t,
            values: serde_json::json!({"p": v}).as_object().unwrap().clone(),
            history: [("p".to_string(), vec![(t / 60_000_000 * 60_000_000, v)])].into(),
            version: 0,
        }
    }

    /// What a worker reports: these devices and alerts.
    fn changes(devices: Vec<DeviceRow>, alerts: Vec<AlertRow>) -> Changes {
        Changes {
            version: 1,
            alerts_from: 1,
            devices,
            alerts,
        }
    }

    fn alert(id: &str, tenant: &str) -> AlertRow {
        AlertRow {
            id: id.into(),
            rule: "r".into(),
            kind: "record".into(),
            device: Some("d".into()),
            tenant: Some(tenant.into()),
            event_us: 1,
            detail: "{}".into(),
            version: 0,
        }
    }

    #[test]
    fn an_update_is_serialised_once_per_version_and_scope_and_finds_changes_by_version() {
        let f = Fleet::new();
        let changes = |devices| changes(devices, vec![]);
        f.merge(changes(vec![
            device("a", "t1", 60_000_000, 1.0),
            device("b", "t2", 60_000_000, 1.0),
        ]));
        let all = f.update(0, &Scope::All);
        assert!(
            Arc::ptr_eq(&all, &f.update(0, &Scope::All)),
            "serialised twice"
        );
        let t1 = f.update(0, &Scope::Tenant("t1".into()));
        assert!(!Arc::ptr_eq(&all, &t1));
        assert!(
            t1.json.contains("\"a\"") && !t1.json.contains("\"b\""),
            "{}",
            t1.json
        );
        // `a` changes twice more: an update after version 2 holds it once, and not `b`.
        f.merge(changes(vec![device("a", "t1", 120_000_000, 2.0)]));
        f.merge(changes(vec![device("a", "t1", 180_000_000, 3.0)]));
        let later = f.update(2, &Scope::All);
        assert_eq!(later.version, 4);
        let view: serde_json::Value = serde_json::from_str(&later.json).unwrap();
        let names: Vec<&str> = view["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["device"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a"]);
        assert!(f.update(4, &Scope::Tenant("t2".into())).empty);
        assert!(f.update(0, &Scope::All).json.contains("\"b\""));
        assert_eq!(f.device("b", &Scope::Tenant("t1".into())), None);
        assert!(f.device("b", &Scope::All).is_some());
    }

    #[test]
    fn newest_reading_wins_whichever_worker_sent_it() {
        let f = Fleet::new();
        f.merge(changes(vec![device("a", "t1", 120_000_000, 2.0)], vec![]));
        // Another worker, older reading of the same device (a lease moved).
        f.merge(changes(vec![device("a", "t1", 60_000_000, 1.0)], vec![]));
        let v = f.since(0, &Scope::All, true);
        assert_eq!(v.devices[0].values["p"], serde_json::json!(2.0));
        assert_eq!(
            v.devices[0].history["p"],
            vec![(60_000_000, 1.0), (120_000_000, 2.0)]
        );
        let update = f.since(1, &Scope::All, false);
        assert_eq!(update.devices[0].history["p"], vec![(60_000_000, 1.0)]);
    }

    #[test]
    fn an_update_carries_every_minute_that_changed_since_the_readers_version() {
        let f = Fleet::new();
        let minute = |m: i64| m * 60_000_000;
        let mut d = device("a", "t1", minute(3), 3.0);
        d.history.insert(
            "p".into(),
            vec![(minute(1), 1.0), (minute(2), 2.0), (minute(3), 3.0)],
        );
        let changes = |devices| changes(devices, vec![]);
        f.merge(changes(vec![d]));
        let seen = f.since(0, &Scope::All, true).version;
        // A worker that caught up: minute 2 was read further, minutes 4 and 5 are new.
        let mut d = device("a", "t1", minute(5), 5.0);
        d.history.insert(
            "p".into(),
            vec![(minute(2), 2.5), (minute(4), 4.0), (minute(5), 5.0)],
        );
        f.merge(changes(vec![d]));
        let update = f.since(seen, &Scope::All, false);
        assert_eq!(
            update.devices[0].history["p"],
            vec![(minute(2), 2.5), (minute(4), 4.0), (minute(5), 5.0)],
            "minute 2 changed too, not only the newest"
        );
        assert_eq!(
            f.since(0, &Scope::All, true).devices[0].history["p"].len(),
            5
        );
        assert!(
            f.since(update.version, &Scope::All, false)
                .devices
                .is_empty()
        );
    }

    #[test]
    fn scopes_alerts_and_acks_resume_by_version() {
        let f = Fleet::new();
        f.merge(Changes {
            version: 2,
            alerts_from: 1,
            devices: vec![device("a", "t1", 1, 1.0), device("b", "t2", 1, 1.0)],
            alerts: vec![alert("x", "t1"), alert("y", "t2"), alert("x", "t1")],
        });
        let t1 = Scope::Tenant("t1".into());
        let v = f.since(0, &t1, true);
        assert_eq!(v.devices.len(), 1);
        assert_eq!(
            v.alerts.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
            ["x"]
        );
        let seen = v.version;
        f.ack(Ack {
            alert: "y".into(),
            by: "bob".into(),
            at_us: 5,
            version: 0,
        });
        f.ack(Ack {
            alert: "x".into(),
            by: "ann".into(),
            at_us: 6,
            version: 0,
        });
        let again = f
            .ack(Ack {
                alert: "x".into(),
                by: "bob".into(),
                at_us: 7,
                version: 0,
            })
            .unwrap();
        assert_eq!(again.by, "ann", "the first acknowledgement stands");
        let next = f.since(seen, &t1, false);
        assert!(next.devices.is_empty() && next.alerts.is_empty());
        assert_eq!(
            next.acks.iter().map(|a| a.by.as_str()).collect::<Vec<_>>(),
            ["ann"]
        );
        assert!(f.since(next.version, &t1, false).acks.is_empty());
    }

    #[test]
    fn an_update_serialised_from_the_state_is_the_view_since_the_readers_version() {
        let f = Fleet::new();
        f.merge(changes(
            vec![
                device("a", "t1", 60_000_000, 1.0),
                device("b", "t2", 60_000_000, 2.0),
            ],
            vec![alert("x", "t1"), alert("y", "t2")],
        ));
        // Later minutes and readings: each device's history grows, and only what changed
        // after a reader's version is in its update.
        for m in 2..5 {
            f.merge(changes(
                vec![
                    device("a", "t1", m * 60_000_000, m as f64),
                    device("b", "t2", m * 60_000_000 + 5, 0.5),
                ],
                vec![],
            ));
        }
        f.merge(changes(
            vec![device("c", "t1", 1, 9.0)],
            vec![alert("z", "t1")],
        ));
        f.ack(Ack {
            alert: "x".into(),
            by: "ann".into(),
            at_us: 6,
            version: 0,
        });
        let last = f.since(0, &Scope::All, true).version;
        for scope in [
            Scope::All,
            Scope::Tenant("t1".into()),
            Scope::Tenant("t2".into()),
        ] {
            for since in 0..=last {
                let got: serde_json::Value =
                    serde_json::from_str(&f.update(since, &scope).json).unwrap();
                let want = serde_json::to_value(f.since(since, &scope, false)).unwrap();
                assert_eq!(got, want, "since {since}, {scope:?}");
            }
        }
        // The comparison compares something: a partial history, and the whole of another.
        let mid = f.since(3, &Scope::All, false);
        assert!(
            mid.devices.iter().any(|d| d.history["p"].len() == 1),
            "{mid:?}"
        );
        assert_eq!(f.since(0, &Scope::All, false).devices.len(), 3);
    }
}
