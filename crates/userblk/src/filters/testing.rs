//! Test helpers for filters: a probe target that records what reaches it,
//! and one-call request runners on an [`Engine`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::io::Errno;

use super::{FilterError, Spec};
use crate::slots::Engine;
use crate::target::{Caps, Ctx, Extent, IoResult, Op, Request, Submit, Target};

/// The step the ring-native probe finishes its requests on.
const PROBE_STEP: u16 = 7;

/// Requests a [`Probe`] received, shared with the test.
#[derive(Clone, Default)]
pub struct Seen(Arc<Mutex<Vec<Request>>>);

impl Seen {
    /// Everything seen so far, emptying the list.
    pub fn take(&self) -> Vec<Request> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// A RAM disk that records every request it serves. The ring-native kind
/// finishes each request only when a timer of its own (step 7) comes back,
/// so filters above must pass its completions down, showing it the same
/// request as on submit (checked).
pub struct Probe {
    data: Mutex<Vec<u8>>,
    seen: Seen,
    ring_native: bool,
    /// The request each slot submitted, until it completes (ring-native).
    pending: Mutex<std::collections::HashMap<u16, Request>>,
}

/// A probe of `size` bytes that answers inline, and what it sees.
pub fn probe(size: usize) -> (Arc<dyn Target>, Seen) {
    new_probe(size, false)
}

/// A probe of `size` bytes that answers through the ring, and what it sees.
pub fn ring_probe(size: usize) -> (Arc<dyn Target>, Seen) {
    new_probe(size, true)
}

fn new_probe(size: usize, ring_native: bool) -> (Arc<dyn Target>, Seen) {
    let seen = Seen::default();
    let p = Probe {
        data: Mutex::new(vec![0; size]),
        seen: seen.clone(),
        ring_native,
        pending: Mutex::default(),
    };
    (Arc::new(p), seen)
}

impl Probe {
    fn serve(&self, ctx: &mut Ctx<'_>) -> IoResult {
        let req = *ctx.req();
        let mut data = self.data.lock().unwrap();
        let at = usize::try_from(req.offset).unwrap();
        let n = req.len as usize;
        match req.op {
            Op::Read => ctx.data_mut().copy_from_slice(&data[at..at + n]),
            Op::Write => data[at..at + n].copy_from_slice(ctx.data()),
            Op::Discard | Op::WriteZeroes => data[at..at + n].fill(0),
            Op::Flush => {}
        }
        Ok(ctx.done_bytes())
    }
}

impl Target for Probe {
    fn caps(&self) -> Caps {
        // A RAM disk's, plus a volatile write cache.
        Caps {
            volatile_cache: true,
            ..crate::targets::mem::ram_caps(self.data.lock().unwrap().len() as u64)
        }
    }

    fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        self.seen.0.lock().unwrap().push(*ctx.req());
        if self.ring_native {
            self.pending.lock().unwrap().insert(ctx.slot(), *ctx.req());
            return match ctx.timeout(Duration::ZERO, PROBE_STEP) {
                Ok(()) => Submit::Pending,
                Err(e) => Submit::Done(Err(e)),
            };
        }
        Submit::Done(self.serve(ctx))
    }

    fn complete(&self, ctx: &mut Ctx<'_>, step: u16, res: i32) -> Submit {
        assert_eq!(step, PROBE_STEP, "a completion that is not the probe's");
        assert_eq!(res, -Errno::TIME.raw_os_error());
        let first = self.pending.lock().unwrap().remove(&ctx.slot());
        assert_eq!(first, Some(*ctx.req()), "complete saw another request");
        Submit::Done(self.serve(ctx))
    }

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), Errno> {
        // Holes where the data is all zero, per 4 KiB block.
        let data = self.data.lock().unwrap();
        let mut pos = offset;
        while pos < offset + len {
            let end = (pos / 4096 + 1) * 4096;
            let end = end.min(offset + len);
            let range = usize::try_from(pos).unwrap()..usize::try_from(end).unwrap();
            let e = if data[range].iter().all(|&b| b == 0) {
                Extent::hole(end - pos)
            } else {
                Extent::data(end - pos)
            };
            match out.last_mut() {
                Some(last) if last.hole == e.hole => last.len += e.len,
                _ => out.push(e),
            }
            pos = end;
        }
        Ok(())
    }
}

/// `n` milliseconds.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Run `req` `n` times in turn on `e` (each must succeed); how long they took.
pub fn timed(e: &mut Engine, t: &dyn Target, req: Request, n: usize) -> Duration {
    let start = std::time::Instant::now();
    for _ in 0..n {
        assert!(run_on(e, t, req).0.is_ok(), "a request failed");
    }
    start.elapsed()
}

/// Check that `parse` refuses each `(spec, why)` of `cases` with an error
/// saying `why`.
pub fn assert_refused<T>(parse: impl Fn(&Spec) -> Result<T, FilterError>, cases: &[(&str, &str)]) {
    for (bad, why) in cases {
        match parse(&bad.parse().unwrap()) {
            Err(e) => assert!(e.to_string().contains(why), "{bad}: {e}"),
            Ok(_) => panic!("{bad} was accepted"),
        }
    }
}

/// A recognisable byte pattern for `len` bytes.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add(u8::try_from(i % 251).unwrap()))
        .collect()
}

/// Run one request on a fresh engine; a write carries `pattern(1, len)`.
/// Returns the result and, for a read, the data.
pub fn run(t: &dyn Target, op: Op, offset: u64, len: u32) -> (IoResult, Vec<u8>) {
    let mut e = Engine::new(t, 1 << 20).unwrap();
    run_on(&mut e, t, Request::new(op, offset, len))
}

/// Run one request on `e`; a write carries `pattern(1, len)`.
pub fn run_on(e: &mut Engine, t: &dyn Target, req: Request) -> (IoResult, Vec<u8>) {
    let mut data = if req.op == Op::Write {
        pattern(1, req.len as usize)
    } else if req.op == Op::Read {
        vec![0xEE; req.len as usize]
    } else {
        Vec::new()
    };
    let r = e.run(t, req, &mut data);
    (r, data)
}
