//! `readonly`: the device refuses writes, discards and write-zeroes.
//!
//! The capabilities say read-only with no discard or write-zeroes, so
//! frontends advertise a read-only disk and refuse modifications before the
//! stack sees them; the filter refuses any that still arrive with `EROFS`.

use std::sync::Arc;

use rustix::io::Errno;

use super::{Base, DataUse, Filter, FilterError};
use crate::target::{Caps, Ctx, Submit, Target};

/// The `readonly` filter.
#[derive(Debug)]
pub struct ReadOnly {
    base: Base,
}

impl ReadOnly {
    /// Make `inner` read-only.
    pub fn new(inner: Arc<dyn Target>) -> Result<Self, FilterError> {
        let caps = Caps {
            read_only: true,
            discard: None,
            write_zeroes: None,
            ..inner.caps()
        };
        Ok(ReadOnly {
            base: Base::new(inner, "readonly", DataUse::Untouched)?.with_caps(caps),
        })
    }
}

impl Filter for ReadOnly {
    fn base(&self) -> &Base {
        &self.base
    }

    fn filter_submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        if ctx.req().op.modifies() {
            return Submit::Done(Err(Errno::ROFS));
        }
        self.base.inner().submit(ctx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::filters::testing::{probe, run};
    use crate::target::Op;

    #[test]
    fn turns_off_every_modification() {
        let (inner, seen) = probe(1 << 20);
        let ro = ReadOnly::new(inner.clone()).unwrap();
        let (c, ic) = (ro.caps(), inner.caps());
        assert!(ic.discard.is_some() && ic.write_zeroes.is_some() && !ic.read_only);
        assert!(c.read_only && c.discard.is_none() && c.write_zeroes.is_none());
        assert_eq!(
            (c.size, c.logical_block_size),
            (ic.size, ic.logical_block_size)
        );
        for op in [Op::Write, Op::Discard, Op::WriteZeroes] {
            assert_eq!(run(&ro, op, 0, 4096).0, Err(Errno::IO), "{op:?}");
        }
        assert!(seen.take().is_empty(), "a modification reached the target");
        assert_eq!(run(&ro, Op::Read, 4096, 4096).0, Ok(4096));
        assert_eq!(run(&ro, Op::Flush, 0, 0).0, Ok(0));
        assert_eq!(seen.take().len(), 2);
    }
}
