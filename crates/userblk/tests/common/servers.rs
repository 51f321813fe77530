//! Servers the tests run on this machine: `nbdkit memory` on a Unix socket
//! and s3s-fs on a loopback port. Each is killed when dropped; a missing
//! program is reported through the skip helper (CI installs both).
//!
//! Shared by the conformance suite (through `common`) and by s3_store.rs.

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use userblk::targets::s3::{Credentials, RetryPolicy, S3Config};

use super::skip::{self, Prereq};

/// The fixed test credentials of tests/s3/server.sh (not secrets; loopback only).
pub const ACCESS_KEY: &str = "userblk-test-key";
/// See [`ACCESS_KEY`].
pub const SECRET_KEY: &str = "userblk-test-secret";

/// A child process, killed and reaped when dropped.
pub struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `program` is on PATH.
pub fn installed(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// `nbdkit memory SIZE` serving `sock`; `None` (skip reported) without nbdkit.
pub fn nbdkit_memory(sock: &Path, size: u64) -> Option<Process> {
    if !skip::require(
        installed("nbdkit"),
        Prereq::CiInstalls,
        "nbdkit is not installed",
    ) {
        return None;
    }
    let mut child = Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "--unix"])
        .arg(sock)
        .args(["memory", &size.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nbdkit");
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(sock).is_err() {
        if let Some(status) = child.try_wait().expect("nbdkit status") {
            panic!("nbdkit exited ({status}) before listening");
        }
        assert!(Instant::now() < deadline, "nbdkit did not listen in 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(Process(child))
}

/// Where tests/s3/server.sh installs s3s-fs: `$S3S_FS`, else
/// `${S3S_FS_ROOT:-/opt/s3s-fs}/bin/s3s-fs`.
pub fn s3s_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("S3S_FS") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let root =
        std::env::var_os("S3S_FS_ROOT").map_or_else(|| PathBuf::from("/opt/s3s-fs"), PathBuf::from);
    Some(root.join("bin/s3s-fs")).filter(|p| p.is_file())
}

/// A loopback port nothing listens on (at the moment of asking).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .expect("its address")
        .port()
}

/// A running s3s-fs over a temporary data directory; killed on drop.
pub struct S3sFs {
    child: Child,
    /// Its loopback port.
    pub port: u16,
    /// Holds `data/` (bucket B is `data/B`) and `server.log`.
    pub dir: tempfile::TempDir,
}

impl S3sFs {
    /// A server with the (empty) bucket `bucket`; `None` (skip reported)
    /// when s3s-fs is not installed.
    pub fn start(bucket: &str) -> Option<Self> {
        let why = "s3s-fs not installed (run tests/s3/server.sh install)";
        let bin = s3s_binary();
        if !skip::require(bin.is_some(), Prereq::CiInstalls, why) {
            return None;
        }
        let bin = bin?;
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        // A bucket is just a directory of the data dir for s3s-fs.
        std::fs::create_dir_all(data.join(bucket)).expect("bucket directory");
        // The free port can be taken between probe and bind: retry.
        for _ in 0..5 {
            let port = free_port();
            let log = std::fs::File::create(dir.path().join("server.log")).expect("log");
            let mut child = Command::new(&bin)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                .arg(&data)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start s3s-fs");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if child.try_wait().expect("s3s-fs status").is_some() {
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(Self { child, port, dir });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
        panic!("s3s-fs did not start; log:\n{log}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config for `bucket`/`prefix` at `endpoint` with the test credentials,
/// and retries and timeouts short enough for tests.
pub fn s3_config(endpoint: &str, bucket: &str, prefix: &str) -> S3Config {
    let mut c = S3Config::new(bucket, prefix);
    c.endpoint = Some(endpoint.to_owned());
    c.credentials = Some(Credentials {
        access_key_id: ACCESS_KEY.to_owned(),
        secret_access_key: SECRET_KEY.to_owned(),
        session_token: None,
    });
    c.retry = RetryPolicy {
        max_retries: 2,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        budget: Duration::from_secs(3),
    };
    c.connect_timeout = Duration::from_secs(2);
    c.request_timeout = Duration::from_secs(10);
    c
}
