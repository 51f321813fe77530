//! What each kernel feature flag lets userblk do, for `userblk features`:
//! one line per `UBLK_F_*` flag, named by the command or option the user types.

use userblk_uapi::*;

use super::Features;

/// Every flag [`UBLK_F_NAMES`] knows, with what it enables in userblk.
pub const CAPABILITIES: &[(u64, &str)] = &[
    (
        UBLK_F_SUPPORT_ZERO_COPY,
        "not used (the older zero copy; userblk uses automatic buffer registration)",
    ),
    (
        UBLK_F_URING_CMD_COMP_IN_TASK,
        "kernel-internal; nothing to choose",
    ),
    (
        UBLK_F_NEED_GET_DATA,
        "not used (write data arrives with the request)",
    ),
    (
        UBLK_F_USER_RECOVERY,
        "-r: the device survives its daemon (userblk recover)",
    ),
    (UBLK_F_USER_RECOVERY_REISSUE, "--reissue"),
    (
        UBLK_F_UNPRIVILEGED_DEV,
        "devices for users (--unprivileged)",
    ),
    (
        UBLK_F_CMD_IOCTL_ENCODE,
        "always used (ioctl-encoded commands)",
    ),
    (UBLK_F_USER_COPY, "--user-copy"),
    (UBLK_F_ZONED, "not used (no zoned targets)"),
    (
        UBLK_F_USER_RECOVERY_FAIL_IO,
        "--fail-io: I/O fails at once while no daemon runs",
    ),
    (UBLK_F_UPDATE_SIZE, "userblk resize"),
    (UBLK_F_AUTO_BUF_REG, "zero copy (--zero-copy)"),
    (UBLK_F_QUIESCE, "userblk upgrade without kill"),
    (
        UBLK_F_PER_IO_DAEMON,
        "not used: one thread serves each queue (more threads: -q); the kernel sets it on every device",
    ),
    (
        UBLK_F_BUF_REG_OFF_DAEMON,
        "not used: zero copy registers buffers on the queue's own ring; the kernel sets it on every device",
    ),
    (UBLK_F_BATCH_IO, "batch I/O"),
    (UBLK_F_INTEGRITY, "not used (T10 PI: later work)"),
    (
        UBLK_F_SAFE_STOP_DEV,
        "del refuses open devices in the kernel",
    ),
    (UBLK_F_NO_AUTO_PART_SCAN, "--no-partitions"),
    (UBLK_F_SHMEM_ZC, "not used (later work)"),
];

/// One flag: its name, whether this kernel offers it, and what it enables.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Capability {
    /// The flag's name without `UBLK_F_`.
    pub flag: &'static str,
    /// Its bit number.
    pub bit: u32,
    /// Whether the kernel offers it.
    pub offered: bool,
    /// What it lets userblk do.
    pub enables: &'static str,
}

/// Every known flag, in bit order, with whether `features` has it.
pub fn table(features: Features) -> Vec<Capability> {
    UBLK_F_NAMES
        .iter()
        .map(|&(bit, flag)| Capability {
            flag,
            bit: bit.trailing_zeros(),
            offered: features.has(bit),
            enables: CAPABILITIES
                .iter()
                .find(|(b, _)| *b == bit)
                .map_or("unknown to this userblk", |(_, what)| *what),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scripts test a kernel with `userblk features | grep -q NAME`: no
    /// line may name a flag other than its own.
    #[test]
    fn no_capability_names_a_flag() {
        for (_, what) in CAPABILITIES {
            for (_, name) in UBLK_F_NAMES {
                assert!(!what.contains(name), "'{what}' names {name}");
            }
        }
    }

    #[test]
    fn every_known_flag_says_what_it_enables() {
        assert_eq!(CAPABILITIES.len(), UBLK_F_NAMES.len());
        for (bit, name) in UBLK_F_NAMES {
            assert!(
                CAPABILITIES.iter().any(|(b, _)| b == bit),
                "{name} has no capability line"
            );
        }
    }

    #[test]
    fn debian_612_lacks_the_newer_capabilities() {
        let t = table(Features(0x1fe));
        let offered = |f: &str| t.iter().find(|c| c.flag == f).map(|c| c.offered);
        assert_eq!(offered("USER_RECOVERY"), Some(true));
        assert_eq!(offered("USER_RECOVERY_FAIL_IO"), Some(false));
        assert_eq!(offered("SAFE_STOP_DEV"), Some(false));
        let part = t.iter().find(|c| c.flag == "NO_AUTO_PART_SCAN");
        assert_eq!(
            part.map(|c| (c.bit, c.enables)),
            Some((18, "--no-partitions"))
        );
    }

    #[test]
    fn linux_73_offers_safe_stop_and_fail_io() {
        let t = table(Features(0x0f_fffe));
        for f in [
            "SAFE_STOP_DEV",
            "USER_RECOVERY_FAIL_IO",
            "AUTO_BUF_REG",
            "BATCH_IO",
        ] {
            assert!(t.iter().any(|c| c.flag == f && c.offered), "{f}");
        }
        let qu = t.iter().find(|c| c.flag == "QUIESCE").map(|c| c.enables);
        assert_eq!(qu, Some("userblk upgrade without kill"));
    }
}
