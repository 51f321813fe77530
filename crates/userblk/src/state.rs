//! Saved per-device state under `/run/userblk/` (root) or the user's
//! runtime directory, so `list` can show a device's target and options after
//! the daemon detached, and `recover` can restart it with the same arguments.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Environment variable that moves the state directory (tests, unprivileged use).
pub const STATE_DIR_ENV: &str = "USERBLK_STATE_DIR";

/// The state directory:
/// - `$USERBLK_STATE_DIR` if set;
/// - `/run/userblk` for root;
/// - otherwise `$XDG_RUNTIME_DIR/userblk`, or `/tmp/userblk-<uid>` without one.
pub fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(STATE_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let euid = rustix::process::geteuid();
    if euid.is_root() {
        return PathBuf::from("/run/userblk");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir.join("userblk"),
        _ => PathBuf::from(format!("/tmp/userblk-{}", euid.as_raw())),
    }
}

/// Create the state directory if needed (mode 0700, and owned by the caller) and return it.
pub fn ensure_dir() -> Result<PathBuf> {
    let dir = state_dir();
    ensure_state_dir(&dir).map_err(|e| Error::State {
        path: dir.clone(),
        msg: e.to_string(),
    })?;
    Ok(dir)
}

/// Where the `stats` filter of daemon `pid` writes its snapshots (read by `userblk stats`).
pub fn stats_path(pid: i32) -> PathBuf {
    state_dir().join(format!("stats-{pid}.json"))
}

/// Where device `id`'s daemon keeps its request counters (read by `userblk metrics`).
pub fn metrics_path(id: u32) -> PathBuf {
    state_dir().join(format!("{id}.metrics"))
}

/// Count the requests of device `id` from now on, in its counter file (a
/// new one, or with `take_over` the file of the daemon this one takes the
/// device over from), while the guard lives. Best effort: without the
/// file the device is served uncounted, said in a warning.
pub fn count_requests(id: u32, take_over: bool) -> Option<crate::metrics::Installed> {
    if let Err(e) = ensure_dir() {
        tracing::warn!("request counters: {e}; the device is served without them");
        return None;
    }
    crate::metrics::install_file(&metrics_path(id), take_over)
}

/// Create the state directory (mode 0700 when new) and make sure a user's
/// directory is their own: `/tmp/userblk-<uid>` could have been made by
/// someone else first.
fn ensure_state_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let euid = rustix::process::geteuid();
    let meta = std::fs::symlink_metadata(dir)?;
    if !euid.is_root() && (meta.uid() != euid.as_raw() || !meta.is_dir()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "not a directory owned by uid {} (set {STATE_DIR_ENV} to use another)",
                euid.as_raw()
            ),
        ));
    }
    Ok(())
}

/// What a daemon records about its device.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceState {
    /// Device id.
    pub id: u32,
    /// The device's name (`add --name`), unique per state directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Daemon pid.
    pub pid: i32,
    /// Frontend serving it (`ublk`).
    pub frontend: String,
    /// Block device path.
    pub block_device: String,
    /// The target's own description.
    pub target: serde_json::Value,
    /// The `add` arguments, for recovery.
    pub args: Vec<String>,
    /// Queue thread ids.
    pub queue_tids: Vec<i32>,
    /// CPUs of each queue.
    pub queue_cpus: Vec<Vec<usize>>,
    /// Daemon log file.
    pub log: Option<PathBuf>,
    /// For the FUSE frontend: where the file is and what serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuse: Option<FuseState>,
    /// For the NBD frontend: where it listens and what it exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<NbdState>,
}

/// What `list` and `del` need to know about an NBD-served device.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NbdState {
    /// Listening addresses (`unix:PATH`, `tcp:HOST:PORT`).
    pub listen: Vec<String>,
    /// URIs clients connect to (`nbd+unix:///?socket=PATH`, `nbd://HOST:PORT/`).
    pub uris: Vec<String>,
    /// The export name.
    pub export_name: String,
    /// Size in bytes.
    pub size: u64,
    /// Minimum block size.
    pub block_size: u32,
    /// Requests in flight per connection.
    pub depth: u16,
    /// Largest read or write.
    pub max_payload: u32,
    /// The Unix sockets as bound, so that `del` after a crash removes a
    /// path only while it is still this device's socket.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sockets: Vec<SocketId>,
}

/// A Unix socket file as its creator bound it: the path and the (device,
/// inode, change time) it had then. Another server may replace a dead
/// server's socket at the same path; whoever cleans up must not remove the
/// new one. The change time tells a new socket that got the freed inode
/// number from the old one (some file systems reuse them at once).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SocketId {
    /// The socket's path.
    pub path: PathBuf,
    /// `st_dev` at bind time.
    pub dev: u64,
    /// `st_ino` at bind time.
    pub ino: u64,
    /// `st_ctime` at bind time, in nanoseconds.
    pub ctime_ns: i64,
}

impl SocketId {
    /// The identity of the file at `path` now (call right after binding).
    pub fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path)?;
        Ok(SocketId {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            ctime_ns: ctime_ns(&m),
        })
    }

    /// Remove the socket if the path still names it; see [`remove_socket_if_ours`].
    pub fn remove_if_ours(&self) -> bool {
        remove_socket_if_ours(&self.path, self.dev, self.ino, self.ctime_ns)
    }
}

fn ctime_ns(m: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    m.ctime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.ctime_nsec())
}

/// Remove the socket at `path` only if it is still the one with this
/// `(dev, ino, ctime_ns)` ([`SocketId`]): true if it was removed. A
/// different file there (another server's socket bound since), or none, is
/// left alone.
pub fn remove_socket_if_ours(path: &Path, dev: u64, ino: u64, ctime: i64) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match std::fs::symlink_metadata(path) {
        Ok(m)
            if m.file_type().is_socket()
                && m.dev() == dev
                && m.ino() == ino
                && ctime_ns(&m) == ctime =>
        {
            std::fs::remove_file(path).is_ok()
        }
        _ => false,
    }
}

/// What `list` and `del` need to know about a FUSE-served device.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FuseState {
    /// The FUSE mount point.
    pub mountpoint: PathBuf,
    /// The file that is the device.
    pub file: PathBuf,
    /// The mount point was made by the daemon, and is removed with the device.
    pub own_mountpoint: bool,
    /// The loop device on the file, if one was attached.
    pub loop_device: Option<PathBuf>,
    /// Size in bytes.
    pub size: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Threads serving FUSE requests.
    pub threads: u16,
    /// Largest request passed to the target.
    pub max_io_buf_bytes: u32,
}

impl DeviceState {
    /// A state with only the identity filled in, for a device being set up.
    pub fn new(id: u32, frontend: &str) -> Self {
        DeviceState {
            id,
            name: None,
            pid: rustix::process::getpid().as_raw_nonzero().get(),
            frontend: frontend.into(),
            block_device: String::new(),
            target: serde_json::Value::Null,
            args: Vec::new(),
            queue_tids: Vec::new(),
            queue_cpus: Vec::new(),
            log: None,
            fuse: None,
            nbd: None,
        }
    }

    /// Where this device's daemon writes `stats` filter snapshots, if it has one.
    pub fn stats_path(&self) -> PathBuf {
        stats_path(self.pid)
    }

    /// Whether the daemon that wrote this state still runs.
    pub fn daemon_alive(&self) -> bool {
        pid_is_userblk(self.pid)
    }

    /// Ids of every device with saved state.
    pub fn ids() -> Vec<u32> {
        let mut ids: Vec<u32> = std::fs::read_dir(state_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json")?.parse().ok())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Claim an id for a device that is not a ublk device (whose ids the
    /// kernel hands out): `wanted`, or the lowest id that neither the kernel
    /// (`kernel_ids`) nor another saved state uses. The claim is this state,
    /// saved at once under a lock so two `add`s cannot take the same id.
    /// `busy` can veto ids for reasons of the caller's (a mount point left
    /// in use under that id's name, say).
    pub fn claim(
        wanted: Option<u32>,
        kernel_ids: &[u32],
        frontend: &str,
        busy: impl Fn(u32) -> bool,
    ) -> Result<Self> {
        let dir = state_dir();
        ensure_state_dir(&dir).map_err(|e| Error::State {
            path: dir.clone(),
            msg: e.to_string(),
        })?;
        let _lock = StateLock::take(&dir)?;
        // A state left by a dead daemon still names a mount to clean up
        // (`userblk del`), so its id stays taken.
        let taken = |id: u32| kernel_ids.contains(&id) || Self::path(id).exists() || busy(id);
        let id = match wanted {
            Some(id) if taken(id) => return Err(Error::IdInUse(id)),
            Some(id) => id,
            None => (0..u32::MAX)
                .find(|&id| !taken(id))
                .ok_or(Error::invalid("no free device id"))?,
        };
        let st = DeviceState::new(id, frontend);
        st.save()?;
        Ok(st)
    }

    /// Path of device `id`'s state file.
    pub fn path(id: u32) -> PathBuf {
        state_dir().join(format!("{id}.json"))
    }

    /// Write atomically (temporary file, then rename).
    pub fn save(&self) -> Result<()> {
        let path = Self::path(self.id);
        let err = |msg: String| Error::State {
            path: path.clone(),
            msg,
        };
        ensure_state_dir(&state_dir()).map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(self).map_err(|e| err(e.to_string()))?;
        std::fs::write(&tmp, body).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(e.to_string()))
    }

    /// Read device `id`'s state, `None` if there is none.
    pub fn load(id: u32) -> Result<Option<Self>> {
        let path = Self::path(id);
        match std::fs::read(&path) {
            Ok(body) => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| Error::State {
                    path,
                    msg: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::State {
                path,
                msg: e.to_string(),
            }),
        }
    }

    /// Remove device `id`'s state; missing is fine.
    pub fn remove(id: u32) {
        // Its request counters go with it (`userblk metrics` stops showing it).
        let _ = std::fs::remove_file(metrics_path(id));
        // `upgrade`'s lock file (the lock itself dies with its holder).
        let _ = std::fs::remove_file(state_dir().join(format!("{id}.upgrade")));
        if let Err(e) = std::fs::remove_file(Self::path(id)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing state of device {id}: {e}");
            }
        }
    }
}

/// Whether `pid` is a running userblk process (not a reused pid, and not
/// a zombie: a daemon that has exited but whose parent has not reaped it
/// yet is gone for every purpose of ours).
pub fn pid_is_userblk(pid: i32) -> bool {
    crate::sys::proc_stat(pid)
        .is_some_and(|(comm, state)| comm == "userblk" && !matches!(state, 'Z' | 'X'))
}

/// Whether `pid` is stopped (`SIGSTOP`, or a debugger): alive, but it
/// will answer nothing until it is continued.
pub fn pid_is_stopped(pid: i32) -> bool {
    crate::sys::proc_stat(pid).is_some_and(|(_, state)| matches!(state, 'T' | 't'))
}

/// An exclusive `flock` on the state directory's lock file, for claiming ids (and names).
pub(crate) struct StateLock(#[allow(dead_code)] std::fs::File);

impl StateLock {
    pub(crate) fn take(dir: &Path) -> Result<Self> {
        let path = dir.join(".lock");
        let err = |e: std::io::Error| Error::State {
            path: path.clone(),
            msg: e.to_string(),
        };
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(err)?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| err(e.into()))?;
        Ok(StateLock(f))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sys::{parse_stat, proc_stat};

    #[test]
    fn stat_names_and_states_parse() {
        assert_eq!(
            parse_stat("42 (userblk) S 1 42"),
            Some(("userblk".into(), 'S'))
        );
        assert_eq!(
            parse_stat("7 (a) b) (c) Z 1"),
            Some(("a) b) (c".into(), 'Z'))
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn a_zombie_is_not_alive_and_a_stopped_child_is_stopped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        assert!(!pid_is_stopped(pid));
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::Signal::STOP,
        )
        .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !pid_is_stopped(pid) {
            assert!(std::time::Instant::now() < deadline, "never stopped");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.kill().unwrap();
        // Killed but not reaped: a zombie, state Z.
        while proc_stat(pid).is_some_and(|(_, s)| s != 'Z') {
            assert!(std::time::Instant::now() < deadline, "never a zombie");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(proc_stat(pid).map(|(_, s)| s), Some('Z'));
        child.wait().unwrap();
        assert_eq!(proc_stat(pid), None);
    }

    #[test]
    fn a_replaced_socket_is_not_removed() {
        use std::os::unix::net::UnixListener;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let first = UnixListener::bind(&path).unwrap();
        let old = SocketId::of(&path).unwrap();
        // Its server dies; another one replaces the stale socket (moved
        // aside here rather than removed, so that the new socket cannot
        // get its inode number: that case is told by the change time).
        drop(first);
        std::fs::rename(&path, dir.path().join("old.sock")).unwrap();
        let _second = UnixListener::bind(&path).unwrap();
        let new = SocketId::of(&path).unwrap();
        assert_ne!(old, new);
        assert!(!old.remove_if_ours(), "removed another server's socket");
        let reused = SocketId {
            ctime_ns: new.ctime_ns - 1,
            ..new.clone()
        };
        assert!(
            !reused.remove_if_ours(),
            "an inode number reused is not the same socket"
        );
        assert!(path.exists());
        assert!(new.remove_if_ours());
        assert!(!path.exists());
        // Nothing there, or a regular file with the same name: left alone.
        assert!(!new.remove_if_ours());
        std::fs::write(&path, b"x").unwrap();
        let file = SocketId::of(&path).unwrap();
        assert!(!file.remove_if_ours());
        assert!(path.exists());
    }
}
