//! Snapshot files: `snapshot.bin` in the data dir, and the file-backed
//! [`SnapshotBytes`] openraft sends and receives snapshots through.
//!
//! ```text
//! snapshot.bin = "SYNODSNAP2" | len u64 LE | blake3(body) 32 bytes | body
//! body         = postcard(meta) | data length (postcard varint) | data
//! data         = postcard(SnapshotData)
//! ```
//!
//! (The body is `postcard(SnapshotFile { meta, data })` of earlier versions,
//! byte for byte.) A snapshot's data is never held in memory whole: it is
//! encoded straight into the file while built, sent to a follower in chunks
//! read from the file, received into a file, and decoded from a read-only
//! mapping of that file (page cache, which the kernel may drop, not the
//! process's own memory). The decoded state is the one copy in memory.
//!
//! Each write goes to a temp file of its own (built and installed snapshots
//! may be written at once), is synced and renamed over `snapshot.bin`.

use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use openraft::SnapshotMeta;
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use super::types::{NodeId, NodeInfo};

/// Leads every snapshot file.
const MAGIC: &[u8; 10] = b"SYNODSNAP2";

/// Bytes before the body: magic, body length, checksum.
const HEADER: usize = MAGIC.len() + 8 + 32;

/// Snapshot bytes allowed to wait for writeback at once: a log sync that
/// comes while a step is written waits for at most one step.
const WRITEBACK_STEP: u64 = 1 << 20;

/// The longest rest after one step of writeback (see [`Paced`]).
const MAX_REST: std::time::Duration = std::time::Duration::from_millis(100);

/// Background disk work (a snapshot's writeback, freeing a replaced
/// snapshot) rests this many times as long as each step took, so it keeps
/// the disk busy at most a quarter of the time, whatever the disk, and the
/// Raft log's syncs find it idle the rest.
pub(crate) const REST_PER_STEP: u32 = 3;

/// A snapshot's data as openraft handles it: a region of an open file, from
/// `base` to its end. Built and stored snapshots are `snapshot.bin` (the
/// data after its header and meta); a snapshot being received is an
/// unnamed file of its own (unlinked as soon as it is created, so a crash
/// leaves nothing behind).
#[derive(Debug)]
pub struct SnapshotBytes {
    file: tokio::fs::File,
    base: u64,
    /// The file offset reads and writes through this handle are at.
    position: u64,
    /// A seek was started, and `poll_complete` says where it ended.
    seeking: bool,
    /// The end of what was written through this handle: a received
    /// snapshot's length, known without asking the file (see
    /// [`SnapshotBytes::map`]).
    written_to: u64,
}

impl SnapshotBytes {
    fn new(mut file: std::fs::File, base: u64) -> io::Result<SnapshotBytes> {
        file.seek(SeekFrom::Start(base))?;
        Ok(SnapshotBytes { file: tokio::fs::File::from_std(file), base, position: base, seeking: false, written_to: 0 })
    }

    /// An empty file in `dir` to receive a snapshot into.
    pub(crate) fn receive_in(dir: &Path) -> io::Result<SnapshotBytes> {
        let path = dir.join(format!("snapshot.recv.{}.{}.tmp", std::process::id(), next_temp()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        std::fs::remove_file(&path)?;
        SnapshotBytes::new(file, 0)
    }

    /// The data, mapped read-only, while the file stays open for openraft
    /// (after every write to it has finished).
    pub(crate) fn map_shared(&self) -> io::Result<MappedData> {
        // SAFETY: as in `MappedData::new`.
        let map = unsafe { memmap2::Mmap::map(&self.file)? };
        if map.len() as u64 <= self.base {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the snapshot's data is empty"));
        }
        Ok(MappedData { map: std::sync::Arc::new(map), base: self.base as usize })
    }

    /// The data, mapped read-only (after every write to it has finished).
    ///
    /// A received snapshot's length is where its writes ended: its file has
    /// no name, and on some filesystems (FUSE ones without a path for an
    /// unlinked file) `fstat` on it fails, which stopped the node at every
    /// install there.
    pub(crate) async fn map(self) -> io::Result<MappedData> {
        let file = self.file.into_std().await;
        let len = match self.written_to {
            0 => file.metadata()?.len(),
            end => end,
        };
        if len <= self.base {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the snapshot's data is empty"));
        }
        let len = usize::try_from(len).map_err(|_| io::Error::other("the snapshot does not fit in memory"))?;
        // SAFETY: as in `MappedData::new`.
        let map = unsafe { memmap2::MmapOptions::new().len(len).map(&file)? };
        Ok(MappedData { map: std::sync::Arc::new(map), base: self.base as usize })
    }
}

impl AsyncRead for SnapshotBytes {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.file).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            self.position += (buf.filled().len() - before) as u64;
        }
        read
    }
}

impl AsyncWrite for SnapshotBytes {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let wrote = Pin::new(&mut self.file).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = wrote {
            self.position += n as u64;
            self.written_to = self.written_to.max(self.position);
        }
        wrote
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

/// Positions are the data's, not the file's: 0 is `base`.
impl AsyncSeek for SnapshotBytes {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let position = match position {
            SeekFrom::Start(n) => {
                SeekFrom::Start(self.base.checked_add(n).ok_or_else(|| io::Error::other("seek overflow"))?)
            }
            other => other,
        };
        Pin::new(&mut self.file).start_seek(position)?;
        self.seeking = true;
        Ok(())
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let base = self.base;
        let done = Pin::new(&mut self.file).poll_complete(cx);
        if let Poll::Ready(Ok(at)) = done
            && std::mem::take(&mut self.seeking)
        {
            self.position = at;
        }
        // tokio's file counts its position from 0 when made from a std
        // file, so before the first seek (when `seek` only waits here for
        // earlier operations and ignores the value) it may be below `base`.
        done.map(|r| r.map(|at| at.saturating_sub(base)))
    }
}

/// A snapshot's data, mapped read-only.
pub(crate) struct MappedData {
    map: crate::state::Mapping,
    base: usize,
}

impl MappedData {
    /// Map `file` whole, its data from `base`.
    fn new(file: &std::fs::File, base: usize) -> io::Result<MappedData> {
        // SAFETY: the mapping is read-only, and nothing writes to the file
        // while it lives: a received file has no name left, and
        // `snapshot.bin` and `checkpoint*.bin` are only ever replaced by a
        // rename (`replace_whole`), never written in place.
        let map = unsafe { memmap2::Mmap::map(file)? };
        Ok(MappedData { map: std::sync::Arc::new(map), base })
    }

    pub(crate) fn data(&self) -> &[u8] {
        &self.map[self.base..]
    }

    /// The whole file's mapping, which the state may keep reading from
    /// ([`crate::state::decode_mapped`]).
    pub(crate) fn mapping(&self) -> &crate::state::Mapping {
        &self.map
    }
}

/// Which file a snapshot is (device and inode): `snapshot.bin` is only
/// ever replaced by a rename, so the same id is the same bytes.
pub(crate) type FileId = (u64, u64);

/// `snapshot.bin`, checked and mapped.
pub(crate) struct StoredSnapshot {
    pub meta: SnapshotMeta<NodeId, NodeInfo>,
    /// The file's id, for [`StoredSnapshot::open_trusting`].
    pub id: FileId,
    file: std::fs::File,
    /// The whole file; its data from the byte after the data's length.
    mapped: MappedData,
    /// Where it was opened, for messages.
    path: std::path::PathBuf,
}

impl StoredSnapshot {
    /// Open and check the snapshot file at `path` (None when there is none):
    /// its length and checksum, then its meta.
    pub(crate) fn open(path: &Path) -> io::Result<Option<StoredSnapshot>> {
        StoredSnapshot::open_trusting(path, None)
    }

    /// [`StoredSnapshot::open`], without hashing the whole file again when
    /// it is `trusted`, a file checked a moment ago.
    pub(crate) fn open_trusting(path: &Path, trusted: Option<FileId>) -> io::Result<Option<StoredSnapshot>> {
        let Some(stored) = StoredSnapshot::open_unchecked(path)? else { return Ok(None) };
        if trusted != Some(stored.id) {
            stored.check()?;
        }
        Ok(Some(stored))
    }

    /// Hash the file's body and compare with its checksum.
    pub(crate) fn check(&self) -> io::Result<()> {
        check_whole(&self.mapped.map, &self.path)
    }

    /// [`StoredSnapshot::open`] but for the checksum, which the caller
    /// checks ([`StoredSnapshot::check`]) before it trusts anything read:
    /// so it can hash on one core while it decodes on another.
    pub(crate) fn open_unchecked(path: &Path) -> io::Result<Option<StoredSnapshot>> {
        use std::os::unix::fs::MetadataExt as _;
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let shown = path.display();
        let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
        let stat = file.metadata()?;
        let id = (stat.dev(), stat.ino());
        if stat.len() < HEADER as u64 {
            return Err(bad(format!("{shown} is not a Synod snapshot")));
        }
        let mut mapped = MappedData::new(&file, 0)?;
        let bytes = mapped.data();
        if bytes.starts_with(b"SYNODSNAP1") {
            return Err(bad(format!(
                "{shown} is a snapshot of an earlier Synod (format 1, before device shadows): this version reads \
                 format 2 only; start the node with a fresh data dir and let it catch up from its peers"
            )));
        }
        if &bytes[..MAGIC.len()] != MAGIC {
            return Err(bad(format!("{shown} is not a Synod snapshot")));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[MAGIC.len()..MAGIC.len() + 8]);
        let body = &bytes[HEADER..];
        if u64::from_le_bytes(len) != body.len() as u64 {
            return Err(bad(format!("{shown} is truncated ({} of {} bytes)", body.len(), u64::from_le_bytes(len))));
        }
        let labels = (|| {
            let (meta, rest) = postcard::take_from_bytes::<SnapshotMeta<NodeId, NodeInfo>>(body)
                .map_err(|e| bad(format!("{shown}: {e}")))?;
            let (data_len, data) = postcard::take_from_bytes::<u64>(rest).map_err(|e| bad(format!("{shown}: {e}")))?;
            if data_len != data.len() as u64 {
                return Err(bad(format!("{shown}: its data is {} bytes, labelled {data_len}", data.len())));
            }
            Ok((meta, bytes.len() - data.len()))
        })();
        let (meta, base) = match labels {
            Ok(labels) => labels,
            // Damage reads as damage, not as whatever it garbled.
            Err(e) => return Err(check_whole(bytes, path).err().unwrap_or(e)),
        };
        mapped.base = base;
        Ok(Some(StoredSnapshot { meta, id, file, mapped, path: path.to_owned() }))
    }

    /// The snapshot's data.
    #[cfg(test)]
    pub(crate) fn data(&self) -> &[u8] {
        self.mapped.data()
    }

    /// The snapshot's data, mapped.
    pub(crate) fn mapped(&self) -> &MappedData {
        &self.mapped
    }

    /// The data, as openraft sends it.
    pub(crate) fn into_bytes(self) -> io::Result<SnapshotBytes> {
        SnapshotBytes::new(self.file, self.mapped.base as u64)
    }
}

/// Compare the checksum in a whole snapshot file's header with its body's.
fn check_whole(whole: &[u8], path: &Path) -> io::Result<()> {
    if blake3::hash(&whole[HEADER..]).as_bytes()[..] != whole[MAGIC.len() + 8..HEADER] {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is damaged: its checksum does not match", path.display()),
        ));
    }
    Ok(())
}

/// Write the snapshot file `path` whole or not at all: `meta`, then
/// `data_len` bytes of data that `fill` writes (through a buffer, hashed
/// and paced as they pass; see [`Paced`]). Returns the new file, as
/// openraft reads its data.
pub(crate) fn write_snapshot(
    path: &Path,
    meta: &SnapshotMeta<NodeId, NodeInfo>,
    data_len: u64,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<SnapshotBytes> {
    let mut head = postcard::to_allocvec(meta).map_err(io::Error::other)?;
    head.extend(postcard::to_allocvec(&data_len).map_err(io::Error::other)?);
    let body_len = head.len() as u64 + data_len;
    let file = replace_whole(path, Some(HEADER as u64 + body_len), |mut f| {
        f.write_all(MAGIC)?;
        f.write_all(&body_len.to_le_bytes())?;
        // The checksum, once known, goes here.
        f.write_all(&[0u8; 32])?;
        let mut out = Paced::new(f, HEADER as u64);
        out.write_all(&head)?;
        fill(&mut out)?;
        if out.n != body_len {
            return Err(io::Error::other(format!("wrote {} bytes of snapshot, counted {body_len}", out.n)));
        }
        let (mut f, hash) = out.finish()?;
        f.seek(SeekFrom::Start((MAGIC.len() + 8) as u64))?;
        f.write_all(hash.as_bytes())?;
        Ok(f)
    })?;
    SnapshotBytes::new(file, HEADER as u64 + head.len() as u64)
}

/// Leads every checkpoint file.
const CHECKPOINT_MAGIC: &[u8; 10] = b"SYNODCKPT1";

/// Write the checkpoint file `path` whole or not at all:
///
/// ```text
/// checkpoint.bin = "SYNODCKPT1" | len u64 LE | blake3(body) 32 bytes | body
/// ```
///
/// Tried: writing the body paced like a snapshot ([`Paced`]), so that a
/// 10 MB checkpoint (at 10M keys, every second) is never queued whole
/// ahead of a log sync. Six 10M runs showed no shorter stall (longest
/// write at 64 in flight 33–66 ms, against 29–43 ms in nine runs without
/// it), and each checkpoint took three times as long (0.15 → 0.45 s), so
/// a restart found an older one.
pub(crate) fn write_checkpoint(path: &Path, body: &[u8]) -> io::Result<()> {
    replace_whole(path, None, |mut f| {
        f.write_all(CHECKPOINT_MAGIC)?;
        f.write_all(&(body.len() as u64).to_le_bytes())?;
        f.write_all(blake3::hash(body).as_bytes())?;
        f.write_all(body)?;
        Ok(f)
    })
    .map(drop)
}

/// Write the checkpoint file `path` whole or not at all, as
/// [`write_checkpoint`] does, with a body `fill` encodes straight into the
/// file, paced like a snapshot ([`Paced`]): for a checkpoint of a whole
/// bulk load's changes (tens or hundreds of MB), which would be held in
/// memory whole and queued whole ahead of the log's syncs otherwise.
/// Returns the body's length.
pub(crate) fn write_checkpoint_paced(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<u64> {
    let mut written = 0;
    replace_whole(path, None, |mut f| {
        f.write_all(CHECKPOINT_MAGIC)?;
        // The length and the checksum, once known, go here.
        f.write_all(&[0u8; 8 + 32])?;
        let mut out = Paced::new(f, HEADER as u64);
        fill(&mut out)?;
        written = out.n;
        let (mut f, hash) = out.finish()?;
        f.seek(SeekFrom::Start(CHECKPOINT_MAGIC.len() as u64))?;
        f.write_all(&written.to_le_bytes())?;
        f.write_all(hash.as_bytes())?;
        Ok(f)
    })?;
    Ok(written)
}

/// The body of the checkpoint file `path` (None when there is none),
/// checked against its length and checksum. Mapped, not read: a bulk
/// load's checkpoint is a hundred MB or more, which a read would copy into
/// fresh memory (and then shift past its header) only to be decoded once.
pub(crate) fn read_checkpoint(path: &Path) -> io::Result<Option<MappedData>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{} {what}", path.display()));
    if file.metadata()?.len() < HEADER as u64 {
        return Err(bad("is not a Synod checkpoint"));
    }
    let mapped = MappedData::new(&file, HEADER)?;
    let bytes: &[u8] = &mapped.map;
    if &bytes[..MAGIC.len()] != CHECKPOINT_MAGIC {
        return Err(bad("is not a Synod checkpoint"));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[MAGIC.len()..MAGIC.len() + 8]);
    if u64::from_le_bytes(len) != (bytes.len() - HEADER) as u64 {
        return Err(bad("is cut short or too long"));
    }
    check_whole(bytes, path)?;
    Ok(Some(mapped))
}

/// Leads every record of a checkpoint's log.
const DELTA_MAGIC: &[u8; 4] = b"SCD1";

/// Bytes of a record's header: magic, length, checksum.
const DELTA_HEADER: usize = DELTA_MAGIC.len() + 8 + 32;

/// The length of the whole, undamaged record `rest` starts with.
fn whole_record(rest: &[u8]) -> Option<usize> {
    if rest.get(..DELTA_MAGIC.len())? != DELTA_MAGIC {
        return None;
    }
    let len = u64::from_le_bytes(rest.get(DELTA_MAGIC.len()..DELTA_MAGIC.len() + 8)?.try_into().ok()?);
    let end = DELTA_HEADER.checked_add(usize::try_from(len).ok()?)?;
    let body = rest.get(DELTA_HEADER..end)?;
    (blake3::hash(body).as_bytes()[..] == rest[DELTA_MAGIC.len() + 8..DELTA_HEADER]).then_some(end)
}

/// Append one record to the checkpoint log `path` (created if missing)
/// and sync it:
///
/// ```text
/// checkpoint.log = record*   record = "SCD1" | len u64 LE | blake3(body) 32 bytes | body
/// ```
///
/// A record cut short or damaged (power lost in the append) ends the log
/// for [`read_checkpoint_log`].
pub(crate) fn append_checkpoint_log(path: &Path, body: &[u8]) -> io::Result<()> {
    let created = !path.exists();
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let mut record = Vec::with_capacity(DELTA_HEADER + body.len());
    record.extend_from_slice(DELTA_MAGIC);
    record.extend_from_slice(&(body.len() as u64).to_le_bytes());
    record.extend_from_slice(blake3::hash(body).as_bytes());
    record.extend_from_slice(body);
    f.write_all(&record)?;
    f.sync_data()?;
    if created && let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Empty the checkpoint log `path` (a whole checkpoint was just written),
/// durably; nothing to do when there is none.
pub(crate) fn clear_checkpoint_log(path: &Path) -> io::Result<()> {
    match std::fs::OpenOptions::new().write(true).truncate(true).open(path) {
        Ok(f) => f.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The bodies of the checkpoint log `path`'s records, in order, up to the
/// first one cut short or damaged (none when there is no log).
pub(crate) fn read_checkpoint_log(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut records = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let Some(end) = whole_record(rest) else {
            tracing::warn!(
                file = %path.display(),
                bytes = rest.len(),
                "the checkpoint log ends in a record cut short or damaged; what follows is not used"
            );
            break;
        };
        records.push(rest[DELTA_HEADER..end].to_vec());
        rest = &rest[end..];
    }
    Ok(records)
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A number no other temp or retired file of this process has.
pub(super) fn next_temp() -> u64 {
    TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Write `path` whole or not at all: `fill` writes a temp file of this
/// call's own, which is synced and renamed over `path`, then the directory
/// is synced; on an error the temp file goes. Returns the file, open for
/// reading.
///
/// With `reuse_len` (the length the whole file will have), the temp file
/// is the replaced file kept as a spare ([`super::retire::take_spare`]),
/// when there is one and it is not much longer: written over from the
/// start and cut to that length (a step at a time,
/// [`super::retire::cut_slowly`]), so that its blocks are neither freed
/// nor allocated again.
fn replace_whole(
    path: &Path,
    reuse_len: Option<u64>,
    fill: impl FnOnce(std::fs::File) -> io::Result<std::fs::File>,
) -> io::Result<std::fs::File> {
    let tmp = path.with_extension(format!("{}.{}.tmp", std::process::id(), next_temp()));
    let written = (|| {
        let reused = reuse_len.is_some_and(|len| super::retire::take_spare(path, &tmp, len));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(!reused).open(&tmp)?;
        let file = fill(file)?;
        let (mut cuts, mut slowest_cut) = (0, std::time::Duration::ZERO);
        if let (true, Some(len)) = (reused, reuse_len) {
            (cuts, slowest_cut) = super::retire::cut_slowly(&file, len)?;
        }
        let syncing = std::time::Instant::now();
        file.sync_all()?;
        let synced = syncing.elapsed().as_secs_f64();
        // A large file replaced here is freed a slice at a time once
        // nothing uses it, not all at once (see `retire`).
        let retired = super::retire::retire(path);
        if let Err(e) = std::fs::rename(&tmp, path) {
            if let Some(name) = &retired {
                super::retire::unretire(name);
            }
            return Err(e);
        }
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
            if retired.is_some() {
                super::retire::free_in(dir);
            }
        }
        tracing::debug!(
            file = %path.display(),
            sync_seconds = synced,
            rename_seconds = syncing.elapsed().as_secs_f64() - synced,
            cuts,
            slowest_cut_ms = slowest_cut.as_millis() as u64,
            "replaced a file whole"
        );
        Ok::<_, io::Error>(file)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Remove the temp files that writes of `path` ([`replace_whole`]) and
/// received snapshots ([`SnapshotBytes::receive_in`], in its directory)
/// left when the process died before finishing them: each as large as the
/// state, and nothing else removes them. Only while nothing writes there
/// (a node's store opening: its data dir is locked).
pub(crate) fn remove_unfinished(path: &Path) -> io::Result<()> {
    let (Some(dir), Some(stem)) = (path.parent(), path.file_stem()) else { return Ok(()) };
    // Files replaced before the process died and not freed yet.
    super::retire::free_in(dir);
    let prefix = format!("{}.", stem.to_string_lossy());
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        entries => entries?,
    };
    for entry in entries {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".tmp") {
            std::fs::remove_file(dir.join(&*name))?;
            tracing::info!(file = %name, "removed a snapshot write that did not finish");
        }
    }
    Ok(())
}

/// A snapshot file (or a large checkpoint) being written: hashes and
/// counts what passes through, and paces the file's writeback.
///
/// A snapshot of a large state is hundreds of megabytes. Left to the
/// kernel, all of it waits in the page cache until the final `fsync`, and
/// then floods the disk queue: the Raft log's `fdatasync` on every write
/// waits behind it, for seconds per gigabyte. So every [`WRITEBACK_STEP`]
/// bytes the writer hands the range written to the disk and waits for it
/// (`sync_file_range`, as RocksDB's `bytes_per_sync` does): at most one
/// step is ever queued ahead of a log sync.
///
/// The encoder writes a few bytes at a time. They are gathered into
/// [`BLOCK`]-byte blocks, and each block is hashed and written whole:
/// BLAKE3 hashes many 1 KiB chunks of a large input at once (SIMD), but
/// fed a few bytes per call it compresses one block at a time, which made
/// hashing a fifth of a snapshot's CPU time.
struct Paced {
    file: std::fs::File,
    /// Bytes not yet hashed and written.
    block: Vec<u8>,
    hash: blake3::Hasher,
    /// Bytes taken so far (past the header, which is written first).
    n: u64,
    /// File offset up to which writeback was started and waited for.
    synced: u64,
    /// File offset of the first byte counted in `n`.
    base: u64,
}

/// Bytes [`Paced`] gathers before it hashes and writes them.
const BLOCK: usize = 1 << 20;

impl Paced {
    fn new(file: std::fs::File, base: u64) -> Paced {
        Paced { file, block: Vec::with_capacity(BLOCK), hash: blake3::Hasher::new(), n: 0, synced: 0, base }
    }

    /// Hash and write the gathered bytes, then pace.
    fn write_block(&mut self) -> io::Result<()> {
        self.hash.update(&self.block);
        self.file.write_all(&self.block)?;
        self.block.clear();
        let end = self.base + self.n;
        if end - self.synced < WRITEBACK_STEP {
            return Ok(());
        }
        use std::os::fd::AsRawFd as _;
        let fd = self.file.as_raw_fd();
        let (from, len) = (self.synced as libc::off64_t, (end - self.synced) as libc::off64_t);
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        let started = std::time::Instant::now();
        // SAFETY: `fd` is the open file this writer owns; the call reads
        // no memory of ours.
        if unsafe { libc::sync_file_range(fd, from, len, flags) } != 0 {
            return Err(io::Error::last_os_error());
        }
        self.synced = end;
        // Then rest (`REST_PER_STEP`): writing a snapshot is mostly
        // copying runs of the last one, fast enough to keep a disk busy
        // from start to end.
        std::thread::sleep((started.elapsed() * REST_PER_STEP).min(MAX_REST));
        Ok(())
    }

    /// Write what is left; the file and the hash of everything taken.
    fn finish(mut self) -> io::Result<(std::fs::File, blake3::Hash)> {
        self.write_block()?;
        Ok((self.file, self.hash.finalize()))
    }
}

impl Write for Paced {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let take = buf.len().min(BLOCK - self.block.len());
        self.block.extend_from_slice(&buf[..take]);
        self.n += take as u64;
        if self.block.len() == BLOCK {
            self.write_block()?;
        }
        Ok(take)
    }

    /// Gathered bytes are written by [`Paced::finish`]; nothing reads the
    /// file before it.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId, StoredMembership};
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _};

    fn meta() -> SnapshotMeta<NodeId, NodeInfo> {
        SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 7)),
            last_membership: StoredMembership::default(),
            snapshot_id: "3-7".into(),
        }
    }

    /// The format of earlier versions, written from memory.
    #[derive(serde::Serialize)]
    struct SnapshotFile {
        meta: SnapshotMeta<NodeId, NodeInfo>,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    }

    /// A snapshot written while the directory has a spare (a replaced
    /// snapshot kept, see `retire`) is written over it: the new
    /// `snapshot.bin` is the spare's inode, holds exactly the new snapshot
    /// (cut to its length, the spare was longer), and reads back whole.
    #[test]
    fn a_snapshot_is_written_over_the_spare() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.bin");
        let spare = dir.path().join("snapshot.spare");
        std::fs::write(&spare, vec![0xAB; 400_000]).unwrap();
        let inode = std::fs::metadata(&spare).unwrap().ino();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        write_snapshot(&path, &meta(), data.len() as u64, |w| w.write_all(&data)).unwrap();
        assert!(!spare.exists(), "the spare was not taken");
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode, "not written over the spare");
        let stored = StoredSnapshot::open(&path).unwrap().unwrap();
        assert_eq!(stored.data(), &data[..]);
        // Without a spare: a new file, as before.
        write_snapshot(&path, &meta(), data.len() as u64, |w| w.write_all(&data)).unwrap();
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), inode);
        assert_eq!(StoredSnapshot::open(&path).unwrap().unwrap().data(), &data[..]);
    }

    /// A file written through `write_snapshot` is the earlier format byte
    /// for byte, reads back, and hands openraft exactly its data, with
    /// positions counted from the data's start.
    #[tokio::test]
    async fn a_snapshot_file_is_the_earlier_format_and_serves_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.bin");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut bytes = write_snapshot(&path, &meta(), data.len() as u64, |w| w.write_all(&data)).unwrap();

        let body = postcard::to_allocvec(&SnapshotFile { meta: meta(), data: data.clone() }).unwrap();
        let mut earlier = MAGIC.to_vec();
        earlier.extend((body.len() as u64).to_le_bytes());
        earlier.extend(blake3::hash(&body).as_bytes());
        earlier.extend(&body);
        assert_eq!(std::fs::read(&path).unwrap(), earlier);

        let mut read = Vec::new();
        bytes.read_to_end(&mut read).await.unwrap();
        assert_eq!(read, data);
        assert_eq!(bytes.seek(SeekFrom::End(0)).await.unwrap(), data.len() as u64);
        assert_eq!(bytes.seek(SeekFrom::Start(10)).await.unwrap(), 10);
        let mut ten = [0u8; 10];
        bytes.read_exact(&mut ten).await.unwrap();
        assert_eq!(ten[..], data[10..20]);

        let stored = StoredSnapshot::open(&path).unwrap().unwrap();
        assert_eq!(stored.meta, meta());
        assert_eq!(stored.data(), &data[..]);
        assert_eq!(stored.into_bytes().unwrap().map().await.unwrap().data(), &data[..]);
    }

    /// A snapshot received in chunks (as openraft writes them: seek, then
    /// write) maps back whole, and leaves no file behind.
    #[tokio::test]
    async fn a_received_snapshot_is_an_unnamed_file() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let mut bytes = SnapshotBytes::receive_in(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        for (n, chunk) in data.chunks(64 << 10).enumerate() {
            bytes.seek(SeekFrom::Start((n * (64 << 10)) as u64)).await.unwrap();
            bytes.write_all(chunk).await.unwrap();
        }
        bytes.shutdown().await.unwrap();
        assert_eq!(bytes.map().await.unwrap().data(), &data[..]);
        assert!(SnapshotBytes::receive_in(dir.path()).unwrap().map().await.is_err(), "empty data is refused");
    }

    /// Damage anywhere in the file is found when it is opened.
    #[test]
    fn a_damaged_or_truncated_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.bin");
        write_snapshot(&path, &meta(), 5, |w| w.write_all(b"hello")).unwrap();
        let good = std::fs::read(&path).unwrap();
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let e = StoredSnapshot::open(&path).err().unwrap();
        assert!(e.to_string().contains("checksum does not match"), "{e}");
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        let e = StoredSnapshot::open(&path).err().unwrap();
        assert!(e.to_string().contains("truncated"), "{e}");
        assert!(StoredSnapshot::open(&dir.path().join("none.bin")).unwrap().is_none());
        // A file trusted by its id is not hashed again; another file is.
        std::fs::write(&path, &flipped).unwrap();
        let id = {
            use std::os::unix::fs::MetadataExt as _;
            let m = std::fs::metadata(&path).unwrap();
            (m.dev(), m.ino())
        };
        assert!(StoredSnapshot::open_trusting(&path, Some(id)).unwrap().is_some());
        assert!(StoredSnapshot::open_trusting(&path, Some((id.0, id.1 + 1))).is_err());
    }

    /// A checkpoint of a few megabytes reads back whole; a flipped or
    /// missing byte is refused.
    #[test]
    fn a_checkpoint_reads_back_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.bin");
        let body: Vec<u8> = (0..3 * WRITEBACK_STEP as usize + 12_345).map(|i| (i * 31 % 251) as u8).collect();
        write_checkpoint(&path, &body).unwrap();
        assert_eq!(read_checkpoint(&path).unwrap().unwrap().data(), &body[..]);
        let good = std::fs::read(&path).unwrap();
        assert_eq!(&good[MAGIC.len() + 8..HEADER], blake3::hash(&body).as_bytes());
        // Encoded straight into the file, paced (over several blocks and
        // writeback steps): the same bytes.
        let paced = dir.path().join("paced.bin");
        let n = write_checkpoint_paced(&paced, |out| body.chunks(7_777).try_for_each(|piece| out.write_all(piece)))
            .unwrap();
        assert_eq!(n, body.len() as u64);
        assert!(std::fs::read(&paced).unwrap() == good, "a paced checkpoint differs from one written whole");
        let mut flipped = good.clone();
        flipped[HEADER + 2 * WRITEBACK_STEP as usize] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let e = read_checkpoint(&path).err().unwrap();
        assert!(e.to_string().contains("checksum does not match"), "{e}");
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(read_checkpoint(&path).is_err());
        assert!(read_checkpoint(&dir.path().join("none.bin")).unwrap().is_none());
    }
}
