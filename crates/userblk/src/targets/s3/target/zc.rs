//! The s3 target under ublk zero copy: a request's data stays in the
//! kernel's pages and moves with one ring operation between them and the
//! cache's data file, where the device's bytes sit at their own offsets
//! (`READ_FIXED`/`WRITE_FIXED`, as the file target does: the kernel
//! copies between the page cache and the request's pages, the daemon
//! touches nothing).
//!
//! A read or write whose chunks are ready (cached; for a write, cached or
//! wholly replaced) is pinned as on the copying path and queued on the
//! ring at once: the cached common case. Anything else first goes to a
//! request worker *without* its data ([`Job::Prepare`]): the worker
//! fetches the chunks the request needs into the cache (all it reads;
//! those a write covers only in part, so its read-modify-write happens in
//! the cache file, the request's bytes landing on the fetched ones) and
//! waits for room under the dirty limit. Back on the ring's thread the
//! request is tried again, up to [`MISS_TRIES`] times (eviction may take a
//! fetched chunk back first). So request data never passes through the
//! daemon's memory, cached or not. A FUA write is uploaded by a worker
//! ([`Job::Fua`]) once its bytes are in the cache.
//!
//! # Why eviction cannot pull a chunk from under a fixed-buffer I/O
//!
//! - Pins are taken under the state lock, only on chunks that are
//!   resident and not busy (no fetch or eviction under way), and released
//!   only when the ring operation's completion comes back (or, should a
//!   layer above answer the request early, when the slot's next request
//!   starts: by then the frontend has reaped all of the old one's ring work).
//! - `evict` picks and takes a chunk under the same lock, never one with
//!   pins, and marks it busy and not resident before punching its bytes
//!   out, so a chunk being punched cannot be pinned either. A fetch needs
//!   a chunk that is not resident, which a pinned chunk stays; a shrink
//!   waits for pins to leave (`resize.rs`). So the bytes under a
//!   `READ_FIXED`/`WRITE_FIXED` are neither punched nor overwritten by a
//!   fetch while it runs.
//! - A write pins as a writer: before its ring operation is queued the
//!   chunk is dirty on record (state byte, new generation), as on the
//!   copying path, so it cannot be evicted until uploaded, and an upload
//!   waits for writers to leave: the upload that makes it clean read bytes
//!   that hold this write. A flush covers a write once the write was
//!   acknowledged, after its completion, so the generation the flush waits
//!   for includes it. The dirty, upload and flush rules are those of the
//!   copying path, unchanged.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::io::{Errno, ReadWriteFlags};

use super::{kept_leaving, lock, past_end, Core, S3Target, MISS_TRIES};
use crate::io::Deferred;
use crate::target::{ring_result, Ctx, Flags, Op, Request, Submit};

/// What a request worker does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Serve it whole, its data in memory: the copying path, and flushes,
    /// discards and write-zeroes that cannot be done inline.
    Serve,
    /// Fetch the chunks it needs and wait for room under the dirty limit;
    /// its data stays in the kernel's pages.
    Prepare,
    /// Upload what a zero-copy FUA write wrote.
    Fua,
}

/// A request a worker served whole ([`Job::Serve`]).
pub(super) const STEP_SERVED: u16 = 0;
/// The read or write between the cache file and the request's pages.
const STEP_MOVE: u16 = 1;
/// The upload a FUA write waits for.
const STEP_FUA: u16 = 2;
/// A worker prepared the request: `STEP_PREPARED + n` after try `n`.
const STEP_PREPARED: u16 = 16;

/// Tells targets apart in [`PINNED`] (an address could be reused).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A new target's id for [`PINNED`].
pub(super) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

thread_local! {
    /// Per target id and slot: the request whose chunks the slot's ring
    /// operation holds pinned. A slot's request starts and completes on
    /// one thread, the one that owns its ring.
    static PINNED: RefCell<HashMap<u64, Vec<Option<Request>>>> = RefCell::new(HashMap::new());
}

/// Record that target `id`'s `slot` holds the pins of `req` (or none);
/// what it held before.
fn swap_pinned(id: u64, slot: u16, req: Option<Request>) -> Option<Request> {
    PINNED.with_borrow_mut(|all| {
        let slots = all.entry(id).or_default();
        let i = usize::from(slot);
        match slots.get_mut(i) {
            Some(held) => std::mem::replace(held, req),
            // Never recorded: nothing held, and nothing to grow for a clear.
            None if req.is_none() => None,
            None => {
                slots.resize(i + 1, None);
                slots[i] = req;
                None
            }
        }
    })
}

impl S3Target {
    /// A request starts in `slot` under zero copy: let go of the pins of
    /// the slot's last request, if a layer above answered it before its
    /// ring operation came back here (the frontend has reaped it by now).
    pub(super) fn zc_new_request(&self, slot: u16) {
        if let Some(old) = swap_pinned(self.zc_id, slot, None) {
            self.core.unpin(&mut lock(&self.core.state), &old);
        }
    }

    /// Start a read or write whose data is not in memory; workers
    /// prepared it `tries` times so far.
    pub(super) fn zc_submit(&self, ctx: &mut Ctx<'_>, tries: u16) -> Submit {
        let req = *ctx.req();
        let core = &self.core;
        // Once prepared, the worker waited for room: past the dirty limit
        // it goes ahead, as `serve` does.
        match core.begin(&req, tries > 0) {
            Some(Ok(())) => {}
            Some(Err(e)) => return Submit::Done(Err(e)),
            None if tries < MISS_TRIES => {
                return self.send(ctx, Job::Prepare, STEP_PREPARED + tries);
            }
            None => return Submit::Done(Err(kept_leaving(&req))),
        }
        let fd = core.cache.data_fd();
        let queued = if req.op == Op::Read {
            ctx.read_at(fd, req.offset, STEP_MOVE)
        } else {
            ctx.write_at(fd, req.offset, ReadWriteFlags::empty(), STEP_MOVE)
        };
        match queued {
            Ok(()) => {
                swap_pinned(self.zc_id, ctx.slot(), Some(req));
                Submit::Pending
            }
            Err(e) => {
                core.unpin(&mut lock(&core.state), &req);
                Submit::Done(Err(e))
            }
        }
    }

    /// A zero-copy request's ring operation or worker job completed.
    pub(super) fn zc_complete(&self, ctx: &mut Ctx<'_>, step: u16, res: i32) -> Submit {
        let req = *ctx.req();
        match step {
            STEP_MOVE => {
                if let Some(pinned) = swap_pinned(self.zc_id, ctx.slot(), None) {
                    self.core.unpin(&mut lock(&self.core.state), &pinned);
                }
                match ring_result(res) {
                    Err(e) => Submit::Done(Err(e)),
                    // The data file is as long as the device: all or nothing.
                    Ok(n) if n != ctx.done_bytes() => Submit::Done(Err(Errno::IO)),
                    Ok(_) if req.op == Op::Write && req.flags.contains(Flags::FUA) => {
                        self.send(ctx, Job::Fua, STEP_FUA)
                    }
                    Ok(_) => Submit::Done(Ok(ctx.done_bytes())),
                }
            }
            STEP_FUA => Submit::Done(ring_result(res).map(|_| ctx.done_bytes())),
            s if (STEP_PREPARED..STEP_PREPARED + MISS_TRIES).contains(&s) => {
                match ring_result(res) {
                    Ok(_) => self.zc_submit(ctx, s - STEP_PREPARED + 1),
                    Err(e) => Submit::Done(Err(e)),
                }
            }
            _ => {
                tracing::error!("s3: a completion of unknown step {step}");
                Submit::Done(Err(Errno::IO))
            }
        }
    }
}

impl Core {
    /// A request worker's part of `job` for `req`, whose data (if in
    /// memory) `d` lends.
    pub(super) fn work(&self, job: Job, req: Request, d: &mut Deferred) -> Result<u32, Errno> {
        match job {
            Job::Serve => self.serve(req, d.data_mut()),
            Job::Prepare => self.prepare(&req).map(|()| 0),
            Job::Fua => self
                .flush(Some(self.span(req.offset, u64::from(req.len))))
                .map(|()| 0),
        }
    }

    /// Get `req`'s chunks ready for it: fetched where it reads them or
    /// writes them in part, and room under the dirty limit for a write.
    fn prepare(&self, req: &Request) -> Result<(), Errno> {
        if !self.within(req.offset, u64::from(req.len)) {
            return Err(past_end(req));
        }
        self.before_miss(req);
        self.fetch_for(req)
    }
}
