//! State-scale benchmark: Synod and etcd holding millions of keys, side by
//! side in one run, on loopback, fsync on for both.
//!
//! Starts a three-node Synod cluster (authentication on; snapshots at the
//! node default: every 2,000 entries times the state's size in 64 MiB, at
//! most 32,000, or once the writes since change 200,000 keys) and a
//! three-member etcd cluster (Debian `etcd-server` 3.4,
//! `--quota-backend-bytes` 16 GiB). For each key
//! count (cumulative: 1M, then up to 3M, …) it loads both to that many keys
//! of `--value-bytes` (Synod through the `misbehave` plugin's `fill`, 5,000
//! keys a command; etcd with 128-put transactions), then:
//!
//! - overwrites random existing keys closed-loop at 1 and 64 in flight for
//!   `--seconds` each, and reports p50/p99/max latency — Synod's windows
//!   include its snapshots, counted from `/metrics`;
//! - RSS per node against the live data (key and value bytes);
//! - snapshot size and build time (Synod `snapshot.bin`, etcd's db size);
//! - restart to ready: every node killed with SIGKILL and started again,
//!   until a write succeeds;
//! - with `--backup`: a backup of the whole state from one node (Synod's
//!   `GET /v1/backup` from the leader, read to the end; `etcdctl snapshot
//!   save` against etcd's first member), its time and size, how far that
//!   node's RSS rose above where it was while it was taken (sampled every
//!   10 ms), and write latency at 1 in flight meanwhile.
//!
//! Run: `cargo bench -p synod --bench state` (options: `-- --keys
//! 1000000,3000000,10000000 --value-bytes 100 --seconds 20 --systems
//! synod,etcd --json state-results.json --metrics-dir DIR --backup`;
//! `--metrics-dir` saves every Synod node's `/metrics` after each stage's
//! writes; `SYNOD_BENCH_KEEP=1` keeps the data dirs and logs). Stops every
//! process it started.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use serde_json::{Value, json};

mod common;
use common::*;

struct Options {
    keys: Vec<u64>,
    value_bytes: usize,
    seconds: u64,
    inflight: Vec<usize>,
    systems: Vec<String>,
    json: PathBuf,
    /// Where to save each node's `/metrics` after each stage's writes.
    metrics_dir: Option<PathBuf>,
    /// Take a backup at each stage.
    backup: bool,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        keys: vec![1_000_000],
        value_bytes: 100,
        seconds: 20,
        inflight: vec![1, 64],
        systems: vec!["synod".into(), "etcd".into()],
        json: PathBuf::from("state-results.json"),
        metrics_dir: None,
        backup: false,
    };
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut v = || it.next().cloned().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--keys" => o.keys = v()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--value-bytes" => o.value_bytes = v()?.parse()?,
            "--seconds" => o.seconds = v()?.parse()?,
            "--inflight" => o.inflight = v()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--systems" => o.systems = v()?.split(',').map(str::to_owned).collect(),
            "--json" => o.json = v()?.into(),
            "--metrics-dir" => o.metrics_dir = Some(v()?.into()),
            "--backup" => o.backup = true,
            other => bail!("unknown option {other}"),
        }
    }
    if o.keys.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--keys must grow: each stage adds keys to the last");
    }
    Ok(o)
}

/// A key's name in both systems (the `fill` command's naming).
fn key(i: u64) -> String {
    format!("k/{i:08}")
}

fn value(i: u64, n: usize) -> String {
    let mut v = format!("{i:08}-");
    v.extend(std::iter::repeat_n('x', n.saturating_sub(v.len())));
    v
}

/// A small deterministic generator for the keys to overwrite.
fn pick(i: u64, n: u64) -> u64 {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x ^ (x >> 29)) % n.max(1)
}

/// One Prometheus sample's value from a `/metrics` text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

struct Etcd {
    procs: BTreeMap<usize, Proc>,
    client: Vec<u16>,
    peer: Vec<u16>,
    dir: PathBuf,
}

impl Etcd {
    fn start(&mut self, i: usize, state: &str) -> anyhow::Result<()> {
        let cluster: Vec<String> = (0..3).map(|j| format!("e{j}=http://127.0.0.1:{}", self.peer[j])).collect();
        let proc = spawn(
            &format!("etcd-{i}"),
            Command::new("etcd")
                .args(["--name", &format!("e{i}"), "--data-dir"])
                .arg(self.dir.join(format!("etcd-{i}")))
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{}", self.client[i])])
                .args(["--advertise-client-urls", &format!("http://127.0.0.1:{}", self.client[i])])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", self.peer[i])])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{}", self.peer[i])])
                .args(["--initial-cluster", &cluster.join(","), "--initial-cluster-state", state])
                .args(["--initial-cluster-token", "synod-state-bench", "--log-level", "warn"])
                .args(["--quota-backend-bytes", &(16u64 << 30).to_string()]),
            &self.dir.join(format!("etcd-{i}.log")),
        )?;
        self.procs.insert(i, proc);
        Ok(())
    }

    fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.client[i])
    }

    async fn put(http: &reqwest::Client, url: &str, k: &str, v: &str) -> bool {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let body = json!({ "key": b64(k), "value": b64(v) }).to_string();
        matches!(http.post(format!("{url}/v3/kv/put")).body(body).send().await, Ok(r) if r.status().is_success())
    }

    async fn load(&self, http: &reqwest::Client, from: u64, to: u64, value_bytes: usize) -> anyhow::Result<()> {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let mut batches = Vec::new();
        let mut start = from;
        while start < to {
            let end = (start + 128).min(to);
            batches.push((start, end));
            start = end;
        }
        let url = self.url(0);
        let mut stream = futures::stream::iter(batches.into_iter().map(|(a, b)| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let ops: Vec<Value> = (a..b)
                    .map(|i| json!({ "requestPut": { "key": b64(&key(i)), "value": b64(&value(i, value_bytes)) } }))
                    .collect();
                let body = json!({ "success": ops }).to_string();
                for _ in 0..20 {
                    if let Ok(r) = http.post(format!("{url}/v3/kv/txn")).body(body.clone()).send().await
                        && r.status().is_success()
                    {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                bail!("etcd did not take keys {a}..{b}")
            }
        }))
        .buffer_unordered(8);
        use futures::StreamExt as _;
        while let Some(r) = stream.next().await {
            r?;
        }
        Ok(())
    }

    async fn db_size(&self, http: &reqwest::Client) -> f64 {
        let v: Value = match http.post(format!("{}/v3/maintenance/status", self.url(0))).body("{}").send().await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => Value::Null,
        };
        v["dbSize"].as_str().and_then(|s| s.parse::<f64>().ok()).or(v["dbSize"].as_f64()).unwrap_or(0.0)
    }
}

#[derive(serde::Serialize, Default)]
struct StageResult {
    keys: u64,
    live_mb: f64,
    load_seconds: f64,
    writes: BTreeMap<usize, Stats>,
    snapshots_during_writes: f64,
    /// Client commands the leader held for snapshots to catch up
    /// (`raft.max_unsnapshotted_changes`) during the load, and during the
    /// measured writes after it, with the seconds held in all.
    held_during_load: (f64, f64),
    held_during_writes: (f64, f64),
    snapshot_build_seconds_mean: f64,
    snapshot_mb: f64,
    rss_mb: Vec<f64>,
    /// Of `rss_mb`, the process's own (anonymous) memory: the rest is file
    /// pages it maps (Synod's snapshot, etcd's bbolt file), page cache the
    /// kernel may drop.
    anon_rss_mb: Vec<f64>,
    peak_rss_mb: Vec<f64>,
    restart_seconds: f64,
    backup: Option<Backup>,
}

/// A backup taken while one client writes.
#[derive(serde::Serialize, Default)]
struct Backup {
    seconds: f64,
    mb: f64,
    /// The node's RSS before, and the most it rose above that meanwhile.
    rss_before_mb: f64,
    rss_rise_mb: f64,
    /// Writes at 1 in flight meanwhile.
    writes: u64,
    p50_ms: f64,
    max_ms: f64,
}

/// Run `take` (a backup: returns its size in bytes) while sampling the RSS
/// of `pid` every 10 ms and writing with `write` at 1 in flight.
async fn backup_while_writing<W, WF, T>(pid: u32, write: W, take: T) -> anyhow::Result<Backup>
where
    W: Fn(u64) -> WF + Send + 'static,
    WF: std::future::Future<Output = bool> + Send,
    T: std::future::Future<Output = anyhow::Result<u64>>,
{
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let rss_before_mb = rss_mb(pid);
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut most = 0f64;
            while !stop.load(Ordering::Relaxed) {
                most = most.max(rss_mb(pid));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            most
        })
    };
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && i < 10_000_000 {
                let t = Instant::now();
                if write(i).await {
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                }
                i += 1;
            }
            latencies
        })
    };
    let started = Instant::now();
    let taken = take.await;
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let most = sampler.await?;
    let mut latencies = writer.await?;
    let bytes = taken?;
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies.get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)));
    Ok(Backup {
        seconds,
        mb: bytes as f64 / 1e6,
        rss_before_mb,
        rss_rise_mb: (most - rss_before_mb).max(0.0),
        writes: latencies.len() as u64,
        p50_ms: at(0.5).copied().unwrap_or(0.0),
        max_ms: latencies.last().copied().unwrap_or(0.0),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let o = options()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_owned();
    // SYNOD_BENCH_KEEP=1 leaves the data dirs and node logs (named on
    // stderr) for a look at them, or to restart a loaded cluster by hand.
    let _tmp = if std::env::var_os("SYNOD_BENCH_KEEP").is_some() {
        eprintln!("keeping {}", tmp.keep().display());
        None
    } else {
        Some(tmp)
    };
    let http = reqwest::Client::builder().pool_max_idle_per_host(512).build()?;
    let run = Duration::from_secs(o.seconds);
    let warmup = Duration::from_secs(2);
    let want = |s: &str| o.systems.iter().any(|x| x == s);
    let live_mb = |n: u64| n as f64 * (key(0).len() + o.value_bytes) as f64 / 1e6;

    // Synod: three nodes; the misbehave plugin's `fill` writes the keys.
    let mut synod = Synod { procs: BTreeMap::new(), configs: BTreeMap::new(), dir: dir.clone() };
    let mut etcd = Etcd {
        procs: BTreeMap::new(),
        client: (0..3).map(|_| free_port()).collect(),
        peer: (0..3).map(|_| free_port()).collect(),
        dir: dir.clone(),
    };
    if want("synod") {
        for (path, config) in synod::dev::prepare(&dir.join("synod"), 3)? {
            std::fs::write(&path, config.to_toml()?)?;
            synod.configs.insert(config.id, (path, config));
        }
        for id in 1..=3 {
            synod.start_node(id)?;
        }
    }
    if want("etcd") {
        for i in 0..3 {
            etcd.start(i, "new")?;
        }
        for i in 0..3 {
            wait_http_ok(&http, &format!("{}/health", etcd.url(i)), "etcd").await?;
        }
    }
    let api = if want("synod") {
        let leader = synod.leader(&http).await?;
        let api = Synod::api(&synod.admin_token()?)?;
        let plugins = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins");
        let built = synod::toolchain::build(
            &plugins,
            &synod::toolchain::BuildOptions { packages: vec!["misbehave".into()], ..Default::default() },
        )?;
        let bytes = std::fs::read(&built[0].component)?;
        let r = api.post(format!("{}/v1/plugins/misbehave?version=1", synod.http(leader))).body(bytes).send().await?;
        if !r.status().is_success() {
            bail!("upload failed: {}", r.text().await?);
        }
        Some(api)
    } else {
        None
    };

    let mut results: BTreeMap<String, Vec<StageResult>> = BTreeMap::new();
    let mut loaded = 0u64;
    println!(
        "\n| system | keys | live MB | in-flight | writes/s | p50 ms | p99 ms | max ms | snapshots | snapshot s | snapshot MB | RSS MB per node | of which anon MB | peak RSS MB | restart s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|");
    for &n in &o.keys {
        // Synod.
        if let Some(api) = &api {
            let mut r = StageResult { keys: n, live_mb: live_mb(n), ..Default::default() };
            let leader = synod.leader(&http).await?;
            let url = format!("{}/v1/commands/misbehave/fill", synod.http(leader));
            let started = Instant::now();
            let mut chunks = Vec::new();
            let mut from = loaded;
            while from < n {
                let count = (n - from).min(5_000);
                chunks.push((from, count));
                from += count;
            }
            let vb = o.value_bytes;
            let mut s = futures::stream::iter(chunks.into_iter().map(|(from, count)| {
                let (api, url) = (api.clone(), url.clone());
                async move {
                    let body = json!({ "from": from, "count": count, "value_bytes": vb }).to_string();
                    for _ in 0..20 {
                        match api.post(&url).body(body.clone()).send().await {
                            Ok(r) if r.status().is_success() => return Ok(()),
                            Ok(r) if r.status().is_client_error() => bail!("fill refused: {}", r.text().await?),
                            _ => tokio::time::sleep(Duration::from_millis(200)).await,
                        }
                    }
                    bail!("Synod did not take keys from {from}")
                }
            }))
            .buffer_unordered(2);
            while let Some(x) = s.next().await {
                x?;
            }
            r.load_seconds = started.elapsed().as_secs_f64();
            let metrics = |id: u64| {
                let (h, u) = (api.clone(), format!("{}/metrics", synod.http(id)));
                async move { h.get(u).send().await.ok()?.text().await.ok() }
            };
            let before = metrics(leader).await.unwrap_or_default();
            for &inflight in &o.inflight {
                let (h, url) = (api.clone(), url.clone());
                let stats = drive(inflight, warmup, run, move |i| {
                    let body = json!({ "from": pick(i, n), "count": 1, "value_bytes": vb }).to_string();
                    let req = h.post(&url).body(body).send();
                    async move { matches!(req.await, Ok(r) if r.status().is_success()) }
                })
                .await;
                r.writes.insert(inflight, stats);
            }
            let after = metrics(leader).await.unwrap_or_default();
            if let Some(dir) = &o.metrics_dir {
                std::fs::create_dir_all(dir)?;
                for &id in synod.procs.keys() {
                    std::fs::write(
                        dir.join(format!("synod-{n}-node{id}.prom")),
                        metrics(id).await.unwrap_or_default(),
                    )?;
                }
            }
            let count = metric(&after, "synod_snapshot_build_seconds_count")
                - metric(&before, "synod_snapshot_build_seconds_count");
            let sum = metric(&after, "synod_snapshot_build_seconds_sum")
                - metric(&before, "synod_snapshot_build_seconds_sum");
            r.snapshots_during_writes = count;
            let held =
                |m: &str| (metric(m, "synod_write_hold_seconds_count"), metric(m, "synod_write_hold_seconds_sum"));
            r.held_during_load = held(&before);
            r.held_during_writes = (held(&after).0 - held(&before).0, held(&after).1 - held(&before).1);
            r.snapshot_build_seconds_mean = if count > 0.0 { sum / count } else { 0.0 };
            let snap = synod.configs[&leader].1.data_dir.join("snapshot.bin");
            r.snapshot_mb = std::fs::metadata(&snap).map(|m| m.len() as f64 / 1e6).unwrap_or(0.0);
            r.rss_mb = synod.procs.values().map(|p| rss_mb(p.child.id())).collect();
            r.anon_rss_mb = synod.procs.values().map(|p| anon_rss_mb(p.child.id())).collect();
            r.peak_rss_mb = synod.procs.values().map(|p| peak_rss_mb(p.child.id())).collect();
            if o.backup {
                let (h, wurl) = (api.clone(), url.clone());
                let write = move |i| {
                    let body = json!({ "from": pick(i, n), "count": 1, "value_bytes": vb }).to_string();
                    let req = h.post(&wurl).body(body).send();
                    async move { matches!(req.await, Ok(r) if r.status().is_success()) }
                };
                let take = async {
                    let r = api.get(format!("{}/v1/backup", synod.http(leader))).send().await?;
                    if !r.status().is_success() {
                        bail!("backup refused: {}", r.text().await?);
                    }
                    let mut body = r.bytes_stream();
                    let mut bytes = 0u64;
                    while let Some(piece) = body.next().await {
                        bytes += piece?.len() as u64;
                    }
                    Ok(bytes)
                };
                r.backup = Some(backup_while_writing(synod.procs[&leader].child.id(), write, take).await?);
            }
            // Restart: every node at once, SIGKILL, then until a write succeeds.
            synod.procs.clear();
            let t = Instant::now();
            for id in 1..=3 {
                synod.start_node(id)?;
            }
            let deadline = t + Duration::from_secs(600);
            loop {
                let l = synod.leader(&http).await?;
                let body = json!({ "from": 0, "count": 1, "value_bytes": vb }).to_string();
                let u = format!("{}/v1/commands/misbehave/fill", synod.http(l));
                if matches!(api.post(&u).body(body).send().await, Ok(r) if r.status().is_success()) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("Synod did not take a write after restarting");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r.restart_seconds = t.elapsed().as_secs_f64();
            print_rows("synod", &r);
            results.entry("synod".into()).or_default().push(r);
        }
        // etcd.
        if want("etcd") {
            let mut r = StageResult { keys: n, live_mb: live_mb(n), ..Default::default() };
            let started = Instant::now();
            etcd.load(&http, loaded, n, o.value_bytes).await?;
            r.load_seconds = started.elapsed().as_secs_f64();
            for &inflight in &o.inflight {
                let (h, url, vb) = (http.clone(), etcd.url(0), o.value_bytes);
                let stats = drive(inflight, warmup, run, move |i| {
                    let k = pick(i, n);
                    let (h, url) = (h.clone(), url.clone());
                    async move { Etcd::put(&h, &url, &key(k), &value(k, vb)).await }
                })
                .await;
                r.writes.insert(inflight, stats);
            }
            r.snapshot_mb = etcd.db_size(&http).await / 1e6;
            r.rss_mb = etcd.procs.values().map(|p| rss_mb(p.child.id())).collect();
            r.anon_rss_mb = etcd.procs.values().map(|p| anon_rss_mb(p.child.id())).collect();
            r.peak_rss_mb = etcd.procs.values().map(|p| peak_rss_mb(p.child.id())).collect();
            if o.backup {
                let (h, url, vb) = (http.clone(), etcd.url(0), o.value_bytes);
                let write = move |i| {
                    let k = pick(i, n);
                    let (h, url) = (h.clone(), url.clone());
                    async move { Etcd::put(&h, &url, &key(k), &value(k, vb)).await }
                };
                let file = dir.join(format!("etcd-{n}.snapshot"));
                let (endpoint, path) = (etcd.url(0), file.clone());
                let take = async move {
                    let save = path.clone();
                    let out = tokio::task::spawn_blocking(move || {
                        Command::new("etcdctl")
                            .env("ETCDCTL_API", "3")
                            .args(["--endpoints", &endpoint, "snapshot", "save"])
                            .arg(&save)
                            .output()
                    })
                    .await??;
                    if !out.status.success() {
                        bail!("etcdctl snapshot save failed: {}", String::from_utf8_lossy(&out.stderr));
                    }
                    Ok(std::fs::metadata(&path)?.len())
                };
                r.backup = Some(backup_while_writing(etcd.procs[&0].child.id(), write, take).await?);
                let _ = std::fs::remove_file(&file);
            }
            etcd.procs.clear();
            let t = Instant::now();
            for i in 0..3 {
                etcd.start(i, "existing")?;
            }
            let deadline = t + Duration::from_secs(600);
            while !Etcd::put(&http, &etcd.url(0), &key(0), &value(0, o.value_bytes)).await {
                if Instant::now() > deadline {
                    bail!("etcd did not take a write after restarting");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r.restart_seconds = t.elapsed().as_secs_f64();
            print_rows("etcd", &r);
            results.entry("etcd".into()).or_default().push(r);
        }
        loaded = n;
    }
    if o.backup {
        println!("\nBackups (from the leader / etcd's first member, one client writing at 1 in flight meanwhile):\n");
        println!(
            "| system | keys | live MB | backup s | backup MB | node RSS before MB | RSS rise MB | writes meanwhile | p50 ms | max ms |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (system, stages) in &results {
            for r in stages {
                print_backup(system, r);
            }
        }
    }
    std::fs::write(&o.json, serde_json::to_string_pretty(&results)?)?;
    eprintln!("results in {}", o.json.display());
    Ok(())
}

fn print_backup(system: &str, r: &StageResult) {
    if let Some(b) = &r.backup {
        println!(
            "| {system} | {} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {} | {:.2} | {:.1} |",
            r.keys, r.live_mb, b.seconds, b.mb, b.rss_before_mb, b.rss_rise_mb, b.writes, b.p50_ms, b.max_ms
        );
    }
}

fn print_rows(system: &str, r: &StageResult) {
    if system == "synod" {
        let ((n, s), (wn, ws)) = (r.held_during_load, r.held_during_writes);
        eprintln!(
            "synod at {} keys: the leader held {n:.0} commands ({s:.1} s in all) during the load, \
             {wn:.0} ({ws:.1} s) during the writes after it",
            r.keys
        );
    }
    let rss: Vec<String> = r.rss_mb.iter().map(|m| format!("{m:.0}")).collect();
    let anon: Vec<String> = r.anon_rss_mb.iter().map(|m| format!("{m:.0}")).collect();
    let peak: Vec<String> = r.peak_rss_mb.iter().map(|m| format!("{m:.0}")).collect();
    for (inflight, s) in &r.writes {
        println!(
            "| {system} | {} | {:.0} | {inflight} | {:.0} | {:.2} | {:.2} | {:.1} | {} | {} | {:.0} | {} | {} | {} | {:.2} |",
            r.keys,
            r.live_mb,
            s.ops_per_sec,
            s.p50_ms,
            s.p99_ms,
            s.max_ms,
            if system == "synod" { format!("{:.0}", r.snapshots_during_writes) } else { "–".into() },
            if system == "synod" { format!("{:.2}", r.snapshot_build_seconds_mean) } else { "–".into() },
            r.snapshot_mb,
            rss.join(" / "),
            anon.join(" / "),
            peak.join(" / "),
            r.restart_seconds
        );
    }
}
