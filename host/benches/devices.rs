//! Devices benchmark: many simulated Modbus devices driven by one node,
//! side by side with the least any poller could spend on them.
//!
//! Starts the Modbus simulator (in this process) with `--devices` rooms, a
//! three-node Synod cluster (release build, fsync on) with a nats-server
//! when one is installed, the `modbus-room` driver, and every device
//! eligible on node 1 only, polled at 1 Hz. Half the rooms sit at ambient
//! (their readings do not change), half are heated (every reading
//! changes by more than the deadband). Then measures, over `--seconds`:
//!
//! - node CPU % and RSS, log entries/s and committed reports/s against
//!   readings/s (coalescing and batching at work);
//! - the same devices polled at 1 Hz by a bare tokio-modbus loop in this
//!   process (one connection per device, no wasm, no log): the floor;
//! - latency from a register change on the simulator to the committed
//!   reported state, and from a desired PATCH to the coil written.
//!
//! Run: `cargo bench -p synod --bench devices` (options: `-- --devices 1000
//! --seconds 30 --samples 100`). Stops every process it started.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use synod_sim::modbus::{SimConfig, SimHandle};
use tokio_modbus::client::Reader;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Options {
    devices: usize,
    seconds: u64,
    samples: usize,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options { devices: 1000, seconds: 30, samples: 100 };
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--devices" => o.devices = value()?.parse()?,
            "--seconds" => o.seconds = value()?.parse()?,
            "--samples" => o.samples = value()?.parse()?,
            other => bail!("unknown option {other}"),
        }
    }
    Ok(o)
}

/// (user + system CPU seconds, RSS MiB) of a process.
fn cpu_rss(pid: u32) -> (f64, f64) {
    let ticks = 100.0; // CLK_TCK on Linux
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ")".
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let cpu = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0);
    (cpu / ticks, rss)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn get(http: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
    Ok(http.get(url).send().await?.error_for_status()?.json().await?)
}

fn nats_server(dir: &Path) -> Option<(Proc, String)> {
    let port = synod::dev::free_port().ok()?;
    let child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.join("nats"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((Proc(child), format!("nats://127.0.0.1:{port}")))
}

fn profile() -> impl Fn(usize) -> Value {
    |k| {
        json!({
            "temperature": { "table": "input", "address": 16 * k, "type": "i16", "scale": 0.1 },
            "heater": { "table": "coil", "address": 16 * k },
            "poll_ms": 1000,
            "report": { "min_interval_ms": 1000, "deadband": { "temperature": 0.1 } },
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // reqwest takes its TLS backend from rustls' process default (ring here).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let o = options()?;
    let tmp = tempfile::tempdir()?;
    // SYNOD_BENCH_KEEP=1 keeps every node's data and log for a look.
    let dir = if std::env::var_os("SYNOD_BENCH_KEEP").is_some() { tmp.keep() } else { tmp.path().to_owned() };
    eprintln!("working in {}", dir.display());
    let http = reqwest::Client::new();
    let sim_config = SimConfig { rooms: o.devices, seed: 1, ..SimConfig::default() };
    let sim = synod_sim::modbus::start("127.0.0.1:0".parse()?, sim_config).await?;
    // Even rooms sit at ambient: their readings never change. Odd rooms
    // heat at 0.5 °C/s: every reading changes by more than the deadband.
    let mut writer = tokio_modbus::client::tcp::connect_slave(sim.addr(), tokio_modbus::Slave(1)).await?;
    for k in 0..o.devices {
        if k % 2 == 0 {
            sim.set_temperature(k, 10.0);
        } else {
            use tokio_modbus::client::Writer;
            writer.write_single_coil((16 * k) as u16, true).await??;
        }
    }
    drop(writer);
    let me = std::process::id();

    // Phase 0: the simulator alone, so its CPU can be taken out of the
    // baseline measured in this process.
    let window = Duration::from_secs(o.seconds);
    let (c0, _) = cpu_rss(me);
    tokio::time::sleep(window / 3).await;
    let sim_cpu = (cpu_rss(me).0 - c0) / (window / 3).as_secs_f64();

    // Baseline: a bare poller, one connection per device, 1 Hz.
    let readings = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut pollers = Vec::new();
    for k in 0..o.devices {
        let (addr, readings, stop) = (sim.addr(), readings.clone(), stop.clone());
        pollers.push(tokio::spawn(async move {
            let Ok(mut ctx) = tokio_modbus::client::tcp::connect_slave(addr, tokio_modbus::Slave(1)).await else {
                return;
            };
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.notified() => return,
                }
                let a = (16 * k) as u16;
                if ctx.read_input_registers(a, 1).await.is_ok() && ctx.read_coils(a, 1).await.is_ok() {
                    readings.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (c1, _) = cpu_rss(me);
    let r1 = readings.load(Ordering::Relaxed);
    tokio::time::sleep(window).await;
    let base_cpu = ((cpu_rss(me).0 - c1) / window.as_secs_f64() - sim_cpu).max(0.0);
    let base_rate = (readings.load(Ordering::Relaxed) - r1) as f64 / window.as_secs_f64();
    stop.notify_waiters();
    for p in pollers {
        p.abort();
    }

    // Synod: three nodes, every device eligible on node 1.
    let nats = nats_server(&dir);
    let configs = synod::dev::prepare(&dir, 3)?;
    let mut procs = BTreeMap::new();
    let mut https = BTreeMap::new();
    for (path, mut config) in configs {
        config.nats.url = nats.as_ref().map(|(_, u)| u.clone());
        std::fs::write(&path, config.to_toml()?)?;
        let log = std::fs::File::create(dir.join(format!("synod-{}.log", config.id)))?;
        let child = Command::new(env!("CARGO_BIN_EXE_synod"))
            .args(["node", "--config"])
            .arg(&path)
            .env("RUST_LOG", std::env::var("SYNOD_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
            .env("TOKIO_WORKER_THREADS", synod::dev::DEV_WORKER_THREADS)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()?;
        https.insert(config.id, format!("http://{}", config.http));
        procs.insert(config.id, Proc(child));
    }
    let leader = loop {
        if let Ok(v) = get(&http, &format!("{}/readyz", https[&1])).await
            && let Some(l) = v["leader"].as_u64()
        {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let lh = https[&leader].clone();
    // Every API call carries the cluster's first admin token (readyz
    // answered, so node 1 has written it).
    let token = synod::node::auth::read_token_file(&synod::node::auth::admin_token_path(&dir.join("n1")))?;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse()?);
    let http = reqwest::Client::builder().default_headers(headers).build()?;
    let plugins = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    let built = synod::toolchain::build(&plugins, &synod::toolchain::BuildOptions::default())?;
    let driver = built.iter().find(|b| b.name == "modbus-room").context("modbus-room not built")?;
    http.post(format!("{lh}/v1/plugins/modbus-room?version=1"))
        .body(std::fs::read(&driver.component)?)
        .send()
        .await?
        .error_for_status()?;
    let grant = format!("modbus-tcp://{}/1", sim.addr());
    let profile = profile();
    let defs = futures::stream::iter(0..o.devices).map(|k| {
        let (http, lh, grant) = (http.clone(), lh.clone(), grant.clone());
        let body = json!({ "driver": "modbus-room", "profile": profile(k), "grants": [grant], "eligible": ["1"] });
        async move {
            http.put(format!("{lh}/v1/devices/room-{k}")).body(body.to_string()).send().await?.error_for_status()?;
            anyhow::Ok(())
        }
    });
    let results: Vec<anyhow::Result<()>> = defs.buffer_unordered(64).collect().await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    // Wait until every device reports.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = get(&http, &format!("{lh}/v1/devices?limit=100000&consistency=local")).await?;
        let reporting = v["devices"]
            .as_array()
            .map_or(0, |d| d.iter().filter(|d| d["reported"]["temperature"].is_number()).count());
        if reporting == o.devices {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {reporting} of {} devices report", o.devices);
        }
        eprintln!("{reporting} of {} devices report", o.devices);
        tokio::time::sleep(Duration::from_millis(2000)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Steady state.
    let bus = match &nats {
        Some((_, url)) => Some(async_nats::connect(url).await?),
        None => None,
    };
    let telemetry = Arc::new(AtomicU64::new(0));
    let reports = Arc::new(AtomicU64::new(0));
    for (subject, counter) in [("synod.tel.>", telemetry.clone()), ("synod.evt.device.*.reported", reports.clone())] {
        if let Some(bus) = &bus {
            let mut sub = bus.subscribe(subject).await?;
            tokio::spawn(async move {
                while sub.next().await.is_some() {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }
    let pids: BTreeMap<u64, u32> = procs.iter().map(|(id, p)| (*id, p.0.id())).collect();
    let cluster = |v: &Value| v["applied_index"].as_u64().unwrap_or(0);
    let e0 = cluster(&get(&http, &format!("{lh}/v1/cluster")).await?);
    let cpu0: BTreeMap<u64, f64> = pids.iter().map(|(id, pid)| (*id, cpu_rss(*pid).0)).collect();
    let (t0, r0) = (telemetry.load(Ordering::Relaxed), reports.load(Ordering::Relaxed));
    tokio::time::sleep(window).await;
    let secs = window.as_secs_f64();
    let entries = (cluster(&get(&http, &format!("{lh}/v1/cluster")).await?) - e0) as f64 / secs;
    let readings_rate = (telemetry.load(Ordering::Relaxed) - t0) as f64 / secs;
    let reports_rate = (reports.load(Ordering::Relaxed) - r0) as f64 / secs;
    let node_stats: BTreeMap<u64, (f64, f64)> = pids
        .iter()
        .map(|(id, pid)| {
            let (cpu, rss) = cpu_rss(*pid);
            (*id, ((cpu - cpu0[id]) / secs * 100.0, rss))
        })
        .collect();

    // Latency: register change → committed reported (read on the leader).
    let stable: Vec<usize> = (0..o.devices).step_by(2).take(o.samples).collect();
    let mut register = Vec::new();
    for chunk in stable.chunks(10) {
        let runs = chunk.iter().enumerate().map(|(i, k)| {
            let (http, lh, sim) = (http.clone(), lh.clone(), sim.clone());
            let target = 12.0 + (register.len() + i) as f64 * 0.1 % 8.0;
            async move { register_latency(&http, &lh, &sim, *k, target).await }
        });
        for r in futures::future::join_all(runs).await {
            register.push(r?);
        }
    }
    // Latency: desired PATCH → coil written on the simulator.
    let mut actuate = Vec::new();
    for chunk in stable.chunks(10) {
        let runs = chunk.iter().map(|k| {
            let (http, lh, sim) = (http.clone(), lh.clone(), sim.clone());
            async move { actuate_latency(&http, &lh, &sim, *k).await }
        });
        for r in futures::future::join_all(runs).await {
            actuate.push(r?);
        }
    }
    register.sort_by(f64::total_cmp);
    actuate.sort_by(f64::total_cmp);

    println!();
    println!(
        "{} devices polled at 1 Hz, all owned by node 1 (leader: node {leader}); {} s window",
        o.devices, o.seconds
    );
    println!();
    println!("| | CPU % (of one core) | RSS MiB | polls/s | telemetry msgs/s | log entries/s | committed reports/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!("| bare tokio-modbus poller (floor) | {:.1} | — | {base_rate:.0} | — | — | — |", base_cpu * 100.0);
    for (id, (cpu, rss)) in &node_stats {
        let role = match (*id == 1, *id == leader) {
            (true, true) => "owner + leader",
            (true, false) => "owner",
            (false, true) => "leader",
            _ => "follower",
        };
        let (p, r, e, rep) = if *id == 1 {
            // Two metrics per poll (temperature, heater).
            (
                format!("{:.0}", readings_rate / 2.0),
                format!("{readings_rate:.0}"),
                format!("{entries:.1}"),
                format!("{reports_rate:.0}"),
            )
        } else {
            ("—".into(), "—".into(), "—".into(), "—".into())
        };
        println!("| synod node {id} ({role}) | {cpu:.1} | {rss:.0} | {p} | {r} | {e} | {rep} |");
    }
    println!();
    println!("| latency (ms) | p50 | p90 | p99 | max | samples |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, v) in [("register change → committed reported", &register), ("desired PATCH → coil written", &actuate)]
    {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            percentile(v, 0.5),
            percentile(v, 0.9),
            percentile(v, 0.99),
            percentile(v, 1.0),
            v.len()
        );
    }
    if nats.is_none() {
        println!("(no nats-server: readings and reports/s not counted)");
    }
    drop(procs);
    sim.shutdown().await;
    Ok(())
}

/// Set room `k` (at ambient) to `target` °C and time until the leader's
/// shadow reports the change.
async fn register_latency(
    http: &reqwest::Client,
    lh: &str,
    sim: &SimHandle,
    k: usize,
    target: f64,
) -> anyhow::Result<f64> {
    sim.set_temperature(k, target);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(10);
    loop {
        let v = get(http, &format!("{lh}/v1/devices/room-{k}?consistency=local")).await?;
        // The room sat at ambient (10 °C); from the moment it is set to
        // `target` (≥ 12) it drifts back at 0.25 °C/s, so any reading above
        // 11 is the change.
        if v["device"]["reported"]["temperature"].as_f64().unwrap_or(0.0) > 11.0 {
            return Ok(t0.elapsed().as_secs_f64() * 1000.0);
        }
        if Instant::now() > deadline {
            bail!("room-{k} never reported {target}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Flip room `k`'s desired heater and time until the coil has it.
async fn actuate_latency(http: &reqwest::Client, lh: &str, sim: &SimHandle, k: usize) -> anyhow::Result<f64> {
    let want = !sim.heater(k).unwrap_or(false);
    let t0 = Instant::now();
    http.patch(format!("{lh}/v1/devices/room-{k}/desired"))
        .body(json!({ "heater": want }).to_string())
        .send()
        .await?
        .error_for_status()?;
    let deadline = t0 + Duration::from_secs(10);
    while sim.heater(k) != Some(want) {
        if Instant::now() > deadline {
            bail!("room-{k}'s coil never became {want}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}
