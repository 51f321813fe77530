//! Copy one target onto another, skipping holes: the engine of `userblk copy`.
//!
//! - [`Copier`]: what to copy and how (threads, resume point, checkpoints); [`Copier::run`] does it.
//! - [`Progress`]: counters another thread can watch, and the flag that stops a copy.
//! - [`Summary`], [`CopyError`]: how it ended.
//!
//! The source is walked in order with [`Target::extents`]: ranges known to
//! read as zeroes are never read, and data blocks that turn out to be all
//! zeroes are not written. On a destination that was just created (and so
//! reads as zeroes everywhere) both are simply skipped; on any other
//! destination they are made zero there too (write-zeroes where the
//! destination offers it, zero buffers otherwise), except where the
//! destination's own extents say it already reads as zeroes.
//!
//! Several workers (threads, each with one [`Engine`] per side, so any
//! target works, including those that defer to threads or use io_uring)
//! take ranges from one shared cursor. The cursor knows up to where
//! everything handed out is done; every `checkpoint_every` bytes a worker
//! flushes the destination and reports that offset, so a caller can record
//! where an interrupted copy may resume.
//!
//! ```
//! use std::sync::Arc;
//! use userblk::copy::{Copier, Progress};
//! use userblk::targets::{MemTarget, NullTarget};
//! use userblk::Target;
//!
//! let src: Arc<dyn Target> = Arc::new(NullTarget::new(1 << 20));
//! let dst: Arc<dyn Target> = Arc::new(MemTarget::new(1 << 20).unwrap());
//! let summary = Copier::new(src, dst).unwrap().fresh_destination(true).run(&Progress::new()).unwrap();
//! assert_eq!((summary.bytes_data, summary.bytes_skipped), (0, 1 << 20));
//! ```
//!
//! [`Engine`]: crate::slots::Engine

mod cursor;
mod worker;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use rustix::io::Errno;

use crate::slots::Engine;
use crate::target::{Op, Request, Target};
use cursor::Cursor;

/// Largest read or write a copy issues, unless a target asks for less.
pub const DEFAULT_REQUEST_BYTES: u32 = 1 << 20;

/// Default interval between checkpoints (a destination flush each).
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 256 << 20;

/// Where an interrupted copy may resume: called with an offset below which
/// everything is copied and flushed to the destination.
pub type CheckpointFn<'a> = dyn Fn(u64) -> std::io::Result<()> + Send + Sync + 'a;

/// Why a copy did not happen or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The destination refuses writes.
    #[error("the destination is read-only")]
    ReadOnly,
    /// The destination cannot hold the source.
    #[error("the destination ({dst} bytes) is smaller than the source ({src} bytes)")]
    TooSmall {
        /// The source's size in bytes.
        src: u64,
        /// The destination's size in bytes.
        dst: u64,
    },
    /// The source does not end on a whole block of the destination.
    #[error("the source's size {size} is not a multiple of the destination's block size {block}")]
    Unaligned {
        /// The source's size in bytes.
        size: u64,
        /// The larger logical block size of the two.
        block: u64,
    },
    /// A resume offset outside the source or off its block boundaries.
    #[error("cannot resume at offset {offset}: the source is {size} bytes in blocks of {block}")]
    BadStart {
        /// The offset asked for.
        offset: u64,
        /// The source's size.
        size: u64,
        /// The block size offsets must be multiples of.
        block: u64,
    },
    /// A worker could not be set up (its rings or buffers).
    #[error("setting up the copy: {0}")]
    Setup(#[source] crate::Error),
    /// Reading the source failed.
    #[error("reading the source at offset {offset} ({len} bytes): {errno}")]
    Read {
        /// Where the read started.
        offset: u64,
        /// Its length.
        len: u32,
        /// What the target said.
        errno: Errno,
    },
    /// The source could not say which of its ranges are holes.
    #[error("block status of the source at offset {offset}: {errno}")]
    Extents {
        /// Where the query started.
        offset: u64,
        /// What the target said.
        errno: Errno,
    },
    /// Writing the destination failed.
    #[error("writing the destination at offset {offset} ({len} bytes): {errno}")]
    Write {
        /// Where the write started.
        offset: u64,
        /// Its length.
        len: u32,
        /// What the target said.
        errno: Errno,
    },
    /// Making a range of the destination read as zeroes failed.
    #[error("zeroing the destination at offset {offset} ({len} bytes): {errno}")]
    Zero {
        /// Where the range started.
        offset: u64,
        /// Its length.
        len: u32,
        /// What the target said.
        errno: Errno,
    },
    /// The destination could not make its writes durable.
    #[error("flushing the destination: {0}")]
    Flush(Errno),
    /// The checkpoint callback failed.
    #[error("saving the checkpoint at offset {offset}: {err}")]
    Checkpoint {
        /// The offset that was to be recorded.
        offset: u64,
        /// What went wrong.
        err: std::io::Error,
    },
    /// [`Progress::stop`] was called: the destination is flushed, but only
    /// partly copied.
    #[error(
        "interrupted: {} of {} bytes done; everything below offset {copied_up_to} is copied",
        summary.bytes_done(),
        summary.bytes_total
    )]
    Interrupted {
        /// What was done.
        summary: Box<Summary>,
        /// Everything below this offset is copied and flushed.
        copied_up_to: u64,
    },
}

/// Counters of a running copy, for a progress display on another thread,
/// and the flag that stops it.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    data: AtomicU64,
    skipped: AtomicU64,
    zeroed: AtomicU64,
    stop: Arc<AtomicBool>,
}

impl Progress {
    /// Zeroed counters.
    pub fn new() -> Self {
        Progress::default()
    }

    /// Bytes of the source dealt with so far (copied, skipped or zeroed,
    /// and the part before a resume point), out of its size.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Bytes written to the destination as data.
    pub fn data(&self) -> u64 {
        self.data.load(Ordering::Relaxed)
    }

    /// Bytes of holes and all-zero blocks: not written as data.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Of the skipped bytes, those made zero on the destination.
    pub fn zeroed(&self) -> u64 {
        self.zeroed.load(Ordering::Relaxed)
    }

    /// Ask the copy to stop: workers finish the request in hand, the
    /// destination is flushed, and [`Copier::run`] returns
    /// [`CopyError::Interrupted`].
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// The flag [`stop`](Self::stop) sets, to hand to a signal handler
    /// (`signal_hook::flag::register`).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// Whether a stop was asked for.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// What a copy did.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Summary {
    /// The source's size: the bytes a complete copy covers.
    pub bytes_total: u64,
    /// Bytes read from the source and written to the destination.
    pub bytes_data: u64,
    /// Bytes of holes and all-zero blocks, not written as data.
    pub bytes_skipped: u64,
    /// Of `bytes_skipped`, those made zero on the destination (which did
    /// not already read as zeroes there).
    pub bytes_zeroed: u64,
    /// Bytes before the resume point, taken as copied by an earlier run.
    pub bytes_resumed: u64,
    /// Wall-clock time of this run.
    pub seconds: f64,
    /// Whether every byte was copied (false after an interruption).
    pub complete: bool,
}

impl Summary {
    /// Bytes dealt with, including the resumed part.
    pub fn bytes_done(&self) -> u64 {
        self.bytes_resumed + self.bytes_data + self.bytes_skipped
    }
}

/// The geometry both sides agree on.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// The source's size: what is copied.
    size: u64,
    /// The larger logical block size: every request is a multiple of it.
    unit: u64,
    /// Largest read or write.
    chunk: u32,
    /// Largest write-zeroes (0: the destination has none; zero buffers are written).
    zero_max: u32,
    /// The destination reads as zeroes wherever nothing is written.
    fresh: bool,
}

/// A copy from one target to another; [`run`](Self::run) performs it.
pub struct Copier<'a> {
    src: Arc<dyn Target>,
    dst: Arc<dyn Target>,
    plan: Plan,
    jobs: usize,
    start: u64,
    checkpoint_every: u64,
    checkpoint: Option<Box<CheckpointFn<'a>>>,
}

impl<'a> Copier<'a> {
    /// Check the two targets fit together: the destination is writable, at
    /// least as large as the source, and the source ends on a block of both.
    /// Four workers, 1 MiB requests, an existing destination, no checkpoints.
    pub fn new(src: Arc<dyn Target>, dst: Arc<dyn Target>) -> Result<Self, CopyError> {
        let (s, d) = (src.caps(), dst.caps());
        if d.read_only {
            return Err(CopyError::ReadOnly);
        }
        if d.size < s.size {
            return Err(CopyError::TooSmall {
                src: s.size,
                dst: d.size,
            });
        }
        let unit = s.logical_block_size.max(d.logical_block_size);
        if !s.size.is_multiple_of(u64::from(unit)) {
            return Err(CopyError::Unaligned {
                size: s.size,
                block: unit.into(),
            });
        }
        let mut copier = Copier {
            src,
            dst,
            plan: Plan {
                size: s.size,
                unit: unit.into(),
                chunk: unit,
                zero_max: 0,
                fresh: false,
            },
            jobs: 4,
            start: 0,
            checkpoint_every: DEFAULT_CHECKPOINT_BYTES,
            checkpoint: None,
        };
        copier.plan_requests(DEFAULT_REQUEST_BYTES);
        Ok(copier)
    }

    /// Work out request sizes: `bytes` bounded by both sides' limits, in whole units.
    fn plan_requests(&mut self, bytes: u32) {
        let (s, d) = (self.src.caps(), self.dst.caps());
        let unit = u32::try_from(self.plan.unit).unwrap_or(u32::MAX);
        let limit = [s.max_request, d.max_request]
            .into_iter()
            .flatten()
            .fold(bytes, u32::min);
        self.plan.chunk = (limit / unit * unit).max(unit);
        self.plan.zero_max = d.write_zeroes.map_or(0, |z| {
            let max = z.max_bytes.min(1 << 30);
            let max = u32::try_from(max).unwrap_or(u32::MAX);
            (max / unit * unit).max(unit)
        });
    }

    /// Run `jobs` workers (at least 1), each with one request in flight per side.
    #[must_use]
    pub fn jobs(mut self, jobs: usize) -> Self {
        self.jobs = jobs.max(1);
        self
    }

    /// Largest read or write (rounded down to whole blocks; at most each
    /// side's `max_request`).
    #[must_use]
    pub fn request_bytes(mut self, bytes: u32) -> Self {
        self.plan_requests(bytes);
        self
    }

    /// The destination was just created and reads as zeroes everywhere:
    /// ranges that are zero in the source are not touched at all.
    #[must_use]
    pub fn fresh_destination(mut self, fresh: bool) -> Self {
        self.plan.fresh = fresh;
        self
    }

    /// Resume: everything below `offset` is taken as already copied.
    pub fn start_at(mut self, offset: u64) -> Result<Self, CopyError> {
        if offset > self.plan.size || !offset.is_multiple_of(self.plan.unit) {
            return Err(CopyError::BadStart {
                offset,
                size: self.plan.size,
                block: self.plan.unit,
            });
        }
        self.start = offset;
        Ok(self)
    }

    /// Every `every` bytes (and when stopped or failed), flush the
    /// destination and call `f` with the offset below which everything is
    /// copied. A failing `f` fails the copy.
    #[must_use]
    pub fn on_checkpoint(
        mut self,
        every: u64,
        f: impl Fn(u64) -> std::io::Result<()> + Send + Sync + 'a,
    ) -> Self {
        self.checkpoint_every = every.max(self.plan.unit);
        self.checkpoint = Some(Box::new(f));
        self
    }

    /// Copy, updating `progress` as it goes. Ends with a flush of the
    /// destination; its failure fails the copy.
    pub fn run(self, progress: &Progress) -> Result<Summary, CopyError> {
        let started = Instant::now();
        progress.done.store(self.start, Ordering::Relaxed);
        let every = if self.checkpoint.is_some() {
            self.checkpoint_every
        } else {
            0
        };
        let shared = worker::Shared {
            src: &*self.src,
            dst: &*self.dst,
            plan: self.plan,
            cursor: Mutex::new(Cursor::new(self.start, &self.plan, every)),
            progress,
            checkpoint: self.checkpoint.as_deref(),
            error: Mutex::new(None),
            failed: AtomicBool::new(false),
        };
        std::thread::scope(|s| {
            for i in 0..self.jobs {
                let spawned = std::thread::Builder::new()
                    .name(format!("copy-{i}"))
                    .spawn_scoped(s, || worker::run(&shared));
                if let Err(e) = spawned {
                    shared.fail(CopyError::Setup(crate::Error::io(
                        "starting a copy thread",
                        e,
                    )));
                    break;
                }
            }
        });
        let copied_up_to = shared.lock_cursor().watermark();
        let error = shared
            .error
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        let summary = Summary {
            bytes_total: self.plan.size,
            bytes_data: progress.data(),
            bytes_skipped: progress.skipped(),
            bytes_zeroed: progress.zeroed(),
            bytes_resumed: self.start,
            seconds: started.elapsed().as_secs_f64(),
            complete: error.is_none() && copied_up_to >= self.plan.size,
        };
        // Whatever happened, what was written is made durable and, where
        // asked, recorded, so a later run can resume there.
        let saved = flush(&*self.dst).and_then(|()| match &self.checkpoint {
            Some(f) if !summary.complete => f(copied_up_to).map_err(|err| CopyError::Checkpoint {
                offset: copied_up_to,
                err,
            }),
            _ => Ok(()),
        });
        if let Some(e) = error {
            if let Err(s) = saved {
                tracing::warn!("after the failed copy: {s}");
            }
            return Err(e);
        }
        saved?;
        if summary.complete {
            Ok(summary)
        } else {
            Err(CopyError::Interrupted {
                summary: Box::new(summary),
                copied_up_to,
            })
        }
    }
}

/// Flush `target` with a one-request engine of its own.
fn flush(target: &dyn Target) -> Result<(), CopyError> {
    let mut engine = Engine::new(target, 4096).map_err(CopyError::Setup)?;
    engine
        .run_in_place(target, Request::new(Op::Flush, 0, 0))
        .map(|_| ())
        .map_err(CopyError::Flush)
}
