//! Snapshots are the state at their log id, whole: built in a loop while
//! another task applies thousands of batched entries, every one restores
//! without error and, replayed forward, reaches the reference digest.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use synod::artifacts::Artifacts;
use synod::consensus::{NoBlobSource, Op, Request, StateMachineStore, TypeConfig};
use synod::runtime::{PluginLimits, Runtime};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::harness::component;

const ENTRIES: u64 = 10_000;

fn entry(index: u64, op: Op) -> Entry<TypeConfig> {
    let request = Request { timestamp_ms: 1_800_000_000_000 + index, caller: "test".into(), request_id: None, op };
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1 + index / 3000, 1), index),
        payload: EntryPayload::Normal(request),
    }
}

fn increment(by: u64) -> Request {
    let payload = serde_json::to_vec(&serde_json::json!({ "by": by })).unwrap();
    let op = Op::Command { plugin: "counter".into(), command: "increment".into(), payload };
    Request { timestamp_ms: 0, caller: "test".into(), request_id: None, op }
}

/// Entry 1 installs the counter; every later one is a batch of 1–7
/// increments (an entry's operations are applied one by one, which is
/// where a snapshot used to cut into it).
fn log(sha256: &str, size: u64) -> Vec<Entry<TypeConfig>> {
    let install = Op::InstallPlugin {
        name: "counter".into(),
        version: "1".into(),
        sha256: sha256.to_owned(),
        size,
        limits: PluginLimits::default(),
    };
    let mut entries = vec![entry(1, Op::Batch(vec![Request { op: install, ..increment(0) }]))];
    for index in 2..=ENTRIES + 1 {
        let ops = (0..1 + index % 7).map(|i| increment(index % 5 + i)).collect();
        entries.push(entry(index, Op::Batch(ops)));
    }
    entries
}

/// A data dir whose plugin store holds the counter: (dir, store, its
/// sha256, its size).
fn with_counter() -> (tempfile::TempDir, Arc<Artifacts>, String, u64) {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Arc::new(Runtime::new().unwrap());
    let artifacts = Arc::new(Artifacts::open(&dir.path().join("plugins"), runtime).unwrap());
    let bytes = component("counter");
    let sha256 = artifacts.put(&bytes).unwrap();
    (dir, artifacts, sha256, bytes.len() as u64)
}

fn digest(store: &StateMachineStore) -> String {
    store.shared().replica.read().unwrap().digest().to_hex()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_built_during_apply_restore_and_replay_to_the_same_digest() {
    let (dir, artifacts, sha256, size) = with_counter();
    let entries = log(&sha256, size);

    let mut store = StateMachineStore::open(dir.path(), artifacts.clone(), Arc::new(NoBlobSource)).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let snapshots = {
        let mut builder_store = store.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut taken = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let mut builder = builder_store.get_snapshot_builder().await;
                let mut snapshot = builder.build_snapshot().await.unwrap();
                // The data is the file just written: read it as openraft
                // sends it.
                let mut data = Vec::new();
                snapshot.snapshot.read_to_end(&mut data).await.unwrap();
                taken.push((snapshot.meta, data));
                tokio::task::yield_now().await;
            }
            taken
        })
    };
    for chunk in entries.chunks(8) {
        store.apply(chunk.to_vec()).await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let snapshots = snapshots.await.unwrap();
    let reference = digest(&store);
    let cut_inside =
        snapshots.iter().filter(|(m, _)| m.last_log_id.is_some_and(|l| l.index > 1 && l.index <= ENTRIES)).count();
    assert!(cut_inside >= 5, "only {cut_inside} of {} snapshots were taken while entries applied", snapshots.len());

    // Every snapshot restores (its label and its state agree); a sample,
    // replayed forward from its label, reaches the reference digest.
    let step = (snapshots.len() / 6).max(1);
    for (n, (meta, data)) in snapshots.iter().enumerate() {
        let restored_dir = tempfile::tempdir().unwrap();
        let mut restored =
            StateMachineStore::open(restored_dir.path(), artifacts.clone(), Arc::new(NoBlobSource)).unwrap();
        let data = received(&mut restored, data).await;
        restored
            .install_snapshot(meta, data)
            .await
            .unwrap_or_else(|e| panic!("snapshot {} does not restore: {e}", meta.snapshot_id));
        if n % step != 0 {
            continue;
        }
        let from = meta.last_log_id.map(|l| l.index).unwrap_or(0) as usize;
        for chunk in entries[from..].chunks(64) {
            restored.apply(chunk.to_vec()).await.unwrap_or_else(|e| panic!("replay after {}: {e}", meta.snapshot_id));
        }
        assert_eq!(digest(&restored), reference, "snapshot {} replayed to another state", meta.snapshot_id);
    }
}

/// `data` received by `store` as openraft receives a snapshot: written
/// into the file the store gives for it.
async fn received(store: &mut StateMachineStore, data: &[u8]) -> Box<synod::consensus::SnapshotBytes> {
    let mut file = store.begin_receiving_snapshot().await.unwrap();
    file.write_all(data).await.unwrap();
    file.shutdown().await.unwrap();
    file
}

/// A snapshot whose label does not match the state inside it is refused,
/// not installed.
#[tokio::test]
async fn a_mislabelled_snapshot_is_refused() {
    let (dir, artifacts, sha256, size) = with_counter();
    let mut store = StateMachineStore::open(dir.path(), artifacts.clone(), Arc::new(NoBlobSource)).unwrap();
    store.apply(log(&sha256, size)[..10].to_vec()).await.unwrap();
    let snapshot = store.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let mut meta = snapshot.meta.clone();
    meta.last_log_id = Some(LogId::new(CommittedLeaderId::new(1, 1), 9));
    let other = tempfile::tempdir().unwrap();
    let mut target = StateMachineStore::open(other.path(), artifacts, Arc::new(NoBlobSource)).unwrap();
    let e = target.install_snapshot(&meta, snapshot.snapshot).await.unwrap_err();
    assert!(e.to_string().contains("labelled"), "{e}");
}

/// A damaged snapshot file is refused at open, naming the damage.
#[tokio::test]
async fn a_damaged_snapshot_file_is_refused() {
    let (dir, artifacts, sha256, size) = with_counter();
    {
        let mut store = StateMachineStore::open(dir.path(), artifacts.clone(), Arc::new(NoBlobSource)).unwrap();
        store.apply(log(&sha256, size)[..10].to_vec()).await.unwrap();
        store.get_snapshot_builder().await.build_snapshot().await.unwrap();
    }
    let path = dir.path().join("snapshot.bin");
    let mut file = std::fs::read(&path).unwrap();
    let last = file.len() - 1;
    file[last] ^= 0x40;
    std::fs::write(&path, file).unwrap();
    let e = StateMachineStore::open(dir.path(), artifacts, Arc::new(NoBlobSource)).err().unwrap();
    assert!(e.to_string().contains("checksum does not match"), "{e}");
}
