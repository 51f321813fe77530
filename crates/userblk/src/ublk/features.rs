//! What the kernel supports, probed once with GET_FEATURES, with named queries.

use userblk_uapi::*;

/// A set of `UBLK_F_*` flags: the kernel's supported set, or a device's negotiated set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Features(pub u64);

impl Features {
    /// Whether `flag` is in the set.
    pub const fn has(self, flag: u64) -> bool {
        self.0 & flag == flag
    }

    /// Device survives its server (USER_RECOVERY).
    pub const fn has_user_recovery(self) -> bool {
        self.has(UBLK_F_USER_RECOVERY)
    }

    /// Requests in flight to a dead server are reissued (USER_RECOVERY_REISSUE).
    pub const fn has_recovery_reissue(self) -> bool {
        self.has(UBLK_F_USER_RECOVERY_REISSUE)
    }

    /// New I/O fails while no server runs (USER_RECOVERY_FAIL_IO, 6.13+).
    pub const fn has_recovery_fail_io(self) -> bool {
        self.has(UBLK_F_USER_RECOVERY_FAIL_IO)
    }

    /// Devices for non-root users (UNPRIVILEGED_DEV).
    pub const fn has_unprivileged(self) -> bool {
        self.has(UBLK_F_UNPRIVILEGED_DEV)
    }

    /// Names of the flags set, in bit order; unknown bits as hex.
    pub fn names(self) -> Vec<String> {
        let mut known = 0;
        let mut out: Vec<String> = UBLK_F_NAMES
            .iter()
            .filter(|(bit, _)| {
                known |= bit;
                self.0 & bit != 0
            })
            .map(|(_, n)| (*n).to_string())
            .collect();
        let unknown = self.0 & !known;
        if unknown != 0 {
            out.push(format!("{unknown:#x}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_612_set() {
        let f = Features(0x1fe);
        assert!(f.has_user_recovery() && f.has_recovery_reissue() && f.has_unprivileged());
        assert!(!f.has_recovery_fail_io());
        assert_eq!(f.names().first().map(String::as_str), Some("COMP_IN_TASK"));
        assert_eq!(f.names().len(), 8);
    }

    #[test]
    fn unknown_bits_are_shown() {
        assert_eq!(Features(1 << 40).names(), vec!["0x10000000000".to_string()]);
    }
}
