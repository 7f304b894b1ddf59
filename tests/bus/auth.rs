//! Tokens on the bus, and nats-server's own permissions beside them: a
//! request without a valid token is answered 401 in `Synod-Status`, a
//! token's roles decide what it may run, and a NATS user allowed only
//! `synod.cmd.thermostat.>` cannot even publish a command to another plugin.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Cluster, serial};
use crate::nats::NatsServer;
use crate::plugins::component;

/// nats-server users: the nodes' own (everything), and a thermostat panel's
/// (publish to the thermostat's commands only; replies come to its inbox).
const USERS: &str = r#"
authorization {
  users = [
    { user: "synod", password: "synod-secret" }
    { user: "panel", password: "panel-secret",
      permissions: { publish: { allow: ["synod.cmd.thermostat.>"] }, subscribe: { allow: ["_INBOX.>"] } } }
  ]
}
"#;

async fn request(
    client: &async_nats::Client,
    token: Option<&str>,
    subject: &str,
    payload: &Value,
) -> Result<(u16, Value), String> {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(token) = token {
        headers.insert("Authorization", format!("Bearer {token}").as_str());
    }
    let bytes = serde_json::to_vec(payload).unwrap();
    let msg =
        client.request_with_headers(subject.to_owned(), headers, bytes.into()).await.map_err(|e| e.to_string())?;
    let status = msg.headers.as_ref().and_then(|h| h.get("Synod-Status")).ok_or("no status")?.as_str().parse().unwrap();
    Ok((status, serde_json::from_slice(&msg.payload).unwrap()))
}

async fn connect(url: &str, user: &str, password: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .request_timeout(Some(Duration::from_secs(3)))
        .connect(url)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_requests_need_a_token_and_nats_permissions_scope_subjects() {
    let _serial = serial().await;
    let nats = NatsServer::start_with_config(USERS);
    let url = nats.url();
    let c = Cluster::start(3, |config| {
        config.nats.url = Some(url.clone());
        config.nats.user = Some("synod".into());
        config.nats.password = Some("synod-secret".into());
    });
    let leader = c.leader().await;
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    c.push(leader, "thermostat", "1", component("thermostat")).await.unwrap();
    let body = serde_json::to_vec(&json!({"principal": "panel", "roles": ["operator:thermostat"]})).unwrap();
    let panel_token = c.client(leader).post("/v1/tokens", body).await.unwrap()["token"].as_str().unwrap().to_owned();
    let admin = c.admin_token().unwrap();
    let increment = json!({"by": 1});

    // The nodes' own NATS user may publish anywhere; synod's tokens decide.
    let full = connect(&url, "synod", "synod-secret").await;
    let (status, body) = request(&full, None, "synod.cmd.counter.increment", &increment).await.unwrap();
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["kind"], json!("unauthenticated"));
    let (status, _) =
        request(&full, Some("synod_not-a-token"), "synod.cmd.counter.increment", &increment).await.unwrap();
    assert_eq!(status, 401);
    let (status, body) = request(&full, Some(&panel_token), "synod.cmd.counter.increment", &increment).await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("operator:counter"), "{body}");
    let (status, body) = request(&full, Some(&admin), "synod.cmd.counter.increment", &increment).await.unwrap();
    assert_eq!((status, &body["result"]), (200, &json!({"value": 1})), "{body}");

    // The panel's NATS user with the panel's token runs thermostat commands…
    let panel = connect(&url, "panel", "panel-secret").await;
    let set = json!({"zone": "hall", "setpoint": 20});
    let (status, body) = request(&panel, Some(&panel_token), "synod.cmd.thermostat.set_setpoint", &set).await.unwrap();
    assert_eq!(status, 200, "{body}");
    // …and cannot even publish to another plugin's subject, whatever token
    // it holds: nats-server drops the message, nothing answers.
    let denied = request(&panel, Some(&admin), "synod.cmd.counter.increment", &increment).await;
    assert!(denied.is_err(), "a publish outside the panel's permissions was answered: {denied:?}");
    c.converged().await;
    for id in c.live() {
        assert_eq!(c.local_state(id, "counter").await, json!({"value": 1}), "node {id}");
    }
}
