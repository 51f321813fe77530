//! The one slot state machine every frontend drives: many requests in
//! flight on one ring, a buffer and a state per slot.
//!
//! The ublk queues, the NBD server, the FUSE threads and `userblk copy`
//! (the latter two through the one-request [`Engine`]) start each request
//! in a free slot and collect results as the target finishes them, inline
//! or through the ring. The target path is the same as under ublk: [`validate`], then
//! [`Target::submit`], then [`Target::complete`] for each ring completion.
//! A slot's buffer belongs to the target from [`Slots::start`] until its
//! result comes back, and to the frontend otherwise.
#![allow(unsafe_code)]

use std::os::fd::BorrowedFd;

use rustix::io::Errno;

use crate::io::ring::UserData;
use crate::io::{AlignedBuf, Ring};
use crate::target::{self, Caps, Ctx, IoResult, Request, Submit, Target};

mod engine;

pub use engine::Engine;

/// What the ring delivered to the frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The request in `slot` finished.
    Done {
        /// The slot, free again.
        slot: u16,
        /// Its request.
        req: Request,
        /// Its result.
        result: IoResult,
    },
    /// A frontend operation (such as [`Slots::poll_readable`]) completed.
    Frontend {
        /// The token it was queued with.
        token: u16,
        /// The ring's result.
        res: i32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    /// The target has the request.
    Busy(Request),
    /// The target answered while ring work of the request was still
    /// outstanding: the buffer stays lent until that work is reaped.
    Answered(Request, IoResult),
}

/// Where the slots' request data lives.
#[derive(Debug)]
pub enum SlotData {
    /// A buffer per slot, in slot order.
    Buffers(Vec<AlignedBuf>),
    /// Zero copy: slot `s`'s data is entry `s` of the ring's
    /// registered-buffer table, up to `len` bytes addressed from 0, which
    /// the frontend's kernel registers for each request (ublk's automatic
    /// buffer registration). Only targets whose
    /// [`data_on_ring_only`](Target::data_on_ring_only) is true may be given such slots.
    Registered {
        /// Largest request.
        len: u32,
    },
}

/// A fixed number of request slots on one ring.
pub struct Slots {
    // First, so it closes before the buffers its operations point into are freed.
    ring: Ring,
    bufs: Vec<AlignedBuf>,
    /// Under zero copy: the largest request of a registered-buffer entry.
    registered: Option<u32>,
    state: Vec<State>,
    in_use: usize,
    /// Slots in `State::Answered`.
    answered: Vec<u16>,
    /// Buffer size a slot returns to after an oversized request.
    base_bytes: usize,
    caps: Caps,
    cqes: Vec<(UserData, i32)>,
    /// Counts each request's op, bytes, result and latency (the device's metrics).
    meter: crate::metrics::Meter,
}

impl Slots {
    /// `n` slots (1 to 4096) with `buf_bytes`-byte buffers, for a target with `caps`.
    pub fn new(caps: Caps, n: u16, buf_bytes: usize) -> crate::Result<Self> {
        let n = n.clamp(1, 4096);
        let bufs = (0..n)
            .map(|_| AlignedBuf::new(buf_bytes))
            .collect::<crate::Result<Vec<_>>>()?;
        // Room for a few operations per slot plus the frontend's own.
        let ring = Ring::new(u32::from(n) * 2 + 8)?;
        Self::with_ring(ring, caps, n, SlotData::Buffers(bufs))
    }

    /// `n` slots on a ring the frontend set up itself (registered files,
    /// a buffer table), with their data in `data`: how the ublk queues,
    /// whose kernel decides where a request's data lives, make theirs.
    pub fn with_ring(ring: Ring, caps: Caps, n: u16, data: SlotData) -> crate::Result<Self> {
        caps.check()?;
        let (bufs, registered) = match data {
            SlotData::Buffers(bufs) if bufs.len() == usize::from(n) => (bufs, None),
            SlotData::Buffers(bufs) => {
                return Err(crate::Error::invalid(format!(
                    "{} buffers for {n} request slots",
                    bufs.len()
                )))
            }
            SlotData::Registered { len } => (Vec::new(), Some(len)),
        };
        Ok(Slots {
            ring,
            base_bytes: bufs.first().map_or(0, AlignedBuf::len),
            bufs,
            registered,
            state: vec![State::Free; usize::from(n)],
            in_use: 0,
            answered: Vec::new(),
            caps,
            cqes: Vec::with_capacity(usize::from(n) * 2),
            meter: crate::metrics::Meter::new(usize::from(n)),
        })
    }

    /// The capabilities requests are checked against.
    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.state.len()
    }

    /// Always false: there is at least one slot.
    pub fn is_empty(&self) -> bool {
        self.state.is_empty()
    }

    /// Slots whose request the target still holds.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    fn is_free(&self, slot: u16) -> bool {
        self.state.get(usize::from(slot)) == Some(&State::Free)
    }

    /// Make `slot`'s buffer hold at least `len` bytes (an oversized request).
    /// Fails with `EBUSY` while the target holds the slot.
    pub fn reserve(&mut self, slot: u16, len: usize) -> Result<(), Errno> {
        if !self.is_free(slot) {
            return Err(Errno::BUSY);
        }
        let Some(buf) = self.bufs.get_mut(usize::from(slot)) else {
            return Err(Errno::INVAL);
        };
        if buf.len() < len {
            *buf = AlignedBuf::new(len).map_err(|_| Errno::NOMEM)?;
        }
        Ok(())
    }

    /// Give back the memory of an oversized request's buffer.
    pub fn shrink(&mut self, slot: u16) {
        if !self.is_free(slot) {
            return;
        }
        let Some(buf) = self.bufs.get_mut(usize::from(slot)) else {
            return;
        };
        if buf.len() > self.base_bytes {
            if let Ok(b) = AlignedBuf::new(self.base_bytes) {
                *buf = b;
            }
        }
    }

    /// `slot`'s buffer (empty while the target holds it, and under zero copy).
    pub fn buf(&self, slot: u16) -> &[u8] {
        match self.bufs.get(usize::from(slot)) {
            Some(b) if self.is_free(slot) => b.as_slice(),
            _ => &[],
        }
    }

    /// `slot`'s buffer, to fill with a write's data (empty while the target
    /// holds it, and under zero copy).
    pub fn buf_mut(&mut self, slot: u16) -> &mut [u8] {
        let free = self.is_free(slot);
        match self.bufs.get_mut(usize::from(slot)) {
            Some(b) if free => b.as_mut_slice(),
            _ => &mut [],
        }
    }

    /// The first `n` bytes of `slot`'s buffer, to fill with a write's data
    /// (empty while the target holds it, and under zero copy). Cheaper than
    /// [`buf_mut`](Self::buf_mut) for short requests: only these bytes
    /// count as written when a later read is answered with zeroes.
    pub fn buf_prefix_mut(&mut self, slot: u16, n: usize) -> &mut [u8] {
        let free = self.is_free(slot);
        match self.bufs.get_mut(usize::from(slot)) {
            Some(b) if free => b.prefix_mut(n),
            _ => &mut [],
        }
    }

    /// Queue a frontend operation of its own (a ublk command); it completes
    /// as [`Event::Frontend`] with the slot number packed in its
    /// `user_data` as [`UserData::Frontend`].
    ///
    /// # Safety
    /// Every buffer and file the entry refers to must stay valid until its
    /// completion has been reaped; a slot's buffer only while the slot is
    /// free (the frontend's).
    pub unsafe fn push(&mut self, entry: &io_uring::squeue::Entry) -> Result<(), Errno> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.ring.push(entry) }
    }

    /// (Re)register `buf` as a provided buffer on the slots' ring, for the
    /// frontend's own multishot commands. The frontend keeps `buf` alive
    /// as long as these slots.
    pub fn provide(&mut self, buf: &mut crate::io::provided::ProvidedBuf) -> Result<(), Errno> {
        buf.reset(&mut self.ring)
    }

    /// Submit queued work without waiting.
    pub fn submit(&mut self) -> crate::Result<()> {
        self.ring.submit()
    }

    /// Operations on the ring (the frontend's and the target's) whose
    /// completion has not been reaped.
    pub fn in_flight(&self) -> usize {
        self.ring.in_flight()
    }

    /// Never free the buffers, even when dropped: for a frontend leaving
    /// with operations of its own (kernel commands) still pointing into them.
    pub fn leak_buffers(&mut self) {
        std::mem::forget(std::mem::take(&mut self.bufs));
    }

    /// The context through which the target sees `slot`'s request `req`.
    /// `None` only for a slot number out of range.
    fn ctx(&mut self, slot: u16, req: Request) -> Option<Ctx<'_>> {
        let i = usize::from(slot);
        if i >= self.state.len() {
            return None;
        }
        Some(match (self.registered, self.bufs.get_mut(i)) {
            // SAFETY: the slot is busy from `start` until the target
            // answered and all its ring work is reaped; meanwhile `Slots`
            // neither lends nor frees its data (`buf`, `reserve`, `shrink`
            // and `Drop` check), and the frontend's kernel keeps entry
            // `slot` registered until the slot's result is handed back.
            (Some(len), _) => unsafe { Ctx::new_fixed(req, slot, slot, 0, len, &mut self.ring) },
            // SAFETY: as above, for the slot's own buffer.
            (None, Some(buf)) => unsafe { Ctx::new(req, slot, buf, &mut self.ring) },
            // `with_ring` gives every slot a buffer or a registered entry.
            (None, None) => return None,
        })
    }

    /// Largest request `slot` can carry.
    fn room(&self, slot: u16) -> usize {
        match self.registered {
            Some(len) => len as usize,
            None => self.bufs.get(usize::from(slot)).map_or(0, AlignedBuf::len),
        }
    }

    /// Start `req` in the free `slot` (a write's data already in its buffer).
    /// Returns the result if it finished at once, or `None` if it is in
    /// flight: its [`Event::Done`] comes from [`Slots::wait`].
    pub fn start(&mut self, target: &dyn Target, slot: u16, req: Request) -> Option<IoResult> {
        let t = self.meter.clock();
        let r = self.start_uncounted(target, slot, req);
        match r {
            Some(result) => self.meter.finished(t, req, result, self.in_use),
            None => self.meter.began(slot, t, self.in_use),
        }
        r
    }

    fn start_uncounted(
        &mut self,
        target: &dyn Target,
        slot: u16,
        req: Request,
    ) -> Option<IoResult> {
        if !self.is_free(slot) {
            return Some(Err(Errno::BUSY));
        }
        let i = usize::from(slot);
        if req.op.has_data() && req.len as usize > self.room(slot) {
            return Some(Err(Errno::INVAL));
        }
        // A live resize changes the size (only): check against today's.
        self.caps.size = target.size();
        if let Err(e) = target::validate(&self.caps, &req) {
            return Some(Err(e));
        }
        // From here the slot is not Free until the target answered and all
        // its ring work is reaped.
        let Some(mut ctx) = self.ctx(slot, req) else {
            return Some(Err(Errno::INVAL));
        };
        let outcome = target.submit(&mut ctx);
        self.in_use += 1;
        self.state[i] = State::Busy(req);
        match self.settle(slot, req, outcome) {
            Some(r) => {
                self.release(slot);
                Some(r)
            }
            None => None,
        }
    }

    /// Record the target's answer; the result if the slot can be freed now.
    fn settle(&mut self, slot: u16, req: Request, outcome: Submit) -> Option<IoResult> {
        match outcome {
            Submit::Pending => None,
            Submit::Done(r) if self.ring.slot_ops(slot) == 0 => Some(r),
            Submit::Done(r) => {
                self.state[usize::from(slot)] = State::Answered(req, r);
                self.answered.push(slot);
                None
            }
        }
    }

    fn release(&mut self, slot: u16) {
        self.state[usize::from(slot)] = State::Free;
        self.in_use -= 1;
    }

    /// Queue a one-shot poll for `fd` becoming readable; it arrives as
    /// [`Event::Frontend`] with `token`.
    pub fn poll_readable(&mut self, fd: BorrowedFd<'_>, token: u16) -> Result<(), Errno> {
        self.ring.poll_readable(fd, token)
    }

    /// Submit queued work; if `block`, wait for at least one completion.
    /// Appends what arrived to `out`.
    pub fn wait(
        &mut self,
        target: &dyn Target,
        block: bool,
        out: &mut Vec<Event>,
    ) -> crate::Result<()> {
        if block {
            self.ring.submit_and_wait(1)?;
        } else {
            self.ring.submit()?;
        }
        self.meter.tick();
        let mut cqes = std::mem::take(&mut self.cqes);
        self.ring.reap(&mut cqes);
        for (ud, res) in cqes.drain(..) {
            match ud {
                UserData::Frontend { slot } => out.push(Event::Frontend { token: slot, res }),
                UserData::Target { slot, step } => self.on_target(target, slot, step, res, out),
            }
        }
        self.cqes = cqes;
        // Answers that were waiting for their leftover ring work.
        let mut k = 0;
        while k < self.answered.len() {
            let slot = self.answered[k];
            if self.ring.slot_ops(slot) > 0 {
                k += 1;
                continue;
            }
            self.answered.swap_remove(k);
            if let State::Answered(req, result) = self.state[usize::from(slot)] {
                self.release(slot);
                self.meter.done(slot, req, result, self.in_use);
                out.push(Event::Done { slot, req, result });
            }
        }
        Ok(())
    }

    fn on_target(
        &mut self,
        target: &dyn Target,
        slot: u16,
        step: u16,
        res: i32,
        out: &mut Vec<Event>,
    ) {
        let i = usize::from(slot);
        let req = match self.state.get(i) {
            Some(State::Busy(req)) => *req,
            // Leftover work of a request already answered: handled in `wait`.
            Some(State::Answered(..)) => return,
            _ => {
                tracing::warn!(slot, "ring completion for an idle slot");
                return;
            }
        };
        let Some(mut ctx) = self.ctx(slot, req) else {
            return;
        };
        let outcome = target.complete(&mut ctx, step, res);
        if let Some(result) = self.settle(slot, req, outcome) {
            self.release(slot);
            self.meter.done(slot, req, result, self.in_use);
            out.push(Event::Done { slot, req, result });
        }
    }

    /// Wait until the target has given back every slot (before dropping,
    /// or to order a flush after every earlier request).
    pub fn drain(&mut self, target: &dyn Target, out: &mut Vec<Event>) -> crate::Result<()> {
        while self.in_use > 0 {
            self.wait(target, true, out)?;
        }
        Ok(())
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        if self.in_use > 0 {
            // Work still points into the buffers (a frontend that gave up
            // on an error path): leak them rather than let it write freed memory.
            tracing::error!(
                in_use = self.in_use,
                "dropping request slots with work in flight; leaking their buffers"
            );
            std::mem::forget(std::mem::take(&mut self.bufs));
        }
    }
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots")
            .field("len", &self.state.len())
            .field("in_use", &self.in_use)
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};

    use super::*;
    use crate::target::Op;

    /// Answers every read at once, while a read from a pipe into the
    /// request's buffer is still outstanding.
    struct AnswersEarly {
        pipe: OwnedFd,
    }

    impl Target for AnswersEarly {
        fn caps(&self) -> Caps {
            Caps::new(1 << 20)
        }
        fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
            // A pipe has no offset: -1 reads at the current position.
            match ctx.read_at(self.pipe.as_fd(), u64::MAX, 1) {
                Ok(()) => Submit::Done(Ok(ctx.done_bytes())),
                Err(e) => Submit::Done(Err(e)),
            }
        }
    }

    #[test]
    fn an_early_answer_waits_for_the_requests_ring_work() {
        let (rx, tx) = rustix::pipe::pipe().unwrap();
        let target = AnswersEarly { pipe: rx };
        let mut slots = Slots::new(target.caps(), 2, 4096).unwrap();
        let req = Request::new(Op::Read, 0, 4096);
        assert_eq!(slots.start(&target, 0, req), None, "held, not answered");
        assert_eq!(slots.in_use(), 1);
        assert!(slots.buf(0).is_empty(), "the buffer is still lent");
        assert_eq!(slots.reserve(0, 8192), Err(Errno::BUSY));
        let mut out = Vec::new();
        for _ in 0..3 {
            slots.wait(&target, false, &mut out).unwrap();
        }
        assert!(
            out.is_empty(),
            "no result while the read is outstanding: {out:?}"
        );

        // Another slot is served meanwhile.
        rustix::io::write(&tx, &[7u8; 4096]).unwrap();
        while out.is_empty() {
            slots.wait(&target, true, &mut out).unwrap();
        }
        assert_eq!(
            out,
            [Event::Done {
                slot: 0,
                req,
                result: Ok(4096)
            }]
        );
        assert_eq!(slots.in_use(), 0);
        assert!(
            slots.buf(0).iter().all(|&b| b == 7),
            "the read landed first"
        );
    }

    #[test]
    fn registered_slots_have_no_memory_buffer() {
        let ring = Ring::new(8).unwrap();
        let caps = Caps::new(1 << 20);
        let mut slots =
            Slots::with_ring(ring, caps, 4, SlotData::Registered { len: 4096 }).unwrap();
        assert!(slots.buf(1).is_empty() && slots.buf_mut(1).is_empty());
        assert_eq!(slots.reserve(1, 8192), Err(Errno::INVAL));
        let ring = Ring::new(8).unwrap();
        let bufs = AlignedBuf::many(3, 4096).unwrap();
        assert!(Slots::with_ring(ring, caps, 4, SlotData::Buffers(bufs)).is_err());
    }
}
