//! The FUSE frontend in the CLI: serve a target as a file (and loop device),
//! and stop or clean up such a device for `del`.
//!
//! Order matters both ways. Up: claim an id, mount, attach the loop device,
//! save state, report. Down: refuse while a file system or process still
//! uses the device, detach the loop device, unmount, remove state.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use userblk::fuse::{FuseDisk, FuseOptions, Unmounted};
use userblk::loopdev::{LoopDevice, LoopOptions};
use userblk::state::{self, DeviceState, FuseState};
use userblk::waiter::Waiter;

use super::lifecycle::{self, Frontend, Host, Stop};
use crate::cli::DevArgs;
use crate::targets::Opened;

/// Largest `--io-buf-size`: the most FUSE passes in one write.
const MAX_IO_BUF_BYTES: u32 = 16 << 20;

/// Serving threads when `-q` is not given.
pub(super) const DEFAULT_THREADS: u16 = 4;

/// Set (to `BS:RO:FILE`) in the environment of the process that attaches the loop device.
pub const ATTACH_ENV: &str = "USERBLK_LOOP_ATTACH";

/// How long attaching the loop device may take: LOOP_CONFIGURE waits for
/// the target to flush, which a stuck target never does.
const ATTACH_DEADLINE: Duration = Duration::from_secs(30);

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
        st.name = host.name();
        let target = opened.target;
        let caps = target.caps();
        let id = st.id;
        let _metrics = state::count_requests(id, false);
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
        let woken = host.waker();
        let disk = FuseDisk::mount(target.clone(), &opts, move |r| {
            if let Err(e) = r {
                tracing::error!("FUSE session: {e}");
            }
            let _ = ended.send(Event::Ended);
            woken();
        })?;
        cleanup.mount = Some(disk.mountpoint().to_path_buf());
        // The kernel learns a new size from the file's attributes; a loop
        // device on the file is refreshed by `userblk resize` itself.
        let size_changed = disk.size_changed();
        let _resize = opened.registry.on_resize(super::resize::handler(
            id,
            target.clone(),
            Box::new(move |_| Ok(size_changed()?)),
        ));

        // Saved before the loop device: a daemon killed while attaching
        // leaves a mount that `del` (or the waiting `add`) can clean up.
        st.fuse = Some(fuse_state(
            &disk,
            own,
            None,
            &caps,
            threads,
            self.dev.io_buf_size,
        ));
        st.save()?;

        let lo = if self.want_loop {
            let lo = attach_loop(
                &disk,
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
        st.fuse = Some(fuse_state(
            &disk,
            own,
            lo.as_ref().map(LoopDevice::path),
            &caps,
            threads,
            self.dev.io_buf_size,
        ));
        st.save()?;
        host.announce(
            id,
            &st.block_device,
            &crate::list::Entry::Saved(Box::new(st.clone())).text(),
        );
        tracing::info!("device {id} live at {}", st.block_device);

        // This thread waits in `host`'s wait, which also hands on signals
        // and answers `ctl`.
        let result = run_until_stopped(&self.events, &disk, lo, host);
        // The session is over or detached: nothing is mounted any more.
        cleanup.mount = None;
        drop(cleanup);
        result
    }
}

fn fuse_state(
    disk: &FuseDisk,
    own_mountpoint: bool,
    loop_device: Option<PathBuf>,
    caps: &userblk::target::Caps,
    threads: u16,
    max_io_buf_bytes: u32,
) -> FuseState {
    FuseState {
        mountpoint: disk.mountpoint().to_path_buf(),
        file: disk.file().to_path_buf(),
        own_mountpoint,
        loop_device,
        size: caps.size,
        block_size: caps.logical_block_size,
        threads,
        max_io_buf_bytes,
    }
}

/// Attach a loop device to the FUSE file from a short-lived process and
/// take it over. LOOP_CONFIGURE fsyncs the file: a FUSE request to this
/// very daemon. Made from here, a kill -9 of the daemon could not abort
/// the connection (the thread in the kernel keeps our /dev/fuse open) and
/// the loop device's lock would be held for good. From another process,
/// the daemon's death aborts the connection and the attacher gets an error;
/// a target that does not answer within [`ATTACH_DEADLINE`] gets its
/// connection aborted and the attacher killed.
fn attach_loop(disk: &FuseDisk, opts: &LoopOptions) -> anyhow::Result<LoopDevice> {
    let file = disk.file();
    let spec = format!(
        "{}:{}:{}",
        opts.block_size,
        u8::from(opts.read_only),
        file.display()
    );
    let exe = std::env::current_exe().context("finding the userblk executable")?;
    let mut child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(ATTACH_ENV, spec)
        .env_remove(lifecycle::DAEMON_ENV)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the loop attacher")?;
    let said = lifecycle::read_all(child.stderr.take());
    let mut stdout = child.stdout.take().context("attacher stdout")?;
    let (tx, answer) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(&mut stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let number = match answer.recv_timeout(ATTACH_DEADLINE) {
        Ok(line) => line.trim().parse::<u32>().ok(),
        Err(_) => {
            // The target has not answered the flush: stop waiting for it.
            if let Err(e) = userblk::fuse::conn::abort(disk.mountpoint()) {
                tracing::warn!("{e}");
            }
            let _ = child.kill();
            reap(&mut child);
            bail!(
                "no loop device within {}s: the target did not answer the flush LOOP_CONFIGURE sends",
                ATTACH_DEADLINE.as_secs()
            );
        }
    };
    let lo = number.map(|n| LoopDevice::adopt(n, file));
    // Let the attacher go: from now on our fd holds the device (autoclear).
    drop(child.stdin.take());
    reap(&mut child);
    match lo {
        Some(lo) => Ok(lo?),
        None => {
            let text = said
                .recv_timeout(Duration::from_secs(1))
                .unwrap_or_default();
            let last = text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
            bail!("{}", last.strip_prefix("userblk: ").unwrap_or(last))
        }
    }
}

/// Wait a little for a child that should be gone; kill it if not.
fn reap(child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    tracing::warn!("loop attacher (pid {}) did not exit; killed it", child.id());
}

/// The attacher, in its own process ([`ATTACH_ENV`] set to `BS:RO:FILE`):
/// attach, print the loop device's number, hold it until the daemon closes
/// our stdin (it has the device open then, or it died and autoclear frees it).
pub fn run_attacher(spec: &str) -> anyhow::Result<()> {
    let mut parts = spec.splitn(3, ':');
    let (Some(bs), Some(ro), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("bad {ATTACH_ENV}: {spec}");
    };
    let opts = LoopOptions {
        block_size: bs.parse().context("block size")?,
        direct_io: true,
        read_only: ro == "1",
    };
    let lo = LoopDevice::attach(Path::new(file), &opts)?;
    let mut out = std::io::stdout();
    writeln!(out, "{}", lo.number())
        .and_then(|()| out.flush())
        .context("reporting the loop device")?;
    let mut byte = [0u8; 1];
    let _ = std::io::stdin().read(&mut byte);
    drop(lo);
    Ok(())
}

/// Serve until asked to stop, then take the device down in order; wait
/// for `events` with `waiter` (their senders wake it).
fn run_until_stopped(
    events: &mpsc::Receiver<Event>,
    disk: &FuseDisk,
    mut lo: Option<LoopDevice>,
    waiter: &dyn Waiter,
) -> anyhow::Result<()> {
    let mut refused = false;
    loop {
        match userblk::waiter::recv(events, waiter) {
            Ok(Event::Signal(sig)) => {
                if let Some(l) = &lo {
                    let path = l.path();
                    if userblk::loopdev::in_use(&path).unwrap_or(false) && !refused {
                        // Stopping now would fail every write of whatever has
                        // it mounted: refuse once, give in to a second signal.
                        let mounts = userblk::loopdev::mount_points(&path);
                        tracing::warn!(
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
    crate::notify::stopping();
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
        match userblk::waiter::recv_timeout(events, waiter, wait) {
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
/// (or, if the daemon is dead, undo what it left behind). With `force`, a
/// daemon that is stopped or wedged has its FUSE connection aborted and is
/// killed instead of asked to stop.
pub fn delete(st: &DeviceState, timeout: Duration, force: bool) -> anyhow::Result<()> {
    let id = st.id;
    let Some(fuse) = st.fuse.as_ref() else {
        // Claimed, but the daemon never mounted anything.
        if st.daemon_alive() {
            lifecycle::stop(st, timeout)?;
        }
        let _ = std::fs::remove_dir(state::state_dir().join(format!("fuse-{id}")));
        DeviceState::remove(id);
        return Ok(());
    };
    // The loop device is ours only while it still has our file behind it.
    let our_loop = fuse.loop_device.as_deref().filter(|lo| {
        loop_number(lo)
            .and_then(userblk::loopdev::backing_file)
            .is_some_and(|f| f == fuse.file)
    });
    if !force {
        refuse_if_held(st, &fuse.file, our_loop)?;
    } else if let Some(lo) = our_loop {
        if userblk::loopdev::in_use(lo).unwrap_or(false) {
            unmount_lazily(id, lo)?;
        }
    }
    if st.daemon_alive() && force {
        force_stop(st, &fuse.mountpoint)?;
    } else if st.daemon_alive() {
        lifecycle::stop(st, timeout).map_err(|e| {
            anyhow::anyhow!("{e:#}; `userblk del -n {id} --force` aborts its FUSE connection")
        })?;
    }
    if st.daemon_alive() {
        bail!("device {id}: daemon {} is still running", st.pid);
    }
    // The daemon is gone: its loop device may still be bound and its mount dead.
    if let Some(lo) = our_loop {
        match userblk::loopdev::detach_path(lo) {
            // Attached with AUTOCLEAR: it detaches itself at its last close.
            Err(userblk::Error::LoopBusy { .. }) if force => eprintln!(
                "userblk: device {id}: {} is still open (by a process, or files on a lazily unmounted file system); it detaches itself at its last close",
                lo.display()
            ),
            r => r.with_context(|| format!("device {id}"))?,
        }
    }
    userblk::fuse::disk::unmount(&fuse.mountpoint).with_context(|| format!("device {id}"))?;
    if fuse.own_mountpoint {
        let _ = std::fs::remove_dir(&fuse.mountpoint);
    }
    DeviceState::remove(id);
    Ok(())
}

/// For `del --force`: detach every file system mounted on loop device `lo`
/// or its partitions (`umount -l`), saying so in one line each.
fn unmount_lazily(id: u32, lo: &Path) -> anyhow::Result<()> {
    let name = lo.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let mut devices = vec![lo.to_path_buf()];
    if let Ok(dir) = std::fs::read_dir(Path::new("/sys/block").join(name)) {
        let part = format!("{name}p");
        devices.extend(dir.flatten().filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            n.starts_with(&part).then(|| Path::new("/dev").join(n))
        }));
    }
    for dev in devices {
        for mp in userblk::loopdev::mount_points(&dev) {
            rustix::mount::unmount(&mp, rustix::mount::UnmountFlags::DETACH).with_context(
                || {
                    format!(
                        "device {id}: unmounting {} from {}",
                        mp.display(),
                        dev.display()
                    )
                },
            )?;
            eprintln!(
                "userblk: device {id}: unmounted {} from {} lazily (--force)",
                mp.display(),
                dev.display()
            );
        }
    }
    Ok(())
}

/// Abort the daemon's FUSE connection (so nothing waits on it any more),
/// then kill it and wait, with a deadline, for it to be gone.
fn force_stop(st: &DeviceState, mountpoint: &Path) -> anyhow::Result<()> {
    let id = st.id;
    match userblk::fuse::conn::abort(mountpoint) {
        Ok(true) => tracing::info!("device {id}: FUSE connection aborted"),
        Ok(false) => {}
        Err(e) => tracing::warn!("device {id}: {e}"),
    }
    let pid = rustix::process::Pid::from_raw(st.pid).context("bad pid in saved state")?;
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while st.daemon_alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn loop_number(path: &Path) -> Option<u32> {
    path.file_name()?
        .to_str()?
        .strip_prefix("loop")?
        .parse()
        .ok()
}

/// `del` without `--force`: refuse while the loop device is mounted or
/// open, or the FUSE file is open, other than by the daemon itself.
fn refuse_if_held(st: &DeviceState, file: &Path, our_loop: Option<&Path>) -> anyhow::Result<()> {
    let id = st.id;
    let mut held = Vec::new();
    if let Some(lo) = our_loop {
        held = userblk::holders::of_block_device(lo, Some(st.pid));
    }
    held.extend(userblk::holders::of_file(
        file,
        &file.display().to_string(),
        Some(st.pid),
    ));
    if !held.is_empty() {
        return Err(crate::exit::in_use(format!(
            "device {id}: {}; close or unmount it first, or `userblk del -n {id} --force` stops it anyway",
            userblk::holders::describe(&held)
        )));
    }
    // An exclusive claim no process shows (a mount in another namespace).
    if let Some(lo) = our_loop {
        if userblk::loopdev::in_use(lo).unwrap_or(false) {
            return Err(userblk::Error::LoopBusy {
                path: lo.to_path_buf(),
                mounts: userblk::loopdev::mount_points(lo),
            })
            .with_context(|| format!("device {id}"));
        }
    }
    Ok(())
}
