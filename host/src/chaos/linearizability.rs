//! A linearizability checker for per-key registers (put, get,
//! compare-and-set), in the style of Wing & Gong with Lowe's memoization, as
//! Porcupine and Knossos do it.
//!
//! In: a history of client operations, each with its invocation and
//! completion times and its outcome (`Ok` with what the client saw, or
//! `Unknown` when the client never learned: a timeout, a lost connection).
//! Out: `Ok` when some order of the operations is consistent with a single
//! register per key and with real time (an operation that completed before
//! another was invoked comes first), else the first key without one.
//!
//! Keys are independent registers, so each is checked alone (P-compositionality),
//! which keeps the search small. An `Unknown` operation may have taken effect
//! at any time after its invocation, or never: it is placed only where it
//! helps, and its output is not checked. Operations that failed for sure
//! (refused before they reached the log) must be left out by the caller.

use std::collections::{BTreeMap, HashSet};

/// A register operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegOp {
    /// Write a value.
    Put(i64),
    /// Read the value.
    Get,
    /// Write `to` if the value is `from`.
    Cas {
        /// The expected value.
        from: i64,
        /// The new value.
        to: i64,
    },
}

/// What a client saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A put was acknowledged.
    Written,
    /// A get returned this (`None`: never written).
    Read(Option<i64>),
    /// A compare-and-set answered whether it swapped.
    Swapped(bool),
    /// A compare-and-set did not swap, and saw this value instead.
    CasFailed(Option<i64>),
    /// No answer: it may or may not have taken effect.
    Unknown,
}

/// One client operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// The register.
    pub key: String,
    /// When the client invoked it (any monotonic clock, one for the whole
    /// history).
    pub call: u64,
    /// When the client got its answer; ignored for [`Outcome::Unknown`].
    pub ret: u64,
    /// What it asked.
    pub op: RegOp,
    /// What it saw.
    pub outcome: Outcome,
}

/// Why a history did not pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// No register order explains this key's operations.
    #[error("key {key:?}: no linearization of its {operations} operations")]
    NotLinearizable {
        /// The key.
        key: String,
        /// How many operations it had (unanswered reads left out).
        operations: usize,
    },
    /// The search gave up: too many orders to try (many concurrent
    /// operations without an answer). Not a verdict; record shorter
    /// histories or fewer unknowns.
    #[error("key {key:?}: gave up after {explored} states; the history is too concurrent to decide")]
    Undecided {
        /// The key.
        key: String,
        /// States explored.
        explored: usize,
    },
}

/// States the search explores per key before it gives up.
pub const MAX_STATES: usize = 5_000_000;

/// The state after `op` from `state`, if `op`'s outcome is possible there.
fn step(state: Option<i64>, op: RegOp, outcome: Outcome) -> Option<Option<i64>> {
    match (op, outcome) {
        (RegOp::Put(v), Outcome::Written | Outcome::Unknown) => Some(Some(v)),
        (RegOp::Get, Outcome::Read(seen)) => (seen == state).then_some(state),
        (RegOp::Get, Outcome::Unknown) => Some(state),
        (RegOp::Cas { from, to }, Outcome::Swapped(true)) => (state == Some(from)).then_some(Some(to)),
        (RegOp::Cas { from, .. }, Outcome::Swapped(false)) => (state != Some(from)).then_some(state),
        (RegOp::Cas { from, .. }, Outcome::CasFailed(seen)) => (state != Some(from) && state == seen).then_some(state),
        (RegOp::Cas { from, to }, Outcome::Unknown) => Some(if state == Some(from) { Some(to) } else { state }),
        _ => None,
    }
}

/// Check a whole history, key by key.
pub fn check(history: &[Operation]) -> Result<(), Violation> {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    // A read with no answer constrains nothing and changes nothing; left
    // in, it would only multiply the orders to try.
    for op in history.iter().filter(|o| !(o.op == RegOp::Get && o.outcome == Outcome::Unknown)) {
        by_key.entry(&op.key).or_default().push(op);
    }
    for (key, ops) in by_key {
        let settled = settle_unknown_writes(ops);
        let ops: Vec<&Operation> = settled.iter().collect();
        let mut search = Search::new(&ops);
        match search.run() {
            Some(true) => {}
            Some(false) => return Err(Violation::NotLinearizable { key: key.to_owned(), operations: ops.len() }),
            None => return Err(Violation::Undecided { key: key.to_owned(), explored: search.seen.len() }),
        }
    }
    Ok(())
}

/// Settle unanswered writes the history itself decides.
///
/// - A write whose value no operation ever saw may as well never have
///   happened: in any order that includes it, nothing between it and the
///   next write reads its value (no read returned it, no compare-and-set
///   expected it or saw it), so the same order without it still explains
///   every answer — and unanswered operations may be left out. It is left
///   out.
/// - When every written value is distinct (the battery writes unique
///   values), a write whose value an answered operation saw is the only
///   source of that value: it took effect (a compare-and-set swapped), no
///   later than the earliest such operation completed. It becomes an
///   answered operation that completed then.
///
/// Both are exact only when every failed compare-and-set says what it saw
/// ([`Outcome::CasFailed`]): a bare `Swapped(false)` could need an unseen
/// write to explain why it failed, so with one the key is kept as it is.
/// Without this each unanswered write stays pending to the end of the
/// history and doubles the orders to try.
fn settle_unknown_writes(ops: Vec<&Operation>) -> Vec<Operation> {
    let written = |o: &Operation| match o.op {
        RegOp::Put(v) | RegOp::Cas { to: v, .. } => Some(v),
        RegOp::Get => None,
    };
    if ops.iter().any(|o| o.outcome == Outcome::Swapped(false)) {
        return ops.into_iter().cloned().collect();
    }
    // Every value some operation expected or saw, and the earliest time an
    // answered operation is known to have seen it.
    let mut observed = HashSet::new();
    let mut seen_by: BTreeMap<i64, u64> = BTreeMap::new();
    for o in &ops {
        let saw = match (o.op, o.outcome) {
            (_, Outcome::Read(Some(v)) | Outcome::CasFailed(Some(v))) => Some(v),
            (RegOp::Cas { from, .. }, Outcome::Swapped(true)) => Some(from),
            (RegOp::Cas { from, .. }, _) => {
                observed.insert(from);
                None
            }
            _ => None,
        };
        if let Some(v) = saw {
            observed.insert(v);
            let earliest = seen_by.entry(v).or_insert(o.ret);
            *earliest = (*earliest).min(o.ret);
        }
    }
    let mut writers: BTreeMap<i64, usize> = BTreeMap::new();
    for v in ops.iter().filter_map(|o| written(o)) {
        *writers.entry(v).or_default() += 1;
    }
    let distinct = writers.values().all(|n| *n == 1);
    ops.into_iter()
        .filter_map(|o| {
            let Some(v) = written(o).filter(|_| o.outcome == Outcome::Unknown) else { return Some(o.clone()) };
            if !observed.contains(&v) {
                return None;
            }
            match seen_by.get(&v) {
                Some(&ret) if distinct => {
                    let outcome = if matches!(o.op, RegOp::Put(_)) { Outcome::Written } else { Outcome::Swapped(true) };
                    Some(Operation { ret, outcome, ..o.clone() })
                }
                _ => Some(o.clone()),
            }
        })
        .collect()
}

/// The search over one key's operations.
struct Search<'a> {
    ops: &'a [&'a Operation],
    /// Completion time for the real-time order; `u64::MAX` for unknowns.
    ret: Vec<u64>,
    /// Operations that must be linearized (known outcomes).
    required: usize,
    /// (linearized set, state) pairs already explored and failed.
    seen: HashSet<(Vec<u64>, Option<i64>)>,
}

impl<'a> Search<'a> {
    fn new(ops: &'a [&'a Operation]) -> Search<'a> {
        let ret = ops.iter().map(|o| if o.outcome == Outcome::Unknown { u64::MAX } else { o.ret }).collect();
        let required = ops.iter().filter(|o| o.outcome != Outcome::Unknown).count();
        Search { ops, ret, required, seen: HashSet::new() }
    }

    /// `Some(linearizable)`, or `None` past [`MAX_STATES`].
    fn run(&mut self) -> Option<bool> {
        let done = vec![0u64; self.ops.len().div_ceil(64)];
        self.extend(done, 0, None)
    }

    /// Whether the operations not in `done` can follow from `state`.
    fn extend(&mut self, done: Vec<u64>, linearized_required: usize, state: Option<i64>) -> Option<bool> {
        if linearized_required == self.required {
            return Some(true);
        }
        if self.seen.len() > MAX_STATES {
            return None;
        }
        let is_done = |i: usize| done[i / 64] & (1 << (i % 64)) != 0;
        // Nothing may go before an operation that completed before it was
        // invoked: candidates are those invoked before every pending
        // operation's completion.
        let horizon = (0..self.ops.len()).filter(|&i| !is_done(i)).map(|i| self.ret[i]).min().unwrap_or(u64::MAX);
        for i in 0..self.ops.len() {
            let o = self.ops[i];
            if is_done(i) || o.call > horizon {
                continue;
            }
            let Some(next) = step(state, o.op, o.outcome) else { continue };
            let mut after = done.clone();
            after[i / 64] |= 1 << (i % 64);
            if !self.seen.insert((after.clone(), next)) {
                continue;
            }
            let required = linearized_required + usize::from(o.outcome != Outcome::Unknown);
            if self.extend(after, required, next)? {
                return Some(true);
            }
        }
        Some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(key: &str, call: u64, ret: u64, op: RegOp, outcome: Outcome) -> Operation {
        Operation { key: key.into(), call, ret, op, outcome }
    }

    #[test]
    fn sequential_and_concurrent_good_histories_pass() {
        let h = vec![
            op("a", 0, 1, RegOp::Put(1), Outcome::Written),
            op("a", 2, 3, RegOp::Get, Outcome::Read(Some(1))),
            op("a", 4, 5, RegOp::Cas { from: 1, to: 2 }, Outcome::Swapped(true)),
            op("a", 6, 7, RegOp::Cas { from: 1, to: 3 }, Outcome::Swapped(false)),
            op("a", 8, 9, RegOp::Get, Outcome::Read(Some(2))),
            op("b", 0, 1, RegOp::Get, Outcome::Read(None)),
        ];
        check(&h).unwrap();
        // Two overlapping puts and reads that saw them in either order.
        let h = vec![
            op("k", 0, 10, RegOp::Put(1), Outcome::Written),
            op("k", 1, 9, RegOp::Put(2), Outcome::Written),
            op("k", 2, 3, RegOp::Get, Outcome::Read(Some(2))),
            op("k", 4, 5, RegOp::Get, Outcome::Read(Some(1))),
        ];
        check(&h).unwrap();
    }

    #[test]
    fn stale_reads_and_lost_writes_are_caught() {
        // A read after an acknowledged write sees the old value.
        let h = vec![
            op("a", 0, 1, RegOp::Put(1), Outcome::Written),
            op("a", 2, 3, RegOp::Put(2), Outcome::Written),
            op("a", 4, 5, RegOp::Get, Outcome::Read(Some(1))),
        ];
        assert!(matches!(check(&h).unwrap_err(), Violation::NotLinearizable { key, .. } if key == "a"));
        // Two compare-and-sets from the same value both succeed.
        let h = vec![
            op("c", 0, 1, RegOp::Put(0), Outcome::Written),
            op("c", 2, 5, RegOp::Cas { from: 0, to: 1 }, Outcome::Swapped(true)),
            op("c", 3, 6, RegOp::Cas { from: 0, to: 2 }, Outcome::Swapped(true)),
        ];
        assert!(check(&h).is_err());
        // A value nobody wrote.
        let h = vec![op("d", 0, 1, RegOp::Get, Outcome::Read(Some(7)))];
        assert!(check(&h).is_err());
        // Only the bad key is named.
        let h = vec![
            op("good", 0, 1, RegOp::Put(1), Outcome::Written),
            op("bad", 0, 1, RegOp::Put(1), Outcome::Written),
            op("bad", 2, 3, RegOp::Get, Outcome::Read(None)),
        ];
        assert!(matches!(check(&h).unwrap_err(), Violation::NotLinearizable { key, .. } if key == "bad"));
    }

    #[test]
    fn unknown_outcomes_may_or_may_not_have_happened() {
        // A timed-out put seen later: it took effect.
        let h = vec![op("a", 0, 0, RegOp::Put(1), Outcome::Unknown), op("a", 5, 6, RegOp::Get, Outcome::Read(Some(1)))];
        check(&h).unwrap();
        // ...or never seen: it did not (or not yet).
        let h = vec![op("a", 0, 0, RegOp::Put(1), Outcome::Unknown), op("a", 5, 6, RegOp::Get, Outcome::Read(None))];
        check(&h).unwrap();
        // But it cannot have taken effect before it was invoked.
        let h = vec![op("a", 0, 1, RegOp::Get, Outcome::Read(Some(1))), op("a", 5, 0, RegOp::Put(1), Outcome::Unknown)];
        assert!(check(&h).is_err());
    }

    /// Hundreds of unanswered writes nobody saw cost nothing; one that a
    /// failed compare-and-set saw is still placed where it explains it.
    #[test]
    fn unobserved_unknown_writes_are_left_out() {
        let mut h = vec![op("k", 0, 1, RegOp::Put(0), Outcome::Written)];
        for i in 0..300u64 {
            h.push(op("k", 2 + i, 0, RegOp::Put(1000 + i as i64), Outcome::Unknown));
        }
        h.push(op("k", 400, 401, RegOp::Get, Outcome::Read(Some(0))));
        check(&h).unwrap();
        // The unanswered put of 7 is what the failed CAS saw.
        let h = vec![
            op("k", 0, 1, RegOp::Put(0), Outcome::Written),
            op("k", 2, 0, RegOp::Put(7), Outcome::Unknown),
            op("k", 5, 6, RegOp::Cas { from: 0, to: 1 }, Outcome::CasFailed(Some(7))),
        ];
        check(&h).unwrap();
        // A failed CAS that saw a value never written is caught.
        let h = vec![
            op("k", 0, 1, RegOp::Put(0), Outcome::Written),
            op("k", 5, 6, RegOp::Cas { from: 0, to: 1 }, Outcome::CasFailed(Some(9))),
        ];
        assert!(check(&h).is_err());
        // A bare failed CAS can still be explained by an unseen write.
        let h = vec![
            op("k", 0, 1, RegOp::Put(0), Outcome::Written),
            op("k", 2, 0, RegOp::Put(7), Outcome::Unknown),
            op("k", 5, 6, RegOp::Cas { from: 0, to: 1 }, Outcome::Swapped(false)),
        ];
        check(&h).unwrap();
    }

    /// Unanswered writes someone saw are settled: many of them, concurrent,
    /// stay fast; one seen before it was even invoked is still caught.
    #[test]
    fn unknown_writes_that_were_seen_are_settled() {
        let mut h = vec![op("k", 0, 1, RegOp::Put(0), Outcome::Written)];
        for i in 0..200u64 {
            // Invoked together, each seen by a read much later, in order.
            h.push(op("k", 2 + i, 0, RegOp::Put(100 + i as i64), Outcome::Unknown));
            h.push(op("k", 1000 + 10 * i, 1005 + 10 * i, RegOp::Get, Outcome::Read(Some(100 + i as i64))));
        }
        h.push(op("k", 5000, 0, RegOp::Cas { from: 299, to: 7 }, Outcome::Unknown));
        h.push(op("k", 5001, 5002, RegOp::Get, Outcome::Read(Some(7))));
        check(&h).unwrap();
        let h = vec![op("k", 0, 1, RegOp::Get, Outcome::Read(Some(5))), op("k", 2, 0, RegOp::Put(5), Outcome::Unknown)];
        assert!(check(&h).is_err());
        // A value written twice: the seen unknown write stays unknown.
        let h = vec![
            op("k", 0, 1, RegOp::Put(5), Outcome::Written),
            op("k", 2, 0, RegOp::Put(5), Outcome::Unknown),
            op("k", 3, 4, RegOp::Get, Outcome::Read(Some(5))),
        ];
        check(&h).unwrap();
    }

    /// A long concurrent history of one writer and many readers stays fast
    /// (memoization) and passes.
    #[test]
    fn long_histories_are_checked_quickly() {
        let mut h = Vec::new();
        for i in 0..400u64 {
            h.push(op("k", i * 10, i * 10 + 5, RegOp::Put(i as i64), Outcome::Written));
            h.push(op("k", i * 10 + 1, i * 10 + 8, RegOp::Get, Outcome::Read(Some(i as i64))));
            h.push(op("k", i * 10 + 2, i * 10 + 9, RegOp::Get, Outcome::Unknown));
        }
        check(&h).unwrap();
        // One read in the middle that saw a value overwritten long before.
        h[3 * 200 + 1].outcome = Outcome::Read(Some(3));
        assert!(matches!(check(&h).unwrap_err(), Violation::NotLinearizable { operations: 800, .. }));
    }
}
