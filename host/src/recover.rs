//! Disaster recovery: `synod recover --force-new-cluster`, offline, on one
//! surviving node's data dir, when a majority of the voters is gone for
//! good and the cluster can no longer elect a leader.
//!
//! It appends one membership entry to the survivor's log naming the
//! survivor as the only voter, in a term above any it has seen, and records
//! its vote for itself in that term. Started again, the node elects itself,
//! commits that entry and everything before it in its log, and serves; new
//! nodes join it as usual (`synod cluster add`).
//!
//! Nothing the survivor holds is dropped: its log is kept whole, including
//! entries it had received but not yet seen committed (they commit now).
//! What is lost is what only the dead nodes had: writes acknowledged with
//! an operation index above the survivor's last log index × 1000 (the
//! command prints that bound). A data dir whose node is running is refused
//! (the node holds `LOCK` while it runs).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use openraft::storage::{RaftLogReader, RaftLogStorage};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership, Vote};
use serde::Serialize;

use crate::consensus::types::OPS_PER_ENTRY;
use crate::consensus::{LogStore, NodeId, NodeInfo};

/// Why a recovery was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// Not a node's data dir, or unreadable.
    #[error("{path}: {reason}")]
    DataDir {
        /// The dir.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A node is running on it.
    #[error(
        "{0}: a node is running on this data dir; stop it first (recovery rewrites its log, which the node holds open)"
    )]
    Running(PathBuf),
    /// The log could not be read or written.
    #[error("the raft log: {0}")]
    Log(String),
}

/// What a forced recovery did.
#[derive(Debug, Serialize)]
pub struct Recovered {
    /// The survivor, now the only voter.
    pub node: NodeId,
    /// Members dropped from the membership.
    pub removed: Vec<NodeId>,
    /// The survivor's last log index before the recovery: every entry up to
    /// it is kept (and commits once the node starts).
    pub last_log_index: u64,
    /// Writes acknowledged with an operation index above this may be lost
    /// (they reached only the dead nodes).
    pub lost_above_operation_index: u64,
    /// The log index of the new membership entry.
    pub membership_index: u64,
    /// The term the node starts from.
    pub term: u64,
}

/// The exclusive lock a running node holds on its data dir.
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    /// Take `dir`/LOCK, or say that a node holds it.
    pub fn take(dir: &Path) -> Result<DataDirLock, RecoverError> {
        use std::os::fd::AsRawFd as _;
        let path = dir.join("LOCK");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| RecoverError::DataDir { path: dir.to_owned(), reason: format!("opening LOCK: {e}") })?;
        // SAFETY: flock on a descriptor this function owns.
        let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if taken != 0 {
            return Err(RecoverError::Running(dir.to_owned()));
        }
        Ok(DataDirLock { _file: file })
    }
}

fn log_err(e: impl std::fmt::Display) -> RecoverError {
    RecoverError::Log(e.to_string())
}

/// Make the node whose data dir is `dir` the only voter of a new cluster
/// that keeps everything in its log.
pub async fn force_new_cluster(dir: &Path, id: NodeId) -> Result<Recovered, RecoverError> {
    if !dir.join("raft-log").is_dir() {
        return Err(RecoverError::DataDir {
            path: dir.to_owned(),
            reason: "no raft-log/ here: not a node's data dir (or the node never started)".into(),
        });
    }
    let _lock = DataDirLock::take(dir)?;
    let mut log = LogStore::open(dir).map_err(log_err)?;
    let state = log.get_log_state().await.map_err(log_err)?;
    let vote = log.read_vote().await.map_err(log_err)?;
    let last = state.last_log_id;
    let last_index = last.map_or(0, |l| l.index);
    let first = state.last_purged_log_id.map_or(0, |l| l.index + 1);

    // The membership in force: the last one in the log, else the
    // snapshot's.
    let mut membership: Option<Membership<NodeId, NodeInfo>> = None;
    if last_index >= first {
        let entries = log.try_get_log_entries(first..=last_index).await.map_err(log_err)?;
        membership = entries.into_iter().rev().find_map(|e| match e.payload {
            EntryPayload::Membership(m) => Some(m),
            _ => None,
        });
    }
    if membership.is_none() {
        membership = crate::consensus::state_machine::snapshot_membership(dir)
            .map_err(|reason| RecoverError::DataDir { path: dir.to_owned(), reason })?;
    }
    let Some(membership) = membership else {
        return Err(RecoverError::DataDir {
            path: dir.to_owned(),
            reason: "no membership in the log or the snapshot: this node never joined a cluster".into(),
        });
    };
    let nodes: BTreeMap<NodeId, NodeInfo> = membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
    let Some(info) = nodes.get(&id).cloned() else {
        return Err(RecoverError::DataDir {
            path: dir.to_owned(),
            reason: format!(
                "node {id} is not a member here (members: {:?}); pass the survivor's own id with --id",
                nodes.keys().collect::<Vec<_>>()
            ),
        });
    };
    let removed: Vec<NodeId> = nodes.keys().copied().filter(|n| *n != id).collect();

    let term = vote.map_or(0, |v| v.leader_id().term).max(last.map_or(0, |l| l.leader_id.term)) + 1;
    let alone = Membership::new(vec![BTreeSet::from([id])], BTreeMap::from([(id, info)]));
    let entry = Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, id), last_index + 1),
        payload: EntryPayload::Membership(alone),
    };
    // The vote first: an entry of a term above the saved vote must never be
    // on disk alone.
    log.save_vote(&Vote::new(term, id)).await.map_err(log_err)?;
    log.append_offline(vec![entry]).map_err(log_err)?;
    Ok(Recovered {
        node: id,
        removed,
        last_log_index: last_index,
        lost_above_operation_index: (last_index + 1) * OPS_PER_ENTRY - 1,
        membership_index: last_index + 1,
        term,
    })
}
