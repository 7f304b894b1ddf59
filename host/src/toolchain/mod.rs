//! Plugin build: guest source → component, for Rust here and JavaScript,
//! Python and C in [`lang`] (the language is recognised from the directory).
//!
//! Rust: in: a cargo package or workspace of plugin crates. Out: one
//! component per `cdylib` crate, ready to upload, plus the core module it
//! was made from.
//!
//! The guest compiler is found in this order: the active rustup toolchain if
//! it has the `wasm32-unknown-unknown` target installed; otherwise a Debian
//! rustc unpacked by `sdk/install-wasm-toolchain.sh` (into
//! `$SYNOD_WASM_RUST`, default `~/.cache/synod-wasm-rust`), which builds the
//! standard library from source. When neither is there and the machine has
//! apt-get, the build runs that script itself (it is compiled into `synod`)
//! unless `SYNOD_NO_TOOLCHAIN_INSTALL` is set. Compiler errors reach the user
//! verbatim on stderr.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The guest target.
pub const TARGET: &str = "wasm32-unknown-unknown";

mod lang;
pub mod plugin_test;
pub mod scaffold;

pub use lang::{C_PACKAGES, COMPONENTIZE_PY, Language, WASM_TOOLS_VERSION, tools_dir};

/// Why a plugin build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// No compiler that can target wasm32 is installed.
    #[error(
        "no Rust toolchain for {TARGET}: run `rustup target add {TARGET}`, or where rustup \
         cannot download it, `sdk/install-wasm-toolchain.sh` (searched {searched})"
    )]
    NoToolchain {
        /// Where the fallback was looked for.
        searched: String,
    },
    /// A tool could not be started.
    #[error("cannot run `{program}`: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A plugin manifest (package.json, pyproject.toml, Makefile) is
    /// missing something the build needs.
    #[error("{path}: {reason}")]
    Manifest {
        /// The manifest or directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A language toolchain is not installed and could not be.
    #[error("`{tool}` is not installed: {hint}")]
    ToolMissing {
        /// The tool.
        tool: String,
        /// How to install it.
        hint: String,
    },
    /// A build tool reported failure (its diagnostics went to stderr).
    #[error("{tool} failed ({status}); its messages are above")]
    Tool {
        /// The tool.
        tool: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// Nothing in the directory says which language it is.
    #[error(
        "{path} is not a plugin: no Cargo.toml (Rust), package.json (JavaScript), pyproject.toml (Python) \
         or Makefile (C); `synod plugin new` writes one"
    )]
    UnknownLanguage {
        /// The directory.
        path: PathBuf,
    },
    /// cargo reported failure (its diagnostics went to stderr).
    #[error("cargo build of the plugin failed ({status}); the compiler's messages are above")]
    Cargo {
        /// cargo's exit status.
        status: std::process::ExitStatus,
    },
    /// `cargo metadata` output could not be read.
    #[error("cannot read cargo metadata for {path}: {reason}")]
    Metadata {
        /// The package or workspace.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The directory has no plugin crates.
    #[error("{path} has no cdylib crate to build (a plugin needs `crate-type = [\"cdylib\"]`)")]
    NothingToBuild {
        /// The directory.
        path: PathBuf,
    },
    /// Reading or writing a build product failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// wit-component could not make a component of the module.
    #[error("cannot turn {module} into a component: {reason}")]
    Componentize {
        /// The core module.
        module: PathBuf,
        /// wit-component's explanation.
        reason: String,
    },
}

/// Which compiler builds guests, and how.
#[derive(Debug, Clone)]
pub enum Toolchain {
    /// rustup's toolchain with the wasm32 target installed.
    Rustup,
    /// Debian's rustc unpacked at this root; std is built from source.
    Fallback {
        /// The folder `install-wasm-toolchain.sh` unpacked into.
        root: PathBuf,
        /// rust-lld from the host toolchain (Debian's rustc ships none).
        linker: PathBuf,
    },
}

/// One built plugin.
#[derive(Debug, Clone)]
pub struct BuiltPlugin {
    /// The cargo package name.
    pub name: String,
    /// The component to upload.
    pub component: PathBuf,
    /// The core module it was made from (not loadable by itself).
    pub core_module: PathBuf,
}

/// Options for [`build`].
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Only these packages (default: every cdylib in the workspace).
    pub packages: Vec<String>,
    /// Guest target dir (default: `$SYNOD_PLUGIN_TARGET_DIR`, else `target/`
    /// beside the guest workspace's root manifest). Never the host's: the
    /// guest compiler differs.
    pub target_dir: Option<PathBuf>,
    /// Where components go (default: `<target_dir>/components`).
    pub out_dir: Option<PathBuf>,
    /// Cargo features to enable in the plugin crates.
    pub features: Vec<String>,
}

impl BuildOptions {
    /// The target dir asked for: `target_dir`, else
    /// `$SYNOD_PLUGIN_TARGET_DIR`; `None` leaves the language's default.
    fn chosen_target_dir(&self) -> Option<PathBuf> {
        self.target_dir.clone().or_else(|| std::env::var_os("SYNOD_PLUGIN_TARGET_DIR").map(PathBuf::from))
    }
}

/// The fallback installer, `sdk/install-wasm-toolchain.sh`.
const INSTALL_SCRIPT: &str = include_str!("../../../sdk/install-wasm-toolchain.sh");

/// Find the guest toolchain, installing the fallback if that is possible and
/// allowed (see the module docs).
pub fn detect_or_install() -> Result<Toolchain, BuildError> {
    let missing = match detect() {
        Ok(t) => return Ok(t),
        Err(e) => e,
    };
    let has_apt = Command::new("apt-get").arg("--version").stdout(Stdio::null()).status().is_ok();
    if std::env::var_os("SYNOD_NO_TOOLCHAIN_INSTALL").is_some() || !has_apt {
        return Err(missing);
    }
    eprintln!(
        "synod: rustup has no {TARGET} target here; installing the fallback toolchain into {} \
         (set SYNOD_NO_TOOLCHAIN_INSTALL=1 to skip)",
        fallback_root().display()
    );
    let status = Command::new("bash")
        .args(["-c", INSTALL_SCRIPT])
        .env("SYNOD_WASM_RUST", fallback_root())
        .status()
        .map_err(|source| BuildError::Spawn { program: "bash".into(), source })?;
    if !status.success() {
        return Err(missing);
    }
    detect()
}

/// Find the guest toolchain (see the module docs for the order).
pub fn detect() -> Result<Toolchain, BuildError> {
    let sysroot = host_sysroot()?;
    if sysroot.join("lib/rustlib").join(TARGET).join("lib").is_dir() {
        return Ok(Toolchain::Rustup);
    }
    let root = fallback_root();
    let linker = sysroot.join("lib/rustlib").join(host_triple()).join("bin/rust-lld");
    if root.join("usr/bin/rustc").is_file() && root.join(".complete").is_file() && linker.is_file() {
        return Ok(Toolchain::Fallback { root, linker });
    }
    Err(BuildError::NoToolchain { searched: root.display().to_string() })
}

fn fallback_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("SYNOD_WASM_RUST") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
    home.join(".cache/synod-wasm-rust")
}

/// The fallback exists for Debian (glibc Linux) hosts; rust-lld sits under
/// the host's own triple in the rustup sysroot.
fn host_triple() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

fn host_sysroot() -> Result<PathBuf, BuildError> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .env_remove("RUSTC")
        .output()
        .map_err(|source| BuildError::Spawn { program: "rustc".into(), source })?;
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// A cargo command for the guest workspace, with nothing of the host
/// build's environment leaking in (a `cargo test` parent sets some of it).
fn guest_cargo(dir: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(dir);
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_BOOTSTRAP",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Build the plugin in `dir`, in whatever language it is written (see
/// [`Language::detect`]): a Rust crate or workspace gives one component per
/// plugin crate, a JavaScript, Python or C plugin one component.
pub fn build(dir: &Path, options: &BuildOptions) -> Result<Vec<BuiltPlugin>, BuildError> {
    match Language::detect(dir) {
        Some(Language::Rust) => build_rust(dir, options),
        Some(lang) => lang::build_other(dir, lang, options),
        None if !dir.is_dir() => {
            Err(BuildError::Io { path: dir.to_owned(), source: std::io::ErrorKind::NotFound.into() })
        }
        None => Err(BuildError::UnknownLanguage { path: dir.to_owned() }),
    }
}

/// Build every plugin crate under `dir` (a crate or a workspace) and turn
/// each into a component.
pub fn build_rust(dir: &Path, options: &BuildOptions) -> Result<Vec<BuiltPlugin>, BuildError> {
    let toolchain = detect_or_install()?;
    let dir = &dir.canonicalize().map_err(|source| BuildError::Io { path: dir.to_owned(), source })?;
    let meta = metadata(dir)?;
    let target_dir = options.chosen_target_dir().unwrap_or_else(|| meta.workspace_root.join("target"));
    let wanted: Vec<&Package> = meta
        .packages
        .iter()
        .filter(|p| p.is_cdylib && p.manifest_dir.starts_with(dir))
        .filter(|p| options.packages.is_empty() || options.packages.contains(&p.name))
        .collect();
    if wanted.is_empty() {
        return Err(BuildError::NothingToBuild { path: dir.to_owned() });
    }

    let mut cmd = guest_cargo(dir);
    cmd.args(["build", "--release", "--target", TARGET, "--target-dir"]).arg(&target_dir);
    for p in &wanted {
        cmd.args(["-p", &p.name]);
    }
    if !options.features.is_empty() {
        cmd.arg("--features").arg(options.features.join(","));
    }
    if let Toolchain::Fallback { root, linker } = &toolchain {
        let lib = |p: &str| root.join(p).display().to_string();
        cmd.env("RUSTC", root.join("usr/bin/rustc"))
            .env(
                "LD_LIBRARY_PATH",
                [
                    lib(&format!("usr/lib/{}-linux-gnu", std::env::consts::ARCH)),
                    lib("usr/lib"),
                    lib("usr/lib/llvm-22/lib"),
                ]
                .join(":"),
            )
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER", linker)
            .arg("-Zbuild-std=std,panic_abort");
    }
    let status = cmd
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|source| BuildError::Spawn { program: "cargo".into(), source })?;
    if !status.success() {
        return Err(BuildError::Cargo { status });
    }

    let release = target_dir.join(TARGET).join("release");
    let out_dir = options.out_dir.clone().unwrap_or_else(|| target_dir.join("components"));
    std::fs::create_dir_all(&out_dir).map_err(|source| BuildError::Io { path: out_dir.clone(), source })?;
    wanted
        .iter()
        .map(|p| {
            let core_module = release.join(format!("{}.wasm", p.name.replace('-', "_")));
            let component = out_dir.join(format!("{}.wasm", p.name));
            componentize(&core_module, &component)?;
            Ok(BuiltPlugin { name: p.name.clone(), component, core_module })
        })
        .collect()
}

/// Wrap a core module (with wit-bindgen's type section) into a component.
pub fn componentize(module: &Path, component: &Path) -> Result<(), BuildError> {
    let bytes = std::fs::read(module).map_err(|source| BuildError::Io { path: module.to_owned(), source })?;
    let err = |e: anyhow::Error| BuildError::Componentize { module: module.to_owned(), reason: format!("{e:#}") };
    let encoded =
        wit_component::ComponentEncoder::default().module(&bytes).map_err(err)?.validate(true).encode().map_err(err)?;
    std::fs::write(component, encoded).map_err(|source| BuildError::Io { path: component.to_owned(), source })
}

struct Package {
    name: String,
    manifest_dir: PathBuf,
    is_cdylib: bool,
}

struct Metadata {
    workspace_root: PathBuf,
    packages: Vec<Package>,
}

fn metadata(dir: &Path) -> Result<Metadata, BuildError> {
    let bad = |reason: String| BuildError::Metadata { path: dir.to_owned(), reason };
    let out = guest_cargo(dir)
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| BuildError::Spawn { program: "cargo".into(), source })?;
    if !out.status.success() {
        return Err(bad(format!("cargo metadata exited with {}", out.status)));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| bad(e.to_string()))?;
    let workspace_root =
        v["workspace_root"].as_str().map(PathBuf::from).ok_or_else(|| bad("no workspace_root".into()))?;
    let packages = v["packages"]
        .as_array()
        .ok_or_else(|| bad("no packages".into()))?
        .iter()
        .filter_map(|p| {
            let name = p["name"].as_str()?.to_owned();
            let manifest_dir = PathBuf::from(p["manifest_path"].as_str()?).parent()?.to_owned();
            let is_cdylib = p["targets"]
                .as_array()?
                .iter()
                .any(|t| t["crate_types"].as_array().is_some_and(|k| k.iter().any(|k| k == "cdylib")));
            Some(Package { name, manifest_dir, is_cdylib })
        })
        .collect();
    Ok(Metadata { workspace_root, packages })
}
