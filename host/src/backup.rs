//! Backups: a consistent image of the replicated state at one log index,
//! and restoring one as a new cluster.
//!
//! A backup file:
//!
//! ```text
//! SYNODBAK1\n
//! <header: one line of JSON, BackupHeader>\n
//! <state: header.state_bytes bytes (a snapshot's state and every plugin's bytes)>
//! \nBLAKE3 <hex of everything before this line>\n
//! ```
//!
//! `GET /v1/backup` streams it (admin only) after a read barrier, so the
//! image holds every write acknowledged before the request; the state is
//! captured between two entries without copying it (apply waits only for
//! the capture) and encoded off the apply path. `synod restore` checks the
//! checksum, that the state inside is the one the header names (operation
//! index and digest), and that it loads on this engine, before it writes
//! anything.

use std::io::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Leads every backup file.
pub const MAGIC: &[u8] = b"SYNODBAK1\n";

/// What a backup holds, in its first line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackupHeader {
    /// The file format (1).
    pub format: u32,
    /// The cluster it came from: a hash of its network key (the key itself
    /// is never in a backup).
    pub cluster: String,
    /// The node that wrote it.
    pub node: u64,
    /// The last log entry the state includes.
    pub log_index: u64,
    /// The last operation applied: the state is the one after it.
    pub operation_index: u64,
    /// The state digest after that operation (what `GET /v1/digest`
    /// shows), hex.
    pub digest: String,
    /// The engine fingerprint hash of the node that wrote it.
    pub engine: String,
    /// When it was taken (the node's clock, Unix ms).
    pub created_at_ms: u64,
    /// Plugins installed.
    pub plugins: Vec<String>,
    /// Devices defined.
    pub devices: usize,
    /// Bytes of the state that follows the header.
    pub state_bytes: u64,
}

/// Why a backup cannot be read or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The file is not a backup, or is damaged.
    #[error("{0}")]
    Invalid(String),
    /// Reading or writing.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The target cannot take it.
    #[error("{0}")]
    Refused(String),
}

/// A cluster's id as backups name it: 16 hex digits of a hash of its
/// network key.
pub fn cluster_id(network_key: Option<&str>) -> String {
    match network_key {
        Some(key) => hex::encode(&blake3::derive_key("synod 2026-11 cluster id", key.as_bytes())[..8]),
        None => "none".into(),
    }
}

/// The bytes before the state: magic and header line.
pub fn preamble(header: &BackupHeader) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&serde_json::to_vec(header).unwrap_or_default());
    out.push(b'\n');
    out
}

/// The line after the state.
pub fn trailer(hash: &blake3::Hash) -> Vec<u8> {
    format!("\nBLAKE3 {}\n", hash.to_hex()).into_bytes()
}

/// Check a whole backup: its header and its state bytes.
pub fn parse(bytes: &[u8]) -> Result<(BackupHeader, &[u8]), BackupError> {
    let invalid = |m: &str| BackupError::Invalid(m.to_owned());
    let rest = bytes.strip_prefix(MAGIC).ok_or_else(|| invalid("not a Synod backup (no SYNODBAK1 line)"))?;
    let line = rest.iter().position(|b| *b == b'\n').ok_or_else(|| invalid("the header line is cut short"))?;
    let header: BackupHeader = serde_json::from_slice(&rest[..line])
        .map_err(|e| BackupError::Invalid(format!("the header does not parse: {e}")))?;
    if header.format != 1 {
        return Err(BackupError::Invalid(format!("backup format {} (this version reads 1)", header.format)));
    }
    let start = MAGIC.len() + line + 1;
    let end = start
        .checked_add(usize::try_from(header.state_bytes).map_err(|_| invalid("state size out of range"))?)
        .filter(|end| *end <= bytes.len())
        .ok_or_else(|| {
            BackupError::Invalid(format!(
                "truncated: the header announces {} bytes of state, the file has {}",
                header.state_bytes,
                bytes.len().saturating_sub(start)
            ))
        })?;
    let expected = trailer(&blake3::hash(&bytes[..end]));
    if bytes[end..] != expected[..] {
        return Err(invalid("damaged: the BLAKE3 checksum does not match (or the file is cut short)"));
    }
    Ok((header, &bytes[start..end]))
}

/// What a restore did.
#[derive(Debug, Serialize)]
pub struct Restored {
    /// The new cluster's only node.
    pub node: u64,
    /// The new cluster's id (from its network key).
    pub cluster: String,
    /// The backup's cluster.
    pub from_cluster: String,
    /// Where the state starts.
    pub log_index: u64,
    /// The operation index and digest the node starts from.
    pub operation_index: u64,
    /// The state digest, hex.
    pub digest: String,
    /// Plugins restored.
    pub plugins: Vec<String>,
    /// Devices restored.
    pub devices: usize,
    /// The engine the new cluster runs.
    pub engine: String,
    /// The engine the backup was taken on.
    pub from_engine: String,
}

/// Restore the backup at `file` into the (empty) data dir of the node
/// `config` describes, as a new one-node cluster.
pub async fn restore(file: &Path, config: &crate::config::NodeConfig) -> Result<Restored, BackupError> {
    let bytes = std::fs::read(file).map_err(|e| BackupError::Io(format!("reading {}", file.display()), e))?;
    let (header, state) = parse(&bytes)?;
    let dir = &config.data_dir;
    for existing in ["raft-log", "snapshot.bin"] {
        if dir.join(existing).exists() {
            return Err(BackupError::Refused(format!(
                "{} already holds a node's data ({existing}): restore only into a new, empty data dir",
                dir.display()
            )));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| BackupError::Io(format!("creating {}", dir.display()), e))?;
    let _lock = crate::recover::DataDirLock::take(dir).map_err(|e| BackupError::Refused(e.to_string()))?;
    let key = crate::p2p::identity::load_or_create(dir).map_err(|e| BackupError::Refused(e.to_string()))?;
    let runtime = crate::runtime::Runtime::new().map_err(|e| BackupError::Refused(e.to_string()))?;
    // Another engine is fine: the state is data, and every node of the new
    // cluster runs this one (admission refuses any other). This is how a
    // cluster moves to a new engine (README, "Upgrading").
    let engine = runtime.fingerprint().hash.clone();
    let runtime = std::sync::Arc::new(runtime.with_max_component_bytes(config.limits.max_plugin_bytes));
    let artifacts = crate::artifacts::Artifacts::open(&dir.join("plugins"), runtime)
        .map_err(|e| BackupError::Refused(e.to_string()))?;
    let digest: [u8; 32] = hex::decode(&header.digest).ok().and_then(|d| d.try_into().ok()).ok_or_else(|| {
        BackupError::Invalid(format!("the header's digest {:?} is not 32 bytes of hex", header.digest))
    })?;
    let info = crate::consensus::NodeInfo {
        peer_id: key.public().to_peer_id().to_string(),
        p2p_addr: config.p2p.clone(),
        http_addr: config.http.to_string(),
    };
    crate::consensus::state_machine::install_backup(
        dir,
        &artifacts,
        state,
        (header.operation_index, digest),
        config.id,
        info,
    )
    .await
    .map_err(BackupError::Invalid)?;
    Ok(Restored {
        node: config.id,
        cluster: cluster_id(config.network_key.as_deref()),
        from_cluster: header.cluster,
        log_index: header.log_index,
        operation_index: header.operation_index,
        digest: header.digest,
        plugins: header.plugins,
        devices: header.devices,
        engine,
        from_engine: header.engine,
    })
}

/// Write `bytes` to `path` durably (a temporary file, fsync, rename, fsync
/// of the directory).
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |e| BackupError::Io(what, e)
    };
    let tmp = path.with_extension("partial");
    let mut f = std::fs::File::create(&tmp).map_err(io("creating"))?;
    f.write_all(bytes).map_err(io("writing"))?;
    f.sync_all().map_err(io("syncing"))?;
    std::fs::rename(&tmp, path).map_err(io("renaming into"))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io("syncing the directory of"))?;
    }
    Ok(())
}
