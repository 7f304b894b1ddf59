//! One device's driver on its owner node.
//!
//! In: the device's shadow as it changes (a watch channel from the
//! manager), this node's fence, and the driver plugin's active version.
//! Out: `poll` every interval, `actuate` once per new desired version,
//! telemetry on NATS and on gossip (every node serves the latest readings),
//! coalesced reports through the log at the worker's epoch.
//!
//! One call at a time (one request in flight per device), each within its
//! deadline; a trap or a missed deadline drops the instance and a new one
//! is made after a backoff that doubles up to `max_backoff_ms`. Nothing a
//! worker waits on is shared with another device's worker, so a dead or
//! slow device delays only itself. While the lease is out the worker does
//! not call `actuate`, and the host refuses any device write a driver
//! attempts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;

use super::coalesce::{Coalescer, ReportPolicy};
use crate::consensus::Op;
use crate::driver::io::Fence;
use crate::driver::{DeviceSetup, DriverInstance, SinkItem};
use crate::node::{NodeInner, SYSTEM};
use crate::replica::devices::{Device, DeviceOp};
use crate::runtime::CommandError;

/// Shortest poll interval a driver may ask for.
const MIN_POLL: Duration = Duration::from_millis(50);
/// Longest.
const MAX_POLL: Duration = Duration::from_secs(3600);
/// First wait before re-instantiating a failed driver.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Why a driver session ended.
enum Exit {
    /// The device moved away or was fenced: the worker is done.
    Stop,
    /// The definition or the driver version changed: start again now.
    Restart,
    /// The driver failed: start again after a backoff.
    Failed(String),
}

/// Drive one device until it moves away from this node.
pub async fn run(node: Arc<NodeInner>, fence: Arc<Fence>, mut device: watch::Receiver<Arc<Device>>) {
    let max_backoff = Duration::from_millis(node.config.devices.max_backoff_ms);
    let mut backoff = FIRST_BACKOFF;
    let id = device.borrow().spec.id.clone();
    let epoch = device.borrow().epoch;
    tracing::info!(device = %id, epoch, "driving device");
    loop {
        let started = Instant::now();
        match session(&node, &fence, &mut device, epoch).await {
            Exit::Stop => return,
            Exit::Restart => backoff = FIRST_BACKOFF,
            Exit::Failed(why) => {
                tracing::warn!(device = %id, error = %why, retry_in = ?backoff, "driver failed");
                publish_status(&node, &id, epoch, "failed", &why).await;
                if started.elapsed() > max_backoff * 2 {
                    backoff = FIRST_BACKOFF;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    r = device.changed() => if r.is_err() { return },
                }
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
}

/// The active version's sha256 of `driver`.
fn active_sha(node: &NodeInner, driver: &str) -> Option<String> {
    node.with_replica(|r| {
        let record = r.registry().get(driver)?;
        record.active.as_ref().and_then(|a| record.versions.get(a)).map(|v| v.sha256.clone())
    })
    .flatten()
}

/// One driver instance, from `init` until it fails or must restart.
async fn session(node: &Arc<NodeInner>, fence: &Arc<Fence>, rx: &mut watch::Receiver<Arc<Device>>, epoch: u64) -> Exit {
    let d = rx.borrow_and_update().clone();
    if d.owner != Some(node.id) || d.epoch != epoch {
        return Exit::Stop;
    }
    let cfg = &node.config.devices;
    let deadline = Duration::from_millis(cfg.call_deadline_ms);
    let Some(sha) = active_sha(node, &d.spec.driver) else {
        return Exit::Failed(format!("driver plugin `{}` is not installed", d.spec.driver));
    };
    let component = match node.driver_component(&sha).await {
        Ok(c) => c,
        Err(e) => return Exit::Failed(format!("driver `{}` does not load: {e}", d.spec.driver)),
    };
    let setup = DeviceSetup {
        id: d.spec.id.clone(),
        profile: d.spec.profile.clone(),
        grants: d.spec.grants.clone(),
        io_timeout: Duration::from_millis(cfg.io_timeout_ms),
    };
    let mut instance = match component.instantiate(&setup, fence.clone()).await {
        Ok(i) => i,
        Err(e) => return Exit::Failed(e.to_string()),
    };
    let mut reports = Coalescer::new(ReportPolicy::from_profile(&d.spec.profile), reported(&d));
    let interval = match instance.init(&setup, Duration::from_millis(cfg.init_deadline_ms)).await {
        Ok(i) => i.clamp(MIN_POLL, MAX_POLL),
        Err(e) => return Exit::Failed(e.to_string()),
    };
    drain(node, &d, &mut instance, &mut reports).await;
    publish_status(node, &d.spec.id, epoch, "running", "").await;
    let definition = d.definition_version;
    let mut actuated = d.last_actuated_version;
    let mut poll = tokio::time::interval(interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inflight: Option<tokio::task::JoinHandle<Result<(), Report>>> = None;
    loop {
        let flush_at = reports.due().map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = poll.tick() => {
                // Reading goes on while the lease is out (a fenced owner may
                // look, not touch: the host refuses its writes); what it
                // reports is refused at apply if the device moved on.
                if let Err(e) = instance.poll(deadline).await {
                    drain(node, &d, &mut instance, &mut reports).await;
                    if e.is_fatal() {
                        return Exit::Failed(e.to_string());
                    }
                    tracing::debug!(device = %d.spec.id, error = %e, "poll failed");
                }
                drain(node, &d, &mut instance, &mut reports).await;
            }
            r = rx.changed() => {
                if r.is_err() {
                    return Exit::Stop;
                }
            }
            done = async {
                match inflight.as_mut() {
                    Some(h) => h.await,
                    None => futures::future::pending().await,
                }
            }, if inflight.is_some() => {
                inflight = None;
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(Report::Fenced(why))) => {
                        tracing::debug!(device = %d.spec.id, epoch, error = %why, "stopping: this node no longer owns the device");
                        return Exit::Stop;
                    }
                    Ok(Err(Report::Lost { fields, actuated })) => reports.retry(fields, actuated),
                    Err(_) => {}
                }
            }
            _ = sleep_until(flush_at), if flush_at.is_some() && inflight.is_none() => {}
        }
        let now = rx.borrow().clone();
        if now.owner != Some(node.id) || now.epoch != epoch {
            return Exit::Stop;
        }
        if now.definition_version != definition || active_sha(node, &now.spec.driver).as_deref() != Some(&sha) {
            return Exit::Restart;
        }
        // Actuate once per new desired version.
        let due = now.desired_version > actuated.max(now.last_actuated_version);
        // A version whose delta is empty right now is not consumed: the
        // shadow's reported state may be stale (a new owner starts from what
        // the old one last reported), and once this driver reports what the
        // device really holds, a delta for the same version appears.
        // The lease first, then the state: a lease renewed after a pause
        // is renewed only once the node has applied its heartbeat (see
        // `devices::heartbeat`), so a reassignment committed before it is
        // in the state read here even when `now` (handed over by the
        // manager) does not show it yet.
        if due && fence.valid() && still_owner(node, &now.spec.id, epoch) {
            let previous = actuated;
            let delta = now.delta_json();
            if delta.as_object().is_some_and(|m| !m.is_empty()) {
                actuated = now.desired_version;
                let result = instance.actuate(actuated, &delta.to_string(), deadline).await;
                drain(node, &now, &mut instance, &mut reports).await;
                match result {
                    Ok(()) => reports.actuated(actuated),
                    Err(e) if e.is_fatal() => return Exit::Failed(e.to_string()),
                    Err(e) => {
                        // Not done: try again on the next turn (after the
                        // next poll at the latest), not never.
                        tracing::warn!(device = %now.spec.id, version = actuated, error = %e, "actuate failed; will retry");
                        actuated = previous;
                    }
                }
            }
        }
        if inflight.is_none()
            && let Some((fields, version)) = reports.take(Instant::now())
        {
            inflight = Some(tokio::spawn(report(node.clone(), now.spec.id.clone(), epoch, fields, version)));
        }
    }
}

/// Whether this node's applied state names it the owner of `id` at
/// `epoch`.
fn still_owner(node: &NodeInner, id: &str, epoch: u64) -> bool {
    node.with_replica(|r| r.devices().get(id).is_some_and(|d| d.owner == Some(node.id) && d.epoch == epoch))
        .unwrap_or(false)
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}

fn reported(d: &Device) -> serde_json::Map<String, Value> {
    d.reported.iter().map(|(k, v)| (k.clone(), serde_json::from_str(v).unwrap_or(Value::Null))).collect()
}

/// Publish what the driver said: telemetry to NATS and gossip, reports to
/// the coalescer, log lines to the node's log.
async fn drain(node: &NodeInner, d: &Device, instance: &mut DriverInstance, reports: &mut Coalescer) {
    let (items, dropped) = instance.take_sink();
    if dropped > 0 {
        tracing::warn!(device = %d.spec.id, dropped, "driver output past the per-call bound was dropped");
    }
    for item in items {
        match item {
            SinkItem::Telemetry { metric, value, ts_ms } => {
                let reading = crate::node::gossip::Reading { v: value, ts_ms, node: node.id, epoch: d.epoch };
                node.telemetry.share(&d.spec.id, &metric, reading);
                if let Some(client) = node.bus.get() {
                    let body = serde_json::json!({ "v": value, "ts_ms": ts_ms, "node": node.id, "epoch": d.epoch });
                    let subject = format!("synod.tel.{}.{metric}", d.spec.id);
                    if let Err(e) = client.publish(subject, body.to_string().into()).await {
                        tracing::debug!(error = %e, "telemetry not published");
                    }
                }
            }
            SinkItem::Report(fields) => reports.offer(fields),
            SinkItem::Log { level, message } => {
                tracing::info!(target: "synod::driver", device = %d.spec.id, level, "{message}");
            }
        }
    }
}

/// Tell subscribers how a device's driver is doing (`synod.sys.device.<id>`).
async fn publish_status(node: &NodeInner, id: &str, epoch: u64, state: &str, error: &str) {
    if let Some(client) = node.bus.get() {
        let body = serde_json::json!({ "device": id, "node": node.id, "epoch": epoch, "state": state, "error": error });
        let _ = client.publish(format!("synod.sys.device.{id}"), body.to_string().into()).await;
    }
}

/// Why a report did not commit.
enum Report {
    /// This node is not the owner at this epoch any more.
    Fenced(String),
    /// No leader, a timeout: send again.
    Lost { fields: serde_json::Map<String, Value>, actuated: Option<u64> },
}

async fn report(
    node: Arc<NodeInner>,
    id: String,
    epoch: u64,
    fields: serde_json::Map<String, Value>,
    actuated: Option<u64>,
) -> Result<(), Report> {
    let op = Op::Device(DeviceOp::Report {
        id: id.clone(),
        node: node.id,
        epoch,
        fields: Value::Object(fields.clone()).to_string(),
        actuated,
    });
    match tokio::time::timeout(Duration::from_secs(5), node.write(op, SYSTEM)).await {
        Ok(Ok((_, response))) => match response.result {
            Some(Err(CommandError::Fenced { message })) => {
                tracing::info!(device = %id, epoch, error = %message, "report fenced");
                Err(Report::Fenced(message))
            }
            Some(Err(CommandError::NotFound { message })) => Err(Report::Fenced(message)),
            Some(Err(e)) => {
                tracing::warn!(device = %id, error = %e, "report refused");
                Ok(())
            }
            _ => Ok(()),
        },
        Ok(Err(e)) => {
            tracing::debug!(device = %id, error = %e, "report not committed; will retry");
            Err(Report::Lost { fields, actuated })
        }
        Err(_) => Err(Report::Lost { fields, actuated }),
    }
}
