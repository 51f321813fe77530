//! Mount a target as `MOUNTPOINT/disk`, serve it on several threads, unmount it.
//!
//! ```no_run
//! use std::sync::Arc;
//! use userblk::fuse::{FuseDisk, FuseOptions};
//! use userblk::targets::MemTarget;
//!
//! let target = Arc::new(MemTarget::new(1 << 30)?);
//! let opts = FuseOptions::new("/mnt/disk-dir");
//! let disk = FuseDisk::mount(target, &opts, |ended| eprintln!("session over: {ended:?}"))?;
//! println!("serving {}", disk.file().display());
//! disk.unmount()?;
//! # Ok::<(), userblk::Error>(())
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use fuser::{Config, MountOption, Session, SessionACL};
use rustix::io::Errno;

use super::export::{Counters, DiskFs, DISK_NAME};
use super::fusermount::fusermount;
use crate::target::Target;
use crate::{Error, Result};

/// The most serving threads a FUSE disk takes. Each has its own
/// `/dev/fuse` clone, ring and request buffers (the buffers cost memory as
/// requests fill them, up to about twice the largest request): past a few
/// per CPU they only cost memory, as the kernel hands requests to whichever
/// is free.
pub const MAX_THREADS: usize = 64;

/// The stack of the thread that runs a session: it only starts the
/// serving threads and waits for them.
const SESSION_STACK: usize = 256 << 10;

/// How to export a target over FUSE.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// An existing directory to mount on; the device is the file `disk` inside.
    pub mountpoint: PathBuf,
    /// Threads serving FUSE requests, each with its own `/dev/fuse` clone and ring.
    pub threads: usize,
    /// Largest request passed to the target in one piece, in bytes.
    pub buf_bytes: u32,
    /// Let other users open the file (for users, needs `user_allow_other` in /etc/fuse.conf).
    pub allow_other: bool,
}

impl FuseOptions {
    /// Defaults: 4 threads, 512 KiB requests, only the mounting user has access.
    pub fn new(mountpoint: impl Into<PathBuf>) -> Self {
        FuseOptions {
            mountpoint: mountpoint.into(),
            threads: 4,
            buf_bytes: 512 << 10,
            allow_other: false,
        }
    }
}

/// How an unmount went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// Gone; the serving threads end now.
    Clean,
    /// Something still had the file open: the mount was detached lazily and
    /// is served until the last user closes it.
    Lazy,
    /// It was not mounted.
    NotMounted,
}

/// A target served as a file on a FUSE mount.
#[derive(Debug)]
pub struct FuseDisk {
    mountpoint: PathBuf,
    file: PathBuf,
    counters: Arc<Counters>,
    /// Tells the kernel what changed behind its back (a resize).
    notifier: fuser::Notifier,
}

impl FuseDisk {
    /// Check the mount point, mount, and start serving on `opts.threads`
    /// threads. `on_end` runs on another thread when the session is over
    /// (after an unmount, by us or anyone else).
    pub fn mount(
        target: Arc<dyn Target>,
        opts: &FuseOptions,
        on_end: impl FnOnce(std::io::Result<()>) + Send + 'static,
    ) -> Result<FuseDisk> {
        check_threads(opts.threads)?;
        check_fuse_available()?;
        // Each serving thread's receive buffer (fuser's, 16 MiB) must cost
        // only what the kernel writes into it, not all of it.
        crate::sys::map_large_allocations(1 << 20);
        let mountpoint = check_mountpoint(&opts.mountpoint)?;
        let counters = Arc::new(Counters::default());
        let fs = DiskFs::new(target, opts.buf_bytes, Arc::clone(&counters))?;
        let mut options = vec![
            MountOption::FSName("userblk".into()),
            MountOption::Subtype("userblk".into()),
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        let read_only = fs.caps().read_only;
        if read_only {
            options.push(MountOption::RO);
        }
        let mut config = Config::default();
        config.acl = if opts.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        config.n_threads = Some(opts.threads.max(1));
        config.clone_fd = true;
        let mount_err = |err| Error::Fuse {
            what: format!("mounting on {}", mountpoint.display()),
            err,
        };
        let session = if rustix::process::geteuid().is_root() {
            config.mount_options = options;
            Session::new(fs, &mountpoint, &config).map_err(mount_err)?
        } else {
            // Users mount through fusermount3 ourselves: the library's own
            // path opens /dev/fuse first and hides the helper's message.
            let mut o = String::from(
                "fsname=userblk,subtype=userblk,default_permissions,noatime,nodev,nosuid,noexec",
            );
            if read_only {
                o += ",ro";
            }
            if opts.allow_other {
                o += ",allow_other";
            }
            let fd = super::fusermount::mount(&mountpoint, &o)?;
            Session::from_fd(fs, fd, config.acl, config).map_err(|e| {
                let _ = unmount(&mountpoint);
                mount_err(e)
            })?
        };
        let notifier = session.notifier();
        // One thread runs the session (it starts the serving threads and
        // waits for them) and then reports its end: fuser's own `spawn`
        // would take one thread for each.
        let spawned = std::thread::Builder::new()
            .name("fuse-session".into())
            .stack_size(SESSION_STACK)
            .spawn(move || on_end(session.run()));
        if let Err(e) = spawned {
            let _ = unmount(&mountpoint);
            return Err(Error::Fuse {
                what: "starting the FUSE threads".into(),
                err: e,
            });
        }
        Ok(FuseDisk {
            file: mountpoint.join(DISK_NAME),
            mountpoint,
            counters,
            notifier,
        })
    }

    /// What to call once the target's size changed: it makes the kernel
    /// forget the file's attributes, so that the next `stat` (and a loop
    /// device's LOOP_SET_CAPACITY after it) sees the new size.
    pub fn size_changed(&self) -> impl Fn() -> Result<()> + Send + Sync + 'static {
        let notifier = self.notifier.clone();
        let file = self.file.clone();
        // A negative offset: the attributes only, no page cache.
        move || {
            notifier
                .inval_inode(fuser::INodeNo(super::export::DISK_INODE), -1, 0)
                .map_err(|err| Error::Fuse {
                    what: format!("telling the kernel the new size of {}", file.display()),
                    err,
                })
        }
    }

    /// The file that is the device.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Operation counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Unmount; see [`unmount`].
    pub fn unmount(&self) -> Result<Unmounted> {
        unmount(&self.mountpoint)
    }
}

/// Unmount a userblk FUSE mount. A busy mount is detached lazily (see
/// [`Unmounted::Lazy`]) rather than left to hang or fail. As root this is
/// `umount2`; users go through `fusermount3 -u`.
pub fn unmount(mountpoint: &Path) -> Result<Unmounted> {
    if !is_mount_root(mountpoint) {
        return Ok(Unmounted::NotMounted);
    }
    if rustix::process::geteuid().is_root() {
        use rustix::mount::UnmountFlags;
        match rustix::mount::unmount(mountpoint, UnmountFlags::empty()) {
            Ok(()) => Ok(Unmounted::Clean),
            Err(Errno::BUSY) => rustix::mount::unmount(mountpoint, UnmountFlags::DETACH)
                .map(|()| Unmounted::Lazy)
                .map_err(|e| Error::io(format!("unmounting {}", mountpoint.display()), e)),
            Err(Errno::INVAL) => Ok(Unmounted::NotMounted),
            Err(e) => Err(Error::io(format!("unmounting {}", mountpoint.display()), e)),
        }
    } else {
        let bin = fusermount().ok_or(Error::NoFusermount)?;
        let run = |lazy: bool| {
            let mut cmd = Command::new(&bin);
            cmd.arg("-u").arg("-q");
            if lazy {
                cmd.arg("-z");
            }
            cmd.arg(mountpoint)
                .output()
                .map_err(|e| Error::io(format!("running {}", bin.display()), e))
        };
        let out = run(false)?;
        if out.status.success() {
            return Ok(Unmounted::Clean);
        }
        let out = run(true)?;
        if out.status.success() {
            Ok(Unmounted::Lazy)
        } else {
            Err(Error::Invalid(format!(
                "{} -u {}: {}",
                bin.display(),
                mountpoint.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
}

/// Whether this kernel and user can mount FUSE at all: root opens
/// `/dev/fuse` itself; users need `fusermount3`, which opens it for them.
pub fn check_fuse_available() -> Result<()> {
    if !Path::new("/dev/fuse").exists() {
        return Err(Error::NoFuse);
    }
    if !rustix::process::geteuid().is_root() {
        use rustix::fs::Access;
        fusermount().ok_or(Error::NoFusermount)?;
        // fusermount3 opens it as the calling user.
        return rustix::fs::access("/dev/fuse", Access::READ_OK | Access::WRITE_OK).map_err(|e| {
            Error::Path {
                path: "/dev/fuse".into(),
                err: std::io::Error::new(
                    std::io::Error::from(e).kind(),
                    format!(
                        "{e}: users need it readable and writable to mount FUSE (mode 0666, the usual default)"
                    ),
                ),
            }
        });
    }
    match rustix::fs::open(
        "/dev/fuse",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) {
        Ok(_) => Ok(()),
        Err(Errno::NODEV | Errno::NXIO) => Err(Error::NoFuse),
        Err(e) => Err(Error::Path {
            path: "/dev/fuse".into(),
            err: e.into(),
        }),
    }
}

/// The mount point must be an existing directory that nothing is mounted on.
/// Refuse a thread count outside `1..=MAX_THREADS`, before anything is mounted.
pub fn check_threads(n: usize) -> Result<()> {
    if (1..=MAX_THREADS).contains(&n) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{n} FUSE serving threads (-q) is out of range 1..={MAX_THREADS}"
        )))
    }
}

fn check_mountpoint(dir: &Path) -> Result<PathBuf> {
    let path_err = |err: std::io::Error| Error::Path {
        path: dir.to_path_buf(),
        err,
    };
    let canonical = dir
        .canonicalize()
        .map_err(|e| path_err(std::io::Error::new(e.kind(), format!("mount point: {e}"))))?;
    let meta = std::fs::metadata(&canonical).map_err(path_err)?;
    if !meta.is_dir() {
        return Err(path_err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            "mount point is not a directory",
        )));
    }
    if is_mount_root(&canonical) {
        return Err(path_err(std::io::Error::new(
            std::io::ErrorKind::ResourceBusy,
            "mount point is busy: something is already mounted there",
        )));
    }
    Ok(canonical)
}

/// Whether `path` is the root of a mount (something is mounted on it).
pub fn is_mount_root(path: &Path) -> bool {
    use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags, CWD};
    // A dead FUSE server makes stat fail with ENOTCONN: that is still a mount.
    match statx(
        CWD,
        path,
        // DONT_SYNC: cached attributes do; a stopped server must not hang the check.
        AtFlags::SYMLINK_NOFOLLOW | AtFlags::STATX_DONT_SYNC,
        StatxFlags::BASIC_STATS,
    ) {
        Ok(st) => st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT),
        Err(Errno::NOTCONN) => true,
        Err(_) => false,
    }
}
