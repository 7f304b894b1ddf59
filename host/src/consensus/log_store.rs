//! The Raft log, vote and committed index, on disk in `raft-log/` under the
//! node's data dir.
//!
//! In: openraft's log I/O calls. Out: entries and metadata that survive a
//! crash. The log is segment files written front to back, one `fdatasync`
//! per append call; openraft is told an append happened only after that
//! sync. A leader's own append is synced on a thread of its own: `append`
//! returns once the records are written (readable by replication), and the
//! sync thread completes openraft's callback when they are durable; the
//! leader's openraft (patched, see `vendor/openraft/SYNOD-PATCH.md`)
//! replicates in the meantime and counts its own vote only after the
//! callback. A follower's append is synced within `append`, since openraft
//! awaits it before anything else (it answers its leader only after). An
//! append waits for the previous append's sync before it writes, so at most
//! the last append is ever unsynced — the premise of the torn-tail rule
//! below. Segments are zero-filled to their full size before use (the next
//! one in the background), so an append overwrites allocated blocks and its
//! sync flushes data only, not the file size through the filesystem journal:
//! 97 µs against 135 µs per sync on this disk. The vote
//! and the last purged id are replaced atomically (write, fsync, rename,
//! fsync the directory) before the call returns. The committed id is a hint
//! openraft re-derives from a quorum, so it is replaced without an fsync.
//!
//! ```text
//! raft-log/seg-<seq>.log   records, in index order, across segments,
//!                          then zeros to the end of the file
//!          spare.tmp       the next segment, being zero-filled
//!          vote            len u32 LE | crc32 u32 LE | postcard(Vote)
//!          purged          len u32 LE | crc32 u32 LE | postcard(Option<LogId>)
//!          committed       len u32 LE | crc32 u32 LE | postcard(Option<LogId>)
//! record = len u32 LE | crc32 u32 LE | body
//! body   = term u64 LE | leader node u64 LE | index u64 LE | postcard(Entry)
//! ```
//!
//! On open every segment is scanned front to back and checked against its
//! CRCs; the scan of a segment stops at the first bytes that are not a whole
//! record (a zero frame is the normal end). What may follow there:
//!
//! - In any segment but the last: only zeros. Anything else is an error
//!   naming the file and offset.
//! - In the last segment: zeros, or a torn final append. An append is one
//!   write of whole records, front to back, and openraft hears of it only
//!   after its sync, so a crash in the middle of one leaves a partial record
//!   and zeros after the last acknowledged record; that tail is zeroed, with
//!   a warning. But if a whole record (a CRC match on a body that continues
//!   the log) lies anywhere after the bad bytes, they are not a torn tail:
//!   an acknowledged record was damaged, or the disk reordered writes.
//!   Opening then refuses, naming the file and the offset of the damaged
//!   record, rather than cut acknowledged entries away. (A power cut during
//!   an append of several records, on a disk that persists its pages out of
//!   order, can look the same; it too is refused, since from the bytes alone
//!   it cannot be told from lost acknowledged data.)
//!
//! Entries read back are checked again: each record's CRC, and that its log
//! id is the one the scan found there; a mismatch is a read error naming the
//! file and offset, never an entry with the wrong contents.
//!
//! `vote` and `purged` are framed like a record. They are only ever replaced
//! whole by a rename, so they are never torn: a file that is there but empty,
//! cut short, longer than its frame or off its CRC is an error naming it. A
//! missing file means none (no vote yet, nothing purged). A damaged
//! `committed` only makes the hint unknown.
//!
//! Past the last record there are only zeros (truncation zeroes what it
//! removes), so no stale record can ever be read back as a new one.
//! Truncation removes later segments before it shortens the one it ends in,
//! and purging records the purged id before it deletes segments, so a crash
//! between steps always leaves a log without holes.
//!
//! Why not an embedded database: a redb transaction per append cost about
//! 340 µs (several page writes and syncs) against 140 µs for one append and
//! `fdatasync` on this disk, and at one request in flight the leader and a
//! follower each pay it in series. openraft 0.9 awaits each append's flush
//! in its core loop (`RaftCore::append_to_log`), so the cost of one sync is
//! what a write waits for; the patch makes that the larger of the leader's
//! and a follower's sync instead of their sum.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind};
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{CommittedLeaderId, Entry, LogId, OptionalSend, StorageError, StorageIOError, Vote};

use super::types::{NodeId, TypeConfig};

/// Size of a segment file (a larger append gets a segment of its own size).
const SEGMENT_BYTES: u64 = 16 << 20;
/// `len` and `crc` before each record's body.
const FRAME: usize = 8;
/// The log id at the start of each body.
const LOG_ID: usize = 24;

type Result<T> = std::result::Result<T, StorageError<NodeId>>;

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}

fn corrupt(msg: String) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, msg)
}

/// Damage found on open: what to do about it, since the node cannot.
fn refuse(msg: String) -> io::Error {
    corrupt(format!("{msg}; refusing to start (restore this node's data dir or remove the node and re-add it)"))
}

/// Where one entry's record lies.
#[derive(Clone, Copy)]
struct Slot {
    log_id: LogId<NodeId>,
    /// Segment sequence number.
    seg: u64,
    /// Offset of the record (its frame) in the segment.
    offset: u64,
    /// Length of the record's body.
    len: u32,
}

struct Segment {
    file: File,
    /// Bytes of whole records; zeros follow to `size`.
    len: u64,
    /// Size of the file.
    size: u64,
}

struct Inner {
    dir: PathBuf,
    /// By sequence number; never empty once open.
    segments: BTreeMap<u64, Segment>,
    /// The entries present, in index order without holes.
    slots: VecDeque<Slot>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    /// Overwritten in place with each committed id (see [`Inner::save_committed`]).
    committed_file: File,
    purged: Option<LogId<NodeId>>,
    /// Size of new segment files.
    segment_bytes: u64,
    /// The next segment, being zero-filled in the background.
    spare: Option<std::thread::JoinHandle<io::Result<()>>>,
}

/// The log store; clones share one log.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
    /// Appends to sync, in order, for the sync thread ([`sync_loop`]).
    syncs: std::sync::mpsc::Sender<Pending>,
    /// How many appends have been handed to the sync thread.
    written: Arc<std::sync::atomic::AtomicU64>,
    /// How many of them are synced (`u64::MAX` once a sync failed: every
    /// later append then fails too).
    synced: Arc<tokio::sync::watch::Sender<u64>>,
}

/// One append whose records are written and wait for their sync.
struct Pending {
    file: File,
    callback: LogFlushed<TypeConfig>,
    started: std::time::Instant,
}

/// Sync one append's segment and time it: every sync of the log is made
/// here (the sync thread, a follower's append, an offline append).
fn sync_append(file: &File, started: std::time::Instant) -> io::Result<()> {
    crate::faults::hold_log_sync();
    let m = crate::metrics::get();
    let syncing = std::time::Instant::now();
    file.sync_data().map_err(|e| io::Error::new(e.kind(), format!("raft log sync failed: {e}")))?;
    let took = syncing.elapsed();
    m.log_fsync_seconds.observe(took.as_secs_f64());
    if took >= crate::metrics::SLOW {
        // Every write this node acknowledges waited for it (etcd's "slow
        // fdatasync"): the disk is shared with something heavier.
        tracing::warn!(ms = took.as_millis() as u64, "raft log sync was slow");
    }
    m.log_append_seconds.observe(started.elapsed().as_secs_f64());
    Ok(())
}

/// What every append after a failed sync is told.
const EARLIER_SYNC_FAILED: &str = "an earlier raft log sync failed; the log takes no more appends";

/// The sync thread: sync each append's segment in order, then tell
/// openraft. After a failed sync nothing is retried (the pages it failed to
/// write may be gone from the cache, so a later sync could succeed and lie,
/// as PostgreSQL's "fsyncgate" showed): `synced` stays at `u64::MAX` and
/// every append after it fails too.
fn sync_loop(appends: std::sync::mpsc::Receiver<Pending>, synced: Arc<tokio::sync::watch::Sender<u64>>) {
    while let Ok(p) = appends.recv() {
        let result = match *synced.borrow() {
            u64::MAX => Err(io::Error::other(EARLIER_SYNC_FAILED)),
            _ => sync_append(&p.file, p.started),
        };
        match result {
            Ok(()) => {
                synced.send_modify(|n| *n = n.saturating_add(1));
                p.callback.log_io_completed(Ok(()));
            }
            Err(e) => {
                synced.send_replace(u64::MAX);
                p.callback.log_io_completed(Err(e));
            }
        }
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("seg-{seq:020}.log"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replace `name` in `dir` with `bytes`: write a temporary file and rename
/// it over, so a reader sees the old or the new value, never a mix; both
/// the file and the rename are on disk when this returns.
fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let file = File::create(&tmp)?;
    file.write_all_at(bytes, 0)?;
    file.sync_data()?;
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Write zeros over `[from, to)` of `file`.
fn zero(file: &File, from: u64, to: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(to.saturating_sub(from)) as usize];
    let mut at = from;
    while at < to {
        let n = CHUNK.min(to - at) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Create `path` as `size` bytes of zeros, on disk.
fn zero_filled(path: &Path, size: u64) -> io::Result<File> {
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
    zero(&file, 0, size)?;
    file.sync_all()?;
    Ok(file)
}

/// `value` as one frame: `len | crc | postcard(value)`.
fn framed<T: serde::Serialize>(value: &T) -> io::Result<Vec<u8>> {
    let mut buf = postcard::to_extend(value, vec![0; FRAME]).map_err(io::Error::other)?;
    seal_frame(&mut buf, 0)?;
    Ok(buf)
}

/// The value framed in `name` (see [`framed`]), or `None` when there is no
/// such file. The file is only ever replaced whole by a rename, so anything
/// but one whole frame that matches its CRC is damage, not a torn write.
fn read_value<T: serde::de::DeserializeOwned>(dir: &Path, name: &str) -> io::Result<Option<T>> {
    let path = dir.join(name);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let body = frame_body(&bytes, 0).filter(|body| FRAME + body.len() == bytes.len()).ok_or_else(|| {
        refuse(format!("{}: damaged ({} bytes that are not one frame matching its CRC)", path.display(), bytes.len()))
    })?;
    postcard::from_bytes(body).map(Some).map_err(|e| refuse(format!("{}: damaged ({e})", path.display())))
}

/// The committed-id hint, or `None` when missing or damaged.
fn read_committed(mut file: &File) -> Option<LogId<NodeId>> {
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).ok()?;
    postcard::from_bytes::<Option<LogId<NodeId>>>(frame_body(&bytes, 0)?).ok().flatten()
}

/// Fill in the frame (`len`, `crc`) at `start` of `buf` for the body that
/// follows it to the end; returns the body length.
fn seal_frame(buf: &mut [u8], start: usize) -> io::Result<u32> {
    let body = &buf[start + FRAME..];
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("log record larger than 4 GiB"))?;
    let crc = crc32fast::hash(body);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(len)
}

/// The body of the whole frame at `at` whose CRC matches, if there is one.
fn frame_body(bytes: &[u8], at: usize) -> Option<&[u8]> {
    let head = bytes.get(at..at + FRAME)?;
    let body = bytes.get(at + FRAME..at + FRAME + u32_at(head, 0) as usize)?;
    (crc32fast::hash(body) == u32_at(head, 4)).then_some(body)
}

/// Append one entry's record to `buf`; returns the body length.
fn encode(entry: &Entry<TypeConfig>, buf: &mut Vec<u8>) -> io::Result<u32> {
    let start = buf.len();
    buf.extend_from_slice(&[0; FRAME]);
    buf.extend_from_slice(&entry.log_id.leader_id.term.to_le_bytes());
    buf.extend_from_slice(&entry.log_id.leader_id.node_id.to_le_bytes());
    buf.extend_from_slice(&entry.log_id.index.to_le_bytes());
    *buf = postcard::to_extend(entry, std::mem::take(buf)).map_err(io::Error::other)?;
    seal_frame(buf, start)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

/// The log id of a record's body.
fn body_log_id(body: &[u8]) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(u64_at(body, 0), u64_at(body, 8)), u64_at(body, 16))
}

/// Scan one segment's bytes: the records that are whole and match their
/// CRC, as (offset, body length, log id), and where they end.
fn scan(bytes: &[u8]) -> (Vec<(u64, u32, LogId<NodeId>)>, usize) {
    let mut records = Vec::new();
    let mut at = 0usize;
    // A zero-filled frame has an empty body (whose CRC is 0): the end.
    while let Some(body) = frame_body(bytes, at).filter(|b| b.len() >= LOG_ID) {
        records.push((at as u64, body.len() as u32, body_log_id(body)));
        at += FRAME + body.len();
    }
    (records, at)
}

/// The offset of the first whole record after the bad bytes at `end` of a
/// segment, if there is one: the sign that those bytes are not a torn final
/// append. `last` is the last whole record before them in the log, if any.
///
/// Records start at any byte offset (they are not padded), so every offset
/// after `end` is tried, not only aligned ones; a damaged length field
/// cannot hide the records behind it. A record there that belongs to this
/// log continues it: its index is past `last`'s, by at most one per
/// `FRAME + LOG_ID` bytes (the smallest record) between `end` and it, and
/// its term is no lower. Those tests come before the CRC, so a tail of
/// garbage or of a large torn body costs one pass over the bytes, not a CRC
/// over megabytes at each of millions of offsets. (With no whole record
/// before the damage there is nothing to continue, and only the length
/// test comes first.) A match also needs the CRC over a plausible length (a
/// body at least a log id long, inside the file), so random bytes pass with
/// odds of about 2^-32 per candidate.
fn record_after(bytes: &[u8], end: usize, last: Option<LogId<NodeId>>) -> Option<usize> {
    let min = FRAME + LOG_ID;
    (end + 1..(bytes.len() + 1).saturating_sub(min)).find(|&at| {
        let len = u32_at(bytes, at) as usize;
        if len < LOG_ID || bytes.len() - at - FRAME < len {
            return false;
        }
        let id = body_log_id(&bytes[at + FRAME..]);
        let continues = last.is_none_or(|last| {
            let most = last.index.saturating_add(1 + ((at - end) / min) as u64);
            last.index < id.index && id.index <= most && last.leader_id.term <= id.leader_id.term
        });
        continues && frame_body(bytes, at).is_some()
    })
}

impl Inner {
    fn open(dir: PathBuf, segment_bytes: u64) -> io::Result<Inner> {
        std::fs::create_dir_all(&dir)?;
        match std::fs::remove_file(dir.join("spare.tmp")) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let vote = read_value(&dir, "vote")?;
        let purged: Option<LogId<NodeId>> = read_value::<Option<LogId<NodeId>>>(&dir, "purged")?.flatten();
        let committed_file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join("committed"))?;
        let committed = read_committed(&committed_file);
        let mut seqs = Vec::new();
        for item in std::fs::read_dir(&dir)? {
            let name = item?.file_name();
            let name = name.to_string_lossy();
            if let Some(seq) = name.strip_prefix("seg-").and_then(|s| s.strip_suffix(".log")) {
                seqs.push(seq.parse::<u64>().map_err(|_| corrupt(format!("unexpected file {name}")))?);
            }
        }
        seqs.sort_unstable();
        let mut inner = Inner {
            dir,
            segments: BTreeMap::new(),
            slots: VecDeque::new(),
            vote,
            committed,
            committed_file,
            purged,
            segment_bytes,
            spare: None,
        };
        let purged_index = purged.map(|p| p.index);
        // The last whole record scanned, purged or not.
        let mut last_seen: Option<LogId<NodeId>> = None;
        for (n, &seq) in seqs.iter().enumerate() {
            let path = segment_path(&inner.dir, seq);
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let bytes = std::fs::read(&path)?;
            let (records, end) = scan(&bytes);
            let last = n + 1 == seqs.len();
            let clean = if last {
                bytes[end..].iter().all(|b| *b == 0)
            } else {
                bytes.get(end..end + FRAME).is_none_or(|f| f.iter().all(|b| *b == 0))
            };
            if !clean {
                if !last {
                    return Err(refuse(format!("{}: damaged record at offset {end}", path.display())));
                }
                let before = records.last().map(|r| r.2).or(last_seen);
                if let Some(next) = record_after(&bytes, end, before) {
                    return Err(refuse(format!(
                        "{}: damaged record at offset {end} is followed by valid records (the next at offset {next})",
                        path.display()
                    )));
                }
                // The tail of the last segment, with no whole record after
                // it: an append that crashed before its sync returned, so
                // nobody was told it happened.
                tracing::warn!(segment = %path.display(), offset = end, "zeroing a torn append at the end of the raft log");
                zero(&file, end as u64, bytes.len() as u64)?;
                file.sync_data()?;
            }
            last_seen = records.last().map(|r| r.2).or(last_seen);
            for (offset, len, log_id) in records {
                if purged_index.is_some_and(|p| log_id.index <= p) {
                    continue;
                }
                if let Some(last) = inner.slots.back()
                    && log_id.index != last.log_id.index + 1
                {
                    return Err(corrupt(format!(
                        "{}: entry {} follows entry {}",
                        path.display(),
                        log_id.index,
                        last.log_id.index
                    )));
                }
                inner.slots.push_back(Slot { log_id, seg: seq, offset, len });
            }
            inner.segments.insert(seq, Segment { file, len: end as u64, size: bytes.len() as u64 });
        }
        if inner.segments.is_empty() {
            inner.new_segment(0, 0)?;
        }
        // The committed hint is written unsynced when the leader commits,
        // which may be before the leader's own copy is synced (its
        // followers' syncs make a quorum). After a power loss it can name
        // an entry this log lost with that sync: drop it, since openraft
        // would replay up to it, and re-derives it from a quorum anyway.
        if let Some(hint) = inner.committed
            && purged.is_none_or(|p| hint.index > p.index)
            && !inner.holds(hint)
        {
            tracing::warn!(committed = %hint, last = ?inner.last_log_id(), "the raft log does not hold the entry its committed hint names (lost unsynced at a power cut); the hint is dropped");
            inner.committed = None;
        }
        Ok(inner)
    }

    /// Whether `log_id` is in the log.
    fn holds(&self, log_id: LogId<NodeId>) -> bool {
        let at = self.position(log_id.index);
        self.slots.get(at).is_some_and(|s| s.log_id == log_id)
    }

    /// Start segment `seq`, big enough for `need` bytes: the spare when it
    /// fits, else zero-filled here.
    fn new_segment(&mut self, seq: u64, need: u64) -> io::Result<()> {
        let path = segment_path(&self.dir, seq);
        let size = self.segment_bytes.max(need);
        let spare = match self.spare.take() {
            Some(handle) => handle.join().map_err(|_| io::Error::other("spare segment thread panicked"))?.is_ok(),
            None => false,
        };
        let file = if spare && size == self.segment_bytes {
            std::fs::rename(self.dir.join("spare.tmp"), &path)?;
            OpenOptions::new().read(true).write(true).open(&path)?
        } else {
            zero_filled(&path, size)?
        };
        sync_dir(&self.dir)?;
        self.segments.insert(seq, Segment { file, len: 0, size });
        Ok(())
    }

    /// Once the last segment is half full, zero-fill the next one in the
    /// background so the roll does not wait for it.
    fn prepare_spare(&mut self) {
        let half = self.segments.get(&self.last_seq()).is_some_and(|s| s.len * 2 >= s.size);
        if half && self.spare.is_none() {
            let (path, size) = (self.dir.join("spare.tmp"), self.segment_bytes);
            self.spare = Some(std::thread::spawn(move || zero_filled(&path, size).map(drop)));
        }
    }

    fn last_seq(&self) -> u64 {
        self.segments.keys().next_back().copied().unwrap_or(0)
    }

    fn last_log_id(&self) -> Option<LogId<NodeId>> {
        self.slots.back().map(|s| s.log_id).or(self.purged)
    }

    /// Position in `slots` of `index`, clamped to `[0, len]`.
    fn position(&self, index: u64) -> usize {
        match self.slots.front() {
            None => 0,
            Some(first) => (index.saturating_sub(first.log_id.index) as usize).min(self.slots.len()),
        }
    }

    /// Write the entries' records at the end of the log; not yet synced.
    /// Returns the file to sync.
    fn write(&mut self, entries: impl IntoIterator<Item = Entry<TypeConfig>>) -> io::Result<File> {
        let mut buf = Vec::new();
        let mut slots = Vec::new();
        let mut next = self.slots.back().map(|s| s.log_id.index + 1);
        for entry in entries {
            let index = entry.log_id.index;
            // An empty log takes any index: openraft starts it after a
            // snapshot or a purge.
            if let Some(n) = next
                && n != index
            {
                let last = n - 1;
                return Err(io::Error::other(format!("append of entry {index} after entry {last} would leave a hole")));
            }
            let offset = buf.len() as u64;
            let len = encode(&entry, &mut buf)?;
            slots.push(Slot { log_id: entry.log_id, seg: 0, offset, len });
            next = Some(index + 1);
        }
        let need = buf.len() as u64;
        if self.segments.get(&self.last_seq()).is_none_or(|s| s.len + need > s.size) {
            self.new_segment(self.last_seq() + 1, need)?;
        }
        let seq = self.last_seq();
        let segment = self.segments.get_mut(&seq).ok_or_else(|| io::Error::other("no log segment"))?;
        let start = segment.len;
        if let Err(e) = segment.file.write_all_at(&buf, start) {
            // Leave no partial record behind for the next append to follow.
            let _ = zero(&segment.file, start, start + need);
            return Err(e);
        }
        segment.len = start + need;
        let file = segment.file.try_clone();
        self.slots.extend(slots.into_iter().map(|s| Slot { seg: seq, offset: start + s.offset, ..s }));
        self.prepare_spare();
        file
    }

    /// The records (frame and body) of the entries in `range`, each checked
    /// against its CRC and against the log id its slot says it holds.
    fn read(&self, start: Bound<u64>, end: Bound<u64>) -> io::Result<Vec<Vec<u8>>> {
        let from = match start {
            Bound::Included(x) => self.position(x),
            Bound::Excluded(x) => self.position(x.saturating_add(1)),
            Bound::Unbounded => 0,
        };
        let to = match end {
            Bound::Included(x) => self.position(x.saturating_add(1)),
            Bound::Excluded(x) => self.position(x),
            Bound::Unbounded => self.slots.len(),
        };
        let mut records = Vec::with_capacity(to.saturating_sub(from));
        for slot in self.slots.range(from..to.max(from)) {
            let segment = self.segments.get(&slot.seg).ok_or_else(|| io::Error::other("log segment missing"))?;
            let mut record = vec![0u8; FRAME + slot.len as usize];
            segment.file.read_exact_at(&mut record, slot.offset)?;
            let body = frame_body(&record, 0).filter(|b| b.len() + FRAME == record.len());
            if body.is_none_or(|b| body_log_id(b) != slot.log_id) {
                return Err(corrupt(format!(
                    "{}: damaged record at offset {} (entry {})",
                    segment_path(&self.dir, slot.seg).display(),
                    slot.offset,
                    slot.log_id.index
                )));
            }
            records.push(record);
        }
        Ok(records)
    }

    /// Remove entries from `index` on, newest segment first.
    fn truncate(&mut self, index: u64) -> io::Result<()> {
        let at = self.position(index);
        let Some(cut) = self.slots.get(at).copied() else {
            return Ok(());
        };
        let later: Vec<u64> = self.segments.range(cut.seg + 1..).map(|(seq, _)| *seq).rev().collect();
        for seq in later {
            std::fs::remove_file(segment_path(&self.dir, seq))?;
            self.segments.remove(&seq);
        }
        sync_dir(&self.dir)?;
        let segment = self.segments.get_mut(&cut.seg).ok_or_else(|| io::Error::other("log segment missing"))?;
        zero(&segment.file, cut.offset, segment.len)?;
        segment.file.sync_data()?;
        segment.len = cut.offset;
        self.slots.truncate(at);
        Ok(())
    }

    /// Overwrite the committed id in place, unsynced: one small `pwrite`
    /// per commit. It is a hint (openraft re-derives it from a quorum), so
    /// a torn or lost write only makes it unknown after a crash.
    fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> io::Result<()> {
        self.committed_file.write_all_at(&framed(&committed)?, 0)?;
        self.committed = committed;
        crate::metrics::set(&crate::metrics::get().raft_commit_index, committed.map_or(0, |c| c.index));
        Ok(())
    }

    /// Record `log_id` as purged, then drop what it covers.
    fn purge(&mut self, log_id: LogId<NodeId>) -> io::Result<()> {
        replace_file(&self.dir, "purged", &framed(&Some(log_id))?)?;
        self.purged = Some(log_id);
        let at = self.position(log_id.index.saturating_add(1));
        self.slots.drain(..at);
        // Segments before the one holding the first kept entry hold only
        // purged entries; the last segment stays, it takes the appends.
        let keep_from = self.slots.front().map_or(self.last_seq(), |s| s.seg);
        let drop: Vec<u64> = self.segments.range(..keep_from).map(|(seq, _)| *seq).collect();
        for seq in &drop {
            std::fs::remove_file(segment_path(&self.dir, *seq))?;
            self.segments.remove(seq);
        }
        if !drop.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

impl LogStore {
    /// Open (or create) the log in `dir`/raft-log.
    pub fn open(dir: &Path) -> io::Result<LogStore> {
        if dir.join("raft-log.redb").exists() {
            return Err(io::Error::other(format!(
                "{} holds a raft log from an earlier development build (raft-log.redb); this version keeps the log in raft-log/ and cannot read it: start this node from an empty data dir",
                dir.display()
            )));
        }
        LogStore::open_sized(dir, SEGMENT_BYTES)
    }

    fn open_sized(dir: &Path, segment_bytes: u64) -> io::Result<LogStore> {
        let inner = Inner::open(dir.join("raft-log"), segment_bytes)?;
        let (syncs, appends) = std::sync::mpsc::channel();
        let synced = Arc::new(tokio::sync::watch::Sender::new(0));
        let to_thread = synced.clone();
        std::thread::Builder::new().name("raft-log-sync".into()).spawn(move || sync_loop(appends, to_thread))?;
        Ok(LogStore {
            inner: Arc::new(Mutex::new(inner)),
            syncs,
            written: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            synced,
        })
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, Inner>> {
        self.inner.lock().map_err(|_| io::Error::other("raft log lock poisoned"))
    }

    /// Never lead again the term this node led before it stopped: if the
    /// saved vote is this node's own, won (committed), move to the next
    /// term, voted for itself and not won, before openraft reads it.
    ///
    /// A leader sends its entries to the followers while its own fsync
    /// runs, so a power loss can take from its log an entry a follower
    /// already holds. openraft restores a node whose saved vote is its own
    /// won one as leader of that term at once; it then appends new entries
    /// at the lost indices under the same term, and a follower that finds
    /// that (term, index) in its log keeps its own entry and applies it:
    /// a command the others never applied. In a later term every entry
    /// the node appends has a new id, and a follower's stale one at that
    /// index conflicts and is replaced, as Raft requires. (A node may
    /// always move to a later term; it has voted for no one else there.)
    /// Returns the term it moved to, if it moved.
    pub fn step_down_after_restart(&self, id: NodeId) -> io::Result<Option<u64>> {
        let mut inner = self.lock()?;
        let Some(vote) = inner.vote else { return Ok(None) };
        if !vote.is_committed() || vote.leader_id().voted_for() != Some(id) {
            return Ok(None);
        }
        let next = Vote::new(vote.leader_id().get_term() + 1, id);
        replace_file(&inner.dir, "vote", &framed(&next)?)?;
        inner.vote = Some(next);
        Ok(Some(next.leader_id().get_term()))
    }

    /// The term of the saved vote and the index of the last entry: where
    /// this node stands as it starts, before openraft takes the log.
    pub fn resume_point(&self) -> io::Result<(u64, u64)> {
        let inner = self.lock()?;
        Ok((inner.vote.map_or(0, |v| v.leader_id().term), inner.last_log_id().map_or(0, |l| l.index)))
    }

    /// Append `entries` and sync them, outside openraft (offline recovery:
    /// [`crate::recover`]).
    pub fn append_offline(&self, entries: Vec<Entry<TypeConfig>>) -> Result<()> {
        self.write_entries(entries)
    }

    /// Write entries and sync them: one `fdatasync` for the whole batch
    /// openraft hands over. The lock is not held during the sync, so
    /// readers (replication) are not held up by it.
    fn write_entries(&self, entries: impl IntoIterator<Item = Entry<TypeConfig>>) -> Result<()> {
        let started = std::time::Instant::now();
        let file = self.lock().and_then(|mut inner| inner.write(entries)).map_err(write_err)?;
        sync_append(&file, started).map_err(write_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let records = self
            .lock()
            .and_then(|inner| inner.read(range.start_bound().cloned(), range.end_bound().cloned()))
            .map_err(read_err)?;
        records.iter().map(|r| postcard::from_bytes(&r[FRAME + LOG_ID..]).map_err(read_err)).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let inner = self.lock().map_err(read_err)?;
        Ok(LogState { last_purged_log_id: inner.purged, last_log_id: inner.last_log_id() })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<()> {
        let vote_err = |e: io::Error| StorageError::from(StorageIOError::write_vote(&e));
        let mut inner = self.lock().map_err(vote_err)?;
        let bytes = framed(vote).map_err(vote_err)?;
        replace_file(&inner.dir, "vote", &bytes).map_err(vote_err)?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>> {
        Ok(self.lock().map_err(read_err)?.vote)
    }

    /// The committed id is a hint openraft can re-derive after a restart
    /// (from a quorum), so it is not fsynced: one sync per write saved on
    /// every node. After a power loss it may be older than what was
    /// committed; a leader must then not read from it before its term's
    /// first entry commits (a restarted node never resumes the term it led:
    /// [`LogStore::step_down_after_restart`]; see also
    /// `NodeInner::read_index_local`).
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<()> {
        self.lock().and_then(|mut inner| inner.save_committed(committed)).map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>> {
        Ok(self.lock().map_err(read_err)?.committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        use std::sync::atomic::Ordering;
        let started = std::time::Instant::now();
        // At most one append unsynced: wait for the previous one's sync.
        let before = self.written.load(Ordering::Acquire);
        let mut synced = self.synced.subscribe();
        let waited = synced.wait_for(|n| *n >= before).await.map(|n| *n);
        let written = match waited {
            Ok(u64::MAX) => Err(io::Error::other(EARLIER_SYNC_FAILED)),
            Ok(_) => self.lock().and_then(|mut inner| inner.write(entries)),
            Err(_) => Err(io::Error::other("the raft log's sync thread is gone")),
        };
        let file = match written {
            Ok(file) => file,
            Err(e) => {
                callback.log_io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                return Err(write_err(e));
            }
        };
        if !callback.awaited_in_background() {
            // A follower's append: openraft awaits it before anything else,
            // so sync it here rather than hand it to the thread and back.
            return match sync_append(&file, started) {
                Ok(()) => {
                    callback.log_io_completed(Ok(()));
                    Ok(())
                }
                Err(e) => {
                    self.synced.send_replace(u64::MAX);
                    callback.log_io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                    Err(write_err(e))
                }
            };
        }
        self.written.fetch_add(1, Ordering::AcqRel);
        if let Err(std::sync::mpsc::SendError(p)) = self.syncs.send(Pending { file, callback, started }) {
            let e = io::Error::other("the raft log's sync thread is gone");
            p.callback.log_io_completed(Err(io::Error::other(e.to_string())));
            return Err(write_err(e));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        self.lock().and_then(|mut inner| inner.truncate(log_id.index)).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        let started = std::time::Instant::now();
        let purged = self.lock().and_then(|mut inner| inner.purge(log_id)).map_err(write_err);
        // openraft awaits this in its core loop: nothing else of Raft moves
        // on this node meanwhile.
        tracing::debug!(index = log_id.index, seconds = started.elapsed().as_secs_f64(), "raft log purged");
        purged
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::testing::{StoreBuilder, Suite};

    use super::*;
    use crate::artifacts::Artifacts;
    use crate::consensus::state_machine::{NoBlobSource, StateMachineStore};
    use crate::runtime::Runtime;

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore)> {
            let dir = tempfile::tempdir().map_err(write_err)?;
            // Small segments: the suite opens a store per test.
            let log = LogStore::open_sized(dir.path(), 64 << 10).map_err(write_err)?;
            let runtime = Arc::new(Runtime::new().map_err(write_err)?);
            let artifacts = Arc::new(Artifacts::open(&dir.path().join("plugins"), runtime).map_err(write_err)?);
            let sm = StateMachineStore::open(dir.path(), artifacts, Arc::new(NoBlobSource))?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's own conformance suite for log and state machine storage.
    #[test]
    fn openraft_suite() {
        Suite::test_all(Builder).unwrap();
    }

    /// What the suite cannot see: that appended entries, the vote and the
    /// committed id are on disk when the calls return — read back through a
    /// fresh open of the same file.
    #[tokio::test]
    async fn survives_reopen() {
        use openraft::{CommittedLeaderId, EntryPayload};
        let dir = tempfile::tempdir().unwrap();
        let vote = Vote::new(3, 1);
        let entry = |i| Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(3, 1), i),
            payload: EntryPayload::Blank,
        };
        {
            let mut log = LogStore::open(dir.path()).unwrap();
            log.save_vote(&vote).await.unwrap();
            log.write_entries((1..=5).map(entry)).unwrap();
            log.save_committed(Some(entry(4).log_id)).await.unwrap();
            log.purge(entry(2).log_id).await.unwrap();
            log.truncate(entry(5).log_id).await.unwrap();
        }
        let mut log = LogStore::open(dir.path()).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        assert_eq!(log.read_committed().await.unwrap(), Some(entry(4).log_id));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(entry(2).log_id));
        assert_eq!(state.last_log_id, Some(entry(4).log_id));
        let got: Vec<u64> = log.try_get_log_entries(0..100).await.unwrap().iter().map(|e| e.log_id.index).collect();
        assert_eq!(got, [3, 4]);
    }

    /// A leader commits once its followers have synced an entry, maybe
    /// before its own sync: after a power cut its committed hint can name
    /// an entry its log lost. Opening must not hand openraft that hint (it
    /// would replay up to it and fail to start).
    #[tokio::test]
    async fn a_committed_hint_past_the_log_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = LogStore::open(dir.path()).unwrap();
            log.write_entries((1..=5).map(blank)).unwrap();
            // Entries 6..=8 were written unsynced and lost; the hint naming
            // 7 reached the disk.
            log.save_committed(Some(blank(7).log_id)).await.unwrap();
        }
        let mut log = LogStore::open(dir.path()).unwrap();
        assert_eq!(log.read_committed().await.unwrap(), None);
        assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(blank(5).log_id));

        // A hint naming an entry the log holds, or one purged, stays.
        log.save_committed(Some(blank(4).log_id)).await.unwrap();
        log.purge(blank(2).log_id).await.unwrap();
        drop(log);
        let mut log = LogStore::open(dir.path()).unwrap();
        assert_eq!(log.read_committed().await.unwrap(), Some(blank(4).log_id));
        log.save_committed(Some(blank(1).log_id)).await.unwrap();
        drop(log);
        let mut log = LogStore::open(dir.path()).unwrap();
        assert_eq!(log.read_committed().await.unwrap(), Some(blank(1).log_id));
        // Same index, another leader's entry: not this log's.
        log.save_committed(Some(LogId::new(CommittedLeaderId::new(9, 1), 5))).await.unwrap();
        drop(log);
        let mut log = LogStore::open(dir.path()).unwrap();
        assert_eq!(log.read_committed().await.unwrap(), None);
    }

    fn blank(index: u64) -> Entry<TypeConfig> {
        use openraft::EntryPayload;
        Entry { log_id: LogId::new(CommittedLeaderId::new(2, 1), index), payload: EntryPayload::Blank }
    }

    async fn indexes(log: &mut LogStore) -> Vec<u64> {
        log.try_get_log_entries(0..).await.unwrap().iter().map(|e| e.log_id.index).collect()
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("raft-log"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        v.sort();
        v
    }

    /// A crash in the middle of an append leaves a torn record at the end:
    /// it was never acknowledged, so opening cuts it off and the log goes
    /// on from the last whole entry.
    #[tokio::test]
    async fn torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        LogStore::open_sized(dir.path(), 4096).unwrap().write_entries((1..=5).map(blank)).unwrap();
        let seg = segments(dir.path()).pop().unwrap();
        let end = scan(&std::fs::read(&seg).unwrap()).1 as u64;
        // Half of a sixth record, and a stray byte further on.
        let mut record = Vec::new();
        encode(&blank(6), &mut record).unwrap();
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&record[..record.len() / 2], end).unwrap();
        f.write_all_at(b"x", 3000).unwrap();
        drop(f);

        let mut log = LogStore::open_sized(dir.path(), 4096).unwrap();
        assert_eq!(indexes(&mut log).await, [1, 2, 3, 4, 5]);
        let bytes = std::fs::read(&seg).unwrap();
        assert!(bytes[end as usize..].iter().all(|b| *b == 0), "the torn tail must be zeroed");
        log.write_entries([blank(6)]).unwrap();
        let mut log = LogStore::open_sized(dir.path(), 4096).unwrap();
        assert_eq!(indexes(&mut log).await, [1, 2, 3, 4, 5, 6]);
    }

    /// Damage before the end of the log is not a torn append: opening
    /// refuses rather than serve a log with a hole.
    #[tokio::test]
    async fn damage_inside_the_log_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open_sized(dir.path(), 1).unwrap();
        for i in 1..=3 {
            log.write_entries([blank(i)]).unwrap();
        }
        // The first segment that holds a record (the one made at open is
        // smaller than any record here).
        let first =
            segments(dir.path()).into_iter().find(|p| std::fs::metadata(p).unwrap().len() > FRAME as u64).unwrap();
        let mut bytes = std::fs::read(&first).unwrap();
        bytes[FRAME + 2] ^= 0xff;
        std::fs::write(&first, bytes).unwrap();
        let err = LogStore::open(dir.path()).err().expect("a damaged segment must not open");
        assert!(err.to_string().contains("damaged record"), "{err}");
    }

    /// Many segments: purging deletes the ones it covers whole, truncation
    /// removes later ones and shortens the one it ends in, and a reopen
    /// sees exactly what the calls left.
    #[tokio::test]
    async fn segments_roll_purge_and_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogStore::open_sized(dir.path(), 100).unwrap();
        for i in 1..=50 {
            log.write_entries([blank(i)]).unwrap();
        }
        let before = segments(dir.path()).len();
        assert!(before >= 10, "expected many segments, got {before}");
        assert!(log.write_entries([blank(52)]).is_err(), "a hole must be refused");

        log.purge(blank(20).log_id).await.unwrap();
        let after_purge = segments(dir.path()).len();
        assert!(after_purge < before, "purge kept all {before} segments");
        assert_eq!(indexes(&mut log).await, (21..=50).collect::<Vec<_>>());

        log.truncate(blank(35).log_id).await.unwrap();
        assert!(segments(dir.path()).len() < after_purge);
        assert_eq!(indexes(&mut log).await, (21..=34).collect::<Vec<_>>());
        log.write_entries([blank(35)]).unwrap();

        let mut log = LogStore::open_sized(dir.path(), 100).unwrap();
        assert_eq!(indexes(&mut log).await, (21..=35).collect::<Vec<_>>());
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(blank(20).log_id));
        assert_eq!(state.last_log_id, Some(blank(35).log_id));
        assert_eq!(log.try_get_log_entries(30..=31).await.unwrap().len(), 2);
    }

    /// 100 entries, one append each, in one segment of `dir`; the segment
    /// and where each record starts.
    fn hundred(dir: &Path) -> (PathBuf, Vec<u64>) {
        let log = LogStore::open_sized(dir, 64 << 10).unwrap();
        for i in 1..=100 {
            log.write_entries([blank(i)]).unwrap();
        }
        drop(log);
        let segs = segments(dir);
        assert_eq!(segs.len(), 1, "the test wants one segment");
        let offsets: Vec<u64> = scan(&std::fs::read(&segs[0]).unwrap()).0.iter().map(|r| r.0).collect();
        assert_eq!(offsets.len(), 100);
        (segs[0].clone(), offsets)
    }

    fn flip(path: &Path, at: u64) {
        let f = OpenOptions::new().read(true).write(true).open(path).unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
    }

    /// Damage to an acknowledged record in the last segment, with whole
    /// records after it, is not a torn append: opening refuses, naming the
    /// file and the record's offset, and leaves the file as it found it
    /// (nothing is cut away). Whether the damage is in the body or zeroes
    /// the frame (so the log seems to end there).
    #[test]
    fn damage_followed_by_records_is_refused() {
        for zero_frame in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (seg, offsets) = hundred(dir.path());
            let at = offsets[49];
            if zero_frame {
                let f = OpenOptions::new().write(true).open(&seg).unwrap();
                f.write_all_at(&[0; FRAME], at).unwrap();
            } else {
                flip(&seg, at + (FRAME + LOG_ID) as u64);
            }
            let before = std::fs::read(&seg).unwrap();

            let err = LogStore::open_sized(dir.path(), 64 << 10).err().expect("damage before records must not open");
            assert_eq!(err.kind(), ErrorKind::InvalidData);
            let msg = err.to_string();
            let name = seg.file_name().unwrap().to_string_lossy().into_owned();
            assert!(msg.contains(&name), "{msg}");
            assert!(msg.contains(&format!("damaged record at offset {at} ")), "{msg}");
            assert!(msg.contains(&format!("the next at offset {}", offsets[50])), "{msg}");
            assert!(std::fs::read(&seg).unwrap() == before, "a refused open must not change the segment");
        }
    }

    /// The torn final append is still cut off when 100 entries precede it,
    /// whether it is the first half of a record or a frame of garbage, and
    /// the log goes on from entry 100, across another reopen.
    #[tokio::test]
    async fn torn_tail_after_many_records_is_repaired() {
        let mut record = Vec::new();
        encode(&blank(101), &mut record).unwrap();
        let half = record[..record.len() / 2].to_vec();
        let mut garbage = record.clone();
        garbage[FRAME..].fill(0xa7);
        for torn in [half, garbage] {
            let dir = tempfile::tempdir().unwrap();
            let (seg, offsets) = hundred(dir.path());
            let end = scan(&std::fs::read(&seg).unwrap()).1 as u64;
            assert!(end > offsets[99]);
            let f = OpenOptions::new().write(true).open(&seg).unwrap();
            f.write_all_at(&torn, end).unwrap();
            drop(f);

            let mut log = LogStore::open_sized(dir.path(), 64 << 10).unwrap();
            assert_eq!(indexes(&mut log).await, (1..=100).collect::<Vec<_>>());
            let tail = std::fs::read(&seg).unwrap().split_off(end as usize);
            assert!(tail.iter().all(|b| *b == 0), "the torn tail must be zeroed");
            log.write_entries([blank(101)]).unwrap();
            drop(log);
            let mut log = LogStore::open_sized(dir.path(), 64 << 10).unwrap();
            assert_eq!(indexes(&mut log).await, (1..=101).collect::<Vec<_>>());
        }
    }

    /// A record damaged after open is caught when it is read: an error
    /// naming the file and offset, not an entry with wrong contents. So is
    /// a whole, CRC-clean record in the wrong place (51's bytes where 50's
    /// were). The entries around it still read.
    #[tokio::test]
    async fn damage_after_open_is_a_read_error() {
        for swap in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (seg, offsets) = hundred(dir.path());
            let mut log = LogStore::open_sized(dir.path(), 64 << 10).unwrap();
            let at = offsets[49];
            if swap {
                let bytes = std::fs::read(&seg).unwrap();
                let next = &bytes[offsets[50] as usize..offsets[51] as usize];
                assert_eq!(next.len() as u64, offsets[50] - at, "records 50 and 51 are the same size");
                let f = OpenOptions::new().write(true).open(&seg).unwrap();
                f.write_all_at(next, at).unwrap();
            } else {
                flip(&seg, at + (FRAME + LOG_ID) as u64);
            }
            let name = seg.file_name().unwrap().to_string_lossy().into_owned();
            for range in [50..51, 1..101] {
                let err = log.try_get_log_entries(range).await.expect_err("a damaged record must not be served");
                let msg = err.to_string();
                assert!(msg.contains(&name) && msg.contains(&format!("damaged record at offset {at} ")), "{msg}");
            }
            assert_eq!(log.try_get_log_entries(1..50).await.unwrap().len(), 49);
            assert_eq!(log.try_get_log_entries(51..101).await.unwrap().len(), 50);
        }
    }

    /// A node that led when it stopped starts in the next term, voted for
    /// itself and not won, so it never leads again the term whose entries
    /// it may have lost; any other saved vote is left as it is.
    #[test]
    fn a_leader_steps_down_to_the_next_term_when_it_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for (saved, id, after) in [
            (Vote::new_committed(7, 2), 2, Some(Vote::new(8, 2))),
            (Vote::new_committed(7, 1), 2, None),
            (Vote::new(7, 2), 2, None),
        ] {
            let path = dir.path().join(format!("{saved}-{id}"));
            {
                let mut log = LogStore::open(&path).unwrap();
                rt.block_on(log.save_vote(&saved)).unwrap();
            }
            let log = LogStore::open(&path).unwrap();
            assert_eq!(log.step_down_after_restart(id).unwrap(), after.map(|v| v.leader_id().get_term()));
            drop(log);
            let mut reopened = LogStore::open(&path).unwrap();
            assert_eq!(rt.block_on(reopened.read_vote()).unwrap(), Some(after.unwrap_or(saved)));
        }
    }

    /// The vote and the purge point carry a CRC: a flipped byte, a file cut
    /// short or an empty file is an open error naming the file, not a vote
    /// or purge point silently forgotten or misread.
    #[tokio::test]
    async fn damaged_vote_or_purged_file_is_refused() {
        for name in ["vote", "purged"] {
            for damage in ["flip", "cut", "empty"] {
                let dir = tempfile::tempdir().unwrap();
                {
                    let mut log = LogStore::open_sized(dir.path(), 64 << 10).unwrap();
                    log.save_vote(&Vote::new(7, 2)).await.unwrap();
                    log.write_entries((1..=5).map(blank)).unwrap();
                    log.purge(blank(3).log_id).await.unwrap();
                }
                let path = dir.path().join("raft-log").join(name);
                let len = std::fs::metadata(&path).unwrap().len();
                match damage {
                    "flip" => flip(&path, len - 1),
                    "cut" => std::fs::write(&path, &std::fs::read(&path).unwrap()[..len as usize - 1]).unwrap(),
                    _ => std::fs::write(&path, b"").unwrap(),
                }
                let err = LogStore::open_sized(dir.path(), 64 << 10).err().expect("a damaged file must not open");
                assert_eq!(err.kind(), ErrorKind::InvalidData, "{name} {damage}");
                assert!(err.to_string().contains(&path.display().to_string()), "{name} {damage}: {err}");
            }
        }
        // Undamaged, both read back; missing, both are none.
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = LogStore::open_sized(dir.path(), 64 << 10).unwrap();
            assert_eq!(log.read_vote().await.unwrap(), None);
            assert_eq!(log.get_log_state().await.unwrap().last_purged_log_id, None);
            log.save_vote(&Vote::new(7, 2)).await.unwrap();
            log.write_entries((1..=5).map(blank)).unwrap();
            log.purge(blank(3).log_id).await.unwrap();
        }
        let mut log = LogStore::open_sized(dir.path(), 64 << 10).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(7, 2)));
        assert_eq!(log.get_log_state().await.unwrap().last_purged_log_id, Some(blank(3).log_id));
    }

    /// A data dir from a build that kept the log in redb is refused with
    /// a reason, not silently started empty.
    #[test]
    fn old_redb_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("raft-log.redb"), b"x").unwrap();
        let err = LogStore::open(dir.path()).err().expect("must refuse");
        assert!(err.to_string().contains("raft-log.redb"), "{err}");
    }
}
