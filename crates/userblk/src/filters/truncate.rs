//! `truncate`: give the target another apparent size (`size=10G`).
//!
//! Smaller: the end of the target is out of reach. Larger: the bytes past
//! the target's end read as zeroes; writing zeroes there (or discarding)
//! succeeds, writing anything else fails with `ENOSPC`, as there is nowhere
//! to keep it. A request across the target's end is cut at the end on its
//! way down and the rest is served here. The size is rounded up to the
//! target's logical block size.

use std::fmt;
use std::sync::Arc;

use rustix::io::Errno;

use super::spec::{self, Options, Spec};
use super::{Base, DataUse, Filter, FilterError};
use crate::target::{Caps, Ctx, Extent, IoResult, Op, Request, Submit, Target};

/// The options of `truncate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// The device's size before rounding up to whole blocks.
    pub size: u64,
}

impl Config {
    /// Parse `size=SIZE`.
    pub fn parse(s: &Spec) -> Result<Self, FilterError> {
        let mut o = Options::new("truncate", s);
        let size = o.get("size", spec::size)?;
        o.finish()?;
        let size = spec::required(size, "truncate", "size")?;
        if size == 0 {
            return Err(FilterError::Invalid {
                filter: "truncate",
                msg: "size=0: the device would be empty".into(),
            });
        }
        Ok(Config { size })
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "truncate:size={}", crate::size::format(self.size))
    }
}

/// The `truncate` filter.
#[derive(Debug)]
pub struct Truncate {
    base: Base,
    caps: Caps,
    /// The target's size.
    inner_size: u64,
}

/// Where a request falls against the target's end.
enum Split {
    /// All inside: passed down as it is.
    Inside,
    /// Across the end: the first `inside` bytes go down.
    Across { inside: u32 },
    /// All past the end: served here.
    Beyond,
}

impl Truncate {
    /// Show `inner` as `cfg.size` bytes (rounded up to whole blocks).
    pub fn new(inner: Arc<dyn Target>, cfg: Config) -> Result<Self, FilterError> {
        let ic = inner.caps();
        let size = cfg
            .size
            .checked_next_multiple_of(u64::from(ic.logical_block_size))
            .ok_or_else(|| FilterError::Invalid {
                filter: "truncate",
                msg: format!("size {} is too large", cfg.size),
            })?;
        // Only a larger device has bytes past the target's end, which are
        // served here: reads zeroed, writes looked at to refuse data.
        let data = if size > ic.size {
            DataUse::InMemory
        } else {
            DataUse::Remapped
        };
        let caps = Caps { size, ..ic };
        Ok(Truncate {
            base: Base::new(inner, cfg, data)?.with_caps(caps),
            caps,
            inner_size: ic.size,
        })
    }

    fn split(&self, req: &Request) -> Split {
        if req.op == Op::Flush || req.offset + u64::from(req.len) <= self.inner_size {
            Split::Inside
        } else if req.offset >= self.inner_size {
            Split::Beyond
        } else {
            // Less than `req.len`, so it fits.
            let inside = u32::try_from(self.inner_size - req.offset).unwrap_or(req.len);
            Split::Across { inside }
        }
    }

    /// Finish a request cut at the target's end once its inside part is done.
    fn finish_across(ctx: &mut Ctx<'_>, inside: u32, s: Submit) -> Submit {
        match s {
            Submit::Done(Ok(_)) => {
                if ctx.req().op == Op::Read {
                    ctx.data_mut()[inside as usize..].fill(0);
                }
                Submit::Done(Ok(ctx.done_bytes()))
            }
            other => other,
        }
    }

    /// Serve a request (or its part) past the target's end.
    fn beyond(ctx: &mut Ctx<'_>, from: u32) -> IoResult {
        let from = from as usize;
        match ctx.req().op {
            Op::Read => ctx.data_mut()[from..].fill(0),
            Op::Write if ctx.data()[from..].iter().any(|&b| b != 0) => return Err(Errno::NOSPC),
            Op::Write | Op::Discard | Op::WriteZeroes | Op::Flush => {}
        }
        Ok(ctx.done_bytes())
    }
}

impl Filter for Truncate {
    fn base(&self) -> &Base {
        &self.base
    }

    fn filter_resize(&self, _new_size: u64) -> crate::Result<u64> {
        Err(self
            .base
            .cannot_resize("the size is its own (`size=`); change it with a new device"))
    }

    fn filter_submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        match self.split(ctx.req()) {
            Split::Inside => self.base.inner().submit(ctx),
            Split::Beyond => Submit::Done(Self::beyond(ctx, 0)),
            Split::Across { inside } => {
                // Refuse before writing anything when the rest cannot be kept.
                if let Err(e) = Self::beyond(ctx, inside) {
                    return Submit::Done(Err(e));
                }
                let req = Request {
                    len: inside,
                    ..*ctx.req()
                };
                let s = ctx.with_request(req, |ctx| self.base.inner().submit(ctx));
                Self::finish_across(ctx, inside, s)
            }
        }
    }

    fn filter_complete(&self, ctx: &mut Ctx<'_>, step: u16, res: i32) -> Submit {
        match self.split(ctx.req()) {
            Split::Inside | Split::Beyond => self.base.inner().complete(ctx, step, res),
            Split::Across { inside } => {
                let req = Request {
                    len: inside,
                    ..*ctx.req()
                };
                let s = ctx.with_request(req, |ctx| self.base.inner().complete(ctx, step, res));
                Self::finish_across(ctx, inside, s)
            }
        }
    }

    fn filter_extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), Errno> {
        let len = len.min(self.caps.size.saturating_sub(offset));
        if offset >= self.inner_size {
            out.push(Extent::hole(len));
            return Ok(());
        }
        let inside = len.min(self.inner_size - offset);
        let start = out.len();
        self.base.inner().extents(offset, inside, out)?;
        super::clip_extents(out, start, inside);
        let covered: u64 = out[start..].iter().map(|e| e.len).sum();
        if covered == inside && len > inside {
            out.push(Extent::hole(len - inside));
        }
        Ok(())
    }

    fn filter_reads_zeroes(&self, offset: u64, len: u64) -> Result<bool, Errno> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.caps.size)
        {
            return Ok(false);
        }
        if offset >= self.inner_size {
            return Ok(true);
        }
        // Past the target's end it is all zeroes: only the inside part counts.
        let inside = len.min(self.inner_size - offset);
        self.base.inner().reads_zeroes(offset, inside)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::filters::testing::{pattern, probe, ring_probe, run, run_on};
    use crate::slots::Engine;

    fn truncate(inner: Arc<dyn Target>, size: &str) -> Truncate {
        let spec = format!("truncate:size={size}").parse().unwrap();
        Truncate::new(inner, Config::parse(&spec).unwrap()).unwrap()
    }

    #[test]
    fn shrinks() {
        let (inner, seen) = probe(4 << 20);
        let t = truncate(inner, "1M");
        assert_eq!(t.caps().size, 1 << 20);
        assert_eq!(run(&t, Op::Read, (1 << 20) - 512, 512).0, Ok(512));
        assert_eq!(run(&t, Op::Read, 1 << 20, 512).0, Err(Errno::IO));
        assert_eq!(seen.take().len(), 1);
    }

    #[test]
    fn rounds_up_to_whole_blocks() {
        let (inner, _) = probe(1 << 20);
        assert_eq!(truncate(inner.clone(), "1000").caps().size, 1024);
        assert_eq!(truncate(inner, "1M").caps().size, 1 << 20);
    }

    #[test]
    fn grows_with_zeroes() {
        for (inner, seen) in [probe(1 << 20), ring_probe(1 << 20)] {
            let t = truncate(inner.clone(), "2M");
            assert_eq!(t.caps().size, 2 << 20);
            // Fill the target, so zeroes can only come from the filter.
            let ones = vec![1u8; 1 << 20];
            let mut e = Engine::new(&*inner, 1 << 20).unwrap();
            assert_eq!(
                e.run(
                    &*inner,
                    Request::new(Op::Write, 0, 1 << 20),
                    &mut ones.clone()
                ),
                Ok(1 << 20)
            );
            seen.take();

            // Across the end: the inside part goes down cut at the end.
            let (r, data) = run(&t, Op::Read, (1 << 20) - 4096, 8192);
            assert_eq!(r, Ok(8192));
            assert!(data[..4096].iter().all(|&b| b == 1));
            assert!(data[4096..].iter().all(|&b| b == 0));
            assert_eq!(
                seen.take(),
                [Request::new(Op::Read, (1 << 20) - 4096, 4096)]
            );

            // All past the end: the target never sees it.
            let (r, data) = run(&t, Op::Read, 1 << 20, 4096);
            assert_eq!(r, Ok(4096));
            assert!(data.iter().all(|&b| b == 0));
            assert_eq!(run(&t, Op::Discard, 1 << 20, 4096).0, Ok(0));
            assert_eq!(run(&t, Op::WriteZeroes, (1 << 20) - 4096, 8192).0, Ok(0));
            assert_eq!(
                seen.take(),
                [Request::new(Op::WriteZeroes, (1 << 20) - 4096, 4096)]
            );

            // Writes past the end: zeroes are fine, data has nowhere to go.
            let mut te = Engine::new(&t, 1 << 20).unwrap();
            let mut zeroes = vec![0u8; 8192];
            zeroes[..4096].copy_from_slice(&pattern(3, 4096));
            let req = Request::new(Op::Write, (1 << 20) - 4096, 8192);
            assert_eq!(te.run(&t, req, &mut zeroes), Ok(8192));
            assert_eq!(
                seen.take(),
                [Request::new(Op::Write, (1 << 20) - 4096, 4096)]
            );
            assert_eq!(run_on(&mut te, &t, req).0, Err(Errno::NOSPC));
            assert_eq!(
                run_on(&mut te, &t, Request::new(Op::Write, 1 << 20, 512)).0,
                Err(Errno::NOSPC)
            );
            assert!(seen.take().is_empty(), "a refused write reached the target");
        }
    }

    #[test]
    fn extents_past_the_end_are_holes() {
        let (inner, _) = probe(1 << 20);
        assert_eq!(run(&*inner, Op::Write, 0, 4096).0, Ok(4096));
        let t = truncate(inner, "2M");
        let mut out = Vec::new();
        t.extents(0, 2 << 20, &mut out).unwrap();
        assert_eq!(
            out,
            [
                Extent::data(4096),
                Extent::hole((1 << 20) - 4096),
                Extent::hole(1 << 20)
            ]
        );
        out.clear();
        t.extents(3 << 19, 1 << 20, &mut out).unwrap();
        assert_eq!(out, [Extent::hole(1 << 19)]);
    }
}
