//! Handing a live device to a new daemon (`userblk upgrade`).
//!
//! On kernels with `UBLK_F_QUIESCE` (6.16+) the serving daemon, asked
//! through its control socket, sends QUIESCE_DEV: the kernel holds new
//! requests and aborts the idle fetches. Its queues then drain (finish and
//! commit what they hold, see `queue.rs`) and leave, [`Device::serve`]
//! returns without deleting the device, and the process exits: the kernel
//! marks the device QUIESCED with its requests queued, and a new daemon
//! takes it over with user recovery ([`Device::recover`]). No request fails.
//!
//! [`Device::serve`]: crate::ublk::Device::serve
//! [`Device::recover`]: crate::ublk::Device::recover

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustix::io::Errno;
use userblk_uapi::{UBLK_F_QUIESCE, UBLK_F_USER_RECOVERY};

use crate::ublk::ctrl::Control;
use crate::ublk::features::Features;
use crate::ublk::queue::Shutdown;
use crate::{Error, Result};

/// The flag a device asks for at add time so it can be handed over: QUIESCE
/// where the kernel has it and the device is recoverable (the kernel refuses
/// QUIESCE without USER_RECOVERY); none otherwise.
pub fn quiesce_flag(flags: u64, kernel: Features) -> u64 {
    if flags & UBLK_F_USER_RECOVERY != 0 && kernel.has(UBLK_F_QUIESCE) {
        UBLK_F_QUIESCE
    } else {
        0
    }
}

/// What a serving device shares with its [`Quiescer`]s.
#[derive(Debug, Default)]
pub(crate) struct Handover {
    /// The queues' wake-up, once serving.
    shutdown: Mutex<Option<Arc<Shutdown>>>,
    /// The device was quiesced for a new daemon.
    done: AtomicBool,
}

impl Handover {
    /// The device serves through these queues now.
    pub(crate) fn attach(&self, shutdown: &Arc<Shutdown>) {
        *self.shutdown.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(shutdown));
    }
}

/// Quiesces a serving device for a new daemon, from any thread (the
/// control socket's).
#[derive(Debug, Clone)]
pub struct Quiescer {
    pub(crate) id: u32,
    pub(crate) flags: u64,
    pub(crate) shared: Arc<Handover>,
}

/// Whether a device with these granted `flags` can be handed over with
/// QUIESCE: added with the flag, and served per-tag. `userblk upgrade`
/// plans with it; a serving daemon asks [`Quiescer::can_quiesce`].
///
/// Not a batch device: the kernel's QUIESCE_DEV on a `UBLK_F_BATCH_IO`
/// queue (7.0 through at least 7.3) cancels its fetch commands through
/// the path STOP_DEV uses, which also marks the queue force-abort, and a
/// recoverable device fails every request that arrives on a force-abort
/// queue (EIO) instead of holding it for the next daemon: whatever the
/// daemon does, writes issued during the handover fail
/// (docs/frontends/ublk.md#batch-io). [`BATCH_QUIESCE_ENV`] lifts this,
/// to test a kernel.
pub fn quiescable(flags: u64) -> bool {
    flags & UBLK_F_QUIESCE != 0
        && (flags & userblk_uapi::UBLK_F_BATCH_IO == 0
            || std::env::var_os(BATCH_QUIESCE_ENV).is_some())
}

/// Environment variable: set (on `add` and `upgrade`), batch devices are
/// handed over with QUIESCE too, to see whether a kernel still fails the
/// requests of the handover (see [`quiescable`]). Not for production.
pub const BATCH_QUIESCE_ENV: &str = "USERBLK_TEST_BATCH_QUIESCE";

impl Quiescer {
    /// Whether this device can be handed over with QUIESCE: added with the
    /// flag, and served per-tag (see [`quiescable`]).
    pub fn can_quiesce(&self) -> bool {
        quiescable(self.flags)
    }

    /// QUIESCE_DEV, waiting up to `timeout` for every queue to have an idle
    /// tag, then drain the queues: the device's `serve` returns once they
    /// served what they held, leaving the device for a new daemon. A
    /// timeout (`EBUSY`) or an interrupted wait still leaves the kernel's
    /// queues quiesced, so the handover goes on. Fails without changing
    /// anything if the device cannot be quiesced (added without
    /// `UBLK_F_QUIESCE`, or not serving yet).
    pub fn quiesce(&self, timeout: Duration) -> Result<()> {
        let id = self.id;
        if self.flags & UBLK_F_QUIESCE == 0 {
            return Err(Error::invalid(format!(
                "device {id} was added without UBLK_F_QUIESCE (needs -r and Linux 6.16+)"
            )));
        }
        let shutdown = self
            .shared
            .shutdown
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| Error::invalid(format!("device {id} is not serving yet")))?;
        let mut ctrl = Control::open()?;
        // Said before the command, not after: the kernel aborts the idle
        // fetches while it runs, and a queue whose every tag is aborted
        // leaves on its own, so `serve` can return (and its caller decide
        // whether to keep the device's state) before QUIESCE_DEV does. Said
        // after, the daemon removed the state the new daemon recovers from,
        // and the device was left quiesced with no daemon, its I/O held
        // (found by vm/suite/upgrade.sh's back-to-back upgrades on 7.3.4).
        self.shared.done.store(true, Ordering::SeqCst);
        match ctrl.quiesce(id, timeout) {
            Ok(()) => {}
            Err(Error::Control {
                errno: errno @ (Errno::BUSY | Errno::INTR),
                ..
            }) => tracing::info!(
                "device {id}: QUIESCE_DEV: {errno} (not every queue had an idle tag); draining anyway"
            ),
            // The kernel may have marked the queues canceling before it
            // stopped answering: they then hold every new request until a
            // new daemon recovers the device, so serving on would hang
            // them. Hand over instead.
            Err(e @ Error::NoAnswer { .. }) => {
                tracing::warn!("device {id}: {e}; draining anyway");
            }
            Err(e) => {
                // Refused before it changed anything: still ours to serve.
                self.shared.done.store(false, Ordering::SeqCst);
                return Err(e);
            }
        }
        tracing::info!("device {id}: quiesced for a new daemon; finishing the requests in hand");
        shutdown.drain();
        Ok(())
    }

    /// Whether the device was quiesced for a new daemon (its state must
    /// then stay for the new daemon to find).
    pub fn handed_over(&self) -> bool {
        self.shared.done.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn quiesce_only_for_recoverable_devices_on_kernels_with_it() {
        let k612 = Features(0x1fe);
        let k616 = Features(0x3fff);
        assert_eq!(quiesce_flag(UBLK_F_USER_RECOVERY, k616), UBLK_F_QUIESCE);
        assert_eq!(quiesce_flag(0, k616), 0);
        assert_eq!(quiesce_flag(UBLK_F_USER_RECOVERY, k612), 0);
        assert_eq!(quiesce_flag(UBLK_F_USER_RECOVERY, Features(0)), 0);
    }

    #[test]
    fn a_device_without_the_flag_is_not_quiesced() {
        let q = Quiescer {
            id: 7,
            flags: UBLK_F_USER_RECOVERY,
            shared: Arc::default(),
        };
        let e = q.quiesce(Duration::from_secs(1)).unwrap_err().to_string();
        assert!(e.contains("without UBLK_F_QUIESCE"), "{e}");
        assert!(!q.handed_over());
        let q = Quiescer {
            flags: UBLK_F_USER_RECOVERY | UBLK_F_QUIESCE,
            ..q
        };
        let e = q.quiesce(Duration::from_secs(1)).unwrap_err().to_string();
        assert!(e.contains("not serving yet"), "{e}");
    }
}
