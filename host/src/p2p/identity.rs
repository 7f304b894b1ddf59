//! The node's libp2p identity: an ed25519 key kept in the data directory.
//!
//! In: the node's data directory. Out: the [`Keypair`] whose PeerId the
//! cluster membership names. The key is made once and reused on every
//! restart, because a new key is a new PeerId that no peer's allowlist
//! holds.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use libp2p::identity::{KeyType, Keypair};

use super::P2pError;

/// Name of the key file inside the data directory.
pub const KEY_FILE: &str = "node.key";

/// Where a new key is written before it is renamed into place, so a crash
/// never leaves a half-written `node.key`.
const KEY_TMP_FILE: &str = "node.key.tmp";

/// Loads the node key from `<data_dir>/node.key`, creating it (and
/// `data_dir`) if absent.
///
/// A new key is written with mode 0600 to a temporary file, fsynced,
/// renamed into place and the directory fsynced, so after a crash the file
/// holds either nothing or the whole key.
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, P2pError> {
    let path = data_dir.join(KEY_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            warn_if_readable_by_others(&path);
            decode(&path, &bytes)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => create(data_dir, path),
        Err(source) => Err(P2pError::Io { path, source }),
    }
}

fn decode(path: &Path, bytes: &[u8]) -> Result<Keypair, P2pError> {
    let bad = |reason: String| P2pError::BadKey { path: path.to_path_buf(), reason };
    let keypair = Keypair::from_protobuf_encoding(bytes)
        .map_err(|e| bad(format!("not a protobuf-encoded libp2p private key ({e})")))?;
    if keypair.key_type() != KeyType::Ed25519 {
        return Err(bad(format!("it holds an {:?} key; node keys are Ed25519", keypair.key_type())));
    }
    Ok(keypair)
}

fn create(data_dir: &Path, path: PathBuf) -> Result<Keypair, P2pError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| P2pError::Io { path, source }
    };
    fs::create_dir_all(data_dir).map_err(io_err(data_dir))?;

    let keypair = Keypair::generate_ed25519();
    let bytes = keypair
        .to_protobuf_encoding()
        .map_err(|e| P2pError::BadKey { path: path.clone(), reason: format!("the new key cannot be encoded ({e})") })?;

    let tmp = data_dir.join(KEY_TMP_FILE);
    // A leftover from a crash may have been created with other permissions;
    // the mode below applies only to a file this call creates.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(P2pError::Io { path: tmp, source }),
    }
    write_private(&tmp, &bytes).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    // The rename is durable only once the directory entry is on disk.
    File::open(data_dir).and_then(|dir| dir.sync_all()).map_err(io_err(data_dir))?;

    tracing::info!(path = %path.display(), peer_id = %keypair.public().to_peer_id(), "created a new node key");
    Ok(keypair)
}

/// Creates `path` readable by its owner only and writes `bytes` durably.
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// A key others can read is a key others can impersonate this node with;
/// the node still starts, since refusing would only take it out of the
/// cluster.
fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the node key is readable by other users; chmod 600 it"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_private_and_reloaded_with_the_same_peer_id() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");

        let first = load_or_create(&data_dir).unwrap();
        let path = data_dir.join(KEY_FILE);
        assert!(path.is_file());
        assert!(!data_dir.join(KEY_TMP_FILE).exists(), "temp file left behind");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }

        let second = load_or_create(&data_dir).unwrap();
        assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
        assert_eq!(second.key_type(), KeyType::Ed25519);
    }

    #[test]
    fn different_data_dirs_get_different_keys() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let ka = load_or_create(a.path()).unwrap();
        let kb = load_or_create(b.path()).unwrap();
        assert_ne!(ka.public().to_peer_id(), kb.public().to_peer_id());
    }

    #[test]
    fn corrupt_key_is_bad_key_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::write(&path, b"this is not a key").unwrap();

        let err = load_or_create(dir.path()).unwrap_err();
        match &err {
            P2pError::BadKey { path: p, .. } => assert_eq!(p, &path),
            other => panic!("expected BadKey, got {other:?}"),
        }
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
        // The corrupt file is left for the operator, not silently replaced.
        assert_eq!(fs::read(&path).unwrap(), b"this is not a key");
    }

    #[test]
    fn stale_temp_file_does_not_block_creation() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(KEY_TMP_FILE), b"half a key").unwrap();
        let key = load_or_create(dir.path()).unwrap();
        let again = load_or_create(dir.path()).unwrap();
        assert_eq!(key.public().to_peer_id(), again.public().to_peer_id());
    }
}
