//! `offset`: serve a byte range of the target (`offset=1M,size=64M`).
//!
//! The device is the target's `[offset, offset + size)`; byte 0 of the
//! device is byte `offset` of the target. Requests are moved by `offset` on
//! their way down (on submit and on every completion passed down), and
//! block status is asked for the moved range.

use std::fmt;
use std::sync::Arc;

use rustix::io::Errno;

use super::spec::{self, Options, Printer, Spec};
use super::{Base, DataUse, Filter, FilterError};
use crate::target::{Caps, Ctx, Extent, Op, Request, Submit, Target};

/// The options of `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Where the device starts in the target.
    pub offset: u64,
    /// The device's size (default: the rest of the target).
    pub size: Option<u64>,
}

impl Config {
    /// Parse `offset=SIZE[,size=SIZE]`.
    pub fn parse(s: &Spec) -> Result<Self, FilterError> {
        let mut o = Options::new("offset", s);
        let offset = o.get("offset", spec::size)?.unwrap_or(0);
        let size = o.get("size", spec::size)?;
        o.finish()?;
        if size == Some(0) {
            return Err(invalid("size=0: the device would be empty"));
        }
        Ok(Config { offset, size })
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut p = Printer::new(f, "offset")?;
        p.opt("offset", crate::size::format(self.offset))?;
        p.opt_some("size", self.size.map(crate::size::format))
    }
}

fn invalid(msg: impl Into<String>) -> FilterError {
    FilterError::Invalid {
        filter: "offset",
        msg: msg.into(),
    }
}

/// The `offset` filter.
#[derive(Debug)]
pub struct Offset {
    base: Base,
    offset: u64,
    caps: Caps,
}

/// The largest power of two dividing `x` (for `x` = 0, `u32` max's).
fn alignment(x: u64) -> u64 {
    if x == 0 {
        1 << 31
    } else {
        1 << x.trailing_zeros().min(31)
    }
}

/// `value` cut down to `align` (both powers of two), but not below `floor`.
fn fit(value: u32, align: u64, floor: u32) -> u32 {
    let a = u32::try_from(align.min(u64::from(value))).unwrap_or(value);
    a.max(floor)
}

impl Offset {
    /// Serve `cfg`'s window of `inner`.
    pub fn new(inner: Arc<dyn Target>, cfg: Config) -> Result<Self, FilterError> {
        let ic = inner.caps();
        let lbs = u64::from(ic.logical_block_size);
        if !cfg.offset.is_multiple_of(lbs) {
            return Err(invalid(format!(
                "offset {} is not a multiple of the target's block size {lbs}",
                cfg.offset
            )));
        }
        if cfg.offset >= ic.size {
            return Err(invalid(format!(
                "offset {} is not inside the target ({} bytes)",
                cfg.offset, ic.size
            )));
        }
        let size = cfg.size.unwrap_or(ic.size - cfg.offset);
        if !size.is_multiple_of(lbs) {
            return Err(invalid(format!(
                "size {size} is not a multiple of the target's block size {lbs}"
            )));
        }
        if cfg.offset.checked_add(size).is_none_or(|end| end > ic.size) {
            return Err(invalid(format!(
                "offset {} + size {size} runs past the end of the target ({} bytes)",
                cfg.offset, ic.size
            )));
        }
        // A window that starts mid-way through a physical block or a
        // discard unit has smaller ones, as the device sees it.
        let align = alignment(cfg.offset);
        let mut caps = Caps { size, ..ic };
        caps.physical_block_size = fit(ic.physical_block_size, align, ic.logical_block_size);
        for r in [&mut caps.discard, &mut caps.write_zeroes]
            .into_iter()
            .flatten()
        {
            r.granularity = fit(r.granularity, align, ic.logical_block_size);
        }
        Ok(Offset {
            base: Base::new(inner, cfg, DataUse::Remapped)?.with_caps(caps),
            offset: cfg.offset,
            caps,
        })
    }

    /// The request as the target sees it.
    fn inner_req(&self, req: &Request) -> Request {
        if req.op == Op::Flush {
            return *req;
        }
        Request {
            offset: req.offset + self.offset,
            ..*req
        }
    }
}

impl Filter for Offset {
    fn base(&self) -> &Base {
        &self.base
    }

    fn filter_resize(&self, _new_size: u64) -> crate::Result<u64> {
        Err(self
            .base
            .cannot_resize("it serves a window of fixed length; resize a device without it"))
    }

    fn filter_submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        let req = self.inner_req(ctx.req());
        ctx.with_request(req, |ctx| self.base.inner().submit(ctx))
    }

    fn filter_complete(&self, ctx: &mut Ctx<'_>, step: u16, res: i32) -> Submit {
        let req = self.inner_req(ctx.req());
        ctx.with_request(req, |ctx| self.base.inner().complete(ctx, step, res))
    }

    fn filter_extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), Errno> {
        let len = len.min(self.caps.size.saturating_sub(offset));
        let start = out.len();
        self.base.inner().extents(offset + self.offset, len, out)?;
        super::clip_extents(out, start, len);
        Ok(())
    }

    fn filter_reads_zeroes(&self, offset: u64, len: u64) -> Result<bool, Errno> {
        match offset.checked_add(len) {
            Some(end) if end <= self.caps.size => {
                self.base.inner().reads_zeroes(offset + self.offset, len)
            }
            _ => Ok(false),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::filters::testing::{pattern, probe, ring_probe, run};
    use crate::target::RangeOpCaps;

    fn window(inner: Arc<dyn Target>, spec: &str) -> Result<Offset, FilterError> {
        Offset::new(inner, Config::parse(&spec.parse().unwrap())?)
    }

    #[test]
    fn requests_move_by_the_offset_on_submit_and_complete() {
        for (inner, seen) in [probe(4 << 20), ring_probe(4 << 20)] {
            let f = window(inner.clone(), "offset:offset=1M,size=2M").unwrap();
            assert_eq!(f.caps().size, 2 << 20);
            assert_eq!(run(&f, Op::Write, 4096, 8192).0, Ok(8192));
            assert_eq!(run(&f, Op::Flush, 0, 0).0, Ok(0));
            assert_eq!(run(&f, Op::Discard, 0, 4096).0, Ok(0));
            assert_eq!(
                seen.take(),
                [
                    Request::new(Op::Write, (1 << 20) + 4096, 8192),
                    Request::new(Op::Flush, 0, 0),
                    Request::new(Op::Discard, 1 << 20, 4096),
                ]
            );
            // The data is where the target says, and reads back through the window.
            let (r, back) = run(&*inner, Op::Read, (1 << 20) + 4096, 8192);
            assert_eq!((r, back), (Ok(8192), pattern(1, 8192)));
            assert_eq!(run(&f, Op::Read, 4096, 8192).1, pattern(1, 8192));
            // Past the window is refused before the target sees it.
            assert_eq!(run(&f, Op::Read, 2 << 20, 512).0, Err(Errno::IO));
            assert_eq!(seen.take().len(), 2);
        }
    }

    #[test]
    fn default_size_is_the_rest_and_bad_windows_are_refused() {
        let (inner, _) = probe(4 << 20);
        assert_eq!(
            window(inner.clone(), "offset:offset=1M")
                .unwrap()
                .caps()
                .size,
            3 << 20
        );
        for (bad, why) in [
            ("offset:offset=100", "not a multiple"),
            ("offset:offset=4M", "not inside"),
            ("offset:offset=1M,size=3M+", "size=3M+"),
            ("offset:offset=1M,size=4M", "runs past"),
            ("offset:size=0", "empty"),
            ("offset:offset=1M,len=1M", "unknown option 'len'"),
        ] {
            let e = window(inner.clone(), bad).err().unwrap().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn unaligned_windows_have_smaller_units() {
        let (inner, _) = probe(4 << 20);
        let c = window(inner.clone(), "offset:offset=1536").unwrap().caps();
        assert_eq!(c.physical_block_size, 512);
        assert_eq!(c.discard, Some(RangeOpCaps::with_granularity(512)));
        let c = window(inner, "offset:offset=1M").unwrap().caps();
        assert_eq!(c.physical_block_size, 4096);
        assert_eq!(c.discard.map(|d| d.granularity), Some(4096));
    }

    #[test]
    fn extents_are_the_windows() {
        let (inner, _) = probe(4 << 20);
        // Data at 1M + 8K .. 1M + 12K and at 3M (outside the window).
        assert_eq!(run(&*inner, Op::Write, (1 << 20) + 8192, 4096).0, Ok(4096));
        assert_eq!(run(&*inner, Op::Write, 3 << 20, 4096).0, Ok(4096));
        let f = window(inner, "offset:offset=1M,size=2M").unwrap();
        let mut out = Vec::new();
        f.extents(0, 2 << 20, &mut out).unwrap();
        assert_eq!(
            out,
            [
                Extent::hole(8192),
                Extent::data(4096),
                Extent::hole((2 << 20) - 12288)
            ]
        );
        // Asked for more than the device has: no more than the device.
        out.clear();
        f.extents((2 << 20) - 4096, 1 << 20, &mut out).unwrap();
        assert_eq!(out, [Extent::hole(4096)]);
    }
}
