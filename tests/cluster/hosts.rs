//! Several hosts, as the README's "Running on several hosts" sets them up:
//! each node in a network namespace of its own, joined by a bridge, with
//! only its own address (10.x.y.N) and the same ports as the others; the
//! nodes know each other by those addresses only. Three hosts form the
//! cluster, a fourth joins with `synod cluster add`, the leader's host is
//! cut off and the others go on.
//!
//! Needs root (namespaces, a bridge): skipped, saying so, where `ip netns`
//! is refused, except under `SYNOD_REQUIRE_NETNS` (which `./tests/run`
//! sets when it runs as root, as in CI): there it must run.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::dev::ready;
use crate::harness::{serial, synod_bin};
use crate::plugins::component;

/// Namespaces, veths and a bridge, removed on drop.
struct Hosts {
    tag: String,
    subnet: String,
    count: u8,
    nodes: Vec<Option<Child>>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
    }
}

impl Hosts {
    fn ns(&self, i: u8) -> String {
        format!("{}h{i}", self.tag)
    }

    fn addr(&self, i: u8) -> String {
        format!("{}.{i}", self.subnet)
    }

    /// `count` hosts on one bridge; None where namespaces cannot be made.
    fn new(count: u8) -> Result<Hosts, String> {
        let n = std::process::id() % 200 + 20;
        let tag = format!("syn{n}");
        let subnet = format!("10.231.{n}");
        let hosts = Hosts { tag: tag.clone(), subnet: subnet.clone(), count, nodes: Vec::new() };
        // Leftovers of a run that was killed before it cleaned up.
        for i in 1..=count {
            let _ = ip(&["netns", "del", &hosts.ns(i)]);
        }
        let bridge = format!("{tag}br");
        let _ = ip(&["link", "del", &bridge]);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{subnet}.254/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 1..=count {
            let ns = hosts.ns(i);
            let veth = format!("{tag}v{i}");
            ip(&["netns", "add", &ns])?;
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["link", "set", &veth, "master", &bridge, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", hosts.addr(i)), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    /// Run `synod node --config` inside host `i`'s namespace.
    fn start(&mut self, i: u8, config: &std::path::Path) {
        let log = std::fs::File::create(config.with_file_name("node.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(i)])
            .arg(synod_bin())
            .args(["node", "--config"])
            .arg(config)
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let slot = usize::from(i - 1);
        if self.nodes.len() <= slot {
            self.nodes.resize_with(slot + 1, || None);
        }
        self.nodes[slot] = Some(child);
    }

    /// Cut host `i` off the bridge: its node is alone, as when a machine
    /// loses its network.
    fn isolate(&self, i: u8) {
        ip(&["link", "set", &format!("{}v{i}", self.tag), "down"]).unwrap();
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for child in self.nodes.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for i in 1..=self.count {
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["link", "del", &format!("{}br", self.tag)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_form_a_cluster_a_fourth_joins_and_one_is_cut_off() {
    let _serial = serial().await;
    // Namespaces need root: skip only where one cannot be made at all.
    let probe = format!("synprobe{}", std::process::id());
    if let Err(e) = ip(&["netns", "add", &probe]) {
        // `./tests/run` sets SYNOD_REQUIRE_NETNS where it runs as root, so
        // there (and in CI) this test runs or fails, never skips.
        assert!(
            std::env::var_os("SYNOD_REQUIRE_NETNS").is_none(),
            "SYNOD_REQUIRE_NETNS is set but a network namespace cannot be made: {e}"
        );
        eprintln!("SKIPPED: network namespaces are not available here (needs root): {e}");
        return;
    }
    ip(&["netns", "del", &probe]).unwrap();
    let mut hosts = Hosts::new(4).expect("setting up the hosts' namespaces and bridge");
    let tmp = tempfile::tempdir().unwrap();
    // Keys and a network key as `synod dev` makes them; then every address
    // rewritten to the host's own, with the same ports on every host.
    let mut configs = synod::dev::prepare(tmp.path(), 4).unwrap();
    for (_, config) in &mut configs {
        let i = config.id as u8;
        config.http = format!("{}:7001", hosts.addr(i)).parse().unwrap();
        config.p2p = format!("/ip4/{}/tcp/7101", hosts.addr(i));
    }
    let peers: Vec<synod::config::PeerConfig> = configs
        .iter()
        .map(|(_, c)| synod::config::PeerConfig {
            id: c.id,
            peer_id: synod::p2p::identity::load_or_create(&c.data_dir).unwrap().public().to_peer_id().to_string(),
            p2p: c.p2p.clone(),
            http: c.http.to_string(),
        })
        .collect();
    for (path, config) in &mut configs {
        // The first three know each other; the fourth knows only host 1.
        config.peers = if config.id <= 3 {
            peers.iter().filter(|p| p.id <= 3 && p.id != config.id).cloned().collect()
        } else {
            peers.iter().filter(|p| p.id == 1).cloned().collect()
        };
        config.bootstrap = config.id == 1;
        std::fs::write(&*path, config.to_toml().unwrap()).unwrap();
    }
    for i in 1..=3 {
        hosts.start(i, &configs[usize::from(i - 1)].0);
    }
    let subnet = hosts.subnet.clone();
    let url = move |i: u8| format!("http://{subnet}.{i}:7001");
    let bare = |i: u8| synod::client::Client::new(&url(i));
    for i in 1..=3 {
        ready(&bare(i), 60).await;
    }
    let token =
        synod::node::auth::read_token_file(&synod::node::auth::admin_token_path(&configs[0].1.data_dir)).unwrap();
    let client = |i: u8| bare(i).with_token(Some(token.clone()));

    // Every member is known by its host's address only.
    let view = client(2).get("/v1/cluster").await.unwrap();
    for i in 1..=3u8 {
        let member = &view["members"][i.to_string()];
        assert_eq!(member["http"], json!(format!("{}:7001", hosts.addr(i))), "{view}");
        assert_eq!(member["p2p"], json!(format!("/ip4/{}/tcp/7101", hosts.addr(i))), "{view}");
    }
    // A plugin and commands through different hosts.
    let counter = component("counter");
    client(2).post("/v1/plugins/counter?version=1", counter).await.unwrap();
    for i in [1u8, 2, 3, 1, 2, 3] {
        client(i).post("/v1/commands/counter/increment", b"{}".to_vec()).await.unwrap();
    }

    // A fourth host joins, as the guide says: start it, then `synod cluster add`.
    hosts.start(4, &configs[3].0);
    let health = async {
        for _ in 0..150 {
            if let Ok(h) = bare(4).get("/healthz").await {
                return h;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("host 4 never answered");
    }
    .await;
    assert_eq!(health["http"], json!(format!("{}:7001", hosts.addr(4))));
    let out = Command::new(synod_bin())
        .args(["cluster", "add", &format!("{}:7001", hosts.addr(4)), "--node", &format!("{}:7001", hosts.addr(1))])
        .env("SYNOD_TOKEN", &token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ready(&bare(4), 30).await;
    let r = client(4).post("/v1/commands/counter/increment", b"{}".to_vec()).await.unwrap();
    assert_eq!(r["result"]["value"], json!(7));

    // The leader's host loses its network: the other three elect and serve.
    let leader = client(1).get("/v1/cluster").await.unwrap()["leader"].as_u64().unwrap() as u8;
    hosts.isolate(leader);
    let others: Vec<u8> = (1..=4).filter(|i| *i != leader).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let value = loop {
        match tokio::time::timeout(
            Duration::from_secs(3),
            client(others[0]).post("/v1/commands/counter/increment", b"{}".to_vec()),
        )
        .await
        {
            Ok(Ok(r)) => break r["result"]["value"].as_u64().unwrap(),
            other => {
                assert!(tokio::time::Instant::now() < deadline, "no write after host {leader} was cut off: {other:?}")
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(value >= 8, "{value}");
    let view = client(others[1]).get("/v1/cluster").await.unwrap();
    assert_ne!(view["leader"], json!(leader), "{view}");
}
