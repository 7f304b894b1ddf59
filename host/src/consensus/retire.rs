//! Large files replaced by a rename are freed a slice at a time.
//!
//! Renaming a new snapshot over `snapshot.bin` drops the last name of the
//! previous one, and the filesystem frees all of its blocks at once when
//! the last user lets go (the state's mapping, dropped at the rebase).
//! Measured on this project's ext4 test machine (mounted with `discard`),
//! unlinking 1 GiB took 260–285 ms in the calling thread and held other
//! files' `fdatasync` up to 36–68 ms while the journal committed the free;
//! the same gigabyte cut down by 32 MiB every 20 ms kept them under 11 ms
//! (now 4 MiB at a time, see [`FREE_STEP`]). Three nodes freeing 1.1 GB
//! each at about the same moment was one of the write stalls at 10M keys.
//! RocksDB's `DeleteScheduler` does the same for its files, for the same
//! reason.
//!
//! So before the rename a replaced file of [`RETIRE_OVER`] bytes or more
//! keeps a second name, `<stem>.<pid>.<n>.retired`; one reaper thread
//! frees each such file once nothing in this process maps it or holds it
//! open (read from `/proc/self/maps` and `/proc/self/fd`; nothing else
//! opens it, as it has no name anything else knows), a slice at a time,
//! then removes the name. A file retired by an earlier process
//! (killed before its reaper finished) is freed the same way when the
//! store opens. Where a second name cannot be made, the rename frees the
//! file as before.
//!
//! A replaced snapshot is not freed at all when its directory has no
//! spare yet: it becomes `snapshot.spare`, and the next snapshot is
//! written over it ([`take_spare`]) instead of into a new file. Freeing
//! it a slice at a time still held the other nodes' log syncs: at 10M
//! keys one 4 MiB cut took 139 ms and every write in flight waited about
//! as long (the longest stalls of the state bench, 170–450 ms, all fell
//! on a freeing). Written over, its blocks are neither freed nor
//! allocated again; the cost is disk space, a second snapshot-sized file
//! kept between snapshots.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::snapshot_file::REST_PER_STEP;

/// Replaced files this large or larger are retired (smaller ones are
/// freed at once: too little to hold anything up).
pub(crate) const RETIRE_OVER: u64 = if cfg!(test) { 1 << 20 } else { 64 << 20 };

/// Bytes freed per step. A cut holds one ext4 journal handle while it
/// frees its extents, and a journal commit waits for every open handle,
/// so every other file's write waits for the longest cut: at 10M keys,
/// with three nodes on one disk, 32 MiB cuts took 29-99 ms and once
/// 388 ms, and the leader's log append waited 325 ms behind that one
/// (all 64 writes in flight at once, 456 ms).
const FREE_STEP: u64 = 4 << 20;

/// The least pause between two steps; after a slower cut the reaper rests
/// [`REST_PER_STEP`] times as long as it took, as a snapshot's writeback
/// does.
const FREE_PAUSE: Duration = Duration::from_millis(20);

/// How often the reaper looks again at a file still in use.
const RECHECK: Duration = Duration::from_millis(500);

/// The file name suffix of a retired file.
const SUFFIX: &str = ".retired";

/// The stem of the files kept as a spare once retired (`snapshot.bin`):
/// only those are written through [`take_spare`].
const SPARE_STEM: &str = "snapshot";

/// The spare kept in `dir`.
fn spare_in(dir: &Path) -> PathBuf {
    dir.join(format!("{SPARE_STEM}.spare"))
}

/// Bytes a spare may be longer than the file written over it: the rest
/// is cut off under the writer ([`cut_slowly`]), which holds the snapshot
/// lock (an install from the leader holds openraft's state machine worker
/// too), so a much longer spare is left to the reaper instead.
const SPARE_SHED_MAX: u64 = if cfg!(test) { 1 << 20 } else { 32 << 20 };

/// Make the spare kept beside `path`, if there is one, the file `tmp`
/// (renamed: its old bytes are there until written over), to be written
/// `len` bytes long. False when there is none, or when it is more than
/// [`SPARE_SHED_MAX`] longer (the state shrank): then it is retired, and
/// the reaper frees it a step at a time off every lock.
pub(crate) fn take_spare(path: &Path, tmp: &Path, len: u64) -> bool {
    let Some(dir) = path.parent() else { return false };
    let spare = spare_in(dir);
    match std::fs::metadata(&spare) {
        Ok(meta) if meta.len() > len.saturating_add(SPARE_SHED_MAX) => {
            // Not named as a snapshot: the reaper would keep it as the
            // spare again.
            let n = super::snapshot_file::next_temp();
            let shed = dir.join(format!("shed.{}.{n}{SUFFIX}", std::process::id()));
            match std::fs::rename(&spare, &shed) {
                Ok(()) => free_in(dir),
                Err(e) => {
                    tracing::debug!(file = %spare.display(), error = %e, "cannot set aside a spare much longer than the snapshot")
                }
            }
            return false;
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return false,
        Err(_) => {}
    }
    match std::fs::rename(&spare, tmp) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => {
            tracing::debug!(file = %spare.display(), error = %e, "cannot take the spare; writing a new file");
            false
        }
    }
}

/// The directories with retired files the reaper looks after.
struct Reaper {
    dirs: BTreeSet<PathBuf>,
    /// Bumped on every retirement, so a sweep that found nothing left
    /// knows whether another file came meanwhile.
    generation: u64,
    running: bool,
}

static REAPER: Mutex<Reaper> = Mutex::new(Reaper { dirs: BTreeSet::new(), generation: 0, running: false });

/// Give `path`, about to be replaced by a rename, a second name if it is
/// large enough to be freed slowly. Returns that name.
pub(crate) fn retire(path: &Path) -> Option<PathBuf> {
    let len = std::fs::metadata(path).ok()?.len();
    if len < RETIRE_OVER {
        return None;
    }
    let (dir, stem) = (path.parent()?, path.file_stem()?);
    let n = super::snapshot_file::next_temp();
    let name = dir.join(format!("{}.{}.{n}{SUFFIX}", stem.to_string_lossy(), std::process::id()));
    match std::fs::hard_link(path, &name) {
        Ok(()) => Some(name),
        Err(e) => {
            tracing::debug!(file = %path.display(), error = %e, "cannot keep a second name; the rename frees it at once");
            None
        }
    }
}

/// Undo [`retire`] when the rename did not happen (`path` still names
/// the file, so removing the second name frees nothing).
pub(crate) fn unretire(name: &Path) {
    let _ = std::fs::remove_file(name);
}

/// Have the reaper free the retired files in `dir` as they fall out of
/// use.
pub(crate) fn free_in(dir: &Path) {
    let mut reaper = REAPER.lock().unwrap_or_else(|e| e.into_inner());
    reaper.dirs.insert(dir.to_owned());
    reaper.generation += 1;
    if reaper.running {
        return;
    }
    reaper.running = true;
    let spawned = std::thread::Builder::new().name("synod-reaper".into()).spawn(reap);
    if let Err(e) = spawned {
        reaper.running = false;
        tracing::warn!(error = %e, "cannot start the thread that frees replaced snapshots");
    }
}

/// The reaper: sweep every directory until none has a retired file left
/// and no file was retired during the sweep.
fn reap() {
    loop {
        let (dirs, generation) = {
            let reaper = REAPER.lock().unwrap_or_else(|e| e.into_inner());
            (reaper.dirs.clone(), reaper.generation)
        };
        let mut left = BTreeSet::new();
        for dir in dirs {
            match sweep(&dir) {
                Ok(0) => {}
                Ok(_) => {
                    left.insert(dir);
                }
                // The directory is gone (a removed data dir): nothing to free.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot free replaced snapshots");
                    left.insert(dir);
                }
            }
        }
        let mut reaper = REAPER.lock().unwrap_or_else(|e| e.into_inner());
        if reaper.generation == generation {
            reaper.dirs = left;
            if reaper.dirs.is_empty() {
                reaper.running = false;
                return;
            }
        }
        drop(reaper);
        std::thread::sleep(RECHECK);
    }
}

/// Free the retired files in `dir` nothing uses; how many are left.
fn sweep(dir: &Path) -> io::Result<usize> {
    let mut retired = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().ends_with(SUFFIX) {
            retired.push(entry.path());
        }
    }
    if retired.is_empty() {
        return Ok(0);
    }
    let used = in_use()?;
    let mut left = 0;
    for path in retired {
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if used.contains(&meta.ino()) {
            left += 1;
            continue;
        }
        if keep_as_spare(dir, &path) {
            continue;
        }
        free_slowly(&path)?;
    }
    Ok(left)
}

/// Keep the retired file `path`, nothing uses, as its directory's spare
/// if it is a snapshot and there is none yet. Not synced: a spare lost
/// at a power cut is only a new file written next time.
fn keep_as_spare(dir: &Path, path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !name.starts_with(&format!("{SPARE_STEM}.")) {
        return false;
    }
    let spare = spare_in(dir);
    if spare.exists() {
        return false;
    }
    match std::fs::rename(path, &spare) {
        Ok(()) => {
            tracing::debug!(file = %path.display(), "kept a replaced snapshot as the spare the next is written over");
            true
        }
        Err(e) => {
            tracing::debug!(file = %path.display(), error = %e, "cannot keep a spare; freeing it");
            false
        }
    }
}

/// Cut `file` down to `len` bytes [`FREE_STEP`] at a time, resting
/// between steps as [`free_slowly`] does (one cut of a few hundred MiB
/// holds every other write on the disk for as long as it frees, 75-220 ms
/// here); made `len` long at once if it is shorter. Returns the steps and
/// the slowest one.
pub(crate) fn cut_slowly(file: &std::fs::File, len: u64) -> io::Result<(u32, Duration)> {
    let mut size = file.metadata()?.len();
    if size <= len {
        if size < len {
            file.set_len(len)?;
        }
        return Ok((0, Duration::ZERO));
    }
    let (mut steps, mut slowest) = (0, Duration::ZERO);
    while size > len {
        size = size.saturating_sub(FREE_STEP).max(len);
        let cut = Instant::now();
        file.set_len(size)?;
        let took = cut.elapsed();
        (steps, slowest) = (steps + 1, slowest.max(took));
        if size > len {
            std::thread::sleep(FREE_PAUSE.max(took * REST_PER_STEP));
        }
    }
    Ok((steps, slowest))
}

/// Cut `path` down a step at a time, then remove it.
fn free_slowly(path: &Path) -> io::Result<()> {
    let started = Instant::now();
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let len = file.metadata()?.len();
    let (_, slowest) = cut_slowly(&file, 0)?;
    drop(file);
    std::fs::remove_file(path)?;
    tracing::debug!(
        file = %path.display(),
        bytes = len,
        seconds = started.elapsed().as_secs_f64(),
        slowest_cut_ms = slowest.as_millis() as u64,
        "freed a replaced snapshot"
    );
    Ok(())
}

/// The inode numbers of the files this process maps or holds open. Only
/// the inode is compared: the device `/proc/self/maps` shows is not
/// `stat`'s on some filesystems (btrfs subvolumes, overlayfs), and an
/// inode of another filesystem taken for a retired file only delays its
/// freeing, where a missed use would cut a mapped file short.
fn in_use() -> io::Result<BTreeSet<u64>> {
    let mut used = BTreeSet::new();
    // maps: "start-end perms offset major:minor inode path"
    for line in std::fs::read_to_string("/proc/self/maps")?.lines() {
        let Some(Ok(inode)) = line.split_ascii_whitespace().nth(4).map(str::parse::<u64>) else { continue };
        if inode != 0 {
            used.insert(inode);
        }
    }
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(entry) = entry else { continue };
        // Follows the fd's link to the file itself (named or not); fds
        // closed meanwhile are skipped.
        if let Ok(meta) = std::fs::metadata(entry.path()) {
            used.insert(meta.ino());
        }
    }
    Ok(used)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, byte: u8, len: usize) {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, vec![byte; len]).unwrap();
        let name = retire(path);
        std::fs::rename(&tmp, path).unwrap();
        if name.is_some() {
            free_in(path.parent().unwrap());
        }
    }

    /// A file cut to a shorter length keeps what it held up to there,
    /// and goes down a step at a time: one cut of the whole difference
    /// held every other write on the disk while it freed the blocks.
    #[test]
    fn a_file_is_cut_a_step_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.tmp");
        let bytes: Vec<u8> = (0..(3 * FREE_STEP + 12_345)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let len = FREE_STEP / 2 + 7;
        let (steps, _) = cut_slowly(&file, len).unwrap();
        assert_eq!(steps, 3);
        assert_eq!(std::fs::read(&path).unwrap(), bytes[..len as usize]);
        // Already that long, or shorter: no cut; made longer.
        assert_eq!(cut_slowly(&file, len).unwrap().0, 0);
        assert_eq!(cut_slowly(&file, len + 10).unwrap().0, 0);
        assert_eq!(file.metadata().unwrap().len(), len + 10);
    }

    fn retired(dir: &Path) -> Vec<PathBuf> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(SUFFIX))
            .collect();
        names.sort();
        names
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A large replaced file keeps a second name while it is mapped, and
    /// its bytes stay readable through the mapping; once unmapped it is
    /// freed and the name goes. A small one is not retired at all.
    #[test]
    fn a_replaced_file_is_freed_once_nothing_maps_it() {
        let dir = tempfile::tempdir().unwrap();
        // Not a snapshot: never kept as a spare.
        let path = dir.path().join("checkpoint.bin");
        let len = (RETIRE_OVER + FREE_STEP / 2) as usize;
        write(&path, 1, len);
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: read-only, and nothing writes to the file in this test.
        let old = unsafe { memmap2::Mmap::map(&file).unwrap() };
        drop(file);
        write(&path, 2, len);
        assert_eq!(retired(dir.path()).len(), 1, "the replaced file keeps a name while mapped");
        std::thread::sleep(RECHECK * 3);
        assert_eq!(retired(dir.path()).len(), 1, "still mapped: not freed");
        assert!(old.iter().step_by(4096).all(|b| *b == 1), "the mapping reads the old bytes");
        assert_eq!(std::fs::read(&path).unwrap()[0], 2);
        drop(old);
        wait_until("the retired file was not freed once unmapped", || retired(dir.path()).is_empty());
        // Held open (not mapped) counts as used too.
        let held = std::fs::File::open(&path).unwrap();
        write(&path, 3, len);
        std::thread::sleep(RECHECK * 3);
        assert_eq!(retired(dir.path()).len(), 1, "still open: not freed");
        drop(held);
        wait_until("the retired file was not freed once closed", || retired(dir.path()).is_empty());
        // Small files are replaced as before.
        std::fs::write(&path, b"small").unwrap();
        write(&path, 4, 10);
        assert!(retired(dir.path()).is_empty());
        assert_eq!(std::fs::read(&path).unwrap(), vec![4; 10]);
    }

    /// Files an earlier process retired are freed once the reaper is told
    /// of their directory.
    #[test]
    fn files_left_retired_are_freed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let left = dir.path().join(format!("checkpoint.1.0{SUFFIX}"));
        std::fs::write(&left, vec![0u8; 3 << 20]).unwrap();
        free_in(dir.path());
        wait_until("a retired file left behind was not freed", || !left.exists());
    }

    /// A replaced snapshot, once nothing maps it, becomes the spare the
    /// next one is written over, not freed; while there is a spare, the
    /// next replaced one is freed. Taking the spare renames it.
    #[test]
    fn a_replaced_snapshot_is_kept_as_the_spare() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.bin");
        let spare = dir.path().join("snapshot.spare");
        let len = (RETIRE_OVER + 1) as usize;
        write(&path, 1, len);
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: read-only, and nothing writes to the file in this test.
        let old = unsafe { memmap2::Mmap::map(&file).unwrap() };
        drop(file);
        write(&path, 2, len);
        std::thread::sleep(RECHECK * 2);
        assert!(!spare.exists(), "a mapped file was made the spare");
        drop(old);
        wait_until("the replaced snapshot was not kept as the spare", || spare.exists());
        assert!(retired(dir.path()).is_empty());
        assert_eq!(std::fs::read(&spare).unwrap(), vec![1; len], "the spare is the replaced file");
        write(&path, 3, len);
        wait_until("with a spare kept, the next replaced one was not freed", || retired(dir.path()).is_empty());
        assert_eq!(std::fs::read(&spare).unwrap()[0], 1, "the spare was replaced");
        let tmp = dir.path().join("snapshot.x.tmp");
        assert!(take_spare(&path, &tmp, len as u64));
        assert!(!spare.exists() && tmp.exists());
        assert!(!take_spare(&path, &tmp, len as u64), "no spare left to take");
    }

    /// A spare much longer than the snapshot to be written over it (the
    /// state shrank) would be cut down under the snapshot lock, which an
    /// install from the leader holds with openraft's state machine worker
    /// waiting: seconds for a gigabyte shed. It is left to the reaper
    /// instead, and a spare a little longer is still taken.
    #[test]
    fn a_spare_much_longer_than_the_snapshot_goes_to_the_reaper() {
        let dir = tempfile::tempdir().unwrap();
        let (path, spare, tmp) =
            (dir.path().join("snapshot.bin"), dir.path().join("snapshot.spare"), dir.path().join("snapshot.x.tmp"));
        let len = 3 * SPARE_SHED_MAX;
        std::fs::write(&spare, vec![7u8; (len + SPARE_SHED_MAX / 2) as usize]).unwrap();
        assert!(take_spare(&path, &tmp, len), "a spare a little longer was not taken");
        std::fs::remove_file(&tmp).unwrap();

        std::fs::write(&spare, vec![7u8; (len + 2 * SPARE_SHED_MAX) as usize]).unwrap();
        assert!(!take_spare(&path, &tmp, len), "a much longer spare was taken");
        assert!(!spare.exists() && !tmp.exists());
        wait_until("the long spare was not freed", || retired(dir.path()).is_empty());
        assert!(!spare.exists(), "the long spare was kept as the spare again");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
