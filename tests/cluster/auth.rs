//! Who may do what: bearer tokens and roles on a real cluster, the caller a
//! plugin sees, revocation on every node, and HTTPS.

use serde_json::{Value, json};
use synod::client::{Client, ClientError};

use crate::harness::{Cluster, serial};
use crate::plugins::component;

pub(crate) use crate::harness::{body_of, status_of};

/// A token made through node `via` by the admin.
pub(crate) async fn token(c: &Cluster, via: u64, principal: &str, roles: &[&str]) -> String {
    let body = serde_json::to_vec(&json!({ "principal": principal, "roles": roles })).unwrap();
    let created = c.client(via).post("/v1/tokens", body).await.unwrap();
    assert_eq!(created["principal"], json!(principal));
    created["token"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_decide_who_may_do_what() {
    let _serial = serial().await;
    let c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    let follower = c.live().into_iter().find(|id| *id != leader).unwrap();
    let admin = c.admin_token().expect("node 1 wrote the first admin token");
    assert!(admin.starts_with("synod_"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(synod::node::auth::admin_token_path(&c.nodes[&1].config.data_dir)).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the admin token file is private");

    // Without a token every route but the health checks is 401, writes
    // and reads alike, on the leader and on a follower.
    for id in [leader, follower] {
        let anon = c.client_with(id, None);
        let writes: Vec<Result<Value, ClientError>> = vec![
            anon.post("/v1/commands/counter/increment", b"{}".to_vec()).await,
            anon.post("/v1/plugins/counter?version=1", component("counter")).await,
            anon.post("/v1/plugins/counter/activate", br#"{"version":"1"}"#.to_vec()).await,
            anon.delete("/v1/plugins/counter").await,
            anon.post("/v1/cluster/nodes", b"{}".to_vec()).await,
            anon.delete("/v1/cluster/nodes/3").await,
            anon.put("/v1/devices/d1", br#"{"driver":"x"}"#.to_vec()).await,
            anon.patch("/v1/devices/d1/desired", b"{}".to_vec()).await,
            anon.delete("/v1/devices/d1").await,
            anon.post("/v1/tokens", br#"{"principal":"x","roles":["admin"]}"#.to_vec()).await,
            anon.delete("/v1/tokens/admin").await,
            anon.get("/v1/cluster").await,
            anon.get("/v1/state/counter").await,
            anon.get("/v1/audit").await,
        ];
        for (i, r) in writes.iter().enumerate() {
            assert_eq!(status_of(r), 401, "route #{i} on node {id}: {r:?}");
            assert_eq!(body_of(r)["kind"], json!("unauthenticated"));
        }
        let forged = c.client_with(id, Some("synod_0000")).get("/v1/cluster").await;
        assert_eq!(status_of(&forged), 401);
        assert!(anon.get("/healthz").await.is_ok());
        assert!(anon.get("/readyz").await.is_ok());
    }

    // Admin: uploads 201 (the client reads 201 as success).
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    c.push(follower, "thermostat", "1", component("thermostat")).await.unwrap();
    c.push(leader, "misbehave", "1", component("misbehave")).await.unwrap();

    // reader: queries and state yes, commands no (the error names the role).
    let reader = token(&c, follower, "dashboard", &["reader"]).await;
    let r = c.client_with(follower, Some(&reader));
    let denied = r.post("/v1/commands/counter/increment", b"{}".to_vec()).await;
    assert_eq!(status_of(&denied), 403, "{denied:?}");
    let msg = body_of(&denied)["error"].as_str().unwrap().to_owned();
    assert!(msg.contains("`operator` or `operator:counter`") && msg.contains("dashboard"), "{msg}");
    assert_eq!(r.post("/v1/queries/counter/get", Vec::new()).await.unwrap()["result"], json!({"value": 0}));
    r.get("/v1/state/counter").await.unwrap();
    r.get("/v1/cluster").await.unwrap();
    assert_eq!(status_of(&r.post("/v1/plugins/x?version=1", component("counter")).await), 403);
    assert_eq!(status_of(&r.get("/v1/tokens").await), 403);

    // operator:thermostat: thermostat commands yes, counter commands no.
    let panel = token(&c, leader, "thermo-panel", &["operator:thermostat"]).await;
    for id in [leader, follower] {
        let p = c.client_with(id, Some(&panel));
        let set = json!({"zone": "kitchen", "setpoint": 21});
        p.post("/v1/commands/thermostat/set_setpoint", serde_json::to_vec(&set).unwrap()).await.unwrap();
        let denied = p.post("/v1/commands/counter/increment", b"{}".to_vec()).await;
        assert_eq!(status_of(&denied), 403, "node {id}: {denied:?}");
        assert_eq!(status_of(&p.get("/v1/state/counter").await), 403);
        p.get("/v1/state/thermostat").await.unwrap();
    }

    // The handler sees the principal's name as `caller`, through a
    // follower too (the leader checks the forwarded credential itself).
    let ops = token(&c, leader, "alice", &["operator"]).await;
    for id in [leader, follower] {
        let out = c.client_with(id, Some(&ops)).post("/v1/commands/misbehave/random", b"{}".to_vec()).await.unwrap();
        assert_eq!(out["result"]["caller"], json!("alice"), "via node {id}");
    }
    let out = c.client(follower).post("/v1/commands/misbehave/random", b"{}".to_vec()).await.unwrap();
    assert_eq!(out["result"]["caller"], json!("admin"));

    // Revoke through a follower: after the revocation's index, every node
    // refuses the token.
    let revoked = c.client(follower).delete("/v1/tokens/alice").await.unwrap();
    let index = revoked["index"].as_u64().unwrap();
    assert_eq!(revoked["revoked"].as_array().unwrap().len(), 1);
    for id in c.live() {
        c.wait_applied(id, index).await;
        let after = c.client_with(id, Some(&ops)).post("/v1/commands/counter/increment", b"{}".to_vec()).await;
        assert_eq!(status_of(&after), 401, "node {id} still takes a revoked token: {after:?}");
    }

    // Every admin action is in the audit trail with its principal.
    let audit = c.client(follower).get("/v1/audit").await.unwrap();
    let actions: Vec<(String, String, String)> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap().to_owned();
            (s("action"), s("principal"), s("target"))
        })
        .collect();
    for want in [
        ("token.bootstrap", "synod"),
        ("plugin.install", "admin"),
        ("token.create", "admin"),
        ("token.revoke", "admin"),
    ] {
        assert!(actions.iter().any(|(a, p, _)| a == want.0 && p == want.1), "{want:?} missing from {actions:?}");
    }
    assert!(actions.contains(&("token.revoke".into(), "admin".into(), "alice".into())), "{actions:?}");
    let tokens = c.client(leader).get("/v1/tokens").await.unwrap();
    let listed = tokens.to_string();
    assert!(!listed.contains(&reader) && !listed.contains("alice"), "{listed}");
    c.same_digest().await;
}

/// A TLS-only node: the CLI reaches it with the CA, plain HTTP is refused,
/// and without the CA the CLI does not trust it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_only_node_talks_to_the_cli() {
    let _serial = serial().await;
    let certs = tempfile::tempdir().unwrap();
    let (cert_pem, key_pem) = synod::api::tls::self_signed(&["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    let c = Cluster::start(1, |config| {
        config.tls = Some(synod::config::TlsConfig { cert: cert.clone(), key: key.clone() });
    });
    c.leader().await;
    let http = c.nodes[&1].config.http;
    let cli = |args: &[&str], ca: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_synod"));
        cmd.args(args)
            .args(["--node", &format!("https://{http}")])
            .env("SYNOD_TOKEN", c.admin_token().unwrap())
            .env_remove("SYNOD_CA_FILE")
            .current_dir(certs.path());
        if ca {
            cmd.arg("--ca-file").arg(&cert);
        }
        cmd.output().unwrap()
    };
    let out = cli(&["status"], true);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["leader"], json!(1));
    let untrusted = cli(&["status"], false);
    assert!(!untrusted.status.success());
    let err = String::from_utf8_lossy(&untrusted.stderr);
    assert!(err.contains("cannot reach"), "{err}");

    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = Client::new(&format!("http://{http}")).get("/healthz").await;
    assert!(matches!(plain, Err(ClientError::Unreachable { .. })), "{plain:?}");
}
