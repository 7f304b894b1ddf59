//! The example plugins, built from source once per test process with the
//! same code as `synod plugin build`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use synod::toolchain::{BuildOptions, BuiltPlugin};

fn plugins_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins")
}

/// Every example plugin, built.
pub fn built() -> &'static BTreeMap<String, BuiltPlugin> {
    static BUILT: OnceLock<BTreeMap<String, BuiltPlugin>> = OnceLock::new();
    BUILT.get_or_init(|| {
        let built = synod::toolchain::build(&plugins_dir(), &BuildOptions::default())
            .unwrap_or_else(|e| panic!("building plugins/ failed: {e}"));
        built.into_iter().map(|b| (b.name.clone(), b)).collect()
    })
}

/// The component bytes of an example plugin.
pub fn component(name: &str) -> Vec<u8> {
    std::fs::read(&built()[name].component).unwrap()
}

/// The core module an example plugin's component was made from.
#[allow(dead_code)]
pub fn core_module(name: &str) -> Vec<u8> {
    std::fs::read(&built()[name].core_module).unwrap()
}

/// `counter` built with its `v2` feature: replies carry `"version": 2`.
#[allow(dead_code)]
pub fn counter_v2() -> Vec<u8> {
    with_feature("counter", "v2")
}

/// An example plugin of the workspace built with one of its features, once
/// per test process.
#[allow(dead_code)]
pub fn with_feature(package: &str, feature: &str) -> Vec<u8> {
    static BUILT: std::sync::Mutex<BTreeMap<(String, String), Vec<u8>>> = std::sync::Mutex::new(BTreeMap::new());
    let id = (package.to_owned(), feature.to_owned());
    if let Some(bytes) = BUILT.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
        return bytes.clone();
    }
    built(); // the plain build first, so the two builds never race for the target dir
    let out = std::env::temp_dir().join(format!("synod-{package}-{feature}-{}", std::process::id()));
    let options = BuildOptions {
        packages: vec![package.into()],
        features: vec![feature.into()],
        out_dir: Some(out),
        ..Default::default()
    };
    let built = serialized(|| synod::toolchain::build(&plugins_dir(), &options))
        .unwrap_or_else(|e| panic!("building {package} with {feature} failed: {e}"));
    let bytes = std::fs::read(&built[0].component).unwrap();
    BUILT.lock().unwrap_or_else(|e| e.into_inner()).insert(id, bytes.clone());
    bytes
}

/// The component of the plugin in `plugins/<dir>` (any language), built
/// with `synod plugin build`'s code once per test process. Builds run one
/// at a time: they share the plugin target dir.
#[allow(dead_code)]
pub fn built_dir(dir: &str) -> Vec<u8> {
    static BUILT: std::sync::Mutex<BTreeMap<String, Vec<u8>>> = std::sync::Mutex::new(BTreeMap::new());
    if let Some(bytes) = BUILT.lock().unwrap_or_else(|e| e.into_inner()).get(dir) {
        return bytes.clone();
    }
    let path = plugins_dir().join(dir);
    let out = serialized(|| synod::toolchain::build(&path, &BuildOptions::default()))
        .unwrap_or_else(|e| panic!("building plugins/{dir} failed: {e}"));
    let bytes = std::fs::read(&out[0].component).unwrap();
    BUILT.lock().unwrap_or_else(|e| e.into_inner()).insert(dir.to_owned(), bytes.clone());
    bytes
}

/// Run a plugin build while no other build of this process runs (they
/// share the plugin target dir and its staged SDKs).
#[allow(dead_code)]
pub fn serialized<T>(build: impl FnOnce() -> T) -> T {
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    build()
}
