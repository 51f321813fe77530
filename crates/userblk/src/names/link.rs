//! The stable paths `/dev/userblk/NAME`: a symlink to a named device's node
//! (`/dev/ublkbN`, `/dev/loopN`, or the FUSE file when there is no loop
//! device). userblk makes and removes them itself, with or without udev;
//! where udev's rule (contrib/udev) makes the same link, both point at the
//! same node, so neither undoes the other.
//!
//! Users cannot write `/dev`: their links are under the state directory's
//! `dev/` instead.

use std::path::{Component, Path, PathBuf};

/// Where links go: `/dev/userblk` for root, `STATE_DIR/dev` for a user.
pub fn dir() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        PathBuf::from("/dev/userblk")
    } else {
        crate::state::state_dir().join("dev")
    }
}

/// The link of device name `name`.
pub fn path(name: &str) -> PathBuf {
    dir().join(name)
}

/// Where the link `dir/name` leads, lexically (`../ublkb0`, as udev writes
/// links, is `/dev/ublkb0`): the node may be gone already when `del` asks.
/// `None` when there is no symlink.
pub fn target(dir: &Path, name: &str) -> Option<PathBuf> {
    let to = std::fs::read_link(dir.join(name)).ok()?;
    Some(normalize(&dir.join(to)))
}

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// Make `dir/name` a symlink to `node` (absolute), replacing whatever link
/// was there in one step (a symlink under a temporary name, then a rename),
/// so the path never dangles nor is missing. One that already leads to
/// `node` (udev's) is left as it is.
pub fn create(dir: &Path, name: &str, node: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if target(dir, name).is_some_and(|t| t == normalize(node)) {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    // A name never starts with a dot, so this is no device's link.
    let tmp = dir.join(format!(
        ".{name}.tmp{}",
        rustix::process::getpid().as_raw_nonzero()
    ));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(node, &tmp)?;
    std::fs::rename(&tmp, dir.join(name)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Remove `dir/name` only if it is a symlink leading to `node`: another
/// device may have this name (and its link) by now. True if removed.
pub fn remove_if_points_at(dir: &Path, name: &str, node: &Path) -> std::io::Result<bool> {
    if target(dir, name).is_none_or(|t| t != normalize(node)) {
        return Ok(false);
    }
    match std::fs::remove_file(dir.join(name)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_link_is_made_replaced_and_removed_only_when_ours() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("userblk");
        let (a, b) = (tmp.path().join("loop3"), tmp.path().join("loop4"));
        create(&dir, "db", &a).unwrap();
        assert_eq!(std::fs::read_link(dir.join("db")).unwrap(), a);
        // Replaced in place (a stale link of a device gone without `del`).
        create(&dir, "db", &b).unwrap();
        assert_eq!(target(&dir, "db"), Some(b.clone()));
        assert!(!remove_if_points_at(&dir, "db", &a).unwrap());
        assert!(dir.join("db").symlink_metadata().is_ok());
        assert!(remove_if_points_at(&dir, "db", &b).unwrap());
        assert!(dir.join("db").symlink_metadata().is_err());
        assert!(!remove_if_points_at(&dir, "db", &b).unwrap());
        // No temporary names left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    }

    #[test]
    fn a_relative_link_like_udevs_is_the_same_link() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("userblk");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink("../ublkb0", dir.join("db")).unwrap();
        let node = tmp.path().join("ublkb0");
        assert_eq!(target(&dir, "db"), Some(node.clone()));
        // Left as udev made it.
        create(&dir, "db", &node).unwrap();
        assert_eq!(
            std::fs::read_link(dir.join("db")).unwrap(),
            Path::new("../ublkb0")
        );
        assert!(remove_if_points_at(&dir, "db", &node).unwrap());
    }

    #[test]
    fn a_file_that_is_not_a_link_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("db"), b"x").unwrap();
        assert_eq!(target(tmp.path(), "db"), None);
        assert!(!remove_if_points_at(tmp.path(), "db", &tmp.path().join("db")).unwrap());
        assert!(tmp.path().join("db").exists());
    }
}
