//! Mounting FUSE as a user through the setuid helper `fusermount3`.
//!
//! `/dev/fuse` is often mode 0600, so a user cannot open it; `fusermount3`
//! opens it as root, mounts, and passes the open descriptor back over a Unix
//! socket named by `_FUSE_COMMFD` (libfuse's protocol). The caller then serves
//! the mount on that descriptor, e.g. with `fuser::Session::from_fd`.

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use rustix::io::{Errno, FdFlags};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SocketFlags, SocketType,
};

use crate::{Error, Result};

/// The environment variable naming the socket `fusermount3` sends the fd on.
const COMMFD_ENV: &str = "_FUSE_COMMFD";

/// `fusermount3` (or the older `fusermount`) on `PATH`, which users need to mount FUSE.
pub fn fusermount() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    ["fusermount3", "fusermount"].iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| rustix::fs::access(p, rustix::fs::Access::EXEC_OK).is_ok())
    })
}

/// Mount `mountpoint` through fusermount3 with `options` (comma-separated mount options);
/// returns the /dev/fuse fd of the new mount.
///
/// `fusermount3` adds `fd=`, `rootmode=`, `user_id=` and `group_id=` itself.
/// `auto_unmount` is refused: with it the helper stays alive to watch us,
/// and this function waits for it to exit. The returned fd is close-on-exec.
pub fn mount(mountpoint: &Path, options: &str) -> Result<OwnedFd> {
    let bin = fusermount().ok_or(Error::NoFusermount)?;
    mount_with(&bin, mountpoint, options)
}

/// [`mount`] with an explicit helper binary.
fn mount_with(bin: &Path, mountpoint: &Path, options: &str) -> Result<OwnedFd> {
    let what = || format!("mounting {}", mountpoint.display());
    if options.split(',').any(|o| o == "auto_unmount") {
        return Err(Error::invalid(
            "auto_unmount is not supported when mounting through fusermount3",
        ));
    }

    // Both ends close-on-exec first, then only the helper's end is made
    // inheritable, so ours never leaks into any child.
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| Error::io("creating a socket pair for fusermount3", e))?;
    rustix::io::fcntl_setfd(&theirs, FdFlags::empty())
        .map_err(|e| Error::io("creating a socket pair for fusermount3", e))?;

    let mut cmd = Command::new(bin);
    if !options.is_empty() {
        cmd.arg("-o").arg(options);
    }
    cmd.arg("--")
        .arg(mountpoint)
        .env(COMMFD_ENV, theirs.as_raw_fd().to_string())
        .stdin(Stdio::null());
    // `output` waits for the helper to exit: without auto_unmount it sends
    // the fd and exits, so the fd is already queued on our end by then.
    // Waiting for the exit rather than blocking in recvmsg means a copy of
    // `theirs` inherited by some other child spawned concurrently cannot
    // make us hang.
    let out = cmd.output();
    drop(theirs);
    let out = out.map_err(|e| Error::io(format!("running {}", bin.display()), e))?;

    let received = receive_fd(&ours).map_err(|e| Error::Fuse {
        what: what(),
        err: e.into(),
    })?;
    match received {
        Some(fd) if out.status.success() => Ok(fd),
        // A helper that sent an fd and then failed: the mount may not be
        // usable; dropping the fd aborts the connection.
        _ => Err(Error::Fuse {
            what: what(),
            err: std::io::Error::other(failure_message(bin, &out)),
        }),
    }
}

/// Take the fd `fusermount3` queued on `sock`, without blocking.
fn receive_fd(sock: &OwnedFd) -> rustix::io::Result<Option<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    loop {
        let mut iov = [IoSliceMut::new(&mut byte)];
        match rustix::net::recvmsg(
            sock,
            &mut iov,
            &mut control,
            RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(_) => break,
            Err(Errno::INTR) => continue,
            // Nothing queued and the other end still open somewhere.
            Err(Errno::AGAIN) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    // Keep the first fd; any others are closed when the iterator drops them.
    let mut fd = None;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = msg {
            for received in fds {
                if fd.is_none() {
                    fd = Some(received);
                }
            }
        }
    }
    Ok(fd)
}

/// One line saying why the helper did not deliver a mount.
fn failure_message(bin: &Path, out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if !said.is_empty() {
        return said.join("; ");
    }
    let name = bin.file_name().unwrap_or(bin.as_os_str()).to_string_lossy();
    if out.status.success() {
        format!("{name} exited without passing a /dev/fuse descriptor")
    } else {
        format!("{name} failed ({})", out.status)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn helper() -> Option<std::path::PathBuf> {
        let bin = fusermount();
        let ci = crate::skip::Prereq::CiInstalls;
        crate::skip::require(bin.is_some(), ci, "no fusermount3 on PATH (fuse3)");
        bin
    }

    /// Whether `dir` is a mount point of type `fstype` in this namespace.
    fn mounted_as(dir: &Path, fstype: &str) -> bool {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let dir = dir.to_str().unwrap();
        info.lines().any(|line| {
            let mut halves = line.splitn(2, " - ");
            let (Some(head), Some(tail)) = (halves.next(), halves.next()) else {
                return false;
            };
            head.split(' ').nth(4) == Some(dir) && tail.split(' ').next() == Some(fstype)
        })
    }

    #[test]
    fn missing_binary_is_an_error() {
        let err = mount_with(
            Path::new("/nonexistent/fusermount3"),
            Path::new("/tmp"),
            "ro",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/fusermount3"), "{msg}");
    }

    #[test]
    fn auto_unmount_is_refused() {
        let err =
            mount_with(Path::new("/bin/true"), Path::new("/tmp"), "ro,auto_unmount").unwrap_err();
        assert!(err.to_string().contains("auto_unmount"), "{err}");
    }

    #[test]
    fn helper_that_sends_nothing_is_an_error() {
        // Exits successfully without touching the socket.
        let err = mount_with(Path::new("/bin/true"), Path::new("/tmp"), "").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("without passing"), "{msg}");
    }

    #[test]
    fn bad_mountpoint_reports_fusermount3() {
        let Some(_) = helper() else { return };
        let err = mount(
            Path::new("/nonexistent/x"),
            "fsname=userblk,subtype=userblk",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/x"), "{msg}");
        assert!(msg.contains("fusermount"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn mounts_and_unmounts() {
        let Some(bin) = helper() else { return };
        let root = rustix::process::geteuid().is_root();
        let ci = crate::skip::Prereq::CiInstalls;
        if !crate::skip::require(root, ci, "mounting in a test needs root") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().canonicalize().unwrap();
        let fd = mount(
            &mnt,
            "fsname=userblk,subtype=userblk,default_permissions,noatime,nodev,nosuid,noexec,ro",
        )
        .unwrap();
        let flags = rustix::io::fcntl_getfd(&fd).unwrap();
        let is_mounted = mounted_as(&mnt, "fuse.userblk");
        // Closing the only /dev/fuse fd aborts the connection, so the
        // unmount needs no reply from a server.
        drop(fd);
        let out = Command::new(&bin).arg("-u").arg(&mnt).output().unwrap();
        if !out.status.success() {
            rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::DETACH).unwrap();
        }
        assert!(is_mounted, "{} is not a fuse.userblk mount", mnt.display());
        assert!(flags.contains(FdFlags::CLOEXEC));
        assert!(!mounted_as(&mnt, "fuse.userblk"));
    }
}
