//! `userblk upgrade -n ID [--binary PATH]`: hand a live ublk device to a
//! new daemon, possibly of a newer userblk, without an I/O error.
//!
//! Where the device has `UBLK_F_QUIESCE` (Linux 6.16+, added with `-r`),
//! the old daemon is asked through its control socket to quiesce the
//! device and exit once it served what it holds (`handover`, see
//! `userblk::ublk::handover`); requests meanwhile wait in the kernel.
//! Elsewhere a device added with `--reissue` has its daemon killed: the
//! kernel re-issues the requests it held to the next daemon. Either way a
//! new daemon then recovers the device from its saved state, as `recover`
//! does. Every wait has a deadline; a failure says who serves the device.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use userblk::control::{self, ControlError, Registration, Registry, Request};
use userblk::state::DeviceState;
use userblk::ublk::ctrl::state_name;
use userblk::ublk::handover::Quiescer;
use userblk::ublk::{Control, Features};
use userblk_uapi::{
    UBLK_F_BATCH_IO, UBLK_F_QUIESCE, UBLK_F_USER_RECOVERY, UBLK_F_USER_RECOVERY_FAIL_IO,
    UBLK_F_USER_RECOVERY_REISSUE, UBLK_S_DEV_LIVE, UBLK_S_DEV_QUIESCED,
};

use crate::cli::UpgradeArgs;

/// The control action a ublk daemon offers for `upgrade`.
const ACTION: &str = "handover";
/// How long the kernel may wait for every queue to have an idle tag.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the old daemon has to answer the handover request.
const ASK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the old daemon has to finish its requests, release its target
/// (flush, unlock, give up an s3 lease) and exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the kernel has to mark the device QUIESCED once the old daemon is gone.
const QUIESCED_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a daemon that closed its control connection without an
/// answer has to exit before it counts as still serving.
const GONE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `--binary PATH --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Offer the `handover` action on this daemon's control socket for as long
/// as the returned registration lives.
pub fn offer_handover(registry: &Registry, quiescer: &Quiescer) -> Registration {
    let q = quiescer.clone();
    registry.register(
        ACTION,
        "ublk",
        "quiesce the device and exit, for a new daemon to take over (`userblk upgrade`)",
        move |args| {
            let timeout = match args.first() {
                Some(ms) => Duration::from_millis(
                    ms.parse()
                        .map_err(|_| format!("bad timeout in ms: {ms:?}"))?,
                ),
                None => QUIESCE_TIMEOUT,
            };
            q.quiesce(timeout).map_err(|e| e.to_string())?;
            Ok("quiesced; exiting once the requests in hand are served".into())
        },
    )
}

/// How a device is handed over, or why it cannot be.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// QUIESCE_DEV through the old daemon, which exits cleanly.
    Quiesce,
    /// Kill the old daemon; the kernel re-issues what it held.
    KillReissue,
}

/// The plan for a device with `flags` on a kernel with `kernel`, or the
/// reason (one line) it cannot be upgraded.
fn plan(id: u32, flags: u64, kernel: Features) -> Result<Plan, String> {
    // The kernel fails the requests that arrive during a QUIESCE handover
    // of a batch-I/O device (see `handover::quiescable`): such a device is
    // handed over by kill + reissue, or not at all.
    let batch = flags & UBLK_F_BATCH_IO != 0;
    // While no daemon runs, such a device fails its I/O (FAIL_IO, not
    // QUIESCED): no handover of it can be without errors.
    if flags & UBLK_F_USER_RECOVERY_FAIL_IO != 0 {
        return Err(format!(
            "device {id} was added with --fail-io: its I/O fails while no daemon serves it, so handing it over would fail requests (add it with -r alone)"
        ));
    }
    if userblk::ublk::handover::quiescable(flags) {
        return Ok(Plan::Quiesce);
    }
    if batch && flags & UBLK_F_USER_RECOVERY_REISSUE == 0 {
        return Err(format!(
            "device {id} uses batch I/O, and the kernel fails the requests that arrive while such a device is quiesced for a new daemon (add it with --io-mode per-tag, or --reissue)"
        ));
    }
    if flags & UBLK_F_USER_RECOVERY_REISSUE != 0 {
        return Ok(Plan::KillReissue);
    }
    if flags & UBLK_F_USER_RECOVERY == 0 {
        return Err(format!(
            "device {id} was added without -r: it cannot outlive its daemon, so it cannot be upgraded (add it with -r)"
        ));
    }
    Err(if kernel.has(UBLK_F_QUIESCE) {
        format!(
            "device {id} was added without UBLK_F_QUIESCE (by an older userblk) and without --reissue: its daemon cannot hand it over without failing requests (add it again with -r)"
        )
    } else {
        format!(
            "this kernel has no UBLK_F_QUIESCE (Linux 6.16+) and device {id} was added without --reissue: killing its daemon would fail the requests it holds (add it with --reissue to upgrade on this kernel)"
        )
    })
}

/// `userblk upgrade`.
pub fn run(args: &UpgradeArgs) -> anyhow::Result<()> {
    let id = args.device.id()?;
    let exe = match &args.binary {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("finding the userblk executable")?,
    };
    let version = check_binary(&exe)?;
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    let saved = DeviceState::load(id)?;
    // Only a device with saved state gets a lock file (`del` removes it
    // with the state); the kernel's view is read under the lock.
    let _lock = match saved {
        Some(_) => Some(super::upgrade_lock::UpgradeLock::take(id)?),
        None => None,
    };
    if let Some(st) = saved.as_ref().filter(|st| st.frontend != "ublk") {
        bail!(
            "device {id} is served through {}: only ublk devices outlive their daemon, so only they can be upgraded",
            st.frontend
        );
    }
    let mut ctrl = Control::open()?;
    let info = ctrl.dev_info(id)?;
    let st = saved.with_context(|| {
        format!("device {id} has no saved state: only devices added by userblk can be upgraded")
    })?;
    if info.state != UBLK_S_DEV_LIVE {
        bail!(
            "device {id} is {}, not LIVE: nothing serves it to hand over{}",
            state_name(info.state),
            if info.state == UBLK_S_DEV_QUIESCED {
                format!(" (`userblk recover -n {id}` starts a daemon)")
            } else {
                String::new()
            }
        );
    }
    let old = info.ublksrv_pid;
    if st.pid != old || !st.daemon_alive() {
        bail!(
            "device {id}: its daemon (pid {old}) is not the one its saved state names (pid {}): not upgrading",
            st.pid
        );
    }
    let kernel = Features(ctrl.features()?);
    let how = plan(id, info.flags, kernel).map_err(anyhow::Error::msg)?;
    // Checked before the old daemon goes, so a failure leaves it serving.
    let argv = super::ublk::recover_argv_for_upgrade(&st)?;
    // Under systemd (`ExecReload=`), this process is the service's main
    // one while the daemon changes, so the old one's exit does not end it.
    notify_main_pid(rustix::process::getpid().as_raw_nonzero().get());
    match how {
        Plan::Quiesce => ask_to_quiesce(id, old)?,
        Plan::KillReissue => kill(id, old)?,
    }
    // From here on the old daemon is leaving: every failure below leaves
    // the device waiting for a daemon, and says so.
    wait_gone(id, old, &how)?;
    wait_quiesced(&mut ctrl, id)?;
    let current = std::env::current_exe().ok();
    let with = match super::lifecycle::spawn_exe(&exe, argv.clone(), super::clean_up_after) {
        Ok(()) => version,
        Err(e) => {
            // The new binary failed: this one can still serve the device.
            let Some(cur) = current.filter(|c| *c != exe) else {
                bail!(
                    "{e:#}; device {id} waits for a daemon, its I/O held: `userblk recover -n {id}` serves it"
                );
            };
            let failed = format!("the new daemon ({}) failed: {e:#}", exe.display());
            match super::lifecycle::spawn_exe(&cur, argv, super::clean_up_after) {
                Ok(()) => {
                    if let Some(st) = DeviceState::load(id).ok().flatten() {
                        notify_main_pid(st.pid);
                    }
                    bail!(
                    "{failed}; device {id} is served by a new daemon of {} instead",
                    cur.display()
                )
                }
                Err(e2) => bail!(
                    "{failed}, and so did one of {} ({e2:#}); device {id} waits for a daemon, its I/O held: `userblk recover -n {id}` serves it",
                    cur.display()
                ),
            }
        }
    };
    let new = DeviceState::load(id).ok().flatten().map(|s| s.pid);
    if let Some(pid) = new {
        notify_main_pid(pid);
    }
    let new = new.map_or_else(|| "?".into(), |p| p.to_string());
    eprintln!("userblk: device {id}: daemon {old} handed over to daemon {new} ({with})");
    Ok(())
}

/// Check that `exe` is a userblk binary, by running `exe --version`: its
/// version line, or why not (one line).
fn check_binary(exe: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = exe.display();
    let meta = std::fs::metadata(exe).with_context(|| format!("--binary {shown}"))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        bail!("--binary {shown}: not an executable file");
    }
    // Daemons are recognised by their process name (`list`, `del`, `ctl`).
    if exe.file_name().and_then(|n| n.to_str()) != Some("userblk") {
        bail!("--binary {shown}: the file must be named userblk (daemons are found by that name)");
    }
    let mut child = Command::new(exe)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("--binary {shown}: cannot run it"))?;
    let said = super::lifecycle::read_all(child.stdout.take());
    let deadline = Instant::now() + VERSION_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "--binary {shown}: `--version` did not answer within {}s",
                VERSION_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = said
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_default();
    let line = out.lines().next().unwrap_or("").trim().to_string();
    if !status.success() || !line.starts_with("userblk ") {
        bail!("--binary {shown}: not a userblk binary (`--version` said {line:?})");
    }
    Ok(line)
}

/// Tell systemd the service's main process is now `pid` (`MAINPID=`), when
/// run by a unit with `NotifyAccess=all` (`$NOTIFY_SOCKET` set); else nothing.
fn notify_main_pid(pid: i32) {
    crate::notify::main_pid(pid);
}

/// Ask daemon `pid` to quiesce device `id` and exit.
fn ask_to_quiesce(id: u32, pid: i32) -> anyhow::Result<()> {
    let path = crate::ctl::socket_path(pid);
    if !path.exists() {
        bail!(
            "device {id}: its daemon (pid {pid}) has no control socket at {}: it still serves the device",
            path.display()
        );
    }
    let req = Request::Run {
        action: ACTION.into(),
        args: vec![QUIESCE_TIMEOUT.as_millis().to_string()],
    };
    let reply = match control::request(&path, &req, ASK_TIMEOUT) {
        Ok(reply) => reply,
        // The connection closed with no answer: the daemon went away while
        // it ran the request (an older one exits before it has answered
        // its handover). Whether it quiesced or crashed, the device now
        // waits for a daemon, so the handover goes on; `wait_gone` tells.
        Err(e @ (ControlError::Protocol(_) | ControlError::Io { .. })) if !daemon_serves(pid) => {
            tracing::info!(
                "device {id}: no answer from its daemon (pid {pid}), which is exiting: {e}"
            );
            return Ok(());
        }
        Err(e) => {
            let what = format!("device {id}: asking its daemon (pid {pid}) to hand over");
            return Err(
                anyhow::Error::new(e).context(format!("{what}; it still serves the device"))
            );
        }
    };
    if !reply.ok {
        let why = reply.error.unwrap_or_else(|| "refused".into());
        if reply.known.is_some() {
            bail!("device {id}: its daemon (pid {pid}) cannot hand over (started by an older userblk?): it still serves the device");
        }
        bail!("device {id}: its daemon (pid {pid}) did not quiesce ({why}): it still serves the device");
    }
    Ok(())
}

/// Whether daemon `pid`, which closed its control connection without an
/// answer, still runs: it has [`GONE_TIMEOUT`] to exit (a crash or a
/// handover closes the connection just before the process ends).
fn daemon_serves(pid: i32) -> bool {
    let deadline = Instant::now() + GONE_TIMEOUT;
    while userblk::state::pid_is_userblk(pid) {
        if Instant::now() >= deadline {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Kill daemon `pid` of device `id` (added with `--reissue`): the kernel
/// requeues what it held for the next daemon.
fn kill(id: u32, pid: i32) -> anyhow::Result<()> {
    let p = rustix::process::Pid::from_raw(pid).context("bad daemon pid")?;
    rustix::process::kill_process(p, rustix::process::Signal::KILL)
        .with_context(|| format!("device {id}: killing its daemon (pid {pid})"))?;
    Ok(())
}

/// Wait until the old daemon has exited.
fn wait_gone(id: u32, pid: i32, how: &Plan) -> anyhow::Result<()> {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while userblk::state::pid_is_userblk(pid) {
        if Instant::now() >= deadline {
            let what = match how {
                Plan::Quiesce => "its I/O is held",
                Plan::KillReissue => "it was killed",
            };
            bail!(
                "device {id}: the old daemon (pid {pid}) has not exited after {}s ({what}); once it has, `userblk recover -n {id}` serves the device",
                EXIT_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Wait until the kernel has noticed the old daemon's exit (QUIESCED).
fn wait_quiesced(ctrl: &mut Control, id: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + QUIESCED_TIMEOUT;
    loop {
        let state = ctrl.dev_info(id)?.state;
        if state == UBLK_S_DEV_QUIESCED {
            return Ok(());
        }
        if state != UBLK_S_DEV_LIVE || Instant::now() >= deadline {
            bail!(
                "device {id} is {} {}s after its daemon exited, not QUIESCED: no new daemon started",
                state_name(state),
                QUIESCED_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        let k612 = Features(0x1fe);
        let k616 = Features(0x3fff);
        let r = UBLK_F_USER_RECOVERY;
        assert_eq!(plan(1, r | UBLK_F_QUIESCE, k616), Ok(Plan::Quiesce));
        assert_eq!(
            plan(1, r | UBLK_F_USER_RECOVERY_REISSUE | UBLK_F_QUIESCE, k616),
            Ok(Plan::Quiesce)
        );
        assert_eq!(
            plan(1, r | UBLK_F_USER_RECOVERY_REISSUE, k612),
            Ok(Plan::KillReissue)
        );
        let no_r = plan(1, 0, k612).unwrap_err();
        assert!(no_r.contains("without -r"), "{no_r}");
        let no_reissue = plan(1, r, k612).unwrap_err();
        assert!(no_reissue.contains("--reissue"), "{no_reissue}");
        assert!(!plan(1, r, k616).unwrap_err().contains('\n'));
        let fail_io = plan(1, r | UBLK_F_QUIESCE | UBLK_F_USER_RECOVERY_FAIL_IO, k616);
        assert!(fail_io.unwrap_err().contains("--fail-io"));
        let b = r | UBLK_F_QUIESCE | UBLK_F_BATCH_IO;
        assert!(plan(1, b, k616).unwrap_err().contains("batch I/O"));
        assert_eq!(
            plan(1, b | UBLK_F_USER_RECOVERY_REISSUE, k616),
            Ok(Plan::KillReissue)
        );
    }
}
