//! Event-time window arithmetic and the watermark. Pure functions over microseconds since
//! the epoch; windows are aligned to the epoch, as `date_bin` aligns them.

use std::collections::HashMap;
use std::sync::Arc;

/// A tumbling (`slide == size`) or hopping window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    pub size: i64,
    pub slide: i64,
}

impl WindowSpec {
    /// Start of the latest window holding `ts`.
    pub fn last_start(&self, ts: i64) -> i64 {
        ts.div_euclid(self.slide) * self.slide
    }

    /// Start of the earliest window holding `ts`.
    pub fn first_start(&self, ts: i64) -> i64 {
        self.last_start(ts) - self.size + self.slide
    }

    /// End of the earliest window holding `ts`: once the watermark reaches it, a record
    /// at `ts` is late for at least one window.
    pub fn first_end(&self, ts: i64) -> i64 {
        self.last_start(ts) + self.slide
    }

    /// End of the latest window holding `ts`: once the watermark reaches it, every window
    /// holding `ts` has been emitted.
    pub fn last_end(&self, ts: i64) -> i64 {
        self.last_start(ts) + self.size
    }

    /// Number of windows each record falls in.
    pub fn per_record(&self) -> usize {
        (self.size / self.slide) as usize
    }
}

/// Per-shard event-time progress and the watermark derived from it: the minimum over active
/// shards of their newest event time, minus the allowed lateness. A shard that has been
/// caught up with its end for `idle_timeout` of wall clock, with nothing new, is left out (a
/// shard with unread records is never idle, however slowly it is read); when every shard is
/// idle, the most advanced one decides, so windows still close when a whole fleet goes quiet.
#[derive(Debug, Clone)]
pub struct Watermark {
    lateness: i64,
    idle_timeout: i64,
    shards: HashMap<Arc<str>, ShardProgress>,
    /// The watermark never moves back (after a restart it starts where it was committed).
    floor: Option<i64>,
}

#[derive(Debug, Clone, Copy)]
struct ShardProgress {
    max_event: Option<i64>,
    /// Since when the shard has had nothing more to read (None: it has, or may have).
    caught_up_since: Option<i64>,
}

impl Watermark {
    pub fn new(lateness: i64, idle_timeout: i64) -> Self {
        Self {
            lateness,
            idle_timeout,
            shards: HashMap::new(),
            floor: None,
        }
    }

    /// A shard starts counting as active (it holds the watermark until it reads or idles).
    pub fn add_shard(&mut self, shard: Arc<str>, max_event: Option<i64>) {
        self.shards.entry(shard).or_insert(ShardProgress {
            max_event,
            caught_up_since: None,
        });
    }

    /// The shard read records up to `max_event` (None: only records without event time).
    pub fn observe(&mut self, shard: &Arc<str>, max_event: Option<i64>) {
        let p = self.shards.entry(shard.clone()).or_insert(ShardProgress {
            max_event: None,
            caught_up_since: None,
        });
        p.caught_up_since = None;
        if let Some(ts) = max_event {
            p.max_event = Some(p.max_event.map_or(ts, |m| m.max(ts)));
        }
    }

    /// The shard has nothing more to read for now.
    pub fn caught_up(&mut self, shard: &Arc<str>, now: i64) {
        if let Some(p) = self.shards.get_mut(shard) {
            p.caught_up_since.get_or_insert(now);
        }
    }

    pub fn max_event(&self, shard: &str) -> Option<i64> {
        self.shards.get(shard).and_then(|p| p.max_event)
    }

    pub fn set_floor(&mut self, floor: i64) {
        self.floor = Some(self.floor.map_or(floor, |f| f.max(floor)));
    }

    /// The current watermark (None: nothing is known yet).
    pub fn current(&mut self, now: i64) -> Option<i64> {
        let active: Vec<&ShardProgress> = self
            .shards
            .values()
            .filter(|p| {
                p.caught_up_since
                    .is_none_or(|t| now - t < self.idle_timeout)
            })
            .collect();
        let derived = if active.is_empty() {
            self.shards.values().filter_map(|p| p.max_event).max()
        } else if active.iter().any(|p| p.max_event.is_none()) {
            None
        } else {
            active.iter().filter_map(|p| p.max_event).min()
        }
        .map(|m| m - self.lateness);
        if let Some(w) = derived {
            self.set_floor(w);
        }
        self.floor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: i64 = 60_000_000;

    #[test]
    fn tumbling_bounds() {
        let w = WindowSpec { size: M, slide: M };
        assert_eq!(w.first_start(90_000_000), M);
        assert_eq!(w.first_end(90_000_000), 2 * M);
        assert_eq!(w.last_end(90_000_000), 2 * M);
        assert_eq!(w.per_record(), 1);
        // Before the epoch, floor still rounds down.
        assert_eq!(w.last_start(-1), -M);
    }

    #[test]
    fn hopping_bounds() {
        let w = WindowSpec {
            size: 5 * M,
            slide: M,
        };
        let ts = 10 * M + 1;
        assert_eq!(w.last_start(ts), 10 * M);
        assert_eq!(w.first_start(ts), 6 * M);
        assert_eq!(w.first_end(ts), 11 * M);
        assert_eq!(w.last_end(ts), 15 * M);
        assert_eq!(w.per_record(), 5);
    }

    #[test]
    fn watermark_is_min_over_active_shards_and_idle_shards_drop_out() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut wm = Watermark::new(10, 1_000);
        wm.add_shard(a.clone(), None);
        wm.add_shard(b.clone(), None);
        wm.observe(&a, Some(500));
        assert_eq!(wm.current(0), None, "b has read nothing and is not idle");
        wm.observe(&b, Some(200));
        assert_eq!(wm.current(0), Some(190));
        wm.observe(&a, Some(900));
        assert_eq!(wm.current(800), Some(190), "b holds it");
        assert_eq!(
            wm.current(5_000),
            Some(190),
            "b is slow, not idle: it is not caught up"
        );
        wm.caught_up(&b, 5_000);
        assert_eq!(
            wm.current(5_999),
            Some(190),
            "caught up, not yet for the timeout"
        );
        assert_eq!(wm.current(6_000), Some(890), "b is idle now");
        // Every shard idle: the most advanced decides; it never moves back.
        wm.caught_up(&a, 6_000);
        assert_eq!(wm.current(9_000), Some(890));
        wm.observe(&b, Some(300));
        assert_eq!(wm.current(9_000), Some(890));
    }
}
