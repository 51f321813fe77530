//! Many requests in flight on one ring: a buffer and a state per slot.
//!
//! Frontends that receive requests themselves (the NBD server, the
//! one-request [`Engine`](crate::io::Engine)) start each request in a free
//! slot and collect results as the target finishes them, inline or through
//! the ring. The target path is the same as under ublk: [`validate`], then
//! [`Target::submit`], then [`Target::complete`] for each ring completion.
//! A slot's buffer belongs to the target from [`Slots::start`] until its
//! result comes back, and to the frontend otherwise.
#![allow(unsafe_code)]

use std::os::fd::BorrowedFd;

use rustix::io::Errno;

use crate::io::ring::UserData;
use crate::io::{AlignedBuf, Ctx, Ring};
use crate::target::{self, Caps, IoResult, Request, Submit, Target};

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

/// A fixed number of request slots on one ring.
pub struct Slots {
    // First, so it closes before the buffers its operations point into are freed.
    ring: Ring,
    bufs: Vec<AlignedBuf>,
    state: Vec<State>,
    in_use: usize,
    /// Slots in `State::Answered`.
    answered: Vec<u16>,
    /// Buffer size a slot returns to after an oversized request.
    base_bytes: usize,
    caps: Caps,
    cqes: Vec<(UserData, i32)>,
}

impl Slots {
    /// `n` slots (1 to 4096) with `buf_bytes`-byte buffers, for a target with `caps`.
    pub fn new(caps: Caps, n: u16, buf_bytes: usize) -> crate::Result<Self> {
        caps.check()?;
        let n = n.clamp(1, 4096);
        let bufs = (0..n)
            .map(|_| AlignedBuf::new(buf_bytes))
            .collect::<crate::Result<Vec<_>>>()?;
        Ok(Slots {
            // Room for a few operations per slot plus the frontend's own.
            ring: Ring::new(u32::from(n) * 2 + 8)?,
            base_bytes: bufs.first().map_or(buf_bytes, AlignedBuf::len),
            bufs,
            state: vec![State::Free; usize::from(n)],
            in_use: 0,
            answered: Vec::new(),
            caps,
            cqes: Vec::with_capacity(usize::from(n) * 2),
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
        let buf = &mut self.bufs[usize::from(slot)];
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
        let buf = &mut self.bufs[usize::from(slot)];
        if buf.len() > self.base_bytes {
            if let Ok(b) = AlignedBuf::new(self.base_bytes) {
                *buf = b;
            }
        }
    }

    /// `slot`'s buffer (empty while the target holds it).
    pub fn buf(&self, slot: u16) -> &[u8] {
        if self.is_free(slot) {
            self.bufs[usize::from(slot)].as_slice()
        } else {
            &[]
        }
    }

    /// `slot`'s buffer, to fill with a write's data (empty while the target holds it).
    pub fn buf_mut(&mut self, slot: u16) -> &mut [u8] {
        if self.is_free(slot) {
            self.bufs[usize::from(slot)].as_mut_slice()
        } else {
            &mut []
        }
    }

    /// Start `req` in the free `slot` (a write's data already in its buffer).
    /// Returns the result if it finished at once, or `None` if it is in
    /// flight: its [`Event::Done`] comes from [`Slots::wait`].
    pub fn start(&mut self, target: &dyn Target, slot: u16, req: Request) -> Option<IoResult> {
        if !self.is_free(slot) {
            return Some(Err(Errno::BUSY));
        }
        let i = usize::from(slot);
        if req.op.has_data() && req.len as usize > self.bufs[i].len() {
            return Some(Err(Errno::INVAL));
        }
        if let Err(e) = target::validate(&self.caps, &req) {
            return Some(Err(e));
        }
        // SAFETY: from here the slot is not Free until the target answered
        // and all its ring work is reaped; meanwhile `Slots` neither lends
        // nor frees the buffer (`buf`, `reserve`, `shrink` and `Drop` check).
        let mut ctx = unsafe { Ctx::new(req, slot, &mut self.bufs[i], &mut self.ring) };
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
        // SAFETY: as in `start`: the slot is busy, so its buffer is the target's.
        let mut ctx = unsafe { Ctx::new(req, slot, &mut self.bufs[i], &mut self.ring) };
        let outcome = target.complete(&mut ctx, step, res);
        if let Some(result) = self.settle(slot, req, outcome) {
            self.release(slot);
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
