//! Batch I/O (`UBLK_F_BATCH_IO`, Linux 7.0): one command prepares, fetches
//! or commits many tags of a queue.
//!
//! PREP_IO_CMDS and COMMIT_IO_CMDS carry a [`UblkBatchIo`] header in the
//! SQE's command area and point `sqe->addr` at an array of `nr_elem`
//! elements of `elem_bytes` each: a [`UblkElemHeader`], then the buffer
//! address (with [`UBLK_BATCH_F_HAS_BUF_ADDR`]) and the zone-append LBA
//! (with [`UBLK_BATCH_F_HAS_ZONE_LBA`]), 8 bytes each, in that order.
//! FETCH_IO_CMDS is multishot (`IORING_URING_CMD_MULTISHOT`, buffer
//! select): each completion's `res` is the byte count of the `u16` tags the
//! kernel wrote into the selected provided buffer.

use crate::cmd::iowr;

/// The header of a batch command, in the SQE's command area (`struct ublk_batch_io`, 16 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UblkBatchIo {
    /// Queue id.
    pub q_id: u16,
    /// `UBLK_BATCH_F_*`; 0 for FETCH.
    pub flags: u16,
    /// Elements in the buffer (at most the queue depth).
    pub nr_elem: u16,
    /// Bytes per element: 8, plus 8 per `HAS_*` flag; 2 (one tag) for FETCH.
    pub elem_bytes: u8,
    /// Must be zero.
    pub reserved: u8,
    /// Must be zero.
    pub reserved2: u64,
}

/// The mandatory part of a PREP / COMMIT element (`struct ublk_elem_header`, 8 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UblkElemHeader {
    /// Tag.
    pub tag: u16,
    /// Under `UBLK_F_AUTO_BUF_REG`: the buffer-table index the kernel
    /// registers the tag's next request at.
    pub buf_index: u16,
    /// COMMIT: bytes done, or -errno; 0 for PREP.
    pub result: i32,
}

/// Elements carry the zone-append LBA.
pub const UBLK_BATCH_F_HAS_ZONE_LBA: u16 = 1 << 0;
/// Elements carry the tag's buffer address (the kernel copies data, no user copy).
pub const UBLK_BATCH_F_HAS_BUF_ADDR: u16 = 1 << 1;
/// `UBLK_AUTO_BUF_REG_FALLBACK` for every element.
pub const UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK: u16 = 1 << 2;

const BATCH: usize = core::mem::size_of::<UblkBatchIo>();

/// Hand the kernel every tag's buffer information once, before fetching
/// (7.0). Completes with 0, or an error and nothing prepared.
pub const UBLK_U_IO_PREP_IO_CMDS: u32 = iowr(0x25, BATCH);
/// Complete many tags' requests (7.0); each tag is then ready for its next
/// request. Completes with the bytes of the elements handled, which may be
/// fewer than given: the element after them was refused and the rest were
/// not looked at. An error only when none was handled.
pub const UBLK_U_IO_COMMIT_IO_CMDS: u32 = iowr(0x26, BATCH);
/// Multishot: deliver the tags of new requests into a provided buffer (7.0).
pub const UBLK_U_IO_FETCH_IO_CMDS: u32 = iowr(0x27, BATCH);

layout! {
    UblkBatchIo: 16 bytes, test batch_io_layout {
        q_id: 0,
        flags: 2,
        nr_elem: 4,
        elem_bytes: 6,
        reserved: 7,
        reserved2: 8,
    }
}

layout! {
    UblkElemHeader: 8 bytes, test elem_header_layout {
        tag: 0,
        buf_index: 2,
        result: 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_encodings_match_the_kernel_header() {
        assert_eq!(UBLK_U_IO_PREP_IO_CMDS, 0xc010_7525);
        assert_eq!(UBLK_U_IO_COMMIT_IO_CMDS, 0xc010_7526);
        assert_eq!(UBLK_U_IO_FETCH_IO_CMDS, 0xc010_7527);
    }
}
