//! The one place where the engine's determinism-relevant settings live.
//!
//! In: nothing but these constants (and [`PluginLimits`] per plugin). Out: a
//! configured [`wasmtime::Engine`] and its [`EngineFingerprint`].
//!
//! Every setting that can change what a command computes, how much fuel it
//! uses or where it traps is here and in the fingerprint: the wasmtime
//! version, Cranelift, NaN canonicalization, relaxed SIMD, threads, fuel,
//! the wasm stack size and the target architecture. Nodes whose
//! fingerprints differ must not form one cluster.

use serde::{Deserialize, Serialize};
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, OperatorCost, PoolingAllocationConfig, Strategy};

/// The exact wasmtime release every node runs (pinned with `=` in
/// `Cargo.toml`; a test checks the two agree).
pub const WASMTIME_VERSION: &str = "48.0.8";

/// Native stack a command may use, in bytes. Where deep recursion traps
/// depends on it, so it is part of the fingerprint.
pub const MAX_WASM_STACK: usize = 512 * 1024;

/// Largest linear memory any plugin may be granted, in bytes; the pooling
/// allocator reserves slots of this size.
pub const MAX_MEMORY_CEILING: usize = 256 * 1024 * 1024;

/// Instances that may be live at once across the node (commands run one at a
/// time; queries and drivers add a few).
const POOL_INSTANCES: u32 = 64;

/// Dirty linear-memory bytes reset with `memset` (keeping the pages mapped)
/// when a slot is reused, instead of `madvise` + page faults on the next
/// command. Speed only: a reused slot reads as fresh either way.
const KEEP_RESIDENT: usize = 4 * 1024 * 1024;

/// Core instances a single component may create. wit-component output for a
/// Rust or C plugin uses 3 (the module plus its import shims); a Python
/// plugin (componentize-py: the interpreter, libc, libpython and their
/// shims) about 38; a QuickJS plugin (componentize-qjs) fewer. Whether a
/// component loads depends on it, so it is in the fingerprint.
pub const CORE_INSTANCES_PER_COMPONENT: u32 = 64;

/// Linear memories a single component may have: Rust, C and Python plugins
/// use 1, a QuickJS plugin 3 (the engine, libc, the bindings glue).
pub const MEMORIES_PER_COMPONENT: u32 = 4;

/// Tables a single component may have.
pub const TABLES_PER_COMPONENT: u32 = 8;

/// Default per-command resource limits. A plugin may be installed with its
/// own [`PluginLimits`]; these numbers are documented in `wit/README.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!(PluginLimits::default()))]
pub struct PluginLimits {
    /// Fuel per command (≈ one unit per wasm instruction).
    pub fuel: u64,
    /// Linear memory per instance, in bytes (at most [`MAX_MEMORY_CEILING`]).
    pub memory_bytes: usize,
    /// Largest successful output or error message, in bytes.
    pub output_bytes: usize,
    /// Distinct keys one command may write or delete.
    pub max_writes: usize,
    /// Largest key, in bytes.
    pub max_key_bytes: usize,
    /// Largest value, in bytes.
    pub max_value_bytes: usize,
    /// Total bytes of keys and values one command may write.
    pub max_write_bytes: usize,
    /// Events one command may emit.
    pub max_events: usize,
    /// Largest event payload, in bytes.
    pub max_event_bytes: usize,
    /// Plugin log lines kept per command (more are counted and dropped).
    pub max_log_lines: usize,
    /// Longest plugin log line kept, in bytes (longer lines are cut).
    pub max_log_line_bytes: usize,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            fuel: 100_000_000,
            memory_bytes: 64 * 1024 * 1024,
            output_bytes: 1024 * 1024,
            max_writes: 10_000,
            max_key_bytes: 1024,
            max_value_bytes: 1024 * 1024,
            max_write_bytes: 16 * 1024 * 1024,
            max_events: 1_000,
            max_event_bytes: 64 * 1024,
            max_log_lines: 100,
            max_log_line_bytes: 1024,
        }
    }
}

/// What a cluster compares between nodes: equal fingerprints mean equal
/// results, fuel and traps for the same component and inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = crate::api::schema::example::engine)]
pub struct EngineFingerprint {
    /// wasmtime release.
    pub wasmtime: String,
    /// Native architecture Cranelift compiles for (stack frame sizes, and so
    /// where recursion traps, depend on it).
    pub arch: String,
    /// Every determinism-relevant engine setting, as `name=value` pairs.
    pub settings: Vec<String>,
    /// blake3 over all of the above; the short form shown to operators.
    pub hash: String,
}

/// Build the engine every command handler runs on.
pub fn build_engine() -> Result<(Engine, EngineFingerprint), wasmtime::Error> {
    let mut config = Config::new();
    config
        .strategy(Strategy::Cranelift)
        // Float results must not depend on the CPU: NaN bit patterns are
        // canonicalized, relaxed SIMD is off (and deterministic if a later
        // change turns it on).
        .cranelift_nan_canonicalization(true)
        .wasm_relaxed_simd(false)
        .relaxed_simd_deterministic(true)
        // Threads: wasmtime is built without its `threads` feature, so the
        // proposal cannot be enabled at all.
        // Fuel, not time, bounds a command: it stops at the same instruction
        // on every node. Epoch interruption would not, so it stays off.
        .consume_fuel(true)
        .operator_cost(fuel_costs())
        .epoch_interruption(false)
        .max_wasm_stack(MAX_WASM_STACK)
        // Trap messages are reported to callers and hashed into the digest;
        // backtraces carry nothing a node must agree on.
        .wasm_backtrace_max_frames(None)
        .memory_init_cow(true)
        // Bounds checks in the compiled code instead of guard pages and
        // signal handlers. With guard pages wasmtime must `mprotect` a
        // memory back to its initial size after every instance (and again
        // when the next one grows it), and each `mprotect` costs a TLB
        // shootdown on every core; without them a reused slot stays
        // read-write. 11.3 -> 7.1 µs per command (`cargo bench --bench
        // runtime`). Traps are the same traps either way.
        .signals_based_traps(false)
        .memory_guard_size(0)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling()));
    let engine = Engine::new(&config)?;
    Ok((engine, fingerprint()))
}

/// The fuel cost of every operator, set explicitly so that fuel does not
/// follow a changed default: wasmtime 48's table (1 per instruction; `nop`,
/// `drop`, `block`, `loop`, `else`, `end`, `return`, `unreachable` free;
/// bulk memory and table operations 1 more per byte or element copied,
/// filled or initialized).
fn fuel_costs() -> OperatorCost {
    OperatorCost::new()
}

fn pooling() -> PoolingAllocationConfig {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(POOL_INSTANCES)
        .total_core_instances(POOL_INSTANCES * CORE_INSTANCES_PER_COMPONENT)
        // Most instances have one memory and one or two tables; a few
        // multi-memory plugins fit beside them.
        .total_memories(POOL_INSTANCES * 2)
        .total_tables(POOL_INSTANCES * 4)
        .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
        .max_memories_per_component(MEMORIES_PER_COMPONENT)
        .max_tables_per_component(TABLES_PER_COMPONENT)
        .max_memory_size(MAX_MEMORY_CEILING)
        // Find the pages a command dirtied (PAGEMAP_SCAN, Linux 6.7+) and
        // reset only those; without the ioctl wasmtime falls back to madvise.
        .pagemap_scan(Enabled::Auto)
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(64 * 1024);
    pool
}

/// The environment variable that adds a salt to the engine fingerprint.
pub const FINGERPRINT_SALT_ENV: &str = "SYNOD_FINGERPRINT_SALT";

/// This build's fingerprint, salted by [`FINGERPRINT_SALT_ENV`].
///
/// `SYNOD_FINGERPRINT_SALT`, when set and not empty, adds the setting
/// `salt=<value>` and so changes the hash, with the engine itself
/// unchanged. It is the way to test admission and upgrade procedures: a
/// node started with a salt looks to its peers exactly like one running a
/// different engine build, and is refused at connection time. Unset (or
/// empty), the fingerprint is exactly the unsalted one. Never set it on a
/// production member: the cluster will refuse that node.
fn fingerprint() -> EngineFingerprint {
    let salt = std::env::var(FINGERPRINT_SALT_ENV).ok();
    fingerprint_with(salt.as_deref())
}

/// The fingerprint with an explicit salt (`None` or empty: none), so tests
/// need not touch the process-wide environment.
fn fingerprint_with(salt: Option<&str>) -> EngineFingerprint {
    let limits = PluginLimits::default();
    let mut settings = vec![
        "strategy=cranelift".to_owned(),
        "nan_canonicalization=true".to_owned(),
        "relaxed_simd=false".to_owned(),
        "threads=false".to_owned(),
        "consume_fuel=true".to_owned(),
        "epoch_interruption=false".to_owned(),
        "signals_based_traps=false".to_owned(),
        "memory_guard_size=0".to_owned(),
        format!("max_wasm_stack={MAX_WASM_STACK}"),
        format!("max_memory_ceiling={MAX_MEMORY_CEILING}"),
        // Whether a component loads at all (a Python or QuickJS plugin needs
        // more than a Rust one).
        format!(
            "per_component=core_instances:{CORE_INSTANCES_PER_COMPONENT},memories:{MEMORIES_PER_COMPONENT},tables:{TABLES_PER_COMPONENT}"
        ),
        // The whole table, not a name for it: any changed cost changes this.
        format!("fuel_costs={}", &blake3::hash(format!("{:?}", fuel_costs()).as_bytes()).to_hex()[..16]),
        // What host calls cost decides where a command runs out of fuel.
        format!(
            "host_fuel=call:{},byte:{},scan_entry:{},scan_max:{}",
            super::host::HOST_CALL_FUEL,
            super::host::HOST_BYTE_FUEL,
            super::host::SCAN_ENTRY_FUEL,
            super::host::MAX_SCAN_ENTRIES
        ),
        // What loads (the interfaces a handler may import) and where the
        // device interface refuses a call decide results too.
        format!("wit={}", super::WIT_VERSION),
        format!(
            "devices=max_document:{},max_desired_patches:{}",
            crate::replica::devices::MAX_DEVICE_BYTES,
            super::host::MAX_DESIRED_PATCHES
        ),
        // Defaults matter for plugins installed without explicit limits.
        format!("default_limits={limits:?}"),
    ];
    if let Some(salt) = salt.filter(|s| !s.is_empty()) {
        settings.push(format!("salt={salt}"));
    }
    let arch = std::env::consts::ARCH.to_owned();
    let mut h = blake3::Hasher::new_derive_key("synod 2026-11 engine fingerprint v1");
    h.update(WASMTIME_VERSION.as_bytes());
    h.update(arch.as_bytes());
    for s in &settings {
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    EngineFingerprint {
        wasmtime: WASMTIME_VERSION.to_owned(),
        arch,
        settings,
        hash: h.finalize().to_hex()[..16].to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_version_matches_the_manifest() {
        let manifest = include_str!("../../../Cargo.toml");
        assert!(
            manifest.contains(&format!("version = \"={WASMTIME_VERSION}\"")),
            "Cargo.toml must pin wasmtime to ={WASMTIME_VERSION}"
        );
    }

    #[test]
    fn fingerprint_is_stable_and_engine_builds() {
        let (_, a) = build_engine().unwrap();
        let (_, b) = build_engine().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.hash.len(), 16);
    }

    /// A salt changes the hash and nothing else; no salt (or an empty one)
    /// leaves the fingerprint exactly as it was.
    #[test]
    fn salt_changes_only_the_hash() {
        let plain = fingerprint_with(None);
        assert_eq!(fingerprint_with(Some("")), plain);
        assert!(plain.settings.iter().all(|s| !s.starts_with("salt=")));
        let salted = fingerprint_with(Some("x"));
        assert_ne!(salted.hash, plain.hash);
        assert_eq!(salted.hash.len(), 16);
        assert_eq!(salted.settings.last().map(String::as_str), Some("salt=x"));
        assert_eq!(salted.settings[..salted.settings.len() - 1], plain.settings[..]);
        assert_ne!(fingerprint_with(Some("y")).hash, salted.hash);
        assert_eq!(fingerprint_with(Some("x")), salted);
    }
}
