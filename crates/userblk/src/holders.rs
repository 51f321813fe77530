//! Who holds a block device: where it or one of its partitions is mounted,
//! which stacked devices (device mapper, md) sit on it, and which processes
//! have it open. `del` refuses a device someone holds and names the holder.
//!
//! Read from `/proc/self/mountinfo` (and `/proc/1/mountinfo`, the host's
//! namespace), `/sys/dev/block/MAJ:MIN/{holders,*/partition}` and the
//! `/proc/PID/fd` links (the tables and links through one walk,
//! `open_files`, which `del -a` shares between its devices). A mount in
//! another namespace with no open file shows nowhere here: the kernel's
//! own check (ublk's TRY_STOP_DEV) catches it.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use rustix::fs::FileType;

use crate::loopdev::parse_mount_points;
use crate::open_files::{self, Snapshot};

/// One reason a block device cannot be stopped safely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// A filesystem on it is mounted.
    Mount {
        /// The device or a partition of it, e.g. `ublkb0p1`.
        dev: String,
        /// The mount point.
        at: PathBuf,
    },
    /// A stacked device is built on it.
    Stacked {
        /// The device or a partition of it.
        dev: String,
        /// The stacked device, e.g. `dm-0`.
        by: String,
    },
    /// A process has it open.
    Process {
        /// The device or a partition of it (or the FUSE file's name).
        dev: String,
        /// The process.
        pid: i32,
        /// Its command name.
        comm: String,
    },
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Mount { dev, at } => write!(f, "{dev} is mounted on {}", at.display()),
            Holder::Stacked { dev, by } => write!(f, "{dev} is held by {by}"),
            Holder::Process { dev, pid, comm } => write!(f, "{dev} is open by pid {pid} ({comm})"),
        }
    }
}

/// A block device or one of its partitions: its kernel name and number.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    name: String,
    major: u32,
    minor: u32,
}

/// Everyone holding the block device at `path` or one of its partitions,
/// other than process `ignore` (the caller's own daemon, say). Empty if
/// `path` is not a block device or nobody holds it.
pub fn of_block_device(path: &Path, ignore: Option<i32>) -> Vec<Holder> {
    let Ok(st) = rustix::fs::stat(path) else {
        return Vec::new();
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::BlockDevice {
        return Vec::new();
    }
    let (major, minor) = (rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let name = fs::canonicalize(&sys)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| path.display().to_string());
    let mut nodes = vec![(Node { name, major, minor }, sys.clone())];
    nodes.extend(partitions(&sys));
    let mut out = Vec::new();
    let walk = open_files::current();
    for (node, dir) in &nodes {
        let mut seen = BTreeSet::new();
        for table in walk.mount_tables() {
            for at in parse_mount_points(table, node.major, node.minor) {
                if seen.insert(at.clone()) {
                    out.push(Holder::Mount {
                        dev: node.name.clone(),
                        at,
                    });
                }
            }
        }
        for by in dir_names(&dir.join("holders")) {
            out.push(Holder::Stacked {
                dev: node.name.clone(),
                by,
            });
        }
    }
    let numbers: Vec<&Node> = nodes.iter().map(|(n, _)| n).collect();
    out.extend(openers(&walk, &numbers, ignore));
    out
}

/// The partitions of the device whose sysfs directory is `sys`: the
/// subdirectories with a `partition` file, with their `dev` numbers.
fn partitions(sys: &Path) -> Vec<(Node, PathBuf)> {
    let mut out = Vec::new();
    for name in dir_names(sys) {
        let dir = sys.join(&name);
        if !dir.join("partition").exists() {
            continue;
        }
        let Some((major, minor)) = fs::read_to_string(dir.join("dev"))
            .ok()
            .and_then(|d| parse_dev(&d))
        else {
            continue;
        };
        out.push((Node { name, major, minor }, dir));
    }
    out
}

/// `MAJ:MIN` as sysfs writes it (with a newline).
fn parse_dev(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

fn dir_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Processes in `walk` with one of `nodes` open (once per process and node).
fn openers(walk: &Snapshot, nodes: &[&Node], ignore: Option<i32>) -> Vec<Holder> {
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let mut out = Vec::new();
    for f in walk.files() {
        if f.pid == me || Some(f.pid) == ignore {
            continue;
        }
        let Some((major, minor)) = f.block else {
            continue;
        };
        if let Some(node) = nodes.iter().find(|n| n.major == major && n.minor == minor) {
            let holder = Holder::Process {
                dev: node.name.clone(),
                pid: f.pid,
                comm: comm(f.pid),
            };
            if !out.contains(&holder) {
                out.push(holder);
            }
        }
    }
    out
}

/// Processes other than `ignore` with the file at exactly `path` open (as
/// their fd links name it), as holders of `name`.
pub fn of_file(path: &Path, name: &str, ignore: Option<i32>) -> Vec<Holder> {
    let mut out = Vec::new();
    for f in open_files::current().files() {
        if Some(f.pid) == ignore || f.target != path {
            continue;
        }
        let holder = Holder::Process {
            dev: name.to_string(),
            pid: f.pid,
            comm: comm(f.pid),
        };
        if !out.contains(&holder) {
            out.push(holder);
        }
    }
    out
}

/// A process's command name, `?` if it is gone.
fn comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// One line naming every holder, for an error message.
pub fn describe(holders: &[Holder]) -> String {
    holders
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn holders_read_as_sentences() {
        let h = [
            Holder::Mount {
                dev: "ublkb0".into(),
                at: "/mnt/x".into(),
            },
            Holder::Process {
                dev: "ublkb0p1".into(),
                pid: 1234,
                comm: "fio".into(),
            },
            Holder::Stacked {
                dev: "loop3".into(),
                by: "dm-0".into(),
            },
        ];
        assert_eq!(
            describe(&h),
            "ublkb0 is mounted on /mnt/x; ublkb0p1 is open by pid 1234 (fio); loop3 is held by dm-0"
        );
    }

    #[test]
    fn sysfs_dev_numbers() {
        assert_eq!(parse_dev("259:3\n"), Some((259, 3)));
        assert_eq!(parse_dev("7:0"), Some((7, 0)));
        assert_eq!(parse_dev("garbage\n"), None);
        assert_eq!(parse_dev("1:x"), None);
    }

    #[test]
    fn partitions_are_found_in_a_sysfs_like_tree() {
        let dir = std::env::temp_dir().join(format!("userblk-holders-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let part = dir.join("ublkb0p1");
        fs::create_dir_all(&part).unwrap();
        fs::write(part.join("partition"), "1\n").unwrap();
        fs::write(part.join("dev"), "259:1\n").unwrap();
        // Not a partition: queue/, holders/, mq/ have no `partition` file.
        fs::create_dir_all(dir.join("queue")).unwrap();
        fs::create_dir_all(dir.join("holders")).unwrap();
        let found = partitions(&dir);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0].0,
            Node {
                name: "ublkb0p1".into(),
                major: 259,
                minor: 1
            }
        );
    }

    #[test]
    fn a_file_this_process_has_open_is_found() {
        let path = std::env::temp_dir().join(format!("userblk-holders-f-{}", std::process::id()));
        let file = fs::File::create(&path).unwrap();
        let me = rustix::process::getpid().as_raw_nonzero().get();
        let found = of_file(&path, "disk", None);
        let ignored = of_file(&path, "disk", Some(me));
        drop(file);
        fs::remove_file(&path).unwrap();
        assert!(found
            .iter()
            .any(|h| matches!(h, Holder::Process { pid, .. } if *pid == me)));
        assert!(ignored.is_empty());
    }

    #[test]
    fn a_regular_file_has_no_block_holders() {
        assert!(of_block_device(Path::new("/proc/self/status"), None).is_empty());
    }
}
