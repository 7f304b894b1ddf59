//! One key and its value, as a namespace's tree holds it: a single heap
//! block shared, not copied, by every node that holds it.
//!
//! A namespace's writes since its last snapshot are a persistent B-tree
//! ([`super::kv::Namespace`]). While a snapshot or a checkpoint holds a
//! clone of the tree, a write copies the nodes on its path, and each
//! copied node clones every key it holds: the sixteen
//! entries of the leaf and the separator keys of each branch above it
//! (whole entries: the tree is a set of entries). With an entry that owned
//! its bytes (`Box<[u8]>`), one write during a snapshot of a 10M-key state
//! made about a hundred allocations and copies of whole keys and values,
//! which the snapshot thread freed again in a burst when it finished; the
//! copies were most of what a node held above its live data while writes
//! ran. Here a clone is a reference count increment, and the branches'
//! separators are the leaves' own entries.
//!
//! The block is `[references: u32 | key | value]` and the entry is a
//! pointer and both lengths (16 bytes in a tree node, as the boxed slice
//! was), so the heap holds no more per key than before.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering, fence};

/// Bytes of the reference count at the start of the block.
const COUNT: usize = std::mem::size_of::<AtomicU32>();

/// References at which a clone aborts the process (as `Arc` does) rather
/// than let the count wrap and free a block still in use. Unreachable in
/// practice: each reference is a tree node holding the entry.
const MAX_REFERENCES: u32 = u32::MAX / 2;

/// Set in `key_len` for a deletion: a key without a value, which hides the
/// key in the layers below it (see [`super::kv::Namespace`]).
const DELETED: u32 = 1 << 31;

/// A key and its value in one reference-counted block. Ordered, compared
/// and borrowed (`[u8]`) by key bytes, which for UTF-8 is the order of the
/// keys as strings.
pub(super) struct Entry {
    block: NonNull<u8>,
    key_len: u32,
    value_len: u32,
}

// SAFETY: the block's bytes are never written after `new` returns, and its
// reference count is atomic, so an entry may be sent to and shared between
// threads as `Arc<[u8]>` may.
unsafe impl Send for Entry {}
// SAFETY: as for `Send`.
unsafe impl Sync for Entry {}

impl Entry {
    /// A new entry holding copies of `key` and `value`, or `None` if the
    /// key is 2 GiB or more or the value 4 GiB or more. Neither a command
    /// (its memory is at most 256 MiB) nor a state that held it can make
    /// one that large; a damaged or crafted snapshot could, and is refused
    /// for it.
    pub(super) fn new(key: &str, value: &[u8]) -> Option<Entry> {
        let key_len = u32::try_from(key.len()).ok().filter(|&n| n < DELETED)?;
        let value_len = u32::try_from(value.len()).ok()?;
        let layout = Self::layout(key.len() + value.len())?;
        // SAFETY: the layout's size is at least `COUNT`, never zero.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(block) = NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
        // SAFETY: `block` is a fresh allocation of `COUNT + key + value`
        // bytes aligned for the count; the three writes fill it exactly.
        unsafe {
            block.as_ptr().cast::<AtomicU32>().write(AtomicU32::new(1));
            let data = block.as_ptr().add(COUNT);
            std::ptr::copy_nonoverlapping(key.as_ptr(), data, key.len());
            std::ptr::copy_nonoverlapping(value.as_ptr(), data.add(key.len()), value.len());
        }
        Some(Entry { block, key_len, value_len })
    }

    /// The deletion of `key` (no value), or `None` if the key is 2 GiB or
    /// more.
    pub(super) fn deletion(key: &str) -> Option<Entry> {
        let mut e = Entry::new(key, b"")?;
        e.key_len |= DELETED;
        Some(e)
    }

    /// True for a deletion ([`Entry::deletion`]).
    pub(super) fn is_deleted(&self) -> bool {
        self.key_len & DELETED != 0
    }

    fn klen(&self) -> usize {
        (self.key_len & !DELETED) as usize
    }

    /// The block's layout; `None` only past what the address space holds.
    fn layout(data_len: usize) -> Option<Layout> {
        Layout::from_size_align(COUNT.checked_add(data_len)?, std::mem::align_of::<AtomicU32>()).ok()
    }

    fn count(&self) -> &AtomicU32 {
        // SAFETY: the block starts with the count `new` wrote, and lives
        // while any entry pointing at it does.
        unsafe { &*self.block.as_ptr().cast::<AtomicU32>() }
    }

    /// Key and value bytes, back to back.
    fn data(&self) -> &[u8] {
        // SAFETY: `new` wrote `key_len + value_len` initialised bytes after
        // the count, never written again; the block outlives `&self`.
        unsafe { std::slice::from_raw_parts(self.block.as_ptr().add(COUNT), self.klen() + self.value_len as usize) }
    }

    pub(super) fn key_bytes(&self) -> &[u8] {
        &self.data()[..self.klen()]
    }

    /// Always valid: built from a `&str`.
    pub(super) fn key(&self) -> &str {
        std::str::from_utf8(self.key_bytes()).unwrap_or_default()
    }

    pub(super) fn value(&self) -> &[u8] {
        &self.data()[self.klen()..]
    }

    /// Key and value bytes: what the quota and the metrics count.
    pub(super) fn data_len(&self) -> u64 {
        self.klen() as u64 + u64::from(self.value_len)
    }
}

impl Clone for Entry {
    fn clone(&self) -> Entry {
        // Relaxed, as `Arc::clone`: a new reference is made from an
        // existing one, which keeps the block alive meanwhile.
        if self.count().fetch_add(1, Ordering::Relaxed) >= MAX_REFERENCES {
            std::process::abort();
        }
        Entry { block: self.block, key_len: self.key_len, value_len: self.value_len }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        // As `Arc::drop`: release this reference's use of the bytes, and
        // the last one acquires every other's before freeing.
        if self.count().fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        fence(Ordering::Acquire);
        // The layout `new` allocated the block with, so always `Some`.
        if let Some(layout) = Self::layout(self.klen() + self.value_len as usize) {
            // SAFETY: this was the last reference to a block `new`
            // allocated with this layout.
            unsafe { std::alloc::dealloc(self.block.as_ptr(), layout) }
        }
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.key_len == other.key_len && self.data() == other.data()
    }
}

impl Eq for Entry {}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key_bytes().cmp(other.key_bytes())
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::borrow::Borrow<[u8]> for Entry {
    fn borrow(&self) -> &[u8] {
        self.key_bytes()
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {} bytes", self.key(), self.value().len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_holds_its_key_and_value_and_compares_by_key() {
        for (k, v) in [("", &b""[..]), ("k", b""), ("", b"v"), ("key/1", b"some value"), ("é", &[0u8, 255, 7][..])] {
            let e = Entry::new(k, v).unwrap();
            assert_eq!((e.key(), e.value(), e.data_len()), (k, v, (k.len() + v.len()) as u64));
            let b: &[u8] = std::borrow::Borrow::borrow(&e);
            assert_eq!(b, k.as_bytes());
        }
        // Equal only with key and value equal; ordered by key alone.
        assert_eq!(Entry::new("a", b"1").unwrap(), Entry::new("a", b"1").unwrap());
        assert_ne!(Entry::new("a", b"1").unwrap(), Entry::new("a", b"2").unwrap());
        assert_ne!(Entry::new("ab", b"").unwrap(), Entry::new("a", b"b").unwrap());
        assert_eq!(Entry::new("a", b"2").unwrap().cmp(&Entry::new("a", b"1").unwrap()), std::cmp::Ordering::Equal);
        assert!(Entry::new("a", b"zz").unwrap() < Entry::new("b", b"").unwrap());
        assert!(Entry::new("a", b"").unwrap() < Entry::new("a/", b"").unwrap());
    }

    #[test]
    fn clones_share_one_block_until_the_last_is_dropped() {
        let e = Entry::new("key", b"value").unwrap();
        let clones: Vec<Entry> = (0..100).map(|_| e.clone()).collect();
        assert_eq!(e.count().load(Ordering::Relaxed), 101);
        assert!(clones.iter().all(|c| c.block == e.block && c.key() == "key" && c.value() == b"value"));
        drop(clones);
        assert_eq!(e.count().load(Ordering::Relaxed), 1);
        // Clones made and dropped on other threads, all at once: the block
        // is whole after, and freed once (a double free or a leak shows up
        // under the allocator's checks and sanitizers).
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        let c = e.clone();
                        assert_eq!(c.value(), b"value");
                    }
                });
            }
        });
        assert_eq!(e.count().load(Ordering::Relaxed), 1);
        let last = e.clone();
        drop(e);
        assert_eq!((last.key(), last.value()), ("key", &b"value"[..]));
    }

    #[test]
    fn an_entry_is_as_small_in_a_tree_node_as_a_boxed_slice() {
        assert_eq!(std::mem::size_of::<Entry>(), std::mem::size_of::<Box<[u8]>>());
    }
}
