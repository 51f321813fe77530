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
}

impl DeviceState {
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
        if let Err(e) = std::fs::remove_file(Self::path(id)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing state of device {id}: {e}");
            }
        }
    }
}
