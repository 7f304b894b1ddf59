//! The node side of devices: liveness, ownership and the drivers this node
//! runs.
//!
//! In: the replicated shadows (changes announced by the apply thread) and
//! this node's `[devices]` config. Out: three background tasks —
//!
//! - [`heartbeat`]: while the cluster has devices, a heartbeat entry every
//!   `heartbeat_ms` (about one entry per node per second); each committed
//!   one, once this node has applied it, renews this node's lease
//!   ([`Fence`]) until *sent + TTL*, measured on this node's monotonic
//!   clock. An owner that cannot renew stops writing to its devices when
//!   the lease runs out.
//! - [`reassign`]: on the leader, devices whose owner has been silent past
//!   TTL + grace (by the leader's clock, from the owner's last heartbeat
//!   entry), left the membership or is no longer eligible, and devices with
//!   no owner, get a `Reassign` entry: a compare-and-set on the epoch,
//!   applied by choosing a live eligible node deterministically. It also
//!   replicates the lease settings from the leader's config.
//! - [`manager`]: one [`worker`] per device this node owns at its current
//!   epoch; a worker stops when the device moves away.
//!
//! Because the owner's lease counts from before its heartbeat was even
//! proposed, and the leader counts TTL + grace from the entry's timestamp
//! (later), a partitioned or paused owner has stopped writing at least
//! `grace` before another node may start — unless clocks misbehave (see
//! the README's "Ownership and fencing").

pub mod coalesce;
pub mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::consensus::Op;
use crate::consensus::types::OPS_PER_ENTRY;
use crate::driver::io::Fence;
use crate::node::{NodeInner, SYSTEM, now_ms};
use crate::replica::devices::DeviceOp;

/// Renew this node's lease through the log, forever.
pub async fn heartbeat(node: Arc<NodeInner>, fence: Arc<Fence>) {
    let labels = node.config.devices.labels.clone();
    loop {
        let (settings, any) =
            node.with_replica(|r| (r.devices().settings(), !r.devices().is_empty())).unwrap_or_default();
        let sent = Instant::now();
        if !any {
            // No devices anywhere: nothing needs an owner, so nothing needs
            // liveness, and a cluster without devices keeps a quiet log.
            tokio::time::sleep(Duration::from_millis(settings.heartbeat_ms)).await;
            continue;
        }
        let op = Op::Device(DeviceOp::Heartbeat { node: node.id, labels: labels.clone() });
        let ttl = Duration::from_millis(settings.ttl_ms);
        match tokio::time::timeout(ttl, node.write(op, SYSTEM)).await {
            Ok(Ok((index, response))) if matches!(response.result, Some(Ok(_))) => {
                // Renew only once this node has applied its own heartbeat,
                // and so everything before it: a reassignment of its
                // devices that was committed while it was paused or cut
                // off is then in its state before its lease is good again
                // (the worker checks the state after the lease; see
                // `worker::session`). Renewed at once, a woken owner held a
                // fresh lease while its state still named it the owner,
                // and acted on a desired state the new owner had already
                // applied.
                let applied = node
                    .raft
                    .wait(Some(ttl.saturating_sub(sent.elapsed())))
                    .applied_index_at_least(Some(index / OPS_PER_ENTRY), "own heartbeat applied")
                    .await;
                match applied {
                    Ok(_) => fence.renew(sent + ttl),
                    Err(e) => tracing::debug!(error = %e, "heartbeat committed but not applied here in time"),
                }
            }
            Ok(Ok((_, response))) => tracing::warn!(result = ?response.result, "heartbeat refused"),
            Ok(Err(e)) => tracing::debug!(error = %e, "heartbeat not committed"),
            Err(_) => tracing::debug!("heartbeat timed out"),
        }
        let next = sent + Duration::from_millis(settings.heartbeat_ms);
        tokio::time::sleep_until(next.into()).await;
    }
}

/// Proposals this many apart for the same (device, epoch) are retried.
const REPROPOSE: Duration = Duration::from_secs(2);

/// Most reassignments proposed per round.
const MAX_PER_ROUND: usize = 256;

/// On the leader: reassign devices whose owner is gone, and keep the lease
/// settings equal to this node's config.
pub async fn reassign(node: Arc<NodeInner>) {
    let wanted = node.config.devices.lease();
    let mut proposed: HashMap<(String, u64), Instant> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        if node.leader().0 != Some(node.id) {
            proposed.clear();
            continue;
        }
        if node.with_replica(|r| r.devices().settings()) != Some(wanted) {
            match node.write(Op::Device(DeviceOp::Settings(wanted)), SYSTEM).await {
                Ok(_) => tracing::info!(?wanted, "lease settings replicated"),
                Err(e) => tracing::debug!(error = %e, "cannot replicate lease settings yet"),
            }
            continue;
        }
        let now = now_ms();
        let due: Vec<(String, u64)> = node
            .with_replica(|r| {
                let members = r.members();
                let devices = r.devices();
                devices
                    .view()
                    .values()
                    .filter(|d| devices.needs_owner(d, now, &members))
                    .map(|d| (d.spec.id.clone(), d.epoch))
                    .collect()
            })
            .unwrap_or_default();
        proposed.retain(|_, at| at.elapsed() < REPROPOSE);
        let fresh: Vec<(String, u64)> =
            due.into_iter().filter(|k| !proposed.contains_key(k)).take(MAX_PER_ROUND).collect();
        for k in &fresh {
            proposed.insert(k.clone(), Instant::now());
        }
        let writes = fresh.into_iter().map(|(id, epoch)| {
            let node = node.clone();
            async move {
                let op = Op::Device(DeviceOp::Reassign { id: id.clone(), epoch });
                match node.write(op, SYSTEM).await {
                    Ok((_, r)) => match r.result {
                        Some(Ok(doc)) => {
                            let doc: serde_json::Value = serde_json::from_slice(&doc).unwrap_or_default();
                            tracing::info!(device = %id, owner = %doc["owner"], epoch = %doc["epoch"], "device reassigned");
                        }
                        other => tracing::debug!(device = %id, result = ?other, "reassignment not applied"),
                    },
                    Err(e) => tracing::debug!(device = %id, error = %e, "reassignment not committed"),
                }
            }
        });
        futures::future::join_all(writes).await;
    }
}

/// A spawned task that is stopped when its handle is dropped.
struct Owned(tokio::task::JoinHandle<()>);

impl Drop for Owned {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Run a worker for every device this node owns, forever.
pub async fn manager(node: Arc<NodeInner>, fence: Arc<Fence>) {
    let mut changed = node.shared.devices_changed.subscribe();
    let mut workers: HashMap<String, (tokio::sync::watch::Sender<Arc<crate::replica::devices::Device>>, Owned)> =
        HashMap::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    loop {
        let swept = tokio::select! {
            r = changed.changed() => if r.is_err() { return } else { false },
            _ = sweep.tick() => true,
        };
        // The devices whose shadow changed; on the sweep, also every worker
        // and every device this node owns (a worker that stopped on its own
        // while the device is still ours is restarted, and nothing depends
        // on a notice never being lost).
        let mut ids: Vec<String> = node
            .shared
            .device_changes
            .lock()
            .map(|mut s| std::mem::take(&mut *s).into_iter().collect())
            .unwrap_or_default();
        if swept {
            ids.extend(workers.keys().cloned());
            ids.extend(
                node.with_replica(|r| {
                    let all = r.devices().view();
                    all.values().filter(|d| d.owner == Some(node.id)).map(|d| d.spec.id.clone()).collect::<Vec<_>>()
                })
                .unwrap_or_default(),
            );
        }
        ids.sort();
        ids.dedup();
        for id in ids {
            let device = node.with_replica(|r| r.devices().get(&id).cloned()).flatten();
            match device {
                Some(d) if d.owner == Some(node.id) => match workers.get(&id) {
                    Some((tx, task)) if !task.0.is_finished() && tx.borrow().epoch == d.epoch => {
                        // Wake the worker only for a new version of the shadow.
                        if !Arc::ptr_eq(&tx.borrow(), &d) {
                            tx.send_replace(d);
                        }
                    }
                    _ => {
                        let (tx, rx) = tokio::sync::watch::channel(d);
                        let task = tokio::spawn(worker::run(node.clone(), fence.clone(), rx));
                        workers.insert(id, (tx, Owned(task)));
                    }
                },
                _ => {
                    if workers.remove(&id).is_some() {
                        tracing::info!(device = %id, "device no longer owned here; its driver stopped");
                    }
                }
            }
        }
        crate::metrics::set(&crate::metrics::get().devices_owned, workers.len() as u64);
    }
}
