//! Device names (`add --name NAME`): the rule a name follows, the claim
//! that gives one name to one device per state directory, and which device
//! has a name. The `/dev/userblk/NAME` links are [`link`]'s.
//!
//! A device's name is in its saved state ([`DeviceState::name`]), which
//! outlives a dead daemon until `del`, as its id does. A daemon saves its
//! state only once it has a device, so until then it holds the name with a
//! [`Claim`]: a file `names/NAME` in the state directory with its pid (and,
//! for udev, the device id once the kernel gave one). Both are checked, and
//! a claim taken, under the state directory's lock, so of two `add`s of
//! one name exactly one wins.

pub mod link;

use std::path::{Path, PathBuf};

use crate::state::{self, DeviceState, StateLock};

/// The longest name.
pub const MAX_LEN: usize = 64;

/// The rule a name follows, as said in errors.
pub const RULE: &str =
    "a name is 1 to 64 characters of A-Z a-z 0-9 . _ - and does not start with . or -";

/// What can go wrong with a name.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    /// Not a valid name.
    #[error("{0:?} is not a valid device name: {RULE}")]
    Invalid(String),
    /// Another device has it.
    #[error("the name {name} is in use by device {id}")]
    InUse {
        /// The name.
        name: String,
        /// The device that has it.
        id: u32,
    },
    /// Another daemon, whose device is not live yet, has claimed it.
    #[error("the name {name} is in use by a device being added (daemon pid {pid}{})",
        .id.map(|i| format!(", device {i}")).unwrap_or_default())]
    Claimed {
        /// The name.
        name: String,
        /// The claiming daemon.
        pid: i32,
        /// Its device, if it has one yet.
        id: Option<u32>,
    },
    /// A claim file could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The state directory or its lock.
    #[error(transparent)]
    State(#[from] crate::Error),
}

/// Check `name` against [`RULE`]. Names become file names (claims, links)
/// and udev symlinks, so no `/`, no spaces, no `.`/`..`.
pub fn validate(name: &str) -> Result<(), NameError> {
    let ok = (1..=MAX_LEN).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(NameError::Invalid(name.into()))
    }
}

/// The saved state of the device named `name`, if one has it.
pub fn lookup(name: &str) -> Option<DeviceState> {
    lookup_in(&state::state_dir(), name)
}

/// The name of device `id`: from its saved state, or, while its daemon
/// has not saved one yet, from that daemon's claim (udev asks early).
pub fn name_of(id: u32) -> Option<String> {
    name_of_in(&state::state_dir(), id)
}

fn lookup_in(dir: &Path, name: &str) -> Option<DeviceState> {
    states_in(dir).find(|st| st.name.as_deref() == Some(name))
}

fn name_of_in(dir: &Path, id: u32) -> Option<String> {
    if let Some(st) = states_in(dir).find(|st| st.id == id) {
        return st.name;
    }
    let entries = std::fs::read_dir(claims_dir(dir)).ok()?;
    entries.flatten().find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        let p = Pending::read(&e.path())?;
        (p.id == Some(id) && validate(&name).is_ok() && state::pid_is_userblk(p.pid))
            .then_some(name)
    })
}

/// Every saved device state in `dir` (files `ID.json`).
fn states_in(dir: &Path) -> impl Iterator<Item = DeviceState> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
}

fn claims_dir(dir: &Path) -> PathBuf {
    dir.join("names")
}

/// What a claim file holds.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Pending {
    pid: i32,
    #[serde(default)]
    id: Option<u32>,
}

impl Pending {
    fn read(path: &Path) -> Option<Pending> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// Written whole (temporary file, then rename): udev may read it any time.
    fn write(&self, path: &Path) -> Result<(), NameError> {
        let io = |source| NameError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        // Named as no device can be: a name never starts with a dot.
        let file = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let tmp = path.with_file_name(format!(".{}.tmp{}", file.unwrap_or_default(), self.pid));
        let body = serde_json::to_vec(self).map_err(|e| io(e.into()))?;
        std::fs::write(&tmp, body).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

/// Who else holds `name` in `dir`, if anyone: a saved state (but that of
/// device `takeover`, which a recovering daemon takes over with its name),
/// or a live daemon's claim (but ours).
fn holder(dir: &Path, name: &str, takeover: Option<u32>) -> Option<NameError> {
    if let Some(st) = lookup_in(dir, name).filter(|st| Some(st.id) != takeover) {
        return Some(NameError::InUse {
            name: name.into(),
            id: st.id,
        });
    }
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let p = Pending::read(&claims_dir(dir).join(name))?;
    (p.pid != me && state::pid_is_userblk(p.pid)).then(|| NameError::Claimed {
        name: name.into(),
        pid: p.pid,
        id: p.id,
    })
}

/// A daemon's hold on a name until its saved state carries it; dropping
/// it removes the claim file (if still ours).
#[derive(Debug)]
pub struct Claim {
    path: PathBuf,
    pid: i32,
}

impl Claim {
    /// Claim `name` for this process. `takeover`: the device a recovering
    /// (or upgrading) daemon serves, whose saved state has the name already.
    pub fn take(name: &str, takeover: Option<u32>) -> Result<Claim, NameError> {
        Self::take_in(&state::ensure_dir()?, name, takeover)
    }

    fn take_in(dir: &Path, name: &str, takeover: Option<u32>) -> Result<Claim, NameError> {
        validate(name)?;
        let _lock = StateLock::take(dir)?;
        if let Some(e) = holder(dir, name, takeover) {
            return Err(e);
        }
        let claim = Claim {
            path: claims_dir(dir).join(name),
            pid: rustix::process::getpid().as_raw_nonzero().get(),
        };
        Pending {
            pid: claim.pid,
            id: None,
        }
        .write(&claim.path)?;
        Ok(claim)
    }

    /// The kernel gave the device id `id`: recorded so that udev, told of
    /// the device before the daemon saves its state, finds its name.
    pub fn set_id(&self, id: u32) -> Result<(), NameError> {
        Pending {
            pid: self.pid,
            id: Some(id),
        }
        .write(&self.path)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // A dead claimer's file may have been taken over since.
        if Pending::read(&self.path).is_some_and(|p| p.pid == self.pid) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Remove the link `name` → `node` if no device holds the name any more
/// (its state is gone and no live daemon claims it). Under the lock, so
/// that a new device with this name cannot be linked in between. True if
/// a link was removed.
pub fn release_link(name: &str, node: &Path) -> Result<bool, NameError> {
    release_link_in(&state::state_dir(), &link::dir(), name, node)
}

fn release_link_in(dir: &Path, links: &Path, name: &str, node: &Path) -> Result<bool, NameError> {
    if validate(name).is_err() || !dir.is_dir() {
        return Ok(false);
    }
    let _lock = StateLock::take(dir)?;
    if holder(dir, name, None).is_some() {
        return Ok(false);
    }
    // A dead claimer's leftover file goes with it.
    let _ = std::fs::remove_file(claims_dir(dir).join(name));
    link::remove_if_points_at(links, name, node).map_err(|source| NameError::Io {
        path: links.join(name),
        source,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        for good in ["a", "db-1", "Vol_2.img", "9", &"x".repeat(64), "a..b"] {
            assert!(validate(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            &"x".repeat(65),
            ".hidden",
            "-n",
            "a/b",
            "..",
            "a b",
            "é",
            "a\n",
            "x:y",
        ] {
            let e = validate(bad).unwrap_err().to_string();
            assert!(e.contains("1 to 64 characters"), "{bad:?}: {e}");
        }
    }

    fn save(dir: &Path, id: u32, name: Option<&str>) {
        let mut st = DeviceState::new(id, "fuse");
        st.name = name.map(Into::into);
        std::fs::write(
            dir.join(format!("{id}.json")),
            serde_json::to_vec(&st).unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn a_saved_name_is_taken_but_by_its_own_device() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), 3, Some("db"));
        save(dir.path(), 4, None);
        let e = Claim::take_in(dir.path(), "db", None).unwrap_err();
        assert!(
            matches!(&e, NameError::InUse { id: 3, .. }),
            "{e}: want in use by 3"
        );
        assert_eq!(e.to_string(), "the name db is in use by device 3");
        // A recovering daemon of device 3 keeps it.
        let c = Claim::take_in(dir.path(), "db", Some(3)).unwrap();
        drop(c);
        assert!(Claim::take_in(dir.path(), "db", Some(4)).is_err());
        assert_eq!(lookup_in(dir.path(), "db").map(|s| s.id), Some(3));
        assert_eq!(lookup_in(dir.path(), "nope").map(|s| s.id), None);
        assert_eq!(name_of_in(dir.path(), 3).as_deref(), Some("db"));
        assert_eq!(name_of_in(dir.path(), 4), None);
    }

    #[test]
    fn a_claim_names_its_device_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let c = Claim::take_in(dir.path(), "web", None).unwrap();
        let file = claims_dir(dir.path()).join("web");
        assert!(file.exists());
        // Our own claim is not someone else's: taking it again is fine.
        assert!(holder(dir.path(), "web", None).is_none());
        c.set_id(7).unwrap();
        assert_eq!(Pending::read(&file).unwrap().id, Some(7));
        drop(c);
        assert!(!file.exists());
    }

    #[test]
    fn a_dead_daemons_claim_is_no_claim() {
        let dir = tempfile::tempdir().unwrap();
        // Not a userblk process: as good as dead.
        let other = Pending {
            pid: i32::MAX - 1,
            id: Some(2),
        };
        other.write(&claims_dir(dir.path()).join("x")).unwrap();
        assert!(holder(dir.path(), "x", None).is_none());
        assert_eq!(name_of_in(dir.path(), 2), None);
        let c = Claim::take_in(dir.path(), "x", None).unwrap();
        assert_eq!(
            Pending::read(&claims_dir(dir.path()).join("x"))
                .unwrap()
                .pid,
            c.pid
        );
    }

    #[test]
    fn a_link_is_released_only_with_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let links = dir.path().join("dev");
        let node = dir.path().join("node");
        std::fs::write(&node, b"").unwrap();
        link::create(&links, "db", &node).unwrap();
        save(dir.path(), 1, Some("db"));
        // Device 1 still has it (a dead daemon's device, until `del`).
        assert!(!release_link_in(dir.path(), &links, "db", &node).unwrap());
        assert!(links.join("db").exists());
        std::fs::remove_file(dir.path().join("1.json")).unwrap();
        let elsewhere = dir.path().join("other");
        assert!(!release_link_in(dir.path(), &links, "db", &elsewhere).unwrap());
        assert!(release_link_in(dir.path(), &links, "db", &node).unwrap());
        assert!(std::fs::symlink_metadata(links.join("db")).is_err());
    }
}
