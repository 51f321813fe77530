//! Drive requests to a target one at a time on a private ring.
//!
//! The ublk queue loop serves many tags at once; this engine is its
//! one-slot sibling for callers that have a request in hand and want its
//! result: tests of the Target trait, `userblk` tools, and simple
//! frontends. It goes through the same [`validate`](crate::target::validate)
//! and [`Ctx`] path, so a target behaves here exactly as under ublk.

#![allow(unsafe_code)]

use crate::io::ring::UserData;
use crate::io::{AlignedBuf, Ctx, Ring};
use crate::target::{self, Caps, IoResult, Op, Request, Submit, Target};

/// One slot, one ring, requests run to completion.
pub struct Engine {
    ring: Ring,
    buf: AlignedBuf,
    caps: Caps,
    cqes: Vec<(UserData, i32)>,
}

impl Engine {
    /// An engine for `target` that accepts reads and writes of up to `max_len` bytes.
    pub fn new(target: &dyn Target, max_len: usize) -> crate::Result<Self> {
        let caps = target.caps();
        caps.check()?;
        Ok(Engine {
            ring: Ring::new(8)?,
            buf: AlignedBuf::new(max_len)?,
            caps,
            cqes: Vec::with_capacity(8),
        })
    }

    /// The target's capabilities, as read when the engine was made.
    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    /// Run one request. `data` is the write's data, or receives the read's
    /// data; it must be `req.len` long for reads and writes.
    pub fn run(&mut self, target: &dyn Target, req: Request, data: &mut [u8]) -> IoResult {
        let n = req.len as usize;
        if req.op.has_data() && (data.len() != n || n > self.buf.len()) {
            return Err(rustix::io::Errno::INVAL);
        }
        if req.op == Op::Write {
            self.buf.as_mut_slice()[..n].copy_from_slice(data);
        }
        let result = self.run_in_place(target, req);
        if req.op == Op::Read {
            if let Ok(done) = result {
                let done = (done as usize).min(n);
                data[..done].copy_from_slice(&self.buf.as_slice()[..done]);
            }
        }
        result
    }

    /// Run one request whose data is the engine's own buffer: a write's data
    /// must already be in [`buf_mut`](Self::buf_mut), a read's lands in
    /// [`buf`](Self::buf). Saves a copy for frontends that can fill or
    /// send from the buffer directly.
    pub fn run_in_place(&mut self, target: &dyn Target, req: Request) -> IoResult {
        if req.op.has_data() && req.len as usize > self.buf.len() {
            return Err(rustix::io::Errno::INVAL);
        }
        target::validate(&self.caps, &req)?;
        // Completions left over from an earlier request are not this one's.
        self.cqes.clear();
        // SAFETY: the buffer is ours and is not touched until `drive` has
        // reaped every completion of this request.
        let mut ctx = unsafe { Ctx::new(req, 0, &mut self.buf, &mut self.ring) };
        let first = target.submit(&mut ctx);
        self.drive(target, req, first)
    }

    /// The data buffer (a read's result after [`run_in_place`](Self::run_in_place)).
    pub fn buf(&self) -> &[u8] {
        self.buf.as_slice()
    }

    /// The data buffer, to fill with a write's data before [`run_in_place`](Self::run_in_place).
    pub fn buf_mut(&mut self) -> &mut [u8] {
        self.buf.as_mut_slice()
    }

    fn drive(&mut self, target: &dyn Target, req: Request, mut state: Submit) -> IoResult {
        loop {
            if let Submit::Done(r) = state {
                // A target that finished while work was still queued would
                // let the kernel write into a buffer we are about to reuse.
                while self.ring.in_flight() > 0 {
                    self.wait()?;
                }
                self.cqes.clear();
                return r;
            }
            self.wait()?;
            for (ud, res) in std::mem::take(&mut self.cqes) {
                if matches!(state, Submit::Done(_)) {
                    // The target already answered; later completions of its
                    // work are drained above and not delivered again.
                    continue;
                }
                match ud {
                    UserData::Target { slot: 0, step } => {
                        // SAFETY: as in `run`: the buffer stays ours until everything is reaped.
                        let mut ctx = unsafe { Ctx::new(req, 0, &mut self.buf, &mut self.ring) };
                        state = target.complete(&mut ctx, step, res);
                    }
                    other => tracing::warn!(?other, res, "engine: stray completion"),
                }
            }
        }
    }

    fn wait(&mut self) -> Result<(), rustix::io::Errno> {
        if let Err(e) = self.ring.submit_and_wait(1) {
            tracing::error!("engine: {e}");
            return Err(rustix::io::Errno::IO);
        }
        self.ring.reap(&mut self.cqes);
        Ok(())
    }
}
