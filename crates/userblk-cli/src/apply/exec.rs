//! How `apply` changes devices: one `userblk add`, `del` or `resize`
//! process per step (their own checks, clean-up and deadlines, and their
//! exit status), under a lock that keeps two `apply`s apart; and the
//! list of the names `apply` manages.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use userblk::state;

/// The names of the devices `apply` added, in the state directory (not
/// `.json`: those are devices' states).
const MANAGED: &str = "pool.managed";
/// The lock file: held by an `apply` and the commands it runs.
const LOCK: &str = "pool.lock";
/// How long an `apply` waits for another one to finish: the longest step,
/// an `add` whose daemon takes its whole deadline.
const LOCK_WAIT: Duration = Duration::from_secs(330);

/// The longest each command may take, beyond its own deadline (`add`
/// waits up to 300 s for its daemon, `resize` 120 s, `del` 10 s per
/// device), before it is killed.
pub const ADD_DEADLINE: Duration = Duration::from_secs(330);
/// See [`ADD_DEADLINE`].
pub const RESIZE_DEADLINE: Duration = Duration::from_secs(150);
/// See [`ADD_DEADLINE`].
pub const DEL_DEADLINE: Duration = Duration::from_secs(60);

/// The pool lock, held while it lives. Its descriptor is inherited by the
/// commands `apply` runs, so an `add` that outlives a killed `apply`
/// keeps the next `apply` waiting until the device is live or gone.
pub struct Lock(#[allow(dead_code)] std::fs::File);

impl Lock {
    /// Take the lock, waiting for another `apply` up to [`LOCK_WAIT`].
    pub fn take() -> anyhow::Result<Lock> {
        use rustix::fs::{flock, FlockOperation};
        let dir = state::ensure_dir()?;
        let path = dir.join(LOCK);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let deadline = Instant::now() + LOCK_WAIT;
        let mut said = false;
        loop {
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(e) if e == rustix::io::Errno::WOULDBLOCK && Instant::now() < deadline => {
                    if !said {
                        eprintln!("userblk: another apply (or a command it started) is running; waiting for it");
                        said = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) if e == rustix::io::Errno::WOULDBLOCK => bail!(
                    "another apply (or a command it started) still holds {} after {}s",
                    path.display(),
                    LOCK_WAIT.as_secs()
                ),
                Err(e) => return Err(e).with_context(|| format!("locking {}", path.display())),
            }
        }
        // Inherited by the commands we run (their daemons close it).
        rustix::io::fcntl_setfd(&file, rustix::io::FdFlags::empty())
            .with_context(|| format!("{}: keeping it for the commands", path.display()))?;
        Ok(Lock(file))
    }
}

fn managed_path() -> PathBuf {
    state::state_dir().join(MANAGED)
}

/// The names `apply` manages (none before its first run).
pub fn managed() -> anyhow::Result<BTreeSet<String>> {
    let path = managed_path();
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Record `names` as the ones `apply` manages (atomically: a killed
/// `apply` leaves the old list or the new one).
pub fn remember(names: &BTreeSet<String>) -> anyhow::Result<()> {
    let path = managed_path();
    let tmp = path.with_extension("managed.tmp");
    let mut text = String::new();
    for n in names {
        text.push_str(n);
        text.push('\n');
    }
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))
}

/// How a command ended.
#[derive(Debug)]
pub struct Ran {
    /// Whether it succeeded.
    pub ok: bool,
    /// Its exit status (none if killed).
    pub status: Option<i32>,
    /// Its error: its last line on stderr, without `userblk: `.
    pub error: String,
}

/// Run `userblk ARGS` (this binary) and wait for it up to `deadline`,
/// then kill it. Its output is its own: `apply` reports the outcome.
pub fn userblk(args: &[String], deadline: Duration) -> Ran {
    let fail = |error: String| Ran {
        ok: false,
        status: None,
        error,
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return fail(format!("finding the userblk executable: {e}")),
    };
    let child = Command::new(exe)
        .args(args)
        // The daemons are not the service manager's main process: that is us.
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return fail(format!("starting userblk {}: {e}", args.join(" "))),
    };
    let (tx, said) = std::sync::mpsc::channel();
    let stderr = child.stderr.take();
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = stderr {
            let _ = p.read_to_string(&mut s);
        }
        let _ = tx.send(s);
    });
    let end = Instant::now() + deadline;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let text = said
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_default();
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    let error = last.strip_prefix("userblk: ").unwrap_or(last).to_string();
    match status {
        Some(s) => Ran {
            ok: s.success(),
            status: s.code(),
            error: if s.success() {
                String::new()
            } else if error.is_empty() {
                format!("exited ({s})")
            } else {
                error
            },
        },
        None => fail(format!(
            "userblk {} did not finish within {}s; killed it",
            args.join(" "),
            deadline.as_secs()
        )),
    }
}
