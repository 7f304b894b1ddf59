//! Per-command overhead of the runtime, per plugin language: a fresh store
//! and instance from the pre-linked component, one `counter.increment`
//! through the apply stage (state view, buffered write, commit, digest),
//! then teardown — for the same counter written in Rust, C, JavaScript
//! (componentize-qjs) and Python (componentize-py), each built from
//! `plugins/` by `synod plugin build`'s code.
//!
//! Run: `cargo bench -p synod --bench runtime` (prints a table; add
//! `-- --json` for one JSON line per language, `-- --lang js,python` for
//! some). Not a test: it asserts nothing about speed; the README records
//! what it measured.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use synod::replica::Replica;
use synod::runtime::{Context, PluginLimits, Runtime};
use synod::toolchain::BuildOptions;

/// (language, directory under plugins/, package), and samples to take.
const LANGS: [(&str, &str, &str, u64); 4] = [
    ("rust", "", "counter", 20_000),
    ("c", "counter-c", "counter-c", 20_000),
    ("js", "counter-js", "counter", 5_000),
    ("python", "counter-py", "counter", 2_000),
];

fn component(dir: &str, package: &str) -> anyhow::Result<Vec<u8>> {
    let plugins = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    let built = if dir.is_empty() {
        synod::toolchain::build(&plugins, &BuildOptions { packages: vec![package.into()], ..Default::default() })?
    } else {
        synod::toolchain::build(&plugins.join(dir), &BuildOptions::default())?
    };
    Ok(std::fs::read(&built[0].component)?)
}

fn main() -> anyhow::Result<()> {
    let json = std::env::args().any(|a| a == "--json");
    let only: Option<Vec<String>> =
        std::env::args().skip_while(|a| a != "--lang").nth(1).map(|l| l.split(',').map(str::to_owned).collect());
    if !json {
        println!("runtime: counter.increment through apply, fresh instance per command");
        println!(
            "{:<8} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>12}",
            "language", "component", "compile", "mean", "p50", "p99", "max", "fuel/command"
        );
    }
    for (lang, dir, package, samples_wanted) in LANGS {
        if only.as_ref().is_some_and(|o| !o.iter().any(|l| l == lang)) {
            continue;
        }
        let bytes = component(dir, package)?;
        let runtime = Runtime::new()?;
        let started = Instant::now();
        let plugin = Arc::new(runtime.load(&bytes, PluginLimits::default())?);
        let compile = started.elapsed();

        let mut sm = Replica::default();
        sm.activate("counter", plugin.clone());
        let payload = br#"{"by":1}"#;
        let mut index = 0;
        let mut run = |n: u64, samples: &mut Vec<Duration>| -> anyhow::Result<u64> {
            let mut fuel = 0;
            for _ in 0..n {
                index += 1;
                let ctx = Context { index, term: 1, timestamp_ms: index, caller: "bench".into() };
                let t = Instant::now();
                let out = sm.apply_command(&ctx, "counter", "increment", payload)?;
                samples.push(t.elapsed());
                fuel = out.fuel_used;
                if let Err(e) = out.result {
                    anyhow::bail!("{lang}: increment failed: {e}");
                }
            }
            Ok(fuel)
        };
        run(samples_wanted / 10, &mut Vec::new())?;
        let mut samples = Vec::with_capacity(samples_wanted as usize);
        let wall = Instant::now();
        let fuel = run(samples_wanted, &mut samples)?;
        let wall = wall.elapsed();
        samples.sort();
        let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1e6;
        let mean = wall.as_secs_f64() * 1e6 / samples_wanted as f64;

        if json {
            println!(
                "{}",
                serde_json::json!({
                    "bench": "runtime.counter_increment", "language": lang,
                    "samples": samples_wanted, "mean_us": mean, "p50_us": pct(0.5), "p99_us": pct(0.99),
                    "max_us": pct(1.0), "fuel_per_command": fuel, "component_bytes": bytes.len(),
                    "compile_ms": compile.as_secs_f64() * 1e3,
                })
            );
        } else {
            println!(
                "{lang:<8} {:>8} KB {:>7.0} ms {:>6.2} µs {:>6.2} µs {:>6.2} µs {:>6.0} µs {fuel:>12}",
                bytes.len() / 1024,
                compile.as_secs_f64() * 1e3,
                mean,
                pct(0.5),
                pct(0.99),
                pct(1.0),
            );
        }
    }
    Ok(())
}
