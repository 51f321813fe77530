//! Opening the overlay file: a new one, an existing one for the same base
//! (checked against it), or an unnamed temporary one.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{FallocateFlags, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use super::map::{self, Layout, Map, HEADER};
use crate::filters::FilterError;
use crate::io::open::{open_checked, Kinds};
use crate::target::Caps;

/// An open overlay.
#[derive(Debug)]
pub(super) struct Overlay {
    pub fd: OwnedFd,
    pub layout: Layout,
    pub map: Map,
    /// Where it lives (`None`: an unnamed temporary file).
    pub path: Option<PathBuf>,
    /// An existing overlay was opened (rather than a new one made).
    pub reopened: bool,
    /// Holes can be punched in it (for discard and write-zeroes).
    pub can_punch: bool,
}

fn io(what: String) -> impl FnOnce(Errno) -> FilterError {
    FilterError::io("cow", what)
}

fn invalid(msg: String) -> FilterError {
    FilterError::Invalid { filter: "cow", msg }
}

/// Where unnamed overlays go: a disk-backed directory if there is one.
fn temp_dir() -> PathBuf {
    let var_tmp = Path::new("/var/tmp");
    if var_tmp.is_dir() {
        var_tmp.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

impl Overlay {
    /// Open or create the overlay at `path` (or an unnamed one) for a base
    /// with `caps`; `cluster` is the size asked for (`None`: the file's,
    /// or `default` for a new file).
    pub(super) fn open(
        path: Option<&Path>,
        cluster: Option<u32>,
        default: u32,
        caps: &Caps,
        identity: &str,
    ) -> Result<Overlay, FilterError> {
        let Some(path) = path else {
            let layout = Layout::new(
                cluster.unwrap_or(default),
                caps.logical_block_size,
                caps.size,
                identity,
            );
            let fd = unnamed()?;
            return Self::create(fd, layout, None);
        };
        let shown = path.display().to_string();
        let path = crate::filters::absolute("cow", path, shown.clone())?;
        let existed = path.exists();
        let fd = open_checked(
            &path,
            OFlags::RDWR | OFlags::CREATE,
            Mode::RUSR | Mode::WUSR,
            Kinds::Regular,
        )
        .map_err(FilterError::io("cow", format!("opening {shown}")))?;
        let fail = |e: FilterError| {
            if !existed {
                let _ = std::fs::remove_file(&path);
            }
            e
        };
        let st = rustix::fs::fstat(&fd).map_err(io(format!("stat {shown}")))?;
        match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => {
                return Err(invalid(format!(
                    "{shown}: the overlay is in use by another process"
                )))
            }
            Err(e) => return Err(fail(io(format!("locking {shown}"))(e))),
        }
        if st.st_size == 0 {
            let layout = Layout::new(
                cluster.unwrap_or(default),
                caps.logical_block_size,
                caps.size,
                identity,
            );
            let ov = Self::create(fd, layout, Some(path.clone())).map_err(fail)?;
            sync_dir(&path);
            return Ok(ov);
        }
        Self::reopen(fd, &path, cluster, caps, identity)
    }

    /// Check an existing overlay against the base and load its map.
    fn reopen(
        fd: OwnedFd,
        path: &Path,
        cluster: Option<u32>,
        caps: &Caps,
        identity: &str,
    ) -> Result<Overlay, FilterError> {
        let shown = path.display();
        let mut header = vec![0u8; map::HEADER_BYTES];
        match map::read_exact(fd.as_fd(), &mut header, 0) {
            Ok(()) => {}
            Err(Errno::IO) => header.clear(), // shorter than a header
            Err(e) => return Err(io(format!("reading {shown}"))(e)),
        }
        let layout = Layout::decode(&header)
            .map_err(|msg| invalid(format!("{shown}: {msg}; refusing to use it as an overlay")))?;
        if layout.base_size != caps.size {
            return Err(invalid(format!(
                "{shown}: the overlay is for a base of {} bytes, but this base has {} bytes",
                layout.base_size, caps.size
            )));
        }
        if let Some(c) = cluster.filter(|&c| c != layout.cluster) {
            return Err(invalid(format!(
                "{shown}: the overlay has {} clusters, not cluster={} (leave cluster= out to use the file's)",
                crate::size::format(layout.cluster.into()),
                crate::size::format(c.into())
            )));
        }
        if layout.cluster < caps.logical_block_size {
            return Err(invalid(format!(
                "{shown}: the overlay's {}-byte clusters are smaller than the base's {}-byte blocks",
                layout.cluster, caps.logical_block_size
            )));
        }
        let st = rustix::fs::fstat(&fd).map_err(io(format!("stat {shown}")))?;
        if u64::try_from(st.st_size).unwrap_or(0) < layout.file_len() {
            return Err(invalid(format!(
                "{shown}: the overlay is truncated ({} bytes, needs {})",
                st.st_size,
                layout.file_len()
            )));
        }
        if layout.identity != identity {
            tracing::warn!(
                "cow: {shown} was made over {}; the base is now {identity} (same size, so it is used)",
                layout.identity
            );
        }
        let map =
            Map::load(fd.as_fd(), &layout).map_err(io(format!("reading the map of {shown}")))?;
        tracing::info!(
            "cow: reopened {shown}: {} of {} clusters of {} in the overlay",
            map.count(),
            layout.clusters(),
            crate::size::format(layout.cluster.into())
        );
        let can_punch = can_punch(&fd, &layout);
        Ok(Overlay {
            fd,
            layout,
            map,
            path: Some(path.to_path_buf()),
            reopened: true,
            can_punch,
        })
    }

    /// Write a new overlay's header and size it; durable before use.
    fn create(fd: OwnedFd, layout: Layout, path: Option<PathBuf>) -> Result<Overlay, FilterError> {
        let shown = path
            .as_ref()
            .map_or_else(|| "the overlay".to_string(), |p| p.display().to_string());
        if layout.clusters() > map::MAX_CLUSTERS {
            return Err(invalid(format!(
                "{} bytes in {}-byte clusters need too large a map; use a larger cluster=",
                layout.base_size, layout.cluster
            )));
        }
        let w = io(format!("writing {shown}"));
        (|| {
            rustix::fs::ftruncate(&fd, 0)?;
            map::write_all(fd.as_fd(), &layout.encode(), 0)?;
            rustix::fs::ftruncate(&fd, layout.file_len())?;
            rustix::fs::fdatasync(&fd)
        })()
        .map_err(w)?;
        debug_assert_eq!(HEADER, 4096);
        let can_punch = can_punch(&fd, &layout);
        Ok(Overlay {
            map: Map::new(layout.clusters()),
            fd,
            layout,
            path,
            reopened: false,
            can_punch,
        })
    }
}

/// An unnamed file for a throwaway overlay: gone when the daemon is.
fn unnamed() -> Result<OwnedFd, FilterError> {
    let dir = temp_dir();
    let mode = Mode::RUSR | Mode::WUSR;
    match rustix::fs::open(&dir, OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC, mode) {
        Ok(fd) => return Ok(fd),
        Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {}
        Err(e) => return Err(io(format!("making an overlay in {}", dir.display()))(e)),
    }
    // No O_TMPFILE here: a named file, unlinked at once.
    let name = dir.join(format!(
        "userblk-cow-{}-{:x}",
        std::process::id(),
        rand_tag()
    ));
    let fd = rustix::fs::open(
        &name,
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
        mode,
    )
    .map_err(io(format!("making {}", name.display())))?;
    let _ = std::fs::remove_file(&name);
    Ok(fd)
}

fn rand_tag() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()))
}

/// Whether holes can be punched: punch past the end (a no-op that fails
/// only where unsupported).
fn can_punch(fd: &OwnedFd, layout: &Layout) -> bool {
    rustix::fs::fallocate(
        fd,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        layout.file_len().next_multiple_of(4096) + 4096,
        4096,
    )
    .is_ok()
}

/// Make a new file's name durable (best effort).
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            let _ = rustix::fs::fsync(&d);
        }
    }
}
