//! The fault battery: clients record a history of register and counter
//! operations through every node while nemeses kill, power-cycle, pause,
//! partition, jump clocks and upgrade plugins; after each round everything
//! heals and the history is checked.
//!
//! Checks, per round:
//! - the register history is linearizable (per key; `synod::chaos`);
//! - counter increments with request ids: every acknowledged value is
//!   unique and acknowledged ≤ final ≤ invoked (nothing lost, nothing
//!   applied twice);
//! - entry timestamps never go backwards in log order;
//! - every node ends at one applied index with one digest.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use synod::chaos::linearizability::{Operation, Outcome, RegOp, check};
use synod::client::{Client, ClientError};

use crate::harness::Cluster;
use crate::lossy::LossyDisk;
use crate::plugins::component;
use crate::rng::Rng;

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Nemesis {
    /// kill -9 a node (the leader half the time) and restart it.
    Kill,
    /// kill -9 a node and drop every write it had not fsynced.
    PowerLoss,
    /// Fill a node's disk under load until it stops (a node exits on a
    /// storage error), lose its unsynced writes, free the space, restart.
    DiskFull,
    /// SIGSTOP a node for seconds (longer than an election), then SIGCONT.
    Pause,
    /// Cut the leader off from every other node.
    IsolateLeader,
    /// Cut two nodes off from each other; a third still reaches both.
    Bridge,
    /// Shift one node's clock by up to an hour either way (until the round
    /// ends).
    ClockJump,
    /// Upload the register plugin under a new version and activate it.
    Upgrade,
}

/// What a run did: the published figures.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub rounds: u64,
    pub operations: u64,
    pub acknowledged_writes: u64,
    pub unknown: u64,
    /// Disk-full cycles where the node noticed and exited on its own.
    pub disk_full_exits: u64,
    pub counter_invoked: u64,
    pub counter_acknowledged: u64,
    pub cycles: BTreeMap<String, u64>,
}

impl Tally {
    pub fn count(&mut self, nemesis: Nemesis) {
        *self.cycles.entry(format!("{nemesis:?}")).or_default() += 1;
    }

    pub fn cycles_of(&self, nemesis: Nemesis) -> u64 {
        self.cycles.get(&format!("{nemesis:?}")).copied().unwrap_or(0)
    }

    pub fn summary(&self) -> String {
        format!(
            "{} rounds, {} operations ({} acknowledged writes, {} unknown), {} counter increments ({} acknowledged); \
             cycles: {:?} ({} disk-full exits); 0 lost, 0 linearizability violations",
            self.rounds,
            self.operations,
            self.acknowledged_writes,
            self.unknown,
            self.counter_invoked,
            self.counter_acknowledged,
            self.cycles,
            self.disk_full_exits
        )
    }
}

/// A cluster on lossy disks, and the faults in force on it.
pub struct Rig {
    pub c: Cluster,
    disks: BTreeMap<u64, LossyDisk>,
    /// The small tmpfs under each lossy disk (its backing dir), so a disk
    /// can fill up.
    backings: BTreeMap<u64, PathBuf>,
    /// Disk-full cycles where the node exited by itself.
    pub disk_full_exits: u64,
    pub token: String,
    /// Nodes clients should not pick just now (down or paused).
    avoid: Arc<RwLock<BTreeSet<u64>>>,
    /// What each cycle did, when (seconds since the rig started).
    pub timeline: Vec<String>,
    started: Instant,
    /// Version labels of the register plugin used so far.
    versions: u64,
    register: Vec<u8>,
}

impl Rig {
    /// Three nodes, each data dir on its own lossy disk, with the register
    /// and counter plugins installed.
    pub async fn start() -> Rig {
        if let Some(why) = crate::lossy::unavailable() {
            panic!("the fault battery needs the lossy filesystem for power loss: {why} (./tests/run installs it)");
        }
        let mut c = Cluster::configure(3, &[], |cfg| {
            cfg.data_dir = cfg.data_dir.join("disk");
            // Snapshots (and log purges) happen during the battery too.
            cfg.raft.snapshot_after_entries = 400;
        });
        let mut disks = BTreeMap::new();
        let mut backings = BTreeMap::new();
        for (id, m) in &c.nodes {
            let home = m.config_path.parent().unwrap();
            let backing = home.join("backing");
            std::fs::create_dir_all(&backing).unwrap();
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=256m", "synod-chaos"])
                .arg(&backing)
                .status()
                .unwrap();
            assert!(status.success(), "mounting a tmpfs needs root (CI and this machine run as root)");
            backings.insert(*id, backing.clone());
            let key = synod::p2p::identity::KEY_FILE;
            std::fs::copy(home.join(key), backing.join(key)).unwrap();
            disks.insert(*id, LossyDisk::mount(&backing, &m.config.data_dir, &home.join("lossyfs.log")));
        }
        for id in 1..=3 {
            c.restart(id);
        }
        let leader = c.leader().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let token = loop {
            if let Some(t) = c.admin_token() {
                break t;
            }
            assert!(Instant::now() < deadline, "no admin token");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let register = component("register");
        let rig = Rig {
            c,
            disks,
            backings,
            disk_full_exits: 0,
            token,
            avoid: Arc::default(),
            timeline: Vec::new(),
            started: Instant::now(),
            versions: 1,
            register: register.clone(),
        };
        rig.client(leader).post("/v1/plugins/register?version=1", register).await.unwrap();
        rig.client(leader).post("/v1/plugins/counter?version=1", component("counter")).await.unwrap();
        rig
    }

    pub fn client(&self, id: u64) -> Client {
        self.c.client_with(id, Some(&self.token))
    }

    fn others(&self, id: u64) -> Vec<u64> {
        self.c.nodes.keys().copied().filter(|n| *n != id).collect()
    }

    async fn faults(&self, id: u64, body: Value) {
        let reply = self.client(id).post("/v1/faults", serde_json::to_vec(&body).unwrap()).await;
        reply.unwrap_or_else(|e| panic!("injecting {body} on node {id}: {e}"));
    }

    /// Wait until `id` answers `/readyz` again.
    async fn ready(&self, id: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.client(id).get("/readyz").await.is_err() {
            assert!(Instant::now() < deadline, "node {id} did not come back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Run one cycle of `nemesis`; returns once the cluster is whole again
    /// (clock jumps stay until [`Rig::heal`]).
    pub async fn cycle(&mut self, nemesis: Nemesis, rng: &mut Rng) {
        let leader = self.c.leader().await;
        let victim = if rng.below(2) == 0 { leader } else { self.others(leader)[rng.below(2) as usize] };
        let at = self.started.elapsed().as_secs_f64();
        self.timeline.push(format!("{at:.3} {nemesis:?} victim {victim} leader {leader}"));
        match nemesis {
            Nemesis::Kill | Nemesis::PowerLoss => {
                self.take_down(victim, nemesis == Nemesis::PowerLoss);
                tokio::time::sleep(rng.millis(100, 1200)).await;
                self.bring_up(victim).await;
            }
            Nemesis::DiskFull => {
                let filler = self.backings[&victim].join("filler");
                fill(&filler);
                // Under load the node's next fsync fails and it exits.
                let exited = self.c.nodes.get_mut(&victim).unwrap().wait_exit(rng.millis(1000, 3000));
                if exited.is_some() {
                    self.disk_full_exits += 1;
                }
                self.take_down(victim, true);
                std::fs::remove_file(&filler).unwrap();
                self.bring_up(victim).await;
            }
            Nemesis::Pause => {
                self.avoid.write().unwrap().insert(victim);
                self.c.signal_pause(victim, true);
                tokio::time::sleep(rng.millis(1500, 4000)).await;
                self.c.signal_pause(victim, false);
                self.avoid.write().unwrap().remove(&victim);
            }
            Nemesis::IsolateLeader => {
                let others = self.others(leader);
                self.faults(leader, json!({ "cut": others })).await;
                for o in &others {
                    self.faults(*o, json!({ "cut": [leader] })).await;
                }
                tokio::time::sleep(rng.millis(1500, 4000)).await;
                self.heal_cuts().await;
            }
            Nemesis::Bridge => {
                let ends = self.others(victim);
                self.faults(ends[0], json!({ "cut": [ends[1]] })).await;
                self.faults(ends[1], json!({ "cut": [ends[0]] })).await;
                tokio::time::sleep(rng.millis(1500, 4000)).await;
                self.heal_cuts().await;
            }
            Nemesis::ClockJump => {
                let shift = rng.millis(1000, 3_600_000).as_millis() as i64;
                let shift = if rng.below(2) == 0 { -shift } else { shift };
                self.faults(victim, json!({ "clock_offset_ms": shift })).await;
            }
            Nemesis::Upgrade => {
                self.versions += 1;
                let version = self.versions.to_string();
                let leader = self.c.leader().await;
                let path = format!("/v1/plugins/register?version={version}");
                self.client(leader).post(&path, self.register.clone()).await.unwrap();
                let body = serde_json::to_vec(&json!({ "version": version })).unwrap();
                self.client(leader).post("/v1/plugins/register/activate", body).await.unwrap();
            }
        }
        self.c.leader().await;
    }

    /// Clients stop picking `victim`; it is killed with -9, and with
    /// `power_loss` its unsynced writes are dropped too.
    fn take_down(&mut self, victim: u64, power_loss: bool) {
        self.avoid.write().unwrap().insert(victim);
        self.c.kill(victim);
        if power_loss {
            self.disks.get_mut(&victim).unwrap().power_cycle();
        }
    }

    /// Restart `victim`; clients use it again once it answers.
    async fn bring_up(&mut self, victim: u64) {
        self.c.restart(victim);
        self.ready(victim).await;
        self.avoid.write().unwrap().remove(&victim);
    }

    async fn heal_cuts(&self) {
        for id in self.c.nodes.keys() {
            self.faults(*id, json!({ "cut": [] })).await;
        }
    }

    /// Undo every fault still in force (clock shifts).
    pub async fn heal(&self) {
        for id in self.c.nodes.keys() {
            self.faults(*id, json!({ "cut": [], "clock_offset_ms": 0 })).await;
        }
        self.c.leader().await;
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Nodes first, then their disks, then the temp dir.
        let ids: Vec<u64> = self.c.nodes.keys().copied().collect();
        for id in ids {
            self.c.signal_pause(id, false);
            self.c.kill(id);
        }
        self.disks.clear();
        for backing in self.backings.values() {
            let _ = std::process::Command::new("umount").arg("-l").arg(backing).status();
        }
    }
}

/// Write `path` until the disk is full.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![7u8; 256 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

/// A history under construction.
#[derive(Default)]
struct History {
    ops: Vec<Operation>,
    /// The node each operation went to, by position in `ops`.
    nodes: Vec<u64>,
    /// (operation index, timestamp) of acknowledged register commands.
    stamps: Vec<(u64, u64)>,
    counter_invoked: u64,
    counter_acked: Vec<i64>,
}

/// How long a client waits before calling an operation's outcome unknown.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

/// What a client saw of one request.
enum Seen {
    Ok(Value),
    /// Refused for sure (4xx): it did not change the state.
    Failed,
    /// Timed out, connection lost, 5xx: it may or may not have happened.
    Unknown,
}

async fn send(client: &Client, path: &str, body: Value, headers: &[(&str, &str)]) -> Seen {
    let call = client.post_with_headers(path, serde_json::to_vec(&body).unwrap(), headers);
    match tokio::time::timeout(CLIENT_TIMEOUT, call).await {
        Ok(Ok(v)) => Seen::Ok(v),
        Ok(Err(ClientError::Status { status, .. })) if (400..500).contains(&status) => Seen::Failed,
        // No leader took it: refused before it reached a log.
        Ok(Err(ClientError::Status { status: 503, body })) if body["kind"] == "no_leader" => Seen::Failed,
        Ok(Err(_)) | Err(_) => Seen::Unknown,
    }
}

/// What every client of a round shares.
#[derive(Clone)]
struct Workers {
    /// A client of each node.
    clients: BTreeMap<u64, Client>,
    /// Nodes not to pick just now.
    avoid: Arc<RwLock<BTreeSet<u64>>>,
    /// Where operations are recorded.
    history: Arc<Mutex<History>>,
    /// Time zero of the history.
    start: Instant,
    /// Set at the end of the round.
    stop: tokio::sync::watch::Receiver<bool>,
}

impl Workers {
    /// A node clients may use now, at random.
    fn pick(&self, rng: &mut Rng) -> Option<u64> {
        let usable: Vec<u64> = {
            let avoid = self.avoid.read().unwrap();
            self.clients.keys().copied().filter(|id| !avoid.contains(id)).collect()
        };
        usable.get(rng.below(usable.len() as u64) as usize).copied()
    }
}

/// Keys a round's register clients use at a time.
const KEYS: u64 = 4;
/// Seconds a key is used before clients move to fresh ones: each key's
/// history stays short (about a hundred operations, a few unknown), as
/// Jepsen's independent keys keep the search small.
const KEY_LIFETIME_S: u64 = 4;

/// A register client: random put / get / cas on the current keys of
/// `prefix` through every node it may use, until `stop`.
async fn register_client(me: u64, w: Workers, prefix: String, mut rng: Rng) {
    let Workers { clients, history, start, stop, .. } = w.clone();
    let mut seq = 0i64;
    let mut last_seen: BTreeMap<String, i64> = BTreeMap::new();
    while !*stop.borrow() {
        let Some(node) = w.pick(&mut rng) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let client = &clients[&node];
        let generation = start.elapsed().as_secs() / KEY_LIFETIME_S;
        let key = format!("{prefix}-g{generation}-k{}", rng.below(KEYS));
        seq += 1;
        let unique = (me as i64) * 1_000_000_000 + seq;
        let roll = rng.below(10);
        let call = start.elapsed().as_nanos() as u64;
        let (op, seen) = if roll < 4 {
            let body = json!({ "key": key, "value": unique });
            (RegOp::Put(unique), send(client, "/v1/commands/register/put", body, &[]).await)
        } else if roll < 7 {
            (RegOp::Get, send(client, "/v1/queries/register/get", json!({ "key": key }), &[]).await)
        } else {
            // Nothing seen yet: expect a value no one writes (all are positive).
            let from = last_seen.get(&key).copied().unwrap_or(-unique);
            let body = json!({ "key": key, "from": from, "to": unique });
            (RegOp::Cas { from, to: unique }, send(client, "/v1/commands/register/cas", body, &[]).await)
        };
        let ret = start.elapsed().as_nanos() as u64;
        let outcome = match (&op, &seen) {
            (_, Seen::Failed) => None,
            (RegOp::Get, Seen::Unknown) => None,
            (_, Seen::Unknown) => Some(Outcome::Unknown),
            (RegOp::Put(v), Seen::Ok(_)) => {
                last_seen.insert(key.clone(), *v);
                Some(Outcome::Written)
            }
            (RegOp::Get, Seen::Ok(reply)) => {
                let value = reply["result"]["value"].as_i64();
                if let Some(v) = value {
                    last_seen.insert(key.clone(), v);
                }
                Some(Outcome::Read(value))
            }
            (RegOp::Cas { .. }, Seen::Ok(reply)) => {
                if let Some(v) = reply["result"]["value"].as_i64() {
                    last_seen.insert(key.clone(), v);
                }
                let seen = reply["result"]["value"].as_i64();
                Some(match reply["result"]["swapped"].as_bool() {
                    Some(true) => Outcome::Swapped(true),
                    _ => Outcome::CasFailed(seen),
                })
            }
        };
        let unknown = matches!(seen, Seen::Unknown);
        {
            let mut h = history.lock().unwrap();
            if let Seen::Ok(reply) = &seen
                && let (Some(index), Some(at)) = (reply["result"]["index"].as_u64(), reply["result"]["at"].as_u64())
            {
                h.stamps.push((index, at));
            }
            if let Some(outcome) = outcome {
                h.ops.push(Operation { key, call, ret, op, outcome });
                h.nodes.push(node);
            }
        }
        if unknown {
            // Like a Jepsen process that crashed: pause before the next, so
            // a node failing fast does not flood the key with unknowns.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A counter client: increments with request ids, retrying an unanswered
/// one (same id) through other nodes a few times.
async fn counter_client(me: u64, w: Workers, mut rng: Rng) {
    let Workers { clients, history, stop, .. } = w.clone();
    let mut seq = 0;
    while !*stop.borrow() {
        seq += 1;
        let id = format!("chaos-{me}-{seq}");
        history.lock().unwrap().counter_invoked += 1;
        for _attempt in 0..5 {
            let Some(node) = w.pick(&mut rng) else { break };
            let seen = send(
                &clients[&node],
                "/v1/commands/counter/increment",
                json!({}),
                &[("synod-request-id", id.as_str())],
            )
            .await;
            match seen {
                Seen::Ok(reply) => {
                    let value = reply["result"]["value"].as_i64().unwrap();
                    history.lock().unwrap().counter_acked.push(value);
                    break;
                }
                Seen::Failed => break,
                Seen::Unknown => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// A round's length, its nemeses (weighted) and the load between two
/// cycles (a random time in `gap_ms`).
pub struct Schedule<'a> {
    pub seconds: u64,
    pub mix: &'a [(Nemesis, u32)],
    pub gap_ms: (u64, u64),
}

/// One round: `seconds` of load under the nemeses drawn from `mix`
/// (weighted), then heal and check. The keys are fresh per round, so each
/// round's history stands alone.
pub async fn round(rig: &mut Rig, round: u64, schedule: &Schedule<'_>, rng: &mut Rng, tally: &mut Tally) {
    let Schedule { seconds, mix, gap_ms } = *schedule;
    let start = Instant::now();
    let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    rig.timeline.push(format!(
        "{:.3} round {round} starts (history time 0 = unix {wall} ms)",
        rig.started.elapsed().as_secs_f64()
    ));
    let history = Arc::new(Mutex::new(History::default()));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let clients =
        |rig: &Rig| -> BTreeMap<u64, Client> { rig.c.nodes.keys().map(|id| (*id, rig.client(*id))).collect() };
    let counter_before = counter_value(rig).await;
    let shared = Workers { clients: clients(rig), avoid: rig.avoid.clone(), history: history.clone(), start, stop };
    let mut workers = Vec::new();
    for me in 1..=5 {
        let task = register_client(me, shared.clone(), format!("r{round}"), Rng(rng.next()));
        workers.push(tokio::spawn(task));
    }
    for me in 1..=2 {
        workers.push(tokio::spawn(counter_client(me + round * 10, shared.clone(), Rng(rng.next()))));
    }
    let total: u32 = mix.iter().map(|(_, w)| w).sum();
    let deadline = start + Duration::from_secs(seconds);
    let mut cycle = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(rng.millis(gap_ms.0, gap_ms.1)).await;
        // Each kind once, in order, then drawn by weight.
        let nemesis = if cycle < mix.len() {
            Some(mix[cycle].0)
        } else {
            let mut pick = rng.below(u64::from(total)) as u32;
            mix.iter()
                .find(|(_, w)| {
                    if pick < *w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .map(|(n, _)| *n)
        };
        cycle += 1;
        let Some(nemesis) = nemesis else { continue };
        rig.cycle(nemesis, rng).await;
        tally.count(nemesis);
    }
    rig.heal().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(true).unwrap();
    for w in workers {
        tokio::time::timeout(Duration::from_secs(30), w).await.expect("a client hung").unwrap();
    }

    // Final reads: part of the history, after everything else.
    let leader = rig.c.leader().await;
    let keys: BTreeSet<String> = history.lock().unwrap().ops.iter().map(|o| o.key.clone()).collect();
    for key in keys.iter() {
        let call = start.elapsed().as_nanos() as u64;
        let reply = rig
            .client(leader)
            .post("/v1/queries/register/get", serde_json::to_vec(&json!({ "key": key })).unwrap())
            .await
            .unwrap();
        let ret = start.elapsed().as_nanos() as u64;
        let value = reply["result"]["value"].as_i64();
        let mut h = history.lock().unwrap();
        h.ops.push(Operation { key: key.clone(), call, ret, op: RegOp::Get, outcome: Outcome::Read(value) });
        h.nodes.push(leader);
    }
    let counter_after = counter_value(rig).await;
    rig.c.same_digest().await;

    let h = std::mem::take(&mut *history.lock().unwrap());
    let verdict = check(&h.ops);
    if let Err(violation) = &verdict {
        // Everything needed to find the cause: the history (with the node
        // each operation went to), the nemesis timeline, every node's log.
        let dump = std::env::temp_dir().join(format!("synod-chaos-failure-r{round}-{}", std::process::id()));
        std::fs::create_dir_all(&dump).unwrap();
        let lines: Vec<String> = h.ops.iter().zip(&h.nodes).map(|(o, n)| format!("node {n} {o:?}")).collect();
        std::fs::write(dump.join("history.txt"), lines.join("\n")).unwrap();
        std::fs::write(dump.join("nemeses.txt"), rig.timeline.join("\n")).unwrap();
        for (id, m) in &rig.c.nodes {
            let _ = std::fs::copy(crate::harness::log_path(&m.config_path), dump.join(format!("node{id}.log")));
        }
        panic!("round {round}: {violation} (history, nemeses and node logs in {})", dump.display());
    }
    let mut stamps = h.stamps.clone();
    stamps.sort_unstable();
    for pair in stamps.windows(2) {
        assert!(
            pair[0].1 <= pair[1].1,
            "round {round}: time ran backwards in the log: operation {} at {} ms, then {} at {} ms",
            pair[0].0,
            pair[0].1,
            pair[1].0,
            pair[1].1
        );
    }
    let acked: BTreeSet<i64> = h.counter_acked.iter().copied().collect();
    assert_eq!(acked.len(), h.counter_acked.len(), "round {round}: a counter value was acknowledged twice");
    let applied = (counter_after - counter_before) as u64;
    assert!(
        applied >= acked.len() as u64 && applied <= h.counter_invoked,
        "round {round}: counter moved by {applied}; {} increments acknowledged, {} invoked",
        acked.len(),
        h.counter_invoked
    );
    tally.rounds += 1;
    tally.disk_full_exits = rig.disk_full_exits;
    tally.operations += h.ops.len() as u64;
    tally.acknowledged_writes +=
        h.ops.iter().filter(|o| matches!(o.outcome, Outcome::Written | Outcome::Swapped(true))).count() as u64
            + acked.len() as u64;
    tally.unknown += h.ops.iter().filter(|o| o.outcome == Outcome::Unknown).count() as u64;
    tally.counter_invoked += h.counter_invoked;
    tally.counter_acknowledged += acked.len() as u64;
    eprintln!(
        "round {round}: {} operations, {} counter increments ({} acknowledged, counter +{applied}) — linearizable, nothing lost",
        h.ops.len(),
        h.counter_invoked,
        acked.len()
    );
}

async fn counter_value(rig: &Rig) -> i64 {
    let leader = rig.c.leader().await;
    let reply = rig.client(leader).post("/v1/queries/counter/get", b"{}".to_vec()).await.unwrap();
    reply["result"]["value"].as_i64().unwrap()
}
