//! Report coalescing: what a driver reports reaches the log as few entries
//! as the device's profile allows.
//!
//! In: reported fields from every `poll` and `actuate`, the profile's
//! `report` settings (`min_interval_ms`, `deadband` per numeric field), and
//! the state last committed. Out: at most one report per interval holding
//! the latest value of each field that changed by more than its deadband
//! (an actuation is reported at once).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

/// Default least time between two reports of one device.
pub const DEFAULT_MIN_INTERVAL: Duration = Duration::from_millis(1000);

/// Coalescing settings, from the profile's `report` object.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportPolicy {
    /// Least time between two reports.
    pub min_interval: Duration,
    /// Per field: changes smaller than this are not worth a report.
    pub deadband: BTreeMap<String, f64>,
}

impl ReportPolicy {
    /// From a profile (`{"report": {"min_interval_ms": 500, "deadband": {"temperature": 0.1}}}`).
    pub fn from_profile(profile: &str) -> ReportPolicy {
        let report = serde_json::from_str::<Value>(profile).ok().and_then(|p| p.get("report").cloned());
        let min_interval = report
            .as_ref()
            .and_then(|r| r.get("min_interval_ms"))
            .and_then(Value::as_u64)
            .map_or(DEFAULT_MIN_INTERVAL, Duration::from_millis);
        let deadband = report
            .as_ref()
            .and_then(|r| r.get("deadband"))
            .and_then(Value::as_object)
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect())
            .unwrap_or_default();
        ReportPolicy { min_interval, deadband }
    }
}

/// One device's pending report.
#[derive(Debug)]
pub struct Coalescer {
    policy: ReportPolicy,
    /// Latest value per changed field, not yet sent.
    pending: Map<String, Value>,
    /// The values last sent (or committed when the worker started).
    sent: Map<String, Value>,
    /// A desired version actuated and not yet reported.
    actuated: Option<u64>,
    /// When the last report was sent.
    last: Option<Instant>,
    /// When the coalescer was made: "at once" is any time since.
    created: Instant,
}

fn same(a: &Value, b: &Value, deadband: Option<f64>) -> bool {
    match (a.as_f64(), b.as_f64(), deadband) {
        (Some(x), Some(y), Some(band)) => (x - y).abs() < band,
        _ => a == b,
    }
}

impl Coalescer {
    /// Start from the committed reported state.
    pub fn new(policy: ReportPolicy, committed: Map<String, Value>) -> Coalescer {
        Coalescer { policy, pending: Map::new(), sent: committed, actuated: None, last: None, created: Instant::now() }
    }

    /// Take a report from the driver.
    pub fn offer(&mut self, fields: Map<String, Value>) {
        for (k, v) in fields {
            let unchanged = match self.sent.get(&k) {
                Some(old) => same(old, &v, self.policy.deadband.get(&k).copied()),
                None => v.is_null(),
            };
            if unchanged {
                self.pending.remove(&k);
            } else {
                self.pending.insert(k, v);
            }
        }
    }

    /// The driver actuated desired `version`: report it at once.
    pub fn actuated(&mut self, version: u64) {
        self.actuated = Some(self.actuated.map_or(version, |v| v.max(version)));
    }

    /// When the next report may go (`None`: nothing to send).
    pub fn due(&self) -> Option<Instant> {
        if self.actuated.is_some() {
            return Some(self.created);
        }
        if self.pending.is_empty() {
            return None;
        }
        Some(self.last.map_or(self.created, |t| t + self.policy.min_interval))
    }

    /// The report to send now, if one is due.
    pub fn take(&mut self, now: Instant) -> Option<(Map<String, Value>, Option<u64>)> {
        if self.due()? > now {
            return None;
        }
        let fields = std::mem::take(&mut self.pending);
        for (k, v) in &fields {
            self.sent.insert(k.clone(), v.clone());
        }
        self.last = Some(now);
        Some((fields, self.actuated.take()))
    }

    /// A report was not committed (no leader, a timeout): send it again
    /// with whatever is newer.
    pub fn retry(&mut self, fields: Map<String, Value>, actuated: Option<u64>) {
        for (k, v) in fields {
            self.sent.remove(&k);
            self.pending.entry(k).or_insert(v);
        }
        if let Some(v) = actuated {
            self.actuated(v);
        }
    }

    /// Values that changed but are not yet sent.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn latest_value_per_field_once_per_interval_outside_the_deadband() {
        let policy =
            ReportPolicy::from_profile(r#"{"report": {"min_interval_ms": 1000, "deadband": {"temperature": 0.2}}}"#);
        assert_eq!(policy.min_interval, Duration::from_millis(1000));
        let mut c = Coalescer::new(policy, obj(json!({"temperature": 20.0, "heater": false})));
        let t0 = Instant::now() + Duration::from_millis(1);
        c.offer(obj(json!({"temperature": 20.1, "heater": false})));
        assert!(c.take(t0).is_none(), "inside the deadband and unchanged: nothing to report");
        c.offer(obj(json!({"temperature": 20.5})));
        c.offer(obj(json!({"temperature": 20.7})));
        let (fields, actuated) = c.take(t0).unwrap();
        assert_eq!(Value::Object(fields), json!({"temperature": 20.7}));
        assert_eq!(actuated, None);
        c.offer(obj(json!({"temperature": 21.0})));
        assert!(c.take(t0 + Duration::from_millis(500)).is_none(), "within the interval");
        c.offer(obj(json!({"temperature": 21.2})));
        let (fields, _) = c.take(t0 + Duration::from_millis(1000)).unwrap();
        assert_eq!(Value::Object(fields), json!({"temperature": 21.2}));
        // A change that returns inside the deadband before it was sent is dropped.
        c.offer(obj(json!({"temperature": 22.0})));
        c.offer(obj(json!({"temperature": 21.25})));
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn an_actuation_is_reported_at_once_and_a_failed_report_is_retried() {
        let mut c = Coalescer::new(ReportPolicy::from_profile("{}"), Map::new());
        let t0 = Instant::now() + Duration::from_millis(1);
        c.offer(obj(json!({"heater": true})));
        let _ = c.take(t0).unwrap();
        c.offer(obj(json!({"heater": false})));
        c.actuated(7);
        let (fields, actuated) = c.take(t0 + Duration::from_millis(1)).unwrap();
        assert_eq!(actuated, Some(7));
        c.retry(fields, actuated);
        let (fields, actuated) = c.take(t0 + Duration::from_millis(2)).unwrap();
        assert_eq!((Value::Object(fields), actuated), (json!({"heater": false}), Some(7)));
    }
}
