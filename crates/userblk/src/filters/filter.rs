//! The [`Filter`] trait: a filter says only what it changes, and every
//! other [`Target`] method passes through to the target beneath.

use rustix::io::Errno;

use super::{Base, DataUse};
use crate::target::{Caps, Ctx, Extent, Submit, Target};

/// A target that wraps a target (its [`Base`]), as nbdkit's filters do:
/// every hook passes through to the inner target unless the filter
/// overrides it, and every `Filter` is a [`Target`] (by the blanket impl
/// below), so a stack is plain nesting that frontends cannot tell from a
/// target.
///
/// What has no pass-through default safe for every filter, each filter
/// declares in [`Base::new`]: how it uses request data ([`DataUse`]). From
/// that follow [`Target::data_on_ring_only`] and the defaults of block
/// status ([`Filter::filter_extents`], [`Filter::filter_reads_zeroes`]).
/// `describe` and `filter_depth` always come from the [`Base`].
///
/// The hooks have names of their own (`filter_caps` rather than `caps`),
/// so that code with both traits in scope calls a filter's `caps()`
/// without ambiguity.
///
/// A filter that counts failed requests and passes everything on:
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use userblk::filters::{Base, DataUse, Filter, FilterError};
/// use userblk::{Ctx, Submit, Target};
///
/// struct CountErrors {
///     base: Base,
///     failed: AtomicU64,
/// }
///
/// impl CountErrors {
///     fn new(inner: Arc<dyn Target>) -> Result<Self, FilterError> {
///         // Results only: the data is never looked at, and reads are the target's.
///         let base = Base::new(inner, "count-errors", DataUse::Untouched)?;
///         Ok(CountErrors { base, failed: AtomicU64::new(0) })
///     }
/// }
///
/// impl Filter for CountErrors {
///     fn base(&self) -> &Base {
///         &self.base
///     }
///     // Every result on its way up, from submit and from complete.
///     fn filter_result(&self, _ctx: &mut Ctx<'_>, s: Submit) -> Submit {
///         if let Submit::Done(Err(_)) = s {
///             self.failed.fetch_add(1, Ordering::Relaxed);
///         }
///         s
///     }
/// }
///
/// let null = Arc::new(userblk::targets::NullTarget::new(1 << 20));
/// let t = CountErrors::new(null).unwrap();
/// let mut e = userblk::slots::Engine::new(&t, 4096).unwrap();
/// let r = e.run(&t, userblk::Request::new(userblk::Op::Read, 1 << 20, 512), &mut [0; 512]);
/// assert!(r.is_err()); // past the end: refused before the filter sees it
/// assert_eq!(t.failed.load(Ordering::Relaxed), 0);
/// assert_eq!(t.caps().size, 1 << 20); // passed through
/// assert_eq!(t.describe()["filters"][0], "count-errors");
/// ```
pub trait Filter: Send + Sync {
    /// The inner target, layer, spec and use of data.
    fn base(&self) -> &Base;

    /// [`Target::caps`]: [`Base::caps`] by default (the inner target's,
    /// unless the filter gave its own to [`Base::with_caps`]).
    fn filter_caps(&self) -> Caps {
        self.base().caps()
    }

    /// [`Target::resize`]: the inner target resized by default
    /// ([`Base::resize`]). A filter whose size, or anything it keeps per
    /// block, is its own overrides this (usually to refuse with
    /// [`Base::cannot_resize`]).
    fn filter_resize(&self, new_size: u64) -> crate::Result<u64> {
        self.base().resize(new_size)
    }

    /// [`Target::submit`]: down to the inner target by default (marking
    /// when the request got here, for a [`Base::timed`] filter), its
    /// result through [`Filter::filter_result`].
    fn filter_submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        if self.base().is_timed() {
            ctx.mark(self.base().layer());
        }
        let s = self.base().inner().submit(ctx);
        self.filter_result(ctx, s)
    }

    /// [`Target::complete`]: down to the inner target by default (right
    /// for every step a filter did not queue itself), its result through
    /// [`Filter::filter_result`].
    fn filter_complete(&self, ctx: &mut Ctx<'_>, step: u16, res: i32) -> Submit {
        let s = self.base().inner().complete(ctx, step, res);
        self.filter_result(ctx, s)
    }

    /// A result of the inner target on its way up, from the default
    /// [`Filter::filter_submit`] and [`Filter::filter_complete`] (a filter
    /// that overrides those calls it itself, if it wants it): unchanged by
    /// default.
    fn filter_result(&self, ctx: &mut Ctx<'_>, s: Submit) -> Submit {
        let _ = ctx;
        s
    }

    /// [`Target::extents`]: the inner target's for [`DataUse::Untouched`],
    /// otherwise all data (always true).
    fn filter_extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), Errno> {
        if self.base().data_use() == DataUse::Untouched {
            self.base().inner().extents(offset, len, out)
        } else {
            out.push(Extent::data(len));
            Ok(())
        }
    }

    /// [`Target::reads_zeroes`]: the inner target's for
    /// [`DataUse::Untouched`], otherwise worked out from the filter's own
    /// [`Filter::filter_extents`] (false with the default's "all data").
    fn filter_reads_zeroes(&self, offset: u64, len: u64) -> Result<bool, Errno> {
        if self.base().data_use() == DataUse::Untouched {
            return self.base().inner().reads_zeroes(offset, len);
        }
        let mut extents = Vec::new();
        self.filter_extents(offset, len, &mut extents)?;
        let zeroes: u64 = extents.iter().take_while(|e| e.zero).map(|e| e.len).sum();
        Ok(zeroes >= len)
    }
}

impl<F: Filter> Target for F {
    fn caps(&self) -> Caps {
        self.filter_caps()
    }

    fn size(&self) -> u64 {
        self.base().size()
    }

    fn resize(&self, new_size: u64) -> crate::Result<u64> {
        self.filter_resize(new_size)
    }

    fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        self.filter_submit(ctx)
    }

    fn complete(&self, ctx: &mut Ctx<'_>, step: u16, res: i32) -> Submit {
        self.filter_complete(ctx, step, res)
    }

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), Errno> {
        self.filter_extents(offset, len, out)
    }

    fn reads_zeroes(&self, offset: u64, len: u64) -> Result<bool, Errno> {
        self.filter_reads_zeroes(offset, len)
    }

    fn data_on_ring_only(&self) -> bool {
        self.base().data_use() != DataUse::InMemory && self.base().inner().data_on_ring_only()
    }

    fn describe(&self) -> serde_json::Value {
        self.base().describe()
    }

    fn filter_depth(&self) -> u8 {
        self.base().depth()
    }
}
