//! The FUSE frontend in the CLI: serve a target as a file (and loop device),
//! and stop or clean up such a device for `del`.
//!
//! Order matters both ways. Up: claim an id, mount, attach the loop device,
//! save state, report. Down: refuse while a file system or process still
//! uses the device, detach the loop device, unmount, remove state.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use userblk::fuse::{FuseDisk, FuseOptions, Unmounted};
use userblk::loopdev::{LoopDevice, LoopOptions};
use userblk::state::{self, DeviceState, FuseState};

use super::lifecycle::{self, Frontend, Host, Stop};
use crate::cli::DevArgs;
use crate::targets::Opened;

/// Largest `--io-buf-size`: the most FUSE passes in one write.
const MAX_IO_BUF_BYTES: u32 = 16 << 20;

/// Serving threads when `-q` is not given.
const DEFAULT_THREADS: u16 = 4;

/// What the main thread of a FUSE daemon waits for.
enum Event {
    /// SIGTERM, SIGINT or SIGHUP.
    Signal(i32),
    /// The FUSE session is over (unmounted by us or by someone else).
    Ended,
}

/// A FUSE device being served: a file, and a loop device on it if asked.
pub struct Fuse {
    dev: DevArgs,
    want_loop: bool,
    /// The mount point asked for, made absolute (the daemon leaves for `/`).
    mountpoint: Option<PathBuf>,
    tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
    /// The claimed id's state, and what to undo if serving fails.
    claimed: Option<(DeviceState, Cleanup)>,
}

impl Fuse {
    /// Check what `dev` asks for, and that this kernel has FUSE.
    pub fn new(dev: &DevArgs, want_loop: bool) -> anyhow::Result<Self> {
        if want_loop && !rustix::process::geteuid().is_root() {
            bail!(
                "attaching a loop device needs root; run without --loop to use the FUSE file directly"
            );
        }
        let page = u32::try_from(rustix::param::page_size()).unwrap_or(4096);
        let buf = dev.io_buf_size;
        if buf < page || buf > MAX_IO_BUF_BYTES || !buf.is_multiple_of(page) {
            bail!(
                "io buffer size {buf} must be a multiple of {page} from {page} to {MAX_IO_BUF_BYTES}"
            );
        }
        userblk::fuse::disk::check_fuse_available()?;
        let (tx, events) = mpsc::channel();
        Ok(Fuse {
            dev: dev.clone(),
            want_loop,
            mountpoint: dev
                .mountpoint
                .as_ref()
                .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone())),
            tx,
            events,
            claimed: None,
        })
    }
}

impl Frontend for Fuse {
    fn serves_this_kernel(&self) -> bool {
        true
    }

    fn stopper(&self) -> Stop {
        lifecycle::send_to(&self.tx, Event::Signal)
    }

    fn claim(&mut self) -> anyhow::Result<()> {
        // A default mount point still mounted (its daemon's state lost) is not reused.
        let default_busy = |id: u32| {
            self.mountpoint.is_none()
                && userblk::fuse::disk::is_mount_root(
                    &state::state_dir().join(format!("fuse-{id}")),
                )
        };
        let st = lifecycle::claim_id(self.dev.id, "fuse", default_busy)?;
        let cleanup = Cleanup::new(st.id);
        self.claimed = Some((st, cleanup));
        Ok(())
    }

    fn serve(&mut self, opened: Opened, host: &Host) -> anyhow::Result<()> {
        let (mut st, mut cleanup) = self.claimed.take().context("no device id claimed")?;
        let target = opened.target;
        let caps = target.caps();
        let id = st.id;
        let (mountpoint, own) = match &self.mountpoint {
            Some(dir) => (dir.clone(), false),
            None => {
                let dir = state::state_dir().join(format!("fuse-{id}"));
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating mount point {}", dir.display()))?;
                cleanup.dir = Some(dir.clone());
                (dir, true)
            }
        };
        let threads = self.dev.queues.unwrap_or(DEFAULT_THREADS);
        let opts = FuseOptions {
            mountpoint,
            threads: usize::from(threads),
            buf_bytes: self.dev.io_buf_size,
            allow_other: self.dev.allow_other,
        };
        let ended = self.tx.clone();
        let disk = FuseDisk::mount(target.clone(), &opts, move |r| {
            if let Err(e) = r {
                tracing::error!("FUSE session: {e}");
            }
            let _ = ended.send(Event::Ended);
        })?;
        cleanup.mount = Some(disk.mountpoint().to_path_buf());

        let lo = if self.want_loop {
            let lo = LoopDevice::attach(
                disk.file(),
                &LoopOptions {
                    block_size: caps.logical_block_size,
                    direct_io: true,
                    read_only: caps.read_only,
                },
            )
            .context("attaching a loop device to the FUSE file")?;
            if !lo.direct_io() {
                tracing::warn!(
                    "{}: the kernel refused direct I/O; data passes through the page cache twice",
                    lo.path().display()
                );
            }
            Some(lo)
        } else {
            None
        };

        st.block_device = lo.as_ref().map_or_else(
            || disk.file().display().to_string(),
            |l| l.path().display().to_string(),
        );
        st.target = target.describe();
        st.args = host.args();
        st.log = host.log(id);
        st.fuse = Some(FuseState {
            mountpoint: disk.mountpoint().to_path_buf(),
            file: disk.file().to_path_buf(),
            own_mountpoint: own,
            loop_device: lo.as_ref().map(LoopDevice::path),
            size: caps.size,
            block_size: caps.logical_block_size,
            threads,
            max_io_buf_bytes: self.dev.io_buf_size,
        });
        st.save()?;
        host.announce(
            id,
            &st.block_device,
            &crate::list::Entry::Saved(Box::new(st.clone())).text(),
        );
        tracing::info!("device {id} live at {}", st.block_device);

        let result = run_until_stopped(&self.events, &disk, lo);
        // The session is over or detached: nothing is mounted any more.
        cleanup.mount = None;
        drop(cleanup);
        result
    }
}

/// Serve until asked to stop, then take the device down in order.
fn run_until_stopped(
    events: &mpsc::Receiver<Event>,
    disk: &FuseDisk,
    mut lo: Option<LoopDevice>,
) -> anyhow::Result<()> {
    let mut refused = false;
    loop {
        match events.recv() {
            Ok(Event::Signal(sig)) => {
                if let Some(l) = &lo {
                    let path = l.path();
                    if userblk::loopdev::in_use(&path).unwrap_or(false) && !refused {
                        // Stopping now would fail every write of whatever has
                        // it mounted: refuse once, give in to a second signal.
                        let mounts = userblk::loopdev::mount_points(&path);
                        tracing::error!(
                            "signal {sig}: not stopping: {} is in use{}; unmount it first (a second signal forces the stop)",
                            path.display(),
                            if mounts.is_empty() { String::new() } else { format!(" (mounted at {mounts:?})") }
                        );
                        refused = true;
                        continue;
                    }
                }
                tracing::info!("signal {sig}: stopping");
                break;
            }
            Ok(Event::Ended) => {
                tracing::info!("{} was unmounted: stopping", disk.mountpoint().display());
                break;
            }
            Err(_) => break,
        }
    }
    if let Some(l) = lo.take() {
        let path = l.path();
        match l.detach() {
            Ok(()) => tracing::info!("{} detached", path.display()),
            // Forced: autoclear detaches it when its last user lets go.
            Err(e) => tracing::warn!("{e}; it detaches when no longer in use"),
        }
    }
    let lazy = match disk.unmount().context("unmounting")? {
        Unmounted::Clean | Unmounted::NotMounted => false,
        Unmounted::Lazy => {
            tracing::warn!(
                "{} is still open somewhere: detached, serving until it is closed",
                disk.file().display()
            );
            true
        }
    };
    // Wait for the serving threads to finish: after a lazy unmount, until
    // the last close. After a clean one they end at once, unless another
    // mount namespace (made after our mount) still holds a copy of it:
    // nobody can reach us through that, and exiting aborts the connection.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let wait = if lazy {
            Duration::from_secs(3600)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match events.recv_timeout(wait) {
            Ok(Event::Ended) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Ok(Event::Signal(_)) => {}
            Err(mpsc::RecvTimeoutError::Timeout) if lazy => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    "the FUSE mount lives on in another mount namespace; closing its connection"
                );
                break;
            }
        }
    }
    let c = disk.counters();
    let n = |v: &std::sync::atomic::AtomicU64| v.load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        "served {} reads, {} writes, {} flushes, {} zeroings",
        n(&c.reads),
        n(&c.writes),
        n(&c.flushes),
        n(&c.zeroes)
    );
    Ok(())
}

/// Undo a partial set-up: unmount, remove a mount point we made, drop the state.
struct Cleanup {
    id: u32,
    mount: Option<PathBuf>,
    dir: Option<PathBuf>,
}

impl Cleanup {
    fn new(id: u32) -> Self {
        Cleanup {
            id,
            mount: None,
            dir: None,
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(m) = &self.mount {
            if let Err(e) = userblk::fuse::disk::unmount(m) {
                tracing::warn!("{e}");
            }
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir(d);
        }
        DeviceState::remove(self.id);
    }
}

/// `del` of a FUSE device: refuse while it is in use, else stop its daemon
/// (or, if the daemon is dead, undo what it left behind).
pub fn delete(st: &DeviceState, timeout: Duration) -> anyhow::Result<()> {
    let id = st.id;
    let fuse = st
        .fuse
        .as_ref()
        .with_context(|| format!("device {id}: saved state has no FUSE details"))?;
    // The loop device is ours only while it still has our file behind it.
    let our_loop = fuse.loop_device.as_deref().filter(|lo| {
        loop_number(lo)
            .and_then(userblk::loopdev::backing_file)
            .is_some_and(|f| f == fuse.file)
    });
    if let Some(lo) = our_loop {
        if userblk::loopdev::in_use(lo).unwrap_or(false) {
            return Err(userblk::Error::LoopBusy {
                path: lo.to_path_buf(),
                mounts: userblk::loopdev::mount_points(lo),
            })
            .with_context(|| format!("device {id}"));
        }
    }
    let users = open_by(&fuse.file, st.pid);
    if !users.is_empty() {
        bail!(
            "device {id}: {} is open by {}; close it first",
            fuse.file.display(),
            users.join(", ")
        );
    }
    if st.daemon_alive() {
        lifecycle::stop(st, timeout)?;
    } else {
        // The daemon died: its loop device may still be bound and its mount dead.
        if let Some(lo) = our_loop {
            userblk::loopdev::detach_path(lo).with_context(|| format!("device {id}"))?;
        }
        userblk::fuse::disk::unmount(&fuse.mountpoint).with_context(|| format!("device {id}"))?;
    }
    if fuse.own_mountpoint {
        let _ = std::fs::remove_dir(&fuse.mountpoint);
    }
    DeviceState::remove(id);
    Ok(())
}

fn loop_number(path: &Path) -> Option<u32> {
    path.file_name()?
        .to_str()?
        .strip_prefix("loop")?
        .parse()
        .ok()
}

/// Processes other than `daemon` holding `file` open, as `pid (comm)`.
fn open_by(file: &Path, daemon: i32) -> Vec<String> {
    let mut users = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return users;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == daemon {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == file))
        {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            users.push(format!("pid {pid} ({})", comm.trim_end()));
        }
    }
    users
}
