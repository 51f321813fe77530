//! Process-level system calls the daemon needs for its own safety.
#![allow(unsafe_code)]

use rustix::mm::MlockAllFlags;
use rustix::mount::MountPropagationFlags;
use rustix::thread::UnshareFlags;

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

/// Move the process into a private mount namespace, so mounts of its own
/// device made later in the host namespace are not seen here and cannot
/// pin or deadlock the daemon as it exits.
///
/// Must be called before any thread is spawned.
pub fn private_mount_namespace() -> Result<()> {
    // SAFETY: only NEWNS is unshared: file descriptor tables stay shared, so
    // no thread can observe descriptors from an unshared table.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS) }
        .map_err(|e| Error::io("unshare(CLONE_NEWNS)", e))?;
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(|e| Error::io("making / private in the new mount namespace", e))?;
    // Our copies of userblk FUSE mounts would keep those devices' file
    // systems alive after their own daemons unmount them.
    drop_fuse_copies();
    std::env::set_current_dir("/").map_err(|e| Error::io("chdir /", e))
}

/// Detach every userblk FUSE mount (source `userblk`, type `fuse` or
/// `fuse.userblk`) in this (private) mount namespace.
fn drop_fuse_copies() {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    for line in info.lines() {
        // "... MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut fields = right.split(' ');
        let (fstype, source) = (fields.next(), fields.next());
        if !matches!(fstype, Some("fuse" | "fuse.userblk")) || source != Some("userblk") {
            continue;
        }
        if let Some(mnt) = left.split(' ').nth(4) {
            let mnt = mnt
                .replace("\\040", " ")
                .replace("\\011", "\t")
                .replace("\\012", "\n")
                .replace("\\134", "\\");
            let _ = rustix::mount::unmount(mnt.as_str(), rustix::mount::UnmountFlags::DETACH);
        }
    }
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
