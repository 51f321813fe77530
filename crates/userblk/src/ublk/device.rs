//! Device lifecycle: add, serve (queue threads, start), stop, delete.
//!
//! Order matters to the kernel: queue threads must be fetching before
//! START_DEV (which reads the partition table through them), must keep
//! serving until STOP_DEV returns, and must have closed `/dev/ublkcN` and
//! unmapped it before DEL_DEV can finish.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use userblk_uapi::*;

use crate::target::{Caps, Target};
use crate::ublk::batch;
use crate::ublk::ctrl::{char_path, Control, DevInfo};
use crate::ublk::features::Features;
use crate::ublk::handover::{Handover, Quiescer};
use crate::ublk::io_mode::IoMode;
use crate::ublk::params;
use crate::ublk::queue::{self, DataMode, QueueEvent, QueueSetup, Shutdown};
use crate::waiter::{Park, Waiter, WakeOnDrop};
use crate::{Error, Result};

/// How long DEL_DEV may wait for the last holder of `/dev/ublkcN`.
pub const DEL_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest request buffer per tag (the USER_COPY offset encoding allows 32 MiB).
pub const MAX_IO_BUF_BYTES: u32 = 1 << UBLK_IO_BUF_BITS;

/// What to ask the kernel for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceConfig {
    /// Device id, or `None` to let the kernel pick.
    pub id: Option<u32>,
    /// Hardware queues (one thread each).
    pub queues: u16,
    /// Tags per queue.
    pub depth: u16,
    /// Largest request in bytes.
    pub io_buf_bytes: u32,
    /// Extra `UBLK_F_*` flags to request: `UBLK_F_USER_RECOVERY`,
    /// `UBLK_F_USER_RECOVERY_REISSUE`, `UBLK_F_UNPRIVILEGED_DEV` (needed
    /// when not running as root; the kernel clears it for root),
    /// `UBLK_F_USER_COPY` and `UBLK_F_AUTO_BUF_REG` (each dropped with a
    /// warning where unsupported).
    pub flags: u64,
    /// Zero copy (`UBLK_F_AUTO_BUF_REG`) where the kernel offers it to this
    /// device, quietly copying where it does not: a privileged device on
    /// Linux 6.16+, and no copy mode in `flags`. Only for targets whose
    /// [`data_on_ring_only`](crate::Target::data_on_ring_only) is true; the
    /// `file` target gains 1.4-2x from it (see docs/perf).
    pub zero_copy_if_offered: bool,
    /// Per-tag or batch commands ([`IoMode`]); the default, `Auto`,
    /// takes whichever measured faster where the kernel offers both.
    #[serde(default)]
    pub io_mode: IoMode,
}

/// Whether a device outlives its daemon (`UBLK_F_USER_RECOVERY`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Recovery {
    /// The device goes when its daemon does.
    #[default]
    Off,
    /// The device waits (QUIESCED) for a new daemon; requests in flight when
    /// the old one died fail.
    On,
    /// As `On`, and the requests in flight are re-issued to the new daemon
    /// (`UBLK_F_USER_RECOVERY_REISSUE`).
    Reissue,
    /// The device waits (FAIL_IO) for a new daemon, but meanwhile every
    /// request fails at once (a target error, EREMOTEIO) instead of waiting
    /// (`UBLK_F_USER_RECOVERY_FAIL_IO`, Linux 6.13+).
    FailIo,
}

/// Zero copy (`UBLK_F_AUTO_BUF_REG`): only for targets whose
/// [`data_on_ring_only`](crate::Target::data_on_ring_only) is true.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ZeroCopy {
    /// Request data goes through the daemon's buffers.
    #[default]
    Off,
    /// Where the kernel offers it to this device, quietly copying where not
    /// ([`DeviceConfig::zero_copy_if_offered`]).
    IfOffered,
    /// Asked for: a warning says why where the kernel refuses it.
    On,
}

/// The typed form of the `UBLK_F_*` flags a program chooses; the library
/// turns them into flags ([`DeviceOptions::flags`], [`DeviceConfig::with_options`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceOptions {
    /// Keep the device across the daemon's death.
    pub recovery: Recovery,
    /// An unprivileged device, owned by the calling user (`UBLK_F_UNPRIVILEGED_DEV`;
    /// needed when not root, and cleared by the kernel for root).
    pub unprivileged: bool,
    /// Move request data with pread/pwrite on `/dev/ublkcN` (`UBLK_F_USER_COPY`).
    pub user_copy: bool,
    /// Zero copy.
    pub zero_copy: ZeroCopy,
    /// No partition scan when the device starts (`UBLK_F_NO_AUTO_PART_SCAN`,
    /// Linux 7.0+; dropped with a warning where the kernel lacks it).
    pub no_partitions: bool,
}

impl DeviceOptions {
    /// The `UBLK_F_*` flags these options ask for.
    pub fn flags(&self) -> u64 {
        let mut flags = match self.recovery {
            Recovery::Off => 0,
            Recovery::On => UBLK_F_USER_RECOVERY,
            Recovery::Reissue => UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE,
            Recovery::FailIo => UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_FAIL_IO,
        };
        if self.no_partitions {
            flags |= UBLK_F_NO_AUTO_PART_SCAN;
        }
        if self.unprivileged {
            flags |= UBLK_F_UNPRIVILEGED_DEV;
        }
        if self.user_copy {
            flags |= UBLK_F_USER_COPY;
        }
        if self.zero_copy == ZeroCopy::On {
            flags |= UBLK_F_AUTO_BUF_REG;
        }
        flags
    }
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            id: None,
            queues: 1,
            depth: 128,
            io_buf_bytes: 512 << 10,
            flags: 0,
            zero_copy_if_offered: false,
            io_mode: IoMode::Auto,
        }
    }
}

impl DeviceConfig {
    /// Ask for an unprivileged device (`UBLK_F_UNPRIVILEGED_DEV`), owned by
    /// the calling user; root gets a privileged device regardless.
    #[must_use]
    pub fn unprivileged(mut self) -> Self {
        self.flags |= UBLK_F_UNPRIVILEGED_DEV;
        self
    }

    /// Add the flags `opts` ask for, and take zero copy where offered if they say so.
    #[must_use]
    pub fn with_options(mut self, opts: &DeviceOptions) -> Self {
        self.flags |= opts.flags();
        self.zero_copy_if_offered = opts.zero_copy == ZeroCopy::IfOffered;
        self
    }

    /// Check ranges before asking the kernel, for clearer errors than EINVAL.
    pub fn check(&self) -> Result<()> {
        if !(1..=UBLK_MAX_NR_QUEUES).contains(&self.queues) {
            return Err(Error::invalid(format!(
                "queue count {} out of range 1..={UBLK_MAX_NR_QUEUES}",
                self.queues
            )));
        }
        if !(1..=UBLK_MAX_QUEUE_DEPTH).contains(&self.depth) {
            return Err(Error::invalid(format!(
                "queue depth {} out of range 1..={UBLK_MAX_QUEUE_DEPTH}",
                self.depth
            )));
        }
        let page = u32::try_from(rustix::param::page_size()).unwrap_or(4096);
        if self.io_buf_bytes < page
            || self.io_buf_bytes > MAX_IO_BUF_BYTES
            || !self.io_buf_bytes.is_multiple_of(page)
        {
            return Err(Error::invalid(format!(
                "io buffer size {} must be a multiple of {page} from {page} to {MAX_IO_BUF_BYTES}",
                self.io_buf_bytes
            )));
        }
        if self.id == Some(UBLK_DEV_ID_AUTO) {
            return Err(Error::invalid(format!(
                "device id {UBLK_DEV_ID_AUTO} is reserved"
            )));
        }
        Ok(())
    }
}

/// Asks a serving device to stop, from any thread (a signal handler thread, say).
#[derive(Debug, Clone)]
pub struct Stopper {
    id: u32,
    requested: Arc<AtomicBool>,
}

impl Stopper {
    /// Stop the device: the kernel removes `/dev/ublkbN`, the queues drain and
    /// [`Device::serve`] returns after deleting the device.
    pub fn stop(&self) -> Result<()> {
        self.requested.store(true, Ordering::SeqCst);
        Control::open()?.stop(self.id)
    }
}

/// A device that has been added but not yet served.
pub struct Device {
    ctrl: Control,
    info: DevInfo,
    features: Features,
    /// `/dev/ublkcN`; taken (closed) before DEL_DEV, which waits for it.
    cdev: Option<Arc<OwnedFd>>,
    caps: Caps,
    stop_requested: Arc<AtomicBool>,
    /// Delete on drop: set for a new device until serving ends in an orderly way.
    armed: bool,
    /// A recovered device ends its bring-up with END_USER_RECOVERY, not START_DEV.
    recovering: bool,
    /// Shared with [`Quiescer`]s, for `userblk upgrade`.
    handover: Arc<Handover>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("info", &self.info).finish()
    }
}

/// Live information handed to the caller once the device is LIVE.
#[derive(Debug, Clone)]
pub struct Live {
    /// Device info after START_DEV.
    pub info: DevInfo,
    /// Thread id of each queue's thread.
    pub queue_tids: Vec<i32>,
    /// CPUs each queue is pinned to.
    pub queue_cpus: Vec<Vec<usize>>,
}

/// The data-copy modes that fall back to plain copies where refused: the
/// flag, its name in warnings, what a kernel without it lacks, and what
/// happens instead.
const COPY_MODES: [(u64, &str, &str, &str); 2] = [
    (
        UBLK_F_USER_COPY,
        "user copy",
        "this kernel lacks it (Linux 6.5+)",
        "the kernel copies request data instead",
    ),
    (
        UBLK_F_AUTO_BUF_REG,
        "zero copy",
        "this kernel lacks automatic buffer registration (UBLK_F_AUTO_BUF_REG, Linux 6.16+)",
        "request data is copied through the daemon's buffers instead",
    ),
];

/// The flags to ask for: `UBLK_F_USER_COPY` and `UBLK_F_AUTO_BUF_REG`
/// dropped, with a warning saying why, where the kernel would refuse them
/// (too old, or an unprivileged device), so the device falls back to the
/// kernel copying request data into the daemon's buffers.
fn copy_mode_fallback(flags: u64, features: Features, root: bool) -> u64 {
    let mut flags = flags;
    for (flag, name, lacks, instead) in COPY_MODES {
        if flags & flag == 0 {
            continue;
        }
        let why = if features.0 != 0 && !features.has(flag) {
            lacks
        } else if !root {
            "the kernel refuses it for unprivileged devices"
        } else {
            continue;
        };
        tracing::warn!("{name}: {why}; {instead}");
        flags &= !flag;
    }
    flags
}

/// Whether a device that takes zero copy where offered gets it: the kernel
/// has it, the device is privileged (the kernel refuses it otherwise) and no
/// copy mode was asked for.
fn zero_copy_offered(cfg: &DeviceConfig, flags: u64, features: Features, root: bool) -> bool {
    cfg.zero_copy_if_offered
        && features.has(UBLK_F_AUTO_BUF_REG)
        && root
        && flags & (UBLK_F_UNPRIVILEGED_DEV | UBLK_F_USER_COPY | UBLK_F_AUTO_BUF_REG) == 0
}

impl Device {
    /// ADD_DEV and SET_PARAMS for a target with `caps`; opens `/dev/ublkcN`.
    pub fn add(cfg: &DeviceConfig, caps: &Caps) -> Result<Device> {
        cfg.check()?;
        caps.check()?;
        let mut ctrl = Control::open()?;
        let features = Features(ctrl.features()?);
        let wanted = cfg.flags
            & (UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE | UBLK_F_USER_RECOVERY_FAIL_IO);
        let root = crate::ublk::ctrl::running_as_root();
        if !root {
            if cfg.flags & UBLK_F_UNPRIVILEGED_DEV == 0 {
                return Err(Error::invalid(
                    "not root: only unprivileged devices (UBLK_F_UNPRIVILEGED_DEV) can be added; see docs/unprivileged.md",
                ));
            }
            if features.0 != 0 && !features.has_unprivileged() {
                return Err(Error::invalid(
                    "this kernel does not support unprivileged devices (Linux 6.3+): run as root",
                ));
            }
            if wanted != 0 {
                return Err(Error::invalid(
                    "user recovery needs root: the kernel clears it for unprivileged devices",
                ));
            }
        }
        if let Some(e) = crate::ublk::add_flags::fail_io_missing(cfg.flags, features) {
            return Err(e);
        }
        let missing = Features(wanted & !features.0);
        if missing.0 != 0 {
            return Err(Error::invalid(format!(
                "this kernel does not support {} (user recovery needs Linux 6.1+)",
                missing.names().join(", ")
            )));
        }
        if cfg.flags & UBLK_F_USER_COPY != 0 && cfg.flags & UBLK_F_AUTO_BUF_REG != 0 {
            return Err(Error::invalid(
                "user copy and zero copy exclude each other: ask for one",
            ));
        }
        let mut flags = copy_mode_fallback(cfg.flags, features, root);
        flags = crate::ublk::add_flags::fall_back(flags, features);
        // Live resize (`userblk resize`) where the kernel has it (6.16+); it costs nothing.
        flags |= features.0 & UBLK_F_UPDATE_SIZE;
        // Recoverable devices can be handed to a new daemon where the kernel allows.
        flags |= crate::ublk::handover::quiesce_flag(flags, features);
        if zero_copy_offered(cfg, flags, features, root) {
            tracing::info!("zero copy: the target moves request data in the kernel's own pages (UBLK_F_AUTO_BUF_REG)");
            flags |= UBLK_F_AUTO_BUF_REG;
        }
        flags |= cfg.io_mode.flag(features);
        let mut info = DevInfo {
            nr_hw_queues: cfg.queues,
            queue_depth: cfg.depth,
            max_io_buf_bytes: cfg.io_buf_bytes,
            dev_id: cfg.id.unwrap_or(UBLK_DEV_ID_AUTO),
            flags: flags | UBLK_F_CMD_IOCTL_ENCODE,
            ..Default::default()
        };
        ctrl.add(&mut info)?;
        let id = info.dev_id;
        // From here on the id exists in the kernel: remove it again on any failure.
        let cleanup = |ctrl: &mut Control, e: Error| {
            if let Err(d) = ctrl.del(id, DEL_TIMEOUT) {
                tracing::warn!("removing half-created device {id}: {d}");
            }
            e
        };
        if info.flags & wanted != wanted {
            let e = Error::invalid("the kernel did not grant user recovery for this device (unprivileged devices cannot use it)");
            return Err(cleanup(&mut ctrl, e));
        }
        for (flag, name, _, instead) in COPY_MODES {
            if flags & flag != 0 && info.flags & flag == 0 {
                tracing::warn!("{name}: the kernel did not grant it; {instead}");
            }
        }
        if flags & UBLK_F_BATCH_IO != 0 && info.flags & UBLK_F_BATCH_IO == 0 {
            // Auto asks only where offered, so a refusal is worth a word either way.
            tracing::warn!("batch I/O: the kernel did not grant it; serving per-tag instead");
        }
        if info.nr_hw_queues != cfg.queues {
            tracing::info!(
                "kernel capped queues from {} to {} (CPU count)",
                cfg.queues,
                info.nr_hw_queues
            );
        }
        // Open /dev/ublkcN first: for an unprivileged device this also waits
        // until udev has handed the node to us, which SET_PARAMS needs too.
        let cdev = match open_char_device(id) {
            Ok(fd) => fd,
            Err(e) => return Err(cleanup(&mut ctrl, e)),
        };
        let p = params::from_caps(caps, info.max_io_buf_bytes);
        if let Err(e) = ctrl.set_params(id, &p) {
            drop(cdev);
            return Err(cleanup(&mut ctrl, e));
        }
        Ok(Device::opened(ctrl, info, features, cdev, caps, false))
    }

    /// Take over device `id`, whose server died with recovery enabled
    /// (state QUIESCED): START_USER_RECOVERY, then serve as usual; I/O queued
    /// while no server ran is served once [`Device::serve`] has ended recovery.
    ///
    /// `caps` must describe the same device as before (size and block size
    /// are checked against the kernel's parameters, which cannot change).
    pub fn recover(id: u32, caps: &Caps) -> Result<Device> {
        caps.check()?;
        let mut ctrl = Control::open()?;
        let features = Features(ctrl.features()?);
        let info = ctrl.dev_info(id)?;
        if !Features(info.flags).has_user_recovery() {
            return Err(Error::invalid(format!(
                "device {id} was created without recovery (add -r); it cannot be recovered"
            )));
        }
        let p = ctrl.params(id)?;
        let lbs = 1u32
            .checked_shl(u32::from(p.basic.logical_bs_shift))
            .unwrap_or(0);
        if p.basic.dev_sectors != caps.size >> 9 || lbs != caps.logical_block_size {
            return Err(Error::invalid(format!(
                "device {id} has {} bytes in {lbs}-byte blocks, but the target now has {} bytes in {}-byte blocks",
                p.basic.dev_sectors << 9,
                caps.size,
                caps.logical_block_size
            )));
        }
        // The old server's /dev/ublkcN must be fully released first (EBUSY until then).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state = ctrl.dev_info(id)?.state;
            match state {
                UBLK_S_DEV_QUIESCED | UBLK_S_DEV_FAIL_IO => {}
                UBLK_S_DEV_LIVE => {
                    return Err(Error::invalid(format!(
                        "device {id} is LIVE: its server is running, nothing to recover"
                    )))
                }
                other => {
                    return Err(Error::invalid(format!(
                        "device {id} is {} and cannot be recovered; delete it with `userblk del -n {id}`",
                        crate::ublk::ctrl::state_name(other)
                    )))
                }
            }
            match ctrl.start_recovery(id) {
                Ok(()) => break,
                Err(Error::Control {
                    errno: Errno::BUSY, ..
                }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        }
        let info = ctrl.dev_info(id)?;
        let cdev = open_char_device(id)?;
        Ok(Device::opened(ctrl, info, features, cdev, caps, true))
    }

    fn opened(
        ctrl: Control,
        info: DevInfo,
        features: Features,
        cdev: OwnedFd,
        caps: &Caps,
        recovering: bool,
    ) -> Device {
        Device {
            ctrl,
            info,
            features,
            cdev: Some(Arc::new(cdev)),
            caps: *caps,
            stop_requested: Arc::new(AtomicBool::new(false)),
            // A new device is deleted again if serving never starts; one we
            // were asked to recover is never deleted because recovery failed.
            armed: !recovering,
            recovering,
            handover: Arc::default(),
        }
    }

    /// The negotiated device info (id, queues, depth, flags).
    pub fn info(&self) -> &DevInfo {
        &self.info
    }

    /// What the kernel supports.
    pub fn kernel_features(&self) -> Features {
        self.features
    }

    /// A handle that quiesces this device for a new daemon from another
    /// thread (`userblk upgrade`), once it serves.
    pub fn quiescer(&self) -> Quiescer {
        Quiescer {
            id: self.info.dev_id,
            flags: self.info.flags,
            shared: Arc::clone(&self.handover),
        }
    }

    /// A handle that stops this device from another thread.
    pub fn stopper(&self) -> Stopper {
        Stopper {
            id: self.info.dev_id,
            requested: Arc::clone(&self.stop_requested),
        }
    }

    /// Serve the device with `target` until it is stopped: [`Device::serve_with`]
    /// on a thread with nothing else to do.
    pub fn serve(self, target: Arc<dyn Target>, on_live: impl FnOnce(&Live)) -> Result<()> {
        self.serve_with(target, on_live, &Park::default())
    }

    /// Serve the device with `target` until it is stopped, waiting for the
    /// queues with `waiter`: the calling thread does its other work (a
    /// daemon's signals and control socket) in that wait, so a device costs
    /// its queue threads and this one.
    ///
    /// Starts a thread per queue, waits until each fetches all its tags,
    /// sends START_DEV and calls `on_live` once `/dev/ublkbN` exists. Returns
    /// after every queue has drained; deletes the device if the stop came
    /// through a [`Stopper`] (a stop from outside, such as `userblk del`,
    /// leaves deletion to whoever stopped it).
    ///
    /// If a queue fails once the device is live, `serve` returns its error at
    /// once, leaving the other queue threads running: the caller should then
    /// exit the process. Exiting is how the kernel learns the server is gone;
    /// it quiesces a recoverable device for a new daemon, or stops any other.
    pub fn serve_with(
        mut self,
        target: Arc<dyn Target>,
        on_live: impl FnOnce(&Live),
        waiter: &dyn Waiter,
    ) -> Result<()> {
        let id = self.info.dev_id;
        let queues = self.info.nr_hw_queues;
        let shutdown = Shutdown::new()?;
        self.handover.attach(&shutdown);
        let cdev = self
            .cdev
            .clone()
            .ok_or_else(|| Error::invalid("device already served"))?;
        let whole_set = std::env::var(QUEUE_AFFINITY_ENV).as_deref() == Ok("all");
        let data_mode = DataMode::of(self.info.flags);
        if data_mode == DataMode::ZeroCopy && !target.data_on_ring_only() {
            return Err(Error::invalid(
                "zero copy needs a target that moves data only on the ring (null, mem, file, qcow2, under filters that never touch data)",
            ));
        }
        // The driver follows the device's flags: a recovered device keeps its own.
        let run: fn(QueueSetup, &mpsc::Sender<QueueEvent>) = match IoMode::of(self.info.flags) {
            _ if crate::ublk::no_fetch::asked() => crate::ublk::no_fetch::run,
            IoMode::Batch => batch::run,
            IoMode::PerTag | IoMode::Auto => queue::run,
        };
        let (tx, rx) = mpsc::channel();
        let mut threads = Vec::with_capacity(usize::from(queues));
        let mut queue_cpus = Vec::with_capacity(usize::from(queues));
        for q in 0..queues {
            let set = self.ctrl.queue_affinity(id, q).unwrap_or_default();
            let cpus = if whole_set {
                set
            } else {
                queue_cpu(&set, id, q)
            };
            queue_cpus.push(cpus.clone());
            let setup = QueueSetup {
                q,
                depth: self.info.queue_depth,
                buf_bytes: self.info.max_io_buf_bytes,
                cdev: Arc::clone(&cdev),
                cpus,
                target: Arc::clone(&target),
                caps: self.caps,
                shutdown: Arc::clone(&shutdown),
                fail_after: queue::failpoint(q),
                data: data_mode,
            };
            let tx = tx.clone();
            let woken = waiter.waker();
            let spawned = std::thread::Builder::new()
                .name(format!("ublk{id}-q{q}"))
                .spawn(move || {
                    // Dropped after `tx`, also on a panic: the waiter then
                    // finds the exit (or the channel closed).
                    let _wake = WakeOnDrop(woken);
                    let tx = tx;
                    run(setup, &tx);
                });
            match spawned {
                Ok(h) => threads.push(h),
                Err(e) => {
                    shutdown.trigger();
                    join_all(threads);
                    return Err(Error::io("spawning a queue thread", e));
                }
            }
        }
        drop(tx);
        drop(cdev);

        // Every queue must be fetching before START_DEV.
        let mut queue_tids = vec![0; usize::from(queues)];
        let mut ready = 0;
        let mut early: Option<Error> = None;
        while ready < queues && early.is_none() {
            match rx.recv() {
                Ok(QueueEvent::Ready { q, tid }) => {
                    queue_tids[usize::from(q)] = tid;
                    ready += 1;
                }
                Ok(QueueEvent::Exited { q, result }) => {
                    early = Some(result.err().unwrap_or(Error::Queue {
                        queue: q,
                        msg: "exited before starting".into(),
                    }));
                }
                Err(_) => early = Some(Error::invalid("every queue thread vanished")),
            }
        }
        if early.is_none() {
            let pid = rustix::process::getpid().as_raw_nonzero().get();
            let started = if self.recovering {
                self.ctrl.end_recovery(id, pid)
            } else {
                self.ctrl.start(id, pid)
            };
            if let Err(e) = started {
                early = Some(e);
            }
        }
        if let Some(e) = early {
            shutdown.trigger();
            join_all(threads);
            return Err(e);
        }

        // A stop that raced with START_DEV found nothing to stop: do it now.
        if self.stop_requested.load(Ordering::SeqCst) {
            self.ctrl.stop(id)?;
        } else {
            let info = self.ctrl.dev_info(id).unwrap_or(self.info);
            on_live(&Live {
                info,
                queue_tids,
                queue_cpus,
            });
        }

        let mut exited = 0;
        while exited < queues {
            // A queue thread wakes the waiter as it exits.
            let (q, result) = match crate::waiter::recv(&rx, waiter) {
                Ok(QueueEvent::Exited { q, result }) => (q, result),
                Ok(QueueEvent::Ready { .. }) => continue,
                // Every thread has gone and dropped its sender.
                Err(_) => break,
            };
            exited += 1;
            if let Err(e) = result {
                // One queue is gone, so this server is broken. The caller
                // must now exit the process, as a crash would: the kernel
                // then quiesces a recoverable device for a new daemon, or
                // stops any other (DEAD, for `del`). The other queues keep
                // their rings until then (see queue::serve for why).
                tracing::error!("queue {q} failed ({e}); device {id} is left to the kernel");
                self.armed = false;
                return Err(e);
            }
        }
        join_all(threads);
        self.finish()
    }

    /// Release `/dev/ublkcN` and, if we stopped the device, delete it.
    fn finish(mut self) -> Result<()> {
        self.armed = false;
        let id = self.info.dev_id;
        let ours = self.stop_requested.load(Ordering::SeqCst);
        // DEL_DEV waits for every reference to the char device: drop ours first.
        self.cdev = None;
        if ours {
            match self.ctrl.del(id, DEL_TIMEOUT) {
                Ok(()) | Err(Error::NoSuchDevice(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if self.armed {
            // Added but never served (an error between add and serve): remove
            // it, after closing our own reference, or DEL_DEV waits for us.
            self.cdev = None;
            let id = self.info.dev_id;
            if let Err(e) = self.ctrl.del(id, DEL_TIMEOUT) {
                tracing::warn!("removing unused device {id}: {e}");
            }
        }
    }
}

/// Environment variable: `all` pins each queue thread to every CPU of its
/// queue's set instead of one of them (see [`queue_cpu`]), to measure what
/// one CPU is worth.
pub const QUEUE_AFFINITY_ENV: &str = "USERBLK_QUEUE_AFFINITY";

/// The CPU queue `q` of device `id` runs on: one of `affinity`, the CPUs
/// whose I/O the kernel sends to that queue (none known: not pinned).
///
/// One CPU, not the whole set: the queue thread and the io-wq workers it
/// creates (which inherit its mask) then stay together, so waking one
/// another is a local wake-up rather than a cross-CPU interrupt, and the
/// thread does not migrate. A one-queue device on a 2-CPU VM served file
/// reads at QD 1 1.8x faster pinned (rublk pins the same way). Devices
/// with one queue start on different CPUs (by id) so they do not pile up.
fn queue_cpu(affinity: &[usize], id: u32, q: u16) -> Vec<usize> {
    if affinity.is_empty() {
        return Vec::new();
    }
    let i = (id as usize).wrapping_add(usize::from(q)) % affinity.len();
    vec![affinity[i]]
}

fn join_all(threads: Vec<std::thread::JoinHandle<()>>) {
    for t in threads {
        if t.join().is_err() {
            tracing::error!("a queue thread panicked");
        }
    }
}

/// How long to wait for `/dev/ublkcN` to appear and, for an unprivileged
/// device, for udev to hand it to its owner.
const CHAR_DEVICE_WAIT: Duration = Duration::from_secs(5);

/// Open `/dev/ublkcN`, which appears asynchronously after ADD_DEV. An
/// unprivileged device's node is root's until udev runs the
/// `userblk-owner` helper, so EACCES is retried like ENOENT.
fn open_char_device(id: u32) -> Result<OwnedFd> {
    let path = char_path(id);
    let deadline = Instant::now() + CHAR_DEVICE_WAIT;
    loop {
        match rustix::fs::open(&path, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => return Ok(fd),
            Err(Errno::NOENT | Errno::ACCESS | Errno::PERM) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e @ (Errno::ACCESS | Errno::PERM)) => {
                return Err(Error::invalid(format!(
                    "{}: {} after {} s: the node was not handed to its owner (is the userblk udev rule installed? see docs/unprivileged.md)",
                    path.display(),
                    std::io::Error::from(e),
                    CHAR_DEVICE_WAIT.as_secs()
                )))
            }
            Err(e) => return Err(Error::path(path, e)),
        }
    }
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaped yet).
pub fn process_gone(pid: i32) -> bool {
    !crate::sys::process_runs(pid)
}

/// Stop and delete device `id`: STOP_DEV, wait for its server to exit, DEL_DEV.
///
/// The server keeps serving in-flight I/O until STOP_DEV returns, then sees
/// its fetches aborted and exits; later I/O to `/dev/ublkbN` fails.
pub fn delete(ctrl: &mut Control, id: u32, wait: Duration) -> Result<()> {
    let info = ctrl.dev_info(id)?;
    let pid = info.ublksrv_pid;
    ctrl.stop(id)?;
    if pid > 0 && pid != rustix::process::getpid().as_raw_nonzero().get() {
        let deadline = Instant::now() + wait;
        if !crate::sys::wait_while(pid, deadline, || !process_gone(pid)) {
            tracing::warn!("server {pid} of device {id} has not exited; deleting anyway");
        }
    }
    match ctrl.del(id, DEL_TIMEOUT) {
        Ok(()) | Err(Error::NoSuchDevice(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_options_become_flags() {
        let none = DeviceOptions::default();
        assert_eq!(none.flags(), 0);
        let o = DeviceOptions {
            recovery: Recovery::Reissue,
            unprivileged: true,
            user_copy: true,
            zero_copy: ZeroCopy::On,
            ..none
        };
        assert_eq!(
            o.flags(),
            UBLK_F_USER_RECOVERY
                | UBLK_F_USER_RECOVERY_REISSUE
                | UBLK_F_UNPRIVILEGED_DEV
                | UBLK_F_USER_COPY
                | UBLK_F_AUTO_BUF_REG
        );
        let on = DeviceOptions {
            recovery: Recovery::On,
            zero_copy: ZeroCopy::IfOffered,
            ..none
        };
        let cfg = DeviceConfig::default().with_options(&on);
        assert_eq!(cfg.flags, UBLK_F_USER_RECOVERY);
        assert!(cfg.zero_copy_if_offered);
    }

    #[test]
    fn fail_io_and_no_partitions_become_flags() {
        let o = DeviceOptions {
            recovery: Recovery::FailIo,
            no_partitions: true,
            ..DeviceOptions::default()
        };
        assert_eq!(
            o.flags(),
            UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_FAIL_IO | UBLK_F_NO_AUTO_PART_SCAN
        );
    }

    #[test]
    fn user_copy_falls_back_where_refused() {
        let with = UBLK_F_USER_COPY | UBLK_F_USER_RECOVERY;
        let k612 = Features(0x1fe);
        let k60 = Features(0x06);
        assert_eq!(copy_mode_fallback(with, k612, true), with);
        assert_eq!(copy_mode_fallback(with, k60, true), UBLK_F_USER_RECOVERY);
        assert_eq!(copy_mode_fallback(with, k612, false), UBLK_F_USER_RECOVERY);
        // Not asked for: nothing changes.
        assert_eq!(
            copy_mode_fallback(UBLK_F_USER_RECOVERY, k60, false),
            UBLK_F_USER_RECOVERY
        );
    }

    #[test]
    fn zero_copy_falls_back_where_refused() {
        let with = UBLK_F_AUTO_BUF_REG | UBLK_F_USER_RECOVERY;
        let k612 = Features(0x1fe);
        // 6.16: bits 0-13 (zero copy and auto registration among them).
        let k616 = Features(0x3fff);
        assert_eq!(copy_mode_fallback(with, k616, true), with);
        assert_eq!(copy_mode_fallback(with, k612, true), UBLK_F_USER_RECOVERY);
        assert_eq!(copy_mode_fallback(with, k616, false), UBLK_F_USER_RECOVERY);
        assert_eq!(
            copy_mode_fallback(UBLK_F_USER_RECOVERY, k612, true),
            UBLK_F_USER_RECOVERY
        );
    }

    #[test]
    fn zero_copy_where_offered_only_on_kernels_and_devices_that_have_it() {
        let k612 = Features(0x1fe);
        let k616 = Features(0x3fff);
        let wants = DeviceConfig {
            zero_copy_if_offered: true,
            ..Default::default()
        };
        assert!(zero_copy_offered(&wants, 0, k616, true));
        assert!(zero_copy_offered(&wants, UBLK_F_USER_RECOVERY, k616, true));
        assert!(!zero_copy_offered(&wants, 0, k612, true));
        assert!(!zero_copy_offered(&wants, 0, Features(0), true));
        assert!(!zero_copy_offered(&wants, 0, k616, false));
        assert!(!zero_copy_offered(
            &wants,
            UBLK_F_UNPRIVILEGED_DEV,
            k616,
            true
        ));
        assert!(!zero_copy_offered(&wants, UBLK_F_USER_COPY, k616, true));
        assert!(!zero_copy_offered(&DeviceConfig::default(), 0, k616, true));
    }

    #[test]
    fn each_queue_gets_one_cpu_of_its_set() {
        assert_eq!(queue_cpu(&[], 0, 0), Vec::<usize>::new());
        assert_eq!(queue_cpu(&[0, 1], 0, 0), vec![0]);
        assert_eq!(queue_cpu(&[0, 1], 1, 0), vec![1]);
        assert_eq!(queue_cpu(&[0, 1], 2, 0), vec![0]);
        assert_eq!(queue_cpu(&[3], 7, 1), vec![3]);
        assert_eq!(queue_cpu(&[4, 5, 6], 0, 2), vec![6]);
    }

    #[test]
    fn config_ranges() {
        assert!(DeviceConfig::default().check().is_ok());
        let bad = [
            DeviceConfig {
                queues: 0,
                ..Default::default()
            },
            DeviceConfig {
                queues: 4097,
                ..Default::default()
            },
            DeviceConfig {
                depth: 0,
                ..Default::default()
            },
            DeviceConfig {
                depth: 4097,
                ..Default::default()
            },
            DeviceConfig {
                io_buf_bytes: 1000,
                ..Default::default()
            },
            DeviceConfig {
                io_buf_bytes: 64 << 20,
                ..Default::default()
            },
            DeviceConfig {
                id: Some(u32::MAX),
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(c.check().is_err(), "{c:?}");
        }
    }

    #[test]
    fn processes() {
        assert!(!process_gone(
            rustix::process::getpid().as_raw_nonzero().get()
        ));
        assert!(process_gone(-1));
        assert!(process_gone(0));
    }
}
