//! Plugin bytes, content-addressed, and their compiled form.
//!
//! In: component bytes (an upload, a peer's blob, a snapshot). Out: the bytes
//! by sha256, and ready-to-run [`Plugin`]s. Bytes live in `blobs/<sha256>`;
//! native code compiled from them in `compiled/<engine fingerprint>/<sha256>`,
//! so a restart does not recompile and a changed engine never loads stale
//! code. Both directories are reached only through a capability
//! (`cap_std::fs::Dir`) opened once on the node's data dir: no path from the
//! outside can name a file elsewhere.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use sha2::Digest as _;

use crate::driver::DriverRuntime;
use crate::runtime::{LoadError, Plugin, PluginLimits, Runtime};

/// Why the artifact store failed.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The local disk failed.
    #[error("plugin store {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A name that is not a sha256 in hex.
    #[error("{0:?} is not a sha256 (64 lower-case hex digits)")]
    BadHash(String),
    /// Stored bytes no longer match their name.
    #[error("stored plugin {sha256} is corrupt (its bytes hash to {actual})")]
    Corrupt {
        /// The name.
        sha256: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// The bytes are not a loadable command handler.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Asked to load bytes this node does not have.
    #[error("plugin bytes {0} are not on this node")]
    Missing(String),
    /// The driver engine could not start.
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ArtifactError {
    let what = what.into();
    move |source| ArtifactError::Io { what, source }
}

/// sha256 of `bytes`, lower-case hex: a plugin's content address.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// True for a well-formed content address (64 lower-case hex digits).
pub fn is_sha256(sha256: &str) -> bool {
    check_hash(sha256).is_ok()
}

fn check_hash(sha256: &str) -> Result<(), ArtifactError> {
    if sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(ArtifactError::BadHash(sha256.to_owned()))
    }
}

/// A loaded plugin of either kind.
pub enum Loaded {
    /// A command handler, ready to run.
    Handler(Arc<Plugin>),
    /// A device driver: it loads on the driver engine (instances are made
    /// by devices' owners).
    Driver,
}

/// The node's plugin store.
pub struct Artifacts {
    /// `blobs/`: component bytes by sha256.
    blobs: Dir,
    /// `compiled/<fingerprint>/`: native artifacts by sha256.
    compiled: Dir,
    /// The driver engine; drivers are checked (and run) on it.
    drivers: Arc<DriverRuntime>,
    /// Driver components known to load, by sha256.
    drivers_ok: Mutex<std::collections::HashSet<String>>,
    /// The engine plugins are compiled for.
    runtime: Arc<Runtime>,
    /// Loaded plugins by (sha256, limits): loading is the expensive part of
    /// an install or restart, and many nodes' entries name the same bytes.
    loaded: Mutex<HashMap<(String, String), Arc<Plugin>>>,
    /// Compiles ahead of apply ([`Artifacts::prepare`]) by sha256: running,
    /// failed, or ready without a cache entry (a driver).
    ahead: Mutex<HashMap<String, Prepared>>,
}

/// Where a compile ahead of apply stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// In the compile cache (or a driver: nothing to compile for handlers).
    Ready,
    /// Compiling on the blocking pool.
    Running,
    /// The component did not compile.
    Failed(String),
    /// The bytes are not stored here.
    Missing,
}

impl Artifacts {
    /// Open (creating) the store under `data_dir`.
    pub fn open(data_dir: &Path, runtime: Arc<Runtime>) -> Result<Artifacts, ArtifactError> {
        std::fs::create_dir_all(data_dir).map_err(io(format!("creating {}", data_dir.display())))?;
        let root = Dir::open_ambient_dir(data_dir, ambient_authority())
            .map_err(io(format!("opening {}", data_dir.display())))?;
        let compiled_path = format!("compiled/{}", runtime.fingerprint().hash);
        root.create_dir_all("blobs").map_err(io("creating blobs/"))?;
        root.create_dir_all(&compiled_path).map_err(io("creating compiled/"))?;
        Ok(Artifacts {
            blobs: root.open_dir("blobs").map_err(io("opening blobs/"))?,
            compiled: root.open_dir(&compiled_path).map_err(io("opening compiled/"))?,
            runtime,
            loaded: Mutex::new(HashMap::new()),
            ahead: Mutex::new(HashMap::new()),
            drivers: DriverRuntime::new()?,
            drivers_ok: Mutex::default(),
        })
    }

    /// The driver engine.
    pub fn drivers(&self) -> &Arc<DriverRuntime> {
        &self.drivers
    }

    /// Load a plugin of either kind: a command handler is compiled (and
    /// cached) for the handler engine; a device driver (a component that
    /// exports `synod:plugin/driver`) is checked on the driver engine and
    /// runs only on devices' owners. Deterministic like [`Artifacts::load`].
    pub fn load_any(&self, sha256: &str, limits: PluginLimits) -> Result<Loaded, ArtifactError> {
        check_hash(sha256)?;
        if self.drivers_ok.lock().map_err(|_| poisoned())?.contains(sha256) {
            return Ok(Loaded::Driver);
        }
        let cached =
            self.loaded.lock().map_err(|_| poisoned())?.contains_key(&(sha256.to_owned(), format!("{limits:?}")));
        if !cached && !self.compiled.exists(sha256) {
            let bytes = self.get(sha256)?.ok_or_else(|| ArtifactError::Missing(sha256.to_owned()))?;
            if crate::driver::is_driver(&bytes) {
                self.runtime.check_bytes(&bytes, &limits)?;
                self.drivers.compile(&bytes)?;
                self.drivers_ok.lock().map_err(|_| poisoned())?.insert(sha256.to_owned());
                return Ok(Loaded::Driver);
            }
        }
        self.load(sha256, limits).map(Loaded::Handler)
    }

    /// Compile the stored component `sha256` into the compile cache off the
    /// apply path (on tokio's blocking pool), so that applying its install
    /// loads the artifact in milliseconds instead of compiling on the apply
    /// thread (seconds for a Python or JavaScript plugin). Starts the
    /// compile if nothing has; says where it stands. Needs a tokio runtime.
    pub fn prepare(self: &Arc<Self>, sha256: &str) -> Prepared {
        if check_hash(sha256).is_err() || !self.has(sha256) {
            return Prepared::Missing;
        }
        if self.compiled.exists(sha256) {
            return Prepared::Ready;
        }
        let Ok(mut ahead) = self.ahead.lock() else { return Prepared::Failed("lock poisoned".into()) };
        if let Some(state) = ahead.get(sha256) {
            return state.clone();
        }
        ahead.insert(sha256.to_owned(), Prepared::Running);
        let (this, sha) = (self.clone(), sha256.to_owned());
        tokio::task::spawn_blocking(move || {
            let state = match this.compile_ahead(&sha) {
                Ok(()) => Prepared::Ready,
                Err(e) => Prepared::Failed(e.to_string()),
            };
            if let Ok(mut ahead) = this.ahead.lock() {
                ahead.insert(sha, state);
            }
        });
        Prepared::Running
    }

    fn compile_ahead(&self, sha256: &str) -> Result<(), ArtifactError> {
        let bytes = self.get(sha256)?.ok_or_else(|| ArtifactError::Missing(sha256.to_owned()))?;
        if crate::driver::is_driver(&bytes) {
            // Drivers run on the driver engine, compiled by devices' owners.
            return Ok(());
        }
        // The native code does not depend on the version's limits.
        let artifact = self.runtime.precompile(&bytes, &PluginLimits::default())?;
        write_durably(&self.compiled, sha256, &artifact)
    }

    /// The runtime plugins are loaded into.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Store `bytes` durably under their sha256 (idempotent) and return it.
    pub fn put(&self, bytes: &[u8]) -> Result<String, ArtifactError> {
        let sha256 = sha256_hex(bytes);
        if !self.has(&sha256) {
            write_durably(&self.blobs, &sha256, bytes)?;
        }
        Ok(sha256)
    }

    /// True when the bytes named `sha256` are stored here.
    pub fn has(&self, sha256: &str) -> bool {
        check_hash(sha256).is_ok() && self.blobs.exists(sha256)
    }

    /// The bytes named `sha256`, checked against their name.
    pub fn get(&self, sha256: &str) -> Result<Option<Vec<u8>>, ArtifactError> {
        check_hash(sha256)?;
        let bytes = match self.blobs.read(sha256) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(format!("reading blob {sha256}"))(e)),
        };
        let actual = sha256_hex(&bytes);
        if actual != sha256 {
            return Err(ArtifactError::Corrupt { sha256: sha256.to_owned(), actual });
        }
        Ok(Some(bytes))
    }

    /// The plugin compiled from the stored bytes `sha256`, from memory, the
    /// on-disk compile cache, or compiled now (and cached).
    pub fn load(&self, sha256: &str, limits: PluginLimits) -> Result<Arc<Plugin>, ArtifactError> {
        check_hash(sha256)?;
        let key = (sha256.to_owned(), format!("{limits:?}"));
        if let Some(p) = self.loaded.lock().map_err(|_| poisoned())?.get(&key) {
            loaded_from("memory");
            return Ok(p.clone());
        }
        let plugin = Arc::new(self.load_uncached(sha256, limits)?);
        self.loaded.lock().map_err(|_| poisoned())?.insert(key, plugin.clone());
        Ok(plugin)
    }

    fn load_uncached(&self, sha256: &str, limits: PluginLimits) -> Result<Plugin, ArtifactError> {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(sha256, &mut digest).map_err(|_| ArtifactError::BadHash(sha256.into()))?;
        if let Ok(artifact) = self.compiled.read(sha256) {
            // SAFETY: this directory is private to the node and keyed by the
            // engine fingerprint; only `precompile` below writes it.
            match unsafe { self.runtime.load_precompiled(&artifact, digest, limits) } {
                Ok(p) => {
                    loaded_from("disk");
                    return Ok(p);
                }
                Err(e) => tracing::warn!(sha256, error = %e, "compile cache entry unusable; recompiling"),
            }
        }
        let bytes = self.get(sha256)?.ok_or_else(|| ArtifactError::Missing(sha256.to_owned()))?;
        let artifact = self.runtime.precompile(&bytes, &limits)?;
        write_durably(&self.compiled, sha256, &artifact)?;
        loaded_from("compiled");
        // SAFETY: just produced by this engine.
        Ok(unsafe { self.runtime.load_precompiled(&artifact, digest, limits) }?)
    }
}

/// Count a plugin load by where its compiled code came from.
fn loaded_from(source: &str) {
    crate::metrics::get().plugin_loads.get_or_create(&crate::metrics::LoadLabels { source: source.into() }).inc();
}

fn poisoned() -> ArtifactError {
    ArtifactError::Io { what: "plugin cache".into(), source: std::io::Error::other("lock poisoned") }
}

/// Write `name` in `dir` so that after a crash it is either absent or whole:
/// temp file, fsync, rename, fsync the directory.
fn write_durably(dir: &Dir, name: &str, bytes: &[u8]) -> Result<(), ArtifactError> {
    let tmp = format!(".{name}.tmp");
    let mut f = dir.create(&tmp).map_err(io(format!("creating {tmp}")))?;
    f.write_all(bytes).map_err(io(format!("writing {tmp}")))?;
    f.sync_all().map_err(io(format!("syncing {tmp}")))?;
    dir.rename(&tmp, dir, name).map_err(io(format!("renaming {tmp}")))?;
    dir.open(".").and_then(|d| d.sync_all()).map_err(io("syncing the plugin directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_addressed_and_verified() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Artifacts::open(tmp.path(), Arc::new(Runtime::new().unwrap())).unwrap();
        let sha = store.put(b"not really wasm").unwrap();
        assert_eq!(sha, sha256_hex(b"not really wasm"));
        assert_eq!(store.get(&sha).unwrap().unwrap(), b"not really wasm");
        assert!(matches!(store.get("../etc/passwd"), Err(ArtifactError::BadHash(_))));
        assert!(store.get(&"0".repeat(64)).unwrap().is_none());
        // Tampered bytes are detected, not served.
        std::fs::write(tmp.path().join("blobs").join(&sha), b"other").unwrap();
        assert!(matches!(store.get(&sha), Err(ArtifactError::Corrupt { .. })));
        // Loading bytes that are not a component is a load error, not a crash.
        let sha2 = store.put(b"\0asm\x01\0\0\0").unwrap();
        assert!(matches!(store.load(&sha2, PluginLimits::default()), Err(ArtifactError::Load(_))));
    }
}
