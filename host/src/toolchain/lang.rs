//! Plugin builds for JavaScript, Python and C, beside the Rust one.
//!
//! In: a plugin directory. Out: one component, the same kind of artifact
//! the Rust build makes. The language is recognised by the manifest the
//! directory holds (see [`Language::detect`]); each build stages what the
//! compiler needs (the WIT and the SDK, compiled into `synod` so a plugin
//! builds anywhere, not only inside this repository) under the plugin
//! target dir, runs the pinned toolchain, and records a hash of every input
//! beside the component so an unchanged plugin is not rebuilt (a Python
//! build takes 10–20 s).
//!
//! Toolchains live under `$SYNOD_TOOLS_DIR` (default `~/.cache/synod`) and
//! are installed on first use unless `SYNOD_NO_TOOLCHAIN_INSTALL` is set:
//! JavaScript: componentize-qjs from `sdk/js/toolchain` (`npm ci` against
//! its lockfile); Python: componentize-py in a virtualenv (pip, pinned);
//! C: Debian's clang-19 / wasi-libc (apt-get) and wasm-tools (cargo
//! install, pinned to the host's wit-component release).
//!
//! None of the three adds WASI to a command handler: the JavaScript and
//! Python builds stub it (`--stub-wasi`), the C SDK answers stdio itself and
//! its Makefile refuses any other import; the SDKs replace clocks,
//! randomness and printing with the entry's (see each SDK's docs).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{BuildError, BuildOptions, BuiltPlugin};

/// The WIT every handler is built against.
const PLUGIN_WIT: &str = include_str!("../../../wit/plugin.wit");

/// The JavaScript SDK, staged as `node_modules/@synod/sdk`.
const JS_SDK: &[(&str, &[u8])] = &[
    ("index.js", include_bytes!("../../../sdk/js/index.js")),
    ("package.json", include_bytes!("../../../sdk/js/package.json")),
];
/// The JavaScript compiler's pinned manifest and lockfile.
const JS_TOOLCHAIN: &[(&str, &[u8])] = &[
    ("package.json", include_bytes!("../../../sdk/js/toolchain/package.json")),
    ("package-lock.json", include_bytes!("../../../sdk/js/toolchain/package-lock.json")),
];
/// The Python SDK, staged as the `synod` package.
const PY_SDK: &[(&str, &[u8])] = &[("synod/__init__.py", include_bytes!("../../../sdk/python/synod/__init__.py"))];
/// The pinned Python compiler.
pub const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
/// The C SDK, staged whole (a Makefile includes its `plugin.mk`).
const C_SDK: &[(&str, &[u8])] = &[
    ("plugin.mk", include_bytes!("../../../sdk/c/plugin.mk")),
    ("synod.h", include_bytes!("../../../sdk/c/synod.h")),
    ("synod.c", include_bytes!("../../../sdk/c/synod.c")),
    ("wasi_stubs.c", include_bytes!("../../../sdk/c/wasi_stubs.c")),
    ("gen/command_handler.c", include_bytes!("../../../sdk/c/gen/command_handler.c")),
    ("gen/command_handler.h", include_bytes!("../../../sdk/c/gen/command_handler.h")),
    ("gen/command_handler_component_type.o", include_bytes!("../../../sdk/c/gen/command_handler_component_type.o")),
];
/// The wasm-tools release whose wit-component matches the host's.
pub const WASM_TOOLS_VERSION: &str = "1.254.2";
/// Debian packages the C build needs.
pub const C_PACKAGES: &[&str] = &["clang-19", "lld-19", "wasi-libc", "libclang-rt-19-dev-wasm32", "make"];

/// A plugin's language, from the manifest in its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    /// `Cargo.toml`: a crate or a workspace of them.
    Rust,
    /// `package.json`.
    JavaScript,
    /// `pyproject.toml`.
    Python,
    /// A `Makefile` (including the C SDK's `plugin.mk`) or `*.c` files.
    C,
}

impl Language {
    /// Recognise the language of the plugin in `dir`; `None` if nothing
    /// there says.
    pub fn detect(dir: &Path) -> Option<Language> {
        let has = |f: &str| dir.join(f).is_file();
        if has("Cargo.toml") {
            Some(Language::Rust)
        } else if has("package.json") {
            Some(Language::JavaScript)
        } else if has("pyproject.toml") {
            Some(Language::Python)
        } else if has("Makefile")
            || std::fs::read_dir(dir)
                .map(|d| d.flatten().any(|e| e.path().extension().is_some_and(|x| x == "c")))
                .unwrap_or(false)
        {
            Some(Language::C)
        } else {
            None
        }
    }

    /// The name used on the command line (`--lang`) and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Language::Rust => "rust",
            Language::JavaScript => "js",
            Language::Python => "python",
            Language::C => "c",
        }
    }
}

impl std::str::FromStr for Language {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rust" | "rs" => Ok(Language::Rust),
            "js" | "javascript" => Ok(Language::JavaScript),
            "python" | "py" => Ok(Language::Python),
            "c" => Ok(Language::C),
            other => Err(format!("unknown language `{other}` (rust, js, python or c)")),
        }
    }
}

/// Where toolchains are installed.
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SYNOD_TOOLS_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
    home.join(".cache/synod")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io { path: path.to_owned(), source }
}

fn manifest_err(path: &Path, reason: impl Into<String>) -> BuildError {
    BuildError::Manifest { path: path.to_owned(), reason: reason.into() }
}

fn write_files(root: &Path, files: &[(&str, &[u8])]) -> Result<(), BuildError> {
    for (name, bytes) in files {
        let path = root.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        // Unchanged files keep their mtime, so make does not rebuild.
        if std::fs::read(&path).ok().as_deref() != Some(*bytes) {
            std::fs::write(&path, bytes).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// Run a build tool; its output goes to stderr (stdout is `synod plugin
/// build`'s list of components).
fn run(mut cmd: Command, tool: &str) -> Result<(), BuildError> {
    let status = cmd
        .stdout(std::io::stderr())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|source| BuildError::Spawn { program: tool.into(), source })?;
    if status.success() { Ok(()) } else { Err(BuildError::Tool { tool: tool.into(), status }) }
}

fn on_path(program: &str) -> bool {
    Command::new(program).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

fn may_install() -> bool {
    std::env::var_os("SYNOD_NO_TOOLCHAIN_INSTALL").is_none()
}

/// Every source file of the plugin, in a stable order (build outputs,
/// dependencies and version control left out).
fn sources(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.')
                || matches!(name, "target" | "node_modules" | "build" | "__pycache__")
                || name.starts_with("build-")
                || name.ends_with(".wasm")
            {
                continue;
            }
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out
}

/// A hash of everything a build reads: the toolchain, the staged SDK and
/// WIT, and the plugin's sources.
fn inputs_hash(lang: Language, toolchain: &str, sdk: &[(&str, &[u8])], dir: &Path) -> String {
    let mut h = blake3::Hasher::new_derive_key("synod plugin build inputs v1");
    let mut put = |b: &[u8]| {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    };
    put(lang.name().as_bytes());
    put(toolchain.as_bytes());
    put(PLUGIN_WIT.as_bytes());
    for (name, bytes) in sdk {
        put(name.as_bytes());
        put(bytes);
    }
    for path in sources(dir) {
        put(path.strip_prefix(dir).unwrap_or(&path).to_string_lossy().as_bytes());
        put(&std::fs::read(&path).unwrap_or_default());
    }
    h.finalize().to_hex().to_string()
}

/// Build products are up to date when the component exists and was built
/// from the same inputs.
fn up_to_date(component: &Path, hash: &str) -> bool {
    component.is_file() && std::fs::read_to_string(stamp(component)).ok().as_deref() == Some(hash)
}

fn stamp(component: &Path) -> PathBuf {
    component.with_extension("wasm.inputs")
}

/// The target dir for a non-Rust plugin, and where its component goes.
fn dirs(dir: &Path, lang: Language, options: &BuildOptions) -> (PathBuf, PathBuf) {
    let target = options.chosen_target_dir().unwrap_or_else(|| dir.join("target")).join(lang.name());
    let out = options.out_dir.clone().unwrap_or_else(|| target.join("components"));
    (target, out)
}

/// Build the JavaScript, Python or C plugin in `dir`.
pub fn build_other(dir: &Path, lang: Language, options: &BuildOptions) -> Result<Vec<BuiltPlugin>, BuildError> {
    let dir = &dir.canonicalize().map_err(io(dir))?;
    if !options.features.is_empty() {
        return Err(manifest_err(dir, "--features applies to Rust plugins only"));
    }
    let built = match lang {
        Language::JavaScript => build_js(dir, options)?,
        Language::Python => build_python(dir, options)?,
        Language::C => build_c(dir, options)?,
        Language::Rust => unreachable!("Rust plugins are built by cargo"),
    };
    if !options.packages.is_empty() && !options.packages.contains(&built.name) {
        return Err(BuildError::NothingToBuild { path: dir.clone() });
    }
    Ok(vec![built])
}

// ------------------------------------------------------------ JavaScript --

fn json_manifest(path: &Path) -> Result<serde_json::Value, BuildError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|e| manifest_err(path, e.to_string()))
}

/// componentize-qjs, installed from the pinned lockfile on first use.
fn js_compiler() -> Result<PathBuf, BuildError> {
    let root = tools_dir().join("js-toolchain");
    let bin = root.join("node_modules/.bin/componentize-qjs");
    let lock = JS_TOOLCHAIN.iter().find(|(n, _)| *n == "package-lock.json").map(|(_, b)| *b).unwrap_or_default();
    let marker = root.join(".complete");
    let want = blake3::hash(lock).to_hex().to_string();
    if bin.is_file() && std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return Ok(bin);
    }
    let hint = "install Node.js 18+ with npm (Debian: apt-get install nodejs npm)";
    if !may_install() || !on_path("npm") {
        return Err(BuildError::ToolMissing { tool: "componentize-qjs".into(), hint: hint.into() });
    }
    eprintln!("synod: installing the JavaScript plugin compiler (componentize-qjs) into {}", root.display());
    write_files(&root, JS_TOOLCHAIN)?;
    let mut cmd = Command::new("npm");
    cmd.current_dir(&root).args(["ci", "--no-audit", "--no-fund", "--loglevel=error"]);
    if std::env::var_os("npm_config_cache").is_none() {
        cmd.arg("--cache").arg(tools_dir().parent().unwrap_or(&root).join("npm"));
    }
    run(cmd, "npm ci")?;
    std::fs::write(&marker, want).map_err(io(&marker))?;
    Ok(bin)
}

/// The compiler's identity for the input hash: its lockfile.
fn js_compiler_version() -> String {
    blake3::hash(JS_TOOLCHAIN[1].1).to_hex().to_string()
}

fn build_js(dir: &Path, options: &BuildOptions) -> Result<BuiltPlugin, BuildError> {
    let manifest = dir.join("package.json");
    let pkg = json_manifest(&manifest)?;
    let name = pkg["name"].as_str().ok_or_else(|| manifest_err(&manifest, "no \"name\""))?;
    let name = name.rsplit('/').next().unwrap_or(name).to_owned();
    let entry = pkg["main"].as_str().unwrap_or("index.js").to_owned();
    if !dir.join(&entry).is_file() {
        return Err(manifest_err(&manifest, format!("the entry module {entry} (\"main\") does not exist")));
    }
    let deps = pkg["dependencies"].as_object().map(|d| d.keys().any(|k| k != "@synod/sdk")).unwrap_or(false);
    if deps && !dir.join("node_modules").is_dir() {
        if !dir.join("package-lock.json").is_file() {
            return Err(manifest_err(
                &manifest,
                "it has dependencies but no package-lock.json: run `npm install` once",
            ));
        }
        let mut cmd = Command::new("npm");
        cmd.current_dir(dir).args(["ci", "--omit=dev", "--no-audit", "--no-fund", "--loglevel=error"]);
        run(cmd, "npm ci")?;
    }
    let (target, out_dir) = dirs(dir, Language::JavaScript, options);
    let component = out_dir.join(format!("{name}.wasm"));
    let hash = inputs_hash(Language::JavaScript, &js_compiler_version(), JS_SDK, dir);
    if up_to_date(&component, &hash) {
        return Ok(BuiltPlugin { name, component: component.clone(), core_module: component });
    }
    let compiler = js_compiler()?;

    // The module root: the plugin's files, its node_modules, and the SDK.
    let stage = target.join("stage").join(&name);
    let _ = std::fs::remove_dir_all(&stage);
    copy_tree(dir, &stage)?;
    write_files(&stage.join("node_modules/@synod/sdk"), JS_SDK)?;
    write_files(&target.join("wit"), &[("plugin.wit", PLUGIN_WIT.as_bytes())])?;
    std::fs::create_dir_all(&out_dir).map_err(io(&out_dir))?;
    let mut cmd = Command::new(&compiler);
    cmd.current_dir(&stage)
        .arg("--wit")
        .arg(target.join("wit"))
        .args(["--world", "command-handler", "--sync", "--stub-wasi", "--js"])
        .arg(stage.join(&entry))
        .arg("--module-root")
        .arg(&stage)
        .arg("-o")
        .arg(&component);
    run(cmd, "componentize-qjs")?;
    std::fs::write(stamp(&component), hash).map_err(io(&component))?;
    Ok(BuiltPlugin { name, component: component.clone(), core_module: component })
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), BuildError> {
    std::fs::create_dir_all(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))?.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name_s = name.to_string_lossy();
        if name_s.starts_with('.') || name_s == "target" {
            continue;
        }
        let dest = to.join(&name);
        if path.is_dir() {
            copy_tree(&path, &dest)?;
        } else {
            std::fs::copy(&path, &dest).map_err(io(&path))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- Python --

/// componentize-py in a virtualenv of its own, installed on first use.
fn py_compiler() -> Result<PathBuf, BuildError> {
    let root = tools_dir().join("py-toolchain");
    let bin = root.join("bin/componentize-py");
    let marker = root.join(".complete");
    if bin.is_file() && std::fs::read_to_string(&marker).ok().as_deref() == Some(COMPONENTIZE_PY) {
        return Ok(bin);
    }
    let hint =
        format!("install Python 3.11+ with venv and pip, then `pip install {COMPONENTIZE_PY}` into {}", root.display());
    if !may_install() || !on_path("python3") {
        return Err(BuildError::ToolMissing { tool: "componentize-py".into(), hint });
    }
    eprintln!("synod: installing the Python plugin compiler ({COMPONENTIZE_PY}) into {}", root.display());
    let mut venv = Command::new("python3");
    venv.args(["-m", "venv"]).arg(&root);
    run(venv, "python3 -m venv").map_err(|_| BuildError::ToolMissing {
        tool: "python3 -m venv".into(),
        hint: "install python3-venv (Debian: apt-get install python3-venv)".into(),
    })?;
    let mut pip = Command::new(root.join("bin/pip"));
    pip.args(["install", "--quiet", "--disable-pip-version-check", COMPONENTIZE_PY]);
    run(pip, "pip install")?;
    std::fs::write(&marker, COMPONENTIZE_PY).map_err(io(&marker))?;
    Ok(bin)
}

/// `[project] name` and `[tool.synod] module` from pyproject.toml.
fn pyproject(path: &Path) -> Result<(String, String), BuildError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let doc: toml::Table = toml::from_str(&text).map_err(|e: toml::de::Error| manifest_err(path, e.to_string()))?;
    let name = doc
        .get("project")
        .and_then(|p| p.get("name"))
        .and_then(|n| n.as_str())
        .ok_or_else(|| manifest_err(path, "no [project] name"))?
        .to_owned();
    let module = doc
        .get("tool")
        .and_then(|t| t.get("synod"))
        .and_then(|s| s.get("module"))
        .and_then(|m| m.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| name.replace('-', "_"));
    Ok((name, module))
}

fn build_python(dir: &Path, options: &BuildOptions) -> Result<BuiltPlugin, BuildError> {
    let manifest = dir.join("pyproject.toml");
    let (name, module) = pyproject(&manifest)?;
    let module_file = module.replace('.', "/");
    if !dir.join(format!("{module_file}.py")).is_file() && !dir.join(&module_file).join("__init__.py").is_file() {
        return Err(manifest_err(
            &manifest,
            format!("the module `{module}` ([tool.synod] module) is not in {}", dir.display()),
        ));
    }
    let (target, out_dir) = dirs(dir, Language::Python, options);
    let component = out_dir.join(format!("{name}.wasm"));
    let hash = inputs_hash(Language::Python, COMPONENTIZE_PY, PY_SDK, dir);
    if up_to_date(&component, &hash) {
        return Ok(BuiltPlugin { name, component: component.clone(), core_module: component });
    }
    let compiler = py_compiler()?;
    let sdk = target.join("sdk");
    write_files(&sdk, PY_SDK)?;
    write_files(&target.join("wit"), &[("plugin.wit", PLUGIN_WIT.as_bytes())])?;
    std::fs::create_dir_all(&out_dir).map_err(io(&out_dir))?;
    eprintln!("synod: compiling {name} (Python; 10-20 s)");
    let mut cmd = Command::new(&compiler);
    cmd.current_dir(dir)
        .arg("-d")
        .arg(target.join("wit"))
        .args(["-w", "command-handler", "componentize", &module, "-p"])
        .arg(dir)
        .arg("-p")
        .arg(&sdk)
        .arg("--stub-wasi")
        .arg("-o")
        .arg(&component);
    run(cmd, "componentize-py")?;
    std::fs::write(stamp(&component), hash).map_err(io(&component))?;
    Ok(BuiltPlugin { name, component: component.clone(), core_module: component })
}

// --------------------------------------------------------------------- C --

fn cargo_bin() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
    home.join(".cargo/bin")
}

fn path_with_cargo_bin() -> std::ffi::OsString {
    let mut paths: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    paths.push(cargo_bin());
    std::env::join_paths(paths).unwrap_or_default()
}

/// clang-19 + wasi-libc (apt-get) and wasm-tools (cargo install).
fn c_toolchain() -> Result<(), BuildError> {
    let have_clang = on_path("clang-19") && Path::new("/usr/include/wasm32-wasi/stdio.h").is_file();
    let apt_hint = format!("apt-get install {}", C_PACKAGES.join(" "));
    if !have_clang {
        if !may_install() || !on_path("apt-get") {
            return Err(BuildError::ToolMissing { tool: "clang-19 and wasi-libc".into(), hint: apt_hint });
        }
        eprintln!("synod: installing the C plugin toolchain ({apt_hint})");
        let sudo = !is_root() && on_path("sudo");
        let apt = |args: &[&str]| {
            let mut cmd = if sudo { Command::new("sudo") } else { Command::new("apt-get") };
            if sudo {
                cmd.arg("apt-get");
            }
            cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
            cmd
        };
        run(apt(&["update", "-qq"]), "apt-get update")?;
        let mut install = apt(&["install", "-y", "-qq"]);
        install.args(C_PACKAGES);
        run(install, "apt-get install")?;
    }
    let wasm_tools_ok = Command::new("wasm-tools")
        .arg("--version")
        .env("PATH", path_with_cargo_bin())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(WASM_TOOLS_VERSION))
        .unwrap_or(false);
    if !wasm_tools_ok {
        let hint = format!(
            "cargo install wasm-tools --version {WASM_TOOLS_VERSION} --locked --no-default-features --features component,print"
        );
        if !may_install() {
            return Err(BuildError::ToolMissing { tool: format!("wasm-tools {WASM_TOOLS_VERSION}"), hint });
        }
        eprintln!("synod: installing wasm-tools {WASM_TOOLS_VERSION} ({hint})");
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.args(["install", "--quiet", "wasm-tools", "--version", WASM_TOOLS_VERSION, "--locked"])
            .args(["--no-default-features", "--features", "component,print"])
            .env("CARGO_TARGET_DIR", tools_dir().join("tools-target"));
        run(cmd, "cargo install wasm-tools")?;
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn build_c(dir: &Path, options: &BuildOptions) -> Result<BuiltPlugin, BuildError> {
    if !dir.join("Makefile").is_file() {
        return Err(manifest_err(
            dir,
            "a C plugin needs a Makefile that sets PLUGIN and SRCS and includes $(SYNOD_C_SDK)/plugin.mk \
             (`synod plugin new <name> --lang c` writes one)",
        ));
    }
    c_toolchain()?;
    let (target, out_dir) = dirs(dir, Language::C, options);
    let sdk = target.join("sdk");
    write_files(&sdk, C_SDK)?;
    // Objects and the core module of each plugin directory apart: plugins
    // sharing a target dir must never link each other's objects.
    let build = target.join("build").join(&blake3::hash(dir.as_os_str().as_encoded_bytes()).to_hex()[..16]);
    let make = |args: &[&str]| {
        let mut cmd = Command::new("make");
        cmd.current_dir(dir)
            .args(["--no-print-directory", "-s"])
            .args(args)
            .arg(format!("SYNOD_C_SDK={}", sdk.display()))
            .arg(format!("BUILD={}", build.display()))
            .env("PATH", path_with_cargo_bin());
        cmd
    };
    let out = make(&["synod-plugin-name"])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| BuildError::Spawn { program: "make".into(), source })?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || name.is_empty() {
        return Err(manifest_err(&dir.join("Makefile"), "it must include plugin.mk and set PLUGIN"));
    }
    run(make(&[]), "make")?;
    std::fs::create_dir_all(&out_dir).map_err(io(&out_dir))?;
    let component = out_dir.join(format!("{name}.wasm"));
    let made = dir.join(format!("{name}.wasm"));
    std::fs::copy(&made, &component).map_err(io(&made))?;
    Ok(BuiltPlugin { name, component, core_module: build.join("core.wasm") })
}
