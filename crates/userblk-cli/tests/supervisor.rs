//! What a supervisor sees, with FUSE devices on this host: what a daemon
//! sends to `$NOTIFY_SOCKET` (sd_notify's protocol) and when, and the exit
//! status of a refused `del` (the other statuses are in tests/cli.rs).
//!
//! Needs root and /dev/fuse; without them each test prints `SKIP` (see
//! tests/skip) and returns. Each test has its own state directory and
//! socket, and deletes what it added even when it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../userblk/tests/skip/mod.rs"]
mod skip;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a device may take to go live, or a daemon to stop.
const DEADLINE: Duration = Duration::from_secs(30);

/// Whether FUSE devices can be added here; if not, reports the test skipped.
fn can_add_fuse() -> bool {
    skip::require(
        rustix::process::geteuid().is_root(),
        skip::Prereq::CiInstalls,
        "FUSE devices are mounted, which needs root",
    ) && skip::require(
        Path::new("/dev/fuse").exists(),
        skip::Prereq::CiInstalls,
        "no /dev/fuse on this machine",
    )
}

/// A state directory and a notification socket for one test's devices.
struct Env {
    dir: tempfile::TempDir,
    sock: UnixDatagram,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let sock = UnixDatagram::bind(dir.path().join("notify")).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Env { dir, sock }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_userblk"));
        c.args(args)
            .env("USERBLK_STATE_DIR", self.dir.path().join("state"))
            .env("NOTIFY_SOCKET", self.dir.path().join("notify"));
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Messages received until one has the line `key`, which comes last.
    fn wait_for(&self, key: &str) -> Vec<String> {
        let deadline = Instant::now() + DEADLINE;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.lines().any(|l| l == key);
                got.push(msg);
                if done {
                    return got;
                }
            }
        }
        panic!("no {key} within {DEADLINE:?}; received {got:?}");
    }

    /// The devices, as `list --json` shows them.
    fn list(&self) -> Vec<serde_json::Value> {
        let o = self.run(&["list", "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.run(&["del", "-a", "--force"]);
    }
}

/// The value of line `KEY=` in `msg`.
fn field<'a>(msg: &'a str, key: &str) -> Option<&'a str> {
    msg.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// Wait, with [`DEADLINE`], for `child` to exit; its exit code.
fn wait_exit(child: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!(
                "userblk (pid {}) did not exit within {DEADLINE:?}",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn foreground_add_is_ready_once_live_and_stops_on_sigterm() {
    if !can_add_fuse() {
        return;
    }
    let env = Env::new();
    let log = std::fs::File::create(env.dir.path().join("stderr")).unwrap();
    let mut child = env
        .cmd(&[
            "add",
            "--frontend",
            "fuse",
            "--foreground",
            "mem",
            "--size",
            "16M",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let msgs = env.wait_for("READY=1");
    let ready = msgs.last().unwrap();
    let status = field(ready, "STATUS").expect("a STATUS line with READY=1");
    let path = status
        .strip_prefix("serving ")
        .and_then(|s| s.strip_suffix(": mem 16 MiB"))
        .unwrap_or_else(|| panic!("STATUS={status}"));
    // Ready means usable: the device is there when the message arrives.
    assert!(Path::new(path).exists(), "READY=1 before {path} exists");
    // systemd started this very process: no MAINPID.
    assert_eq!(field(ready, "MAINPID"), None, "{ready}");
    let devices = env.list();
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(devices[0]["block_device"], path);
    assert_eq!(devices[0]["pid"], child.id());

    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let msgs = env.wait_for("STOPPING=1");
    assert!(!msgs.iter().any(|m| m.contains("READY=1")), "{msgs:?}");
    let code = wait_exit(&mut child);
    let said = std::fs::read_to_string(env.dir.path().join("stderr")).unwrap();
    assert_eq!(code, Some(0), "{said}");
    assert!(!Path::new(path).exists(), "{path} outlived its daemon");
    assert_eq!(env.list(), Vec::<serde_json::Value>::new());
}

#[test]
fn detached_add_names_its_daemon_the_main_process() {
    if !can_add_fuse() {
        return;
    }
    let env = Env::new();
    let o = env.run(&["add", "--frontend", "fuse", "mem", "--size", "16M"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let msgs = env.wait_for("READY=1");
    let ready = msgs.last().unwrap();
    let main: u32 = field(ready, "MAINPID")
        .unwrap_or_else(|| panic!("no MAINPID in {ready}"))
        .parse()
        .unwrap();
    let devices = env.list();
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(devices[0]["pid"], main, "{ready}");
    let id = devices[0]["id"].to_string();
    let path = PathBuf::from(devices[0]["block_device"].as_str().unwrap());
    assert!(path.exists());

    let o = env.run(&["del", "-n", &id]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    env.wait_for("STOPPING=1");
    assert!(!path.exists(), "{} outlived del", path.display());
}

#[test]
fn del_of_a_device_in_use_exits_3() {
    if !can_add_fuse() {
        return;
    }
    let env = Env::new();
    let o = env.run(&[
        "add",
        "--frontend",
        "fuse",
        "--show",
        "mem",
        "--size",
        "16M",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let path = String::from_utf8(o.stdout).unwrap().trim().to_owned();
    let id = env.list()[0]["id"].to_string();
    let held = std::fs::File::open(&path).unwrap();
    let o = env.run(&["del", "-n", &id]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(env.list().len(), 1, "a refused del took the device");
    drop(held);
    let o = env.run(&["del", "-n", &id]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
