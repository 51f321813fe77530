//! `null`: stores nothing. Reads return zeroes; writes, discards and write-zeroes succeed.
//!
//! Useful to measure the frontend alone. Reads and zeroing agree with each
//! other (everything reads as zero), so the device is consistent, just empty.

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
}

impl NullTarget {
    /// A null device of `size` bytes.
    pub fn new(size: u64) -> Self {
        NullTarget {
            size: AtomicU64::new(size),
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
        if ctx.req().op == Op::Read {
            // The buffer may hold an earlier write's data; zero_data
            // writes only what may not be zero already.
            ctx.zero_data();
        }
        Submit::Done(Ok(ctx.done_bytes()))
    }

    fn extents(
        &self,
        _offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(), rustix::io::Errno> {
        out.push(Extent::hole(len));
        Ok(())
    }

    fn describe(&self) -> serde_json::Value {
        json!({ "type": "null", "size": self.size() })
    }
}
