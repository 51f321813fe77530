//! `add`'s check of the limits a new device would run into, before
//! anything is made (see [`userblk::limits`]): one line naming the limit
//! and how to raise it, instead of a daemon failing half way.

use userblk::limits;
use userblk::ublk::ctrl::device_ids;
use userblk::ublk::{Control, Features};

/// What a new device of a frontend is checked for.
#[derive(Debug, Clone, Copy)]
pub enum Needs {
    /// A ublk device.
    Ublk {
        /// For a new device, whether it is unprivileged (those count
        /// against `ublks_max`); `None` for a recovery, which adds none.
        new_unprivileged: Option<bool>,
    },
    /// A FUSE device, with a loop device on it or not.
    Fuse {
        /// Whether a loop device is attached.
        with_loop: bool,
    },
    /// An NBD server: its connections take fds as they come, bounded by its own budget.
    Nbd,
}

/// Check what a device serving `queues` queues (or FUSE threads) needs.
pub fn check(needs: Needs, queues: u16) -> anyhow::Result<()> {
    limits::check_fds(limits::fds_needed(queues))?;
    match needs {
        Needs::Ublk {
            new_unprivileged: Some(true),
        } => limits::check_ublks_max(true, unprivileged_devices())?,
        Needs::Fuse { with_loop } => {
            limits::check_fuse_mounts()?;
            if with_loop {
                limits::check_loop_devices()?;
            }
        }
        Needs::Ublk { .. } | Needs::Nbd => {}
    }
    Ok(())
}

/// The unprivileged ublk devices the caller can see (another user's may
/// be hidden: ADD_DEV's refusal is then explained by [`explain_add`]).
fn unprivileged_devices() -> u64 {
    let Ok(mut ctrl) = Control::open() else {
        return 0;
    };
    let ids = device_ids();
    let n = ids
        .into_iter()
        .filter(|&id| {
            ctrl.dev_info(id)
                .is_ok_and(|i| Features(i.flags).has_unprivileged())
        })
        .count();
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// ADD_DEV refused with EACCES while the devices fill `ublks_max` (a
/// kernel that counts every device): say so instead of the bare errno.
pub fn explain_add(e: userblk::Error) -> anyhow::Error {
    if let userblk::Error::Control {
        errno: rustix::io::Errno::ACCESS,
        ..
    } = e
    {
        let devices = u64::try_from(device_ids().len()).unwrap_or(u64::MAX);
        if let Some(limit) = limits::ublks_max_refusal(devices) {
            return limit.into();
        }
    }
    e.into()
}
