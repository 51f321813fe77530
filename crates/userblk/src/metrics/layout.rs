//! The counter file's layout: a one-line header, then one block of
//! counters per serving thread, every field a 64-bit word.
//!
//! The words are native-endian `AtomicU64`s, which is little-endian on
//! every target userblk builds for (its ABI crate only supports those).
//! Blocks are 64-byte aligned and a multiple of 64 bytes long, so two
//! threads never write one cache line.

use crate::target::Op;

/// `b"userblkm"` read as a little-endian word.
pub const MAGIC: u64 = u64::from_le_bytes(*b"userblkm");
/// Bumped on any change of the layout below; readers skip other versions.
pub const VERSION: u64 = 1;

/// Header words.
pub const H_MAGIC: usize = 0;
/// [`VERSION`].
pub const H_VERSION: usize = 1;
/// Blocks in the file ([`BLOCKS`]).
pub const H_BLOCKS: usize = 2;
/// Words per block ([`BLOCK_WORDS`]).
pub const H_BLOCK_WORDS: usize = 3;
/// Blocks ever claimed (a high-water mark): readers sum only these, so
/// they never fault in (and, on tmpfs, allocate) the unused ones.
pub const H_USED: usize = 4;
/// Times a daemon took the device over from an earlier one (`recover`,
/// `upgrade`): the file outlives a daemon.
pub const H_RECOVERIES: usize = 5;
/// `OPS << 32 | BUCKETS`, checked by readers.
pub const H_SHAPE: usize = 6;
/// Words in the header (one cache line).
pub const HEADER_WORDS: usize = 8;

/// Ops counted, in this order.
pub const OPS: [Op; 5] = [Op::Read, Op::Write, Op::Flush, Op::Discard, Op::WriteZeroes];

/// Finite histogram buckets: bucket `i` counts requests that took at most
/// 2^i µs (1 µs .. 2^24 µs, about 16.8 s); one more counts the rest.
pub const FINITE_BUCKETS: usize = 25;
/// Buckets per op, the last one unbounded.
pub const BUCKETS: usize = FINITE_BUCKETS + 1;

/// Words of one op: requests, bytes, errors, latency sum (ns), buckets.
pub const OP_WORDS: usize = 4 + BUCKETS;
/// Within an op: requests finished (failed ones too).
pub const O_REQUESTS: usize = 0;
/// Within an op: bytes of the requests that succeeded.
pub const O_BYTES: usize = 1;
/// Within an op: requests that failed.
pub const O_ERRORS: usize = 2;
/// Within an op: sum of the latencies, in nanoseconds.
pub const O_SUM_NS: usize = 3;
/// Within an op: the first bucket.
pub const O_BUCKETS: usize = 4;

/// Within a block: requests the thread's target holds now.
pub const B_INFLIGHT: usize = OPS.len() * OP_WORDS;
/// Words per block, rounded up to whole cache lines.
pub const BLOCK_WORDS: usize = (B_INFLIGHT + 1).div_ceil(8) * 8;
/// Blocks per file: threads beyond this share blocks (still correct, as
/// every update is an atomic add, only slower).
pub const BLOCKS: usize = 64;
/// Bytes of the whole file.
pub const FILE_BYTES: usize = (HEADER_WORDS + BLOCKS * BLOCK_WORDS) * 8;

// Checked at compile time: the gauge fits its block, and blocks keep to
// whole cache lines.
const _: () = assert!(B_INFLIGHT < BLOCK_WORDS && BLOCK_WORDS.is_multiple_of(8));

/// The [`H_SHAPE`] word of this layout.
pub const fn shape() -> u64 {
    ((OPS.len() as u64) << 32) | BUCKETS as u64
}

/// Index of `op` in [`OPS`].
pub const fn op_index(op: Op) -> usize {
    op.index()
}

/// The name an op has in the exposition (`op` label).
pub const fn op_name(op: Op) -> &'static str {
    match op {
        Op::Read => "read",
        Op::Write => "write",
        Op::Flush => "flush",
        Op::Discard => "discard",
        Op::WriteZeroes => "write_zeroes",
    }
}

/// Word index, from the block's start, of field `field` of `op`.
pub const fn op_word(op: Op, field: usize) -> usize {
    op_index(op) * OP_WORDS + field
}

/// Word index, from the file's start, of block `b`.
pub const fn block_start(b: usize) -> usize {
    HEADER_WORDS + b * BLOCK_WORDS
}

/// The bucket of a request that took `ns` nanoseconds: the smallest `i`
/// with `ns <= 2^i µs`, or the unbounded one.
pub fn bucket(ns: u64) -> usize {
    let us = ns.div_ceil(1000);
    if us <= 1 {
        return 0;
    }
    // ceil(log2(us)) for us >= 2.
    let i = (u64::BITS - (us - 1).leading_zeros()) as usize;
    i.min(FINITE_BUCKETS)
}

/// Upper bound of finite bucket `i`, in microseconds.
pub const fn bucket_bound_us(i: usize) -> u64 {
    1 << i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_whole_cache_lines() {
        assert_eq!(HEADER_WORDS * 8, 64);
        assert_eq!(BLOCK_WORDS * 8 % 64, 0);
        assert_eq!(block_start(1) - block_start(0), BLOCK_WORDS);
        assert_eq!(FILE_BYTES, 64 + 64 * 1216);
        // Every field of every op inside the block, none shared.
        assert_eq!(
            op_word(Op::WriteZeroes, O_BUCKETS + BUCKETS - 1),
            B_INFLIGHT - 1
        );
        for (i, op) in OPS.iter().enumerate() {
            assert_eq!(op_index(*op), i);
        }
    }

    #[test]
    fn latencies_land_in_the_smallest_bucket_that_holds_them() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(999), 0);
        assert_eq!(bucket(1000), 0, "1 µs is <= 1 µs");
        assert_eq!(bucket(1001), 1, "just over 1 µs");
        assert_eq!(bucket(2000), 1);
        assert_eq!(bucket(2001), 2);
        assert_eq!(bucket(4000), 2);
        assert_eq!(bucket(5000), 3);
        assert_eq!(bucket(1_000_000), 10, "1 ms <= 1024 µs");
        assert_eq!(bucket(1_024_000), 10);
        assert_eq!(bucket(1_024_001), 11);
        let last = bucket_bound_us(FINITE_BUCKETS - 1) * 1000;
        assert_eq!(bucket(last), FINITE_BUCKETS - 1, "about 16.8 s");
        assert_eq!(bucket(last + 1), FINITE_BUCKETS, "the unbounded bucket");
        assert_eq!(bucket(u64::MAX), FINITE_BUCKETS);
        // Every bound is the smallest bucket of itself and not of one more.
        for i in 0..FINITE_BUCKETS {
            let ns = bucket_bound_us(i) * 1000;
            assert_eq!(bucket(ns), i);
            assert_eq!(bucket(ns + 1), i + 1);
        }
    }
}
