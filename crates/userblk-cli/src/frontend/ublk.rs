//! The ublk frontend in the CLI: a `/dev/ublkbN` served through the
//! kernel's ublk driver, recoverable after a daemon's death (`-r`).

use std::ffi::OsString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context};
use userblk::spec::MemData;
use userblk::state::{self, DeviceState};
use userblk::ublk::ctrl::block_path;
use userblk::ublk::ctrl::{running_as_root, state_name};
use userblk::ublk::device::{DeviceOptions, Recovery, ZeroCopy};
use userblk::ublk::io_mode::IoMode;
use userblk::ublk::{Control, Device, DeviceConfig, Features, Live, Stopper};
use userblk_uapi::{UBLK_S_DEV_FAIL_IO, UBLK_S_DEV_LIVE, UBLK_S_DEV_QUIESCED};

use super::lifecycle::{Frontend, Host, Stop};
use crate::cli::{DevArgs, IoModeArg};
use crate::targets::{self, Opened};

/// A ublk device being served.
pub struct Ublk {
    dev: DevArgs,
    /// The device to recover instead of adding one.
    recover_id: Option<u32>,
    /// Its state as its dead daemon saved it.
    previous: Option<DeviceState>,
    /// The id to ask the kernel for (`None`: its choice), once claimed.
    id: Option<u32>,
    /// Set once the device exists; a signal before that stops it as soon as it does.
    stopper: Arc<Mutex<Option<Stopper>>>,
    stop_early: Arc<AtomicBool>,
}

impl Ublk {
    /// Check what `dev` asks for; with `--adopt` or `--recover-id`, find the
    /// device to recover and its saved state.
    pub fn new(dev: &DevArgs) -> anyhow::Result<Self> {
        let recover_id = match (dev.recover_id, dev.adopt) {
            (Some(id), _) => Some(id),
            (None, true) => adoptable(dev.id)?,
            (None, false) => None,
        };
        let previous = match recover_id {
            Some(id) => Some(
                DeviceState::load(id)?
                    .with_context(|| format!("no saved state for device {id}"))?,
            ),
            None => None,
        };
        Ok(Ublk {
            dev: dev.clone(),
            recover_id,
            previous,
            id: None,
            stopper: Arc::new(Mutex::new(None)),
            stop_early: Arc::new(AtomicBool::new(false)),
        })
    }

    fn recovery(&self) -> Recovery {
        match (self.dev.recovery, self.dev.reissue) {
            _ if self.dev.fail_io => Recovery::FailIo,
            (_, true) => Recovery::Reissue,
            (true, false) => Recovery::On,
            (false, false) => Recovery::Off,
        }
    }

    /// The device options the flags ask for, for a target that moves its
    /// data on the ring only (`on_ring`) or not.
    fn options(&self, on_ring: bool) -> DeviceOptions {
        let root = running_as_root();
        if self.dev.unprivileged && root {
            tracing::info!("running as root: the kernel makes the device privileged");
        }
        let zero_copy = if self.dev.zero_copy {
            if !on_ring {
                tracing::warn!(
                    "zero copy: only the null, mem, file, qcow2 and s3 targets, alone or under filters that never touch data (such as stats), \
                     move data on the ring; request data is copied through the daemon's buffers instead"
                );
            }
            if on_ring {
                ZeroCopy::On
            } else {
                ZeroCopy::Off
            }
        } else if on_ring && !self.dev.no_zero_copy && !self.dev.user_copy {
            // Zero copy by default where it works: 1.4-2x for the file target,
            // and no copy at all for null.
            ZeroCopy::IfOffered
        } else {
            ZeroCopy::Off
        };
        DeviceOptions {
            recovery: self.recovery(),
            unprivileged: self.dev.unprivileged || !root,
            user_copy: self.dev.user_copy,
            zero_copy,
            no_partitions: self.dev.no_partitions,
        }
    }
}

impl Frontend for Ublk {
    fn mem_data(&self) -> MemData {
        match self.previous.as_ref().and_then(targets::shared_path) {
            Some(path) => MemData::Reopen(path),
            None if self.recovery() != Recovery::Off => {
                MemData::NewFile(targets::new_shared_path())
            }
            None => MemData::Private,
        }
    }

    fn serves_this_kernel(&self) -> bool {
        true
    }

    fn stopper(&self) -> Stop {
        let stopper = Arc::clone(&self.stopper);
        let stop_early = Arc::clone(&self.stop_early);
        Box::new(move |sig| {
            tracing::info!("signal {sig}: stopping the device");
            crate::notify::stopping();
            stop_early.store(true, Ordering::SeqCst);
            let guard = stopper.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(s) = guard.as_ref() {
                if let Err(e) = s.stop() {
                    tracing::error!("stopping: {e}");
                }
            }
        })
    }

    fn claim(&mut self) -> anyhow::Result<()> {
        self.id = self.recover_id.or_else(|| ublk_id(self.dev.id));
        Ok(())
    }

    fn serve(&mut self, opened: Opened, host: &Host) -> anyhow::Result<()> {
        let target = opened.target;
        let caps = target.caps();
        let cfg = DeviceConfig {
            id: self.id,
            queues: self.dev.queues.unwrap_or(1),
            depth: self.dev.depth,
            io_buf_bytes: self.dev.io_buf_size,
            io_mode: match self.dev.io_mode {
                IoModeArg::Auto => IoMode::Auto,
                IoModeArg::Batch => IoMode::Batch,
                IoModeArg::PerTag => IoMode::PerTag,
            },
            ..DeviceConfig::default()
        }
        .with_options(&self.options(target.data_on_ring_only()));
        let saved = self
            .previous
            .as_ref()
            .map_or_else(|| host.args(), |p| p.args.clone());
        let mut device_id = None;
        let result = (|| -> anyhow::Result<()> {
            let dev = match self.recover_id {
                Some(id) => {
                    crate::notify::status(&format!("recovering device {id}"));
                    Device::recover(id, &caps).with_context(|| format!("recovering device {id}"))?
                }
                None => Device::add(&cfg, &caps).map_err(super::limits::explain_add)?,
            };
            let id = dev.info().dev_id;
            device_id = Some(id);
            host.device_id(id);
            let _metrics = state::count_requests(id, self.recover_id.is_some());
            let _resize = opened.registry.on_resize(super::resize::ublk(
                id,
                dev.info().flags,
                Arc::clone(&target),
            ));
            {
                let mut guard = self.stopper.lock().unwrap_or_else(PoisonError::into_inner);
                *guard = Some(dev.stopper());
                if self.stop_early.load(Ordering::SeqCst) {
                    if let Some(s) = guard.as_ref() {
                        s.stop()?;
                    }
                }
            }
            let quiescer = dev.quiescer();
            // Only a device that can be quiesced offers `handover` (`ctl` lists it).
            let _handover = quiescer
                .can_quiesce()
                .then(|| super::upgrade::offer_handover(&opened.registry, &quiescer));
            let describe = target.describe();
            // This thread waits for the queues in `host`'s wait, which also
            // hands on signals and answers `ctl`: the queues' threads and
            // this one are the daemon's.
            let served = dev.serve_with(
                Arc::clone(&target),
                |live| on_live(live, describe, saved, self.dev.scheduler.as_deref(), host),
                host,
            );
            // A recoverable device left behind by a failure needs its state for `recover`.
            let waits_for_recovery = served.is_err()
                && Control::open()
                    .and_then(|mut c| c.dev_info(id))
                    .is_ok_and(|i| Features(i.flags).has_user_recovery());
            // Handed to a new daemon: it reads the state to take over.
            if !waits_for_recovery && !quiescer.handed_over() {
                DeviceState::remove(id);
            }
            match served {
                // It names its device itself.
                Err(e @ userblk::Error::NoAnswer { .. }) => Err(e.into()),
                served => served.with_context(|| format!("device {id}")),
            }
        })();
        if let Some(path) = &opened.shared {
            // The data must outlive a daemon that dies, not a device that is gone.
            let gone = match device_id {
                Some(id) => matches!(
                    Control::open().and_then(|mut c| c.dev_info(id)),
                    Err(userblk::Error::NoSuchDevice(_))
                ),
                None => self.recover_id.is_none(),
            };
            if gone {
                targets::remove_shared(path);
            }
        }
        result
    }
}

/// With `--adopt`: the device to recover instead of adding, if device `id`
/// exists and waits for a new daemon (QUIESCED).
fn adoptable(id: Option<u32>) -> anyhow::Result<Option<u32>> {
    let id = id.context("--adopt needs a device id (-n ID)")?;
    match Control::open()?.dev_info(id) {
        Ok(info) if matches!(info.state, UBLK_S_DEV_QUIESCED | UBLK_S_DEV_FAIL_IO) => {
            tracing::info!("device {id} is waiting for a daemon: recovering it");
            Ok(Some(id))
        }
        Ok(_) | Err(userblk::Error::NoSuchDevice(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The lowest id free among ublk devices and devices of other frontends,
/// when the kernel's own choice could collide with a FUSE device's id.
fn ublk_id(wanted: Option<u32>) -> Option<u32> {
    if wanted.is_some() {
        return wanted;
    }
    let saved = DeviceState::ids();
    let others = saved
        .iter()
        .any(|&id| DeviceState::load(id).is_ok_and(|s| s.is_some_and(|s| s.frontend != "ublk")));
    if !others {
        return None;
    }
    let kernel = userblk::ublk::ctrl::device_ids();
    (0..u32::MAX).find(|id| !kernel.contains(id) && !saved.contains(id))
}

/// The device is live: record its state and announce it with the kernel's view of it.
fn on_live(
    live: &Live,
    target: serde_json::Value,
    args: Vec<String>,
    scheduler: Option<&str>,
    host: &Host,
) {
    let id = live.info.dev_id;
    let st = DeviceState {
        id,
        name: host.name(),
        pid: rustix::process::getpid().as_raw_nonzero().get(),
        frontend: "ublk".into(),
        block_device: block_path(id).display().to_string(),
        target,
        args,
        queue_tids: live.queue_tids.clone(),
        queue_cpus: live.queue_cpus.clone(),
        log: host.log(id),
        fuse: None,
        nbd: None,
    };
    if let Err(e) = st.save() {
        tracing::warn!("{e}");
    }
    set_scheduler(id, scheduler);
    let mut details = String::new();
    if Features(live.info.flags).has_unprivileged() && !wait_for_block_access(id) {
        let msg = format!(
            "{} is not accessible to uid {} yet: is the userblk udev rule installed? (see docs/unprivileged.md)",
            block_path(id).display(),
            rustix::process::geteuid().as_raw()
        );
        tracing::warn!("{msg}");
        details += &format!("warning: {msg}\n");
    }
    details += &match Control::open().and_then(|mut c| crate::list::entry(&mut c, id)) {
        Ok(entry) => entry.text(),
        Err(e) => format!("dev id {id}: live ({e})\n"),
    };
    host.announce(id, &block_path(id).display().to_string(), &details);
    tracing::info!("device {id} live at {}", block_path(id).display());
}

/// Gives the device the I/O scheduler asked for (`none` unless said); a
/// failure is said only when the user named one (an unprivileged daemon
/// cannot write sysfs, and the device works either way).
fn set_scheduler(id: u32, asked: Option<&str>) {
    let name = asked.unwrap_or("none");
    if name == "kernel" {
        return;
    }
    match userblk::ublk::ctrl::set_scheduler(id, name) {
        Ok(()) => tracing::debug!("device {id}: I/O scheduler {name}"),
        Err(e) if asked.is_some() => tracing::warn!("--scheduler {name}: {e}"),
        Err(e) => tracing::debug!("device {id}: keeping the kernel's I/O scheduler: {e}"),
    }
}

/// An unprivileged device's `/dev/ublkbN` is root's until udev hands it to
/// its owner: wait a little, so that `add` returns with a usable device.
/// Returns whether it became accessible.
fn wait_for_block_access(id: u32) -> bool {
    use rustix::fs::Access;
    let path = block_path(id);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while rustix::fs::access(&path, Access::READ_OK | Access::WRITE_OK).is_err() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// `userblk recover -n ID`: check the device can be recovered, and give the
/// arguments of a daemon that recovers it (those saved when it was added).
pub fn recover_argv(id: u32) -> anyhow::Result<Vec<OsString>> {
    let mut ctrl = Control::open()?;
    let info = ctrl.dev_info(id)?;
    if !Features(info.flags).has_user_recovery() {
        bail!("device {id} was created without recovery (add -r); delete it with `userblk del -n {id}`");
    }
    match info.state {
        UBLK_S_DEV_QUIESCED | UBLK_S_DEV_FAIL_IO => {}
        UBLK_S_DEV_LIVE => bail!(
            "device {id} is LIVE: its daemon (pid {}) is running, nothing to recover",
            info.ublksrv_pid
        ),
        other => bail!(
            "device {id} is {} and cannot be recovered; delete it with `userblk del -n {id}`",
            state_name(other)
        ),
    }
    let saved = DeviceState::load(id)?.with_context(|| {
        format!(
            "no saved state for device {id} in {}: only devices added by userblk can be recovered",
            state::state_dir().display()
        )
    })?;
    recover_argv_for_upgrade(&saved)
}

/// The arguments of a daemon that recovers the device `saved` describes
/// (its `add` command line, run again with `--recover-id`).
pub fn recover_argv_for_upgrade(saved: &DeviceState) -> anyhow::Result<Vec<OsString>> {
    let id = saved.id;
    if saved.args.first().map(String::as_str) != Some("add") {
        bail!(
            "saved state of device {id} has no add command line: {:?}",
            saved.args
        );
    }
    let mut argv: Vec<OsString> = saved.args.iter().map(OsString::from).collect();
    argv.extend([
        "--foreground".into(),
        "--recover-id".into(),
        id.to_string().into(),
    ]);
    Ok(argv)
}

/// `del` of a ublk device: stop and delete it in the kernel, then its
/// state and a mem device's data file.
pub fn delete(
    ctrl: &mut Control,
    id: u32,
    saved: Option<&DeviceState>,
    timeout: Duration,
    force: bool,
) -> anyhow::Result<()> {
    if force {
        userblk::ublk::stop::force_delete(ctrl, id, timeout)?;
    } else {
        userblk::ublk::stop::delete_unless_held(ctrl, id, timeout).map_err(|e| match e {
            e @ userblk::Error::Held { .. } => crate::exit::in_use(format!(
                "device {id}: {e}; close or unmount it first, or `userblk del -n {id} --force` stops it anyway"
            )),
            e => e.into(),
        })?;
    }
    DeviceState::remove(id);
    if let Some(path) = saved.and_then(targets::shared_path) {
        targets::remove_shared(path.as_path());
    }
    Ok(())
}
