//! Test helper: boot the real `mkts` binary on free ports with a fresh data directory; killed on drop.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A running server process.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub http_port: u16,
    pub grpc_port: u16,
    pub config: PathBuf,
    child: Option<Child>,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, buf))
}

impl TestServer {
    /// Start a server; `extra` YAML is appended to the generated config.
    pub fn start(extra: &str) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("data");
        let mut s = TestServer { root, http_port: free_port(), grpc_port: free_port(), config: dir.path().join("mkts.yml"), dir, child: None };
        std::fs::write(
            &s.config,
            format!(
                "root_directory: {}\nlisten_host: 127.0.0.1\nlisten_port: {}\ngrpc_listen_port: {}\n{extra}",
                s.root.display(),
                s.http_port,
                s.grpc_port
            ),
        )
        .expect("write config");
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_mkts"))
            .args(["start", "--config"])
            .arg(&self.config)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn mkts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some((200, _)) = http_get(self.http_port, "/heartbeat") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server did not start:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn flight_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILL, then start again on the same ports and data.
    pub fn kill_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        c.wait().ok()?.code()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
