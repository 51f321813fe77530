//! Abort a FUSE mount's connection through fusectl, the way out when its
//! server is stopped or wedged: every waiting and later request then fails
//! with `ENOTCONN` instead of waiting for an answer that never comes.
//!
//! The connection's number is the minor of the mount's `st_dev`, read from
//! `/proc/self/mountinfo` rather than by `stat`, which could itself wait on
//! the server.

use std::path::{Path, PathBuf};

use rustix::io::Errno;

use crate::{Error, Result};

/// Where fusectl is mounted by convention.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Abort the connection of the FUSE file system mounted at `mountpoint`,
/// mounting fusectl first if it is not. Ok(false) if nothing FUSE is mounted there.
pub fn abort(mountpoint: &Path) -> Result<bool> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::path("/proc/self/mountinfo", e))?;
    let Some(minor) = fuse_minor(&mountinfo, mountpoint) else {
        return Ok(false);
    };
    let dir = PathBuf::from(FUSECTL).join(minor.to_string());
    if !dir.exists() {
        match rustix::mount::mount(
            "fusectl",
            FUSECTL,
            "fusectl",
            rustix::mount::MountFlags::empty(),
            None,
        ) {
            // EBUSY: mounted already, just not showing this connection.
            Ok(()) | Err(Errno::BUSY) => {}
            Err(e) => return Err(Error::io(format!("mounting fusectl on {FUSECTL}"), e)),
        }
    }
    let abort = dir.join("abort");
    std::fs::write(&abort, b"1").map_err(|e| Error::path(abort, e))?;
    Ok(true)
}

/// The device minor of the last FUSE mount on `mountpoint` in a mountinfo table.
fn fuse_minor(mountinfo: &str, mountpoint: &Path) -> Option<u32> {
    let want = mountpoint.to_str()?;
    mountinfo
        .lines()
        .rev()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let fstype = fields.get(sep + 1)?;
            let is_fuse = *fstype == "fuse" || fstype.starts_with("fuse.");
            (is_fuse && unescape(fields.get(4)?) == want)
                .then(|| fields.get(2)?.split_once(':')?.1.parse().ok())
                .flatten()
        })
        .next()
}

/// Undo mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let b = field.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (b[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 0:21 / / rw - ext4 /dev/sda1 rw
40 22 0:52 / /var/lib/userblk/fuse-0 rw,nosuid - fuse.userblk userblk rw
41 22 0:53 / /mnt/my\\040disk rw - fuse userblk rw
42 22 0:54 / /mnt/other rw - tmpfs tmpfs rw
";

    #[test]
    fn finds_the_minor_of_a_fuse_mount() {
        assert_eq!(
            fuse_minor(TABLE, Path::new("/var/lib/userblk/fuse-0")),
            Some(52)
        );
        assert_eq!(fuse_minor(TABLE, Path::new("/mnt/my disk")), Some(53));
    }

    #[test]
    fn ignores_other_file_systems_and_paths() {
        assert_eq!(fuse_minor(TABLE, Path::new("/mnt/other")), None);
        assert_eq!(fuse_minor(TABLE, Path::new("/mnt")), None);
    }
}
