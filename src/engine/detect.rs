//! Detectors: alert rules that learn each series (a device, or a device and the `by` columns)
//! from its own readings, and whose learned state is part of every commit.
//!
//! # Kinds
//!
//! - `zscore`: the distance of a reading from an exponentially weighted mean, in exponentially
//!   weighted standard deviations (`half_life` in readings). A reading above `threshold` is
//!   clipped to it before it updates the baseline, so one spike does not blind the detector
//!   for the next.
//! - `mad`: the distance from the median of the last `window` readings, in scaled median
//!   absolute deviations (1.4826 × MAD, a standard deviation for normal noise); robust to
//!   noisy sensors and outliers in the baseline.
//! - `cusum`: two-sided cumulative sums of standardised readings minus `k`, alerting above
//!   `h`: a level shift, or a drift faster than the baseline follows. The baseline (mean and
//!   deviation) is learned over the warm-up, then follows every reading with `half_life`
//!   (readings), each reading's pull clipped to 3 deviations: slow normal wander (a daily
//!   cycle, a reservoir that drains) moves the baseline, a step does not. After an alert it
//!   is learned again, so a shift alerts once and the new level becomes normal. The
//!   half-life is the trade-off: 20 readings (the default) follows a wander of a few
//!   deviations an hour and so also a drift that slow; a longer one finds slower drifts and
//!   flags slow normal change as well (`benches/README.md` measures both).
//! - `stuck`: the value moved by at most `epsilon` for `for` (event time) or `readings`.
//! - `silent`: a series seen before sent nothing for `after` of event time. It is judged by
//!   the watermark (never the wall clock), so a replay or a lagging shard does not make a
//!   fleet silent: the watermark waits for the slowest shard. The same gap is also found
//!   when the next reading arrives, so either way the alert is the same row (event time =
//!   last reading + `after`).
//!   With `known:` (a CSV file of the devices expected to report), a listed device that
//!   never reported is found too: each shard watches the listed devices whose partition key
//!   (`known.partition_key`, by default `identity.key`) hashes into its hash-key range, from
//!   its first record's event time on (see "Known devices" below).
//! - `rate`: |Δvalue| per second of event time between consecutive readings above
//!   `max_per_second`.
//!
//! `zscore`, `mad` and `rate` alert when a series enters the condition (the first reading
//! over the threshold), not on every reading while it holds; `stuck` and `silent` once per
//! episode; `cusum` when a sum crosses `h`. No series alerts before `warmup` readings, nor
//! within `cooldown` (event time) of its previous alert. Each alert's `detail` explains it:
//! the series, the value, the baseline, the score, the threshold and how long the
//! condition has held.
//!
//! # State that survives
//!
//! A device's records stay on one shard, in order, so the state is kept per shard. Only
//! records after a shard's committed `records` position feed the detectors (replays for
//! open windows do not), so the state is a function of the committed records. At each
//! commit, every shard whose state changed writes a snapshot, `_state/<pipeline>/<shard>/
//! state-<commit>-<worker>-0000.json.zst`, staged and published with the commit's files;
//! the shard's checkpoint names it ([`crate::checkpoint::ShardCheckpoint::detectors`]). A
//! restart, a SIGKILL at any point or a lease that moves to another worker reads the
//! snapshot the checkpoint names and goes on from the same records: the alerts are those
//! of an uninterrupted run. The snapshot a newer commit replaced is removed after that
//! commit (one left behind by a crash in between is harmless: nothing names it).
//!
//! # Across a split or a merge
//!
//! A device's state follows the device. When a shard ends (Kinesis `SHARD_END`, after a
//! split or a merge), its series become *inherited*: kept, but no longer judged there. A
//! child shard starts with every series of its parents as inherited (a merge takes both
//! parents'; where both had a series, the one seen last wins), and a series key moves into
//! the child's own (with every rule's series under it) at the child's first reading of it:
//! a zscore goes on from the parent's
//! mean and variance, a stuck sensor's run goes on counting, a `silent` gap that spans the
//! split is found by the reading that ends it. Which child a device goes to is not known
//! until it reports there (the partition key's hash range is not the series key), so an
//! inherited series is not judged `silent` by the watermark: a device that stops exactly
//! at a split is not called silent until it reports again, and nothing is called silent
//! on the child it never went to. A child inherits from its parents' states in memory
//! when this worker read them, else from the snapshots their checkpoints name (a lease
//! store reads the parents' items); it inherits at its first records or its end, and its
//! own snapshot holds what it inherited, so a restart reads the same.
//!
//! # Known devices
//!
//! Kinesis puts a record on the shard whose hash-key range holds the MD5 of its partition
//! key (the local stream does the same over equal ranges), so a listed device's shard is
//! known before it ever reports: the shard, and so the worker holding its lease, is the one
//! that watches it. At a shard's first records in a process, every listed device in its range
//! that it has no series for becomes a `silent` series with no readings, watched from that
//! first record's event time: the watermark finds it silent `after` later (no warm-up:
//! it never reported), or its first reading finds the same gap, with the same row
//! (`baseline: {last_seen: null, watched_since}`). The seeded series are state like any
//! other: in the snapshot, restored, never watched twice. A listed device that a parent
//! shard had learned (inherited) moves into the child whose range holds it at the child's
//! first records, so a listed device that stops exactly at a split is found silent by the
//! watermark too. Limits: a shard that never gets a record watches nobody (its first record
//! is the clock's start); a partition key shape that differs from the one the devices'
//! records are put with watches a device on a shard it never reports to, which then calls
//! it silent (the shape must be the IoT rule's `PartitionKey`, as for `identity:`).
//!
//! # Bounded memory
//!
//! `limits.detector_series` bounds the series one worker tracks. Past it, the least
//! recently seen are forgotten (counted in `shardlake_detector_series_evicted_total`): a
//! forgotten series starts again with its warm-up. Rules whose series are keyed alike (the
//! same `by` columns) keep them in one map, a slot per rule under each key, so a reading is
//! looked up once for all of them; a key is seen when any of its rules takes a reading, and
//! it is forgotten with all its slots. Eviction depends on the order in which
//! shards are read, so a worker at its bound gives up the exact-replay guarantee for the
//! series it evicts, never more.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, RecordBatch, StringArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type};
use datafusion::physical_plan::PhysicalExpr;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::sql::DetectRule;
use crate::config::DetectorKind;
use crate::decode::fmt_us;

/// An alert a detector raised; the engine writes it to the alerts table.
#[derive(Debug, Clone, PartialEq)]
pub struct Raised {
    pub rule: usize,
    pub event_time: i64,
    pub key: String,
    pub detail: String,
}

/// Everything the detectors learned, per shard.
pub struct Detectors {
    rules: Vec<DetectRule>,
    key: String,
    /// Rules whose series are keyed alike (the same `by` columns) share one map of series
    /// keys, so a reading is looked up once for all of them.
    groups: Vec<Group>,
    /// Per rule: its group and its place in the group's slots.
    place: Vec<(usize, usize)>,
    /// Per rule: `zscore`'s and `cusum`'s weight of a new reading, `1 − 0.5^(1/half_life)`
    /// (0 for the other kinds).
    alpha: Vec<f64>,
    shards: HashMap<Arc<str>, ShardState>,
    /// Series tracked over every shard, and the bound.
    len: usize,
    limit: usize,
    /// Increases with every reading: what "least recently seen" compares.
    tick: u64,
    evicted: u64,
    /// No `silent` series is due before this watermark (a lower bound; `None`: none tracked).
    silent_due: Option<i64>,
    /// Each shard's hash-key range (inclusive), for the `known:` devices of `silent` rules.
    ranges: HashMap<Arc<str>, (u128, u128)>,
}

/// Rules that share their series keys.
struct Group {
    /// The rules' `by` columns.
    by: Vec<String>,
    /// The rules, in the order of an [`Entry`]'s slots.
    rules: Vec<usize>,
}

/// One series key's state under every rule of its group.
#[derive(Debug, Clone)]
struct Entry {
    /// When it was last seen, in readings of the worker (for eviction).
    touched: u64,
    /// Per rule of the group: its series (`None`: the rule has not seen this key).
    slots: Box<[Option<Series>]>,
}

impl Entry {
    fn new(rules: usize) -> Self {
        Self {
            touched: 0,
            slots: vec![None; rules].into_boxed_slice(),
        }
    }

    fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Slot `j`'s series: the one here; else the one a parent shard learned under the same
    /// key (moved out of `inherited`, whose emptied entry goes); else `new()`, counted in
    /// `added`.
    fn slot(
        &mut self,
        j: usize,
        inherited: &mut HashMap<Box<str>, Entry>,
        key: &str,
        added: &mut usize,
        new: impl FnOnce() -> Series,
    ) -> &mut Series {
        if self.slots[j].is_none() {
            let mut from_parent = None;
            if let Some(e) = inherited.get_mut(key) {
                from_parent = e.slots[j].take();
                if e.slots.iter().all(Option::is_none) {
                    inherited.remove(key);
                }
            }
            self.slots[j] = Some(from_parent.unwrap_or_else(|| {
                *added += 1;
                new()
            }));
        }
        self.slots[j].as_mut().expect("just filled")
    }
}

#[derive(Default)]
struct ShardState {
    /// Per group: series key → state.
    series: Vec<HashMap<Box<str>, Entry>>,
    /// Per group: series a parent shard learned that this shard has not seen yet, or, once
    /// this shard ended, every series it had (for its children). Never judged `silent`.
    inherited: Vec<HashMap<Box<str>, Entry>>,
    /// Changed since the last snapshot.
    dirty: bool,
    /// The `known:` devices in its hash-key range are watched (done at its first records in
    /// this process).
    seeded: bool,
}

impl ShardState {
    fn new(groups: usize) -> Self {
        Self {
            series: vec![HashMap::new(); groups],
            inherited: vec![HashMap::new(); groups],
            dirty: false,
            seeded: false,
        }
    }

    fn len(&self) -> usize {
        (self.series.iter().chain(&self.inherited))
            .flat_map(HashMap::values)
            .map(Entry::len)
            .sum()
    }
}

/// What a shard hands its children: per rule, series key → state.
pub type Inheritance = Vec<HashMap<Box<str>, Series>>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Series {
    /// Readings seen.
    n: u64,
    /// Newest event time seen.
    last: i64,
    /// Event time of the last alert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alerted: Option<i64>,
    state: State,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum State {
    Zscore {
        mean: f64,
        var: f64,
        since: Option<i64>,
    },
    Mad {
        recent: VecDeque<f64>,
        since: Option<i64>,
    },
    Cusum {
        /// Readings in the baseline, its mean and M2 (Welford).
        base: u64,
        mean: f64,
        m2: f64,
        pos: f64,
        neg: f64,
        since: Option<i64>,
    },
    Stuck {
        value: f64,
        since: i64,
        count: u64,
        fired: bool,
    },
    Silent {
        fired: bool,
    },
    Rate {
        prev: Option<(i64, f64)>,
        since: Option<i64>,
    },
}

/// What a snapshot file holds: per rule name, its kind and its series.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    rules: BTreeMap<String, RuleSnapshot>,
}

#[derive(Serialize, Deserialize)]
struct RuleSnapshot {
    kind: String,
    series: Vec<(String, Series)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    inherited: Vec<(String, Series)>,
}

use crate::config::SERIES_SEP as SEP;

/// Series by key: hashbrown's map for `entry_ref` (one lookup per reading, the key copied only
/// for a new series) and its foldhash hasher, several times faster than SipHash on short
/// keys and still seeded per process.
type HashMap<K, V> = hashbrown::HashMap<K, V>;

impl Detectors {
    /// `None` when the pipeline has no `detect:` rule.
    pub fn new(rules: Vec<DetectRule>, key: Option<&str>, limit: usize) -> Option<Self> {
        if rules.is_empty() {
            return None;
        }
        let mut groups: Vec<Group> = Vec::new();
        let mut place = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            let g = match groups.iter().position(|g| g.by == r.detector.by) {
                Some(g) => g,
                None => {
                    groups.push(Group {
                        by: r.detector.by.clone(),
                        rules: Vec::new(),
                    });
                    groups.len() - 1
                }
            };
            place.push((g, groups[g].rules.len()));
            groups[g].rules.push(i);
        }
        let alpha = (rules.iter())
            .map(|r| match r.detector.kind {
                DetectorKind::Zscore { half_life, .. } | DetectorKind::Cusum { half_life, .. } => {
                    1.0 - 0.5f64.powf(1.0 / half_life)
                }
                _ => 0.0,
            })
            .collect();
        Some(Self {
            rules,
            key: key
                .expect("detectors need a key (checked by the config)")
                .to_string(),
            groups,
            place,
            alpha,
            shards: HashMap::new(),
            len: 0,
            limit: limit.max(1),
            tick: 0,
            evicted: 0,
            silent_due: None,
            ranges: HashMap::new(),
        })
    }

    /// Whether a `silent` rule watches `known:` devices (the engine then asks each shard's
    /// hash-key range of the stream).
    pub fn wants_hash_ranges(&self) -> bool {
        self.rules.iter().any(|r| r.detector.known.is_some())
    }

    /// A shard's hash-key range, for the `known:` devices it watches.
    pub fn set_hash_range(&mut self, shard: Arc<str>, range: (u128, u128)) {
        self.ranges.insert(shard, range);
    }

    /// Lowers the next `silent` due time to `due`.
    fn due(silent_due: &mut Option<i64>, due: i64) {
        *silent_due = Some(silent_due.map_or(due, |d| d.min(due)));
    }

    /// At a shard's first records in this process (`t0`: the first one's event time): every
    /// `known:` device in its hash-key range becomes one of its `silent` series. One it has
    /// (restored, or seen) is kept; one a parent shard had (inherited) moves in, with what
    /// was learned of it, so a device that stops exactly at a split is still found silent by
    /// the watermark; a device new to the list is watched from `t0`, as never reported.
    fn seed(&mut self, shard: &Arc<str>, t0: i64) {
        let Some(st) = self.shards.get_mut(shard) else {
            return;
        };
        if std::mem::replace(&mut st.seeded, true) {
            return;
        }
        let Some(&(lo, hi)) = self.ranges.get(shard) else {
            return;
        };
        let before = st.len();
        for (i, rule) in self.rules.iter().enumerate() {
            let (DetectorKind::Silent { after }, Some(known)) =
                (&rule.detector.kind, &rule.detector.known)
            else {
                continue;
            };
            let (g, j) = self.place[i];
            let (own, inherited) = (&mut st.series[g], &mut st.inherited[g]);
            for (key, hash) in &known.devices {
                if *hash < lo || *hash > hi {
                    continue;
                }
                let n = self.groups[g].rules.len();
                let e = own.entry_ref(key.as_str()).or_insert_with(|| {
                    inherited
                        .remove(key.as_str())
                        .unwrap_or_else(|| Entry::new(n))
                });
                let mut added = 0;
                let s = e.slot(j, inherited, key, &mut added, || {
                    Series::new(&rule.detector.kind, t0)
                });
                if let State::Silent { fired: false } = s.state {
                    Self::due(&mut self.silent_due, s.last + after);
                }
                st.dirty = true;
            }
        }
        self.len = self.len + st.len() - before;
    }

    pub fn rule_name(&self, i: usize) -> &str {
        &self.rules[i].name
    }

    pub fn rule_kind(&self, i: usize) -> &'static str {
        self.rules[i].detector.kind.name()
    }

    /// Series forgotten to stay within `limits.detector_series` since the last call.
    pub fn take_evicted(&mut self) -> u64 {
        std::mem::take(&mut self.evicted)
    }

    /// Series tracked now.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the shard's state is here (restored or started).
    pub fn has(&self, shard: &str) -> bool {
        self.shards.contains_key(shard)
    }

    /// Starts a shard with nothing learned.
    pub fn start(&mut self, shard: Arc<str>) {
        let n = self.groups.len();
        self.shards
            .entry(shard)
            .or_insert_with(|| ShardState::new(n));
    }

    /// Puts rule `i`'s series under `key` into `map` (an own or an inherited map of its
    /// group), touched now.
    fn put(&mut self, map: &mut HashMap<Box<str>, Entry>, i: usize, key: Box<str>, s: Series) {
        let (g, j) = self.place[i];
        let n = self.groups[g].rules.len();
        self.tick += 1;
        let e = map.entry(key).or_insert_with(|| Entry::new(n));
        e.touched = self.tick;
        e.slots[j] = Some(s);
    }

    /// Restores a shard from its snapshot. Rules the snapshot does not know start empty;
    /// a rule whose kind changed since starts again too.
    pub fn restore(&mut self, shard: Arc<str>, bytes: &[u8]) -> io::Result<()> {
        let mut snap = self.parse(bytes)?;
        let mut state = ShardState::new(self.groups.len());
        for i in 0..self.rules.len() {
            let Some(rs) = snap.rules.remove(&self.rules[i].name) else {
                continue;
            };
            let g = self.place[i].0;
            for (k, s) in rs.series {
                if let (DetectorKind::Silent { after }, State::Silent { fired: false }) =
                    (&self.rules[i].detector.kind, &s.state)
                {
                    Self::due(&mut self.silent_due, s.last + after);
                }
                self.put(&mut state.series[g], i, k.into_boxed_str(), s);
            }
            for (k, s) in rs.inherited {
                self.put(&mut state.inherited[g], i, k.into_boxed_str(), s);
            }
        }
        self.len += state.len();
        if let Some(old) = self.shards.insert(shard, state) {
            self.len -= old.len();
        }
        self.evict();
        Ok(())
    }

    /// A snapshot's rules that this pipeline still has with the same kind.
    fn parse(&self, bytes: &[u8]) -> io::Result<Snapshot> {
        let json = zstd::decode_all(bytes)?;
        let mut snap: Snapshot = serde_json::from_slice(&json)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        snap.rules.retain(|name, rs| {
            let Some(r) = self.rules.iter().find(|r| r.name == *name) else {
                return false;
            };
            if rs.kind != r.detector.kind.name() {
                tracing::warn!(rule = %r.name, was = %rs.kind, "the rule's detector kind changed: it learns again");
                return false;
            }
            true
        });
        Ok(snap)
    }

    /// The shard ended (split or merged): its series are kept for its children and no
    /// longer judged here.
    pub fn end(&mut self, shard: &str) {
        let Some(st) = self.shards.get_mut(shard) else {
            return;
        };
        for (own, inherited) in st.series.iter_mut().zip(&mut st.inherited) {
            if !own.is_empty() {
                st.dirty = true;
            }
            inherited.extend(own.drain());
        }
    }

    /// Rule `i`'s series in an own or inherited map of its group.
    fn rule_series<'a>(
        &self,
        maps: &'a [HashMap<Box<str>, Entry>],
        i: usize,
    ) -> impl Iterator<Item = (&'a Box<str>, &'a Series)> + use<'a> {
        let (g, j) = self.place[i];
        (maps[g].iter()).filter_map(move |(k, e)| e.slots[j].as_ref().map(|s| (k, s)))
    }

    /// What an ended shard in memory hands its children (None: not in memory).
    pub fn inheritance(&self, shard: &str) -> Option<Inheritance> {
        let st = self.shards.get(shard)?;
        Some(
            (0..self.rules.len())
                .map(|i| {
                    (self.rule_series(&st.inherited, i))
                        .chain(self.rule_series(&st.series, i))
                        .map(|(k, s)| (k.clone(), s.clone()))
                        .collect()
                })
                .collect(),
        )
    }

    /// What a shard's snapshot hands its children: every series in it.
    pub fn inheritance_of_snapshot(&self, bytes: &[u8]) -> io::Result<Inheritance> {
        let mut snap = self.parse(bytes)?;
        Ok(self
            .rules
            .iter()
            .map(|r| {
                let rs = snap.rules.remove(&r.name);
                (rs.into_iter())
                    .flat_map(|rs| rs.inherited.into_iter().chain(rs.series))
                    .map(|(k, s)| (k.into_boxed_str(), s))
                    .collect()
            })
            .collect())
    }

    /// A child shard takes its parents' series as inherited. Where two parents had the
    /// same series (a device that moved between them), the one seen last wins; a key the
    /// child already has as its own keeps what the child learned.
    pub fn inherit(&mut self, child: Arc<str>, parents: Vec<Inheritance>) {
        self.start(child.clone());
        let mut st = self.shards.remove(&child).expect("started");
        let before = st.len();
        for parent in parents {
            for (i, series) in parent.into_iter().enumerate().take(self.rules.len()) {
                let (g, j) = self.place[i];
                for (k, s) in series {
                    // What the child learned itself stays; a rule it has not seen the key
                    // under yet takes the parent's series at its first reading.
                    if (st.series[g].get(&k)).is_some_and(|e| e.slots[j].is_some()) {
                        continue;
                    }
                    let had = st.inherited[g].get(&k).and_then(|e| e.slots[j].as_ref());
                    if had.is_some_and(|had| had.last >= s.last) {
                        continue;
                    }
                    self.put(&mut st.inherited[g], i, k, s);
                }
            }
        }
        st.dirty = true;
        self.len = self.len + st.len() - before;
        self.shards.insert(child, st);
        self.evict();
    }

    /// Snapshots of every shard whose state changed since the last call.
    pub fn snapshots(&mut self) -> Vec<(Arc<str>, Vec<u8>)> {
        let mut out = Vec::new();
        for (shard, st) in &self.shards {
            if !st.dirty {
                continue;
            }
            let sorted = |maps: &[HashMap<Box<str>, Entry>], i: usize| {
                let mut v: Vec<(String, Series)> = (self.rule_series(maps, i))
                    .map(|(k, s)| (k.to_string(), s.clone()))
                    .collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            };
            let snap = Snapshot {
                rules: (self.rules.iter().enumerate())
                    .map(|(i, r)| {
                        let rs = RuleSnapshot {
                            kind: r.detector.kind.name().to_string(),
                            series: sorted(&st.series, i),
                            inherited: sorted(&st.inherited, i),
                        };
                        (r.name.clone(), rs)
                    })
                    .collect(),
            };
            let json = serde_json::to_vec(&snap).expect("detector state serialises");
            let bytes = zstd::encode_all(json.as_slice(), 3).expect("zstd in memory");
            out.push((shard.clone(), bytes));
        }
        for st in self.shards.values_mut() {
            st.dirty = false;
        }
        out
    }

    /// Feeds a shard's fresh records (in stream order) to every detector: each reading is
    /// looked up once per group of rules that key their series alike, and then goes to each
    /// rule of the group in turn.
    pub fn observe(
        &mut self,
        shard: &Arc<str>,
        batch: &RecordBatch,
        event_col: usize,
    ) -> Vec<Raised> {
        let mut raised = Vec::new();
        let n = batch.num_rows();
        if n == 0 {
            return raised;
        }
        self.start(shard.clone());
        let key_col = utf8(batch, &self.key);
        let times = super::event_times(batch, event_col);
        if let Some(t0) = (0..n).find(|&r| key_col.is_valid(r) && times.is_valid(r)) {
            self.seed(shard, times.value(t0));
        }
        // Each rule's values and `where` over the batch (`None`: the rule skips the batch).
        let inputs: Vec<Option<(Option<ArrayRef>, Option<ArrayRef>)>> = (self.rules.iter())
            .map(|rule| {
                let eval = |expr: &Option<Arc<dyn PhysicalExpr>>, what: &str| match expr {
                    Some(e) => match e.evaluate(batch).and_then(|v| v.into_array(n)) {
                        Ok(v) => Ok(Some(v)),
                        Err(e) => {
                            tracing::warn!(rule = %rule.name, error = %e, "a detector's {what} failed on a batch; its rows are not observed");
                            Err(())
                        }
                    },
                    None => Ok(None),
                };
                Some((eval(&rule.value, "value").ok()?, eval(&rule.filter, "`where`").ok()?))
            })
            .collect();
        let mut key = String::new();
        let mut added = 0usize;
        let st = self.shards.get_mut(shard).expect("started");
        for (g, group) in self.groups.iter().enumerate() {
            // Per rule of the group: its values and mask, or `None` when it skips the batch.
            let rules: Vec<_> = (group.rules.iter())
                .map(|&i| {
                    inputs[i].as_ref().map(|(v, m)| {
                        let v = v.as_ref().map(|v| v.as_primitive::<Float64Type>());
                        (v, m.as_ref().map(|m| m.as_boolean()))
                    })
                })
                .collect();
            if rules.iter().all(Option::is_none) {
                continue;
            }
            let by: Vec<StringArray> = group.by.iter().map(|c| utf8(batch, c)).collect();
            let plain = by.is_empty();
            let (map, inherited) = (&mut st.series[g], &mut st.inherited[g]);
            let width = group.rules.len();
            let mut takes: Vec<Option<f64>> = Vec::with_capacity(width);
            for row in 0..n {
                if key_col.is_null(row) || times.is_null(row) {
                    continue;
                }
                // What each rule of the group takes from this row (`None`: nothing).
                let take = |r: &Option<(Option<&Float64Array>, Option<&BooleanArray>)>| {
                    let (values, mask) = r.as_ref()?;
                    if mask.is_some_and(|m| !m.is_valid(row) || !m.value(row)) {
                        return None;
                    }
                    match values {
                        Some(v) if v.is_null(row) || !v.value(row).is_finite() => None,
                        Some(v) => Some(v.value(row)),
                        None => Some(0.0),
                    }
                };
                takes.clear();
                takes.extend(rules.iter().map(take));
                if takes.iter().all(Option::is_none) {
                    continue;
                }
                // The device key alone needs no copy; with `by` columns, the key is built.
                let k = if plain {
                    key_col.value(row)
                } else {
                    key.clear();
                    key.push_str(key_col.value(row));
                    for b in &by {
                        key.push(SEP);
                        key.push_str(if b.is_null(row) { "" } else { b.value(row) });
                    }
                    key.as_str()
                };
                let ts = times.value(row);
                self.tick += 1;
                // Learned on a parent shard: it goes on from there.
                let e = map
                    .entry_ref(k)
                    .or_insert_with(|| inherited.remove(k).unwrap_or_else(|| Entry::new(width)));
                e.touched = self.tick;
                for (j, x) in takes.iter().enumerate() {
                    let Some(x) = *x else {
                        continue;
                    };
                    let i = group.rules[j];
                    let rule = &self.rules[i];
                    let series = e.slot(j, inherited, k, &mut added, || {
                        Series::new(&rule.detector.kind, ts)
                    });
                    if let Some(hit) = step(&rule.detector, self.alpha[i], series, ts, x) {
                        raised.push(Raised {
                            rule: i,
                            event_time: hit.at,
                            key: key_col.value(row).to_string(),
                            detail: detail(&self.key, key_col.value(row), &group.by, &by, row, hit),
                        });
                    }
                    if let DetectorKind::Silent { after } = rule.detector.kind {
                        Self::due(&mut self.silent_due, series.last + after);
                    }
                }
            }
            st.dirty = true;
        }
        // Series moved in from `inherited` are counted already: only new ones add.
        self.len += added;
        self.evict();
        // Each rule's alerts in the order of its rows, rules in order.
        raised.sort_by_key(|r| r.rule);
        raised
    }

    /// The watermark moved: every `silent` series whose last reading plus `after` it passed
    /// alerts (once per silence).
    pub fn watermark(&mut self, wm: i64) -> Vec<Raised> {
        let mut raised = Vec::new();
        if self.silent_due.is_none_or(|d| d >= wm) {
            return raised;
        }
        let mut next: Option<i64> = None;
        for st in self.shards.values_mut() {
            for (i, rule) in self.rules.iter().enumerate() {
                let DetectorKind::Silent { after } = rule.detector.kind else {
                    continue;
                };
                let (g, j) = self.place[i];
                for (k, e) in st.series[g].iter_mut() {
                    let Some(s) = e.slots[j].as_mut() else {
                        continue;
                    };
                    let State::Silent { fired } = &mut s.state else {
                        continue;
                    };
                    if *fired {
                        continue;
                    }
                    let due = s.last + after;
                    if due >= wm {
                        Self::due(&mut next, due);
                        continue;
                    }
                    *fired = true;
                    st.dirty = true;
                    // A `known:` device that never reported (n = 0) needs no warm-up.
                    if (s.n > 0 && s.n < rule.detector.warmup.max(1))
                        || cooling(&rule.detector, s, due)
                    {
                        continue;
                    }
                    s.alerted = Some(due);
                    let mut parts = k.split(SEP);
                    let device = parts.next().unwrap_or_default();
                    let series = series_json(&self.key, device, &rule.detector.by, parts);
                    raised.push(Raised {
                        rule: i,
                        event_time: due,
                        key: device.to_string(),
                        detail: silent_detail(series, s.last, after, s.n == 0),
                    });
                }
            }
        }
        self.silent_due = next;
        raised.sort_by(|a, b| (a.event_time, &a.key).cmp(&(b.event_time, &b.key)));
        raised
    }

    /// Forgets the least recently seen series keys beyond the bound, with each key's series
    /// under every rule of its group (and 1% more, so that a flood of new series does not
    /// scan everything at every reading).
    fn evict(&mut self) {
        if self.len <= self.limit {
            return;
        }
        let target = self.limit - self.limit / 100;
        let mut entries: Vec<(u64, usize)> = (self.shards.values())
            .flat_map(|st| st.series.iter().chain(&st.inherited))
            .flat_map(|m| m.values().map(|e| (e.touched, e.len())))
            .collect();
        // The newest first: every entry older than those that fit within the target goes.
        entries.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        let mut kept = 0;
        let mut cutoff = 0;
        for (touched, len) in entries {
            if kept + len > target {
                cutoff = touched;
                break;
            }
            kept += len;
        }
        let mut removed = 0;
        for st in self.shards.values_mut() {
            for m in st.series.iter_mut().chain(&mut st.inherited) {
                let before = m.len();
                m.retain(|_, e| {
                    let keep = e.touched > cutoff;
                    if !keep {
                        removed += e.len();
                    }
                    keep
                });
                if m.len() != before {
                    st.dirty = true;
                }
            }
        }
        self.len -= removed;
        self.evicted += removed as u64;
    }

    /// Rule `i`'s series on `shard` (own, or inherited), for tests.
    #[cfg(test)]
    fn series_of(&self, shard: &str, i: usize, inherited: bool) -> HashMap<Box<str>, Series> {
        let st = &self.shards[shard];
        let maps = if inherited { &st.inherited } else { &st.series };
        (self.rule_series(maps, i))
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect()
    }
}

impl Series {
    fn new(kind: &DetectorKind, ts: i64) -> Self {
        let state = match kind {
            DetectorKind::Zscore { .. } => State::Zscore {
                mean: 0.0,
                var: 0.0,
                since: None,
            },
            DetectorKind::Mad { window, .. } => State::Mad {
                recent: VecDeque::with_capacity(*window),
                since: None,
            },
            DetectorKind::Cusum { .. } => State::Cusum {
                base: 0,
                mean: 0.0,
                m2: 0.0,
                pos: 0.0,
                neg: 0.0,
                since: None,
            },
            DetectorKind::Stuck { .. } => State::Stuck {
                value: f64::NAN,
                since: ts,
                count: 0,
                fired: false,
            },
            DetectorKind::Silent { .. } => State::Silent { fired: false },
            DetectorKind::Rate { .. } => State::Rate {
                prev: None,
                since: None,
            },
        };
        Self {
            n: 0,
            last: ts,
            alerted: None,
            state,
        }
    }
}

/// Why a reading alerted.
#[derive(Debug, Clone, PartialEq)]
struct Hit {
    at: i64,
    value: f64,
    baseline: Value,
    score: f64,
    threshold: f64,
    held_us: i64,
}

fn cooling(d: &crate::config::Detector, s: &Series, at: i64) -> bool {
    s.alerted.is_some_and(|t| at < t + d.cooldown)
}

/// One reading through one series' detector: updates the state, returns an alert if due.
/// One reading `x` at `ts` of a series. `alpha`: `zscore`'s and `cusum`'s weight of a new
/// reading ([`Detectors::new`] computes it once per rule).
fn step(d: &crate::config::Detector, alpha: f64, s: &mut Series, ts: i64, x: f64) -> Option<Hit> {
    let warm = s.n >= d.warmup;
    let first = s.n == 0;
    let mut hit = None;
    match (&d.kind, &mut s.state) {
        (DetectorKind::Zscore { threshold, .. }, State::Zscore { mean, var, since }) => {
            if first {
                *mean = x;
            } else {
                let std = var.sqrt();
                let diff = x - *mean;
                let score = if std > 0.0 { diff.abs() / std } else { 0.0 };
                let over = std > 0.0 && score > *threshold;
                if over {
                    if since.is_none() && warm {
                        hit = Some(Hit {
                            at: ts,
                            value: x,
                            baseline: json!({"mean": *mean, "std": std}),
                            score,
                            threshold: *threshold,
                            held_us: 0,
                        });
                    }
                    since.get_or_insert(ts);
                } else {
                    *since = None;
                }
                // An outlier moves the baseline no more than a reading at the threshold.
                let diff = if over {
                    diff.signum() * threshold * std
                } else {
                    diff
                };
                // Equal weights while fewer readings than the half-life asks for have been
                // seen (Welford's running mean and variance), so the warm-up ends with an
                // unbiased baseline rather than one that still underestimates the spread.
                let alpha = alpha.max(1.0 / (s.n + 1) as f64);
                *mean += alpha * diff;
                *var = (1.0 - alpha) * (*var + alpha * diff * diff);
            }
        }
        (DetectorKind::Mad { window, threshold }, State::Mad { recent, since }) => {
            if recent.len() >= 5.min(*window) {
                let (median, scale) = median_scale(recent);
                let score = if scale > 0.0 {
                    (x - median).abs() / scale
                } else {
                    0.0
                };
                if score > *threshold {
                    if since.is_none() && warm {
                        hit = Some(Hit {
                            at: ts,
                            value: x,
                            baseline: json!({"median": median, "scaled_mad": scale}),
                            score,
                            threshold: *threshold,
                            held_us: 0,
                        });
                    }
                    since.get_or_insert(ts);
                } else {
                    *since = None;
                }
            }
            if recent.len() == *window {
                recent.pop_front();
            }
            recent.push_back(x);
        }
        (
            DetectorKind::Cusum { k, h, .. },
            State::Cusum {
                base,
                mean,
                m2,
                pos,
                neg,
                since,
            },
        ) => {
            // The baseline is learned over `warmup` readings (at least 2) after the start
            // and after every alert (Welford); then it follows every reading with the
            // half-life, each reading's pull clipped to 3 standard deviations, so slow
            // normal wander moves it and a step does not (the sums cross `h` first).
            let learn = d.warmup.max(2);
            let sd = if *base >= 2 {
                (*m2 / (*base - 1) as f64).sqrt()
            } else {
                0.0
            };
            if *base < learn || sd <= 0.0 {
                *base += 1;
                let delta = x - *mean;
                *mean += delta / *base as f64;
                *m2 += delta * (x - *mean);
            } else {
                let z = (x - *mean) / sd;
                let was_zero = *pos == 0.0 && *neg == 0.0;
                *pos = (*pos + z - k).max(0.0);
                *neg = (*neg - z - k).max(0.0);
                if *pos == 0.0 && *neg == 0.0 {
                    *since = None;
                } else if was_zero {
                    *since = Some(ts);
                }
                let delta = (x - *mean).clamp(-3.0 * sd, 3.0 * sd);
                let baseline = (*mean, sd);
                *mean += alpha * delta;
                let var = (1.0 - alpha) * (sd * sd + alpha * delta * delta);
                *m2 = var * (*base - 1) as f64;
                let score = pos.max(*neg);
                if score > *h {
                    let started = since.unwrap_or(ts);
                    if warm {
                        hit = Some(Hit {
                            at: ts,
                            value: x,
                            baseline: json!({
                                "mean": baseline.0,
                                "std": baseline.1,
                                "direction": if *pos >= *neg { "up" } else { "down" },
                            }),
                            score,
                            threshold: *h,
                            held_us: ts - started,
                        });
                    }
                    // The new level becomes the baseline, learned again.
                    (*base, *mean, *m2, *pos, *neg, *since) = (0, 0.0, 0.0, 0.0, 0.0, None);
                }
            }
        }
        (
            DetectorKind::Stuck {
                duration,
                readings,
                epsilon,
            },
            State::Stuck {
                value,
                since,
                count,
                fired,
            },
        ) => {
            if first || (x - *value).abs() > *epsilon {
                (*value, *since, *count, *fired) = (x, ts, 1, false);
            } else {
                *count += 1;
                let held = ts - *since;
                let by_count = readings.is_some_and(|r| *count >= r);
                let by_time = duration.is_some_and(|t| held >= t);
                if !*fired && (by_count || by_time) {
                    *fired = true;
                    if warm {
                        hit = Some(Hit {
                            at: ts,
                            value: x,
                            baseline: json!({"value": *value, "readings": *count}),
                            score: *count as f64,
                            threshold: readings.map_or(f64::NAN, |r| r as f64),
                            held_us: held,
                        });
                    }
                }
            }
        }
        (DetectorKind::Silent { after }, State::Silent { fired }) => {
            // A gap longer than `after` found by the reading that ends it: the same alert
            // the watermark raises when it passes first.
            // A `known:` device that never reported (n = 0) is watched from `last` without a
            // warm-up; any other series' first reading is its `last`, so it finds no gap.
            if *fired {
                *fired = false;
            } else if ts > s.last + after && (first || s.n >= d.warmup.max(1)) {
                hit = Some(Hit {
                    at: s.last + after,
                    value: f64::NAN,
                    baseline: match first {
                        true => json!({"last_seen": Value::Null, "watched_since": fmt_us(s.last)}),
                        false => json!({"last_seen": fmt_us(s.last)}),
                    },
                    score: (ts - s.last) as f64 / 1e6,
                    threshold: *after as f64 / 1e6,
                    held_us: *after,
                });
            }
        }
        (DetectorKind::Rate { max_per_second }, State::Rate { prev, since }) => {
            if let Some((t0, x0)) = *prev
                && ts > t0
            {
                let rate = (x - x0).abs() / ((ts - t0) as f64 / 1e6);
                if rate > *max_per_second {
                    if since.is_none() && warm {
                        hit = Some(Hit {
                            at: ts,
                            value: x,
                            baseline: json!({"previous": x0, "seconds": (ts - t0) as f64 / 1e6}),
                            score: rate,
                            threshold: *max_per_second,
                            held_us: 0,
                        });
                    }
                    since.get_or_insert(ts);
                } else {
                    *since = None;
                }
            }
            if prev.is_none_or(|(t0, _)| ts >= t0) {
                *prev = Some((ts, x));
            }
        }
        _ => unreachable!("a series' state matches its rule's kind"),
    }
    s.n += 1;
    s.last = s.last.max(ts);
    let hit = hit.filter(|h| !cooling(d, s, h.at));
    if let Some(h) = &hit {
        s.alerted = Some(h.at);
    }
    hit
}

/// Median and scaled MAD (1.4826 × MAD; the mean absolute deviation × 1.2533 when more
/// than half the readings are equal, so that a quantised sensor still has a scale).
fn median_scale(recent: &VecDeque<f64>) -> (f64, f64) {
    let mut v: Vec<f64> = recent.iter().copied().collect();
    let median = median_of(&mut v);
    let mut dev: Vec<f64> = recent.iter().map(|x| (x - median).abs()).collect();
    let mad = median_of(&mut dev);
    if mad > 0.0 {
        return (median, 1.4826 * mad);
    }
    let mean_ad = dev.iter().sum::<f64>() / dev.len() as f64;
    (median, 1.2533 * mean_ad)
}

fn median_of(v: &mut [f64]) -> f64 {
    let n = v.len();
    let mid = n / 2;
    let (_, m, _) = v.select_nth_unstable_by(mid, f64::total_cmp);
    let m = *m;
    if n % 2 == 1 {
        m
    } else {
        let lower = v[..mid].iter().copied().fold(f64::MIN, f64::max);
        (lower + m) / 2.0
    }
}

fn utf8(batch: &RecordBatch, col: &str) -> StringArray {
    let c = batch.column_by_name(col).expect("validated column");
    cast(c, &DataType::Utf8)
        .expect("any column casts to text")
        .as_string::<i32>()
        .clone()
}

fn series_json<'a>(
    key: &str,
    device: &str,
    by: &[String],
    values: impl Iterator<Item = &'a str>,
) -> Value {
    let mut m = serde_json::Map::new();
    m.insert(key.to_string(), json!(device));
    for (c, v) in by.iter().zip(values) {
        m.insert(c.clone(), json!(v));
    }
    Value::Object(m)
}

fn number(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

fn detail(
    key: &str,
    device: &str,
    by_names: &[String],
    by: &[StringArray],
    row: usize,
    h: Hit,
) -> String {
    let series = series_json(
        key,
        device,
        by_names,
        by.iter()
            .map(|b| if b.is_null(row) { "" } else { b.value(row) }),
    );
    if h.value.is_nan()
        && let Some(last_seen) = h.baseline.get("last_seen")
    {
        return silent_detail(series, h.at - h.held_us, h.held_us, last_seen.is_null());
    }
    json!({
        "series": series,
        "value": number(h.value),
        "baseline": h.baseline,
        "score": number(h.score),
        "threshold": number(h.threshold),
        "held_for_s": h.held_us as f64 / 1e6,
    })
    .to_string()
}

/// The same row whether the watermark or the next reading found the silence. `never`: a
/// `known:` device that never reported, watched since `last`.
fn silent_detail(series: Value, last: i64, after: i64, never: bool) -> String {
    let baseline = match never {
        true => json!({"last_seen": Value::Null, "watched_since": fmt_us(last)}),
        false => json!({"last_seen": fmt_us(last)}),
    };
    json!({
        "series": series,
        "value": Value::Null,
        "baseline": baseline,
        "score": Value::Null,
        "threshold": after as f64 / 1e6,
        "held_for_s": after as f64 / 1e6,
    })
    .to_string()
}

#[cfg(test)]
mod tests;
