//! Limits a new device could run into, checked before anything is made:
//! the ublk driver's `ublks_max`, the open-file limits, the loop driver's
//! minor numbers, fusermount's `mount_max`. Each refusal names the limit,
//! what uses it up and how to raise it, instead of a device failing half
//! way (an ADD_DEV refused with EACCES, a queue without a ring).
//!
//! ```
//! use userblk::limits::Exceeded;
//!
//! let e = Exceeded {
//!     limit: "the open file limit (RLIMIT_NOFILE)".into(),
//!     max: 64,
//!     used: "this device needs about 96".into(),
//!     raise: "`ulimit -n 96`".into(),
//! };
//! assert_eq!(
//!     e.to_string(),
//!     "the open file limit (RLIMIT_NOFILE) is 64 and this device needs about 96; raise it with `ulimit -n 96`"
//! );
//! ```

use std::path::Path;

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// A limit the new device would go past.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{limit} is {max} and {used}; raise it with {raise}")]
pub struct Exceeded {
    /// The limit's name, as the user would look for it.
    pub limit: String,
    /// Its value now.
    pub max: u64,
    /// What uses it up.
    pub used: String,
    /// How to raise it.
    pub raise: String,
}

/// The ublk driver's module parameter limiting devices.
pub const UBLKS_MAX: &str = "/sys/module/ublk_drv/parameters/ublks_max";

/// Fds a daemon holds whatever its queues: stdio, its log, the control
/// device and socket, the target's files, the loop device, a few pipes.
const BASE_FDS: u64 = 32;
/// Fds per queue (ublk) or serving thread (FUSE): its ring, a `/dev/fuse`
/// clone, an eventfd or two, with room to spare.
const FDS_PER_QUEUE: u64 = 4;

/// The fds a daemon serving `queues` queues needs, roughly.
pub fn fds_needed(queues: u16) -> u64 {
    BASE_FDS + FDS_PER_QUEUE * u64::from(queues)
}

/// A new ublk device must fit under `ublks_max`. The driver counts only
/// unprivileged devices (Linux 6.15 and the stable kernels that took the
/// change; older ones counted all, and then ADD_DEV's EACCES is mapped to
/// the same message by [`ublks_max_refusal`]). `unprivileged_now` is how
/// many such devices exist.
pub fn check_ublks_max(unprivileged: bool, unprivileged_now: u64) -> Result<(), Exceeded> {
    if !unprivileged {
        return Ok(());
    }
    let Some(max) = read_u64(Path::new(UBLKS_MAX)) else {
        return Ok(());
    };
    if unprivileged_now < max {
        return Ok(());
    }
    Err(ublks_max_exceeded(
        max,
        format!("{unprivileged_now} unprivileged ublk device(s) exist"),
    ))
}

/// What an ADD_DEV refused with EACCES ran into, when `devices` ublk
/// devices exist: `ublks_max`, if they fill it (older kernels counted
/// every device); `None` if the limit does not explain it.
pub fn ublks_max_refusal(devices: u64) -> Option<Exceeded> {
    let max = read_u64(Path::new(UBLKS_MAX))?;
    (devices >= max).then(|| ublks_max_exceeded(max, format!("{devices} ublk device(s) exist")))
}

fn ublks_max_exceeded(max: u64, used: String) -> Exceeded {
    let more = max.saturating_mul(2).max(64);
    Exceeded {
        limit: "the ublk driver's ublks_max".into(),
        max,
        used,
        raise: format!(
            "`echo {more} > {UBLKS_MAX}` (or the module option ublk_drv.ublks_max={more})"
        ),
    }
}

/// The process may open `needed` fds: the soft `RLIMIT_NOFILE` is raised
/// to it where the hard limit allows (children inherit it, so a daemon
/// started next has it); past the hard limit, or the system's
/// `fs.file-max` less the files open now, it is refused.
pub fn check_fds(needed: u64) -> Result<(), Exceeded> {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let hard = maximum.unwrap_or(u64::MAX);
    let soft = current.unwrap_or(u64::MAX);
    if needed > hard {
        return Err(Exceeded {
            limit: "the open file limit (RLIMIT_NOFILE, hard)".into(),
            max: hard,
            used: format!("the device's daemon needs about {needed} fds"),
            raise: format!(
                "`ulimit -Hn {needed}` as root, or LimitNOFILE={needed} in its systemd unit"
            ),
        });
    }
    if needed > soft {
        let raised = Rlimit {
            current: Some(needed),
            maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_err() {
            return Err(Exceeded {
                limit: "the open file limit (RLIMIT_NOFILE)".into(),
                max: soft,
                used: format!("the device's daemon needs about {needed} fds"),
                raise: format!("`ulimit -n {needed}`"),
            });
        }
    }
    // "allocated unused max"
    let nr = std::fs::read_to_string("/proc/sys/fs/file-nr").unwrap_or_default();
    let nums: Vec<u64> = nr
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    if let [open, _, max] = nums[..] {
        if open.saturating_add(needed) > max {
            return Err(Exceeded {
                limit: "the system's open file limit (fs.file-max)".into(),
                max,
                used: format!("{open} files are open and the daemon needs about {needed} more"),
                raise: format!("`sysctl fs.file-max={}`", max.saturating_mul(2)),
            });
        }
    }
    Ok(())
}

/// A loop device can still be made. `LOOP_CTL_GET_FREE` makes new ones on
/// demand (`max_loop` only caps those made by opening a node), so the one
/// limit is the minor numbers: 2^20 shared by each device's partitions
/// (`max_part`).
pub fn check_loop_devices() -> Result<(), Exceeded> {
    let max_part = read_u64(Path::new("/sys/module/loop/parameters/max_part")).unwrap_or(0);
    // The driver's part_shift: fls(max_part).
    let shift = u64::BITS - max_part.leading_zeros();
    let max = (1u64 << 20) >> shift.min(20);
    let used = std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .count() as u64;
    if used < max {
        return Ok(());
    }
    Err(Exceeded {
        limit: format!("the loop devices the minor numbers allow with max_part={max_part}"),
        max,
        used: format!("{used} loop devices exist"),
        raise: "a smaller loop.max_part (a module option), or by deleting loop devices".into(),
    })
}

/// A user's FUSE mount goes through fusermount3, which refuses once there
/// are `mount_max` FUSE mounts on the system (`/etc/fuse.conf`, 1000 when
/// not set). Root mounts directly and has no such limit.
pub fn check_fuse_mounts() -> Result<(), Exceeded> {
    if rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let conf = std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
    let max = mount_max(&conf);
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let used = fuse_mounts(&mounts);
    if used < max {
        return Ok(());
    }
    Err(Exceeded {
        limit: "fusermount's mount_max".into(),
        max,
        used: format!("{used} FUSE file systems are mounted"),
        raise: format!("`mount_max = {}` in /etc/fuse.conf", max.saturating_mul(2)),
    })
}

/// `mount_max = N` from fuse.conf's text; 1000 (fusermount's default) if absent.
fn mount_max(conf: &str) -> u64 {
    conf.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter_map(|l| l.strip_prefix("mount_max"))
        .filter_map(|rest| rest.trim_start().strip_prefix('=')?.trim().parse().ok())
        .next_back()
        .unwrap_or(1000)
}

/// FUSE mounts in a mounts table (type `fuse` or `fuse.*`), as fusermount counts them.
fn fuse_mounts(table: &str) -> u64 {
    table
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|t| *t == "fuse" || t.starts_with("fuse."))
        .count() as u64
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fuse_conf_and_mounts_parse() {
        assert_eq!(mount_max(""), 1000);
        assert_eq!(mount_max("user_allow_other\n# mount_max = 5\n"), 1000);
        assert_eq!(mount_max("mount_max = 7\nuser_allow_other"), 7);
        assert_eq!(mount_max("mount_max=9 # few"), 9);
        let table = "proc /proc proc rw 0 0\n\
                     userblk /run/userblk/fuse-0 fuse.userblk rw 0 0\n\
                     x /mnt fuse rw 0 0\n\
                     fusectl /sys/fs/fuse/connections fusectl rw 0 0\n";
        assert_eq!(fuse_mounts(table), 2);
    }

    #[test]
    fn the_fd_need_grows_with_queues_and_the_soft_limit_is_raised() {
        assert!(fds_needed(4) > fds_needed(1));
        // Within the hard limit a need above the soft one raises it.
        let before = getrlimit(Resource::Nofile);
        let need = before
            .current
            .unwrap_or(1024)
            .min(before.maximum.unwrap_or(1024));
        check_fds(need).unwrap();
        assert!(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX) >= need);
        // Past the hard limit: refused, naming it.
        if let Some(hard) = before.maximum {
            let e = check_fds(hard + 1).unwrap_err();
            assert!(e.to_string().contains("RLIMIT_NOFILE, hard"), "{e}");
        }
    }

    #[test]
    fn a_privileged_device_is_not_counted_against_ublks_max() {
        assert_eq!(check_ublks_max(false, u64::MAX), Ok(()));
        let e = ublks_max_exceeded(2, "2 unprivileged ublk device(s) exist".into());
        assert_eq!(
            e.to_string(),
            format!("the ublk driver's ublks_max is 2 and 2 unprivileged ublk device(s) exist; raise it with `echo 64 > {UBLKS_MAX}` (or the module option ublk_drv.ublks_max=64)")
        );
    }
}
