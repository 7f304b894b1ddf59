//! Spawns real `synod node` processes on loopback ports in a temp dir,
//! reads their addresses back from the generated configs, and kills them on
//! drop (printing their logs if the test failed).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use synod::client::{Client, ClientError};
use synod::config::NodeConfig;

/// Clusters are CPU-hungry; on a 2-core machine they run one at a time so
/// election timing reflects the code, not the scheduler.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

pub struct Member {
    pub config: NodeConfig,
    pub config_path: PathBuf,
    /// Extra environment for the process (e.g. `TOKIO_WORKER_THREADS`).
    pub env: Vec<(String, String)>,
    /// The binary it runs, when not this build's (an upgrade test's
    /// previous release).
    pub bin: Option<PathBuf>,
    child: Option<Child>,
}

impl Member {
    /// A member that is not running yet (`Cluster::restart` starts it).
    pub fn new(config: NodeConfig, config_path: PathBuf) -> Member {
        Member { config, config_path, env: Vec::new(), bin: None, child: None }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Wait up to `timeout` for the process to exit on its own; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, Member>,
}

/// The `synod` binary the nodes run: this build's, or `SYNOD_BIN` (a long
/// soak runs a copy, so rebuilding meanwhile cannot swap it underneath).
pub fn synod_bin() -> PathBuf {
    std::env::var_os("SYNOD_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_synod")))
}

/// Where a member's process log goes: beside its config (which is its data
/// dir, unless a test moved that onto a disk of its own).
pub fn log_path(config_path: &std::path::Path) -> PathBuf {
    config_path.with_file_name("node.log")
}

fn spawn(config_path: &PathBuf, bin: Option<&PathBuf>, env: &[(String, String)]) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path(config_path)).unwrap();
    Command::new(bin.cloned().unwrap_or_else(synod_bin))
        .args(["node", "--config"])
        .arg(config_path)
        .env("RUST_LOG", "info,openraft=warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap()
}

/// Tuning for a cluster led by node 1: the other nodes wait 20–25 s before
/// they stand for election, so node 1 leads, keeps the lead through a fault
/// on it, and leads again after a restart.
pub fn led_by_node_1(config: &mut NodeConfig) {
    if config.id != 1 {
        config.raft.election_timeout_min_ms = 20_000;
        config.raft.election_timeout_max_ms = 25_000;
    }
}

impl Cluster {
    /// `n` nodes (node 1 bootstraps), each config adjusted by `tune`.
    pub fn start(n: u64, tune: impl Fn(&mut NodeConfig)) -> Cluster {
        Cluster::start_env(n, &[], tune)
    }

    /// [`Cluster::start`] with extra environment for every node process.
    pub fn start_env(n: u64, env: &[(&str, &str)], tune: impl Fn(&mut NodeConfig)) -> Cluster {
        let mut c = Cluster::configure(n, env, tune);
        for id in 1..=n {
            c.restart(id);
        }
        c
    }

    /// [`Cluster::start_env`] without starting anything: the configs are
    /// written, [`Cluster::restart`] starts each node.
    pub fn configure(n: u64, env: &[(&str, &str)], tune: impl Fn(&mut NodeConfig)) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = BTreeMap::new();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        for (config_path, mut config) in synod::dev::prepare(dir.path(), n).unwrap() {
            tune(&mut config);
            std::fs::write(&config_path, config.to_toml().unwrap()).unwrap();
            nodes.insert(config.id, Member { config, config_path, env: env.clone(), bin: None, child: None });
        }
        Cluster { dir, nodes }
    }

    /// SIGSTOP (`stop = true`) or SIGCONT node `id`: a pause as long as the
    /// test likes, like a long GC or a VM migration.
    pub fn signal_pause(&self, id: u64, stop: bool) {
        if let Some(pid) = self.nodes[&id].pid() {
            let signal = if stop { "-STOP" } else { "-CONT" };
            let status = Command::new("kill").args([signal, &pid.to_string()]).status().unwrap();
            assert!(status.success(), "kill {signal} {pid}");
        }
    }

    /// A client of node `id` holding the cluster's first admin token.
    pub fn client(&self, id: u64) -> Client {
        self.client_with(id, self.admin_token().as_deref())
    }

    /// A client of node `id` with `token` (or none); over HTTPS, trusting
    /// the node's own certificate, when the node serves TLS.
    pub fn client_with(&self, id: u64, token: Option<&str>) -> Client {
        let config = &self.nodes[&id].config;
        let client = match &config.tls {
            None => Client::new(&config.http.to_string()),
            Some(tls) => Client::new(&format!("https://{}", config.http)).with_ca(&tls.cert).unwrap(),
        };
        client.with_token(token.map(str::to_owned))
    }

    /// The first admin token, which node 1 (the bootstrap node) wrote to
    /// its data dir once the cluster committed it.
    pub fn admin_token(&self) -> Option<String> {
        // Node 1's (the bootstrap node writes it), or wherever a test that
        // lost node 1 kept a copy.
        self.nodes.values().find_map(|m| {
            synod::node::auth::read_token_file(&synod::node::auth::admin_token_path(&m.config.data_dir)).ok()
        })
    }

    pub fn live(&self) -> Vec<u64> {
        self.nodes.iter().filter(|(_, m)| m.child.is_some()).map(|(id, _)| *id).collect()
    }

    /// kill -9.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.nodes.get_mut(&id).unwrap().child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// A config for a new node `id` under the cluster's dir (not written, not
    /// a member), with its own node key and its own random network key, as
    /// `synod dev` makes one.
    pub fn new_node(&self, id: u64) -> (PathBuf, NodeConfig) {
        let (path, mut config) = synod::dev::prepare(&self.dir.path().join(format!("new{id}")), 1).unwrap().remove(0);
        config.id = id;
        config.bootstrap = false;
        (path, config)
    }

    /// Start a fresh node `id` (see [`Cluster::new_node`]) that knows only
    /// the member `via` and has the network key `via` has, and add it to
    /// the cluster through `via`.
    pub async fn add_fresh(&mut self, id: u64, via: u64) {
        let (path, mut config) = self.new_node(id);
        config.peers = self.peer_configs(None).into_iter().filter(|p| p.id == via).collect();
        config.network_key = self.nodes[&via].config.network_key.clone();
        std::fs::write(&path, config.to_toml().unwrap()).unwrap();
        let peer_id = synod::p2p::identity::load_or_create(&config.data_dir).unwrap().public().to_peer_id().to_string();
        let add = serde_json::json!({"id": id, "peer_id": peer_id, "p2p": config.p2p, "http": config.http.to_string(),
            "engine": synod::runtime::Runtime::new().unwrap().fingerprint().hash, "protocol": synod::node::PROTOCOL_VERSION});
        self.nodes.insert(id, Member::new(config, path));
        self.restart(id);
        let added = self.client(via).post("/v1/cluster/nodes", serde_json::to_vec(&add).unwrap()).await.unwrap();
        assert_eq!(added["added"], serde_json::json!(id));
    }

    /// SIGTERM, as an operator stops a node, and wait for it to exit.
    pub fn stop(&mut self, id: u64) {
        if let Some(mut child) = self.nodes.get_mut(&id).unwrap().child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("node {id} did not stop within 30 s of SIGTERM");
        }
    }

    pub fn restart(&mut self, id: u64) {
        let m = self.nodes.get_mut(&id).unwrap();
        assert!(m.child.is_none(), "node {id} is running");
        m.child = Some(spawn(&m.config_path, m.bin.as_ref(), &m.env));
    }

    /// The leader every live node agrees on (and which is itself alive).
    pub async fn leader(&self) -> u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let live = self.live();
        loop {
            let mut seen = Vec::new();
            for id in self.live() {
                if let Ok(v) = self.client(id).get("/readyz").await {
                    seen.push(v["leader"].as_u64());
                }
            }
            if seen.len() == live.len()
                && seen.iter().all(|l| l.is_some() && *l == seen[0])
                && let Some(Some(l)) = seen.first()
                && live.contains(l)
            {
                return *l;
            }
            assert!(tokio::time::Instant::now() < deadline, "no agreed leader: {seen:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until every live node has applied the same operations, and
    /// return (digest index, digest).
    pub async fn converged(&self) -> (u64, String) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut seen = Vec::new();
            for id in self.live() {
                if let Ok(v) = self.client(id).get("/v1/cluster").await {
                    let me = &v["nodes"][0];
                    seen.push((
                        me["digest_index"].as_u64().unwrap_or(0),
                        me["digest"].as_str().unwrap_or("").to_owned(),
                    ));
                }
            }
            if seen.len() == self.live().len() && seen.windows(2).all(|w| w[0] == w[1]) {
                return seen[0].clone();
            }
            assert!(tokio::time::Instant::now() < deadline, "nodes did not converge: {seen:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until every live node has passed one common operation index,
    /// and check they hold the same digest there (nodes that keep applying
    /// heartbeats and reports are never all at the same index at once).
    /// Returns (index, digest).
    pub async fn same_digest(&self) -> (u64, String) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut last = Vec::new();
            for id in self.live() {
                if let Ok(v) = self.client(id).get("/v1/digest").await {
                    last.push(v["last_applied"].as_u64().unwrap_or(0));
                }
            }
            if last.len() == self.live().len()
                && let Some(index) = last.iter().min().copied()
            {
                let mut digests = Vec::new();
                for id in self.live() {
                    if let Ok(v) = self.client(id).get(&format!("/v1/digest?index={index}")).await {
                        digests.push((id, v["digest"].as_str().unwrap_or("").to_owned()));
                    }
                }
                if digests.len() == self.live().len() {
                    if !digests.windows(2).all(|w| w[0].1 == w[1].1) {
                        // Where they parted, and what each did there.
                        for id in self.live() {
                            if let Ok(report) = self.client(id).get("/v1/divergence").await {
                                eprintln!("---- node {id}: /v1/divergence ----\n{report:#}");
                            }
                        }
                        panic!("digests differ at {index}: {digests:?}");
                    }
                    return (index, digests[0].1.clone());
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "nodes did not pass a common index: {last:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The members as `[[peers]]` entries, for a node joining or
    /// impersonating them (`except` one id).
    pub fn peer_configs(&self, except: Option<u64>) -> Vec<synod::config::PeerConfig> {
        self.nodes
            .values()
            .filter(|m| Some(m.config.id) != except)
            .map(|m| synod::config::PeerConfig {
                id: m.config.id,
                peer_id: synod::p2p::identity::load_or_create(&m.config.data_dir)
                    .unwrap()
                    .public()
                    .to_peer_id()
                    .to_string(),
                p2p: m.config.p2p.clone(),
                http: m.config.http.to_string(),
            })
            .collect()
    }

    /// Upload a component through node `via`.
    pub async fn push(&self, via: u64, name: &str, version: &str, bytes: Vec<u8>) -> Result<Value, ClientError> {
        self.client(via).post(&format!("/v1/plugins/{name}?version={version}"), bytes).await
    }

    /// Run a command through node `via`.
    pub async fn cmd(&self, via: u64, plugin: &str, command: &str, payload: Value) -> Result<Value, ClientError> {
        self.client(via).post(&format!("/v1/commands/{plugin}/{command}"), serde_json::to_vec(&payload).unwrap()).await
    }

    /// A sample's value on node `id`, from its `/metrics` (`name` with its
    /// labels, as written there).
    pub async fn metric(&self, id: u64, name: &str) -> f64 {
        let text = self.client(id).get("/metrics").await.unwrap();
        let line = text.as_str().expect("metrics are text").lines().find(|l| l.split_whitespace().next() == Some(name));
        line.and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    /// Wait (at most 10 s) until node `id` has applied operation `index`.
    pub async fn wait_applied(&self, id: u64, index: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.client(id).get("/v1/digest").await.unwrap()["last_applied"].as_u64().unwrap() < index {
            assert!(std::time::Instant::now() < deadline, "node {id} did not apply index {index}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A node's local view of a plugin's state.
    pub async fn local_state(&self, id: u64, plugin: &str) -> Value {
        self.client(id).get(&format!("/v1/state/{plugin}?consistency=local&limit=1000000")).await.unwrap()["entries"]
            .clone()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        for (id, m) in self.nodes.iter_mut() {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            if failed {
                // `SYNOD_TEST_LOGS=dir` keeps each failed cluster's node
                // logs whole, in dir/<pid>/.
                if let Some(dir) = std::env::var_os("SYNOD_TEST_LOGS") {
                    let keep = PathBuf::from(dir).join(std::process::id().to_string());
                    let _ = std::fs::create_dir_all(&keep);
                    let _ = std::fs::copy(log_path(&m.config_path), keep.join(format!("node{id}.log")));
                }
                let log = std::fs::read_to_string(log_path(&m.config_path)).unwrap_or_default();
                // How its state came to be: each start, snapshot and
                // checkpoint it opened, and snapshot it installed.
                const MARKS: [&str; 6] =
                    ["node started", "state opened", "checkpoint", "installed", "snapshot not written", "stopping"];
                eprintln!("---- node {id} log (starts and state changes) ----");
                for line in log.lines().filter(|l| MARKS.iter().any(|m| l.contains(m))).take(200) {
                    eprintln!("{line}");
                }
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- node {id} log (last 40 lines) ----");
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// The HTTP status of a client call (200 for a success).
pub fn status_of(r: &Result<Value, ClientError>) -> u16 {
    match r {
        Ok(_) => 200,
        Err(ClientError::Status { status, .. }) => *status,
        Err(e) => panic!("no answer: {e}"),
    }
}

/// The JSON body of a client call's answer, success or error.
pub fn body_of(r: &Result<Value, ClientError>) -> Value {
    match r {
        Ok(v) => v.clone(),
        Err(ClientError::Status { body, .. }) => body.clone(),
        Err(e) => panic!("no answer: {e}"),
    }
}
