//! A node's data dir on `lossyfs.py`: a FUSE filesystem that keeps every
//! write in memory until the file is fsynced, so a power loss (daemon
//! killed, mount dropped) loses exactly what was never synced — unlike
//! kill -9, which leaves the page cache intact.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether this machine can run the lossy filesystem (FUSE, libfuse2,
/// fusepy), and if not, why.
pub fn unavailable() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing".into());
    }
    let probe = Command::new("python3").args(["-c", "import fuse"]).output();
    match probe {
        Ok(out) if out.status.success() => None,
        Ok(out) => {
            Some(format!("python3 cannot import fuse (fusepy): {}", String::from_utf8_lossy(&out.stderr).trim()))
        }
        Err(e) => Some(format!("python3: {e}")),
    }
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/chaos/lossyfs.py")
}

/// A mounted lossy disk: `backing` holds what is durable, `mount` is what
/// the node sees.
pub struct LossyDisk {
    backing: PathBuf,
    mount: PathBuf,
    daemon: Option<Child>,
    /// Where the daemon's stderr goes.
    log: PathBuf,
}

impl LossyDisk {
    /// Mount `backing` (created if missing) on `mount` (created empty).
    pub fn mount(backing: &Path, mount: &Path, log: &Path) -> LossyDisk {
        std::fs::create_dir_all(backing).unwrap();
        std::fs::create_dir_all(mount).unwrap();
        let mut disk =
            LossyDisk { backing: backing.to_owned(), mount: mount.to_owned(), daemon: None, log: log.to_owned() };
        disk.start();
        disk
    }

    fn start(&mut self) {
        assert!(self.daemon.is_none(), "already mounted");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut child = Command::new("python3")
            .arg(script())
            .arg(&self.backing)
            .arg(&self.mount)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the daemon never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx.recv_timeout(Duration::from_secs(20));
        match line {
            Ok(line) if line.starts_with("lossyfs: mounted") => {}
            other => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("lossyfs did not mount {}: {other:?}\n{log}", self.mount.display());
            }
        }
        self.daemon = Some(child);
    }

    /// Power loss: the daemon dies with every unsynced write, the mount is
    /// dropped, and a fresh daemon mounts what the backing dir kept. The
    /// node using it must be dead already.
    pub fn power_cycle(&mut self) {
        self.crash();
        self.start();
    }

    fn crash(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = Command::new("umount").arg("-l").arg(&self.mount).stderr(Stdio::null()).status().unwrap();
            if status.success() || !is_mounted(&self.mount) {
                break;
            }
            assert!(Instant::now() < deadline, "cannot unmount {}", self.mount.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let path = path.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(&*path))
}

impl Drop for LossyDisk {
    fn drop(&mut self) {
        self.crash();
    }
}
