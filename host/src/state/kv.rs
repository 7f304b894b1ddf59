//! Plugin key-value namespaces and the write sets that change them.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::base::{self, Base};
use super::entry::Entry;

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

/// One plugin's committed key-value data, in layers, newest last:
///
/// - `base`: the entries as of the last snapshot this node wrote or
///   opened, read in place from that snapshot's file ([`Base`]); none
///   before the first.
/// - `frozen`: writes since `base` that a snapshot being built includes
///   (frozen when it was captured, dropped when its file becomes `base`).
/// - `live`: the writes since, a persistent B-tree (`imbl`) of entries and
///   deletions.
///
/// A layer's entry for a key hides the layers below; a deletion hides the
/// key. Only the writes between two snapshots are in memory, so a node's
/// memory does not grow with its state, and opening a snapshot copies no
/// keys. A clone is O(1) and shares everything: a snapshot or a runtime's
/// view holds a clone; a later write copies only the nodes on its own path
/// in `live` (O(log n)), and the copies share the entries they hold
/// ([`Entry`]).
#[derive(Clone, Default)]
pub struct Namespace {
    base: Option<Arc<Base>>,
    frozen: Vec<Frozen>,
    live: imbl::OrdSet<Entry>,
    /// Key and value bytes of the entries (and key bytes of the deletions)
    /// in `live`: what it holds in memory.
    live_bytes: u64,
    /// Keys held, through every layer.
    len: usize,
    /// Holds a snapshot's entries in memory, in `live`, rather than as a
    /// base (decoded from plain bytes): its layers are not just the changes
    /// since a base, so they cannot go in a checkpoint.
    eager: bool,
    /// Key and value bytes held (a function of the entries, so the same on
    /// every node).
    bytes: u64,
}

/// A walk through a base for keys taken in increasing order
/// ([`Base::find_near`]): where the last key was found, or would be.
struct BaseWalk {
    base: Arc<Base>,
    at: usize,
}

impl BaseWalk {
    fn new(base: Arc<Base>) -> BaseWalk {
        BaseWalk { at: base.start(), base }
    }

    /// The length of `key`'s value in the base, if it has one there; `key`
    /// must be above every key asked before.
    fn below(&mut self, key: &str) -> Option<usize> {
        let (at, len) = self.base.find_near(key.as_bytes(), self.at);
        self.at = at;
        len
    }
}

/// Writes a snapshot capture froze ([`Namespace::freeze`]), and the bytes
/// they hold in memory (as `Namespace::live_bytes` counted them).
#[derive(Clone)]
struct Frozen {
    entries: imbl::OrdSet<Entry>,
    bytes: u64,
}

impl PartialEq for Namespace {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.bytes == other.bytes && self.iter().eq(other.iter())
    }
}

impl Eq for Namespace {}

impl std::fmt::Debug for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Namespace({} keys, {} bytes)", self.len(), self.bytes)
    }
}

/// A layer's entry as a merge sees it: the key, and the value or `None`
/// for a deletion.
type Layered<'a> = (&'a [u8], Option<&'a [u8]>);

/// Merge sorted layers (oldest first) into the entries they hold together:
/// for each key the newest layer's, a deletion as `None`.
fn merge_layers<'a>(
    mut layers: Vec<std::iter::Peekable<Box<dyn Iterator<Item = Layered<'a>> + 'a>>>,
) -> impl Iterator<Item = Layered<'a>> + 'a {
    std::iter::from_fn(move || {
        // The smallest key at the head of any layer; of equal keys the
        // newest layer's wins, and every layer moves past it.
        let mut best: Option<(usize, &[u8])> = None;
        for (i, layer) in layers.iter_mut().enumerate() {
            if let Some(&(k, _)) = layer.peek()
                && best.is_none_or(|(_, b)| k <= b)
            {
                best = Some((i, k));
            }
        }
        let (newest, key) = best?;
        let mut value = None;
        for (i, layer) in layers.iter_mut().enumerate() {
            if layer.peek().is_some_and(|&(k, _)| k == key) {
                let (_, v) = layer.next()?;
                if i == newest {
                    value = v;
                }
            }
        }
        Some((key, value))
    })
}

/// [`merge_layers`] without the deletions.
fn merge<'a>(
    layers: Vec<std::iter::Peekable<Box<dyn Iterator<Item = Layered<'a>> + 'a>>>,
) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
    merge_layers(layers).filter_map(|(k, v)| Some((k, v?)))
}

fn layer_entry(e: &Entry) -> Layered<'_> {
    (e.key_bytes(), (!e.is_deleted()).then(|| e.value()))
}

impl Namespace {
    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the namespace holds no keys.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Key and value bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// All entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.iter_from(b"").map(|(k, v)| (std::str::from_utf8(k).unwrap_or_default(), v))
    }

    /// Entries with keys `>= from`, in key order.
    fn iter_from<'a>(&'a self, from: &'a [u8]) -> Box<dyn Iterator<Item = (&'a [u8], &'a [u8])> + 'a> {
        let range = (std::ops::Bound::Included(from), std::ops::Bound::Unbounded);
        if self.frozen.is_empty() && self.live.is_empty() {
            return match &self.base {
                Some(base) => Box::new(base.iter_from(from)),
                None => Box::new(std::iter::empty()),
            };
        }
        if self.base.is_none() && self.frozen.is_empty() {
            return Box::new(self.live.range::<_, [u8]>(range).map(layer_entry).filter_map(|(k, v)| Some((k, v?))));
        }
        let mut layers: Vec<std::iter::Peekable<Box<dyn Iterator<Item = Layered<'a>> + 'a>>> = Vec::new();
        if let Some(base) = &self.base {
            layers.push(
                (Box::new(base.iter_from(from).map(|(k, v)| (k, Some(v)))) as Box<dyn Iterator<Item = _>>).peekable(),
            );
        }
        for layer in self.frozen.iter().map(|f| &f.entries).chain(std::iter::once(&self.live)) {
            layers.push(
                (Box::new(layer.range::<_, [u8]>(range).map(layer_entry)) as Box<dyn Iterator<Item = _>>).peekable(),
            );
        }
        Box::new(merge(layers))
    }

    /// The value at `key`, through the layers.
    fn lookup(&self, key: &[u8]) -> Option<&[u8]> {
        if let Some(e) = self.live.get(key) {
            return (!e.is_deleted()).then(|| e.value());
        }
        self.below_live(key)
    }

    /// The value at `key` in the layers below `live`.
    fn below_live(&self, key: &[u8]) -> Option<&[u8]> {
        for layer in self.frozen.iter().rev() {
            if let Some(e) = layer.entries.get(key) {
                return (!e.is_deleted()).then(|| e.value());
            }
        }
        self.base.as_ref()?.get(key)
    }

    /// The changes since the base (the frozen and live layers merged), in
    /// key order: each key's value, or `None` where it was deleted.
    fn changes(&self) -> impl Iterator<Item = Layered<'_>> {
        let layers = self
            .frozen
            .iter()
            .map(|f| &f.entries)
            .chain(std::iter::once(&self.live))
            .map(|layer| (Box::new(layer.iter().map(layer_entry)) as Box<dyn Iterator<Item = _>>).peekable())
            .collect();
        merge_layers(layers)
    }

    /// Commit `writes` to this namespace (copy-on-write: views taken
    /// before are unchanged, and share every node this does not touch).
    pub fn apply(&mut self, writes: &WriteSet) {
        for (key, value) in writes.iter() {
            self.write(key, value);
        }
    }

    /// The changes since the base, in strictly increasing key order, made
    /// `live` (empty, with no frozen layers: a state just opened from its
    /// snapshot, resuming a checkpoint) at once: counted as
    /// [`Namespace::write`] counts each, with the base walked alongside
    /// (`walk`, over this namespace's base if it has one), and the tree
    /// built bottom-up rather than by an insert each (at 10M keys a
    /// checkpoint holds up to 1.25M changes).
    fn live_from_changes(&mut self, entries: Vec<(String, Option<serde_bytes::ByteBuf>)>, mut walk: Option<BaseWalk>) {
        debug_assert!(self.live.is_empty() && self.frozen.is_empty());
        let mut live = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            let below = walk.as_mut().and_then(|w| w.below(&key));
            let entry = match &value {
                Some(v) => {
                    let Some(e) = Entry::new(&key, v) else {
                        tracing::error!(key, bytes = v.len(), "a write of 2 GiB or more was dropped");
                        continue;
                    };
                    self.bytes += e.data_len();
                    self.len += 1;
                    Some(e)
                }
                None => below.and_then(|_| Entry::deletion(&key)),
            };
            if let Some(e) = entry {
                self.live_bytes += e.data_len();
                live.push(e);
            }
            if let Some(v) = below {
                self.bytes -= (key.len() + v) as u64;
                self.len -= 1;
            }
        }
        self.live = imbl::OrdSet::from_sorted_unique(live);
    }

    /// Commit one write: `value`, or the deletion of `key` when `None`.
    fn write(&mut self, key: &str, value: Option<&[u8]>) {
        self.write_over(key, value, None)
    }

    /// [`Namespace::write`], told the length of the value below `live`
    /// when the caller has looked it up already (`Some(None)`: no value
    /// there).
    fn write_over(&mut self, key: &str, value: Option<&[u8]>, below_len: Option<Option<usize>>) {
        let below_live = |ns: &Self| below_len.unwrap_or_else(|| ns.below_live(key.as_bytes()).map(<[u8]>::len));
        // What the key held: in `live` (returned as it is replaced or
        // removed), else below it.
        // For a deletion, the value's length below `live`, looked up
        // once: it decides the deletion marker and the old size.
        let mut below = None;
        let replaced = match value {
            Some(v) => {
                // Never `None`: a command's memory is at most 256 MiB.
                let Some(e) = Entry::new(key, v) else {
                    tracing::error!(key, bytes = v.len(), "a write of 2 GiB or more was dropped");
                    return;
                };
                let added = e.data_len();
                let replaced = self.live.insert(e);
                self.bytes += added;
                self.live_bytes += added;
                self.len += 1;
                replaced
            }
            None => {
                let replaced = self.live.remove(key.as_bytes());
                let under = below_live(&*self);
                below = Some(under);
                // A deletion stays in `live` only to hide the key below.
                if under.is_some()
                    && let Some(d) = Entry::deletion(key)
                {
                    self.live_bytes += d.data_len();
                    self.live.insert(d);
                }
                replaced
            }
        };
        if let Some(e) = &replaced {
            self.live_bytes -= e.data_len();
        }
        let old = match &replaced {
            Some(e) if e.is_deleted() => None,
            Some(e) => Some(e.data_len()),
            None => below.unwrap_or_else(|| below_live(&*self)).map(|v| (key.len() + v) as u64),
        };
        if let Some(old) = old {
            self.bytes -= old;
            self.len -= 1;
        }
    }

    /// Freeze the writes since the base (a snapshot of this namespace is
    /// being captured), so that once the snapshot's file holds them they
    /// can be dropped ([`Namespace::rebase`]).
    fn freeze(&mut self) {
        if !self.live.is_empty() {
            let (entries, bytes) = (std::mem::take(&mut self.live), std::mem::take(&mut self.live_bytes));
            self.frozen.push(Frozen { entries, bytes });
        }
    }

    /// Read the entries of `captured` (a frozen capture of this namespace,
    /// [`Namespace::freeze`]) from `written` (the same entries, decoded in
    /// place from the snapshot file they were written to) from now on, and
    /// drop their copies in memory. Nothing changes unless this namespace
    /// still holds `captured`'s layers, and `written` is all base and holds
    /// as many entries.
    fn rebase(&mut self, captured: &Namespace, written: Namespace) {
        let n = captured.frozen.len();
        let holds = self.same_base(captured) && captured.live.is_empty() && self.holds_frozen_of(captured);
        let whole = written.frozen.is_empty()
            && written.live.is_empty()
            && (written.len, written.bytes) == (captured.len, captured.bytes);
        if holds && whole {
            self.base = written.base;
            self.frozen.drain(..n);
            // What it held in memory is in the base now; `live` holds
            // the changes since, deletions included.
            self.eager = false;
        }
    }

    /// Whether this namespace's lowest frozen layers are the very layers
    /// `other` (a clone of it taken before) has frozen: no rebase dropped
    /// them since.
    fn holds_frozen_of(&self, other: &Namespace) -> bool {
        self.frozen.len() >= other.frozen.len()
            && self.frozen.iter().zip(&other.frozen).all(|(a, b)| a.entries.ptr_eq(&b.entries))
    }

    /// Whether `other` reads the same base as this namespace (the same
    /// mapping of the same snapshot, or none).
    fn same_base(&self, other: &Namespace) -> bool {
        match (&self.base, &other.base) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }

    /// Build from entries in any order (a later duplicate key wins).
    ///
    /// Never drops one: these are a state's entries, each held before.
    fn from_entries(entries: impl IntoIterator<Item = (String, Vec<u8>)>) -> Namespace {
        let held = entries.into_iter().filter_map(|(k, v)| {
            let e = Entry::new(&k, &v);
            if e.is_none() {
                tracing::error!(key = %k, bytes = v.len(), "an entry of 2 GiB or more was dropped");
            }
            e
        });
        Namespace::from_vec(held.collect())
    }

    /// Build from entries in any order (a later duplicate key wins).
    ///
    /// In key order, the tree is built bottom-up with full nodes
    /// (`from_sorted_unique`, O(n), no comparisons) rather than by n
    /// inserts, which in that order left every node half full.
    fn from_vec(mut entries: Vec<Entry>) -> Namespace {
        if !entries.windows(2).all(|w| w[0] < w[1]) {
            // Stable, so of equal keys the last stays last; `dedup_by`
            // keeps the first of a run, so each later one is swapped in.
            entries.sort();
            entries.dedup_by(|later, kept| {
                let same = later.key_bytes() == kept.key_bytes();
                if same {
                    std::mem::swap(later, kept);
                }
                same
            });
        }
        let bytes = entries.iter().map(Entry::data_len).sum();
        let len = entries.len();
        Namespace {
            live: imbl::OrdSet::from_sorted_unique(entries),
            len,
            bytes,
            live_bytes: bytes,
            eager: len > 0,
            ..Namespace::default()
        }
    }
}

impl StateView for Namespace {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateReadError> {
        Ok(self.lookup(key.as_bytes()).map(<[u8]>::to_vec))
    }

    fn scan(&self, prefix: &str, limit: usize, max_bytes: usize) -> Result<Scanned, StateReadError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (k, v) in
            self.iter_from(prefix.as_bytes()).take_while(|(k, _)| k.starts_with(prefix.as_bytes())).take(limit)
        {
            bytes = bytes.saturating_add(k.len() + v.len());
            if bytes > max_bytes {
                return Ok((out, true));
            }
            out.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
        }
        Ok((out, false))
    }
}

/// A namespace is encoded as a sequence of `(key, value bytes)` in key
/// order: exactly the encoding of the `Vec<(String, Vec<u8>)>` that
/// snapshots held before (postcard writes a byte vector and a byte string
/// alike), so a snapshot is written straight from the shared tree and read
/// straight into one, and the format does not change.
impl serde::Serialize for Namespace {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeSeq};
        let mut seq = serializer.serialize_seq(Some(self.len()))?;
        match self.base.as_ref().filter(|_| base::raw_active()) {
            // A snapshot being written: the base's records between two
            // changed keys go as they are (`base::writing_raw`), and only
            // the changes are encoded.
            Some(b) => {
                let mut at = b.start();
                for (k, v) in self.changes() {
                    let (found, replaced) = b.find_from(k, at);
                    base::copy_raw(b.raw(at, found)).map_err(S::Error::custom)?;
                    at = if replaced { b.next_record(found) } else { found };
                    if let Some(v) = v {
                        seq.serialize_element(&(serde_bytes::Bytes::new(k), serde_bytes::Bytes::new(v)))?;
                    }
                }
                base::copy_raw(b.raw(at, b.end())).map_err(S::Error::custom)?;
            }
            None => {
                for (k, v) in self.iter() {
                    seq.serialize_element(&(k, serde_bytes::Bytes::new(v)))?;
                }
            }
        }
        seq.end()
    }
}

impl<'de> serde::Deserialize<'de> for Namespace {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Namespace;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a sequence of (key, value) pairs")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Namespace, A::Error> {
                // Decoding a mapped snapshot: the records stay where they
                // are (see `base`), while they are the records a snapshot
                // writes; anything else is copied into memory.
                let mut in_place = base::decoding().map(base::Builder::new);
                // The count is the encoder's claim: capped (16M entries,
                // 256 MiB), so a damaged one cannot reserve much more.
                let mut entries = Vec::new();
                let hint = seq.size_hint().unwrap_or(0).min(1 << 24);
                let entry = |k: &str, v: &[u8]| {
                    Entry::new(k, v)
                        .ok_or_else(|| serde::de::Error::custom(format!("an entry of 2 GiB or more (key {k:?})")))
                };
                while let Some((k, v)) = seq.next_element::<(&'de str, &'de serde_bytes::Bytes)>()? {
                    if let Some(b) = &mut in_place {
                        if b.push(k.as_bytes(), v) {
                            continue;
                        }
                        entries.reserve(hint);
                        for (pk, pv) in b.taken() {
                            entries.push(entry(std::str::from_utf8(pk).unwrap_or_default(), pv)?);
                        }
                        in_place = None;
                    }
                    entries.push(entry(k, v)?);
                }
                match in_place.and_then(base::Builder::finish) {
                    Some(b) => {
                        let (len, bytes) = (b.len(), b.bytes());
                        Ok(Namespace { base: Some(Arc::new(b)), len, bytes, ..Namespace::default() })
                    }
                    None => Ok(Namespace::from_vec(entries)),
                }
            }
        }
        deserializer.deserialize_seq(Visit)
    }
}

/// Encoded as a sequence of `(plugin, namespace)` in name order: the
/// encoding of `Vec<NamespaceImage>`.
impl serde::Serialize for KvState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.namespaces.iter())
    }
}

impl<'de> serde::Deserialize<'de> for KvState {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let parts = Vec::<(String, Namespace)>::deserialize(deserializer)?;
        let origin = base::decoding().and_then(|(_, origin)| origin);
        Ok(KvState { namespaces: parts.into_iter().collect(), origin, captures: Vec::new(), live_from: None })
    }
}

/// The changes of every namespace since its base, as a checkpoint holds
/// them: (plugin, [(key, value, or `None` where deleted)]), in order.
pub type ChangesImage = Vec<(String, Vec<(String, Option<serde_bytes::ByteBuf>)>)>;

/// A state's changes since its bases, encoded as a [`ChangesImage`]
/// (namespaces without changes left out).
pub struct Changes<'a>(pub &'a KvState);

/// One namespace's changes (see [`Changes`]).
struct NamespaceChanges<'a>(&'a Namespace);

impl serde::Serialize for Changes<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // A namespace without a base is in the checkpoint even when it
        // is empty (a plugin's first writes since the snapshot, all
        // deleted since): opened from it, the state has it as the
        // snapshot it writes next must.
        let changed = |ns: &&Namespace| {
            ns.base.is_none() || !ns.live.is_empty() || ns.frozen.iter().any(|f| !f.entries.is_empty())
        };
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.0.namespaces.values().filter(changed).count()))?;
        for (name, ns) in self.0.namespaces.iter().filter(|(_, ns)| changed(ns)) {
            seq.serialize_element(&(name, NamespaceChanges(ns)))?;
        }
        seq.end()
    }
}

impl serde::Serialize for NamespaceChanges<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_changed(serializer, self.0.changes().count(), self.0.changes())
    }
}

/// `len` entries as a checkpoint holds them (see [`ChangesImage`]): each
/// key with its value, or `None` where deleted.
fn serialize_changed<'a, S: serde::Serializer>(
    serializer: S,
    len: usize,
    entries: impl Iterator<Item = Layered<'a>>,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = serializer.serialize_seq(Some(len))?;
    for (k, v) in entries {
        let key = std::str::from_utf8(k).unwrap_or_default();
        seq.serialize_element(&(key, v.map(serde_bytes::Bytes::new)))?;
    }
    seq.end()
}

/// Entries found changed (see [`ChangesSince`]), encoded as
/// [`serialize_changed`] does.
struct ChangedEntries<'a>(&'a [Layered<'a>]);

impl serde::Serialize for ChangedEntries<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_changed(serializer, self.0.len(), self.0.iter().copied())
    }
}

/// What changed in a state since an earlier capture of it
/// ([`KvState::changes_since`]), encoded as a [`ChangesImage`]: applied
/// to the earlier state with [`KvState::apply_changes`], it gives this
/// one. Namespaces new since are in it even when empty.
pub struct ChangesSince<'a> {
    namespaces: Vec<(&'a str, Vec<Layered<'a>>)>,
}

impl ChangesSince<'_> {
    /// Entries (and deletions) it holds.
    pub fn len(&self) -> usize {
        self.namespaces.iter().map(|(_, entries)| entries.len()).sum()
    }

    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
    }
}

impl serde::Serialize for ChangesSince<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.namespaces.len()))?;
        for (name, entries) in &self.namespaces {
            seq.serialize_element(&(name, ChangedEntries(entries)))?;
        }
        seq.end()
    }
}

impl From<Vec<crate::replica::NamespaceImage>> for KvState {
    fn from(parts: Vec<crate::replica::NamespaceImage>) -> KvState {
        KvState::from_parts(parts)
    }
}

/// Plugin state: one [`Namespace`] per plugin name.
#[derive(Debug, Clone, Default)]
pub struct KvState {
    /// Keyed by plugin name; ordered so iteration (snapshots, digests) is the
    /// same on every node.
    namespaces: BTreeMap<String, Namespace>,
    /// Log index of the snapshot the namespaces' bases are read from (none
    /// before this node wrote or opened one).
    origin: Option<u64>,
    /// Log indices at which a snapshot captured this state since `origin`
    /// ([`KvState::freeze_at`]), oldest first: the snapshots a checkpoint
    /// of it also serves ([`KvState::captures`]). This node's own, not
    /// part of the state.
    captures: Vec<u64>,
    /// Log index of the capture every namespace's `live` layer began at
    /// (the last [`KvState::freeze_at`]): `live` holds exactly the changes
    /// since the state at that index. None when it began otherwise.
    live_from: Option<u64>,
}

/// Equal when they hold the same entries, wherever from.
impl PartialEq for KvState {
    fn eq(&self, other: &Self) -> bool {
        self.namespaces == other.namespaces
    }
}

impl Eq for KvState {}

impl KvState {
    /// A view of `plugin`'s namespace (empty if it has never written).
    pub fn view(&self, plugin: &str) -> Namespace {
        self.namespaces.get(plugin).cloned().unwrap_or_default()
    }

    /// Every namespace as plain vectors, in name and key order: a copy of
    /// every key.
    pub fn image(&self) -> Vec<crate::replica::NamespaceImage> {
        self.namespaces()
            .map(|(name, ns)| (name.to_owned(), ns.iter().map(|(k, v)| (k.to_owned(), v.to_vec())).collect()))
            .collect()
    }

    /// Every namespace in name order (for snapshots).
    pub fn namespaces(&self) -> impl Iterator<Item = (&str, &Namespace)> {
        self.namespaces.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Rebuild from `(plugin, entries)` pairs (a snapshot).
    pub fn from_parts(parts: Vec<crate::replica::NamespaceImage>) -> KvState {
        let namespaces = parts.into_iter().map(|(name, entries)| (name, Namespace::from_entries(entries))).collect();
        KvState { namespaces, origin: None, captures: Vec::new(), live_from: None }
    }

    /// Keys and key-and-value bytes held by every namespace together.
    pub fn size(&self) -> (u64, u64) {
        self.namespaces.values().fold((0, 0), |(k, b), ns| (k + ns.len() as u64, b + ns.bytes()))
    }

    /// Freeze every namespace's writes since its base: a snapshot of this
    /// state is being captured (see [`KvState::rebase`]).
    pub fn freeze(&mut self) {
        self.namespaces.values_mut().for_each(Namespace::freeze);
        self.live_from = None;
    }

    /// [`KvState::freeze`] for a snapshot at log index `at`, remembered
    /// in [`KvState::captures`].
    pub fn freeze_at(&mut self, at: Option<u64>) {
        self.freeze();
        self.live_from = at;
        if let Some(at) = at
            && self.captures.last().is_none_or(|&last| last < at)
        {
            self.captures.push(at);
        }
    }

    /// The snapshots, besides the one at [`KvState::checkpoint_base`],
    /// over which this state's [`Changes`] also give this state: those
    /// captured since it ([`KvState::freeze_at`]).
    ///
    /// A snapshot captured at `s` holds the base and every layer frozen
    /// up to `s`. A key it holds and a later command deletes is in a
    /// layer below `live` then, so the deletion is kept as a deletion
    /// (see [`Namespace::apply`]); any other key the changes leave out is
    /// one no write touched since the base, the same in the base and in
    /// the snapshot. So a checkpoint written while that snapshot was
    /// being built, read over it once it replaced the base's, is the
    /// checkpoint's state; without this, a node killed between that
    /// snapshot's rename and its next checkpoint replayed every entry
    /// since the capture.
    pub fn captures(&self) -> &[u64] {
        &self.captures
    }

    /// The log index of the snapshot a checkpoint of this state is
    /// relative to ([`Changes`]): `Some(origin)` when every namespace's
    /// layers are exactly its changes since a base read from that snapshot
    /// (or since empty), `None` otherwise (a namespace decoded into memory,
    /// or one whose base is from another snapshot).
    pub fn checkpoint_base(&self) -> Option<Option<u64>> {
        let fits =
            self.namespaces.values().all(|ns| !ns.eager && ns.base.as_ref().is_none_or(|b| b.origin == self.origin));
        fits.then_some(self.origin)
    }

    /// Entries (and deletions) in the layers above the bases, across
    /// namespaces: about what a checkpoint holds.
    pub fn changed_entries(&self) -> usize {
        self.namespaces
            .values()
            .map(|ns| ns.live.len() + ns.frozen.iter().map(|f| f.entries.len()).sum::<usize>())
            .sum()
    }

    /// The changes from `earlier` (a clone of this state taken before) to
    /// this state, found by comparing only the writes since their common
    /// base: the nodes the two trees share are skipped, so this costs
    /// about the writes since `earlier`, not the state. `None` when the
    /// two are not layered alike (a snapshot froze or rebased the state
    /// in between, or a namespace went): then only the whole changes since
    /// the base ([`Changes`]) describe it.
    pub fn changes_since<'a>(&'a self, earlier: &'a KvState) -> Option<ChangesSince<'a>> {
        if self.origin != earlier.origin || earlier.namespaces.keys().any(|name| !self.namespaces.contains_key(name)) {
            return None;
        }
        let mut namespaces = Vec::new();
        for (name, ns) in &self.namespaces {
            let Some(before) = earlier.namespaces.get(name) else {
                // New since: all its writes are in `live`, or it is not
                // layered alike.
                if ns.base.is_some() || !ns.frozen.is_empty() || ns.eager {
                    return None;
                }
                namespaces.push((name.as_str(), ns.live.iter().map(layer_entry).collect()));
                continue;
            };
            let same_frozen = ns.frozen.len() == before.frozen.len() && ns.holds_frozen_of(before);
            if !ns.same_base(before) || !same_frozen || ns.eager || before.eager {
                return None;
            }
            // A key whose entry in `live` was added, replaced or removed:
            // what the layers say now (a removed entry was a write of a
            // key no layer below holds, since deleted).
            let changed: Vec<Layered<'a>> = before
                .live
                .diff_by(&ns.live, |a, b| a == b)
                .map(|item| {
                    let key = match item {
                        imbl::ordset::DiffByItem::Add(e) | imbl::ordset::DiffByItem::Update { new: e, .. } => {
                            return layer_entry(e);
                        }
                        imbl::ordset::DiffByItem::Remove(e) => e.key_bytes(),
                    };
                    (key, ns.lookup(key))
                })
                .collect();
            if !changed.is_empty() {
                namespaces.push((name.as_str(), changed));
            }
        }
        Some(ChangesSince { namespaces })
    }

    /// The changes since the last snapshot captured of this state
    /// ([`KvState::freeze_at`], at the log index returned): what each
    /// namespace's `live` layer holds, deletions included, and every
    /// namespace (so that one made since is there even when empty).
    /// Applied with [`KvState::apply_changes`] over that snapshot once it
    /// is written, they give this state. While a snapshot is built after a
    /// bulk load, these are the few writes since its capture, where the
    /// changes since the base ([`Changes`]) are the whole load. `None`
    /// when `live` did not begin at a capture.
    pub fn changes_since_capture(&self) -> Option<(u64, ChangesSince<'_>)> {
        let at = self.live_from?;
        let namespaces = self
            .namespaces
            .iter()
            .map(|(name, ns)| (name.as_str(), ns.live.iter().map(layer_entry).collect()))
            .collect();
        Some((at, ChangesSince { namespaces }))
    }

    /// Apply a checkpoint's changes ([`Changes`]) to the state they are
    /// relative to.
    pub fn apply_changes(&mut self, changes: ChangesImage) {
        // Each key once, in order: written one by one, without gathering
        // them into a write set first (a restart applies every change
        // since the snapshot here).
        for (name, entries) in changes {
            let ns = self.namespaces.entry(name).or_default();
            // In strictly increasing key order (as a checkpoint holds them)
            // over a base alone (no frozen layers: a state just opened), the
            // keys are found in the base by walking it, not by a search each.
            let ordered = entries.windows(2).all(|w| w[0].0 < w[1].0);
            let mut walk = ns.base.clone().filter(|_| ordered && ns.frozen.is_empty()).map(BaseWalk::new);
            if ordered && ns.live.is_empty() && ns.frozen.is_empty() {
                ns.live_from_changes(entries, walk);
                continue;
            }
            for (key, value) in entries {
                let below = walk.as_mut().map(|w| w.below(&key));
                ns.write_over(&key, value.as_ref().map(|v| &v[..]), below);
            }
        }
    }

    /// Bytes the layers above the bases hold in memory, across namespaces
    /// (keys and values; keys of deletions).
    pub fn changed_bytes(&self) -> u64 {
        self.namespaces.values().map(|ns| ns.live_bytes + ns.frozen.iter().map(|f| f.bytes).sum::<u64>()).sum()
    }

    /// Entries (and deletions) in frozen layers, across namespaces.
    pub fn frozen_entries(&self) -> usize {
        self.namespaces.values().map(|ns| ns.frozen.iter().map(|f| f.entries.len()).sum::<usize>()).sum()
    }

    /// `written` is `captured` (a capture right after [`KvState::freeze`])
    /// decoded in place from the snapshot file it was written to: read
    /// each namespace it holds from there from now on, and drop the copies
    /// in memory. A namespace that no longer holds the captured layers (the
    /// state was replaced meanwhile) is left as it is.
    pub fn rebase(&mut self, captured: &KvState, written: KvState) {
        if self.origin != captured.origin {
            // Replaced (a snapshot was installed) since the capture.
            return;
        }
        self.origin = written.origin;
        // Captures up to the new base are in it: a checkpoint from now on
        // is relative to it.
        self.captures.retain(|&at| Some(at) > written.origin);
        for (name, written) in written.namespaces {
            if let (Some(live), Some(captured)) = (self.namespaces.get_mut(&name), captured.namespaces.get(&name)) {
                live.rebase(captured, written);
            }
        }
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

    /// Taking a snapshot holds a clone of every namespace while it is
    /// written out. The write after it must copy the nodes on its path,
    /// not the namespace: a whole copy on the apply path was the stall of
    /// about a second per million keys after every snapshot.
    #[test]
    fn a_write_after_a_snapshot_copies_a_path_not_the_namespace() {
        let mut state = KvState::default();
        let mut load = WriteSet::default();
        for i in 0..100_000u32 {
            load.set(format!("k/{i:08}"), vec![7u8; 100]);
        }
        state.apply("p", &load);
        let snapshot = state.clone();
        let mut one = WriteSet::default();
        one.set("k/00050000".into(), vec![1u8; 100]);
        let before = crate::test_alloc::allocated();
        state.apply("p", &one);
        let copied = crate::test_alloc::allocated() - before;
        // The new entry (114 bytes) and the nodes on its path: no copies
        // of the keys and values those nodes hold (7.4 KiB here when each
        // copied node copied its entries; 2.1 KiB without).
        assert!(copied < 4 * 1024, "one write after a snapshot allocated {copied} bytes");
        // The keys beside it, in the leaf that was copied, are the very
        // same bytes in both trees.
        let near = |ns: &Namespace| -> Vec<(String, usize)> {
            ns.iter()
                .skip(49_980)
                .take(40)
                .filter(|(k, _)| *k != "k/00050000")
                .map(|(k, v)| (k.to_owned(), v.as_ptr() as usize))
                .collect()
        };
        assert_eq!(near(&state.view("p")), near(&snapshot.view("p")));
        // Both see their own state.
        assert_eq!(snapshot.view("p").get("k/00050000").unwrap(), Some(vec![7u8; 100]));
        assert_eq!(state.view("p").get("k/00050000").unwrap(), Some(vec![1u8; 100]));
        assert_eq!(state.size(), (100_000, 100_000 * (10 + 100)));
    }

    /// The trees encode exactly as the plain vectors snapshots held
    /// before, and decode back into the same state.
    #[test]
    fn the_encoding_is_the_plain_vectors() {
        let mut state = KvState::default();
        for (plugin, n) in [("a", 3u8), ("b", 200)] {
            let mut w = WriteSet::default();
            for i in 0..n {
                w.set(format!("key/{i:03}"), vec![i; usize::from(i)]);
            }
            state.apply(plugin, &w);
        }
        let plain = state.image();
        let bytes = postcard::to_allocvec(&state).unwrap();
        assert_eq!(bytes, postcard::to_allocvec(&plain).unwrap());
        let back: KvState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.size(), state.size());
        assert_eq!(KvState::from(plain), state);
    }

    /// A small deterministic generator for the tests' random operations.
    fn next(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    fn same_as(ns: &Namespace, model: &BTreeMap<String, Vec<u8>>) {
        // What the layers hold in memory, as counted while writing.
        let held = |l: &imbl::OrdSet<Entry>| l.iter().map(Entry::data_len).sum::<u64>();
        assert_eq!(ns.live_bytes, held(&ns.live));
        assert!(ns.frozen.iter().all(|f| f.bytes == held(&f.entries)));
        assert_eq!(ns.len(), model.len());
        assert!(ns.iter().map(|(k, v)| (k.to_owned(), v.to_vec())).eq(model.clone()));
        assert_eq!(ns.bytes(), model.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum::<u64>());
    }

    /// A namespace built bottom-up from a snapshot's ordered entries is a
    /// tree like any other: at every size (one leaf, one level, several)
    /// its reads, scans, writes and deletes match a plain ordered map, and
    /// a clone taken before the writes is unchanged by them.
    #[test]
    fn a_namespace_built_in_order_reads_and_writes_as_one_built_by_inserts() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for n in (0..120).chain([255, 256, 257, 289, 1000, 4913, 20_000]) {
            // Even numbers only, so the odd ones between are absent keys.
            let model: BTreeMap<String, Vec<u8>> =
                (0..n).map(|i| (format!("k/{:06}", 2 * i), vec![(i % 251) as u8; i % 7])).collect();
            let built = Namespace::from_entries(model.clone());
            same_as(&built, &model);
            for i in 0..2 * n + 2 {
                let key = format!("k/{i:06}");
                assert_eq!(built.get(&key).unwrap().as_ref(), model.get(&key), "{n} keys: get {key}");
            }
            if n > 10 {
                let (some, _) = built.scan("k/0000", 1000, usize::MAX).unwrap();
                let want: Vec<(String, Vec<u8>)> = model
                    .range("k/0000".to_owned()..)
                    .take_while(|(k, _)| k.starts_with("k/0000"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                assert_eq!(some, want);
            }
            let mut ns = built.clone();
            let mut changed = model.clone();
            for _ in 0..(4 * n).min(8000) {
                let key = format!("k/{:06}", next(&mut seed) % (2 * n as u64 + 2));
                let mut w = WriteSet::default();
                if next(&mut seed).is_multiple_of(2) {
                    w.delete(key.clone());
                    changed.remove(&key);
                } else {
                    w.set(key.clone(), key.as_bytes().to_vec());
                    changed.insert(key.clone(), key.into_bytes());
                }
                ns.apply(&w);
            }
            same_as(&ns, &changed);
            same_as(&built, &model);
        }
    }

    /// `state` written to a file and decoded in place from its mapping, as
    /// a snapshot is (a file of its own each time: one still mapped is
    /// never written over).
    fn written(state: &KvState, dir: &std::path::Path) -> KvState {
        static FILES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        write_map(state, dir, FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }

    /// `state` written to a file of its own (snapshot `origin`), read in
    /// place from it.
    fn write_map(state: &KvState, dir: &std::path::Path, origin: u64) -> KvState {
        use std::io::Write as _;
        let path = dir.join(format!("state.{origin}"));
        let mut f = std::fs::File::create(&path).unwrap();
        // Some bytes before the state, as the snapshot header is.
        f.write_all(b"header").unwrap();
        f.write_all(&encoded_with_raw_runs(state)).unwrap();
        drop(f);
        read_map(dir, origin)
    }

    /// `state` encoded as a snapshot writes it (its bases' unchanged runs
    /// copied: `base::writing_raw`), checked to be the bytes, and the size
    /// counted first, of encoding it record by record.
    fn encoded_with_raw_runs(state: &KvState) -> Vec<u8> {
        let plain = postcard::to_allocvec(state).unwrap();
        let (size, raw) = base::counting_raw(|| postcard::experimental::serialized_size(state).unwrap());
        assert_eq!(size as u64 + raw, plain.len() as u64, "size counted with raw runs");
        let mut bytes = Vec::new();
        let out = std::cell::RefCell::new(&mut bytes as &mut dyn std::io::Write);
        base::writing_raw(&out, || postcard::to_io(state, base::Tap(&out)).unwrap());
        assert!(bytes == plain, "raw runs change the encoding ({} bytes against {})", bytes.len(), plain.len());
        bytes
    }

    /// The state [`write_map`] wrote for snapshot `origin`, read in place
    /// from its file (as a node opens its snapshot).
    fn read_map(dir: &std::path::Path, origin: u64) -> KvState {
        let file = std::fs::File::open(dir.join(format!("state.{origin}"))).unwrap();
        let mapping: base::Mapping = Arc::new(unsafe { memmap2::Mmap::map(&file).unwrap() });
        base::decode_mapped(&mapping, Some(origin), || postcard::from_bytes(&mapping[6..]).unwrap())
    }

    /// The layers (a snapshot file's entries read in place, the writes a
    /// snapshot being built froze, the writes since) read, scan, count and
    /// encode as one ordered map whatever the writes and deletes, through
    /// snapshots taken, written, and made the base; a capture is unchanged
    /// by the writes after it.
    #[test]
    fn layers_read_as_one_map_through_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut state = KvState::default();
        let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut pending: Option<(KvState, BTreeMap<String, Vec<u8>>)> = None;
        let check = |state: &KvState, model: &BTreeMap<String, Vec<u8>>, seed: &mut u64| {
            let ns = state.view("p");
            same_as(&ns, model);
            for _ in 0..50 {
                let key = format!("k/{:05}", next(seed) % 3000);
                assert_eq!(ns.get(&key).unwrap().as_ref(), model.get(&key), "get {key}");
                let prefix = &key[..5];
                let limit = (next(seed) % 40) as usize;
                let want: Vec<(String, Vec<u8>)> = model
                    .range(prefix.to_owned()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .take(limit)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                assert_eq!(ns.scan(prefix, limit, usize::MAX).unwrap(), (want, false), "scan {prefix}");
            }
            let plain: Vec<crate::replica::NamespaceImage> = if model.is_empty() {
                vec![]
            } else {
                vec![("p".into(), model.iter().map(|(k, v)| (k.clone(), v.clone())).collect())]
            };
            if !state.namespaces.is_empty() || !plain.is_empty() {
                let got: Vec<crate::replica::NamespaceImage> =
                    state.image().into_iter().filter(|(_, entries)| !entries.is_empty()).collect();
                assert_eq!(got, plain);
            }
        };
        for round in 0..60 {
            let mut w = WriteSet::default();
            for _ in 0..(next(&mut seed) % 200) {
                let key = format!("k/{:05}", next(&mut seed) % 3000);
                if next(&mut seed).is_multiple_of(3) {
                    w.delete(key.clone());
                    model.remove(&key);
                } else {
                    let v = vec![(round % 251) as u8; (next(&mut seed) % 40) as usize];
                    w.set(key.clone(), v.clone());
                    model.insert(key, v);
                }
            }
            state.apply("p", &w);
            check(&state, &model, &mut seed);
            match next(&mut seed) % 4 {
                // Capture for a snapshot: freeze, then keep writing.
                0 if pending.is_none() => {
                    state.freeze();
                    pending = Some((state.clone(), model.clone()));
                }
                // The snapshot is written: the state reads from it.
                1 => {
                    if let Some((captured, then)) = pending.take() {
                        let file = written(&captured, dir.path());
                        assert!(file.namespaces.values().all(|ns| ns.live.is_empty() && ns.frozen.is_empty()));
                        check(&file, &then, &mut seed);
                        check(&captured, &then, &mut seed);
                        state.rebase(&captured, file);
                        assert!(state.namespaces.values().all(|ns| ns.frozen.is_empty()));
                        check(&state, &model, &mut seed);
                        check(&captured, &then, &mut seed);
                    }
                }
                _ => {}
            }
        }
        assert!(state.view("p").base.is_some(), "no round made a base");
    }

    /// A snapshot's records decode in place; records that are not what a
    /// snapshot writes (out of order, repeated) are decoded into memory,
    /// the same namespace as from plain bytes, and a rebase onto a state
    /// that was replaced meanwhile changes nothing.
    #[test]
    fn records_not_in_order_are_decoded_into_memory() {
        let dir = tempfile::tempdir().unwrap();
        let plain: Vec<crate::replica::NamespaceImage> = vec![(
            "p".into(),
            vec![("a".into(), vec![1]), ("c".into(), vec![2]), ("b".into(), vec![3]), ("b".into(), vec![4])],
        )];
        let bytes = postcard::to_allocvec(&plain).unwrap();
        let path = dir.path().join("unsorted");
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mapping: base::Mapping = Arc::new(unsafe { memmap2::Mmap::map(&file).unwrap() });
        let decoded: KvState = base::decode_mapped(&mapping, Some(7), || postcard::from_bytes(&mapping[..]).unwrap());
        let ns = decoded.view("p");
        assert!(ns.base.is_none());
        assert_eq!(ns.iter().collect::<Vec<_>>(), [("a", &[1u8][..]), ("b", &[4][..]), ("c", &[2][..])]);
        assert_eq!(decoded, postcard::from_bytes::<KvState>(&bytes).unwrap());

        let mut state = KvState::default();
        let mut w = WriteSet::default();
        w.set("x".into(), vec![9]);
        state.apply("p", &w);
        state.freeze();
        let captured = state.clone();
        let file = written(&captured, dir.path());
        // Replaced (a snapshot installed) before the rebase.
        let mut replaced = decoded.clone();
        replaced.rebase(&captured, file);
        assert_eq!(replaced, decoded);
        assert!(replaced.view("p").base.is_none());
    }

    /// Entries out of order are sorted first, and of a repeated key the
    /// last one wins, as inserting them one by one gives.
    #[test]
    fn entries_out_of_order_build_the_same_namespace_as_inserts() {
        let entries = [("b", 1u8), ("a", 2), ("c", 3), ("a", 4), ("b", 5), ("b", 6)];
        let built = Namespace::from_entries(entries.iter().map(|(k, v)| (k.to_string(), vec![*v])));
        let mut inserted = KvState::default();
        for (k, v) in entries {
            let mut w = WriteSet::default();
            w.set(k.into(), vec![v]);
            inserted.apply("p", &w);
        }
        assert_eq!(built.iter().collect::<Vec<_>>(), [("a", &[4u8][..]), ("b", &[6][..]), ("c", &[3][..])]);
        assert_eq!(built, inserted.view("p"));
        assert_eq!(built.bytes(), 6);
    }

    /// A checkpoint's changes applied over a base (walking it in key
    /// order, see [`KvState::apply_changes`]) count and read as the same
    /// writes applied one by one: keys before, between, on and after the
    /// base's, values of other lengths, deletions of keys it has and has
    /// not, runs longer than the base's index stride, and keys out of order;
    /// made the layer above the base at once, or over a write already there.
    #[test]
    fn changes_applied_over_a_base_count_as_writes_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..20 {
            let mut w = WriteSet::default();
            for i in 0..(200 + round * 37) {
                if !next(&mut seed).is_multiple_of(3) {
                    w.set(format!("k{:05}", i * 2), vec![7; (next(&mut seed) % 40) as usize]);
                }
            }
            let mut start = KvState::default();
            start.apply("p", &w);
            let mut opened = written(&start, dir.path());
            if round % 2 == 1 {
                // A write since the base: the changes go key by key.
                let mut w = WriteSet::default();
                w.set("k00001".into(), vec![3; 5]);
                opened.apply("p", &w);
            }
            let mut keys: Vec<String> = vec!["a".into(), "zz".into()];
            for _ in 0..(150 + round * 29) {
                keys.push(format!("k{:05}", next(&mut seed) % 900));
            }
            keys.sort();
            keys.dedup();
            if round % 5 == 4 {
                keys.reverse();
            }
            let changes: Vec<(String, Option<serde_bytes::ByteBuf>)> = keys
                .into_iter()
                .map(|k| {
                    let v =
                        (!next(&mut seed).is_multiple_of(4)).then(|| vec![1; (next(&mut seed) % 50) as usize].into());
                    (k, v)
                })
                .collect();
            let mut walked = opened.clone();
            walked.apply_changes(vec![("p".into(), changes.clone())]);
            let mut one_by_one = opened.clone();
            let ns = one_by_one.namespaces.get_mut("p").unwrap();
            for (k, v) in &changes {
                ns.write(k, v.as_deref().map(|v| &v[..]));
            }
            assert_eq!(walked.size(), one_by_one.size(), "round {round}");
            assert!(walked.view("p").iter().eq(one_by_one.view("p").iter()), "round {round}");
        }
    }

    #[test]
    fn byte_count_follows_overwrites_and_deletes() {
        let mut state = KvState::default();
        let mut w = WriteSet::default();
        w.set("a".into(), vec![0; 10]);
        w.set("bb".into(), vec![0; 20]);
        state.apply("p", &w);
        assert_eq!(state.size(), (2, 33));
        let mut w = WriteSet::default();
        w.set("a".into(), vec![0; 1]);
        w.delete("bb".into());
        w.delete("never".into());
        state.apply("p", &w);
        assert_eq!(state.size(), (1, 2));
        assert_eq!(state.view("p").iter().collect::<Vec<_>>(), [("a", &[0u8][..])]);
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

    /// Each namespace's entries, as plain maps.
    type Model = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

    /// `state` holds what `model` does.
    fn check(state: &KvState, model: &Model, what: &str) {
        for (name, m) in model {
            let ns = state.view(name);
            assert_eq!(ns.len(), m.len(), "{what} len {name}");
            assert!(ns.iter().map(|(k, v)| (k.to_owned(), v.to_vec())).eq(m.clone()), "{what} iter {name}");
            for (k, v) in m {
                assert_eq!(ns.get(k).unwrap().as_deref(), Some(&v[..]), "{what} get {name} {k}");
            }
            assert_eq!(ns.bytes(), m.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum::<u64>(), "{what} bytes");
        }
        let names: Vec<&str> = state.namespaces().map(|(n, _)| n).collect();
        assert_eq!(names, model.keys().map(String::as_str).collect::<Vec<_>>(), "{what} namespaces");
    }

    /// The last whole checkpoint: (base, changes, the changes since each
    /// checkpoint after it, the model at the last of them).
    type Checkpointed = (Option<u64>, Vec<u8>, Vec<Vec<u8>>, Model);

    /// Several plugins' namespaces under random writes and deletes, while
    /// snapshots are captured (some abandoned, as a build that failed),
    /// written and made the base, checkpoints taken, and the node
    /// restarted from the last snapshot written and the checkpoint that
    /// belongs to it (if any): at every step every namespace reads, counts
    /// and lists as a plain map that took the same writes. Restarted, the
    /// state is the checkpoint's, namespaces emptied since the snapshot
    /// included. `SYNOD_FUZZ_SEEDS` and `SYNOD_FUZZ_ROUNDS` run it longer.
    #[test]
    fn layers_and_checkpoints_keep_the_state_through_snapshots_and_restarts() {
        let rounds: u64 = std::env::var("SYNOD_FUZZ_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(150);
        let seeds: u64 = std::env::var("SYNOD_FUZZ_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
        let mut next_checked = 0;
        for s in 0..seeds {
            let dir = tempfile::tempdir().unwrap();
            let mut seed = 0x2545_f491_4f6c_dd1du64 ^ (s.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut state = KvState::default();
            let mut model: Model = BTreeMap::new();
            // the last written snapshot (its model) as on disk
            let mut disk: Option<(u64, Model)> = None;
            let mut pending: Option<(KvState, Model, u64)> = None;
            let mut ckpt: Option<Checkpointed> = None;
            // The state as of the last checkpoint, while later ones may be
            // written as the changes since it; and the writes since it.
            let mut chained: Option<KvState> = None;
            let mut written_since = 0;
            // The changes since the last capture, its log index, and the
            // model then.
            let mut next_ckpt: Option<(u64, Vec<u8>, Model)> = None;
            let keys = 1 + next(&mut seed) % 80;
            for round in 1..=rounds {
                for _ in 0..(next(&mut seed) % 12) {
                    let name = format!("p{}", next(&mut seed) % 3);
                    let mut w = WriteSet::default();
                    for _ in 0..(1 + next(&mut seed) % 4) {
                        let key = format!("k/{:03}", next(&mut seed) % keys);
                        let m = model.entry(name.clone()).or_default();
                        if next(&mut seed).is_multiple_of(3) {
                            w.delete(key.clone());
                            m.remove(&key);
                        } else {
                            // Now and then longer than a one-byte length.
                            let len = match next(&mut seed) % 10 {
                                0 => 100 + next(&mut seed) % 300,
                                _ => next(&mut seed) % 9,
                            };
                            let v = vec![(round % 251) as u8; len as usize];
                            w.set(key.clone(), v.clone());
                            m.insert(key, v);
                        }
                    }
                    written_since += w.len();
                    state.apply(&name, &w);
                }
                check(&state, &model, "live");
                match next(&mut seed) % 7 {
                    0 => {
                        // capture (maybe abandoning an earlier one)
                        state.freeze_at(Some(round));
                        pending = Some((state.clone(), model.clone(), round));
                    }
                    1 | 2 => {
                        if let Some((captured, then, at)) = pending.take() {
                            let file = write_map(&captured, dir.path(), at);
                            check(&file, &then, "file");
                            state.rebase(&captured, file);
                            disk = Some((at, then));
                            check(&state, &model, "rebased");
                        }
                    }
                    3 | 4 => {
                        // A checkpoint: the changes since the last one when
                        // the state is layered as it was then, else the
                        // changes since the base, as a node writes them.
                        let since = chained.as_ref().and_then(|earlier| state.changes_since(earlier));
                        match (since, &mut ckpt) {
                            (Some(changes), Some((_, _, deltas, cm))) => {
                                assert!(
                                    changes.len() <= written_since,
                                    "{} changes for {written_since} writes",
                                    changes.len()
                                );
                                deltas.push(postcard::to_allocvec(&changes).unwrap());
                                *cm = model.clone();
                                chained = Some(state.clone());
                            }
                            _ => {
                                chained = None;
                                if let Some(base) = state.checkpoint_base() {
                                    let body = postcard::to_allocvec(&Changes(&state)).unwrap();
                                    ckpt = Some((base, body, Vec::new(), model.clone()));
                                    chained = Some(state.clone());
                                }
                            }
                        }
                        // As a node writes to `checkpoint.next.bin`
                        // when the changes since the base are too many.
                        if let Some((at, changes)) = state.changes_since_capture() {
                            next_ckpt = Some((at, postcard::to_allocvec(&changes).unwrap(), model.clone()));
                        }
                        written_since = 0;
                        if let Some(earlier) = &chained {
                            assert!(state.changes_since(earlier).is_some_and(|c| c.is_empty()));
                        }
                    }
                    5 => {
                        // restart: open disk snapshot, apply checkpoint if it matches
                        if let (Some((at, body, then)), Some((written, _))) = (&next_ckpt, &disk)
                            && at == written
                        {
                            let mut opened = read_map(dir.path(), *at);
                            opened.apply_changes(postcard::from_bytes(body).unwrap());
                            check(&opened, then, "restarted from the changes since the capture");
                            next_checked += 1;
                        }
                        next_ckpt = None;
                        let (mut opened, mut m) = match &disk {
                            Some((at, then)) => (read_map(dir.path(), *at), then.clone()),
                            None => (KvState::default(), Model::new()),
                        };
                        if let Some((base, body, deltas, cm)) = &ckpt
                            && *base == disk.as_ref().map(|d| d.0)
                        {
                            let changes: ChangesImage = postcard::from_bytes(body).unwrap();
                            opened.apply_changes(changes);
                            for delta in deltas {
                                opened.apply_changes(postcard::from_bytes(delta).unwrap());
                            }
                            m = cm.clone();
                        }
                        check(&opened, &m, "restarted");
                        state = opened;
                        model = m;
                        pending = None;
                        chained = None;
                    }
                    _ => {}
                }
            }
        }
        assert!(next_checked > 0, "no restart found a snapshot its changes since a capture were relative to");
    }
}
