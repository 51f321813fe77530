//! Process-level system calls the daemon needs for its own safety.

use rustix::mm::MlockAllFlags;

use crate::{Error, Result};

/// Lock the daemon's memory so serving a request never waits for swap-in,
/// which could need the very device being served. Pages are locked as they
/// are touched, so sparse buffers stay sparse.
pub fn lock_memory() -> Result<()> {
    rustix::mm::mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT)
        .map_err(|e| Error::io("mlockall", e))
}

/// Mark the calling thread as an I/O flusher: memory reclaim will not
/// recurse into filesystem I/O from it (which could wait on our own device).
pub fn set_io_flusher() -> Result<()> {
    rustix::process::configure_io_flusher_behavior(true)
        .map_err(|e| Error::io("prctl(PR_SET_IO_FLUSHER)", e))
}

/// Try to load a kernel module with `modprobe`, quietly. Returns whether modprobe succeeded.
pub fn modprobe(module: &str) -> bool {
    std::process::Command::new("modprobe")
        .arg("-q")
        .arg(module)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
