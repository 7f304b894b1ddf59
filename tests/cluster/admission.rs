//! Who may connect: a process without the cluster's network key cannot; a
//! node running another engine fingerprint is refused even once added; a
//! node that knows only one member finds the others and joins.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use synod::client::ClientError;
use synod::config::NodeConfig;

use crate::harness::{Cluster, Member, serial};
use crate::plugins::component;

fn log(c: &Cluster, id: u64) -> String {
    std::fs::read_to_string(c.nodes[&id].config.data_dir.join("node.log")).unwrap_or_default()
}

/// Waits up to `within` for node `id`'s log to have a line matching
/// `pred`; that line.
async fn log_line(c: &Cluster, id: u64, within: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(line) = log(c, id).lines().find(|l| pred(l)) {
            return Some(line.to_owned());
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn peer_id(config: &NodeConfig) -> String {
    synod::p2p::identity::load_or_create(&config.data_dir).unwrap().public().to_peer_id().to_string()
}

/// Starts `config` as member `id` of the test (not of the cluster).
fn start(c: &mut Cluster, path: PathBuf, config: NodeConfig, env: &[(&str, &str)]) {
    std::fs::write(&path, config.to_toml().unwrap()).unwrap();
    let id = config.id;
    let mut member = Member::new(config, path);
    member.env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    c.nodes.insert(id, member);
    c.restart(id);
}

/// `POST /v1/cluster/nodes` on `via` for node `id`, with the engine and
/// protocol its own `/healthz` presents (as `synod cluster add` sends), or
/// `engine` instead when given (a node lying about its engine).
async fn add_claiming(c: &Cluster, via: u64, id: u64, engine: Option<&str>) -> Result<Value, ClientError> {
    let config = &c.nodes[&id].config;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let health = loop {
        match c.client_with(id, None).get("/healthz").await {
            Ok(h) => break h,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "node {id} never served /healthz: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let body = json!({
        "id": id, "peer_id": peer_id(config), "p2p": config.p2p, "http": config.http.to_string(),
        "engine": engine.map(Value::from).unwrap_or(health["engine"].clone()), "protocol": health["protocol"],
    });
    c.client(via).post("/v1/cluster/nodes", serde_json::to_vec(&body).unwrap()).await
}

async fn add(c: &Cluster, via: u64, id: u64) -> Result<Value, ClientError> {
    add_claiming(c, via, id, None).await
}

async fn readyz_status(c: &Cluster, id: u64) -> Option<u16> {
    match c.client(id).get("/readyz").await {
        Ok(_) => Some(200),
        Err(ClientError::Status { status, .. }) => Some(status),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_network_key_cannot_connect() {
    let _serial = serial().await;
    let mut c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    let before = c.client(leader).get("/v1/cluster").await.unwrap();
    assert!(c.nodes.values().all(|m| m.config.network_key.is_some()), "dev configs have no network key");

    // Node 4 has another key, node 5 none. Both trust the three members
    // and try to form a cluster with them, so both dial every member.
    for (id, network_key) in [(4, Some(synod::dev::generate_network_key().unwrap())), (5, None)] {
        let (path, mut config) = c.new_node(id);
        config.network_key = network_key;
        config.bootstrap = true;
        config.peers = c.peer_configs(None);
        start(&mut c, path, config, &[]);
    }

    // Every member refuses the handshakes and says why.
    for id in 1..=3 {
        let line = log_line(&c, id, Duration::from_secs(15), |l| {
            l.contains("failed the handshake") && l.contains("private network key")
        })
        .await
        .unwrap_or_else(|| panic!("node {id} logged no refused handshake"));
        assert!(line.contains("WARN") && line.contains("addr=/ip4/127.0.0.1/tcp/"), "{line}");
    }
    // The outsiders never found a leader.
    for id in [4, 5] {
        assert_eq!(readyz_status(&c, id).await, Some(503), "node {id} found a leader");
    }
    let outsiders: Vec<String> = [4, 5].iter().map(|id| peer_id(&c.nodes[id].config)).collect();
    for id in [4, 5] {
        c.kill(id);
        c.nodes.remove(&id);
    }

    // The cluster is as it was: same leader, term and members, and neither
    // outsider on any allowlist.
    assert_eq!(c.leader().await, leader);
    let after = c.client(leader).get("/v1/cluster").await.unwrap();
    assert_eq!(after["term"], before["term"]);
    assert_eq!(after["members"], before["members"]);
    assert_eq!(after["members"].as_object().unwrap().len(), 3);
    for id in 1..=3 {
        let view = c.client(id).get("/v1/cluster").await.unwrap();
        let allowed = view["allowed_peers"].as_array().unwrap();
        assert!(outsiders.iter().all(|p| !allowed.contains(&json!(p))), "node {id}: {allowed:?}");
        assert_eq!(view["refused_peers"], json!({}), "node {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_engine_fingerprint_is_refused() {
    let _serial = serial().await;
    let mut c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    for _ in 0..5 {
        c.cmd(leader, "counter", "increment", json!({"by": 1})).await.unwrap();
    }

    // Ours from the cluster, the salted one from `synod engine`.
    let ours = c.client(leader).get("/v1/cluster").await.unwrap()["engine"]["hash"].as_str().unwrap().to_owned();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_synod"))
        .arg("engine")
        .env("SYNOD_FINGERPRINT_SALT", "x")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let salted: Value = serde_json::from_slice(&out.stdout).unwrap();
    let theirs = salted["hash"].as_str().unwrap().to_owned();
    assert_ne!(ours, theirs);
    assert_eq!(salted["settings"].as_array().unwrap().last().unwrap(), &json!("salt=x"));

    // Node 4 has everything right (key, members) but the engine.
    let (path, mut config) = c.new_node(4);
    config.network_key = c.nodes[&1].config.network_key.clone();
    config.peers = c.peer_configs(None);
    let four = peer_id(&config);
    start(&mut c, path, config, &[("SYNOD_FINGERPRINT_SALT", "x")]);

    // Presenting its own engine, it is refused at the API, with both
    // fingerprints named.
    match add(&c, leader, 4).await {
        Err(ClientError::Status { status: 409, body }) => {
            assert_eq!(body["kind"], json!("engine_mismatch"), "{body}");
            let msg = body["error"].as_str().unwrap();
            assert!(msg.contains(&ours) && msg.contains(&theirs), "{msg}");
        }
        other => panic!("the salted node was not refused at the API: {other:?}"),
    }
    // Claiming ours, it passes the API, but its connection is refused and
    // the leader does not make it a member that never catches up.
    match tokio::time::timeout(Duration::from_secs(70), add_claiming(&c, leader, 4, Some(&ours))).await {
        Ok(Err(ClientError::Status { status: 409, body })) => {
            assert_eq!(body["kind"], json!("refused_peer"), "{body}");
            let msg = body["error"].as_str().unwrap();
            assert!(msg.contains(&ours) && msg.contains(&theirs), "{msg}");
        }
        other => panic!("the lying node was added: {other:?}"),
    }
    let view = c.client(leader).get("/v1/cluster").await.unwrap();
    assert!(view["members"].get("4").is_none(), "node 4 stayed in the membership: {view}");

    // The leader says why, naming both fingerprints and the peer.
    let line = log_line(&c, leader, Duration::from_secs(15), |l| l.contains("REFUSED PEER"))
        .await
        .expect("the leader logged no refusal");
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains(&format!("engine/{ours}")) && line.contains(&format!("engine/{theirs}")), "{line}");
    assert!(line.contains(&four), "{line}");

    // It got nothing: no leader, no applied entry, and no member allows
    // its key now that it is out of the membership again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    match c.client_with(4, None).get("/readyz").await {
        Err(ClientError::Status { status: 503, body }) => {
            assert!(body["applied_index"].is_null(), "node 4 applied entries: {body}")
        }
        other => panic!("node 4: {other:?}"),
    }
    for id in [1, 2, 3] {
        let view = c.client(id).get("/v1/cluster").await.unwrap();
        assert!(!view["allowed_peers"].as_array().unwrap().contains(&json!(four)), "node {id}: {view}");
        assert_eq!(view["members"].as_object().unwrap().len(), 3, "node {id}: {view}");
    }

    // The three members carry on.
    let r = c.cmd(leader, "counter", "increment", json!({"by": 1})).await.unwrap();
    assert_eq!(r["result"], json!({"value": 6}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_knows_one_member_joins() {
    let _serial = serial().await;
    let mut c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    for _ in 0..10 {
        c.cmd(leader, "counter", "increment", json!({"by": 1})).await.unwrap();
    }

    // Node 4 knows one follower and the cluster's key; not the leader.
    let seed = (1..=3).find(|id| *id != leader).unwrap();
    let (path, mut config) = c.new_node(4);
    config.network_key = c.nodes[&1].config.network_key.clone();
    config.peers = c.peer_configs(None).into_iter().filter(|p| p.id == seed).collect();
    start(&mut c, path, config, &[]);

    let started = Instant::now();
    let added = add(&c, leader, 4).await.unwrap();
    let joined = started.elapsed();
    assert_eq!(added["added"], json!(4));
    let view = c.client(leader).get("/v1/cluster").await.unwrap();
    assert_eq!(view["members"]["4"]["voter"], json!(true));
    c.converged().await;
    eprintln!(
        "node 4 discovered the members and joined as a voter in {joined:?} (converged after {:?})",
        started.elapsed()
    );
    assert_eq!(c.local_state(4, "counter").await, json!({"value": 10}));

    // It found the leader through its seed.
    let line = log_line(&c, 4, Duration::from_secs(1), |l| {
        l.contains("discovered a member") && l.contains(&format!("member={leader}"))
    })
    .await;
    assert!(line.is_some(), "node 4 did not discover the leader through node {seed}");
    // A voter like any other: it takes writes, and knows every member.
    let r = c.cmd(4, "counter", "increment", json!({"by": 5})).await.unwrap();
    assert_eq!(r["result"], json!({"value": 15}));
    let own = c.client(4).get("/v1/cluster").await.unwrap();
    assert_eq!(own["members"].as_object().unwrap().len(), 4, "{own}");
    c.converged().await;
}
