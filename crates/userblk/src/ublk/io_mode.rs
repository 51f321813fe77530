//! Which queue driver serves a device: per-tag FETCH/COMMIT commands
//! ([`queue`](super::queue)) or batch commands ([`batch`](super::batch),
//! `UBLK_F_BATCH_IO`, Linux 7.0).
//!
//! The choice is made when the device is added (the flag is the device's
//! for life); a recovered device keeps its driver.

use userblk_uapi::UBLK_F_BATCH_IO;

use crate::ublk::features::Features;

/// How a device's queues talk to the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoMode {
    /// One FETCH / COMMIT_AND_FETCH command per tag (every kernel).
    PerTag,
    /// Batch commands; asked for: one warning where the kernel lacks them.
    Batch,
    /// Whichever measured faster ([`AUTO_PREFERS_BATCH`]) where the kernel
    /// offers it, quietly per-tag where not.
    #[default]
    Auto,
}

/// What `Auto` takes where the kernel has batch I/O: per-tag for now. Batch
/// served null 4k random reads at QD 64 1.16x and 128 KiB sequential reads
/// at QD 8 1.29x faster (medians) side by side on Linux 7.3.4
/// (`bench/io-mode.sh`), but on a loaded host with overlapping ranges, and
/// the kernel fails the requests of a batch device while it is quiesced,
/// so `upgrade` cannot hand one over with QUIESCE
/// (`handover::quiescable`, docs/frontends/ublk.md#batch-io).
pub const AUTO_PREFERS_BATCH: bool = false;

/// What a kernel lacking batch I/O lacks, for the one warning.
const LACKS: &str = "this kernel lacks it (UBLK_F_BATCH_IO, Linux 7.0+)";

impl IoMode {
    /// The `UBLK_F_BATCH_IO` bit to ask for with a kernel offering
    /// `features` (0 for a kernel too old to say: per-tag), warning once
    /// where batch I/O was asked for and cannot be had.
    pub fn flag(self, features: Features) -> u64 {
        let offered = features.has(UBLK_F_BATCH_IO);
        match self {
            IoMode::PerTag => 0,
            IoMode::Batch if offered => UBLK_F_BATCH_IO,
            IoMode::Batch => {
                tracing::warn!("batch I/O: {LACKS}; serving per-tag instead");
                0
            }
            IoMode::Auto if offered && AUTO_PREFERS_BATCH => UBLK_F_BATCH_IO,
            IoMode::Auto => 0,
        }
    }

    /// The mode of a device with `flags` (as the kernel granted them).
    pub fn of(flags: u64) -> Self {
        if flags & UBLK_F_BATCH_IO != 0 {
            IoMode::Batch
        } else {
            IoMode::PerTag
        }
    }

    /// `per-tag`, `batch` or `auto`.
    pub fn name(self) -> &'static str {
        match self {
            IoMode::PerTag => "per-tag",
            IoMode::Batch => "batch",
            IoMode::Auto => "auto",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_follows_the_mode_and_the_kernel() {
        let new = Features(UBLK_F_BATCH_IO | 1);
        let old = Features(1);
        assert_eq!(IoMode::Batch.flag(new), UBLK_F_BATCH_IO);
        assert_eq!(IoMode::Batch.flag(old), 0);
        assert_eq!(IoMode::Batch.flag(Features(0)), 0);
        assert_eq!(IoMode::PerTag.flag(new), 0);
        assert_eq!(IoMode::Auto.flag(old), 0);
        assert_eq!(
            IoMode::Auto.flag(new),
            if AUTO_PREFERS_BATCH {
                UBLK_F_BATCH_IO
            } else {
                0
            }
        );
        assert_eq!(IoMode::of(UBLK_F_BATCH_IO | 8), IoMode::Batch);
        assert_eq!(IoMode::of(8).name(), "per-tag");
    }
}
