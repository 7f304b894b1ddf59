//! What the benchmarks share: processes they start and stop, a closed-loop
//! driver with latency percentiles, and a Synod cluster of real nodes.

#![allow(dead_code)] // each benchmark uses its own part

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    synod::dev::free_port().unwrap_or(0)
}

pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
    // Appended to: a node restarted in a run keeps its earlier lines.
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let child = cmd
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Proc { name: name.to_owned(), child })
}

pub fn rss_mb(pid: u32) -> f64 {
    status_mb(pid, "VmRSS:")
}

/// Anonymous resident memory of process `pid` (`RssAnon`: its heap, not
/// the file pages it maps), in MB.
pub fn anon_rss_mb(pid: u32) -> f64 {
    status_mb(pid, "RssAnon:")
}

/// Peak resident memory of process `pid` since it started (`VmHWM`), in MB.
pub fn peak_rss_mb(pid: u32) -> f64 {
    status_mb(pid, "VmHWM:")
}

fn status_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Latency summary of one run.
#[derive(Clone, serde::Serialize)]
pub struct Stats {
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub errors: u64,
    /// Successful operations in the measured window.
    pub count: u64,
}

/// Drive `op` closed-loop with `inflight` outstanding requests.
pub async fn drive<F, Fut>(inflight: usize, warmup: Duration, run: Duration, op: F) -> Stats
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    // `SYNOD_BENCH_SLOW_MS=N`: print every measured write slower than N ms
    // with the wall-clock second it started, to line up with node logs.
    let slow_ms = std::env::var("SYNOD_BENCH_SLOW_MS").ok().and_then(|s| s.parse::<f64>().ok());
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..inflight {
        let (op, stop, measuring, errors) = (op.clone(), stop.clone(), measuring.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = w as u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = op(i).await;
                let m = measuring.load(Ordering::Relaxed);
                if m && ok {
                    let took = t.elapsed();
                    if slow_ms.is_some_and(|s| took.as_secs_f64() * 1e3 > s) {
                        let since =
                            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                        eprintln!(
                            "slow write: {:.1} ms, started at {:.3} s (Unix time)",
                            took.as_secs_f64() * 1e3,
                            (since - took).as_secs_f64()
                        );
                    }
                    lat.push(took);
                } else if m {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                i += inflight as u64;
            }
            lat
        }));
    }
    tokio::time::sleep(warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(run).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all.sort();
    let pct = |p: f64| all.get(((all.len() as f64 - 1.0) * p) as usize).map_or(0.0, |d| d.as_secs_f64() * 1e3);
    Stats {
        ops_per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.5),
        p90_ms: pct(0.9),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        errors: errors.load(Ordering::Relaxed),
        count: all.len() as u64,
    }
}

pub async fn wait_http_ok(http: &reqwest::Client, url: &str, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http.get(url).send().await, Ok(r) if r.status().is_success()) {
        if Instant::now() > deadline {
            bail!("{what} did not become ready ({url})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

pub struct Synod {
    pub procs: BTreeMap<u64, Proc>,
    pub configs: BTreeMap<u64, (PathBuf, synod::config::NodeConfig)>,
    pub dir: PathBuf,
}

impl Synod {
    pub fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        let (path, _) = &self.configs[&id];
        let proc = spawn(
            &format!("synod-{id}"),
            // SYNOD_BIN runs another build (to compare two commits in one
            // run, alternating); by default this build's binary.
            Command::new(std::env::var_os("SYNOD_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_synod").into()))
                .args(["node", "--config"])
                .arg(path)
                .env("RUST_LOG", std::env::var("SYNOD_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
                .env("TOKIO_WORKER_THREADS", synod::dev::DEV_WORKER_THREADS),
            &self.dir.join(format!("synod-{id}.log")),
        )?;
        self.procs.insert(id, proc);
        Ok(())
    }

    pub fn http(&self, id: u64) -> String {
        format!("http://{}", self.configs[&id].1.http)
    }

    /// The cluster's first admin token (node 1 bootstraps it).
    pub fn admin_token(&self) -> anyhow::Result<String> {
        let data_dir = &self.configs[&1].1.data_dir;
        Ok(synod::node::auth::read_token_file(&synod::node::auth::admin_token_path(data_dir))?)
    }

    /// An HTTP client sending `token`.
    pub fn api(token: &str) -> anyhow::Result<reqwest::Client> {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse()?);
        Ok(reqwest::Client::builder().pool_max_idle_per_host(512).default_headers(headers).build()?)
    }

    pub async fn leader(&self, http: &reqwest::Client) -> anyhow::Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        // The ready node that names itself leader: another node's answer
        // may be stale right after a restart, and killing a follower by
        // mistake would time nothing. (Ready includes the cluster's first
        // admin token.)
        loop {
            for id in self.procs.keys() {
                if let Ok(r) = http.get(format!("{}/readyz", self.http(*id))).send().await
                    && r.status().is_success()
                    && let Ok(v) = r.json::<Value>().await
                    && v["leader"].as_u64() == Some(*id)
                {
                    return Ok(*id);
                }
            }
            if Instant::now() > deadline {
                bail!("no synod leader");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
