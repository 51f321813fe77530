//! Drive requests to a target one at a time on a private ring.
//!
//! The ublk queue loop serves many tags at once; this engine is its
//! one-slot sibling for callers that have a request in hand and want its
//! result: tests of the Target trait, `userblk` tools, and simple
//! frontends. It goes through the same [`Slots`] path (validate, submit,
//! complete) as the NBD server, so a target behaves here exactly as there.

use crate::slots::{Event, Slots};
use crate::target::{Caps, IoResult, Op, Request, Target};

/// One slot, one ring, requests run to completion.
pub struct Engine {
    slots: Slots,
    events: Vec<Event>,
}

impl Engine {
    /// An engine for `target` that accepts reads and writes of up to `max_len` bytes.
    pub fn new(target: &dyn Target, max_len: usize) -> crate::Result<Self> {
        Ok(Engine {
            slots: Slots::new(target.caps(), 1, max_len)?,
            events: Vec::with_capacity(4),
        })
    }

    /// The target's capabilities, as read when the engine was made.
    pub fn caps(&self) -> &Caps {
        self.slots.caps()
    }

    /// Run one request. `data` is the write's data, or receives the read's
    /// data; it must be `req.len` long for reads and writes.
    pub fn run(&mut self, target: &dyn Target, req: Request, data: &mut [u8]) -> IoResult {
        let n = req.len as usize;
        if req.op.has_data() && (data.len() != n || n > self.slots.buf(0).len()) {
            return Err(rustix::io::Errno::INVAL);
        }
        if req.op == Op::Write {
            self.slots.buf_mut(0)[..n].copy_from_slice(data);
        }
        let result = self.run_in_place(target, req);
        if req.op == Op::Read {
            if let Ok(done) = result {
                let done = (done as usize).min(n);
                data[..done].copy_from_slice(&self.slots.buf(0)[..done]);
            }
        }
        result
    }

    /// Run one request whose data is the engine's own buffer: a write's data
    /// must already be in [`buf_mut`](Self::buf_mut), a read's lands in
    /// [`buf`](Self::buf). Saves a copy for frontends that can fill or
    /// send from the buffer directly.
    pub fn run_in_place(&mut self, target: &dyn Target, req: Request) -> IoResult {
        if let Some(r) = self.slots.start(target, 0, req) {
            return r;
        }
        loop {
            self.events.clear();
            if let Err(e) = self.slots.wait(target, true, &mut self.events) {
                tracing::error!("engine: {e}");
                // The request may still hold the buffer: wait it out.
                let _ = self.slots.drain(target, &mut self.events);
                return Err(rustix::io::Errno::IO);
            }
            for ev in self.events.drain(..) {
                match ev {
                    Event::Done { result, .. } => return result,
                    Event::Frontend { token, res } => {
                        tracing::warn!(token, res, "engine: stray completion");
                    }
                }
            }
        }
    }

    /// The data buffer (a read's result after [`run_in_place`](Self::run_in_place)).
    pub fn buf(&self) -> &[u8] {
        self.slots.buf(0)
    }

    /// The data buffer, to fill with a write's data before [`run_in_place`](Self::run_in_place).
    pub fn buf_mut(&mut self) -> &mut [u8] {
        self.slots.buf_mut(0)
    }
}
