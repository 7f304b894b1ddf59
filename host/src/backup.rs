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

/// The longest header line a backup may have.
const MAX_HEADER: u64 = 16 << 20;

/// Check a whole backup read from `from`: its header, the length of its
/// state and its checksum. Returns the header and where the state starts.
pub fn check(from: impl std::io::Read) -> Result<(BackupHeader, u64), BackupError> {
    use std::io::{BufRead as _, Read as _};
    let invalid = |m: &str| BackupError::Invalid(m.to_owned());
    let io = |e| BackupError::Io("reading the backup".into(), e);
    let mut from = std::io::BufReader::with_capacity(1 << 20, from);
    let mut hasher = blake3::Hasher::new();
    let mut magic = vec![0; MAGIC.len()];
    if from.read_exact(&mut magic).is_err() || magic != MAGIC {
        return Err(invalid("not a Synod backup (no SYNODBAK1 line)"));
    }
    let mut line = Vec::new();
    (&mut from).take(MAX_HEADER).read_until(b'\n', &mut line).map_err(io)?;
    if line.pop() != Some(b'\n') {
        return Err(invalid("the header line is cut short"));
    }
    let header: BackupHeader =
        serde_json::from_slice(&line).map_err(|e| BackupError::Invalid(format!("the header does not parse: {e}")))?;
    if header.format != 1 {
        return Err(BackupError::Invalid(format!("backup format {} (this version reads 1)", header.format)));
    }
    hasher.update(&magic);
    hasher.update(&line);
    hasher.update(b"\n");
    let start = (MAGIC.len() + line.len() + 1) as u64;
    let state = std::io::copy(&mut (&mut from).take(header.state_bytes), &mut hasher).map_err(io)?;
    if state < header.state_bytes {
        return Err(BackupError::Invalid(format!(
            "truncated: the header announces {} bytes of state, the file has {state}",
            header.state_bytes
        )));
    }
    let expected = trailer(&hasher.finalize());
    let mut rest = Vec::new();
    from.take(expected.len() as u64 + 1).read_to_end(&mut rest).map_err(io)?;
    if rest != expected {
        return Err(invalid("damaged: the BLAKE3 checksum does not match (or the file is cut short)"));
    }
    Ok((header, start))
}

/// Check a whole backup held in memory: its header and its state bytes.
pub fn parse(bytes: &[u8]) -> Result<(BackupHeader, &[u8]), BackupError> {
    let (header, start) = check(bytes)?;
    // `check` read them: both fit.
    let (start, len) = (start as usize, header.state_bytes as usize);
    Ok((header, &bytes[start..start + len]))
}

/// A backup being saved at a path: its pieces go to `<path>.partial` as
/// they arrive; [`Saving::finish`] checks the whole file, syncs it and
/// renames it into place. Dropped before that, it removes the partial
/// file.
pub struct Saving {
    path: std::path::PathBuf,
    partial: std::path::PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
    len: u64,
    saved: bool,
}

impl Saving {
    /// Start saving a backup at `path`.
    pub fn create(path: &Path) -> Result<Saving, BackupError> {
        let partial = path.with_extension("partial");
        let file = std::fs::File::create(&partial)
            .map_err(|e| BackupError::Io(format!("creating {}", partial.display()), e))?;
        Ok(Saving {
            path: path.to_owned(),
            partial,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
            len: 0,
            saved: false,
        })
    }

    /// Append the next piece.
    pub fn write(&mut self, piece: &[u8]) -> Result<(), BackupError> {
        let file = self.file.as_mut().ok_or_else(|| BackupError::Invalid("the backup was already saved".into()))?;
        file.write_all(piece).map_err(|e| BackupError::Io(format!("writing {}", self.partial.display()), e))?;
        self.len += piece.len() as u64;
        Ok(())
    }

    /// The bytes saved so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was saved yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sync the file, check it whole as it is on disk, and put it in place
    /// (a rename, then a sync of the directory).
    pub fn finish(mut self) -> Result<BackupHeader, BackupError> {
        let io = |what: &str, path: &Path| {
            let what = format!("{what} {}", path.display());
            move |e| BackupError::Io(what, e)
        };
        let file = self.file.take().ok_or_else(|| BackupError::Invalid("the backup was already saved".into()))?;
        let file = file.into_inner().map_err(|e| e.into_error()).map_err(io("writing", &self.partial))?;
        file.sync_all().map_err(io("syncing", &self.partial))?;
        let (header, _) = check(std::fs::File::open(&self.partial).map_err(io("reading", &self.partial))?)?;
        std::fs::rename(&self.partial, &self.path).map_err(io("renaming into", &self.path))?;
        self.saved = true;
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io("syncing the directory of", &self.path))?;
        }
        Ok(header)
    }
}

impl Drop for Saving {
    fn drop(&mut self) {
        if !self.saved {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
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
/// With `same_network_key`, the new cluster may keep the backed-up
/// cluster's network key (only right when every node of that cluster is
/// gone for good); without it, a config with that key is refused.
pub async fn restore(
    file: &Path,
    config: &crate::config::NodeConfig,
    same_network_key: bool,
) -> Result<Restored, BackupError> {
    let bytes = std::fs::read(file).map_err(|e| BackupError::Io(format!("reading {}", file.display()), e))?;
    let (header, state) = parse(&bytes)?;
    let dir = &config.data_dir;
    for existing in ["raft-log", "snapshot.bin", "checkpoint.bin", "checkpoint.log"] {
        if dir.join(existing).exists() {
            return Err(BackupError::Refused(format!(
                "{} already holds a node's data ({existing}): restore only into a new, empty data dir",
                dir.display()
            )));
        }
    }
    let cluster = cluster_id(config.network_key.as_deref());
    if cluster == header.cluster && cluster != "none" && !same_network_key {
        return Err(BackupError::Refused(format!(
            "the config has the network key of the cluster this backup comes from ({cluster}): a restore starts a \
             new cluster, and nodes of the old one could reach it with that key. Give the config a new \
             network_key (`openssl rand -hex 32`), or pass --same-network-key if every node of the old cluster \
             is gone for good"
        )));
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
        cluster,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn header(state_bytes: u64) -> BackupHeader {
        BackupHeader {
            format: 1,
            cluster: "c".into(),
            node: 1,
            log_index: 5,
            operation_index: 5 << 16,
            digest: "00".repeat(32),
            engine: "e".into(),
            created_at_ms: 1,
            plugins: vec!["counter".into()],
            devices: 0,
            state_bytes,
        }
    }

    fn backup(state: &[u8]) -> Vec<u8> {
        let mut bytes = preamble(&header(state.len() as u64));
        bytes.extend_from_slice(state);
        let hash = blake3::hash(&bytes);
        bytes.extend_from_slice(&trailer(&hash));
        bytes
    }

    fn refused(bytes: &[u8]) -> String {
        parse(bytes).map(|_| ()).unwrap_err().to_string()
    }

    /// A whole backup reads back its header and state; a cut, a flipped
    /// bit or anything after the checksum line is refused, saying which.
    #[test]
    fn a_backup_is_checked_whole() {
        let state: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let bytes = backup(&state);
        let (h, s) = parse(&bytes).unwrap();
        assert_eq!((h, s), (header(state.len() as u64), &state[..]));
        assert_eq!(
            check(&bytes[..]).unwrap().1,
            (bytes.len() - state.len() - trailer(&blake3::hash(b"")).len()) as u64
        );

        assert!(refused(b"PK\x03\x04").contains("not a Synod backup"));
        assert!(refused(&bytes[..MAGIC.len() + 10]).contains("header line is cut short"));
        let cut = bytes.len() - state.len() / 2;
        assert!(refused(&bytes[..cut]).contains("truncated"), "{}", refused(&bytes[..cut]));
        assert!(refused(&bytes[..bytes.len() - 1]).contains("damaged"));
        let mut flipped = bytes.clone();
        flipped[bytes.len() / 2] ^= 1;
        assert!(refused(&flipped).contains("checksum"));
        let mut longer = bytes.clone();
        longer.push(b'x');
        assert!(refused(&longer).contains("damaged"));
    }

    /// A backup is saved whole or not at all: nothing at its path until
    /// it checks out, and no partial file left either way.
    #[test]
    fn a_backup_is_saved_only_when_it_checks_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.backup");
        let bytes = backup(&[9; 5_000_000]);
        let mut saving = Saving::create(&path).unwrap();
        for piece in bytes.chunks(1 << 20) {
            saving.write(piece).unwrap();
        }
        assert_eq!(saving.len(), bytes.len() as u64);
        assert_eq!(saving.finish().unwrap(), header(5_000_000));
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        let names = |d: &Path| std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect::<Vec<_>>();
        assert_eq!(names(dir.path()), vec![std::ffi::OsString::from("a.backup")]);

        let other = dir.path().join("b.backup");
        let mut saving = Saving::create(&other).unwrap();
        saving.write(&bytes[..bytes.len() - 10]).unwrap();
        assert!(saving.finish().unwrap_err().to_string().contains("damaged"));
        let mut saving = Saving::create(&other).unwrap();
        saving.write(&bytes[..100]).unwrap();
        drop(saving);
        assert_eq!(names(dir.path()), vec![std::ffi::OsString::from("a.backup")]);
    }
}
