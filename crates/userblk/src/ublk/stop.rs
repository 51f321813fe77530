//! Deleting a device only when nobody holds it: `userblk del` without
//! `--force`. The holders found from userspace come first, so the refusal
//! names them (a mount point, a pid); where the kernel has TRY_STOP_DEV
//! (7.0, `UBLK_F_SAFE_STOP_DEV`) the check and the stop are then one step
//! in the kernel, so an open racing the check cannot lose its device.

use std::time::{Duration, Instant};

use rustix::io::Errno;
use userblk_uapi::{UBLK_F_SAFE_STOP_DEV, UBLK_S_DEV_DEAD};

use super::ctrl::block_path;
use super::{device, Control, Features};
use crate::{holders, Error, Result};

/// How long a device the kernel reports open, with no holder visible from
/// userspace, is retried: udev's probe after `add` opens it for a moment.
const TRANSIENT_OPEN: Duration = Duration::from_secs(2);

/// Stop and delete device `id` ([`device::delete`]) unless its block device
/// is mounted or open: then [`Error::Held`], and the device is untouched.
pub fn delete_unless_held(ctrl: &mut Control, id: u32, wait: Duration) -> Result<()> {
    let info = ctrl.dev_info(id)?;
    // DEAD: never started or already stopped, so there is no disk to hold.
    if info.state != UBLK_S_DEV_DEAD {
        let path = block_path(id);
        let held = holders::of_block_device(&path, None);
        if !held.is_empty() {
            return Err(Error::Held {
                path,
                holders: held,
            });
        }
        if Features(info.flags).has(UBLK_F_SAFE_STOP_DEV) {
            try_stop(ctrl, id)?;
        }
    }
    // After TRY_STOP_DEV, the STOP_DEV in here finds the device stopped.
    device::delete(ctrl, id, wait)
}

/// `del --force`: [`device::delete`], except that a device still held (a
/// file system mounted on it) is removed with DEL_DEV_ASYNC, since DEL_DEV
/// would wait for the holder to let go. The daemon sees its fetches aborted
/// and exits; it is given `wait` to.
pub fn force_delete(ctrl: &mut Control, id: u32, wait: Duration) -> Result<()> {
    if holders::of_block_device(&block_path(id), None).is_empty() {
        return device::delete(ctrl, id, wait);
    }
    let pid = ctrl.dev_info(id)?.ublksrv_pid;
    match ctrl.del_async(id) {
        Ok(()) => {}
        // Unprivileged devices cannot use it (the kernel's permission table
        // lacks it): wait for the holder after all.
        Err(Error::Control {
            errno: Errno::INVAL | Errno::OPNOTSUPP,
            ..
        }) => return device::delete(ctrl, id, wait),
        Err(e) => return Err(e),
    }
    if pid > 0 {
        let _ = crate::sys::wait_while(pid, Instant::now() + wait, || !device::process_gone(pid));
    }
    Ok(())
}

/// TRY_STOP_DEV, retried for a moment while the kernel sees an opener that
/// userspace cannot (udev, a mount in another namespace).
fn try_stop(ctrl: &mut Control, id: u32) -> Result<()> {
    let deadline = Instant::now() + TRANSIENT_OPEN;
    loop {
        match ctrl.try_stop(id) {
            Ok(()) => return Ok(()),
            Err(Error::Control {
                errno: Errno::BUSY, ..
            }) => {
                if Instant::now() >= deadline {
                    let path = block_path(id);
                    let holders = holders::of_block_device(&path, None);
                    return Err(Error::Held { path, holders });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // NODEV: its disk went meanwhile. INVAL: an unprivileged device on
            // a kernel whose permission table lacks the command (before 7.3);
            // the userspace check above has passed.
            Err(Error::Control {
                errno: Errno::NODEV | Errno::INVAL,
                ..
            }) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}
