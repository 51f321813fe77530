//! `add`: open the target, create the device, serve it.
//!
//! Without `--foreground`, `add` re-runs itself as a detached daemon and
//! waits on the daemon's stdout: the daemon prints the device's details and
//! a marker once the device is live, then moves its output to a log file.
//! If the daemon dies first, the pipe closes and `add` reports the daemon's
//! error instead of hanging.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use userblk::ublk::ctrl::block_path;
use userblk::ublk::ctrl::{running_as_root, state_name};
use userblk::ublk::{state, Control, Device, DeviceConfig, DeviceState, Features, Live, Stopper};
use userblk_uapi::{
    UBLK_F_UNPRIVILEGED_DEV, UBLK_F_USER_RECOVERY, UBLK_F_USER_RECOVERY_REISSUE, UBLK_S_DEV_LIVE,
    UBLK_S_DEV_QUIESCED,
};

use crate::cli::{AddArgs, DevArgs, Frontend, RecoverArgs};

/// Set in the daemon's environment by the `add` that spawned it.
const DAEMON_ENV: &str = "USERBLK_DAEMON";
/// Printed by the daemon after the device details, once the device is live.
pub(crate) const READY_MARKER: &str = "--userblk-device-live--";

/// `userblk add`.
pub fn run(args: AddArgs) -> anyhow::Result<()> {
    if !running_as_root() && (args.dev.recovery || args.dev.reissue) {
        bail!(
            "-r/--recovery and --reissue need root: the kernel clears user recovery for unprivileged devices (see docs/unprivileged.md)"
        );
    }
    let daemon = std::env::var_os(DAEMON_ENV).is_some();
    if args.dev.foreground || daemon {
        serve(args, daemon)
    } else {
        let mut argv: Vec<OsString> = std::env::args_os().skip(1).collect();
        argv.push("--foreground".into());
        spawn_daemon(argv)
    }
}

/// `userblk recover -n ID`: check the device can be recovered, then start a
/// daemon with the arguments saved when it was added.
pub fn recover(args: &RecoverArgs) -> anyhow::Result<()> {
    let id = args.id;
    let mut ctrl = Control::open()?;
    let info = ctrl.dev_info(id)?;
    if !Features(info.flags).has_user_recovery() {
        bail!("device {id} was created without recovery (add -r); delete it with `userblk del -n {id}`");
    }
    match info.state {
        UBLK_S_DEV_QUIESCED => {}
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
    spawn_daemon(argv)
}

/// With `--adopt`: the device to recover instead of adding, if device `id`
/// exists and waits for a new daemon (QUIESCED).
fn adoptable(id: Option<u32>) -> anyhow::Result<Option<u32>> {
    let id = id.context("--adopt needs a device id (-n ID)")?;
    match Control::open()?.dev_info(id) {
        Ok(info) if info.state == UBLK_S_DEV_QUIESCED => {
            tracing::info!("device {id} is waiting for a daemon: recovering it");
            Ok(Some(id))
        }
        Ok(_) | Err(userblk::Error::NoSuchDevice(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The arguments of this `add`, as saved for `list` and `recover`.
pub(crate) fn saved_args() -> Vec<String> {
    std::env::args()
        .skip(1)
        .filter(|a| a != "--foreground")
        .collect()
}

fn spawn_daemon(argv: Vec<OsString>) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the userblk executable")?;
    let mut child = Command::new(exe)
        .args(argv)
        .env(DAEMON_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the daemon")?;
    let mut stderr = child.stderr.take().context("daemon stderr")?;
    // What the daemon says on stderr before it is live (its errors, or
    // warnings such as a feature the kernel refused): the pipe ends when
    // the daemon moves its output to its log file, right after going live.
    let (said_tx, said) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        let _ = said_tx.send(s);
    });
    let stdout = child.stdout.take().context("daemon stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading from the daemon")?;
        if line == READY_MARKER {
            if let Ok(text) = said.recv_timeout(std::time::Duration::from_millis(500)) {
                // Its warnings matter to whoever ran `add`; its info lines
                // are in the log.
                let loud = |l: &&str| l.contains(" WARN ") || l.contains(" ERROR ");
                for l in text.lines().filter(loud) {
                    eprintln!("{l}");
                }
            }
            return Ok(());
        }
        // Best effort: a reader that went (`add ... | head -1`) must not
        // stop us reading until the daemon is ready.
        crate::out::announce(&format!("{line}\n"));
    }
    // The pipe closed without the marker: the daemon is gone.
    let status = child.wait().context("waiting for the daemon")?;
    let text = said.recv().unwrap_or_default();
    let mut lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines.pop().unwrap_or("");
    for l in lines {
        eprintln!("{l}");
    }
    match last.strip_prefix("userblk: ") {
        Some(msg) => bail!("{msg}"),
        None if !last.is_empty() => {
            bail!("the daemon exited ({status}) before the device was live: {last}")
        }
        None => bail!("the daemon exited ({status}) before the device was live"),
    }
}

/// Which frontend serves the device, after `auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chosen {
    Ublk,
    Fuse { with_loop: bool },
    Nbd,
}

/// Resolve `--frontend` and check the options fit the frontend.
fn choose_frontend(dev: &DevArgs) -> anyhow::Result<Chosen> {
    let needs_ublk = dev.recovery || dev.reissue || dev.adopt || dev.recover_id.is_some();
    let fuse_only = dev.mountpoint.is_some() || dev.loop_dev || dev.no_loop || dev.allow_other;
    let nbd_only = !dev.listen.is_empty();
    let chosen = match dev.frontend {
        Frontend::Ublk => Chosen::Ublk,
        Frontend::Fuse => Chosen::Fuse {
            with_loop: dev.loop_dev,
        },
        Frontend::Nbd => Chosen::Nbd,
        Frontend::Auto if nbd_only => Chosen::Nbd,
        Frontend::Auto if needs_ublk => Chosen::Ublk,
        Frontend::Auto => match Control::open() {
            Ok(_) if !fuse_only => Chosen::Ublk,
            Ok(_) => Chosen::Fuse {
                with_loop: dev.loop_dev,
            },
            Err(e @ (userblk::Error::NoUblk | userblk::Error::NoControlAccess)) => {
                let root = running_as_root();
                let with_loop = dev.loop_dev || (root && !dev.no_loop);
                tracing::info!(
                    "ublk is not usable ({e}); using the FUSE frontend{}",
                    if with_loop { " with a loop device" } else { "" }
                );
                Chosen::Fuse { with_loop }
            }
            Err(e) => return Err(e.into()),
        },
    };
    match chosen {
        Chosen::Nbd if dev.listen.is_empty() => bail!(
            "the NBD frontend needs an address: add --listen unix:PATH or --listen tcp:HOST:PORT"
        ),
        Chosen::Nbd if needs_ublk => bail!(
            "recovery (-r, --reissue, --adopt) needs the ublk frontend: NBD clients reconnect to a restarted server instead"
        ),
        Chosen::Nbd if fuse_only => bail!(
            "--mountpoint, --loop, --no-loop and --allow-other are FUSE options, not NBD ones"
        ),
        Chosen::Nbd if dev.unprivileged => {
            bail!("--unprivileged is a ublk option: an NBD server runs as whoever starts it")
        }
        Chosen::Ublk | Chosen::Fuse { .. } if nbd_only => {
            bail!("--listen is an NBD option: use --frontend nbd")
        }
        Chosen::Fuse { .. } if needs_ublk => bail!(
            "recovery (-r, --reissue, --adopt) needs the ublk frontend: the FUSE frontend cannot keep a device across a daemon's death"
        ),
        Chosen::Fuse { .. } if dev.unprivileged => {
            bail!("--unprivileged is a ublk option: a FUSE device always belongs to the user who adds it")
        }
        Chosen::Fuse { .. } if dev.queues.is_some() => {
            userblk::fuse::disk::check_threads(dev.queues.map_or(0, usize::from))?;
            Ok(chosen)
        }
        Chosen::Ublk if fuse_only => bail!(
            "--mountpoint, --loop, --no-loop and --allow-other are FUSE options: add --frontend fuse"
        ),
        c => Ok(c),
    }
}

fn serve(args: AddArgs, daemon: bool) -> anyhow::Result<()> {
    if daemon {
        // Leave the caller's session so its terminal's signals do not reach us.
        let _ = rustix::process::setsid();
    }
    match choose_frontend(&args.dev)? {
        Chosen::Ublk => serve_ublk(args, daemon),
        Chosen::Fuse { with_loop } => crate::fuse::serve(args, daemon, with_loop),
        Chosen::Nbd => crate::nbd::serve(args, daemon),
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

fn serve_ublk(args: AddArgs, daemon: bool) -> anyhow::Result<()> {
    let recover_id = match (args.dev.recover_id, args.dev.adopt) {
        (Some(id), _) => Some(id),
        (None, true) => adoptable(args.dev.id)?,
        (None, false) => None,
    };
    let previous = match recover_id {
        Some(id) => Some(
            DeviceState::load(id)?.with_context(|| format!("no saved state for device {id}"))?,
        ),
        None => None,
    };
    let recoverable = args.dev.recovery || args.dev.reissue;
    let opened = crate::targets::open(
        &args.target,
        &args.filters(),
        recoverable,
        previous.as_ref(),
    )?;
    let target = opened.target;
    let caps = target.caps();
    caps.check().context("target")?;

    let root = running_as_root();
    if root {
        if let Err(e) = userblk::sys::lock_memory() {
            tracing::warn!("{e}; memory is not locked");
        }
    }
    // A user has no mlockall: with MCL_FUTURE under RLIMIT_MEMLOCK the
    // target's and the queues' allocations would fail instead.
    //
    // The daemon stays in the caller's mount namespace. A private one would
    // copy every mount that exists now and keep those file systems alive
    // after the user unmounts them: for `recover`, the one on this very
    // device, which then never gets a clean unmount. In the shared namespace
    // the daemon's exit unmounts nothing, so it cannot deadlock on its own
    // device either. It only must not pin the caller's working directory.
    if daemon {
        let _ = std::env::set_current_dir("/");
    }

    // Signals are caught from before the device exists, so none can kill
    // us half-way and leave a stray device behind.
    let stopper: Arc<Mutex<Option<Stopper>>> = Arc::new(Mutex::new(None));
    let stop_early = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("installing signal handlers")?;
    let sig_handle = signals.handle();
    let sig_thread = {
        let stopper = Arc::clone(&stopper);
        let stop_early = Arc::clone(&stop_early);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    tracing::info!("signal {sig}: stopping the device");
                    stop_early.store(true, std::sync::atomic::Ordering::SeqCst);
                    let guard = stopper
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if let Some(s) = guard.as_ref() {
                        if let Err(e) = s.stop() {
                            tracing::error!("stopping: {e}");
                        }
                    }
                }
            })?
    };

    let mut flags = 0;
    if recoverable {
        flags |= UBLK_F_USER_RECOVERY;
    }
    if args.dev.reissue {
        flags |= UBLK_F_USER_RECOVERY_REISSUE;
    }
    if args.dev.user_copy {
        flags |= userblk_uapi::UBLK_F_USER_COPY;
    }
    if args.dev.zero_copy {
        if target.data_on_ring_only() {
            flags |= userblk_uapi::UBLK_F_AUTO_BUF_REG;
        } else {
            tracing::warn!(
                "zero copy: only the file target without filters moves data on the ring; \
                 request data is copied through the daemon's buffers instead"
            );
        }
    }
    if args.dev.unprivileged || !root {
        if root {
            tracing::info!("running as root: the kernel makes the device privileged");
        }
        flags |= UBLK_F_UNPRIVILEGED_DEV;
    }
    let cfg = DeviceConfig {
        id: ublk_id(args.dev.id),
        queues: args.dev.queues.unwrap_or(1),
        depth: args.dev.depth,
        io_buf_bytes: args.dev.io_buf_size,
        flags,
        // Zero copy by default where it works: 1.4-2x for the file target.
        zero_copy_if_offered: !args.dev.no_zero_copy
            && !args.dev.user_copy
            && target.data_on_ring_only(),
    };
    let saved = previous
        .as_ref()
        .map_or_else(saved_args, |p| p.args.clone());
    let mut device_id = None;
    let result = (|| -> anyhow::Result<()> {
        let dev = match recover_id {
            Some(id) => {
                Device::recover(id, &caps).with_context(|| format!("recovering device {id}"))?
            }
            None => Device::add(&cfg, &caps)?,
        };
        let id = dev.info().dev_id;
        device_id = Some(id);
        {
            let mut guard = stopper
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *guard = Some(dev.stopper());
            if stop_early.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(s) = guard.as_ref() {
                    s.stop()?;
                }
            }
        }
        let describe = target.describe();
        let served = dev.serve(Arc::clone(&target), |live| {
            on_live(live, describe, saved, daemon)
        });
        // A recoverable device left behind by a failure needs its state for `recover`.
        let waits_for_recovery = served.is_err()
            && Control::open()
                .and_then(|mut c| c.dev_info(id))
                .is_ok_and(|i| Features(i.flags).has_user_recovery());
        if !waits_for_recovery {
            DeviceState::remove(id);
        }
        served.with_context(|| format!("device {id}"))
    })();
    sig_handle.close();
    let _ = sig_thread.join();
    if let Some(path) = &opened.shared {
        // The data must outlive a daemon that dies, not a device that is gone.
        let gone = match device_id {
            Some(id) => matches!(
                Control::open().and_then(|mut c| c.dev_info(id)),
                Err(userblk::Error::NoSuchDevice(_))
            ),
            None => recover_id.is_none(),
        };
        if gone {
            crate::targets::remove_shared(path);
        }
    }
    result
}

/// The device is live: record its state, print its details, and as a
/// daemon, tell the waiting `add` and move output to the log.
fn on_live(live: &Live, target: serde_json::Value, args: Vec<String>, daemon: bool) {
    let id = live.info.dev_id;
    let log = daemon.then(|| state::state_dir().join(format!("{id}.log")));
    let st = DeviceState {
        id,
        pid: rustix::process::getpid().as_raw_nonzero().get(),
        frontend: "ublk".into(),
        block_device: block_path(id).display().to_string(),
        target,
        args,
        queue_tids: live.queue_tids.clone(),
        queue_cpus: live.queue_cpus.clone(),
        log: log.clone(),
        fuse: None,
        nbd: None,
    };
    if let Err(e) = st.save() {
        tracing::warn!("{e}");
    }
    if live.info.flags & UBLK_F_UNPRIVILEGED_DEV != 0 && !wait_for_block_access(id) {
        let msg = format!(
            "{} is not accessible to uid {} yet: is the userblk udev rule installed? (see docs/unprivileged.md)",
            block_path(id).display(),
            rustix::process::geteuid().as_raw()
        );
        tracing::warn!("{msg}");
        crate::out::announce(&format!("warning: {msg}\n"));
    }
    let details = Control::open().and_then(|mut c| crate::list::entry(&mut c, id));
    match details {
        Ok(entry) => crate::out::announce(&entry.text()),
        Err(e) => crate::out::announce(&format!("dev id {id}: live ({e})\n")),
    }
    if daemon {
        crate::out::announce(&format!("{READY_MARKER}\n"));
        if let Some(log) = log {
            redirect_output(&log);
        }
    }
    tracing::info!("device {id} live at {}", block_path(id).display());
}

/// An unprivileged device's `/dev/ublkbN` is root's until udev hands it to
/// its owner: wait a little, so that `add` returns with a usable device.
/// Returns whether it became accessible.
fn wait_for_block_access(id: u32) -> bool {
    use rustix::fs::Access;
    let path = block_path(id);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while rustix::fs::access(&path, Access::READ_OK | Access::WRITE_OK).is_err() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}

pub(crate) fn redirect_output(log: &std::path::Path) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log);
    match file {
        Ok(f) => {
            let _ = rustix::stdio::dup2_stdout(&f);
            let _ = rustix::stdio::dup2_stderr(&f);
        }
        Err(e) => {
            tracing::warn!("{}: {e}; logging to /dev/null", log.display());
            if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
                let _ = rustix::stdio::dup2_stdout(&null);
                let _ = rustix::stdio::dup2_stderr(&null);
            }
        }
    }
}
