//! `synod dev` as a user runs it: a node killed with `kill -9` (the README
//! invites it, to watch failover) is reported, the other two carry on and
//! elect a leader, and the dead node comes back on its own. Before, the
//! whole dev cluster stopped when one node exited.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::ChildStdout;

use crate::harness::{serial, synod_bin};

/// Read lines until one contains `needle` (within `secs`); every line read
/// is kept in `seen`.
pub(crate) async fn until(
    lines: &mut Lines<BufReader<ChildStdout>>,
    needle: &str,
    secs: u64,
    seen: &mut Vec<String>,
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no line with {needle:?} within {secs} s; output so far:\n{}", seen.join("\n")))
            .unwrap()
            .unwrap_or_else(|| panic!("synod dev ended before {needle:?}; output:\n{}", seen.join("\n")));
        seen.push(line.clone());
        if line.contains(needle) {
            return line;
        }
    }
}

/// Pids of the node processes whose config is under `dir`.
fn node_pids(dir: &Path, id: u64) -> Vec<u32> {
    let pattern = dir.join(format!("n{id}")).join("synod.toml");
    let out = std::process::Command::new("pgrep").arg("-f").arg(pattern).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

pub(crate) async fn ready(client: &synod::client::Client, secs: u64) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match client.get("/readyz").await {
            Ok(v) if v["ready"] == true => return v,
            other => {
                assert!(tokio::time::Instant::now() < deadline, "{} not ready: {other:?}", client.base());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A running `synod dev`: its process, its output so far, the nodes'
/// addresses and the admin token.
pub(crate) struct DevCluster {
    pub dev: tokio::process::Child,
    pub lines: Lines<BufReader<ChildStdout>>,
    pub seen: Vec<String>,
    pub urls: Vec<String>,
    pub token: String,
}

/// However the test ends, stop `synod dev` the way a user does (SIGTERM),
/// so it stops its nodes and nats-server: a SIGKILL would leave them
/// running.
impl Drop for DevCluster {
    fn drop(&mut self) {
        let Some(pid) = self.dev.id() else { return };
        let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if !matches!(self.dev.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl DevCluster {
    /// `synod dev --dir dir`, once every node is ready.
    pub async fn start(dir: &Path) -> DevCluster {
        let mut dev = tokio::process::Command::new(synod_bin())
            .arg("dev")
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(dev.stdout.take().unwrap()).lines();
        let mut seen = Vec::new();
        until(&mut lines, "a three-node cluster is running", 90, &mut seen).await;
        until(&mut lines, "Ctrl-C stops", 10, &mut seen).await;
        let urls: Vec<String> = seen
            .iter()
            .filter_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                (words.first() == Some(&"node") && words.get(2).is_some_and(|u| u.starts_with("http")))
                    .then(|| words[2].to_owned())
            })
            .collect();
        assert_eq!(urls.len(), 3, "three node addresses in:\n{}", seen.join("\n"));
        let token = synod::node::auth::read_token_file(&dir.join("n1").join("admin.token")).unwrap();
        for url in &urls {
            ready(&synod::client::Client::new(url), 30).await;
        }
        DevCluster { dev, lines, seen, urls, token }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_dev_node_is_restarted_while_the_others_serve() {
    let _serial = serial().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut cluster = DevCluster::start(&dir).await;
    let (urls, token) = (cluster.urls.clone(), cluster.token.clone());
    let client = |i: usize| synod::client::Client::new(&urls[i]).with_token(Some(token.clone()));

    // kill -9 node 2.
    let pids = node_pids(&dir, 2);
    assert_eq!(pids.len(), 1, "one process for node 2: {pids:?}");
    std::process::Command::new("kill").args(["-9", &pids[0].to_string()]).status().unwrap();
    let exited = until(&mut cluster.lines, "node 2 exited", 10, &mut cluster.seen).await;
    assert!(exited.contains("restarts in"), "{exited}");
    assert!(cluster.dev.try_wait().unwrap().is_none(), "synod dev stopped when one node died");

    // The other two elect (or keep) a leader among themselves and serve.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let v = ready(&client(0), 15).await;
        if matches!(v["leader"].as_u64(), Some(1 | 3)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader among nodes 1 and 3: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ready(&client(2), 15).await;

    // Node 2 comes back by itself and catches up.
    until(&mut cluster.lines, "node 2 restarted", 20, &mut cluster.seen).await;
    ready(&client(1), 30).await;
    let new_pids = node_pids(&dir, 2);
    assert_eq!(new_pids.len(), 1);
    assert_ne!(new_pids, pids);
    assert!(
        cluster.seen.iter().any(|l| l.contains("leader node") && l.contains("commands/s")),
        "a status line in:\n{}",
        cluster.seen.join("\n")
    );

    // `--output table` shows the members as columns.
    let status = std::process::Command::new(synod_bin())
        .args(["status", "--output", "table", "--node", &urls[0]])
        .env("SYNOD_TOKEN", &token)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}{}", String::from_utf8_lossy(&status.stderr));
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("NAME") && lines[0].contains("VOTER"), "{text}");
    assert_eq!(lines.len(), 4, "a header and three members:\n{text}");

    // SIGTERM stops everything.
    std::process::Command::new("kill").args(["-TERM", &cluster.dev.id().unwrap().to_string()]).status().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), cluster.dev.wait()).await.unwrap().unwrap();
    assert!(status.success(), "synod dev exited with {status}");
    for id in 1..=3 {
        assert!(node_pids(&dir, id).is_empty(), "node {id} still running after synod dev stopped");
    }
}

/// `synod dev` killed with SIGKILL (it cannot stop anything itself) still
/// takes its nodes and its nats-server with it: nothing is left holding
/// the ports for the next `synod dev`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_synod_dev_leaves_nothing_running() {
    let _serial = serial().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut cluster = DevCluster::start(&dir).await;
    let nats = |dir: &Path| {
        let out = std::process::Command::new("pgrep").arg("-f").arg(dir.join("nats")).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    for id in 1..=3 {
        assert_eq!(node_pids(&dir, id).len(), 1, "node {id} is running");
    }
    let with_nats = nats(&dir) > 0;
    cluster.dev.start_kill().unwrap();
    cluster.dev.wait().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<u64> = (1..=3).filter(|id| !node_pids(&dir, *id).is_empty()).collect();
        if left.is_empty() && nats(&dir) == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still running 20 s after synod dev was killed: nodes {left:?}, nats-server: {}",
            nats(&dir)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("nodes gone{}", if with_nats { ", nats-server gone" } else { " (no nats-server here)" });
}
