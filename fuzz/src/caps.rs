//! Target capabilities drawn from fuzz input, so that the request parser
//! is checked against exports of every shape, not only the fixed ones.
//!
//! The first [`CONFIG_LEN`] bytes of an `nbd_request` input are:
//!
//! | byte | meaning |
//! |---|---|
//! | 0 | logical block size: `512 << (b % 8)` |
//! | 1 | physical block size: `lbs << (b % 4)` |
//! | 2 | bits: 0 read-only, 1 volatile cache, 2 FUA, 3 rotational, 4 discard, 5 write-zeroes, 6 `max_request` |
//! | 3 | bits 0-1 discard granularity `lbs << n`, 2-3 write-zeroes granularity, 4 small `max_bytes`, 5-7 its shift |
//! | 4..12 | size, big-endian, rounded down to whole blocks (0 becomes one block) |
//! | 12..16 | `max_request`, big-endian |

use userblk::target::{Caps, RangeOpCaps, MAX_RANGE_OP_BYTES};

/// Bytes of capability configuration at the start of an input.
pub const CONFIG_LEN: usize = 16;

/// The capabilities `b` describes (not necessarily valid: check them with [`Caps::check`]).
pub fn decode(b: &[u8; CONFIG_LEN]) -> Caps {
    let lbs = 512u32 << (b[0] % 8);
    let bits = b[2];
    let range = |shift: u8| {
        let granularity = lbs << shift;
        let max_bytes = if b[3] & 0x10 != 0 {
            u64::from(granularity) << (b[3] >> 5)
        } else {
            MAX_RANGE_OP_BYTES
        };
        RangeOpCaps {
            granularity,
            max_bytes,
        }
    };
    let size = u64::from_be_bytes(crate::replies::field(b, 4));
    let size = (size / u64::from(lbs) * u64::from(lbs)).max(u64::from(lbs));
    Caps {
        size,
        logical_block_size: lbs,
        physical_block_size: lbs << (b[1] % 4),
        read_only: bits & 1 != 0,
        volatile_cache: bits & 2 != 0,
        fua: bits & 4 != 0,
        rotational: bits & 8 != 0,
        discard: (bits & 0x10 != 0).then(|| range(b[3] & 3)),
        write_zeroes: (bits & 0x20 != 0).then(|| range((b[3] >> 2) & 3)),
        max_request: (bits & 0x40 != 0).then(|| u32::from_be_bytes(crate::replies::field(b, 12))),
    }
}

/// The configuration bytes for a common export: `size` bytes, 512-byte
/// blocks, 4 KiB physical blocks, discard and write-zeroes, with the extra
/// flag bits `extra` (see the table above).
pub fn encode(size: u64, extra: u8, max_request: Option<u32>) -> [u8; CONFIG_LEN] {
    let mut b = [0u8; CONFIG_LEN];
    b[0] = 0;
    b[1] = 3;
    b[2] = 0x10 | 0x20 | extra | if max_request.is_some() { 0x40 } else { 0 };
    b[3] = 3;
    b[4..12].copy_from_slice(&size.to_be_bytes());
    b[12..16].copy_from_slice(&max_request.unwrap_or(0).to_be_bytes());
    b
}
