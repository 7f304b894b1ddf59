//! Per-command overhead of the runtime: a fresh store and instance from the
//! pre-linked component, one `counter.increment` through the apply stage
//! (state view, buffered write, commit, digest), then teardown.
//!
//! Run: `cargo bench -p synod --bench runtime` (prints a table; add
//! `-- --json` for one JSON line). Not a test: it asserts nothing about
//! speed; the README records what it measured.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use synod::replica::Replica;
use synod::runtime::{Context, PluginLimits, Runtime};
use synod::toolchain::BuildOptions;

const WARMUP: u64 = 2_000;
const SAMPLES: u64 = 20_000;

fn main() -> anyhow::Result<()> {
    let json = std::env::args().any(|a| a == "--json");
    let plugins = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    let built =
        synod::toolchain::build(&plugins, &BuildOptions { packages: vec!["counter".into()], ..Default::default() })?;
    let bytes = std::fs::read(&built[0].component)?;

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
                anyhow::bail!("increment failed: {e}");
            }
        }
        Ok(fuel)
    };
    run(WARMUP, &mut Vec::new())?;
    let mut samples = Vec::with_capacity(SAMPLES as usize);
    let wall = Instant::now();
    let fuel = run(SAMPLES, &mut samples)?;
    let wall = wall.elapsed();
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1e6;
    let mean = wall.as_secs_f64() * 1e6 / SAMPLES as f64;

    if json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "runtime.counter_increment",
                "samples": SAMPLES, "mean_us": mean, "p50_us": pct(0.5), "p99_us": pct(0.99),
                "max_us": pct(1.0), "fuel_per_command": fuel, "component_bytes": bytes.len(),
                "compile_ms": compile.as_secs_f64() * 1e3,
            })
        );
    } else {
        println!("runtime: counter.increment through apply, fresh instance per command");
        println!("  component      {} bytes, compiled in {:.1} ms", bytes.len(), compile.as_secs_f64() * 1e3);
        println!("  samples        {SAMPLES} (after {WARMUP} warm-up)");
        println!("  mean           {mean:.2} µs/command ({:.0} commands/s)", 1e6 / mean);
        println!("  p50 / p99      {:.2} / {:.2} µs", pct(0.5), pct(0.99));
        println!("  max            {:.2} µs", pct(1.0));
        println!("  fuel/command   {fuel}");
    }
    Ok(())
}
