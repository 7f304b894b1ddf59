//! A node whose disk fills up says why and exits non-zero — no zombie
//! member — and, restarted once space is freed, rejoins with nothing
//! acknowledged lost.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{Cluster, serial};
use crate::plugins::component;

/// A small tmpfs mounted over a directory, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    /// Mount a tmpfs of `mib` MiB over `dir`, keeping what `dir` holds.
    fn mount(dir: &Path, mib: u32) -> SmallDisk {
        let keep = tempfile::tempdir().unwrap();
        for item in std::fs::read_dir(dir).unwrap() {
            let item = item.unwrap();
            std::fs::copy(item.path(), keep.path().join(item.file_name())).unwrap();
        }
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "synod-test", dir.to_str().unwrap()])
            .status()
            .expect("running mount");
        assert!(status.success(), "mounting a tmpfs needs root (CI and this machine run as root)");
        for item in std::fs::read_dir(keep.path()).unwrap() {
            let item = item.unwrap();
            std::fs::copy(item.path(), dir.join(item.file_name())).unwrap();
        }
        SmallDisk(dir.to_owned())
    }

    /// Write a file until the disk is full; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![7u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Seconds since midnight of a log line's leading RFC 3339 timestamp
/// (`2026-11-25T22:30:20.588305Z …`).
fn time_of_day(line: &str) -> f64 {
    let time = line.split_once('T').map(|(_, t)| t).unwrap_or("");
    let hms: Vec<f64> = time.split('Z').next().unwrap_or("").split(':').map(|p| p.parse().unwrap_or(0.0)).collect();
    hms.iter().fold(0.0, |acc, part| acc * 60.0 + part)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_node_clearly_and_loses_nothing() {
    let _serial = serial().await;
    let disk = std::sync::Mutex::new(None);
    let mut c = Cluster::start(3, |config| {
        if config.id == 3 {
            // Room for the node's key, plugins and two 16 MiB log segments.
            *disk.lock().unwrap() = Some(SmallDisk::mount(&config.data_dir, 48));
        }
    });
    let disk = disk.into_inner().unwrap().unwrap();
    let leader = c.leader().await;
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    c.converged().await;

    let filler = disk.fill();
    let filled_at = Instant::now();
    // Large commands through the other nodes until node 3 runs out of room
    // for its log and stops.
    let note = "n".repeat(1000 * 1000);
    let mut acknowledged = 0i64;
    let mut exit = None;
    for n in 0..200 {
        let via = [1, 2][n % 2];
        if let Ok(v) = c.cmd(via, "counter", "increment", json!({ "by": 1, "note": note })).await {
            acknowledged += 1;
            assert_eq!(v["result"]["value"], json!(acknowledged));
        }
        exit = c.nodes.get_mut(&3).unwrap().wait_exit(Duration::from_millis(50));
        if exit.is_some() {
            break;
        }
    }
    let exit = exit
        .unwrap_or_else(|| panic!("node 3 kept running on a full disk ({:?} after filling it)", filled_at.elapsed()));
    assert!(!exit.success(), "node 3 exited with {exit}");
    let log = std::fs::read_to_string(c.nodes[&3].config.data_dir.join("node.log")).unwrap();
    assert!(log.contains("No space left on device"), "node 3's log does not say why:\n{log}");
    assert!(log.contains("free disk space or fix the disk"), "node 3's log does not say what to do:\n{log}");
    // It stopped promptly: from the first failed write to its exit message.
    let at = |needle: &str| log.lines().find(|l| l.contains(needle)).map(time_of_day);
    let failed = at("No space left on device").unwrap();
    let stopped = at("stopping: this node can no longer apply or vote").unwrap();
    let took = (stopped - failed).rem_euclid(86_400.0);
    assert!(took < 1.0, "node 3 took {took:.3} s from the failed write to stopping");

    // Space back, node back: it catches up; every acknowledged write is on
    // every node.
    std::fs::remove_file(filler).unwrap();
    c.restart(3);
    let leader = c.leader().await;
    let value = c.cmd(leader, "counter", "increment", json!({ "by": 1 })).await.unwrap()["result"]["value"].clone();
    assert_eq!(value, json!(acknowledged + 1));
    c.converged().await;
    for id in c.live() {
        assert_eq!(c.local_state(id, "counter").await["value"], json!(acknowledged + 1), "node {id}");
    }
    drop(c);
    drop(disk);
}
