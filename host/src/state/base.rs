//! A namespace's entries as of a snapshot, read in place from that
//! snapshot's file (mapped read-only) rather than copied into memory.
//!
//! A snapshot encodes each namespace as a postcard sequence of `(key,
//! value)` records in key order (`len varint | key | len varint | value`),
//! back to back. Decoding a mapped snapshot (inside [`decode_mapped`])
//! checks every record as postcard parses it, but allocates nothing per
//! key: the namespace keeps the byte range of its records, and the offset
//! and a copy of the key of every [`STRIDE`]th one. A lookup is a binary
//! search over those keys in memory and a scan of at most `STRIDE` records;
//! iteration walks the records in order.
//!
//! So a node opens a snapshot of millions of keys in the time it takes to
//! parse it once (no allocation per key and no tree to build), and the keys
//! it holds cost it two offsets and one key per `STRIDE` keys of its own
//! memory (about 20 MB for 10M): the rest is page cache, which the kernel
//! keeps or drops as memory allows. The file
//! is never written in place (`snapshot.bin` is only ever replaced by a
//! rename; a received snapshot's file has no name), so the mapping stays
//! valid and unchanged while anything holds it.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::sync::Arc;

/// A snapshot file, mapped read-only.
pub type Mapping = Arc<memmap2::Mmap>;

/// Records between two indexed offsets.
const STRIDE: usize = 16;

thread_local! {
    /// The mapping being decoded on this thread, and the log index of the
    /// snapshot in it (see [`decode_mapped`]).
    static DECODING: RefCell<Option<(Mapping, Option<u64>)>> = const { RefCell::new(None) };
}

/// Run `decode` (a postcard decode of bytes inside `mapping`, the snapshot
/// at log index `origin`) with the namespaces it decodes left in place in
/// the mapping (a [`Base`] each) rather than copied into memory.
pub fn decode_mapped<T>(mapping: &Mapping, origin: Option<u64>, decode: impl FnOnce() -> T) -> T {
    struct Reset(Option<(Mapping, Option<u64>)>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let previous = self.0.take();
            DECODING.with(|d| *d.borrow_mut() = previous);
        }
    }
    let _reset = Reset(DECODING.with(|d| d.borrow_mut().replace((mapping.clone(), origin))));
    decode()
}

/// The mapping being decoded on this thread and its snapshot's log index,
/// if any.
pub(super) fn decoding() -> Option<(Mapping, Option<u64>)> {
    DECODING.with(|d| d.borrow().clone())
}

/// What a namespace encoding on this thread does with the runs of its
/// base's records that no later write changed (see [`writing_raw`]).
#[derive(Clone, Copy)]
enum Raw {
    /// Nothing: every record is encoded one by one.
    Off,
    /// Count their bytes ([`counting_raw`]).
    Count,
    /// Write them, as they are, to the `RefCell<&mut dyn Write>` at this
    /// address ([`writing_raw`]).
    Write(*const ()),
}

thread_local! {
    static RAW: Cell<Raw> = const { Cell::new(Raw::Off) };
    /// Bytes counted under [`Raw::Count`].
    static RAW_COUNTED: Cell<u64> = const { Cell::new(0) };
}

/// Puts the previous [`Raw`] mode back when a scope ends.
struct RawScope(Raw);

impl RawScope {
    fn enter(mode: Raw) -> RawScope {
        RawScope(RAW.with(|r| r.replace(mode)))
    }
}

impl Drop for RawScope {
    fn drop(&mut self) {
        RAW.with(|r| r.set(self.0));
    }
}

/// A writer onto the `RefCell` that [`writing_raw`] copies records into
/// too: what postcard writes to, so that its bytes and the copied runs
/// land in order.
pub struct Tap<'a, 'w>(pub &'a RefCell<&'w mut dyn Write>);

impl Write for Tap<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.borrow_mut().flush()
    }
}

/// Run `encode`, postcard's size count of a state (`serialized_size`),
/// with each namespace's runs of unchanged base records counted here
/// rather than encoded: `encode`'s result and the bytes of those runs,
/// which the state's encoded size is the sum of with it.
pub fn counting_raw<T>(encode: impl FnOnce() -> T) -> (T, u64) {
    let _scope = RawScope::enter(Raw::Count);
    let before = RAW_COUNTED.with(|c| c.replace(0));
    let out = encode();
    (out, RAW_COUNTED.with(|c| c.replace(before)))
}

/// Run `encode`, postcard writing a state to [`Tap`]`(out)`, with each
/// namespace's runs of base records that no later write changed copied to
/// `out` as they are (they are already the bytes a record-by-record
/// encoding writes: a base holds only records in that shortest encoding,
/// in key order; see [`Builder::push`]), rather than parsed and encoded
/// again one by one. A snapshot of 10M keys after a few thousand writes is
/// then a few thousand encoded records and long copies.
pub fn writing_raw<T>(out: &RefCell<&mut dyn Write>, encode: impl FnOnce() -> T) -> T {
    let _scope = RawScope::enter(Raw::Write((out as *const RefCell<&mut dyn Write>).cast()));
    encode()
}

/// True when a namespace encoding on this thread hands its unchanged runs
/// to [`copy_raw`].
pub(super) fn raw_active() -> bool {
    !matches!(RAW.with(Cell::get), Raw::Off)
}

/// Count or write `bytes`, a run of records (see [`writing_raw`]).
pub(super) fn copy_raw(bytes: &[u8]) -> std::io::Result<()> {
    match RAW.with(Cell::get) {
        Raw::Off => Err(std::io::Error::other("no raw copy in progress")),
        Raw::Count => {
            RAW_COUNTED.with(|c| c.set(c.get() + bytes.len() as u64));
            Ok(())
        }
        Raw::Write(at) => {
            // SAFETY: `at` is the `RefCell` `writing_raw` was given, which
            // outlives its scope, the only time the mode holds it; the
            // lifetimes the cast names are not the real ones, but nothing
            // keeps the reference past this call. The `RefCell` checks
            // that no write through `Tap` is under way.
            let out = unsafe { &*at.cast::<RefCell<&mut dyn Write>>() };
            out.borrow_mut().write_all(bytes)
        }
    }
}

/// Sorted records in a mapped snapshot: one namespace's entries.
pub(super) struct Base {
    mapping: Mapping,
    /// Log index of the snapshot the records are in.
    pub(super) origin: Option<u64>,
    /// Byte range of the records in the mapping.
    start: usize,
    end: usize,
    /// Every `STRIDE`th record, from the first: its offset, and where its
    /// key starts in `keys`.
    index: Vec<(usize, usize)>,
    /// The keys of the records in `index`, back to back: searched in
    /// memory, so a lookup touches the mapping only for the records it
    /// scans.
    keys: Vec<u8>,
    len: usize,
    bytes: u64,
}

impl std::fmt::Debug for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Base({} keys in {} bytes at {})", self.len, self.end - self.start, self.start)
    }
}

/// A postcard varint (LEB128, at most 10 bytes) at `at`: its value and the
/// offset after it.
fn varint(bytes: &[u8], at: usize) -> Option<(usize, usize)> {
    let mut value: u64 = 0;
    for i in 0..10 {
        let b = *bytes.get(at + i)?;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((usize::try_from(value).ok()?, at + i + 1));
        }
    }
    None
}

/// Bytes of the shortest postcard varint of `n` (how postcard writes it).
fn varint_len(n: usize) -> usize {
    let bits = usize::BITS - (n | 1).leading_zeros();
    bits.div_ceil(7) as usize
}

impl Base {
    /// The record at `at`: its key, its value, and the offset of the next.
    /// `None` only past the end (every record was checked when decoded).
    fn record(&self, at: usize) -> Option<(&[u8], &[u8], usize)> {
        if at >= self.end {
            return None;
        }
        let bytes: &[u8] = &self.mapping;
        let (klen, k) = varint(bytes, at)?;
        let key = bytes.get(k..k.checked_add(klen)?)?;
        let (vlen, v) = varint(bytes, k + klen)?;
        let value = bytes.get(v..v.checked_add(vlen)?)?;
        Some((key, value, v + vlen))
    }

    /// The key of the `i`th indexed record.
    fn indexed_key(&self, i: usize) -> &[u8] {
        let from = self.index.get(i).map_or(self.keys.len(), |&(_, k)| k);
        let to = self.index.get(i + 1).map_or(self.keys.len(), |&(_, k)| k);
        self.keys.get(from..to).unwrap_or_default()
    }

    /// Number of keys.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Key and value bytes held.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The offset of the record to scan from for keys `>= key`: the last
    /// indexed one below `key` (or the first).
    fn seek(&self, key: &[u8]) -> usize {
        // The first indexed record at or above `key`, by binary search.
        let (mut low, mut high) = (0, self.index.len());
        while low < high {
            let mid = low + (high - low) / 2;
            if self.indexed_key(mid) < key {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        self.index.get(low.saturating_sub(1)).map_or(self.end, |&(at, _)| at)
    }

    /// Offset of the first record.
    pub(super) fn start(&self) -> usize {
        self.start
    }

    /// Offset past the last record.
    pub(super) fn end(&self) -> usize {
        self.end
    }

    /// The records from offset `from` to `to`, as they are in the file.
    pub(super) fn raw(&self, from: usize, to: usize) -> &[u8] {
        self.mapping.get(from..to).unwrap_or_default()
    }

    /// The offset of the first record at or after offset `from` (a record's
    /// start) whose key is `>= key`, and whether its key is `key`.
    pub(super) fn find_from(&self, key: &[u8], from: usize) -> (usize, bool) {
        let mut at = self.seek(key).max(from);
        while let Some((k, _, next)) = self.record(at) {
            match k.cmp(key) {
                std::cmp::Ordering::Less => at = next,
                found => return (at, found == std::cmp::Ordering::Equal),
            }
        }
        (self.end, false)
    }

    /// [`Base::find_from`] for keys taken in ascending order: `from` is
    /// where the last one was found (or would be), so the record sought is
    /// usually a few records on. Those are scanned first — no binary search
    /// over the index — and past a stride it seeks as `find_from` does.
    /// Also the length of the value found.
    pub(super) fn find_near(&self, key: &[u8], from: usize) -> (usize, Option<usize>) {
        let mut at = from;
        for _ in 0..=STRIDE {
            let Some((k, v, next)) = self.record(at) else { return (self.end, None) };
            match k.cmp(key) {
                std::cmp::Ordering::Less => at = next,
                std::cmp::Ordering::Equal => return (at, Some(v.len())),
                std::cmp::Ordering::Greater => return (at, None),
            }
        }
        let (at, found) = self.find_from(key, at);
        (at, if found { self.record(at).map(|(_, v, _)| v.len()) } else { None })
    }

    /// The offset of the record after the one at `at`.
    pub(super) fn next_record(&self, at: usize) -> usize {
        self.record(at).map_or(self.end, |(_, _, next)| next)
    }

    /// The value at `key`.
    pub(super) fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let mut at = self.seek(key);
        for _ in 0..=STRIDE {
            let (k, v, next) = self.record(at)?;
            match k.cmp(key) {
                std::cmp::Ordering::Less => at = next,
                std::cmp::Ordering::Equal => return Some(v),
                std::cmp::Ordering::Greater => return None,
            }
        }
        None
    }

    /// Entries with keys `>= from`, in key order.
    pub(super) fn iter_from<'a>(&'a self, from: &'a [u8]) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let mut at = self.seek(from);
        std::iter::from_fn(move || {
            let (k, v, next) = self.record(at)?;
            at = next;
            Some((k, v))
        })
        .skip_while(move |(k, _)| *k < from)
    }
}

/// A [`Base`] being decoded, record by record as postcard parses them.
pub(super) struct Builder {
    base: Base,
    /// Offset and length of the last key taken.
    last_key: (usize, usize),
}

impl Builder {
    /// A builder for records in `mapping`, the snapshot at `origin`.
    pub(super) fn new((mapping, origin): (Mapping, Option<u64>)) -> Builder {
        let base = Base { mapping, origin, start: 0, end: 0, index: Vec::new(), keys: Vec::new(), len: 0, bytes: 0 };
        Builder { base, last_key: (0, 0) }
    }

    /// Take the next record, decoded as `key` and `value` borrowed from the
    /// mapping. `false` (and nothing taken) unless it lies in the mapping
    /// right after the previous one, as the shortest encoding of its
    /// lengths, with a key above the previous key: the records a snapshot
    /// writes. (Anything else is decoded into memory instead.)
    pub(super) fn push(&mut self, key: &[u8], value: &[u8]) -> bool {
        let b = &mut self.base;
        let map: &[u8] = &b.mapping;
        let origin = map.as_ptr() as usize;
        let (k, v) = ((key.as_ptr() as usize).wrapping_sub(origin), (value.as_ptr() as usize).wrapping_sub(origin));
        let Some(at) = k.checked_sub(varint_len(key.len())) else { return false };
        let in_map = k.checked_add(key.len()).is_some_and(|e| e <= map.len())
            && v.checked_add(value.len()).is_some_and(|e| e <= map.len());
        let contiguous = v == k + key.len() + varint_len(value.len()) && (b.len == 0 || at == b.end);
        if !in_map || !contiguous || varint(map, at) != Some((key.len(), k)) {
            return false;
        }
        if b.len > 0 {
            let previous = map.get(self.last_key.0..self.last_key.0 + self.last_key.1).unwrap_or_default();
            if previous >= key {
                return false;
            }
        } else {
            b.start = at;
        }
        if b.len.is_multiple_of(STRIDE) {
            b.index.push((at, b.keys.len()));
            b.keys.extend_from_slice(key);
        }
        b.end = v + value.len();
        self.last_key = (k, key.len());
        b.len += 1;
        b.bytes += (key.len() + value.len()) as u64;
        true
    }

    /// The records taken so far, copied out (when the rest cannot stay in
    /// place).
    pub(super) fn taken(&self) -> Vec<(&[u8], &[u8])> {
        self.base.iter_from(b"").collect()
    }

    /// The base, or `None` when no record was taken.
    pub(super) fn finish(self) -> Option<Base> {
        (self.base.len > 0).then_some(self.base)
    }
}
