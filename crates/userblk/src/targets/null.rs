//! `null`: stores nothing. Reads return zeroes; writes, discards and write-zeroes succeed.
//!
//! Useful to measure the frontend alone. Reads and zeroing agree with each
//! other (everything reads as zero), so the device is consistent, just empty.
//!
//! Under ublk zero copy a write moves no data at all, and a read is one
//! fixed-buffer read from a sparse memfd (the zero source) into the
//! request's own pages (the kernel zeroes them in place). Without zero fill ([`NullTarget::without_zero_fill`],
//! null_blk's behaviour) reads leave the data as it is: for benchmarks only.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::json;

use crate::target::{Caps, Ctx, Extent, Op, Submit, Target};

/// Default size of a null device: 250 GiB.
pub const DEFAULT_SIZE: u64 = 250 << 30;

/// The null target.
///
/// ```
/// use userblk::{slots::Engine, targets::NullTarget, Op, Request};
/// let t = NullTarget::new(1 << 20);
/// let mut e = Engine::new(&t, 4096).unwrap();
/// let mut buf = vec![7u8; 4096];
/// assert_eq!(e.run(&t, Request::new(Op::Read, 0, 4096), &mut buf), Ok(4096));
/// assert!(buf.iter().all(|&b| b == 0));
/// ```
#[derive(Debug)]
pub struct NullTarget {
    size: AtomicU64,
    zero_fill: bool,
    /// Where zero-copy reads get their zeroes ([`super::zero_source`]);
    /// without it a zero-filling null target cannot zero copy.
    zeroes: Option<OwnedFd>,
}

impl NullTarget {
    /// A null device of `size` bytes.
    pub fn new(size: u64) -> Self {
        let zeroes = super::zero_source()
            .map_err(|e| tracing::debug!("null: no zero source (memfd): {e}; no zero copy"))
            .ok();
        NullTarget {
            size: AtomicU64::new(size),
            zero_fill: true,
            zeroes,
        }
    }

    /// A null device of `size` bytes whose reads leave the data as they
    /// find it, as null_blk's do: no zeroing, no data movement at all.
    /// What a read returns is then whatever the buffer held: an earlier
    /// request's data, or under ublk zero copy the old contents of the
    /// kernel pages the reader gave, which may be anyone's freed memory.
    /// Only readers of the device see it; for benchmarks only.
    pub fn without_zero_fill(size: u64) -> Self {
        NullTarget {
            size: AtomicU64::new(size),
            zero_fill: false,
            zeroes: None,
        }
    }
}

impl Target for NullTarget {
    fn caps(&self) -> Caps {
        super::mem::ram_caps(self.size())
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn resize(&self, new_size: u64) -> crate::Result<u64> {
        self.size.store(new_size, Ordering::Release);
        Ok(new_size)
    }

    fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        if ctx.req().op != Op::Read || !self.zero_fill {
            return Submit::Done(Ok(ctx.done_bytes()));
        }
        if ctx.has_data_buffer() {
            // The buffer may hold an earlier write's data; zero_data
            // writes only what may not be zero already.
            ctx.zero_data();
            return Submit::Done(Ok(ctx.done_bytes()));
        }
        // Zero copy: the kernel zeroes the request's pages from the zero source.
        let Some(zeroes) = &self.zeroes else {
            tracing::error!("null: a zero-copy read without a zero source");
            return Submit::Done(Err(rustix::io::Errno::IO));
        };
        match ctx.read_at(zeroes.as_fd(), 0, 0) {
            Ok(()) => Submit::Pending,
            Err(e) => Submit::Done(Err(e)),
        }
    }

    fn complete(&self, ctx: &mut Ctx<'_>, _step: u16, res: i32) -> Submit {
        Submit::Done(super::whole_transfer(ctx, res))
    }

    fn data_on_ring_only(&self) -> bool {
        !self.zero_fill || self.zeroes.is_some()
    }

    fn extents(
        &self,
        _offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(), rustix::io::Errno> {
        // Without zero fill nothing is known to read as zero.
        out.push(if self.zero_fill {
            Extent::hole(len)
        } else {
            Extent::data(len)
        });
        Ok(())
    }

    fn describe(&self) -> serde_json::Value {
        if self.zero_fill {
            json!({ "type": "null", "size": self.size() })
        } else {
            json!({ "type": "null", "size": self.size(), "zero_fill": false })
        }
    }
}
