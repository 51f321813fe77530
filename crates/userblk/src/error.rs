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
    /// The kernel did not answer a control command within its deadline
    /// (`ublk::deadline`); the command was cancelled.
    #[error("{}", crate::ublk::deadline::message(cmd, dev, kernel, *waited, hint))]
    NoAnswer {
        /// Command name, e.g. `START_DEV`.
        cmd: &'static str,
        /// Device id, or `-` when there is none yet.
        dev: String,
        /// The running kernel's release (`uname -r`).
        kernel: String,
        /// How long it was waited for.
        waited: std::time::Duration,
        /// A hint for the user, possibly empty.
        hint: &'static str,
    },
    /// A requested device id does not exist.
    #[error("no ublk device with id {0}")]
    NoSuchDevice(u32),
    /// A requested device id is already taken.
    #[error("device id {0} is already in use")]
    IdInUse(u32),
    /// The kernel has no FUSE.
    #[error("/dev/fuse not found: this kernel has no FUSE support loaded; try `modprobe fuse`")]
    NoFuse,
    /// A user cannot mount FUSE without the setuid helper.
    #[error("fusermount3 not found: mounting FUSE as a user needs it (Debian/Ubuntu: apt-get install fuse3)")]
    NoFusermount,
    /// Mounting or serving the FUSE file system failed.
    #[error("FUSE: {what}: {err}")]
    Fuse {
        /// What was being done.
        what: String,
        /// What the OS or the FUSE library said.
        err: std::io::Error,
    },
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
    /// The kernel has no loop driver.
    #[error("no loop device support: /dev/loop-control is missing (try `modprobe loop`)")]
    NoLoop,
    /// The caller may not open the loop control device or a loop device.
    #[error("{}: permission denied: attaching a loop device needs root", path.display())]
    LoopAccess {
        /// The device that could not be opened.
        path: PathBuf,
    },
    /// A loop device is held by a mount or another exclusive opener, so it was not detached.
    #[error("{}", loop_busy_message(path, mounts))]
    LoopBusy {
        /// The loop device, e.g. `/dev/loop3`.
        path: PathBuf,
        /// Where it is mounted in this mount namespace; empty if it is held some other way.
        mounts: Vec<PathBuf>,
    },
    /// A device's size cannot be changed (by this target, filter or frontend, or to that size).
    #[error("{what} cannot be resized: {why}")]
    CannotResize {
        /// Who refuses (a target, filter or frontend).
        what: String,
        /// Why.
        why: String,
    },
    /// A block device is mounted or open, so it was not stopped (`del` without `--force`).
    #[error("{}", held_message(path, holders))]
    Held {
        /// The device, e.g. `/dev/ublkb0`.
        path: PathBuf,
        /// Who holds it; empty when only the kernel knows (it refused to stop it).
        holders: Vec<crate::holders::Holder>,
    },
    /// An NBD URI could not be understood.
    #[error(transparent)]
    NbdUri(#[from] crate::nbd::client::UriError),
    /// An NBD server could not be reached, refused the export, or broke the protocol.
    #[error("NBD server {uri}: {err}")]
    Nbd {
        /// The server's URI.
        uri: String,
        /// What happened (part of the message, so not a separate `source`).
        err: crate::nbd::client::ClientError,
    },
}

fn held_message(path: &std::path::Path, holders: &[crate::holders::Holder]) -> String {
    if holders.is_empty() {
        format!(
            "{} is open (the kernel refused to stop it: someone has it open)",
            path.display()
        )
    } else {
        crate::holders::describe(holders)
    }
}

fn device_access_message(id: u32, owner: Option<u32>) -> String {
    match owner {
        Some(uid) => format!("device {id} belongs to uid {uid}: permission denied"),
        None => format!("permission denied on device {id}"),
    }
}

fn loop_busy_message(path: &std::path::Path, mounts: &[PathBuf]) -> String {
    if mounts.is_empty() {
        return format!(
            "{} is in use (held open exclusively, e.g. by a mount in another namespace or a device mapper); release it first",
            path.display()
        );
    }
    let at: Vec<String> = mounts.iter().map(|m| m.display().to_string()).collect();
    format!(
        "{} is in use (mounted at {}); unmount it first",
        path.display(),
        at.join(", ")
    )
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

    /// `what` refuses a resize because `why`.
    pub fn cannot_resize(what: impl Into<String>, why: impl Into<String>) -> Self {
        Error::CannotResize {
            what: what.into(),
            why: why.into(),
        }
    }

    /// An invalid-argument error.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}
