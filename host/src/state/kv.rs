//! Plugin key-value namespaces and the write sets that change them.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Reading the replicated state failed (a local storage fault).
///
/// Not something a guest can cause or recover from: the runtime turns it into
/// a host failure, which must stop the node rather than diverge.
#[derive(Debug, thiserror::Error)]
#[error("reading plugin state failed: {reason}")]
pub struct StateReadError {
    /// What the storage layer reported.
    pub reason: String,
}

/// What a bounded scan read: the entries, and whether it stopped early at
/// its byte budget.
pub type Scanned = (Vec<(String, Vec<u8>)>, bool);

/// Read access to one plugin's namespace, as of the entry being applied.
///
/// The runtime is handed a view of exactly one namespace, so no host call can
/// name another plugin's keys.
pub trait StateView: Send + 'static {
    /// The value at `key`, if any.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateReadError>;
    /// Up to `limit` entries whose key starts with `prefix`, in key order,
    /// stopping early (second value `true`) once the keys and values read
    /// exceed `max_bytes`: the caller's budget, so a scan never copies more
    /// than it may pay for.
    fn scan(&self, prefix: &str, limit: usize, max_bytes: usize) -> Result<Scanned, StateReadError>;
}

/// The buffered writes of one command, in key order (`None` deletes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteSet {
    /// Last write per key wins; ordered so every node commits and hashes the
    /// same sequence.
    entries: BTreeMap<String, Option<Vec<u8>>>,
}

impl WriteSet {
    /// Buffer `key = value`.
    pub fn set(&mut self, key: String, value: Vec<u8>) {
        self.entries.insert(key, Some(value));
    }

    /// Buffer the removal of `key`.
    pub fn delete(&mut self, key: String) {
        self.entries.insert(key, None);
    }

    /// This write set's view of `key`: `Some(Some(v))` written, `Some(None)`
    /// deleted, `None` untouched (read through to the base state).
    pub fn lookup(&self, key: &str) -> Option<Option<&[u8]>> {
        self.entries.get(key).map(|v| v.as_deref())
    }

    /// Number of distinct keys written or deleted.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The writes in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_deref()))
    }

    /// The writes whose key starts with `prefix`, in key order.
    pub fn range_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, Option<&'a [u8]>)> + 'a {
        self.entries
            .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.as_str(), v.as_deref()))
    }
}

/// One plugin's committed key-value data. Cloning is cheap (shared), so a
/// runtime can hold a view while the state machine keeps the original.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespace(Arc<BTreeMap<String, Vec<u8>>>);

impl Namespace {
    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when the namespace holds no keys.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// All entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// Commit `writes` to this namespace (copy-on-write: views taken
    /// before are unchanged).
    pub fn apply(&mut self, writes: &WriteSet) {
        if writes.is_empty() {
            return;
        }
        // Copies only if a runtime still holds a view; normally it has been
        // dropped by the time its writes commit.
        let map = Arc::make_mut(&mut self.0);
        for (key, value) in writes.iter() {
            match value {
                Some(v) => {
                    map.insert(key.to_owned(), v.to_vec());
                }
                None => {
                    map.remove(key);
                }
            }
        }
    }
}

impl StateView for Namespace {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateReadError> {
        Ok(self.0.get(key).cloned())
    }

    fn scan(&self, prefix: &str, limit: usize, max_bytes: usize) -> Result<Scanned, StateReadError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let range = self.0.range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded));
        for (k, v) in range.take_while(|(k, _)| k.starts_with(prefix)).take(limit) {
            bytes = bytes.saturating_add(k.len() + v.len());
            if bytes > max_bytes {
                return Ok((out, true));
            }
            out.push((k.clone(), v.clone()));
        }
        Ok((out, false))
    }
}

/// In-memory plugin state: one [`Namespace`] per plugin name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvState {
    /// Keyed by plugin name; ordered so iteration (snapshots, digests) is the
    /// same on every node.
    namespaces: BTreeMap<String, Namespace>,
}

impl KvState {
    /// A view of `plugin`'s namespace (empty if it has never written).
    pub fn view(&self, plugin: &str) -> Namespace {
        self.namespaces.get(plugin).cloned().unwrap_or_default()
    }

    /// Every namespace in name order (for snapshots).
    pub fn namespaces(&self) -> impl Iterator<Item = (&str, &Namespace)> {
        self.namespaces.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Rebuild from `(plugin, entries)` pairs (a snapshot).
    pub fn from_parts(parts: Vec<crate::replica::NamespaceImage>) -> KvState {
        let namespaces = parts
            .into_iter()
            .map(|(name, entries)| (name, Namespace(Arc::new(entries.into_iter().collect()))))
            .collect();
        KvState { namespaces }
    }

    /// Commit a command's writes to `plugin`'s namespace.
    pub fn apply(&mut self, plugin: &str, writes: &WriteSet) {
        if writes.is_empty() {
            return;
        }
        self.namespaces.entry(plugin.to_owned()).or_default().apply(writes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_is_prefix_bounded_and_ordered() {
        let mut state = KvState::default();
        let mut w = WriteSet::default();
        for key in ["b/2", "a/1", "b/1", "c", "b/3"] {
            w.set(key.into(), key.as_bytes().to_vec());
        }
        state.apply("p", &w);
        let view = state.view("p");
        let keys: Vec<String> = view.scan("b/", 2, usize::MAX).unwrap().0.into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["b/1", "b/2"]);
        assert!(state.view("other").scan("", 10, usize::MAX).unwrap().0.is_empty());
        // The byte budget stops a scan before it copies more than it may.
        let (some, stopped) = view.scan("", 10, 7).unwrap();
        assert_eq!((some.len(), stopped), (1, true));
    }

    #[test]
    fn delete_removes_and_views_are_isolated() {
        let mut state = KvState::default();
        let mut w = WriteSet::default();
        w.set("k".into(), b"v".to_vec());
        state.apply("p", &w);
        let before = state.view("p");
        let mut d = WriteSet::default();
        d.delete("k".into());
        state.apply("p", &d);
        assert_eq!(before.get("k").unwrap(), Some(b"v".to_vec()));
        assert_eq!(state.view("p").get("k").unwrap(), None);
    }
}
