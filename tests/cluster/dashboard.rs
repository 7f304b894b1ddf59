//! The dashboard in a real browser: headless Chromium, driven by
//! `tests/dashboard/check.mjs` (playwright-core), against a real `synod dev`
//! cluster. The page must show three members and one leader; an upload and
//! an activation made on the page must be in `GET /v1/plugins`; a command
//! sent over HTTP must be in the live log within a second. Screenshots go to
//! `target/dashboard/`.

use std::path::PathBuf;
use std::time::Duration;

use crate::dev::DevCluster;
use crate::harness::serial;
use crate::plugins::component;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_cluster_and_drives_it() {
    let _serial = serial().await;
    let repo = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let script = repo.join("tests/dashboard/check.mjs");
    assert!(
        repo.join("tests/dashboard/node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `npm ci` in tests/dashboard (./tests/run does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let wasm = tmp.path().join("counter.wasm");
    std::fs::write(&wasm, component("counter")).unwrap();
    let dir = tmp.path().join("dev");
    let cluster = DevCluster::start(&dir).await;
    let shots = repo.join("target/dashboard");
    let run = tokio::process::Command::new("node")
        .arg(&script)
        .env("SYNOD_URL", &cluster.urls[0])
        .env("SYNOD_TOKEN", &cluster.token)
        .env("SYNOD_WASM", &wasm)
        .env("SYNOD_SHOTS", &shots)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run).await.expect("the browser test hung").unwrap();

    // `synod watch` reads the same feed: the page's increment is in its tail.
    let mut watch = tokio::process::Command::new(crate::harness::synod_bin())
        .args(["watch", "--json", "--tail", "20", "--node", &cluster.urls[1]])
        .env("SYNOD_TOKEN", &cluster.token)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(watch.stdout.take().unwrap()));
    let mut watched = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            watched.push(line);
            if v["op"]["plugin"] == "counter" && v["op"]["command"] == "increment" && v["op"]["ok"] == true {
                return true;
            }
        }
        false
    })
    .await;
    let _ = watch.start_kill();
    assert_eq!(found, Ok(true), "synod watch showed no counter increment: {watched:?}");
    assert!(watched.iter().any(|l| l.contains("\"cluster\"")), "synod watch showed the cluster: {watched:?}");

    drop(cluster);
    assert!(
        out.status.success(),
        "the browser test failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(shots.join("dashboard.png").exists());
}
