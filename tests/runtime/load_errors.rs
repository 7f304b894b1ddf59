//! Bad components are refused with a typed, readable error; none panics the
//! host. Components for other worlds are generated from WIT text with
//! wit-component (no hand-written wasm).

use synod::runtime::{CommandError, LoadError, PluginLimits, Runtime};
use wit_component::{ComponentEncoder, StringEncoding, dummy_module, embed_component_metadata};
use wit_parser::{LiftLowerAbi, ManglingAndAbi, Resolve};

use crate::harness::{component, core_module, wit_dir};

fn load(bytes: &[u8]) -> LoadError {
    match Runtime::new().unwrap().load(bytes, PluginLimits::default()) {
        Ok(_) => panic!("loaded"),
        Err(e) => e,
    }
}

/// A component for `world` in `extra` (a WIT package that may use
/// synod:plugin from `wit/`, possibly rewritten by `edit`).
fn generated(edit: impl Fn(String) -> String, extra: Option<&str>, world: &str) -> Vec<u8> {
    let mut resolve = Resolve::default();
    let synod_src = edit(std::fs::read_to_string(wit_dir().join("plugin.wit")).unwrap());
    let synod = resolve.push_str("plugin.wit", &synod_src).unwrap();
    let main = match extra {
        Some(src) => resolve.push_str("extra.wit", src).unwrap(),
        None => synod,
    };
    let world = resolve.select_world(&[main], Some(world)).unwrap();
    let mut module = dummy_module(&resolve, world, ManglingAndAbi::Legacy(LiftLowerAbi::Sync));
    embed_component_metadata(&mut module, &resolve, world, StringEncoding::UTF8).unwrap();
    ComponentEncoder::default().module(&module).unwrap().validate(true).encode().unwrap()
}

#[test]
fn not_wasm() {
    let source = std::fs::read(wit_dir().join("plugin.wit")).unwrap();
    assert!(matches!(load(&source), LoadError::NotWasm));
    assert!(matches!(load(&[]), LoadError::NotWasm));
}

#[test]
fn core_module_is_not_a_component() {
    let e = load(&core_module("counter"));
    assert!(matches!(e, LoadError::CoreModule));
    assert!(e.to_string().contains("synod plugin build"), "{e}");
}

#[test]
fn truncated_component_does_not_compile() {
    let bytes = component("counter");
    let e = load(&bytes[..bytes.len() / 2]);
    assert!(matches!(e, LoadError::Compile { .. }), "{e:?}");
}

#[test]
fn too_large() {
    let runtime = Runtime::new().unwrap().with_max_component_bytes(1024);
    let bytes = component("counter");
    match runtime.load(&bytes, PluginLimits::default()) {
        Err(LoadError::TooLarge { size, limit: 1024 }) => assert_eq!(size, bytes.len()),
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn component_for_another_world() {
    let other = "package test:other; world thing { export run: func(); }";
    let e = load(&generated(|s| s, Some(other), "thing"));
    match &e {
        LoadError::WrongWorld { exports } => assert_eq!(exports, "run"),
        _ => panic!("{e:?}"),
    }
    assert!(e.to_string().contains("does not implement the command-handler world"), "{e}");
}

#[test]
fn component_with_a_foreign_import() {
    let extra = "package test:extra;
        interface env { get: func() -> string; }
        world sneaky { import env; export synod:plugin/handler@0.1.1; }";
    match load(&generated(|s| s, Some(extra), "sneaky")) {
        LoadError::UnsupportedImport { name } => assert_eq!(name, "test:extra/env"),
        e => panic!("{e:?}"),
    }
}

#[test]
fn component_for_an_incompatible_wit_version() {
    let bytes = generated(|s| s.replace("@0.1.1", "@0.2.0"), None, "command-handler");
    match load(&bytes) {
        LoadError::IncompatibleVersion { found, supported } => {
            assert_eq!((found.as_str(), supported.as_str()), ("0.2.0", "0.1.1"))
        }
        e => panic!("{e:?}"),
    }
}

/// A component built against `synod:plugin@0.1.0` (before `devices`
/// existed) links against this host unchanged: its imports and export are
/// found by semver-compatible lookup. (The generated module's functions
/// trap, so loading stops at `describe`, after linking succeeded.)
#[test]
fn a_component_built_against_0_1_0_still_links() {
    let old = |s: String| s.replace("@0.1.1", "@0.1.0").replace("    import devices;\n", "");
    let bytes = generated(old, None, "command-handler");
    match load(&bytes) {
        LoadError::Describe(CommandError::Trap { .. }) => {}
        e => panic!("a 0.1.0 component must link and reach describe: {e:?}"),
    }
}

#[test]
fn component_missing_an_export() {
    let without_query =
        |s: String| s.lines().filter(|l| !l.trim_start().starts_with("query: func")).collect::<Vec<_>>().join("\n");
    let e = load(&generated(without_query, None, "command-handler"));
    match &e {
        LoadError::Mismatch { reason } => assert!(reason.contains("query"), "{reason}"),
        _ => panic!("{e:?}"),
    }
}

#[test]
fn describe_that_traps_is_refused() {
    // The right world, but every export of a dummy module traps.
    match load(&generated(|s| s, None, "command-handler")) {
        LoadError::Describe(CommandError::Trap { message }) => {
            assert!(message.contains("unreachable"), "{message}")
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn limits_beyond_the_ceiling_are_refused() {
    let limits = PluginLimits { memory_bytes: usize::MAX, ..PluginLimits::default() };
    let e = Runtime::new().unwrap().load(&component("counter"), limits).err().unwrap();
    assert!(matches!(e, LoadError::Limits { .. }), "{e:?}");
}
