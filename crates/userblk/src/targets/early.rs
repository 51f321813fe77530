//! `early`: a RAM disk that answers writes before storing them — a test
//! target for frontends, not for data.
//!
//! Each write is handed to a worker thread ([`Ctx::defer`]) that waits a
//! few hundred microseconds, then copies the request's buffer into a memfd;
//! the target answers the write at once, while that work is still out. The
//! slot state machine every frontend drives must then keep the buffer and
//! hold the answer back until the copy is done ([`crate::slots`]). A
//! frontend that handed the buffer back or acknowledged the write early
//! would store another request's data or let a read overtake the write,
//! and `fio --verify` on the device would see it.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::{self, Sender};
use std::sync::Mutex;
use std::time::Duration;

use rustix::io::Errno;
use serde_json::json;

use super::mem::sized_memfd;
use crate::io::fd::{read_exact, write_all};
use crate::io::Deferred;
use crate::target::{Caps, Ctx, Op, Submit, Target};
use crate::{Error, Result};

/// The step of the deferred store (its completion is never looked at: the
/// write was answered already).
const STEP_STORE: u16 = 1;

/// The early-answering test target.
#[derive(Debug)]
pub struct EarlyTarget {
    fd: std::sync::Arc<OwnedFd>,
    size: u64,
    work: Mutex<Sender<(Deferred, u64)>>,
}

impl EarlyTarget {
    /// A zero-filled device of `size` bytes.
    pub fn new(size: u64) -> Result<Self> {
        let fd = std::sync::Arc::new(sized_memfd("early", size)?);
        let (tx, rx) = mpsc::channel::<(Deferred, u64)>();
        let store = fd.clone();
        std::thread::Builder::new()
            .name("early-store".into())
            .spawn(move || {
                let mut seed = 0x9e37_79b9_u32;
                // Ends when the target (the only sender) is dropped.
                for (job, offset) in rx {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    std::thread::sleep(Duration::from_micros(u64::from(seed % 500)));
                    let res = match write_all(store.as_fd(), job.data(), offset) {
                        Ok(()) => i32::try_from(job.data().len()).unwrap_or(0),
                        Err(e) => -e.raw_os_error(),
                    };
                    job.complete(res);
                }
            })
            .map_err(|e| Error::io("early: starting its store thread", e))?;
        Ok(EarlyTarget {
            fd,
            size,
            work: Mutex::new(tx),
        })
    }
}

impl Target for EarlyTarget {
    fn caps(&self) -> Caps {
        Caps::new(self.size)
    }

    fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        let req = *ctx.req();
        match req.op {
            Op::Read => Submit::Done(
                read_exact(self.fd.as_fd(), ctx.data_mut(), req.offset).map(|()| ctx.done_bytes()),
            ),
            Op::Write => {
                let job = match ctx.defer(STEP_STORE) {
                    Ok(job) => job,
                    Err(e) => return Submit::Done(Err(e)),
                };
                let sent = match self.work.lock() {
                    Ok(tx) => tx.send((job, req.offset)).is_ok(),
                    Err(_) => false,
                };
                // A lost job completes itself with EIO when dropped; the
                // answer below is held back until it has.
                if !sent {
                    return Submit::Done(Err(Errno::IO));
                }
                Submit::Done(Ok(ctx.done_bytes()))
            }
            // Nothing is cached: stored data is in the memfd.
            Op::Flush => Submit::Done(Ok(0)),
            Op::Discard | Op::WriteZeroes => Submit::Done(Err(Errno::OPNOTSUPP)),
        }
    }

    fn describe(&self) -> serde_json::Value {
        json!({ "type": "early", "size": self.size })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::slots::{Event, Slots};
    use crate::target::Request;

    #[test]
    fn writes_are_answered_only_once_stored() {
        let t = EarlyTarget::new(1 << 20).unwrap();
        let mut slots = Slots::new(t.caps(), 8, 4096).unwrap();
        let mut out = Vec::new();
        for round in 0..4u8 {
            for slot in 0..8u16 {
                slots
                    .buf_mut(slot)
                    .fill(round * 8 + u8::try_from(slot).unwrap());
                let req = Request::new(Op::Write, u64::from(slot) * 4096, 4096);
                assert_eq!(slots.start(&t, slot, req), None, "held until stored");
            }
            slots.drain(&t, &mut out).unwrap();
            let done = out
                .drain(..)
                .filter(|e| {
                    matches!(
                        e,
                        Event::Done {
                            result: Ok(4096),
                            ..
                        }
                    )
                })
                .count();
            assert_eq!(done, 8);
            // Every answered write is in the store.
            for slot in 0..8u16 {
                let req = Request::new(Op::Read, u64::from(slot) * 4096, 4096);
                assert_eq!(slots.start(&t, slot, req), Some(Ok(4096)));
                let want = round * 8 + u8::try_from(slot).unwrap();
                assert!(slots.buf(slot).iter().all(|&b| b == want));
            }
        }
    }
}
