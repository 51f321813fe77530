//! Stopping the daemon of a device served from userspace alone (FUSE, NBD).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use userblk::state::DeviceState;

/// Send the daemon SIGTERM and wait up to `timeout` for it to exit.
pub fn stop(st: &DeviceState, timeout: Duration) -> anyhow::Result<()> {
    let id = st.id;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(st.pid).context("bad pid in saved state")?,
        rustix::process::Signal::TERM,
    )
    .with_context(|| format!("device {id}: signalling daemon {}", st.pid))?;
    let deadline = Instant::now() + timeout;
    while st.daemon_alive() {
        if Instant::now() >= deadline {
            bail!(
                "device {id}: daemon {} did not stop within {}s; see {}",
                st.pid,
                timeout.as_secs(),
                st.log
                    .as_deref()
                    .map_or("its log".into(), |l| l.display().to_string())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Deliver SIGTERM, SIGINT and SIGHUP to `tx` (wrapped by `wrap`) from a
/// thread of their own; close the returned handle to stop.
pub fn watch_signals<T: Send + 'static>(
    tx: std::sync::mpsc::Sender<T>,
    wrap: fn(i32) -> T,
) -> anyhow::Result<signal_hook::iterator::Handle> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("installing signal handlers")?;
    let handle = signals.handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if tx.send(wrap(sig)).is_err() {
                    break;
                }
            }
        })?;
    Ok(handle)
}

/// Tell the waiting `add` the device is live: print its details and, in a
/// daemon, the ready marker, then move our output to the device's log.
pub fn announce(st: &DeviceState, daemon: bool) {
    crate::out::announce(&crate::list::Entry::Saved(Box::new(st.clone())).text());
    if daemon {
        crate::out::announce(&format!("{}\n", crate::add::READY_MARKER));
        if let Some(log) = &st.log {
            crate::add::redirect_output(log);
        }
    }
}
