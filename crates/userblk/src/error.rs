//! Library errors: a kind with its context and, where there is one, the OS error behind it.

use std::path::PathBuf;

pub use rustix::io::Errno;

/// Result with the library [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, with enough context for one clear line to the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel has no ublk driver loaded.
    #[error(
        "/dev/ublk-control not found: this kernel needs the ublk driver (Linux >= 6.0 with CONFIG_BLK_DEV_UBLK); try `modprobe ublk_drv`"
    )]
    NoUblk,
    /// The caller may not open `/dev/ublk-control`.
    #[error(
        "/dev/ublk-control: permission denied: run as root, or let users create unprivileged devices (see docs/unprivileged.md)"
    )]
    NoControlAccess,
    /// The kernel refused a command on a device the caller may not manage.
    #[error("{}", device_access_message(*id, *owner))]
    DeviceAccess {
        /// The device id.
        id: u32,
        /// The uid owning the device's char node, when it is not the caller.
        owner: Option<u32>,
    },
    /// A file or device could not be opened or inspected.
    #[error("{}: {err}", path.display())]
    Path {
        /// The path involved.
        path: PathBuf,
        /// What the OS said (part of the message, so not a separate `source`).
        err: std::io::Error,
    },
    /// A control command to the kernel failed.
    #[error("{cmd} failed for device {dev}: {errno}{hint}")]
    Control {
        /// Command name, e.g. `ADD_DEV`.
        cmd: &'static str,
        /// Device id, or `-` when not device-specific.
        dev: String,
        /// The errno from the kernel.
        errno: Errno,
        /// A hint for the user, possibly empty.
        hint: &'static str,
    },
    /// A requested device id does not exist.
    #[error("no ublk device with id {0}")]
    NoSuchDevice(u32),
    /// A requested device id is already taken.
    #[error("device id {0} is already in use")]
    IdInUse(u32),
    /// An argument is out of range or inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// An io_uring or other system call failed.
    #[error("{what}: {err}")]
    Io {
        /// What was being done.
        what: String,
        /// What the OS said (part of the message, so not a separate `source`).
        err: std::io::Error,
    },
    /// A queue thread failed.
    #[error("queue {queue}: {msg}")]
    Queue {
        /// The queue id.
        queue: u16,
        /// What happened.
        msg: String,
    },
    /// Saved device state could not be read or written.
    #[error("state file {path}: {msg}")]
    State {
        /// The state file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
}

fn device_access_message(id: u32, owner: Option<u32>) -> String {
    match owner {
        Some(uid) => format!("device {id} belongs to uid {uid}: permission denied"),
        None => format!("permission denied on device {id}"),
    }
}

impl Error {
    /// Wrap an OS error with what was being done.
    pub fn io(what: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        Error::Io {
            what: what.into(),
            err: source.into(),
        }
    }

    /// Wrap an OS error with the path it concerns.
    pub fn path(path: impl Into<PathBuf>, source: impl Into<std::io::Error>) -> Self {
        Error::Path {
            path: path.into(),
            err: source.into(),
        }
    }

    /// An invalid-argument error.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}
