//! The CLI's help for people: errors that say what to do next (no node, no
//! token, a missing role, no leader), shell completions, and `-o json` on
//! the live feed.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Cluster, serial, synod_bin};
use crate::plugins::component;

/// Run the CLI with `token` (or none), away from any dev cluster's token
/// file; (success, stdout, stderr).
fn synod(args: &[&str], token: Option<&str>) -> (bool, String, String) {
    let away = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(synod_bin());
    cmd.args(args).current_dir(away.path());
    for var in ["SYNOD_TOKEN", "SYNOD_TOKEN_FILE", "SYNOD_NODE", "SYNOD_OUTPUT"] {
        cmd.env_remove(var);
    }
    if let Some(token) = token {
        cmd.env("SYNOD_TOKEN", token);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The `hint:` line of a failed command's stderr.
fn hint(err: &str) -> &str {
    err.lines().find_map(|l| l.strip_prefix("hint: ")).unwrap_or_else(|| panic!("no hint in: {err}"))
}

#[test]
fn completions_are_generated_for_each_shell() {
    let (ok, bash, err) = synod(&["completions", "bash"], None);
    assert!(ok, "{err}");
    assert!(bash.contains("complete -F _synod") && bash.contains("backup") && bash.contains("--output"), "{bash}");
    let (ok, zsh, _) = synod(&["completions", "zsh"], None);
    assert!(ok && zsh.starts_with("#compdef synod"), "{zsh}");
    let (ok, fish, _) = synod(&["completions", "fish"], None);
    assert!(ok && fish.contains("complete -c synod"), "{fish}");
    let (ok, _, err) = synod(&["completions", "tcsh"], None);
    assert!(!ok && err.contains("possible values"), "{err}");
}

/// Read commands that need no node print JSON, or with `-o table` aligned
/// lines.
#[test]
fn local_read_commands_honour_the_output_option() {
    let (ok, json, err) = synod(&["engine"], None);
    assert!(ok, "{err}");
    let engine: Value = serde_json::from_str(&json).unwrap();
    let hash = engine["hash"].as_str().unwrap();
    let (ok, table, err) = synod(&["engine", "-o", "table"], None);
    assert!(ok, "{err}");
    assert!(table.lines().any(|l| l.starts_with("hash") && l.ends_with(hash)), "{table}");
    assert!(serde_json::from_str::<Value>(&table).is_err(), "{table}");
    let plugin = component("counter");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), plugin).unwrap();
    let path = file.path().to_str().unwrap();
    let (ok, json, err) = synod(&["plugin", "inspect", path], None);
    assert!(ok, "{err}");
    assert!(serde_json::from_str::<Value>(&json).unwrap()["commands"].is_array(), "{json}");
    let (ok, table, err) = synod(&["plugin", "inspect", path, "-o", "table"], None);
    assert!(ok && table.contains("increment"), "{err}{table}");
    assert!(serde_json::from_str::<Value>(&table).is_err(), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_to_do_next() {
    let _serial = serial().await;
    // No node there.
    let (ok, _, err) = synod(&["status", "--node", "127.0.0.1:9"], None);
    assert!(!ok);
    let h = hint(&err);
    assert!(h.contains("synod dev") && h.contains("--node"), "{err}");

    let mut c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    let admin = c.admin_token().unwrap();
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    let node = c.client(leader).base().to_owned();
    // No token: where one comes from.
    let (ok, _, err) = synod(&["status", "--node", &node], None);
    assert!(!ok && err.contains("401"), "{err}");
    assert!(hint(&err).contains("SYNOD_TOKEN") && hint(&err).contains("synod token create"), "{err}");
    // A reader's token for a write: the roles that would do.
    let reader = c.client(leader).post("/v1/tokens", br#"{"principal": "hmi", "roles": ["reader"]}"#.to_vec()).await;
    let reader = reader.unwrap()["token"].as_str().unwrap().to_owned();
    let (ok, _, err) = synod(&["cmd", "counter", "increment", "--node", &node], Some(&reader));
    assert!(!ok && err.contains("403"), "{err}");
    assert!(hint(&err).contains("operator") && hint(&err).contains("synod token create"), "{err}");
    // The same, with the admin's token, works; -o table shows columns.
    let (ok, out, err) = synod(&["cmd", "counter", "increment", "--node", &node], Some(&admin));
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["result"], json!({ "value": 1 }));

    // `synod watch -o json` prints the feed as JSON lines.
    let mut watch = Command::new(synod_bin())
        .args(["watch", "-o", "json", "--tail", "5", "--node", &node])
        .env("SYNOD_TOKEN", &admin)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        use std::io::BufRead as _;
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(stdout).lines().take(20) {
            let line = line.unwrap();
            let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            let done = value["op"]["command"] == "increment";
            seen.push(value);
            if done {
                break;
            }
        }
        seen
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !lines.is_finished() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let seen = lines.join().unwrap();
    assert!(seen.iter().any(|v| v["op"]["command"] == "increment"), "{seen:?}");

    // No leader: two of three down, the third says so and what to do.
    let others: Vec<u64> = c.live().into_iter().filter(|id| *id != leader).collect();
    let (alone, gone) = (others[0], [leader, others[1]]);
    for id in gone {
        c.kill(id);
    }
    let node = c.client(alone).base().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, _, err) = synod(&["cmd", "counter", "increment", "--node", &node], Some(&admin));
        assert!(!ok, "a lone node of three took a write");
        if err.contains("no_leader") || err.contains("no leader") {
            let h = hint(&err);
            assert!(h.contains("retry") && h.contains("--node"), "{err}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never told there is no leader: {err}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
