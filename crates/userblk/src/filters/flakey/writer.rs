//! The writer thread of `flakey`: everything that goes down to the target
//! beneath goes through it, in the order asked, on a private ring.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rustix::io::Errno;

use super::{Shared, State, CHUNK};
use crate::io::Deferred;
use crate::slots::Engine;
use crate::target::{Caps, Flags, Op, Request, Target, MAX_RANGE_OP_BYTES};

/// How long `writeback` waits for the writer.
const WRITEBACK_TIMEOUT: Duration = Duration::from_secs(120);

/// Who waits for a writer job.
pub(super) enum Waiter {
    /// A request, completed through the ring.
    Request(Deferred),
    /// A control action.
    Reply(mpsc::Sender<Result<(), Errno>>),
}

/// What the writer is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Work {
    /// Write everything held down, then flush the target.
    Flush,
    /// Make `[start, end)` durable (a FUA write), and/or bring the overlay
    /// back under its bound.
    Write {
        durable: Option<(u64, u64)>,
        evict: bool,
    },
}

/// Work for the writer, the power epoch it was asked in, and who waits.
pub(super) struct Job {
    pub(super) waiter: Waiter,
    pub(super) epoch: u64,
    pub(super) work: Work,
}

/// Ask the writer to write everything down and wait for it.
pub(super) fn write_back(shared: &Shared, tx: &mpsc::Sender<Job>) -> Result<(), Errno> {
    let epoch = {
        let st = shared.lock();
        if !st.powered {
            return Err(Errno::IO);
        }
        st.epoch
    };
    let (reply, answer) = mpsc::channel();
    let job = Job {
        waiter: Waiter::Reply(reply),
        epoch,
        work: Work::Flush,
    };
    tx.send(job).map_err(|_| Errno::IO)?;
    answer
        .recv_timeout(WRITEBACK_TIMEOUT)
        .unwrap_or(Err(Errno::TIMEDOUT))
}

/// The state, if the power has stayed on since `epoch`.
fn live(shared: &Shared, epoch: u64) -> Result<MutexGuard<'_, State>, Errno> {
    let st = shared.lock();
    if !st.powered || st.epoch != epoch {
        return Err(Errno::IO);
    }
    Ok(st)
}

/// The writer thread's side: a private engine on the target beneath.
pub(super) struct Writer {
    shared: Arc<Shared>,
    inner: Arc<dyn Target>,
    engine: Engine,
    caps: Caps,
    max_data: u32,
    max_zero: u32,
}

impl Writer {
    pub(super) fn new(shared: Arc<Shared>, inner: Arc<dyn Target>) -> crate::Result<Self> {
        let caps = inner.caps();
        let lbs = caps.logical_block_size;
        let max_data = caps.max_request.unwrap_or(CHUNK).min(CHUNK) / lbs * lbs;
        let range_max = [caps.discard, caps.write_zeroes]
            .iter()
            .flatten()
            .map(|r| r.max_bytes)
            .fold(MAX_RANGE_OP_BYTES, u64::min);
        let max_zero = u32::try_from(range_max).unwrap_or(u32::MAX) / lbs * lbs;
        let engine = Engine::new(&*inner, max_data as usize)?;
        Ok(Writer {
            shared,
            inner,
            engine,
            caps,
            max_data,
            max_zero,
        })
    }

    pub(super) fn run(&mut self, job: Job) {
        let result = match job.work {
            Work::Flush => self.flush(job.epoch),
            Work::Write { durable, evict } => self.write(job.epoch, durable, evict),
        };
        match job.waiter {
            Waiter::Request(d) => d.complete(match result {
                Ok(()) => 0,
                Err(e) => -e.raw_os_error(),
            }),
            Waiter::Reply(tx) => {
                let _ = tx.send(result);
            }
        }
    }

    fn flush(&mut self, epoch: u64) -> Result<(), Errno> {
        let ranges = live(&self.shared, epoch)?.overlay.ranges();
        for (start, end) in ranges {
            self.write_range(epoch, start, end, Flags::NONE)?;
        }
        self.flush_target(epoch)
    }

    fn write(&mut self, epoch: u64, durable: Option<(u64, u64)>, evict: bool) -> Result<(), Errno> {
        if let Some((start, end)) = durable {
            let fua = self.caps.volatile_cache && self.caps.fua;
            let flags = if fua { Flags::FUA } else { Flags::NONE };
            self.write_range(epoch, start, end, flags)?;
            if !fua {
                self.flush_target(epoch)?;
            }
        }
        if evict {
            loop {
                let oldest = {
                    let st = live(&self.shared, epoch)?;
                    if st.overlay.data_bytes() <= self.shared.max_dirty {
                        break;
                    }
                    st.overlay.oldest()
                };
                let Some((start, end)) = oldest else { break };
                self.write_range(epoch, start, end, Flags::NONE)?;
            }
        }
        Ok(())
    }

    /// Send `req` to the target, unless the power went meanwhile.
    fn send(&mut self, req: Request) -> Result<u32, Errno> {
        let _io = self
            .shared
            .io
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.shared.off.load(Ordering::SeqCst) {
            return Err(Errno::IO);
        }
        self.engine.run_in_place(&*self.inner, req)
    }

    /// Write down what the overlay holds in `[start, end)`.
    fn write_range(&mut self, epoch: u64, start: u64, end: u64, flags: Flags) -> Result<(), Errno> {
        let mut at = start;
        while at < end {
            let batch = {
                let st = live(&self.shared, epoch)?;
                let buf = &mut self.engine.buf_mut()[..self.max_data as usize];
                st.overlay.batch(at, end, self.max_data, self.max_zero, buf)
            };
            let Some(b) = batch else { break };
            let req = if b.req.op == Op::Write {
                b.req.with_flags(flags)
            } else {
                b.req
            };
            self.send(req)?;
            let c = &self.shared.counters;
            c.written_down.fetch_add(1, Ordering::Relaxed);
            if req.op == Op::Write {
                c.written_down_bytes
                    .fetch_add(u64::from(req.len), Ordering::Relaxed);
            }
            at = req.offset + u64::from(req.len);
            let mut st = live(&self.shared, epoch)?;
            st.overlay.written(&b.from);
            st.last_removal = Instant::now();
        }
        Ok(())
    }

    fn flush_target(&mut self, epoch: u64) -> Result<(), Errno> {
        drop(live(&self.shared, epoch)?);
        if self.caps.volatile_cache {
            self.send(Request::new(Op::Flush, 0, 0))?;
        }
        Ok(())
    }
}
