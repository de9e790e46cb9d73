//! How many leases a worker aims at, and whom it steals from when it is short: pure rules,
//! tested here without DynamoDB.

use std::collections::BTreeMap;

/// The worker to steal one lease from, if any: the most loaded other worker, when it holds
/// more than `target`, or exactly `target` while this worker is short by more than one (the
/// KCL's rule: without it, 4 shards on 3 workers would stay 2/2/0). Ties go to the
/// lexically first owner, so concurrent thieves tend to pick the same victim.
pub(super) fn steal_from(
    load: &BTreeMap<&str, usize>,
    me: &str,
    mine: usize,
    target: usize,
) -> Option<String> {
    let (owner, n) = load.iter().filter(|(o, _)| **o != me).fold(
        None,
        |best: Option<(&str, usize)>, (o, n)| match best {
            Some((_, m)) if m >= *n => best,
            _ => Some((o, *n)),
        },
    )?;
    let short = target.saturating_sub(mine);
    (n > target || (n == target && short > 1)).then(|| owner.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs every worker's balancing step in turn (each steals at most one lease per scan, as
    /// the worker does) until nothing moves; returns the final counts.
    fn settle(mut counts: Vec<usize>) -> Vec<usize> {
        let names: Vec<String> = (0..counts.len()).map(|i| format!("w{i}")).collect();
        let total: usize = counts.iter().sum();
        for _ in 0..100 {
            let mut moved = false;
            for me in 0..counts.len() {
                let target = total.div_ceil(counts.len());
                let load: BTreeMap<&str, usize> = names
                    .iter()
                    .map(|n| n.as_str())
                    .zip(counts.iter().copied())
                    .collect();
                if counts[me] < target
                    && let Some(v) = steal_from(&load, &names[me], counts[me], target)
                {
                    let v = names.iter().position(|n| *n == v).unwrap();
                    counts[v] -= 1;
                    counts[me] += 1;
                    moved = true;
                }
            }
            if !moved {
                return counts;
            }
        }
        panic!("balancing did not settle: {counts:?}");
    }

    #[test]
    fn a_new_worker_gets_about_its_share() {
        for (start, total) in [
            (vec![2, 2, 0], 4),
            (vec![3, 3, 3, 0], 9),
            (vec![8, 0, 0], 8),
            (vec![4, 4, 0], 8),
            (vec![1, 0], 1),
            (vec![64, 0, 0, 0, 0], 64),
        ] {
            let end = settle(start.clone());
            assert_eq!(end.iter().sum::<usize>(), total);
            let (lo, hi) = (end.iter().min().unwrap(), end.iter().max().unwrap());
            assert!(
                hi - lo <= 1 || (total < end.len() && *hi == 1),
                "{start:?} -> {end:?}"
            );
        }
    }

    #[test]
    fn no_stealing_at_the_target_for_a_one_lease_gap() {
        let load: BTreeMap<&str, usize> = [("a", 2), ("b", 2), ("me", 1)].into();
        assert_eq!(steal_from(&load, "me", 1, 2), None);
        let load: BTreeMap<&str, usize> = [("a", 3), ("b", 2), ("me", 1)].into();
        assert_eq!(steal_from(&load, "me", 1, 2).as_deref(), Some("a"));
    }
}
