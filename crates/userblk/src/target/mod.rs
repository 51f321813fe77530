//! The [`Target`] trait: what every frontend calls and every target implements.
//!
//! A frontend (ublk, NBD, FUSE, `userblk copy`) turns what it receives into a
//! [`Request`] and hands it to the target with a [`Ctx`], which holds the
//! request's data buffer and, for io_uring-native targets, the frontend
//! thread's own ring. The target answers [`Submit::Done`] when it finished
//! inline, or [`Submit::Pending`] after queueing work on the ring; the ring's
//! completion then comes back through [`Target::complete`].
//!
//! Filters (see [`crate::filters`]) are targets that wrap a target: they
//! pass requests on, possibly changed, and their results back, possibly
//! changed. They share the ring's `step` numbers with the target beneath
//! them, by a fixed split: see [`FILTER_STEP_BASE`].
//!
//! Requests reach a target only after [`validate`] has checked them against
//! the target's [`Caps`], so targets never see a request past the end, a
//! write to a read-only device or an op they did not declare.
//!
//! A minimal target (see also [`crate::targets::null`]):
//! ```
//! use userblk::{Caps, Ctx, Op, Submit, Target};
//!
//! /// A device whose every byte reads as 0xAB and that ignores writes.
//! struct Pattern;
//!
//! impl Target for Pattern {
//!     fn caps(&self) -> Caps {
//!         Caps::new(1 << 30)
//!     }
//!     fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
//!         let req = *ctx.req();
//!         if req.op == Op::Read {
//!             ctx.data_mut().fill(0xAB);
//!         }
//!         Submit::Done(Ok(ctx.done_bytes()))
//!     }
//! }
//! ```

mod ctx;

#[cfg(test)]
pub(crate) use ctx::tests::FixedEntry;
pub use ctx::Ctx;
pub use rustix::io::Errno;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Read `len` bytes at `offset` into the buffer.
    Read,
    /// Write `len` bytes from the buffer at `offset`.
    Write,
    /// Make every completed write durable.
    Flush,
    /// The range's contents are no longer needed (a hint; may read as anything after).
    Discard,
    /// The range must read as zeroes.
    WriteZeroes,
}

impl Op {
    /// The op's place in per-op tables (filters' options, metrics' counters):
    /// read, write, flush, discard, write-zeroes.
    pub const fn index(self) -> usize {
        match self {
            Op::Read => 0,
            Op::Write => 1,
            Op::Flush => 2,
            Op::Discard => 3,
            Op::WriteZeroes => 4,
        }
    }

    /// Whether the op moves data through the buffer.
    pub const fn has_data(self) -> bool {
        matches!(self, Op::Read | Op::Write)
    }

    /// Whether the op changes the device's contents.
    pub const fn modifies(self) -> bool {
        matches!(self, Op::Write | Op::Discard | Op::WriteZeroes)
    }
}

/// Request flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Flags(u8);

impl Flags {
    /// No flags.
    pub const NONE: Flags = Flags(0);
    /// Forced unit access: the write is durable when it completes.
    pub const FUA: Flags = Flags(1 << 0);
    /// Write-zeroes must leave the range allocated.
    pub const NOUNMAP: Flags = Flags(1 << 1);

    /// Whether every flag in `other` is set.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Both sets together.
    #[must_use]
    pub const fn with(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }
}

/// One block request: op, byte range and flags. The data lives in the [`Ctx`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// Byte offset on the device.
    pub offset: u64,
    /// Length in bytes (0 for flush).
    pub len: u32,
    /// FUA, NOUNMAP.
    pub flags: Flags,
}

impl Request {
    /// A request with no flags.
    pub const fn new(op: Op, offset: u64, len: u32) -> Self {
        Request {
            op,
            offset,
            len,
            flags: Flags::NONE,
        }
    }

    /// The same request with `flags` added.
    #[must_use]
    pub const fn with_flags(mut self, flags: Flags) -> Self {
        self.flags = self.flags.with(flags);
        self
    }
}

/// How a request ended: bytes moved (reads and writes; 0 for other ops), or an errno.
pub type IoResult = Result<u32, Errno>;

/// What [`Target::submit`] and [`Target::complete`] return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a request that is neither done nor pending is lost"]
pub enum Submit {
    /// Finished now with this result.
    Done(IoResult),
    /// Work is queued on the ring; [`Target::complete`] will be called with its completion.
    Pending,
}

/// Discard or write-zeroes limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RangeOpCaps {
    /// Smallest unit the target can act on, in bytes (a power of two, at least the logical block size).
    pub granularity: u32,
    /// Largest single request in bytes.
    pub max_bytes: u64,
}

/// What a target declares about itself. Frontends advertise exactly this.
///
/// The defaults (from [`Caps::new`]) are conservative: 512-byte blocks,
/// writable, no volatile cache (so no flushes), no discard, no write-zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Caps {
    /// Size in bytes; a multiple of `logical_block_size`.
    pub size: u64,
    /// Smallest addressable unit; a power of two from 512 to the page size.
    pub logical_block_size: u32,
    /// Preferred unit for writes, at least `logical_block_size`.
    pub physical_block_size: u32,
    /// Writes, discards and write-zeroes are refused with EIO before the target sees them.
    pub read_only: bool,
    /// Completed writes may sit in a cache until a flush: the frontend must send flushes.
    pub volatile_cache: bool,
    /// The target honours FUA (only meaningful with `volatile_cache`).
    pub fua: bool,
    /// Seeks cost time (spinning disks, some network stores).
    pub rotational: bool,
    /// Discard support.
    pub discard: Option<RangeOpCaps>,
    /// Write-zeroes support.
    pub write_zeroes: Option<RangeOpCaps>,
    /// Largest read or write the target accepts, if it has a limit of its own.
    pub max_request: Option<u32>,
}

impl RangeOpCaps {
    /// Limits with `granularity` and the largest size a request can carry.
    pub const fn with_granularity(granularity: u32) -> Self {
        RangeOpCaps {
            granularity,
            max_bytes: MAX_RANGE_OP_BYTES,
        }
    }
}

/// Largest discard or write-zeroes a ublk request can carry: `u32::MAX` sectors,
/// kept below 4 GiB because some kernels truncate larger zero-outs.
pub const MAX_RANGE_OP_BYTES: u64 = ((u32::MAX >> 9) as u64) << 9;

impl Caps {
    /// Conservative capabilities for a device of `size` bytes.
    pub const fn new(size: u64) -> Self {
        Caps {
            size,
            logical_block_size: 512,
            physical_block_size: 4096,
            read_only: false,
            volatile_cache: false,
            fua: false,
            rotational: false,
            discard: None,
            write_zeroes: None,
            max_request: None,
        }
    }

    /// Whether the target accepts `op` at all (ignoring range checks).
    pub const fn supports(&self, op: Op) -> bool {
        match op {
            Op::Read => true,
            Op::Write => !self.read_only,
            Op::Flush => true,
            Op::Discard => !self.read_only && self.discard.is_some(),
            Op::WriteZeroes => !self.read_only && self.write_zeroes.is_some(),
        }
    }

    /// Check the declared capabilities are self-consistent.
    pub fn check(&self) -> crate::Result<()> {
        let lbs = self.logical_block_size;
        if !lbs.is_power_of_two() || !(512..=65536).contains(&lbs) {
            return Err(crate::Error::invalid(format!(
                "logical block size {lbs} must be a power of two from 512"
            )));
        }
        if !self.physical_block_size.is_power_of_two() || self.physical_block_size < lbs {
            return Err(crate::Error::invalid(format!(
                "physical block size {} must be a power of two >= the logical block size {lbs}",
                self.physical_block_size
            )));
        }
        if self.size == 0 {
            return Err(crate::Error::invalid("device size is 0"));
        }
        if !self.size.is_multiple_of(u64::from(lbs)) {
            return Err(crate::Error::invalid(format!(
                "device size {} is not a multiple of the block size {lbs}",
                self.size
            )));
        }
        if let Some(m) = self.max_request {
            if m < lbs {
                return Err(crate::Error::invalid(format!(
                    "largest request {m} is below the logical block size {lbs}"
                )));
            }
        }
        for r in [self.discard, self.write_zeroes].into_iter().flatten() {
            if !r.granularity.is_power_of_two()
                || r.granularity < lbs
                || r.max_bytes < u64::from(r.granularity)
            {
                return Err(crate::Error::invalid(format!(
                    "invalid discard/write-zeroes limits {r:?}"
                )));
            }
        }
        Ok(())
    }
}

/// Check a request against the capabilities before it reaches the target.
///
/// Ranges must lie inside the device and be aligned to the logical block
/// size; ops the target did not declare get `EOPNOTSUPP`, and modifications of
/// a read-only device `EIO` (as the kernel's own read-only checks would).
pub fn validate(caps: &Caps, req: &Request) -> Result<(), Errno> {
    if req.op.modifies() && caps.read_only {
        return Err(Errno::IO);
    }
    if !caps.supports(req.op) {
        return Err(Errno::OPNOTSUPP);
    }
    if req.op == Op::Flush {
        return Ok(());
    }
    let lbs = u64::from(caps.logical_block_size);
    let end = req
        .offset
        .checked_add(u64::from(req.len))
        .ok_or(Errno::IO)?;
    if end > caps.size
        || !req.offset.is_multiple_of(lbs)
        || u64::from(req.len) % lbs != 0
        || req.len == 0
    {
        return Err(Errno::IO);
    }
    Ok(())
}

/// A run of bytes with one allocation state, as reported by [`Target::extents`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u64,
    /// Not allocated in the backing store (a hole in a sparse file).
    pub hole: bool,
    /// Known to read as zeroes.
    pub zero: bool,
}

impl Extent {
    /// Allocated data (the answer when nothing better is known).
    pub const fn data(len: u64) -> Self {
        Extent {
            len,
            hole: false,
            zero: false,
        }
    }

    /// A hole that reads as zeroes.
    pub const fn hole(len: u64) -> Self {
        Extent {
            len,
            hole: true,
            zero: true,
        }
    }

    /// Append `self` to `out`, merged into the last extent if that one was
    /// appended by the same call (index `first` or later) and is of the
    /// same kind; an empty extent is dropped.
    pub fn push_merged(self, out: &mut Vec<Extent>, first: usize) {
        if self.len == 0 {
            return;
        }
        let ours = out.len() > first;
        match out.last_mut() {
            Some(last) if ours && last.hole == self.hole && last.zero == self.zero => {
                last.len += self.len;
            }
            _ => out.push(self),
        }
    }
}

/// First `step` number reserved for filters.
///
/// Steps are how a request's ring operations find their way back to the
/// code that queued them ([`Target::complete`]). One request passes down a
/// whole stack of filters to a target, so the step space is split:
/// - `0 .. FILTER_STEP_BASE` belongs to the target at the bottom of the stack;
/// - from `FILTER_STEP_BASE` up, filter layer `L` (0 for the filter right
///   over the target, counted up towards the frontend; see
///   [`Target::filter_depth`]) owns the 256 steps from
///   [`filter_step(L, 0)`](filter_step) to [`filter_step(L, 255)`](filter_step).
///
/// A filter's `complete` handles the steps of its own layer and passes every
/// other one to its inner target, so a completion always reaches the layer
/// that asked for it, through every layer in between (which can then see
/// the result as it comes back up).
pub const FILTER_STEP_BASE: u16 = 0xC000;

/// Most filters one stack can hold (the step space above [`FILTER_STEP_BASE`] is 64 × 256).
pub const MAX_FILTER_LAYERS: u8 = 64;

/// Step `n` of filter layer `layer` (see [`FILTER_STEP_BASE`]).
/// `layer` is taken modulo [`MAX_FILTER_LAYERS`].
pub const fn filter_step(layer: u8, n: u8) -> u16 {
    FILTER_STEP_BASE + ((layer % MAX_FILTER_LAYERS) as u16) * 256 + n as u16
}

/// The filter layer and its step number that own `step`, or `None` for a target's step.
pub const fn filter_step_owner(step: u16) -> Option<(u8, u8)> {
    if step < FILTER_STEP_BASE {
        return None;
    }
    let rel = step - FILTER_STEP_BASE;
    Some(((rel >> 8) as u8, (rel & 0xff) as u8))
}

/// A block device served from userspace.
///
/// One value serves every queue of a device at once (`&self`, `Send + Sync`);
/// state a queue needs for itself belongs in the [`Ctx`] or in per-queue
/// structures inside the target.
pub trait Target: Send + Sync {
    /// What the target can do. Called when the device is set up; nothing
    /// but `size` may change afterwards, and `size` only by [`Target::resize`].
    fn caps(&self) -> Caps;

    /// The size now, in bytes: [`Caps::size`], which only a
    /// [`Target::resize`] changes. Asked for every request (the slots check
    /// requests against it), so a target that can be resized answers from
    /// an atomic rather than working out all its caps.
    fn size(&self) -> u64 {
        self.caps().size
    }

    /// Change the size to `new_size` bytes (a multiple of the logical block
    /// size, not 0; checked by [`crate::resize::check`] before this is
    /// called), while requests are served. Returns the size now. A grown
    /// range reads as zeroes. Shrinking drops the data past the new end,
    /// which the caller allowed; a target that cannot shrink refuses.
    ///
    /// The default refuses: most targets cannot change their size.
    fn resize(&self, new_size: u64) -> crate::Result<u64> {
        let _ = new_size;
        let what = self
            .describe()
            .get("type")
            .and_then(|t| t.as_str())
            .map_or_else(|| "this target".to_string(), |t| format!("the {t} target"));
        Err(crate::Error::cannot_resize(
            what,
            "it has no way to change its size",
        ))
    }

    /// Start serving one request. Called only for requests [`validate`] accepted.
    ///
    /// Finish inline with [`Submit::Done`], or queue work on the context's ring
    /// and return [`Submit::Pending`].
    ///
    /// A target may answer early: return `Done` (here or from
    /// [`complete`](Self::complete)) while ring operations or a
    /// [`Deferred`](crate::io::Deferred) it queued for the request are still
    /// outstanding. The frontend then keeps the request's buffer and holds
    /// the result back until every one of them has completed (their
    /// completions are not passed to `complete`), so no operation ever
    /// points into a buffer that serves another request, and the request
    /// is acknowledged only after its work ended. This is the rule of the
    /// one slot state machine every frontend drives ([`crate::slots`]).
    fn submit(&self, ctx: &mut Ctx<'_>) -> Submit;

    /// A ring operation queued by this target for `ctx`'s request completed
    /// with `res` (a byte count or `-errno`). `step` is the value the target
    /// passed when it queued the operation, for multi-step requests.
    ///
    /// The default is for inline targets, which never queue work.
    fn complete(&self, ctx: &mut Ctx<'_>, step: u16, res: i32) -> Submit {
        let _ = (ctx, step, res);
        tracing::error!("target received a ring completion it never asked for");
        Submit::Done(Err(Errno::IO))
    }

    /// Describe the allocation of `[offset, offset + len)` (inside the
    /// device) as consecutive extents from `offset`, appended to `out`.
    /// They may cover less than `len` (at least one block), never more.
    /// Used for NBD block status; called on a frontend thread, so it should
    /// be quick (an `lseek(SEEK_DATA)` or a table lookup).
    ///
    /// The default reports everything as allocated data, which is always correct.
    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), Errno> {
        let _ = offset;
        out.push(Extent::data(len));
        Ok(())
    }

    /// Whether every byte of `[offset, offset + len)` (inside the device)
    /// is known to read as zero; false when unknown.
    ///
    /// Asked on the read path (the NBD server answers a big read of zeroes
    /// with one hole chunk), so it must cost no more than one
    /// `lseek(SEEK_DATA)` or a table lookup. The default asks
    /// [`Target::extents`]; a target whose extents cost more than that (a
    /// `SEEK_HOLE` on tmpfs walks every page up to the next hole) or a filter
    /// that passes extents through unchanged overrides it.
    fn reads_zeroes(&self, offset: u64, len: u64) -> Result<bool, Errno> {
        let mut extents = Vec::new();
        self.extents(offset, len, &mut extents)?;
        let zeroes: u64 = extents.iter().take_while(|e| e.zero).map(|e| e.len).sum();
        Ok(zeroes >= len)
    }

    /// Whether the target can serve requests whose data it cannot touch in
    /// memory (no [`Ctx::data`], [`Ctx::data_mut`], [`Ctx::zero_data`],
    /// [`Ctx::defer`]), moving it only with [`Ctx::read_at`] and
    /// [`Ctx::write_at`] whenever [`Ctx::has_data_buffer`] is false. Only
    /// then may a frontend give it requests whose data stays in the
    /// kernel's pages (ublk zero copy, `Ctx::new_fixed`). A target may still
    /// use the data in memory when the context has a buffer (mem, null).
    ///
    /// The default is false, which is always safe: a filter that wraps such
    /// a target keeps the default unless it, too, never looks at the data.
    fn data_on_ring_only(&self) -> bool {
        false
    }

    /// A short description of the target and its options, for `list` and logs.
    fn describe(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// How many filters this target is made of: 0 for a plain target, and
    /// for a filter one more than its inner target's. A filter's own layer
    /// number, which picks its step numbers ([`FILTER_STEP_BASE`]) and its
    /// per-request marks ([`Ctx::mark`]), is its inner target's depth.
    fn filter_depth(&self) -> u8 {
        0
    }
}

/// Turn a ring completion value into an [`IoResult`].
pub fn ring_result(res: i32) -> IoResult {
    if res < 0 {
        Err(Errno::from_raw_os_error(-res))
    } else {
        Ok(res.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> Caps {
        let mut c = Caps::new(1 << 20);
        c.discard = Some(RangeOpCaps {
            granularity: 4096,
            max_bytes: MAX_RANGE_OP_BYTES,
        });
        c
    }

    #[test]
    fn validate_bounds_and_alignment() {
        let c = caps();
        assert_eq!(validate(&c, &Request::new(Op::Read, 0, 4096)), Ok(()));
        assert_eq!(
            validate(&c, &Request::new(Op::Read, (1 << 20) - 512, 512)),
            Ok(())
        );
        assert_eq!(
            validate(&c, &Request::new(Op::Read, 1 << 20, 512)),
            Err(Errno::IO)
        );
        assert_eq!(
            validate(&c, &Request::new(Op::Read, (1 << 20) - 512, 1024)),
            Err(Errno::IO)
        );
        assert_eq!(
            validate(&c, &Request::new(Op::Write, 100, 512)),
            Err(Errno::IO)
        );
        assert_eq!(validate(&c, &Request::new(Op::Write, 0, 0)), Err(Errno::IO));
        assert_eq!(
            validate(&c, &Request::new(Op::Read, u64::MAX - 100, 512)),
            Err(Errno::IO)
        );
        assert_eq!(validate(&c, &Request::new(Op::Flush, 0, 0)), Ok(()));
    }

    #[test]
    fn validate_ops_against_caps() {
        let mut c = caps();
        assert_eq!(validate(&c, &Request::new(Op::Discard, 0, 4096)), Ok(()));
        assert_eq!(
            validate(&c, &Request::new(Op::WriteZeroes, 0, 4096)),
            Err(Errno::OPNOTSUPP)
        );
        c.read_only = true;
        assert_eq!(
            validate(&c, &Request::new(Op::Write, 0, 512)),
            Err(Errno::IO)
        );
        assert_eq!(
            validate(&c, &Request::new(Op::Discard, 0, 4096)),
            Err(Errno::IO)
        );
        assert_eq!(validate(&c, &Request::new(Op::Read, 0, 512)), Ok(()));
    }

    #[test]
    fn caps_check() {
        assert!(Caps::new(1 << 20).check().is_ok());
        let small = Caps {
            max_request: Some(256),
            ..Caps::new(1 << 20)
        };
        assert!(small.check().is_err(), "max_request below a block");
        let one = Caps {
            max_request: Some(512),
            ..Caps::new(1 << 20)
        };
        assert!(one.check().is_ok());
        assert!(Caps::new(0).check().is_err());
        assert!(Caps::new(1000).check().is_err());
        let mut c = Caps::new(1 << 20);
        c.logical_block_size = 4096;
        c.physical_block_size = 512;
        assert!(c.check().is_err());
        c.physical_block_size = 4096;
        assert!(c.check().is_ok());
        c.logical_block_size = 1000;
        assert!(c.check().is_err());
    }

    #[test]
    fn flags() {
        let f = Flags::FUA.with(Flags::NOUNMAP);
        assert!(f.contains(Flags::FUA) && f.contains(Flags::NOUNMAP));
        assert!(!Flags::FUA.contains(Flags::NOUNMAP));
        assert!(Flags::NONE.contains(Flags::NONE));
    }

    #[test]
    fn filter_steps_are_apart_from_target_steps() {
        assert_eq!(filter_step_owner(0), None);
        assert_eq!(filter_step_owner(FILTER_STEP_BASE - 1), None);
        assert_eq!(filter_step(0, 0), FILTER_STEP_BASE);
        assert_eq!(filter_step(MAX_FILTER_LAYERS - 1, 255), u16::MAX);
        for layer in [0, 1, 17, MAX_FILTER_LAYERS - 1] {
            for n in [0, 1, 255] {
                assert_eq!(filter_step_owner(filter_step(layer, n)), Some((layer, n)));
            }
        }
    }

    #[test]
    fn ring_results() {
        assert_eq!(ring_result(4096), Ok(4096));
        assert_eq!(ring_result(-5), Err(Errno::IO));
    }
}
