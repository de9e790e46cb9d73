//! Named crash points for recovery tests. `SHARDLAKE_FAILPOINTS=after_prepare` aborts the
//! process the first time that point is reached; `after_publish@3` the third time. Several
//! points are separated by commas. Unset, a failpoint costs one atomic load.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::OnceLock;

/// The points the commit protocol passes, in order.
pub const POINTS: &[&str] = &[
    "after_stage",
    "after_prepare",
    "after_publish_file",
    "after_publish",
    "after_commit",
];

fn armed() -> &'static Option<Mutex<HashMap<String, u64>>> {
    static ARMED: OnceLock<Option<Mutex<HashMap<String, u64>>>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let spec = std::env::var("SHARDLAKE_FAILPOINTS").ok()?;
        let map = spec
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| match s.split_once('@') {
                Some((name, n)) => (name.trim().to_string(), n.trim().parse().unwrap_or(1)),
                None => (s.trim().to_string(), 1),
            })
            .collect();
        Some(Mutex::new(map))
    })
}

/// Aborts the process if `name` is armed and its count is reached.
pub fn hit(name: &str) {
    let Some(armed) = armed() else { return };
    let mut map = armed.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = map.get_mut(name) {
        *n -= 1;
        if *n == 0 {
            eprintln!("shardlake: failpoint {name} reached: aborting");
            std::process::abort();
        }
    }
}
