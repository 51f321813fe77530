//! Every process's open files, from one walk of the `/proc/PID/fd` links,
//! and the mount tables: what the holder checks (`holders.rs`) look
//! through. A check walks `/proc` anew, unless [`share`] is on: then every
//! check that starts within a short while of a walk uses that walk. `del -a`
//! turns it on, since a walk per device made deleting N devices N walks
//! over N daemons' descriptors (256 FUSE devices: 13 s).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustix::fs::FileType;

/// The mount tables a holder check reads: ours, and the host's (pid 1's).
const MOUNT_TABLES: [&str; 2] = ["/proc/self/mountinfo", "/proc/1/mountinfo"];

/// An open file of some process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OpenFile {
    pub pid: i32,
    /// What its fd link names.
    pub target: PathBuf,
    /// The device number, for a block device node.
    pub block: Option<(u32, u32)>,
}

/// One walk of every process's open files, with the mount tables read then.
#[derive(Debug)]
pub struct Snapshot {
    taken: Instant,
    files: Vec<OpenFile>,
    mount_tables: Vec<String>,
}

impl Snapshot {
    /// Walk `/proc` now. Only files named by an absolute path are kept (no
    /// sockets, pipes or anonymous inodes), and only `/dev/` nodes are
    /// stat'ed: following a link into a FUSE file of a stuck daemon could block.
    pub fn take() -> Snapshot {
        let mut files = Vec::new();
        for_each_fd_link(|pid, link, target| {
            if !target.is_absolute() {
                return;
            }
            let block = if target.starts_with("/dev/") {
                block_number(link)
            } else {
                None
            };
            files.push(OpenFile {
                pid,
                target: target.to_path_buf(),
                block,
            });
        });
        let mount_tables = MOUNT_TABLES
            .iter()
            .filter_map(|t| fs::read_to_string(t).ok())
            .collect();
        Snapshot {
            taken: Instant::now(),
            files,
            mount_tables,
        }
    }

    /// Every open file found.
    pub(crate) fn files(&self) -> &[OpenFile] {
        &self.files
    }

    /// The mount tables (`mountinfo` text) that could be read.
    pub(crate) fn mount_tables(&self) -> &[String] {
        &self.mount_tables
    }
}

/// The device number of the block device an fd `link` leads to, if it does.
fn block_number(link: &Path) -> Option<(u32, u32)> {
    let st = rustix::fs::stat(link).ok()?;
    (FileType::from_raw_mode(st.st_mode) == FileType::BlockDevice)
        .then(|| (rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev)))
}

/// Call `f(pid, link, target)` for every readable `/proc/PID/fd/N` link.
fn for_each_fd_link(mut f: impl FnMut(i32, &Path, &Path)) {
    let Ok(procs) = fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let link = fd.path();
            if let Ok(target) = fs::read_link(&link) {
                f(pid, &link, &target);
            }
        }
    }
}

/// The last walk, handed out while it is younger than `max_age`.
#[derive(Debug)]
struct Cache {
    max_age: Duration,
    last: Option<Arc<Snapshot>>,
}

impl Cache {
    fn get(&mut self, take: impl FnOnce() -> Snapshot) -> Arc<Snapshot> {
        match &self.last {
            Some(s) if s.taken.elapsed() <= self.max_age => Arc::clone(s),
            _ => {
                let fresh = Arc::new(take());
                self.last = Some(Arc::clone(&fresh));
                fresh
            }
        }
    }
}

/// The shared walks, while some [`Sharing`] lives (and how many do).
static SHARED: Mutex<Option<(Cache, usize)>> = Mutex::new(None);

/// Holder checks share walks while this lives; see [`share`].
#[derive(Debug)]
#[must_use = "walks are shared only while the guard lives"]
pub struct Sharing(());

/// From now until the returned guard is dropped, holder checks on every
/// thread share one walk of `/proc` while it is younger than `max_age`,
/// instead of walking it each. A holder that came since the walk is seen
/// only by a check that starts after `max_age`, so keep it short.
pub fn share(max_age: Duration) -> Sharing {
    let mut shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
    match shared.as_mut() {
        Some((_, users)) => *users += 1,
        None => {
            *shared = Some((
                Cache {
                    max_age,
                    last: None,
                },
                1,
            ))
        }
    }
    Sharing(())
}

impl Drop for Sharing {
    fn drop(&mut self) {
        let mut shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, users)) = shared.as_mut() {
            *users -= 1;
            if *users == 0 {
                *shared = None;
            }
        }
    }
}

/// The walk a holder check looks through: the shared one where [`share`]
/// is on (walked here if it is too old; the other checks wait for it rather
/// than walk too), else a new one.
pub(crate) fn current() -> Arc<Snapshot> {
    let mut shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
    match shared.as_mut() {
        Some((cache, _)) => cache.get(Snapshot::take),
        None => {
            drop(shared);
            Arc::new(Snapshot::take())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn empty() -> Snapshot {
        Snapshot {
            taken: Instant::now(),
            files: Vec::new(),
            mount_tables: Vec::new(),
        }
    }

    #[test]
    fn a_young_walk_is_shared_and_an_old_one_is_replaced() {
        let mut cache = Cache {
            max_age: Duration::from_millis(200),
            last: None,
        };
        let mut walks = 0;
        let first = cache.get(|| {
            walks += 1;
            empty()
        });
        let again = cache.get(|| {
            walks += 1;
            empty()
        });
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(walks, 1);
        std::thread::sleep(Duration::from_millis(250));
        let later = cache.get(|| {
            walks += 1;
            empty()
        });
        assert!(!Arc::ptr_eq(&first, &later));
        assert_eq!(walks, 2);
    }

    #[test]
    fn a_walk_finds_a_file_this_process_has_open() {
        let path = std::env::temp_dir().join(format!("userblk-open-files-{}", std::process::id()));
        let file = fs::File::create(&path).unwrap();
        let me = rustix::process::getpid().as_raw_nonzero().get();
        let walk = Snapshot::take();
        drop(file);
        fs::remove_file(&path).unwrap();
        assert!(walk
            .files()
            .iter()
            .any(|f| f.pid == me && f.target == path && f.block.is_none()));
        assert!(!walk.mount_tables().is_empty());
    }
}
