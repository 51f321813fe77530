//! ADD_DEV flags of newer kernels, and what happens where the kernel lacks
//! one: `UBLK_F_SAFE_STOP_DEV` is asked for quietly (7.0; `del` then stops
//! in the kernel only if nobody has the device open, see [`super::stop`]),
//! `UBLK_F_NO_AUTO_PART_SCAN` (`--no-partitions`, 7.0) is dropped with one
//! warning, and `UBLK_F_USER_RECOVERY_FAIL_IO` (`--fail-io`, 6.13) is
//! refused: a device that queued I/O instead of failing it would hang its
//! users where they asked for errors.

use userblk_uapi::{UBLK_F_NO_AUTO_PART_SCAN, UBLK_F_SAFE_STOP_DEV, UBLK_F_USER_RECOVERY_FAIL_IO};

use super::Features;
use crate::Error;

/// The refusal of fail-io recovery on a kernel without it, if `flags` ask for it.
pub(crate) fn fail_io_missing(flags: u64, features: Features) -> Option<Error> {
    (flags & UBLK_F_USER_RECOVERY_FAIL_IO != 0 && !features.has_recovery_fail_io()).then(|| {
        Error::invalid(
            "--fail-io needs Linux 6.13+ (UBLK_F_USER_RECOVERY_FAIL_IO); this kernel lacks it: use -r, where I/O waits for `userblk recover`",
        )
    })
}

/// `flags` with SAFE_STOP_DEV added where offered and NO_AUTO_PART_SCAN
/// dropped, with a warning, where not.
pub(crate) fn fall_back(flags: u64, features: Features) -> u64 {
    let mut flags = flags;
    if features.has(UBLK_F_SAFE_STOP_DEV) {
        flags |= UBLK_F_SAFE_STOP_DEV;
    }
    if flags & UBLK_F_NO_AUTO_PART_SCAN != 0 && !features.has(UBLK_F_NO_AUTO_PART_SCAN) {
        tracing::warn!(
            "--no-partitions: this kernel lacks UBLK_F_NO_AUTO_PART_SCAN (Linux 7.0+); the kernel scans the device for partitions as usual"
        );
        flags &= !UBLK_F_NO_AUTO_PART_SCAN;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;
    use userblk_uapi::UBLK_F_USER_RECOVERY;

    const DEBIAN_612: Features = Features(0x1fe);
    const LINUX_73: Features = Features(0x0f_fffe);

    #[test]
    fn safe_stop_is_asked_for_where_offered() {
        assert_eq!(fall_back(0, DEBIAN_612), 0);
        assert_eq!(fall_back(0, LINUX_73), UBLK_F_SAFE_STOP_DEV);
    }

    #[test]
    fn no_partitions_falls_back_on_older_kernels() {
        assert_eq!(fall_back(UBLK_F_NO_AUTO_PART_SCAN, DEBIAN_612), 0);
        assert_eq!(
            fall_back(UBLK_F_NO_AUTO_PART_SCAN, LINUX_73),
            UBLK_F_NO_AUTO_PART_SCAN | UBLK_F_SAFE_STOP_DEV
        );
    }

    #[test]
    fn fail_io_is_refused_where_missing_only() {
        let fail_io = UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_FAIL_IO;
        let e = fail_io_missing(fail_io, DEBIAN_612).map(|e| e.to_string());
        assert!(e.is_some_and(|m| m.contains("Linux 6.13")));
        assert!(fail_io_missing(fail_io, LINUX_73).is_none());
        assert!(fail_io_missing(UBLK_F_USER_RECOVERY, DEBIAN_612).is_none());
    }
}
