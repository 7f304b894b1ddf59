//! openraft's view of the replicated state: a thin adapter around
//! [`Replica`].
//!
//! In: committed entries, in order, from openraft. Out: each entry applied
//! whole by [`Replica::apply_entry`] on a dedicated apply thread (wasm never
//! runs on a tokio worker, so a fuel-heavy command does not delay
//! heartbeats, reads or the HTTP API), its [`Response`], and snapshots.
//!
//! A snapshot is the replica captured between two entries under its lock
//! ([`Replica::capture`], O(number of namespaces)), then serialised with the
//! bytes of every installed plugin off the apply path, straight into
//! `snapshot.bin` in the data dir (see [`super::snapshot_file`]) so a
//! restart resumes from it. A snapshot whose checksum fails, or whose label
//! (`meta.last_log_id`) differs from the position of the state inside it,
//! is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use futures::future::BoxFuture;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::snapshot_file::{
    FileId, MappedData, SnapshotBytes, StoredSnapshot, append_checkpoint_log, clear_checkpoint_log, read_checkpoint,
    read_checkpoint_log, remove_unfinished, write_checkpoint, write_checkpoint_paced, write_snapshot,
};
use super::types::{NodeId, NodeInfo, Op, Response, TypeConfig};
use crate::artifacts::Artifacts;
use crate::replica::{Captured, Image, Replica, VersionRecord};
use crate::state::{ChangesSince, KvState};

type Result<T> = std::result::Result<T, StorageError<NodeId>>;

/// Where plugin bytes a node lacks at apply time come from: its peers.
pub trait BlobSource: Send + Sync + 'static {
    /// Fetch the component with this sha256 from some peer that has it.
    fn fetch(&self, sha256: String) -> BoxFuture<'static, std::result::Result<Vec<u8>, String>>;
}

/// A source with no peers (a single node, tests).
pub struct NoBlobSource;

impl BlobSource for NoBlobSource {
    fn fetch(&self, sha256: String) -> BoxFuture<'static, std::result::Result<Vec<u8>, String>> {
        Box::pin(async move { Err(format!("no peer to fetch {sha256} from")) })
    }
}

/// What readers outside openraft (API, status) share with the store.
pub struct Shared {
    /// The replicated state. The apply thread holds the write lock for one
    /// entry at a time; readers take it briefly and run wasm after letting
    /// go (see [`Replica::query_view`]).
    pub replica: RwLock<Replica>,
    /// Set when a member's digest differed from ours at the same index.
    pub divergence: std::sync::atomic::AtomicBool,
    /// The last applied membership, for whoever keeps the peer allowlist.
    pub membership: tokio::sync::watch::Sender<StoredMembership<NodeId, NodeInfo>>,
    /// Devices whose shadow changed since the device manager last looked
    /// (it drains the set), and a counter bumped with every addition.
    pub device_changes: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Bumped whenever `device_changes` gains ids (or a snapshot replaced
    /// the state: then every device may have changed).
    pub devices_changed: tokio::sync::watch::Sender<u64>,
    /// The token table as of the last applied entry, replaced whole when it
    /// changes: request handlers verify bearer tokens against it without
    /// waiting for apply (see `replica::auth`).
    pub tokens: RwLock<crate::replica::auth::TokenTable>,
    /// Whether the cluster has had a token (the bootstrap is done).
    pub auth_bootstrapped: std::sync::atomic::AtomicBool,
    /// Key and value bytes of the plugins' state after the last applied
    /// batch: the leader's quota check reads it without the replica's lock.
    pub state_bytes: AtomicU64,
    /// Notified after an applied batch when a snapshot is due
    /// ([`Shared::snapshot_due`]): the node asks openraft for one then.
    pub snapshot_wanted: tokio::sync::Notify,
    /// See [`CheckpointChain`].
    checkpoint_chain: std::sync::Mutex<CheckpointChain>,
    /// Log index of the snapshot `snapshot.bin` holds (0: none yet).
    snapshot_index: AtomicU64,
    /// `raft.snapshot_after_entries` of the node's config: see
    /// [`Shared::snapshot_due`].
    pub snapshot_after_entries: AtomicU64,
    /// `raft.max_unsnapshotted_changes` of the node's config (0: what one
    /// whole checkpoint holds): see [`Shared::unsnapshotted_max`].
    pub max_unsnapshotted_changes: AtomicUsize,
    /// Changes in the state since the last snapshot this node finished
    /// ([`KvState::changed_entries`]), after the last applied batch.
    unsnapshotted: AtomicU64,
    /// [`Shared::unsnapshotted_max`] of the state after the last applied
    /// batch, as the metrics and the gossip tell it (0: no limit).
    unsnapshotted_limit: AtomicU64,
    /// The same two of the other members, as their digest gossip last
    /// told (see [`Shared::hold_writes`]).
    peers_unsnapshotted: std::sync::Mutex<BTreeMap<NodeId, PeerBacklog>>,
    /// Notified whenever this node's or a member's count of changes since
    /// its last snapshot is told anew: held commands look again.
    pub backlog_changed: tokio::sync::Notify,
    /// The bulk commands by plugin ([`crate::replica::BULK_COMMAND_CHANGES`]),
    /// as of the last applied batch that changed them.
    bulk_commands: RwLock<BTreeMap<String, BTreeSet<String>>>,
}

/// A member's changes since its last finished snapshot and their most (0:
/// no limit), as its gossip told at `at`.
#[derive(Debug, Clone, Copy)]
struct PeerBacklog {
    changes: u64,
    max: u64,
    at: std::time::Instant,
}

/// Whether `changes` since a node's last finished snapshot are past their
/// most `max` (0: no limit), as [`Shared::unsnapshotted`] tells them.
fn past_max(changes: u64, max: u64, bulk: bool) -> bool {
    max > 0 && changes > if bulk { bulk_max(max) } else { max }
}

/// The share of the most changes since a snapshot kept for commands that
/// are not bulk commands: a bulk command is held once the changes are past
/// `max - max / BULK_RESERVE_SHARE` ([`bulk_max`]), the others only past
/// `max`. So a bulk load held at the pace of the snapshots leaves room
/// for a plant's small writes, which go on at once, during the load and
/// right after it, instead of waiting in line for the snapshot it waits
/// for (up to 3.9 s seen in the state bench at 10M keys).
const BULK_RESERVE_SHARE: u64 = 8;

/// The most changes since a snapshot at which bulk commands are held,
/// for a most of `max`.
fn bulk_max(max: u64) -> u64 {
    max - max / BULK_RESERVE_SHARE
}

/// How long a member's gossiped backlog counts ([`Shared::hold_writes`]):
/// a member silent longer is down or cut off, and applies nothing.
const PEER_BACKLOG_FRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the leader holds writes ([`Shared::hold_writes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backlogged {
    /// Its own state holds `changes` since its last snapshot, past `max`.
    Own { changes: u64, max: u64 },
    /// These members' states are past theirs, and with them too few
    /// voters are within theirs to make a quorum.
    Members(Vec<NodeId>),
}

/// State bytes per step of the snapshot interval: a state of `n` times
/// this many bytes is snapshotted after `n` times
/// `raft.snapshot_after_entries` entries (see [`Shared::snapshot_due`]).
pub const SNAPSHOT_SCALE_BYTES: u64 = 64 << 20;

/// Most steps of the snapshot interval (16 × 2,000 entries by default, at
/// 1 GiB of state and more).
pub const SNAPSHOT_SCALE_MAX: u64 = 16;

/// Entries (and deletions) written since the last snapshot past which a
/// node takes one whatever else: a whole checkpoint holds them all, and a
/// restart reads it.
pub const SNAPSHOT_AFTER_CHANGED_ENTRIES: usize = 200_000;

/// Bytes of keys and values written since the last snapshot past which a
/// node takes a snapshot without waiting for its count of entries: what a
/// node holds in its own memory is those writes (and, while a snapshot is
/// built, the ones before), so this bounds it for bulk loads of many keys
/// per entry too.
pub const SNAPSHOT_AFTER_CHANGED_BYTES: u64 = 128 << 20;

impl Shared {
    /// Why this node should take a snapshot now, if it should. A snapshot
    /// rewrites the whole state, so the interval grows with it: after
    /// `raft.snapshot_after_entries` entries times the state's size in
    /// [`SNAPSHOT_SCALE_BYTES`] (at least 1, at most
    /// [`SNAPSHOT_SCALE_MAX`]), so that rewriting stays about as costly
    /// per entry at 10M keys as at 100k (etcd snapshots every 100,000
    /// entries). Sooner when the writes since hold
    /// [`SNAPSHOT_AFTER_CHANGED_BYTES`] in memory or number
    /// [`SNAPSHOT_AFTER_CHANGED_ENTRIES`].
    pub fn snapshot_due(&self, replica: &Replica) -> Option<&'static str> {
        let kv = replica.kv();
        if kv.changed_bytes() >= SNAPSHOT_AFTER_CHANGED_BYTES {
            return Some("the writes since the last snapshot hold too much memory");
        }
        // By the time bulk commands are held, so that a snapshot releases them.
        let bulk_held_at = usize::try_from(bulk_max(self.unsnapshotted_max(kv) as u64)).unwrap_or(usize::MAX);
        if kv.changed_entries() >= SNAPSHOT_AFTER_CHANGED_ENTRIES.min(bulk_held_at) {
            return Some("the writes since the last snapshot change too many keys");
        }
        let since = replica.log_id().map_or(0, |l| l.index).saturating_sub(self.snapshot_index.load(Ordering::Relaxed));
        let steps = (kv.size().1 / SNAPSHOT_SCALE_BYTES).clamp(1, SNAPSHOT_SCALE_MAX);
        (since >= self.snapshot_after_entries.load(Ordering::Relaxed).saturating_mul(steps))
            .then_some("entries since the last snapshot")
    }

    /// The most changes since its last finished snapshot a state may hold
    /// before the leader holds new writes (see [`Shared::hold_writes`]): `raft.max_unsnapshotted_changes`,
    /// by default what one whole checkpoint holds (an eighth of the keys,
    /// at least [`CHECKPOINT_MAX_CHANGES`]). So a quorum of nodes killed at
    /// any time, a bulk load's tail included, comes back from a snapshot
    /// and one checkpoint each (and the log since the checkpoint, about a
    /// second of writes) instead of replaying the load. No limit while the
    /// state cannot be checkpointed at all (a namespace decoded into
    /// memory).
    pub fn unsnapshotted_max(&self, kv: &KvState) -> usize {
        if kv.checkpoint_base().is_none() {
            return usize::MAX;
        }
        match self.max_unsnapshotted_changes.load(Ordering::Relaxed) {
            0 => whole_checkpoint_cap(kv),
            set => set,
        }
    }

    /// Record the changes `kv` holds since its last finished snapshot, for
    /// the leader's intake and the metrics.
    fn note_unsnapshotted(&self, kv: &KvState) {
        let n = kv.changed_entries() as u64;
        let max = match self.unsnapshotted_max(kv) {
            usize::MAX => 0,
            max => max as u64,
        };
        self.unsnapshotted.store(n, Ordering::Relaxed);
        self.unsnapshotted_limit.store(max, Ordering::Relaxed);
        let m = crate::metrics::get();
        crate::metrics::set(&m.state_unsnapshotted_changes, n);
        crate::metrics::set(&m.state_unsnapshotted_max, max);
        self.backlog_changed.notify_waiters();
    }

    /// This node's changes since its last finished snapshot and their
    /// most (0: no limit), as of the last applied batch or the last
    /// snapshot finished.
    pub fn unsnapshotted(&self) -> (u64, u64) {
        (self.unsnapshotted.load(Ordering::Relaxed), self.unsnapshotted_limit.load(Ordering::Relaxed))
    }

    /// [`Shared::unsnapshotted`], when the changes are past their most
    /// (for a `bulk` command: past [`bulk_max`] of it).
    pub fn past_unsnapshotted_max(&self, bulk: bool) -> Option<(u64, u64)> {
        let (changes, max) = self.unsnapshotted();
        past_max(changes, max, bulk).then_some((changes, max))
    }

    /// Take the bulk commands by plugin the replica just told.
    fn note_bulk_commands(&self, bulk: BTreeMap<String, BTreeSet<String>>) {
        if let Ok(mut commands) = self.bulk_commands.write() {
            *commands = bulk;
        }
    }

    /// Whether `plugin`'s `command` changed at least
    /// [`crate::replica::BULK_COMMAND_CHANGES`] keys the last time it ran.
    pub fn is_bulk(&self, plugin: &str, command: &str) -> bool {
        self.bulk_commands.read().is_ok_and(|c| c.get(plugin).is_some_and(|commands| commands.contains(command)))
    }

    /// Member `node`'s [`Shared::unsnapshotted`], as its gossip told.
    pub fn note_peer_unsnapshotted(&self, node: NodeId, changes: u64, max: u64) {
        if let Ok(mut peers) = self.peers_unsnapshotted.lock() {
            peers.insert(node, PeerBacklog { changes, max, at: std::time::Instant::now() });
        }
        self.backlog_changed.notify_waiters();
    }

    /// Why the leader (`me`) should hold new writes now, if it should:
    /// its own state holds more changes since its last finished snapshot
    /// than [`Shared::unsnapshotted_max`], or so many members' do (by
    /// their last gossip, if at most [`PEER_BACKLOG_FRESH`] old) that the
    /// voters within theirs are no quorum. A write then waits until
    /// snapshots catch up, so a quorum of nodes killed at any moment comes
    /// back from a snapshot and a checkpoint each; one slow member alone
    /// holds nothing back.
    pub fn hold_writes(&self, me: NodeId, bulk: bool) -> Option<Backlogged> {
        if let Some((changes, max)) = self.past_unsnapshotted_max(bulk) {
            return Some(Backlogged::Own { changes, max });
        }
        let voters: Vec<NodeId> = self.membership.borrow().membership().voter_ids().collect();
        if !voters.contains(&me) {
            // No membership applied yet, or not a voter: no quorum to count.
            return None;
        }
        let peers = self.peers_unsnapshotted.lock().ok()?;
        let behind: Vec<NodeId> = voters
            .iter()
            .copied()
            .filter(|&id| id != me)
            .filter(|id| {
                peers.get(id).is_some_and(|p| p.at.elapsed() <= PEER_BACKLOG_FRESH && past_max(p.changes, p.max, bulk))
            })
            .collect();
        let quorum = voters.len() / 2 + 1;
        (voters.len() - behind.len() < quorum).then_some(Backlogged::Members(behind))
    }

    /// `snapshot.bin` now holds the state at `log_id`.
    fn note_snapshot(&self, log_id: Option<LogId<NodeId>>) {
        self.snapshot_index.store(log_id.map_or(0, |l| l.index), Ordering::Relaxed);
    }

    /// Give request handlers the replica's token table.
    fn publish_auth(&self, replica: &Replica) {
        if let Ok(mut table) = self.tokens.write() {
            *table = replica.auth().table();
        }
        self.auth_bootstrapped.store(replica.auth().bootstrapped(), std::sync::atomic::Ordering::Release);
    }

    /// Tell the device manager which shadows changed.
    fn note_device_changes(&self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        if let Ok(mut set) = self.device_changes.lock() {
            set.extend(ids);
        }
        self.devices_changed.send_modify(|n| *n += 1);
    }
}

/// The state inside a snapshot's data. Read with the namespaces decoded
/// straight into the state's trees (`K` = [`KvState`]).
#[derive(Serialize, Deserialize)]
struct SnapshotData<K = KvState> {
    image: Image<K>,
    /// (sha256, bytes) of every installed plugin version.
    blobs: Vec<(String, Vec<u8>)>,
}

/// [`SnapshotData`] as written: borrowed from a capture, the same bytes.
#[derive(Serialize)]
struct SnapshotDataRef<'a> {
    image: &'a Image<KvState>,
    blobs: &'a [(String, Vec<u8>)],
}

/// The membership in the snapshot file of the data dir `dir`, if there is
/// one (offline recovery: [`crate::recover`]).
pub fn snapshot_membership(
    dir: &std::path::Path,
) -> std::result::Result<Option<openraft::Membership<NodeId, NodeInfo>>, String> {
    let file = StoredSnapshot::open(&dir.join("snapshot.bin")).map_err(|e| e.to_string())?;
    Ok(file.map(|f| f.meta.last_membership.membership().clone()))
}

/// The plugin bytes of every installed version in `registry`, for a
/// snapshot or a backup to carry.
fn plugin_blobs(
    registry: &BTreeMap<String, crate::replica::PluginRecord>,
    artifacts: &Artifacts,
) -> std::result::Result<Vec<(String, Vec<u8>)>, String> {
    let mut blobs = Vec::new();
    for record in registry.values() {
        for v in record.versions.values() {
            let bytes = artifacts
                .get(&v.sha256)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("plugin bytes {} are missing on this node", v.sha256))?;
            blobs.push((v.sha256.clone(), bytes));
        }
    }
    Ok(blobs)
}

/// Store the plugin bytes a snapshot or backup carries, checking each
/// against the hash it is labelled with.
fn store_blobs(artifacts: &Artifacts, blobs: &[(String, Vec<u8>)]) -> std::result::Result<(), String> {
    for (sha256, bytes) in blobs {
        let stored = artifacts.put(bytes).map_err(|e| e.to_string())?;
        if &stored != sha256 {
            return Err(format!("plugin bytes labelled {sha256} hash to {stored}"));
        }
    }
    Ok(())
}

/// A backup being taken: what it holds, and the bytes of its state as
/// they are encoded (the state as a snapshot holds it, with the bytes of
/// every installed plugin version).
pub struct BackupImage {
    /// The last log entry the state includes.
    pub log_id: Option<LogId<NodeId>>,
    /// The last applied operation index.
    pub operation_index: u64,
    /// The state digest after it.
    pub digest: [u8; 32],
    /// Plugins installed (names).
    pub plugins: Vec<String>,
    /// Devices defined.
    pub devices: usize,
    /// The size of the encoded state (postcard [`SnapshotData`]).
    pub size: u64,
    /// The encoded state in pieces of about [`BACKUP_PIECE`] bytes, `size`
    /// in all unless an error ends it. The encoder waits while the reader
    /// holds two pieces, so a backup never holds a copy of the state; it
    /// stops when the reader is dropped.
    pub pieces: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>,
}

/// The size of a backup's pieces.
pub const BACKUP_PIECE: usize = 1 << 20;

/// The state now, for a backup: captured between two entries in
/// O(number of namespaces) (apply waits only for that), then encoded with
/// its plugin bytes on a thread of its own as the reader takes the pieces.
pub async fn backup_image(shared: &Shared, artifacts: &Artifacts) -> std::result::Result<BackupImage, String> {
    let captured = shared.replica.read().map_err(|e| e.to_string())?.capture();
    let blobs = plugin_blobs(captured.registry(), artifacts)?;
    backup_of(captured, blobs).await
}

/// A backup of `captured` carrying `blobs`, encoded on a thread of its own.
async fn backup_of(
    captured: crate::replica::Captured,
    blobs: Vec<(String, Vec<u8>)>,
) -> std::result::Result<BackupImage, String> {
    let (tx, pieces) = tokio::sync::mpsc::channel(2);
    let (described, description) = tokio::sync::oneshot::channel();
    spawn_background(move || {
        let image = captured.state();
        let data = SnapshotDataRef { image, blobs: &blobs };
        let size = match encoded_size(&data) {
            Ok(size) => size,
            Err(e) => {
                let _ = described.send(Err(e.to_string()));
                return;
            }
        };
        let backup = BackupImage {
            log_id: captured.log_id(),
            operation_index: image.last_applied,
            digest: image.digest,
            plugins: captured.registry().keys().cloned().collect(),
            devices: image.devices.devices.len(),
            size,
            pieces,
        };
        if described.send(Ok(backup)).is_err() {
            return;
        }
        let mut pieces = Pieces { tx, buf: Vec::with_capacity(BACKUP_PIECE) };
        if let Err(e) = encode_into(&data, &mut pieces).and_then(|()| pieces.send()) {
            let _ = pieces.tx.blocking_send(Err(e));
        }
    })?;
    description.await.map_err(|_| "the backup thread stopped".to_owned())?
}

/// A writer that hands its bytes on in pieces of [`BACKUP_PIECE`].
struct Pieces {
    tx: tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
    buf: Vec<u8>,
}

impl Pieces {
    /// Hand on what is buffered (waiting while the reader is behind).
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(BACKUP_PIECE));
        self.tx
            .blocking_send(Ok(piece.into()))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the backup's reader went away"))
    }
}

impl std::io::Write for Pieces {
    /// Takes at most what fills the current piece: a copied run of a
    /// snapshot's records can be most of the state.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let take = bytes.len().min(BACKUP_PIECE.saturating_sub(self.buf.len()).max(1));
        self.buf.extend_from_slice(&bytes[..take]);
        if self.buf.len() >= BACKUP_PIECE {
            self.send()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Check a backup's state (`data`: postcard [`SnapshotData`]) against what
/// its header says, and install it in the empty data dir `dir` as the
/// snapshot of a new cluster whose only member is `id` (`info`): the
/// state, its plugins' bytes (into `artifacts`), and a vote in the
/// image's term so the node's first election comes after it.
pub async fn install_backup(
    dir: &std::path::Path,
    artifacts: &Artifacts,
    data: &[u8],
    expect: (u64, [u8; 32]),
    id: NodeId,
    info: NodeInfo,
) -> std::result::Result<(), String> {
    let mut data: SnapshotData = postcard::from_bytes(data).map_err(|e| format!("the state does not decode: {e}"))?;
    let image = &mut data.image;
    if (image.last_applied, image.digest) != expect {
        return Err(format!(
            "the state inside is at operation {} with digest {}, not what the header says ({} {})",
            image.last_applied,
            hex::encode(image.digest),
            expect.0,
            hex::encode(expect.1)
        ));
    }
    let Some(log_id) = image.log_id else { return Err("the backup holds an empty state".into()) };
    store_blobs(artifacts, &data.blobs)?;
    // A new cluster of one: this node, from the image's position.
    let membership =
        openraft::Membership::new(vec![std::collections::BTreeSet::from([id])], BTreeMap::from([(id, info)]));
    image.membership = StoredMembership::new(Some(log_id), membership);
    // The image must load on this engine (every active plugin compiles);
    // the clone shares the namespaces.
    Replica::restore(data.image.clone(), artifacts).map_err(|e| format!("the state does not load here: {e}"))?;
    let meta = SnapshotMeta {
        last_log_id: Some(log_id),
        last_membership: data.image.membership.clone(),
        snapshot_id: format!("restored-{}-{}", log_id.leader_id, log_id.index),
    };
    write_state(&dir.join("snapshot.bin"), &meta, &SnapshotDataRef { image: &data.image, blobs: &data.blobs })
        .map_err(|e| e.to_string())?;
    let mut log = crate::consensus::LogStore::open(dir).map_err(|e| e.to_string())?;
    openraft::storage::RaftLogStorage::save_vote(&mut log, &openraft::Vote::new(log_id.leader_id.term, id))
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Write `snapshot.bin` at `path` with `data` encoded straight into it
/// (the size is counted in a first pass). Returns the data's size and the
/// file.
fn write_state(
    path: &std::path::Path,
    meta: &SnapshotMeta<NodeId, NodeInfo>,
    data: &SnapshotDataRef,
) -> std::io::Result<(u64, SnapshotBytes)> {
    let size = encoded_size(data)?;
    let bytes = write_snapshot(path, meta, size, |w| encode_into(data, w))?;
    Ok((size, bytes))
}

/// The size of `data`'s postcard encoding, as [`encode_into`] writes it.
fn encoded_size(data: &SnapshotDataRef) -> std::io::Result<u64> {
    let (size, raw) = crate::state::counting_raw(|| postcard::experimental::serialized_size(data));
    Ok(size.map_err(std::io::Error::other)? as u64 + raw)
}

/// Encode `data` (postcard) into `w`, for a snapshot or a backup.
///
/// Each namespace read from an earlier snapshot's file copies that file's
/// records between two changed keys as they are, and encodes only the
/// changes (`state::writing_raw`): the same bytes as encoding every
/// record, for a fraction of the CPU.
fn encode_into(data: &SnapshotDataRef, w: &mut dyn std::io::Write) -> std::io::Result<()> {
    let out = std::cell::RefCell::new(w);
    crate::state::writing_raw(&out, || postcard::to_io(data, crate::state::Tap(&out)))
        .map(drop)
        .map_err(std::io::Error::other)
}

/// A snapshot's data, decoded.
fn decode_snapshot(data: &[u8]) -> Result<SnapshotData> {
    postcard::from_bytes(data).map_err(snap_err)
}

/// A mapped snapshot's data, decoded with its namespaces left in place in
/// the mapping (read from there from now on, not copied into memory).
fn decode_mapped_snapshot(mapped: &MappedData, meta: &SnapshotMeta<NodeId, NodeInfo>) -> Result<SnapshotData> {
    let origin = meta.last_log_id.map(|l| l.index);
    crate::state::decode_mapped(mapped.mapping(), origin, || decode_snapshot(mapped.data()))
}

/// A node's state as of a recent entry, written every so often between
/// snapshots (`checkpoint.bin` in the data dir) so that a restart replays
/// only the entries after it: the state but for the plugin data, and the
/// plugin data's changes since the snapshot its bases are read from
/// (which plugin bytes it names are in the node's artifact store, written
/// durably before they were applied).
#[derive(Serialize, Deserialize)]
struct Checkpoint<K> {
    /// Log index of the snapshot the changes are relative to (none: to an
    /// empty state).
    snapshot: Option<u64>,
    /// Later snapshots the changes also apply over: those captured while
    /// this checkpoint's state was (see `KvState::captures`).
    captures: Vec<u64>,
    image: Image<K>,
    /// Each namespace's keys and bytes at the checkpoint, as the state
    /// counted them while applying: the state opened from the snapshot
    /// and the changes must count the same, or the checkpoint is not used.
    sizes: Vec<(String, u64, u64)>,
}

/// A record of `checkpoint.log`: a checkpoint written as the plugin
/// data's changes since the checkpoint before it (the state at `after`),
/// the rest of the state whole. A restart applies the records whose
/// `after` is the state it has reached, in order, after `checkpoint.bin`.
#[derive(Serialize, Deserialize)]
struct CheckpointDelta<K> {
    after: Option<LogId<NodeId>>,
    checkpoint: Checkpoint<K>,
}

/// The state as of the last checkpoint written (a clone: it shares every
/// tree node the state has not written since), while the next may be
/// written as the changes since it.
struct CheckpointChain {
    /// Bumped whenever the chain is cut: a checkpoint captured before
    /// that may not start a new one.
    generation: u64,
    /// `checkpoint.bin` and `checkpoint.log`.
    last: Option<ChainLink>,
    /// `checkpoint.next.bin` and `checkpoint.next.log`.
    next: Option<ChainLink>,
}

/// See [`CheckpointChain`].
struct ChainLink {
    log_id: Option<LogId<NodeId>>,
    kv: KvState,
    /// Records in the chain's log since its whole checkpoint.
    records: u32,
}

impl Shared {
    /// Forget the state of the last checkpoint (the state was rebased on
    /// a new snapshot, or replaced): the next checkpoint is written whole,
    /// and the layers this one holds are not kept alive by it.
    fn cut_checkpoint_chain(&self) {
        if let Ok(mut chain) = self.checkpoint_chain.lock() {
            chain.generation += 1;
            chain.last = None;
            chain.next = None;
        }
    }
}

/// `kv` (the plugin data of the state `checkpoint` follows) with the
/// checkpoint's changes applied, and the rest of the state from it; `None`,
/// with an error logged, when the result does not count the keys and bytes
/// the checkpoint says the state had. Counts the changes into `changes`.
fn apply_checkpoint(
    mut kv: KvState,
    checkpoint: Checkpoint<crate::state::ChangesImage>,
    changes: &mut usize,
) -> Option<Image<KvState>> {
    let index = checkpoint.image.log_id.map(|l| l.index);
    let image = checkpoint.image.map_kv(|delta| {
        *changes += delta.iter().map(|(_, entries)| entries.len()).sum::<usize>();
        kv.apply_changes(delta);
        kv
    });
    let sizes = namespace_sizes(&image.kv);
    if sizes != checkpoint.sizes {
        tracing::error!(
            index = ?index,
            opened = ?sizes,
            counted = ?checkpoint.sizes,
            "checkpoint not used: the state and its changes do not add up to the state it counted; the log is replayed from the snapshot"
        );
        return None;
    }
    Some(image)
}

/// The state a chain of checkpoints resumes (see `StateMachineStore::resume`):
/// the whole one at `path`, then each record of the log at `log` that
/// follows on from the state reached, over `kv` (the plugin data opened
/// from the snapshot at `snapshot`, at `opened`); none when no checkpoint
/// of it serves. With the changes and the records applied.
fn resume_chain(
    path: &std::path::Path,
    log: &std::path::Path,
    kv: &KvState,
    snapshot: Option<u64>,
    opened: Option<LogId<NodeId>>,
) -> (Option<Image<KvState>>, usize, usize) {
    let mut changes = 0;
    // The state resumed so far, past the one opened.
    let mut resumed = read_whole_checkpoint(path, kv, snapshot, opened, &mut changes);
    let records = read_checkpoint_log(log).unwrap_or_else(|e| {
        tracing::warn!(file = %log.display(), error = %e, "checkpoint log not readable; the log is replayed from the last checkpoint");
        Vec::new()
    });
    let mut applied = 0;
    for body in &records {
        let delta: CheckpointDelta<crate::state::ChangesImage> = match postcard::from_bytes(body) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "a checkpoint log record is not readable; it and the ones after are not used");
                break;
            }
        };
        let at = resumed.as_ref().map_or(opened, |image| image.log_id);
        if delta.after != at {
            // Of an earlier checkpoint (the log is emptied after the
            // whole checkpoint is written, and a crash in between
            // leaves it), or after a state this restart did not reach.
            continue;
        }
        // Moved, not cloned: a clone would make each write copy its
        // path. So a record that does not add up costs what was
        // resumed before it too, and the log is replayed from the
        // snapshot (as for a whole checkpoint that does not).
        let base = match resumed.take() {
            Some(image) => image.kv,
            None => kv.clone(),
        };
        let Some(image) = apply_checkpoint(base, delta.checkpoint, &mut changes) else { break };
        resumed = Some(image);
        applied += 1;
    }
    (resumed, changes, applied)
}

/// The state of the whole checkpoint at `path` (`kv`, the plugin data
/// opened from the snapshot at log index `snapshot`, with its changes),
/// if there is one, it is relative to that snapshot (or was written
/// while it was built) and it is later than `reached`. Counts its changes
/// into `changes`.
fn read_whole_checkpoint(
    path: &std::path::Path,
    kv: &KvState,
    snapshot: Option<u64>,
    reached: Option<LogId<NodeId>>,
    changes: &mut usize,
) -> Option<Image<KvState>> {
    let body = match read_checkpoint(path) {
        Ok(body) => body?,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "checkpoint not used; the log is replayed from the snapshot");
            return None;
        }
    };
    let checkpoint = match postcard::from_bytes::<Checkpoint<crate::state::ChangesImage>>(body.data()) {
        Ok(checkpoint) => checkpoint,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "checkpoint not readable; the log is replayed from the snapshot");
            return None;
        }
    };
    let index = checkpoint.image.log_id.map(|l| l.index);
    let serves = checkpoint.snapshot == snapshot || snapshot.is_some_and(|s| checkpoint.captures.contains(&s));
    if !serves || checkpoint.image.log_id <= reached {
        tracing::info!(
            file = %path.display(),
            snapshot = ?snapshot,
            checkpoint_snapshot = ?checkpoint.snapshot,
            index = ?index,
            "checkpoint not used: it belongs to another snapshot, or is not newer"
        );
        return None;
    }
    apply_checkpoint(kv.clone(), checkpoint, changes)
}

/// Each namespace's (name, keys, key and value bytes).
fn namespace_sizes(kv: &KvState) -> Vec<(String, u64, u64)> {
    kv.namespaces().map(|(name, ns)| (name.to_owned(), ns.len() as u64, ns.bytes())).collect()
}

/// Opens of `snapshot.bin` tried, 10 ms apart, when one misses it while a
/// snapshot is stored or being replaced (see `get_current_snapshot`).
const SNAPSHOT_OPEN_ATTEMPTS: u32 = 100;

/// Entries applied after a checkpoint before the next one is written.
const CHECKPOINT_AFTER_ENTRIES: u64 = 200;

/// Least time between two checkpoints.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Changed entries (counted per layer: a key written before and after a
/// capture counts twice) past which no whole `checkpoint.bin` is written,
/// unless they are at most a [`WHOLE_CHECKPOINT_SHARE`]th of the state
/// (then it is written paced, see [`whole_checkpoint_cap`]): it would cost
/// about as much as the snapshot that will follow (the plugin data was
/// loaded while no snapshot was taken yet, say). Past the cap, the
/// changes since a snapshot being built may go to `checkpoint.next.bin`.
const CHECKPOINT_MAX_CHANGES: usize = if cfg!(test) { 4_096 } else { 262_144 };

/// A whole checkpoint may hold the changes of up to this share of the
/// state's keys (1 in 8: at 10M keys 1.25M, about 140 MB, beside the
/// 1.1 GB each snapshot writes): the changes since the snapshot a node
/// last finished, right after a bulk load, while the snapshot holding the
/// load is built. Without it, a node killed during that build (20–40 s
/// at 10M keys) replayed the load's tail and all since (15.7 s in one
/// state-bench run). Over [`CHECKPOINT_MAX_CHANGES`] it is encoded
/// straight into the file and paced like a snapshot.
const WHOLE_CHECKPOINT_SHARE: usize = 8;

/// The most changes a whole `checkpoint.bin` of `kv` holds.
fn whole_checkpoint_cap(kv: &KvState) -> usize {
    CHECKPOINT_MAX_CHANGES.max(usize::try_from(kv.size().0).unwrap_or(usize::MAX) / WHOLE_CHECKPOINT_SHARE)
}

/// Changed entries past which no checkpoint relative to a snapshot being
/// built is written (`checkpoint.next.bin`, and each record of its log):
/// during a bulk load, none is (each would cost about what the load
/// writes).
const NEXT_MAX_CHANGES: usize = if cfg!(test) { 1_024 } else { 32_768 };

/// Records in `checkpoint.log` past which the next checkpoint is written
/// whole instead (a restart reads and applies each record).
const CHECKPOINT_MAX_RECORDS: u32 = 256;

/// A node's checkpoint files, in its data dir.
#[derive(Clone)]
struct CheckpointFiles {
    /// `checkpoint.bin`: a whole checkpoint.
    path: PathBuf,
    /// `checkpoint.log`: the checkpoints since, as changes.
    log: PathBuf,
    /// `checkpoint.next.bin`: a whole checkpoint relative to a snapshot
    /// still being built, written only while the changes since the last
    /// one written are too many for `checkpoint.bin` (the build after a
    /// bulk load): it serves once that snapshot is in place.
    next: PathBuf,
    /// `checkpoint.next.log`: the checkpoints since `checkpoint.next.bin`,
    /// as changes.
    next_log: PathBuf,
}

impl CheckpointFiles {
    fn in_dir(data_dir: &std::path::Path) -> CheckpointFiles {
        CheckpointFiles {
            path: data_dir.join("checkpoint.bin"),
            log: data_dir.join("checkpoint.log"),
            next: data_dir.join("checkpoint.next.bin"),
            next_log: data_dir.join("checkpoint.next.log"),
        }
    }
}

/// When the apply thread writes checkpoints, and where.
struct Checkpoints {
    files: CheckpointFiles,
    /// A checkpoint is being written.
    writing: Arc<std::sync::atomic::AtomicBool>,
    last_index: u64,
    last_at: std::time::Instant,
}

impl Checkpoints {
    /// Write a checkpoint of the state now, in the background, if one is
    /// due and none is being written (see [`write_checkpoint_of`]).
    fn maybe(&mut self, shared: &Arc<Shared>) {
        if self.writing.load(Ordering::Acquire) || self.last_at.elapsed() < CHECKPOINT_INTERVAL {
            return;
        }
        let Ok(replica) = shared.replica.read() else { return };
        let index = replica.log_id().map_or(0, |l| l.index);
        if index < self.last_index + CHECKPOINT_AFTER_ENTRIES {
            return;
        }
        (self.last_index, self.last_at) = (index, std::time::Instant::now());
        let Some(snapshot) = replica.kv().checkpoint_base() else { return };
        // Read under the replica's lock: a rebase or a replacement of the
        // state cuts the chain under it too.
        let Ok(generation) = shared.checkpoint_chain.lock().map(|c| c.generation) else { return };
        let captured = replica.capture();
        drop(replica);
        self.writing.store(true, Ordering::Release);
        let (files, writing, shared) = (self.files.clone(), self.writing.clone(), shared.clone());
        let spawned = spawn_background(move || {
            write_checkpoint_of(&shared, &files, captured, snapshot, generation);
            writing.store(false, Ordering::Release);
        });
        if spawned.is_err() {
            self.writing.store(false, Ordering::Release);
        }
    }
}

/// Write a checkpoint of `captured` (a capture of the state, whose
/// plugin data's bases are read from the snapshot at `snapshot`, taken
/// at chain `generation`): the changes since the last checkpoint, when
/// the state is layered as it was then (no snapshot froze or rebased it
/// in between), else the whole changes since the snapshot. When those are
/// more than [`whole_checkpoint_cap`] (a bulk load since the snapshot),
/// the changes since the capture of the snapshot being built instead, to
/// `checkpoint.next.bin` and then `checkpoint.next.log` the same way, while
/// they are at most [`NEXT_MAX_CHANGES`]; else none.
fn write_checkpoint_of(
    shared: &Shared,
    files: &CheckpointFiles,
    captured: Captured,
    snapshot: Option<u64>,
    generation: u64,
) {
    let started = std::time::Instant::now();
    let mut image = captured.into_state();
    let kv = std::mem::take(&mut image.kv);
    let log_id = image.log_id;
    let index = log_id.map_or(0, |l| l.index);
    let sizes = namespace_sizes(&kv);
    let captures = kv.captures().to_vec();
    // The changes since a link of a chain (taken out while this writes:
    // put back only if this is written), if layered alike and not too many
    // records since its whole checkpoint.
    let take = |next: bool| {
        shared.checkpoint_chain.lock().ok().and_then(|mut c| if next { c.next.take() } else { c.last.take() })
    };
    fn since<'a>(
        kv: &'a KvState,
        earlier: &'a Option<ChainLink>,
    ) -> Option<(Option<LogId<NodeId>>, u32, ChangesSince<'a>)> {
        earlier
            .as_ref()
            .filter(|e| e.records < CHECKPOINT_MAX_RECORDS)
            .and_then(|e| kv.changes_since(&e.kv).map(|changes| (e.log_id, e.records, changes)))
    }
    let delta = |log: &std::path::Path, image: Image<KvState>, after, records, changes: ChangesSince<'_>, snapshot| {
        let n = changes.len();
        let image = image.map_kv(|_| changes);
        let (captures, sizes) = (captures.clone(), sizes.clone());
        let delta = CheckpointDelta { after, checkpoint: Checkpoint { snapshot, captures, image, sizes } };
        postcard::to_allocvec(&delta)
            .map_err(std::io::Error::other)
            .and_then(|body| append_checkpoint_log(log, &body).map(|()| (body.len(), n, records + 1)))
    };
    let earlier = take(false);
    let n = kv.changed_entries();
    let (written, next) = match since(&kv, &earlier) {
        Some((after, records, changes)) => (delta(&files.log, image, after, records, changes, snapshot), false),
        None if n <= whole_checkpoint_cap(&kv) => {
            let image = image.map_kv(|_| crate::state::Changes(&kv));
            let checkpoint = Checkpoint { snapshot, captures, image, sizes };
            let paced = n > CHECKPOINT_MAX_CHANGES;
            let written = write_whole_checkpoint(&files.path, &files.log, &checkpoint, paced).and_then(|bytes| {
                // Its files go: so does the link to them, even if one of
                // the removals fails (a record appended to what is left
                // would follow no whole checkpoint).
                drop(take(true));
                remove_if_there(&files.next)?;
                remove_if_there(&files.next_log)?;
                Ok((bytes, n, 0))
            });
            (written, false)
        }
        None => {
            let Some((at, changes)) = kv.changes_since_capture() else { return };
            let earlier = take(true);
            let written = match since(&kv, &earlier) {
                Some((after, records, changes)) if changes.len() <= NEXT_MAX_CHANGES => {
                    delta(&files.next_log, image, after, records, changes, Some(at))
                }
                Some(_) => return,
                None if changes.len() <= NEXT_MAX_CHANGES => {
                    let n = changes.len();
                    let image = image.map_kv(|_| changes);
                    let checkpoint = Checkpoint { snapshot: Some(at), captures: Vec::new(), image, sizes };
                    write_whole_checkpoint(&files.next, &files.next_log, &checkpoint, false).map(|bytes| (bytes, n, 0))
                }
                None => return,
            };
            (written, true)
        }
    };
    match written {
        Ok((bytes, changes, records)) => {
            tracing::debug!(
                index,
                snapshot,
                changes,
                bytes,
                whole = records == 0,
                next,
                seconds = started.elapsed().as_secs_f64(),
                "checkpoint written"
            );
            if let Ok(mut chain) = shared.checkpoint_chain.lock()
                && chain.generation == generation
            {
                let link = Some(ChainLink { log_id, kv, records });
                if next { chain.next = link } else { chain.last = link }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot write a checkpoint; a restart replays more of the log"),
    }
}

/// Write `checkpoint` whole to `path` (encoded straight into the file and
/// paced, when `paced`; else encoded in memory and written at once), then
/// empty `log`, whose records followed the checkpoint it replaces.
/// Returns its bytes.
fn write_whole_checkpoint(
    path: &std::path::Path,
    log: &std::path::Path,
    checkpoint: &impl Serialize,
    paced: bool,
) -> std::io::Result<usize> {
    let bytes = if paced {
        let bytes = write_checkpoint_paced(path, |out| {
            postcard::to_io(checkpoint, out).map(drop).map_err(std::io::Error::other)
        })?;
        usize::try_from(bytes).unwrap_or(usize::MAX)
    } else {
        let body = postcard::to_allocvec(checkpoint).map_err(std::io::Error::other)?;
        write_checkpoint(path, &body)?;
        body.len()
    };
    clear_checkpoint_log(log)?;
    Ok(bytes)
}

/// Remove `path` if it is there.
fn remove_if_there(path: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Entries handed to the apply thread, and where their responses go.
type ApplyJob = (Vec<Entry<TypeConfig>>, tokio::sync::oneshot::Sender<std::result::Result<Vec<Response>, String>>);

/// The openraft state machine store of one node.
#[derive(Clone)]
pub struct StateMachineStore {
    /// Shared with readers.
    shared: Arc<Shared>,
    /// Plugin bytes and compiled plugins.
    artifacts: Arc<Artifacts>,
    /// Peers, for bytes this node lacks.
    blobs: Arc<dyn BlobSource>,
    /// `snapshot.bin` in the data dir.
    snapshot_path: PathBuf,
    /// The apply thread's queue.
    apply: std::sync::mpsc::Sender<ApplyJob>,
    /// The snapshot file `open` checked and restored, until openraft's
    /// first `get_current_snapshot`.
    opened: Arc<std::sync::Mutex<Option<FileId>>>,
    /// The log id of the snapshot `snapshot.bin` holds, held while it is
    /// replaced: openraft builds a snapshot on a task of its own, so a
    /// build captured before a newer snapshot was installed can finish
    /// after it, and must not put the older one back (the log up to the
    /// installed one may be purged by then).
    stored: Arc<std::sync::Mutex<Option<LogId<NodeId>>>>,
}

fn sm_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&std::io::Error::other(e.to_string())).into()
}

fn snap_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read_snapshot(None, &std::io::Error::other(e.to_string())).into()
}

/// The apply thread: applies each job's entries in order, one entry per
/// hold of the replica's write lock.
fn apply_thread(
    shared: Arc<Shared>,
    artifacts: Arc<Artifacts>,
    jobs: std::sync::mpsc::Receiver<ApplyJob>,
    mut checkpoints: Checkpoints,
) {
    while let Ok((entries, reply)) = jobs.recv() {
        let started = std::time::Instant::now();
        let count = entries.len();
        let mut responses = Vec::with_capacity(entries.len());
        let mut failed = None;
        let membership_changed = entries.iter().any(|e| matches!(e.payload, EntryPayload::Membership(_)));
        let mut changed_devices = Vec::new();
        for entry in entries {
            let applied = match shared.replica.write() {
                Ok(mut replica) => {
                    let r =
                        replica.apply_entry(entry.log_id, entry.payload, artifacts.as_ref()).map_err(|e| e.to_string());
                    changed_devices.extend(replica.take_device_changes());
                    if replica.take_auth_changed() {
                        shared.publish_auth(&replica);
                    }
                    if let Some(bulk) = replica.take_bulk_changed() {
                        shared.note_bulk_commands(bulk);
                    }
                    r
                }
                Err(_) => Err("replica lock poisoned".to_owned()),
            };
            match applied {
                Ok(r) => responses.push(r),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        shared.note_device_changes(changed_devices);
        if let Ok(replica) = shared.replica.read() {
            let (keys, bytes) = replica.kv().size();
            shared.state_bytes.store(bytes, Ordering::Relaxed);
            let m = crate::metrics::get();
            crate::metrics::set(&m.state_keys, keys);
            crate::metrics::set(&m.state_bytes, bytes);
            shared.note_unsnapshotted(replica.kv());
            if shared.snapshot_due(&replica).is_some() {
                shared.snapshot_wanted.notify_one();
            }
        }
        if membership_changed && let Ok(replica) = shared.replica.read() {
            shared.membership.send_replace(replica.membership().clone());
        }
        let took = started.elapsed();
        if took >= crate::metrics::SLOW {
            // Every write behind these entries waited for them.
            tracing::warn!(entries = count, ms = took.as_millis() as u64, "applying entries was slow");
        }
        let ok = failed.is_none();
        let _ = reply.send(match failed {
            None => Ok(responses),
            Some(e) => Err(e),
        });
        if ok {
            checkpoints.maybe(&shared);
        }
    }
}

impl StateMachineStore {
    /// Open the store, resuming from the snapshot in `data_dir` if any, and
    /// start its apply thread.
    pub fn open(
        data_dir: &std::path::Path,
        artifacts: Arc<Artifacts>,
        blobs: Arc<dyn BlobSource>,
    ) -> Result<StateMachineStore> {
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            replica: RwLock::new(Replica::default()),
            divergence: Default::default(),
            membership: tokio::sync::watch::Sender::new(StoredMembership::default()),
            device_changes: Default::default(),
            devices_changed: tokio::sync::watch::Sender::new(0),
            tokens: Default::default(),
            auth_bootstrapped: Default::default(),
            state_bytes: Default::default(),
            snapshot_wanted: Default::default(),
            checkpoint_chain: std::sync::Mutex::new(CheckpointChain { generation: 0, last: None, next: None }),
            snapshot_index: Default::default(),
            snapshot_after_entries: AtomicU64::new(crate::config::RaftConfig::default().snapshot_after_entries),
            max_unsnapshotted_changes: Default::default(),
            unsnapshotted: Default::default(),
            unsnapshotted_limit: Default::default(),
            peers_unsnapshotted: Default::default(),
            backlog_changed: Default::default(),
            bulk_commands: Default::default(),
        });
        let store = StateMachineStore {
            shared: shared.clone(),
            artifacts: artifacts.clone(),
            blobs,
            snapshot_path: data_dir.join("snapshot.bin"),
            apply: tx,
            opened: Default::default(),
            stored: Default::default(),
        };
        // Builds this node did not finish (it was killed or lost power):
        // each is as large as the state, and nothing else will remove it.
        remove_unfinished(&store.snapshot_path).map_err(snap_err)?;
        let started = std::time::Instant::now();
        let mut snapshot = None;
        if let Some(file) = StoredSnapshot::open_unchecked(&store.snapshot_path).map_err(snap_err)? {
            // Hashed on one core while decoded on another; nothing decoded
            // is used before the checksum matches.
            let decoded = std::thread::scope(|s| {
                let check = s.spawn(|| file.check());
                let decoded = decode_mapped_snapshot(file.mapped(), &file.meta);
                check.join().map_err(|_| snap_err("the checksum thread panicked"))?.map_err(snap_err)?;
                decoded
            })?;
            store.install(&file.meta, decoded)?;
            *store.opened.lock().map_err(sm_err)? = Some(file.id);
            *store.stored.lock().map_err(sm_err)? = file.meta.last_log_id;
            store.shared.note_snapshot(file.meta.last_log_id);
            snapshot = file.meta.last_log_id.map(|l| l.index);
            let (keys, bytes) = store.shared.replica.read().map_err(sm_err)?.kv().size();
            tracing::info!(
                index = ?file.meta.last_log_id.map(|l| l.index),
                keys,
                bytes,
                seconds = started.elapsed().as_secs_f64(),
                "state opened from its snapshot"
            );
        }
        let files = CheckpointFiles::in_dir(data_dir);
        remove_unfinished(&files.path).map_err(snap_err)?;
        store.resume(&files, snapshot)?;
        let checkpoints = Checkpoints {
            files,
            writing: Default::default(),
            last_index: store.shared.replica.read().map_err(sm_err)?.log_id().map_or(0, |l| l.index),
            last_at: std::time::Instant::now(),
        };
        std::thread::Builder::new()
            .name("synod-apply".into())
            .spawn(move || apply_thread(shared, artifacts, rx, checkpoints))
            .map_err(sm_err)?;
        Ok(store)
    }

    /// What readers share with this store.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Replace the whole state with a snapshot's, after checking that the
    /// snapshot's label and the state inside it agree.
    fn restore(&self, meta: &SnapshotMeta<NodeId, NodeInfo>, data: &MappedData) -> Result<()> {
        self.install(meta, decode_mapped_snapshot(data, meta)?)
    }

    /// Replace the whole state with a decoded snapshot's (see
    /// [`StateMachineStore::restore`]).
    fn install(&self, meta: &SnapshotMeta<NodeId, NodeInfo>, data: SnapshotData) -> Result<()> {
        if data.image.log_id != meta.last_log_id {
            return Err(snap_err(format!(
                "snapshot {} is labelled {:?} but holds the state at {:?}",
                meta.snapshot_id, meta.last_log_id, data.image.log_id
            )));
        }
        store_blobs(&self.artifacts, &data.blobs).map_err(snap_err)?;
        self.install_image(data.image)
    }

    /// Resume from the checkpoint `checkpoint.bin`, if there is one and it
    /// is relative to the snapshot (at log index `snapshot`) the state was
    /// just opened from, or was written while that snapshot was built
    /// (its `captures`), and later; then from each record of the
    /// checkpoint log that follows the state reached, in order: the state
    /// becomes the last one's, and a restart replays only the entries
    /// after it. `checkpoint.next.bin` instead when it is relative to that
    /// snapshot and later still. A damaged or stale checkpoint is set
    /// aside with a warning (the log holds every entry it saved
    /// replaying), and so is a damaged record and every record after it; a
    /// checkpoint or record whose changes do not add up sets aside all of
    /// them (the log is replayed from the snapshot).
    fn resume(&self, files: &CheckpointFiles, snapshot: Option<u64>) -> Result<()> {
        let started = std::time::Instant::now();
        let (opened, kv) = {
            let replica = self.shared.replica.read().map_err(sm_err)?;
            (replica.log_id(), replica.kv().clone())
        };
        let mut resumed = resume_chain(&files.path, &files.log, &kv, snapshot, opened);
        let next = resume_chain(&files.next, &files.next_log, &kv, snapshot, opened);
        let from_next = next.0.as_ref().map(|image| image.log_id) > resumed.0.as_ref().map(|image| image.log_id);
        if from_next {
            resumed = next;
        }
        if let (Some(image), changes, records) = resumed {
            let index = image.log_id.map(|l| l.index);
            drop(kv);
            self.install_image(image)?;
            tracing::info!(
                index = ?index,
                changes,
                records,
                next = from_next,
                seconds = started.elapsed().as_secs_f64(),
                "state resumed from its checkpoint"
            );
        }
        Ok(())
    }

    /// Replace the whole state with `image`'s.
    fn install_image(&self, image: Image<KvState>) -> Result<()> {
        let replica = Replica::restore(image, self.artifacts.as_ref()).map_err(snap_err)?;
        let membership = replica.membership().clone();
        let ids: Vec<String> = replica.devices().view().keys().cloned().collect();
        let before: Vec<String> =
            self.shared.replica.read().map(|r| r.devices().view().keys().cloned().collect()).unwrap_or_default();
        self.shared.publish_auth(&replica);
        self.shared.state_bytes.store(replica.kv().size().1, Ordering::Relaxed);
        self.shared.note_unsnapshotted(replica.kv());
        // A restored replica knows no bulk commands yet (not replicated).
        self.shared.note_bulk_commands(BTreeMap::new());
        let mut held = self.shared.replica.write().map_err(sm_err)?;
        *held = replica;
        self.shared.cut_checkpoint_chain();
        drop(held);
        // Every device may have changed, including those the snapshot drops.
        self.shared.note_device_changes(ids.into_iter().chain(before).collect());
        self.shared.membership.send_replace(membership);
        Ok(())
    }

    /// Make sure this node has the bytes of `sha256`, fetching them from a
    /// peer if not.
    async fn ensure_bytes(&self, sha256: &str) -> Result<()> {
        if self.artifacts.has(sha256) {
            return Ok(());
        }
        let mut last = String::new();
        for attempt in 0..20u64 {
            match self.blobs.fetch(sha256.to_owned()).await {
                Ok(bytes) => match self.artifacts.put(&bytes) {
                    Ok(sha) if sha == sha256 => return Ok(()),
                    Ok(sha) => last = format!("a peer sent bytes hashing to {sha}"),
                    Err(e) => return Err(sm_err(e)),
                },
                Err(e) => last = e,
            }
            tokio::time::sleep(std::time::Duration::from_millis(100 * (attempt + 1))).await;
        }
        Err(sm_err(format!("plugin bytes {sha256} unavailable: {last}")))
    }

    /// Fetch, before apply, the bytes of every plugin version the entries
    /// install or activate (apply itself never waits for the network).
    async fn prefetch(&self, entries: &[Entry<TypeConfig>]) -> Result<()> {
        let mut wanted = Vec::new();
        for entry in entries {
            let EntryPayload::Normal(request) = &entry.payload else { continue };
            let ops = match &request.op {
                Op::Batch(requests) => requests.iter().map(|r| &r.op).collect(),
                op => vec![op],
            };
            for op in ops {
                match op {
                    Op::InstallPlugin { sha256, .. } => wanted.push(sha256.clone()),
                    Op::ActivatePlugin { name, version } => {
                        let record: Option<VersionRecord> =
                            self.shared.replica.read().map_err(sm_err)?.version(name, version).cloned();
                        if let Some(r) = record {
                            wanted.push(r.sha256);
                        }
                    }
                    _ => {}
                }
            }
        }
        for sha256 in wanted {
            // A malformed hash is refused by the replica as a lifecycle result.
            if crate::artifacts::is_sha256(&sha256) {
                self.ensure_bytes(&sha256).await?;
            }
        }
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        crate::faults::hold_snapshot_build().await;
        let captured = self.capture_for_snapshot()?;
        let this = self.clone();
        // Serialising a large state is CPU work: off the async workers, on
        // a thread of its own that yields to them and to the apply thread.
        in_background(move || this.write_captured(captured)).await.map_err(snap_err)?
    }
}

impl StateMachineStore {
    /// The state between two entries, whole, with the writes since the
    /// last snapshot frozen (O(namespaces)): one take of the lock.
    fn capture_for_snapshot(&self) -> Result<(std::time::Instant, Captured)> {
        let started = std::time::Instant::now();
        Ok((started, self.shared.replica.write().map_err(sm_err)?.capture_for_snapshot()))
    }

    /// Write `captured` to `snapshot.bin` and read the state's plugin data
    /// from there from now on; unless `snapshot.bin` holds a newer
    /// snapshot by then (one was installed meanwhile), which stays.
    fn write_captured(&self, (started, captured): (std::time::Instant, Captured)) -> Result<Snapshot<TypeConfig>> {
        let log_id = captured.log_id();
        let blobs = plugin_blobs(captured.registry(), &self.artifacts).map_err(snap_err)?;
        let image = captured.state();
        // The membership inside the image: the one at `log_id`.
        let last_membership = image.membership.clone();
        let snapshot_id = match log_id {
            Some(id) => format!("{}-{}", id.leader_id, id.index),
            None => "empty".to_owned(),
        };
        let meta = SnapshotMeta { last_log_id: log_id, last_membership, snapshot_id };
        let mut stored = self.stored.lock().map_err(snap_err)?;
        if stored.is_some() && *stored >= log_id {
            // `snapshot.bin` holds this state or a later one (installed
            // while this was built): it stays, and is what this build
            // gives openraft (which keeps only the meta of a snapshot it
            // built, and ignores one not newer than its own). The state,
            // replaced by an install, is not rebased.
            tracing::info!(
                index = log_id.map_or(0, |id| id.index),
                stored = stored.map_or(0, |id| id.index),
                "snapshot not written: snapshot.bin holds this state or a later one"
            );
            let kept = StoredSnapshot::open(&self.snapshot_path)
                .map_err(snap_err)?
                .ok_or_else(|| snap_err("snapshot.bin is gone"))?;
            drop(stored);
            return Ok(Snapshot { meta: kept.meta.clone(), snapshot: Box::new(kept.into_bytes().map_err(snap_err)?) });
        }
        // Encoded from the shared trees straight into the file: no plain
        // copy of the state and no encoded copy in memory while encoding
        // (the size is counted in a first pass).
        let (size, bytes) =
            write_state(&self.snapshot_path, &meta, &SnapshotDataRef { image, blobs: &blobs }).map_err(snap_err)?;
        *stored = log_id;
        self.shared.note_snapshot(log_id);
        drop(stored);
        let m = crate::metrics::get();
        m.snapshots.inc();
        crate::metrics::set(&m.snapshot_bytes, size);
        m.snapshot_seconds.observe(started.elapsed().as_secs_f64());
        tracing::info!(
            index = log_id.map_or(0, |id| id.index),
            bytes = size,
            seconds = started.elapsed().as_secs_f64(),
            "snapshot built"
        );
        // From now on the state reads what it holds up to `log_id` from
        // the file just written, and drops its copy in memory.
        let rebasing = std::time::Instant::now();
        match bytes.map_shared().map_err(snap_err).and_then(|m| decode_mapped_snapshot(&m, &meta)) {
            Ok(written) => {
                let frozen = captured.state().kv.frozen_entries();
                if let Ok(mut replica) = self.shared.replica.write() {
                    replica.rebase(&captured, written.image.kv);
                    self.shared.cut_checkpoint_chain();
                    self.shared.note_unsnapshotted(replica.kv());
                }
                // The frozen writes are freed here, with the capture, off
                // the lock.
                drop(captured);
                tracing::debug!(
                    seconds = rebasing.elapsed().as_secs_f64(),
                    frozen,
                    anon_kib = anon_resident_kib(),
                    "state rebased on its snapshot"
                );
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the snapshot just written; the state stays in memory"),
        }
        Ok(Snapshot { meta, snapshot: Box::new(bytes) })
    }
}

/// This process's anonymous resident memory in KiB (`RssAnon`), for a
/// debug line; 0 where unknown.
fn anon_resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("RssAnon:").map(|v| v.trim().trim_end_matches(" kB").to_owned()))
        })
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}

/// Run `work` (a snapshot or a backup: seconds of encoding and writing for
/// a large state) on a thread of its own at a lower CPU priority (nice 10),
/// so that while it runs the apply thread, Raft and the API keep the CPU
/// they need and writes do not wait for it.
async fn in_background<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> std::result::Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    spawn_background(move || {
        let _ = tx.send(work());
    })?;
    rx.await.map_err(|_| "the snapshot thread stopped".to_owned())
}

/// Start `work` on a thread of its own at nice 10 (see [`in_background`]).
fn spawn_background(work: impl FnOnce() + Send + 'static) -> std::result::Result<(), String> {
    std::thread::Builder::new()
        .name("synod-snapshot".into())
        .spawn(move || {
            // SAFETY: plain system calls on this thread's own id.
            let lowered = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
            if lowered != 0 {
                tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the snapshot thread's priority");
            }
            work();
        })
        .map(drop)
        .map_err(|e| e.to_string())
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeInfo>)> {
        let replica = self.shared.replica.read().map_err(sm_err)?;
        Ok((replica.log_id(), replica.membership().clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        // Committed entries arrive here: when, and when they were applied,
        // for command traces (only while traces are exported).
        let timed = crate::telemetry::exporting()
            .then(|| (std::time::SystemTime::now(), entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>()));
        self.prefetch(&entries).await?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.apply.send((entries, reply)).map_err(|_| sm_err("the apply thread has stopped"))?;
        let applied = answer.await.map_err(|_| sm_err("the apply thread has stopped"))?.map_err(sm_err);
        if let Some((committed, indices)) = timed {
            crate::telemetry::record_applied(indices, committed, std::time::SystemTime::now());
        }
        applied
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotBytes>> {
        let dir = self.snapshot_path.parent().unwrap_or(std::path::Path::new("."));
        Ok(Box::new(SnapshotBytes::receive_in(dir).map_err(snap_err)?))
    }

    /// Install a received snapshot: decoded from the file it was received
    /// into (mapped, not read into memory), then copied from it into
    /// `snapshot.bin`.
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<SnapshotBytes>,
    ) -> Result<()> {
        let mapped = snapshot.map().await.map_err(snap_err)?;
        let this = self.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || {
            let mut stored = this.stored.lock().map_err(snap_err)?;
            this.restore(&meta, &mapped)?;
            let data = mapped.data();
            crate::metrics::set(&crate::metrics::get().snapshot_bytes, data.len() as u64);
            write_snapshot(&this.snapshot_path, &meta, data.len() as u64, |w| w.write_all(data)).map_err(snap_err)?;
            *stored = meta.last_log_id;
            this.shared.note_snapshot(meta.last_log_id);
            tracing::info!(
                index = meta.last_log_id.map_or(0, |id| id.index),
                bytes = data.len(),
                "snapshot installed from the leader"
            );
            Ok(())
        })
        .await
        .map_err(snap_err)?
    }

    /// The stored snapshot, checked, as an open file openraft reads chunks
    /// from.
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        let path = self.snapshot_path.clone();
        // openraft asks once as it starts, right after `open` checked the
        // file: that time it is not hashed again (a second pass over a
        // state of gigabytes before the node is ready). Every later ask,
        // to send it, checks it again.
        let trusted = self.opened.lock().map_err(snap_err)?.take();
        let replacing = self.stored.clone();
        let stored = tokio::task::spawn_blocking(move || {
            // On ext4 an open sees the old file or the new one renamed
            // over it. Through a path-based FUSE layer (or a network
            // filesystem) an open racing the rename can miss the name, or
            // open the old file and then fail to `fstat` it, and openraft
            // takes a read error (or "no snapshot" from a leader whose log
            // is purged) as fatal. So a miss is tried again, briefly, while
            // a snapshot is stored or being replaced: the rename takes
            // milliseconds. Not under the replacement lock, which a build
            // holds for its whole write (seconds at millions of keys) while
            // this runs on openraft's state machine worker.
            let (mut trusted, mut attempt) = (trusted, 0);
            loop {
                attempt += 1;
                let missed = match StoredSnapshot::open_trusting(&path, trusted) {
                    Ok(Some(s)) => return Ok(Some(s)),
                    Ok(None) => None,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(e),
                    Err(e) => return Err(e),
                };
                let may_exist = match replacing.try_lock() {
                    Ok(stored) => stored.is_some(),
                    Err(std::sync::TryLockError::WouldBlock) => true,
                    Err(std::sync::TryLockError::Poisoned(e)) => return Err(std::io::Error::other(e.to_string())),
                };
                if !may_exist || attempt >= SNAPSHOT_OPEN_ATTEMPTS {
                    return missed.map_or(Ok(None), Err);
                }
                trusted = None;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        })
        .await
        .map_err(snap_err)?;
        match stored.map_err(snap_err)? {
            None => Ok(None),
            Some(s) => {
                Ok(Some(Snapshot { meta: s.meta.clone(), snapshot: Box::new(s.into_bytes().map_err(snap_err)?) }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::{ArtifactError, Loaded};
    use crate::replica::PluginLoader;
    use crate::state::WriteSet;

    struct NoPlugins;
    impl PluginLoader for NoPlugins {
        fn load(&self, _: &VersionRecord) -> std::result::Result<Loaded, ArtifactError> {
            Err(ArtifactError::Missing("no plugins here".into()))
        }
    }

    /// A state of `plugins` namespaces of `keys` 40-byte values each, at
    /// the log entry (`term`, `index`).
    fn image_of(plugins: u8, keys: u32, (term, index): (u64, u64)) -> crate::replica::Image {
        let mut image = Replica::default().capture().image();
        image.kv = (0..plugins)
            .map(|p| (format!("plugin{p}"), (0..keys).map(|i| (format!("k/{i:06}"), vec![p; 40])).collect()))
            .collect();
        image.log_id = Some(LogId::new(openraft::CommittedLeaderId::new(term, 1), index));
        image.last_applied = index * crate::consensus::types::OPS_PER_ENTRY;
        image
    }

    /// A snapshot streamed from the shared trees into its file holds the
    /// same bytes as the state's plain vectors encode to (the format is
    /// unchanged), and reads back into the same state.
    #[test]
    fn a_streamed_snapshot_is_the_same_data() {
        let image = image_of(3, 5_000, (3, 7));
        let blobs = vec![("abc".to_owned(), vec![1, 2, 3])];
        let captured = Replica::restore(image.clone(), &NoPlugins).unwrap().capture();
        let meta = SnapshotMeta {
            last_log_id: image.log_id,
            last_membership: image.membership.clone(),
            snapshot_id: "3-7".into(),
        };

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.bin");
        let (size, _) = write_state(&path, &meta, &SnapshotDataRef { image: captured.state(), blobs: &blobs }).unwrap();
        let plain = postcard::to_allocvec(&SnapshotData { image: image.clone(), blobs: blobs.clone() }).unwrap();
        assert_eq!(size, plain.len() as u64);
        let stored = StoredSnapshot::open(&path).unwrap().unwrap();
        assert_eq!(stored.meta, meta);
        assert_eq!(stored.data(), &plain[..]);
        let back: SnapshotData = postcard::from_bytes(stored.data()).unwrap();
        assert_eq!(back.image.kv, captured.state().kv);
        assert_eq!(back.blobs, blobs);
    }

    /// `snapshot.bin` at `path` holding `image`, no plugin bytes.
    fn write_image(path: &std::path::Path, image: &crate::replica::Image) {
        let captured = Replica::restore(image.clone(), &NoPlugins).unwrap().capture();
        let meta = SnapshotMeta {
            last_log_id: image.log_id,
            last_membership: image.membership.clone(),
            snapshot_id: "snapshot".into(),
        };
        write_state(path, &meta, &SnapshotDataRef { image: captured.state(), blobs: &[] }).unwrap();
    }

    /// Apply a membership of voters 1, 2 and 3 to `shared`.
    fn voters_1_2_3(shared: &Shared) {
        let info =
            |id: NodeId| NodeInfo { peer_id: format!("p{id}"), p2p_addr: String::new(), http_addr: String::new() };
        let nodes = BTreeMap::from([(1, info(1)), (2, info(2)), (3, info(3))]);
        let membership = openraft::Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes);
        shared.membership.send_replace(StoredMembership::new(None, membership));
    }

    #[test]
    fn the_leader_holds_writes_for_its_own_backlog_and_a_quorums_but_not_one_members() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path()).unwrap();
        let shared = &store.shared;
        shared.note_peer_unsnapshotted(2, 10, 5);
        shared.note_peer_unsnapshotted(3, 10, 5);
        assert_eq!(shared.hold_writes(1, false), None, "no membership applied yet: no quorum to count");
        voters_1_2_3(shared);
        assert_eq!(shared.hold_writes(1, false), Some(Backlogged::Members(vec![2, 3])), "both followers past theirs");
        shared.note_peer_unsnapshotted(3, 5, 5);
        assert_eq!(shared.hold_writes(1, false), None, "one follower past its most holds nothing");
        shared.note_peer_unsnapshotted(3, 10, 0);
        assert_eq!(shared.hold_writes(1, false), None, "a member with no limit is within it");
        shared.unsnapshotted.store(11, Ordering::Relaxed);
        shared.unsnapshotted_limit.store(10, Ordering::Relaxed);
        assert_eq!(shared.hold_writes(1, false), Some(Backlogged::Own { changes: 11, max: 10 }));
    }

    /// Bulk commands are held an eighth of the most sooner than the
    /// others, on the leader's own backlog and on a quorum's.
    #[test]
    fn bulk_commands_are_held_short_of_the_most_and_the_others_at_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path()).unwrap();
        let shared = &store.shared;
        shared.unsnapshotted_limit.store(800, Ordering::Relaxed);
        for (changes, bulk, light) in [(700, None, None), (701, Some(701), None), (800, Some(800), None)] {
            shared.unsnapshotted.store(changes, Ordering::Relaxed);
            let own = |c: Option<u64>| c.map(|changes| Backlogged::Own { changes, max: 800 });
            assert_eq!(shared.hold_writes(1, true), own(bulk), "bulk at {changes}");
            assert_eq!(shared.hold_writes(1, false), own(light), "other at {changes}");
        }
        shared.unsnapshotted.store(801, Ordering::Relaxed);
        assert_eq!(shared.hold_writes(1, false), Some(Backlogged::Own { changes: 801, max: 800 }));
        shared.unsnapshotted.store(0, Ordering::Relaxed);
        voters_1_2_3(shared);
        shared.note_peer_unsnapshotted(2, 750, 800);
        shared.note_peer_unsnapshotted(3, 750, 800);
        assert_eq!(shared.hold_writes(1, true), Some(Backlogged::Members(vec![2, 3])));
        assert_eq!(shared.hold_writes(1, false), None);
        assert!(!shared.is_bulk("p", "fill"));
        shared.note_bulk_commands(BTreeMap::from([("p".to_owned(), BTreeSet::from(["fill".to_owned()]))]));
        assert!(shared.is_bulk("p", "fill"));
        assert!(!shared.is_bulk("p", "set"));
        assert!(!shared.is_bulk("q", "fill"));
    }

    fn open_store(dir: &std::path::Path) -> Result<StateMachineStore> {
        let runtime = Arc::new(crate::runtime::Runtime::new().map_err(sm_err)?);
        let artifacts = Arc::new(Artifacts::open(&dir.join("plugins"), runtime).map_err(sm_err)?);
        StateMachineStore::open(dir, artifacts, Arc::new(NoBlobSource))
    }

    /// A node killed while it built a snapshot left the temp file behind,
    /// as large as the state, and every such kill left another. Opening
    /// the store removes them, and opens the snapshot it has: decoded
    /// while its checksum is checked, and refused if that does not match.
    #[test]
    fn opening_removes_unfinished_builds_and_checks_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let image = image_of(2, 3_000, (4, 11));
        let path = dir.path().join("snapshot.bin");
        write_image(&path, &image);
        for name in ["snapshot.4242.0.tmp", "snapshot.4242.1.tmp", "snapshot.recv.4242.2.tmp"] {
            std::fs::write(dir.path().join(name), vec![0u8; 4096]).unwrap();
        }
        std::fs::write(dir.path().join("keep.tmp"), b"not ours").unwrap();

        let store = open_store(dir.path()).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["keep.tmp", "plugins", "snapshot.bin"]);
        let replica = store.shared.replica.read().unwrap();
        assert_eq!(replica.log_id(), image.log_id);
        assert_eq!(replica.kv().size(), (6_000, 6_000 * (8 + 40)));
        drop(replica);
        drop(store);

        // One bit flipped in the state: the store does not open.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 100;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = open_store(dir.path()).err().expect("a damaged snapshot opened").to_string();
        assert!(err.contains("checksum does not match"), "{err}");
    }

    /// A snapshot at index 11 of two plugins' 3,000 keys written in `dir`,
    /// and the state a store opens from it (read in place from the file).
    fn opened_at_snapshot(dir: &std::path::Path) -> (Image, Image<KvState>) {
        let image = image_of(2, 3_000, (4, 11));
        write_image(&dir.join("snapshot.bin"), &image);
        let store = open_store(dir).unwrap();
        let state = store.shared.replica.read().unwrap().capture().into_state();
        (image, state)
    }

    /// A checkpoint holds the state but for the plugin data, and the plugin
    /// data's changes since the snapshot (sets, overwrites, deletions, a
    /// new namespace): a store opened with one is the checkpoint's state,
    /// read from the snapshot plus those changes. A checkpoint of another
    /// snapshot, a damaged one, or one whose changes do not add up to the
    /// keys and bytes it counted, is not used: the store opens at the
    /// snapshot, as without one.
    #[test]
    fn a_store_opens_at_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (image, mut state) = opened_at_snapshot(dir.path());
        assert_eq!(state.kv.checkpoint_base(), Some(Some(11)));
        let mut writes = WriteSet::default();
        for i in (0..3_000).step_by(7) {
            writes.set(format!("k/{i:06}"), vec![9; i % 50]);
        }
        for i in (1..3_000).step_by(11) {
            writes.delete(format!("k/{i:06}"));
        }
        writes.set("k/new".into(), b"new".to_vec());
        state.kv.apply("plugin1", &writes);
        state.kv.apply("plugin9", &writes);
        state.log_id = Some(LogId::new(openraft::CommittedLeaderId::new(4, 1), 20));
        state.last_applied = 20 * crate::consensus::types::OPS_PER_ENTRY;
        state.digest = [5; 32];
        let expected = state.kv.image();
        let size = state.kv.size();
        // The changes of `changed`, and the sizes `state` counted.
        let write_changes = |snapshot: Option<u64>, state: &Image<KvState>, changed: &KvState| {
            let plain = state.clone();
            let sizes = namespace_sizes(&plain.kv);
            let captures = changed.captures().to_vec();
            let checkpoint =
                Checkpoint { snapshot, captures, image: plain.map_kv(|_| crate::state::Changes(changed)), sizes };
            write_checkpoint(&dir.path().join("checkpoint.bin"), &postcard::to_allocvec(&checkpoint).unwrap()).unwrap();
        };
        let write = |snapshot: Option<u64>, state: &Image<KvState>| write_changes(snapshot, state, &state.kv);
        let opened = reopened;

        write(Some(11), &state);
        let (index, digest, kv, got_size) = opened(dir.path());
        assert_eq!((index, digest), (Some(20), [5; 32]));
        assert!(kv == expected, "the state opened from the checkpoint differs");
        assert_eq!(got_size, size);

        // Relative to another snapshot: not used.
        write(Some(10), &state);
        assert_eq!(opened(dir.path()).0, Some(11));
        // Changes that do not add up to the state counted (a deletion of a
        // key in the snapshot lost): not used.
        let mut lost = state.kv.clone();
        let mut back = WriteSet::default();
        back.set("k/000001".into(), vec![0; 40]);
        lost.apply("plugin1", &back);
        write_changes(Some(11), &state, &lost);
        assert_eq!(opened(dir.path()).0, Some(11));
        // Damaged: not used.
        write(Some(11), &state);
        let path = dir.path().join("checkpoint.bin");
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 10;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let (index, _, kv, _) = opened(dir.path());
        assert_eq!(index, Some(11));
        assert!(kv == image.kv, "a damaged checkpoint changed the state");
    }

    /// Checkpoints after a whole one are records of `checkpoint.log`, each
    /// the plugin data's changes since the one before (overwrites,
    /// deletions, a namespace new since): a store opens at the last record
    /// that follows on from the state reached. A record of another chain
    /// is passed over; a damaged or cut-short record ends the log there;
    /// one that does not add up sets aside every checkpoint.
    #[test]
    fn a_store_resumes_through_its_checkpoint_log() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut state) = opened_at_snapshot(dir.path());
        let log = dir.path().join("checkpoint.log");
        let at = |index: u64| Some(LogId::new(openraft::CommittedLeaderId::new(4, 1), index));
        // Three rounds of writes, each a checkpoint: the first whole.
        let mut states = Vec::new();
        for round in 0..3u8 {
            let mut writes = WriteSet::default();
            for i in (round as usize..3_000).step_by(5 + round as usize) {
                writes.set(format!("k/{i:06}"), vec![round; i % 40]);
            }
            for i in (1 + round as usize..3_000).step_by(13) {
                writes.delete(format!("k/{i:06}"));
            }
            writes.set(format!("k/new{round}"), vec![round]);
            state.kv.apply("plugin1", &writes);
            state.kv.apply(&format!("plugin{}", 5 + round), &writes);
            state.log_id = at(20 * (round as u64 + 1));
            state.digest = [round; 32];
            let sizes = namespace_sizes(&state.kv);
            let captures = state.kv.captures().to_vec();
            match states.last() {
                None => {
                    let plain = state.clone();
                    let image = plain.map_kv(|_| crate::state::Changes(&state.kv));
                    let checkpoint = Checkpoint { snapshot: Some(11), captures, image, sizes };
                    write_checkpoint(&dir.path().join("checkpoint.bin"), &postcard::to_allocvec(&checkpoint).unwrap())
                        .unwrap();
                }
                Some(earlier) => {
                    let earlier: &Image<KvState> = earlier;
                    let changes = state.kv.changes_since(&earlier.kv).expect("layered alike");
                    assert!(changes.len() < state.kv.changed_entries(), "the changes since the last, not all");
                    let plain = state.clone();
                    let delta = CheckpointDelta {
                        after: earlier.log_id,
                        checkpoint: Checkpoint {
                            snapshot: Some(11),
                            captures,
                            image: plain.map_kv(|_| changes),
                            sizes,
                        },
                    };
                    append_checkpoint_log(&log, &postcard::to_allocvec(&delta).unwrap()).unwrap();
                }
            }
            states.push(state.clone());
        }
        let opened = |dir: &std::path::Path| {
            let (index, digest, kv, _) = reopened(dir);
            (index, digest, kv)
        };
        let (index, digest, kv) = opened(dir.path());
        assert_eq!((index, digest), (Some(60), [2; 32]));
        assert!(kv == states[2].kv.image(), "the state opened through the log differs");

        // A record of another chain (after a state not reached), then one
        // cut short: passed over, and the end.
        let mut other = states[2].clone();
        other.log_id = at(70);
        let stray = CheckpointDelta {
            after: at(50),
            checkpoint: Checkpoint {
                snapshot: Some(11),
                captures: Vec::new(),
                sizes: namespace_sizes(&other.kv),
                image: other.map_kv(|_| crate::state::ChangesImage::new()),
            },
        };
        append_checkpoint_log(&log, &postcard::to_allocvec(&stray).unwrap()).unwrap();
        let whole = std::fs::read(&log).unwrap();
        let mut cut = whole.clone();
        cut.extend_from_slice(&whole[..whole.len() / 3]);
        std::fs::write(&log, &cut).unwrap();
        assert_eq!(opened(dir.path()).0, Some(60));

        // The second record damaged: the log ends before it.
        let first = 4 + 8 + 32 + u64::from_le_bytes(whole[4..12].try_into().unwrap()) as usize;
        let mut damaged = whole.clone();
        damaged[first + 50] ^= 1;
        std::fs::write(&log, &damaged).unwrap();
        let (index, _, kv) = opened(dir.path());
        assert_eq!(index, Some(40));
        assert!(kv == states[1].kv.image(), "the state opened through one record differs");

        // A record whose changes do not add up to the keys it counted:
        // none of them is used, the log is replayed from the snapshot.
        let mut wrong: CheckpointDelta<crate::state::ChangesImage> =
            postcard::from_bytes(&whole[4 + 8 + 32..first]).unwrap();
        wrong.checkpoint.sizes[0].1 += 1;
        std::fs::write(&log, b"").unwrap();
        append_checkpoint_log(&log, &postcard::to_allocvec(&wrong).unwrap()).unwrap();
        assert_eq!(opened(dir.path()).0, Some(11));

        // Emptied (a whole checkpoint was written after): the whole one.
        clear_checkpoint_log(&log).unwrap();
        assert_eq!(opened(dir.path()).0, Some(20));
    }

    /// A store opened on `dir`: where it is (log index), its digest,
    /// plugin data and size.
    fn reopened(dir: &std::path::Path) -> (Option<u64>, [u8; 32], Vec<crate::replica::NamespaceImage>, (u64, u64)) {
        let store = open_store(dir).unwrap();
        let replica = store.shared.replica.read().unwrap();
        (replica.log_id().map(|l| l.index), replica.digest().0, replica.kv().image(), replica.kv().size())
    }

    /// Write a checkpoint of `store`'s state now, as the apply thread's
    /// timer would (in the background), on this thread.
    fn checkpoint_now(store: &StateMachineStore, files: &CheckpointFiles) {
        let replica = store.shared.replica.read().unwrap();
        let snapshot = replica.kv().checkpoint_base().expect("layered on the snapshot");
        let generation = store.shared.checkpoint_chain.lock().unwrap().generation;
        let captured = replica.capture();
        drop(replica);
        write_checkpoint_of(&store.shared, files, captured, snapshot, generation);
    }

    /// Put `state` in place as applying entries leaves it: the checkpoint
    /// chain not cut.
    fn applied_in_place(store: &StateMachineStore, state: &Image<KvState>) {
        *store.shared.replica.write().unwrap() = Replica::restore(state.clone(), &NoPlugins).unwrap();
    }

    /// Writes after a snapshot's capture, as of entry `index` (term 4)
    /// with every digest byte `digest`: `after` to `plugin0`, and a key
    /// made and deleted in `plugin1`.
    fn written_after_capture(state: &mut Image<KvState>, after: &WriteSet, index: u64, digest: u8) {
        state.kv.apply("plugin0", after);
        let mut brief = WriteSet::default();
        brief.set("k/brief".into(), b"made after the capture".to_vec());
        state.kv.apply("plugin1", &brief);
        brief.delete("k/brief".into());
        state.kv.apply("plugin1", &brief);
        state.log_id = Some(LogId::new(openraft::CommittedLeaderId::new(4, 1), index));
        state.last_applied = index * crate::consensus::types::OPS_PER_ENTRY;
        state.digest = [digest; 32];
    }

    /// A checkpoint written while a snapshot was being built also serves
    /// that snapshot once it replaces the last one. A node killed between
    /// the new snapshot's rename and its next checkpoint used to replay
    /// every entry since the capture (at 10M keys, 3 of a 4.3 s restart).
    /// Keys made before the capture and deleted after it, and keys made
    /// and deleted after it, come out as they were; a checkpoint that
    /// does not name the snapshot as one of its captures is not used.
    #[test]
    fn a_checkpoint_written_during_a_build_serves_the_snapshot_built() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.bin");
        write_image(&path, &image_of(2, 3_000, (4, 11)));
        let store = open_store(dir.path()).unwrap();
        let mut state = store.shared.replica.read().unwrap().capture().into_state();
        drop(store);
        let at = |index| Some(LogId::new(openraft::CommittedLeaderId::new(4, 1), index));

        // Between the snapshot and the capture: overwrites, a deletion,
        // a key made (deleted after the capture) and a new namespace.
        let mut before = WriteSet::default();
        for i in (0..3_000).step_by(5) {
            before.set(format!("k/{i:06}"), vec![7; i % 30]);
        }
        before.delete("k/000002".into());
        before.set("k/late".into(), b"made before the capture".to_vec());
        state.kv.apply("plugin0", &before);
        state.kv.apply("plugin7", &before);
        state.log_id = at(20);
        state.kv.freeze_at(Some(20));
        let built = state.clone().map_kv(|kv| kv.image());

        // After the capture, while the snapshot is built.
        let mut after = WriteSet::default();
        after.delete("k/late".into());
        after.delete("k/000003".into());
        after.set("k/000005".into(), b"again".to_vec());
        written_after_capture(&mut state, &after, 30, 6);
        assert_eq!(state.kv.checkpoint_base(), Some(Some(11)));
        assert_eq!(state.kv.captures(), [20]);
        let (expected, size) = (state.kv.image(), state.kv.size());
        let write = |captures: Vec<u64>| {
            let plain = state.clone();
            let sizes = namespace_sizes(&plain.kv);
            let checkpoint = Checkpoint {
                snapshot: Some(11),
                captures,
                image: plain.map_kv(|_| crate::state::Changes(&state.kv)),
                sizes,
            };
            write_checkpoint(&dir.path().join("checkpoint.bin"), &postcard::to_allocvec(&checkpoint).unwrap()).unwrap();
        };
        let opened = || reopened(dir.path());

        // The checkpoint, then the snapshot built renamed into place.
        write(state.kv.captures().to_vec());
        write_image(&path, &built);
        let (index, digest, kv, got_size) = opened();
        assert_eq!((index, digest), (Some(30), [6; 32]));
        assert!(kv == expected, "the state opened from the checkpoint differs");
        assert_eq!(got_size, size);

        // Without the capture named: not used, the store opens at the
        // snapshot.
        write(Vec::new());
        assert_eq!(opened().0, Some(20));
    }

    /// After a bulk load, the changes since the snapshot are too many for
    /// a checkpoint, and none was written until the snapshot that holds
    /// the load was built and the state rebased on it (18-30 s at 10M
    /// keys): a node killed right after that build replayed every entry
    /// since (a 3.49 s restart in the state bench). The changes since the
    /// capture of the snapshot being built are written instead, to
    /// `checkpoint.next.bin`, and each one after as the changes since the
    /// one before, to `checkpoint.next.log`, while they are few (none
    /// while the load goes on). A store opened once that snapshot is in
    /// place resumes from them; before, it opened at the snapshot. Until
    /// then they serve nothing, and a whole checkpoint written later
    /// removes them.
    #[test]
    fn after_a_bulk_load_a_checkpoint_serves_the_snapshot_being_built() {
        let dir = tempfile::tempdir().unwrap();
        write_image(&dir.path().join("snapshot.bin"), &image_of(2, 3_000, (4, 11)));
        let store = open_store(dir.path()).unwrap();
        let mut state = store.shared.replica.read().unwrap().capture().into_state();
        let at = |index| Some(LogId::new(openraft::CommittedLeaderId::new(4, 1), index));

        // A load of more keys than a checkpoint takes, then the capture of
        // the snapshot that will hold it.
        let mut load = WriteSet::default();
        for i in 0..2 * CHECKPOINT_MAX_CHANGES {
            load.set(format!("load/{i:07}"), vec![(i % 251) as u8; 20]);
        }
        load.delete("k/000004".into());
        state.kv.apply("plugin0", &load);
        state.log_id = at(40);
        state.last_applied = 40 * crate::consensus::types::OPS_PER_ENTRY;
        state.kv.freeze_at(Some(40));
        let built = state.clone().map_kv(|kv| kv.image());

        // While it is built: overwrites of loaded keys, a deletion of one,
        // a key made and deleted, a new namespace.
        let mut after = WriteSet::default();
        after.set("load/0000007".into(), b"again".to_vec());
        after.delete("load/0000008".into());
        after.set("k/000005".into(), b"after".to_vec());
        state.kv.apply("plugin9", &after);
        written_after_capture(&mut state, &after, 45, 9);
        assert!(state.kv.changed_entries() > CHECKPOINT_MAX_CHANGES);
        store.install_image(state.clone()).unwrap();

        let files = CheckpointFiles::in_dir(dir.path());
        let checkpoint = || checkpoint_now(&store, &files);
        let applied = |state: &Image<KvState>| applied_in_place(&store, state);
        let records = |log: &std::path::Path| read_checkpoint_log(log).unwrap().len();
        checkpoint();
        assert!(!files.path.exists(), "a whole checkpoint of the load was written");
        assert!(files.next.exists(), "no checkpoint relative to the snapshot being built");
        assert_eq!(records(&files.next_log), 0);

        // A second: the changes since the first, appended to its log.
        let mut more = WriteSet::default();
        more.set("load/0000009".into(), b"later".to_vec());
        more.delete("load/0000007".into());
        state.kv.apply("plugin0", &more);
        written_after_capture(&mut state, &WriteSet::default(), 47, 8);
        let (expected, size) = (state.kv.image(), state.kv.size());
        applied(&state);
        checkpoint();
        assert_eq!(records(&files.next_log), 1);

        // A write of more keys than a checkpoint since the capture takes
        // (the load goes on): none written.
        let mut again = WriteSet::default();
        for i in 0..2 * NEXT_MAX_CHANGES {
            again.set(format!("load/{i:07}"), b"again".to_vec());
        }
        state.kv.apply("plugin0", &again);
        written_after_capture(&mut state, &WriteSet::default(), 50, 7);
        applied(&state);
        checkpoint();
        assert_eq!(records(&files.next_log), 1);
        assert!(!files.path.exists());
        drop(store);
        let opened = || reopened(dir.path());

        // Killed before the build finished: the snapshot before the load.
        assert_eq!(opened().0, Some(11));

        // The build renamed into place: the state of the last checkpoint.
        write_image(&dir.path().join("snapshot.bin"), &built);
        let (index, digest, kv, got_size) = opened();
        assert_eq!((index, digest), (Some(47), [8; 32]));
        assert!(kv == expected, "the state opened from the changes since the capture differs");
        assert_eq!(got_size, size);

        // A whole checkpoint written later (the state rebased on the new
        // snapshot) removes them.
        let store = open_store(dir.path()).unwrap();
        let replica = store.shared.replica.read().unwrap();
        let snapshot = replica.kv().checkpoint_base().unwrap();
        assert_eq!(snapshot, Some(40));
        let captured = replica.capture();
        drop(replica);
        write_checkpoint_of(&store.shared, &files, captured, snapshot, 0);
        assert!(files.path.exists() && !files.next.exists() && !files.next_log.exists());
    }

    /// A node killed while it built the snapshot holding a bulk load
    /// opened the snapshot before the load, and a checkpoint of the
    /// load's changes was never written (too many for one): it replayed
    /// the load's tail and everything since (15.7 s at 10M keys). Changes
    /// of up to an eighth of the state are now written whole, encoded
    /// straight into the file, and a restart resumes from them whichever
    /// of the two snapshots it finds.
    #[test]
    fn a_load_of_an_eighth_of_the_state_is_checkpointed_while_its_snapshot_is_built() {
        let dir = tempfile::tempdir().unwrap();
        write_image(&dir.path().join("snapshot.bin"), &image_of(2, 40_000, (4, 11)));
        let store = open_store(dir.path()).unwrap();
        let mut state = store.shared.replica.read().unwrap().capture().into_state();
        let mut load = WriteSet::default();
        for i in 0..CHECKPOINT_MAX_CHANGES + 2_000 {
            load.set(format!("load/{i:07}"), vec![(i % 251) as u8; 30]);
        }
        load.delete("k/000004".into());
        state.kv.apply("plugin0", &load);
        state.log_id = Some(LogId::new(openraft::CommittedLeaderId::new(4, 1), 40));
        state.kv.freeze_at(Some(40));
        let built = state.clone().map_kv(|kv| kv.image());
        let mut after = WriteSet::default();
        after.set("load/0000003".into(), b"after".to_vec());
        after.delete("load/0000005".into());
        written_after_capture(&mut state, &after, 42, 5);
        let n = state.kv.changed_entries();
        assert!(n > CHECKPOINT_MAX_CHANGES && n <= state.kv.size().0 as usize / WHOLE_CHECKPOINT_SHARE);
        store.install_image(state.clone()).unwrap();

        let files = CheckpointFiles::in_dir(dir.path());
        checkpoint_now(&store, &files);
        assert!(files.path.exists(), "no whole checkpoint of the load");
        assert!(!files.next.exists());
        drop(store);
        let opened = || reopened(dir.path());
        // Killed during the build, and after it.
        for _ in 0..2 {
            let (index, digest, kv, size) = opened();
            assert_eq!((index, digest), (Some(42), [5; 32]));
            assert!(kv == state.kv.image(), "the state resumed from the load's checkpoint differs");
            assert_eq!(size, state.kv.size());
            write_image(&dir.path().join("snapshot.bin"), &built);
        }
    }

    /// The two chains side by side. A whole `checkpoint.bin` removes the
    /// files of the chain relative to the snapshot being built, and it
    /// kept their state in memory as the link to append to: the next
    /// checkpoint of that chain went to a `checkpoint.next.log` with no
    /// `checkpoint.next.bin` before it, which a restart cannot use. It
    /// now starts the chain again. Also: when both chains serve the
    /// snapshot opened, the later one is resumed; records left in
    /// `checkpoint.next.log` from before its whole checkpoint (a crash
    /// between the two) are skipped; and a whole `checkpoint.next.bin`
    /// of more changes than its cap is not written.
    #[test]
    fn the_two_checkpoint_chains_start_resume_and_skip_as_they_should() {
        let dir = tempfile::tempdir().unwrap();
        write_image(&dir.path().join("snapshot.bin"), &image_of(2, 3_000, (4, 11)));
        let store = open_store(dir.path()).unwrap();
        let small = store.shared.replica.read().unwrap().capture().into_state();
        let mut state = small.clone();
        let at = |index| Some(LogId::new(openraft::CommittedLeaderId::new(4, 1), index));
        let files = CheckpointFiles::in_dir(dir.path());
        let checkpoint = || checkpoint_now(&store, &files);
        let applied = |state: &Image<KvState>| applied_in_place(&store, state);
        let writes = |state: &mut Image<KvState>, prefix: &str, keys: usize, index: u64| {
            let mut set = WriteSet::default();
            for i in 0..keys {
                set.set(format!("{prefix}/{i:07}"), vec![(index % 251) as u8; 20]);
            }
            state.kv.apply("plugin0", &set);
            written_after_capture(state, &WriteSet::default(), index, index as u8);
        };
        let opened = || reopened(dir.path());
        let records = |log: &std::path::Path| read_checkpoint_log(log).unwrap().len();

        // A load a checkpoint still takes, the capture of the snapshot
        // that holds it, writes after it: a whole checkpoint.bin at 42,
        // naming that capture.
        writes(&mut state, "load", CHECKPOINT_MAX_CHANGES - 600, 39);
        state.log_id = at(40);
        state.kv.freeze_at(Some(40));
        let built = state.clone().map_kv(|kv| kv.image());
        writes(&mut state, "after", 100, 42);
        store.install_image(state.clone()).unwrap();
        checkpoint();
        assert!(files.path.exists() && !files.next.exists());

        // The chain cut (a rebase, say), and writes that take the changes
        // since the snapshot past a checkpoint.bin's cap: a whole
        // checkpoint.next.bin at 47, then a record at 48.
        store.shared.cut_checkpoint_chain();
        writes(&mut state, "after", 700, 47);
        assert!(state.kv.changed_entries() > CHECKPOINT_MAX_CHANGES);
        applied(&state);
        checkpoint();
        assert!(files.next.exists());
        writes(&mut state, "late", 10, 48);
        applied(&state);
        checkpoint();
        assert_eq!(records(&files.next_log), 1);
        let stale = std::fs::read(&files.next_log).unwrap();

        // Both chains serve the built snapshot once it is in place: the
        // later one is resumed. Before, only checkpoint.bin serves.
        let old_snapshot = std::fs::read(dir.path().join("snapshot.bin")).unwrap();
        assert_eq!(opened().0, Some(42));
        write_image(&dir.path().join("snapshot.bin"), &built);
        let (index, _, kv, size) = opened();
        assert_eq!(index, Some(48));
        assert!(kv == state.kv.image(), "the state resumed from the later chain differs");
        assert_eq!(size, state.kv.size());
        std::fs::write(dir.path().join("snapshot.bin"), &old_snapshot).unwrap();

        // A state with few changes since the snapshot (put in place without
        // cutting the chain): a whole checkpoint.bin, which removes the next
        // chain's files.
        let mut few = small.clone();
        writes(&mut few, "few", 10, 49);
        applied(&few);
        checkpoint();
        assert!(files.path.exists() && !files.next.exists() && !files.next_log.exists());

        // Back to the loaded state, written on: the next chain starts again
        // with a whole checkpoint.next.bin, not a record with none before it.
        writes(&mut state, "later", 10, 50);
        applied(&state);
        checkpoint();
        assert!(files.next.exists(), "the next chain appended to a log its whole checkpoint was removed from");
        assert_eq!(records(&files.next_log), 0);

        // Records of the chain before it, left beside it: skipped.
        std::fs::write(&files.next_log, &stale).unwrap();
        write_image(&dir.path().join("snapshot.bin"), &built);
        let (index, _, kv, _) = opened();
        assert_eq!(index, Some(50));
        assert!(kv == state.kv.image(), "the state resumed past stale records differs");

        // The chain cut again, and more changes since the capture than a
        // whole checkpoint.next.bin takes: none written, the one at 50 stays.
        store.shared.cut_checkpoint_chain();
        writes(&mut state, "much", NEXT_MAX_CHANGES, 55);
        applied(&state);
        checkpoint();
        assert_eq!(opened().0, Some(50));
    }

    /// openraft builds a snapshot on a task of its own, so a build captured
    /// before a newer snapshot was installed can finish after it. It wrote
    /// the older snapshot over the installed one, though openraft may have
    /// purged the log up to the installed one: a restart then opened the
    /// older state with the entries after it gone. The installed snapshot
    /// stays, and so does the state.
    #[tokio::test]
    async fn a_build_finishing_after_an_install_leaves_the_installed_snapshot() {
        use tokio::io::AsyncWriteExt as _;
        let dir = tempfile::tempdir().unwrap();
        write_image(&dir.path().join("snapshot.bin"), &image_of(1, 30, (1, 5)));
        let mut store = open_store(dir.path()).unwrap();
        let next = LogId::new(openraft::CommittedLeaderId::new(1, 1), 6);
        store.apply(vec![Entry { log_id: next, payload: EntryPayload::Blank }]).await.unwrap();
        let captured = store.capture_for_snapshot().unwrap();

        let newer = image_of(2, 50, (2, 20));
        let data = postcard::to_allocvec(&SnapshotData { image: newer.clone(), blobs: vec![] }).unwrap();
        let mut received = store.begin_receiving_snapshot().await.unwrap();
        received.write_all(&data).await.unwrap();
        received.flush().await.unwrap();
        let meta = SnapshotMeta {
            last_log_id: newer.log_id,
            last_membership: newer.membership.clone(),
            snapshot_id: "installed".into(),
        };
        store.install_snapshot(&meta, received).await.unwrap();

        let builder = store.clone();
        let built = tokio::task::spawn_blocking(move || builder.write_captured(captured)).await.unwrap().unwrap();
        // What the build gives openraft is the installed snapshot, whole.
        assert_eq!(built.meta.last_log_id, newer.log_id);
        let mut given = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut { built.snapshot }, &mut given).await.unwrap();
        assert_eq!(given, data);
        let current = store.get_current_snapshot().await.unwrap().expect("no snapshot stored");
        assert_eq!(current.meta.last_log_id, newer.log_id, "the build put the older snapshot back");
        let replica = store.shared.replica.read().unwrap();
        assert_eq!((replica.log_id(), replica.kv().size().0), (newer.log_id, 100));
        drop(replica);
        drop(store);
        let reopened = open_store(dir.path()).unwrap();
        assert_eq!(reopened.shared.replica.read().unwrap().log_id(), newer.log_id);
    }

    /// A leader sending its snapshot while a new one is renamed over it
    /// asked for the current snapshot and, on the chaos tests' FUSE disk,
    /// found no file by that name for a moment: openraft took "no
    /// snapshot" as a storage error and the leader stopped. The ask now
    /// tries again while the replacement is under way and reads the new
    /// file.
    #[tokio::test]
    async fn asking_for_the_snapshot_during_its_replacement_gets_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.bin");
        write_image(&path, &image_of(1, 30, (1, 5)));
        let mut store = open_store(dir.path()).unwrap();
        // openraft's first ask, right after open.
        assert!(store.get_current_snapshot().await.unwrap().is_some());

        // A replacement under way: the name is missing while it holds the
        // lock, as the FUSE layer shows it during the rename.
        let (held, named, aside) = (store.stored.clone(), path.clone(), dir.path().join("aside"));
        let (locked, is_locked) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let replacer = std::thread::spawn(move || {
            let _replacing = held.lock().unwrap();
            std::fs::rename(&named, &aside).unwrap();
            locked.send(()).unwrap();
            released.recv().unwrap();
            std::fs::rename(&aside, &named).unwrap();
        });
        is_locked.recv().unwrap();
        let mut asker = store.clone();
        let ask = tokio::spawn(async move { asker.get_current_snapshot().await });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!ask.is_finished(), "the ask did not wait for the replacement");
        release.send(()).unwrap();
        replacer.join().unwrap();
        let got = ask.await.unwrap().unwrap().expect("no snapshot while one was being replaced");
        assert_eq!(got.meta.last_log_id.map(|id| id.index), Some(5));

        // A node that never stored one still has none.
        let empty = tempfile::tempdir().unwrap();
        let mut fresh = open_store(empty.path()).unwrap();
        assert!(fresh.get_current_snapshot().await.unwrap().is_none());
    }

    /// A backup's state comes in pieces of about a MiB as it is encoded,
    /// as many bytes as announced, and they are the snapshot's data.
    #[tokio::test]
    async fn a_backup_is_encoded_in_pieces_as_it_is_read() {
        let image = image_of(4, 20_000, (2, 9));
        let blobs = vec![("abc".to_owned(), vec![7; 3 << 20])];
        let replica = Replica::restore(image.clone(), &NoPlugins).unwrap();
        let plain = postcard::to_allocvec(&SnapshotData { image: image.clone(), blobs: blobs.clone() }).unwrap();

        let mut backup = backup_of(replica.capture(), blobs.clone()).await.unwrap();
        assert_eq!(
            (backup.size, backup.operation_index, backup.log_id),
            (plain.len() as u64, image.last_applied, image.log_id)
        );
        let mut got = Vec::new();
        let mut pieces = 0;
        while let Some(piece) = backup.pieces.recv().await {
            let piece = piece.unwrap();
            // The plugin's bytes come in one write: one piece may hold them.
            assert!(piece.len() < BACKUP_PIECE + (3 << 20), "{}", piece.len());
            got.extend_from_slice(&piece);
            pieces += 1;
        }
        assert!(pieces >= 4, "{pieces} pieces");
        assert!(got == plain, "the pieces are not the snapshot's data");
    }
}
