//! openraft's view of the replicated state machine.
//!
//! In: committed entries, in order, from openraft. Out: each entry applied
//! through [`crate::apply::StateMachine`] (the only writer), its
//! [`Response`], and snapshots: the whole state plus the bytes of every
//! installed plugin, kept durably as `snapshot.bin` in the data dir so a
//! restart resumes from it instead of re-running the whole history.

use std::io::{Cursor, Write};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use futures::future::BoxFuture;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::types::{NodeId, NodeInfo, OPS_PER_ENTRY, Op, Request, Response, TypeConfig};
use crate::apply::{Image, Remembered, StateMachine, VersionRecord};
use crate::artifacts::{ArtifactError, Artifacts};
use crate::runtime::{CommandError, Context};

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
    /// The replicated state.
    pub sm: RwLock<StateMachine>,
    /// Raft bookkeeping of the state machine.
    pub meta: RwLock<Meta>,
    /// Set when a member's digest differed from ours at the same index.
    pub divergence: std::sync::atomic::AtomicBool,
}

/// The state machine's Raft position.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    /// Last entry applied (of any kind).
    pub last_applied: Option<LogId<NodeId>>,
    /// Last membership applied.
    pub membership: StoredMembership<NodeId, NodeInfo>,
}

/// A snapshot as stored and shipped.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, NodeInfo>,
    data: Vec<u8>,
}

/// The state inside a snapshot's data.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    raft: Meta,
    image: Image,
    /// (sha256, bytes) of every installed plugin version.
    blobs: Vec<(String, Vec<u8>)>,
}

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
}

fn sm_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&std::io::Error::other(e.to_string())).into()
}

fn snap_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read_snapshot(None, &std::io::Error::other(e.to_string())).into()
}

impl StateMachineStore {
    /// Open the store, resuming from the snapshot in `data_dir` if any.
    pub fn open(
        data_dir: &std::path::Path,
        artifacts: Arc<Artifacts>,
        blobs: Arc<dyn BlobSource>,
    ) -> Result<StateMachineStore> {
        let store = StateMachineStore {
            shared: Arc::new(Shared {
                sm: RwLock::new(StateMachine::default()),
                meta: RwLock::new(Meta::default()),
                divergence: Default::default(),
            }),
            artifacts,
            blobs,
            snapshot_path: data_dir.join("snapshot.bin"),
        };
        if let Some(file) = store.read_snapshot_file()? {
            store.restore(&file.data)?;
        }
        Ok(store)
    }

    /// What readers share with this store.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    fn read_snapshot_file(&self) -> Result<Option<SnapshotFile>> {
        match std::fs::read(&self.snapshot_path) {
            Ok(bytes) => postcard::from_bytes(&bytes).map(Some).map_err(snap_err),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(snap_err(e)),
        }
    }

    fn write_snapshot_file(&self, file: &SnapshotFile) -> Result<()> {
        let bytes = postcard::to_allocvec(file).map_err(snap_err)?;
        let tmp = self.snapshot_path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(snap_err)?;
        f.write_all(&bytes).map_err(snap_err)?;
        f.sync_all().map_err(snap_err)?;
        std::fs::rename(&tmp, &self.snapshot_path).map_err(snap_err)?;
        if let Some(dir) = self.snapshot_path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(snap_err)?;
        }
        Ok(())
    }

    /// Replace the whole state with a snapshot's data.
    fn restore(&self, data: &[u8]) -> Result<()> {
        let data: SnapshotData = postcard::from_bytes(data).map_err(snap_err)?;
        for (sha256, bytes) in &data.blobs {
            let stored = self.artifacts.put(bytes).map_err(snap_err)?;
            if &stored != sha256 {
                return Err(snap_err(format!("snapshot blob {sha256} hashes to {stored}")));
            }
        }
        let sm = StateMachine::restore(data.image, |v: &VersionRecord| self.artifacts.load(&v.sha256, v.limits))
            .map_err(snap_err)?;
        *self.shared.sm.write().map_err(sm_err)? = sm;
        *self.shared.meta.write().map_err(sm_err)? = data.raft;
        Ok(())
    }

    /// The compiled plugin for `record`, fetching its bytes from a peer first
    /// if this node does not have them.
    async fn plugin_for(&self, record: &VersionRecord) -> Result<Arc<crate::runtime::Plugin>> {
        if !self.artifacts.has(&record.sha256) {
            let mut last = String::new();
            for attempt in 0..20u64 {
                match self.blobs.fetch(record.sha256.clone()).await {
                    Ok(bytes) => match self.artifacts.put(&bytes) {
                        Ok(sha) if sha == record.sha256 => break,
                        Ok(sha) => last = format!("a peer sent bytes hashing to {sha}"),
                        Err(e) => return Err(sm_err(e)),
                    },
                    Err(e) => last = e,
                }
                tokio::time::sleep(std::time::Duration::from_millis(100 * (attempt + 1))).await;
            }
            if !self.artifacts.has(&record.sha256) {
                return Err(sm_err(format!("plugin bytes {} unavailable: {last}", record.sha256)));
            }
        }
        match self.artifacts.load(&record.sha256, record.limits) {
            Ok(p) => Ok(p),
            // Validated before it entered the log; failing here is local.
            Err(e @ ArtifactError::Load(_)) => Err(sm_err(format!("installed plugin no longer loads: {e}"))),
            Err(e) => Err(sm_err(e)),
        }
    }

    /// Apply one log entry's request (a batch: each of its requests).
    async fn apply_entry(&self, log_id: LogId<NodeId>, request: Request) -> Result<Response> {
        let base = log_id.index * OPS_PER_ENTRY;
        match request.op {
            Op::Batch(requests) => {
                if requests.len() as u64 > OPS_PER_ENTRY {
                    return Err(sm_err(format!("entry {} carries more than {OPS_PER_ENTRY} operations", log_id.index)));
                }
                let mut items = Vec::with_capacity(requests.len());
                for (position, r) in requests.into_iter().enumerate() {
                    let item = match r.op {
                        Op::Batch(_) => Response {
                            result: Some(Err(CommandError::Lifecycle { message: "nested batch refused".into() })),
                            index: base + position as u64,
                            ..Response::default()
                        },
                        _ => self.apply_one(log_id.leader_id.term, base + position as u64, r).await?,
                    };
                    items.push(item);
                }
                Ok(Response { index: base, items, ..Response::default() })
            }
            _ => self.apply_one(log_id.leader_id.term, base, request).await,
        }
    }

    /// Apply one operation at operation index `index`.
    async fn apply_one(&self, term: u64, index: u64, request: Request) -> Result<Response> {
        let mut response = self.apply_op(term, index, request).await?;
        response.index = index;
        Ok(response)
    }

    /// A [`crate::apply::ApplyError`] is a local fault: it becomes a storage error, which
    /// stops this node rather than letting it diverge.
    async fn apply_op(&self, term: u64, index: u64, request: Request) -> Result<Response> {
        match request.op {
            Op::Batch(_) => Err(sm_err("nested batch")),
            Op::Command { plugin, command, payload } => {
                let ctx = Context {
                    index,
                    term,
                    timestamp_ms: request.timestamp_ms,
                    caller: request.caller,
                };
                let mut sm = self.shared.sm.write().map_err(sm_err)?;
                if let Some(first) = request.request_id.as_deref().and_then(|id| sm.remembered(id)) {
                    return Ok(Response {
                        result: Some(first.result.clone()),
                        first_index: Some(first.index),
                        ..Response::default()
                    });
                }
                let outcome = sm.apply_command(&ctx, &plugin, &command, &payload).map_err(sm_err)?;
                for line in &outcome.logs {
                    tracing::debug!(target: "synod::plugin", plugin, index, level = line.level, "{}", line.message);
                }
                if let Some(id) = &request.request_id {
                    sm.remember(id, Remembered { index, result: outcome.result.clone() });
                }
                sm.queue_events(index, &plugin, &outcome.events);
                Ok(Response {
                    result: Some(outcome.result),
                    events: outcome.events,
                    fuel_used: outcome.fuel_used,
                    ..Response::default()
                })
            }
            Op::EventsPublished { upto } => {
                self.shared.sm.write().map_err(sm_err)?.mark_published(upto);
                Ok(Response::default())
            }
            Op::InstallPlugin { name, version, sha256, size, limits } => {
                let record = VersionRecord { sha256, size, limits, installed_at: index };
                let plugin = self.plugin_for(&record).await?;
                let mut sm = self.shared.sm.write().map_err(sm_err)?;
                let result = sm.apply_install(index, &name, &version, record, plugin).map_err(sm_err)?;
                Ok(Response { result: Some(result), ..Response::default() })
            }
            Op::ActivatePlugin { name, version } => {
                let record = self.shared.sm.read().map_err(sm_err)?.version(&name, &version).cloned();
                let plugin = match &record {
                    Some(r) => Some(self.plugin_for(r).await?),
                    None => None,
                };
                let mut sm = self.shared.sm.write().map_err(sm_err)?;
                let result = sm.apply_activate(index, &name, &version, plugin).map_err(sm_err)?;
                Ok(Response { result: Some(result), ..Response::default() })
            }
            Op::RemovePlugin { name } => {
                let mut sm = self.shared.sm.write().map_err(sm_err)?;
                let result = sm.apply_remove(index, &name).map_err(sm_err)?;
                Ok(Response { result: Some(result), ..Response::default() })
            }
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let (image, raft) = {
            let sm = self.shared.sm.read().map_err(sm_err)?;
            let meta = self.shared.meta.read().map_err(sm_err)?;
            (sm.image(), meta.clone())
        };
        let mut blobs = Vec::new();
        for record in image.registry.values() {
            for v in record.versions.values() {
                let bytes = self.artifacts.get(&v.sha256).map_err(snap_err)?.ok_or_else(|| {
                    snap_err(format!("plugin bytes {} missing while snapshotting", v.sha256))
                })?;
                blobs.push((v.sha256.clone(), bytes));
            }
        }
        let snapshot_id = match raft.last_applied {
            Some(id) => format!("{}-{}", id.leader_id, id.index),
            None => "empty".to_owned(),
        };
        let meta = SnapshotMeta {
            last_log_id: raft.last_applied,
            last_membership: raft.membership.clone(),
            snapshot_id,
        };
        let data = postcard::to_allocvec(&SnapshotData { raft, image, blobs }).map_err(snap_err)?;
        self.write_snapshot_file(&SnapshotFile { meta: meta.clone(), data: data.clone() })?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeInfo>)> {
        let meta = self.shared.meta.read().map_err(sm_err)?;
        Ok((meta.last_applied, meta.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        for entry in entries {
            let response = match entry.payload {
                EntryPayload::Blank => Response::default(),
                EntryPayload::Normal(request) => self.apply_entry(entry.log_id, request).await?,
                EntryPayload::Membership(m) => {
                    self.shared.meta.write().map_err(sm_err)?.membership =
                        StoredMembership::new(Some(entry.log_id), m);
                    Response::default()
                }
            };
            self.shared.meta.write().map_err(sm_err)?.last_applied = Some(entry.log_id);
            responses.push(response);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        let data = snapshot.into_inner();
        self.restore(&data)?;
        self.write_snapshot_file(&SnapshotFile { meta: meta.clone(), data })
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        Ok(self.read_snapshot_file()?.map(|f| Snapshot {
            meta: f.meta,
            snapshot: Box::new(Cursor::new(f.data)),
        }))
    }
}
