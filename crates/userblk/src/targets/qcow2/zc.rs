//! qcow2 under ublk zero copy: the request's data stays in the kernel's
//! pages and moves only with ring operations on parts of it
//! ([`Ctx::read_at_part`], [`Ctx::write_at_part`]).
//!
//! Reads, piece by piece ([`Image::map_read`]): allocated data clusters go
//! straight from the image file into the request's pages, zeroes come from
//! the zero source (a sparse memfd); compressed and backing pieces are read into memory as
//! [`Image::read`] does, written to a scratch memfd and read from there
//! (they copy). Writes to clusters already allocated to the image go
//! straight from the request's pages to the file
//! ([`Image::map_in_place`]); writes that allocate or copy on write stage
//! the data in the scratch memfd and take [`Image::write`], whose order of
//! data and metadata writes keeps the image consistent across a crash.
//!
//! A request is answered once every ring operation it queued completed:
//! the count, the first error and whether it was written in place are kept
//! per thread and slot (a slot's request starts and completes on one
//! thread, the one that owns its ring).

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::MemfdFlags;
use rustix::io::{Errno, ReadWriteFlags};

use super::image::Image;
use super::map::{Piece, Source};
use crate::io::fd::{read_exact, write_all};
use crate::target::{ring_result, Ctx, Flags, Op, Submit};

/// A ring operation moving one piece of a read, or of a write in place.
const STEP_PART: u16 = 0;
/// A write's data on its way into the scratch memfd.
const STEP_STAGE: u16 = 1;

/// Room of one slot in the scratch memfd: the largest request ublk sends
/// (`UBLK_IO_BUF_BITS`). The memfd is sparse; only what was copied uses memory.
const SLOT_ROOM: u64 = 1 << 25;

/// Most ring operations for one request; more pieces than this copy.
const MAX_PIECES: usize = 64;

/// Tells targets apart in the per-thread state (an address could be reused).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What a qcow2 target needs for zero copy besides its image.
#[derive(Debug)]
pub(super) struct ZeroCopy {
    id: u64,
    /// The zero source ([`crate::targets::zero_source`]) of zero pieces;
    /// without it they copy.
    zeroes: Option<OwnedFd>,
}

/// A request's ring work so far.
#[derive(Debug, Default)]
struct Work {
    /// Operations queued and not completed.
    left: u32,
    /// Bytes they moved.
    moved: u64,
    /// The first failure.
    err: Option<Errno>,
    /// Counted by [`Image::map_in_place`].
    in_place: bool,
    /// The data went to the scratch memfd, for [`Image::write`].
    staged: bool,
}

/// One thread's state for one target.
#[derive(Debug, Default)]
struct Local {
    /// Where copied pieces pass: slot `s` owns `[s * SLOT_ROOM, (s + 1) * SLOT_ROOM)`.
    scratch: Option<OwnedFd>,
    slots: Vec<Work>,
}

impl Local {
    fn scratch(&mut self) -> Result<BorrowedFd<'_>, Errno> {
        if self.scratch.is_none() {
            self.scratch = Some(rustix::fs::memfd_create(
                "userblk-qcow2-scratch",
                MemfdFlags::CLOEXEC,
            )?);
        }
        self.scratch.as_ref().map(AsFd::as_fd).ok_or(Errno::IO)
    }
}

thread_local! {
    static LOCAL: RefCell<HashMap<u64, Local>> = RefCell::new(HashMap::new());
}

fn u32_of(n: u64) -> Result<u32, Errno> {
    u32::try_from(n).map_err(|_| Errno::INVAL)
}

impl ZeroCopy {
    pub(super) fn new() -> Self {
        let zeroes = crate::targets::zero_source()
            .map_err(|e| tracing::debug!("qcow2: no zero source (memfd): {e}; zero pieces copy"))
            .ok();
        ZeroCopy {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            zeroes,
        }
    }

    /// Start a read or write whose data is not in memory (zero copy).
    pub(super) fn submit(&self, image: &Image, ctx: &mut Ctx<'_>) -> Submit {
        let slot = usize::from(ctx.slot());
        LOCAL.with_borrow_mut(|all| {
            let local = all.entry(self.id).or_default();
            if local.slots.len() <= slot {
                local.slots.resize_with(slot + 1, Work::default);
            }
            // The slot's last request is over (all its ring work reaped);
            // one answered early by a layer above may not have said so.
            if std::mem::take(&mut local.slots[slot]).in_place {
                image.in_place_done();
            }
            let queued = if ctx.req().op == Op::Read {
                self.read(image, ctx, local)
            } else {
                self.write(image, ctx, local)
            };
            let work = &mut local.slots[slot];
            if let Err(e) = queued {
                work.err.get_or_insert(e);
            }
            if work.left > 0 {
                return Submit::Pending;
            }
            // Nothing queued: it failed before any ring work.
            if std::mem::take(&mut work.in_place) {
                image.in_place_done();
            }
            Submit::Done(Err(work.err.take().unwrap_or(Errno::IO)))
        })
    }

    fn read(&self, image: &Image, ctx: &mut Ctx<'_>, local: &mut Local) -> Result<(), Errno> {
        let req = *ctx.req();
        let slot = usize::from(ctx.slot());
        let mut pieces = image.map_read(req.offset, u64::from(req.len))?;
        if pieces.len() > MAX_PIECES {
            // Small clusters scattered in the file: one copy beats many tiny operations.
            pieces = vec![Piece {
                at: 0,
                len: u64::from(req.len),
                source: Source::Backing,
            }];
        }
        for p in pieces {
            let (at, len) = (u32_of(p.at)?, u32_of(p.len)?);
            match (p.source, &self.zeroes) {
                (Source::Host(h), _) => {
                    ctx.read_at_part(image.file.as_fd(), h, at, len, STEP_PART)?;
                }
                (Source::Zeroes, Some(z)) => ctx.read_at_part(z.as_fd(), 0, at, len, STEP_PART)?,
                // Made in memory (compressed, backing; zeroes without a
                // zero source) the image's own way: it copies.
                _ => {
                    let off = self.stage_copy(image, req.offset, p, ctx.slot(), local)?;
                    ctx.read_at_part(local.scratch()?, off, at, len, STEP_PART)?;
                }
            }
            local.slots[slot].left += 1;
        }
        Ok(())
    }

    /// Read piece `p` of the read at guest `off` the image's own way into
    /// `slot`'s part of the scratch memfd; where it is there.
    fn stage_copy(
        &self,
        image: &Image,
        off: u64,
        p: Piece,
        slot: u16,
        local: &mut Local,
    ) -> Result<u64, Errno> {
        let mut data = vec![0u8; usize::try_from(p.len).map_err(|_| Errno::INVAL)?];
        image.read(off + p.at, &mut data)?;
        let at = scratch_offset(slot, p.at, p.len)?;
        write_all(local.scratch()?, &data, at)?;
        Ok(at)
    }

    fn write(&self, image: &Image, ctx: &mut Ctx<'_>, local: &mut Local) -> Result<(), Errno> {
        let req = *ctx.req();
        let slot = usize::from(ctx.slot());
        let none = ReadWriteFlags::empty();
        match image.map_in_place(req.offset, u64::from(req.len))? {
            Some(pieces) if pieces.len() > MAX_PIECES => {
                // Counted, but staged after all (see `read`).
                local.slots[slot].in_place = true;
                self.stage_write(ctx, local)?;
            }
            Some(pieces) => {
                local.slots[slot].in_place = true;
                for p in pieces {
                    let Source::Host(h) = p.source else {
                        return Err(Errno::IO);
                    };
                    let part = (u32_of(p.at)?, u32_of(p.len)?);
                    ctx.write_at_part(image.file.as_fd(), h, part, none, STEP_PART)?;
                    local.slots[slot].left += 1;
                }
            }
            None => self.stage_write(ctx, local)?,
        }
        Ok(())
    }

    /// Move a write's data into its slot's part of the scratch memfd, for
    /// [`Image::write`] once there.
    fn stage_write(&self, ctx: &mut Ctx<'_>, local: &mut Local) -> Result<(), Errno> {
        let len = ctx.req().len;
        let at = scratch_offset(ctx.slot(), 0, u64::from(len))?;
        let none = ReadWriteFlags::empty();
        ctx.write_at_part(local.scratch()?, at, (0, len), none, STEP_STAGE)?;
        let work = &mut local.slots[usize::from(ctx.slot())];
        work.staged = true;
        work.left += 1;
        Ok(())
    }

    /// One of the request's ring operations completed.
    pub(super) fn complete(&self, image: &Image, ctx: &mut Ctx<'_>, res: i32) -> Submit {
        let slot = usize::from(ctx.slot());
        LOCAL.with_borrow_mut(|all| {
            let Some(local) = all.get_mut(&self.id) else {
                return Submit::Done(Err(Errno::IO));
            };
            let Some(work) = local.slots.get_mut(slot) else {
                return Submit::Done(Err(Errno::IO));
            };
            work.left = work.left.saturating_sub(1);
            match ring_result(res) {
                Ok(n) => work.moved += u64::from(n),
                Err(e) => {
                    work.err.get_or_insert(e);
                }
            }
            if work.left > 0 {
                return Submit::Pending;
            }
            if std::mem::take(&mut work.in_place) {
                image.in_place_done();
            }
            let staged = std::mem::take(&mut work.staged);
            let result = match (work.err.take(), work.moved) {
                (Some(e), _) => Err(e),
                // Each operation moves all its bytes or the sum falls short.
                (None, moved) if moved != u64::from(ctx.req().len) => Err(Errno::IO),
                (None, _) => self.finish(image, ctx, staged, local),
            };
            Submit::Done(result)
        })
    }

    /// Every ring operation of the request succeeded: what is left to do.
    fn finish(
        &self,
        image: &Image,
        ctx: &Ctx<'_>,
        staged: bool,
        local: &mut Local,
    ) -> Result<u32, Errno> {
        let req = *ctx.req();
        if req.op != Op::Write {
            return Ok(ctx.done_bytes());
        }
        if staged {
            let mut data = vec![0u8; req.len as usize];
            let at = scratch_offset(ctx.slot(), 0, u64::from(req.len))?;
            read_exact(local.scratch()?, &mut data, at)?;
            image.write(req.offset, &data)?;
        }
        if req.flags.contains(Flags::FUA) {
            image.flush()?;
        }
        Ok(ctx.done_bytes())
    }
}

/// Where bytes `[at, at + len)` of `slot`'s request pass in the scratch memfd.
fn scratch_offset(slot: u16, at: u64, len: u64) -> Result<u64, Errno> {
    if at.saturating_add(len) > SLOT_ROOM {
        return Err(Errno::INVAL);
    }
    Ok(u64::from(slot) * SLOT_ROOM + at)
}
