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
