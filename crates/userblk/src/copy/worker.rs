//! One copy worker: takes ranges from the cursor and moves them, with an
//! engine for each side.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use rustix::io::Errno;

use super::cursor::{Cursor, Work};
use super::{CheckpointFn, CopyError, Plan, Progress};
use crate::slots::Engine;
use crate::target::{Extent, Op, Request, Target};

/// Blocks of a read are checked for zeroes this many bytes at a time (or
/// the plan's unit, if larger).
const ZERO_BLOCK: u32 = 4096;

/// What every worker shares.
pub(super) struct Shared<'a> {
    pub src: &'a dyn Target,
    pub dst: &'a dyn Target,
    pub plan: Plan,
    pub cursor: Mutex<Cursor>,
    pub progress: &'a Progress,
    pub checkpoint: Option<&'a CheckpointFn<'a>>,
    /// The first error; the copy stops at it.
    pub error: Mutex<Option<CopyError>>,
    pub failed: AtomicBool,
}

impl Shared<'_> {
    pub(super) fn lock_cursor(&self) -> MutexGuard<'_, Cursor> {
        self.cursor.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Record an error (the first one wins) and stop every worker.
    pub(super) fn fail(&self, e: CopyError) {
        let mut first = self.error.lock().unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(e);
        }
        self.failed.store(true, Ordering::Relaxed);
    }

    fn stopping(&self) -> bool {
        self.failed.load(Ordering::Relaxed) || self.progress.stopped()
    }
}

/// A worker thread's body: ranges until the end, a stop or an error.
pub(super) fn run(shared: &Shared<'_>) {
    let mut w = match Worker::new(shared) {
        Ok(w) => w,
        Err(e) => return shared.fail(e),
    };
    while !shared.stopping() {
        let next = shared.lock_cursor().next(shared.src, shared.progress);
        let work = match next {
            Ok(Some(work)) => work,
            Ok(None) => break,
            Err(e) => return shared.fail(e),
        };
        if let Err(e) = w.work(work) {
            // The range stays in flight: the watermark stops below it.
            return shared.fail(e);
        }
        Progress::add(&shared.progress.done, work.len.into());
        let due = shared.lock_cursor().finish(work);
        if let Some(mark) = due {
            if let Err(e) = w.checkpoint(mark) {
                return shared.fail(e);
            }
        }
    }
}

/// A zero run or a data run within one read.
#[derive(Debug, Clone, Copy)]
struct Run {
    at: usize,
    len: usize,
    zero: bool,
}

struct Worker<'s, 'a> {
    shared: &'s Shared<'a>,
    src: Engine,
    dst: Engine,
    /// The destination takes write-zeroes (cleared if it turns out not to).
    write_zeroes: bool,
    runs: Vec<Run>,
    extents: Vec<Extent>,
}

impl<'s, 'a> Worker<'s, 'a> {
    fn new(shared: &'s Shared<'a>) -> Result<Self, CopyError> {
        let len = shared.plan.chunk as usize;
        Ok(Worker {
            shared,
            src: Engine::new(shared.src, len).map_err(CopyError::Setup)?,
            dst: Engine::new(shared.dst, len).map_err(CopyError::Setup)?,
            write_zeroes: shared.plan.zero_max > 0,
            runs: Vec::new(),
            extents: Vec::new(),
        })
    }

    fn work(&mut self, w: Work) -> Result<(), CopyError> {
        let progress = self.shared.progress;
        if w.zero {
            Progress::add(&progress.skipped, w.len.into());
            return self.zero(w.offset, w.len.into());
        }
        let read = Request::new(Op::Read, w.offset, w.len);
        match self.src.run_in_place(self.shared.src, read) {
            Ok(n) if n == w.len => {}
            Ok(_) => return Err(read_error(w, Errno::IO)),
            Err(errno) => return Err(read_error(w, errno)),
        }
        let block = ZERO_BLOCK.max(u32::try_from(self.shared.plan.unit).unwrap_or(u32::MAX));
        split_runs(
            &self.src.buf()[..w.len as usize],
            block as usize,
            &mut self.runs,
        );
        for i in 0..self.runs.len() {
            let r = self.runs[i];
            let offset = w.offset + r.at as u64;
            if r.zero {
                Progress::add(&progress.skipped, r.len as u64);
                if !self.shared.plan.fresh {
                    self.zero(offset, r.len as u64)?;
                }
                continue;
            }
            self.dst.buf_mut()[..r.len].copy_from_slice(&self.src.buf()[r.at..r.at + r.len]);
            let len = u32::try_from(r.len).map_err(|_| read_error(w, Errno::INVAL))?;
            let write = Request::new(Op::Write, offset, len);
            match self.dst.run_in_place(self.shared.dst, write) {
                Ok(n) if n == len => Progress::add(&progress.data, r.len as u64),
                Ok(_) => return Err(write_error(write, Errno::IO)),
                Err(errno) => return Err(write_error(write, errno)),
            }
        }
        Ok(())
    }

    /// Make `[offset, offset + len)` of the destination read as zeroes,
    /// leaving alone what its extents say already does.
    fn zero(&mut self, offset: u64, len: u64) -> Result<(), CopyError> {
        let dst = self.shared.dst;
        let lbs = u64::from(dst.caps().logical_block_size);
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            self.extents.clear();
            if let Err(e) = dst.extents(pos, end - pos, &mut self.extents) {
                tracing::debug!("copy: destination extents at {pos}: {e}; zeroing it all");
                self.extents.clear();
            }
            if self.extents.iter().all(|e| e.len == 0) {
                self.extents.clear();
                self.extents.push(Extent::data(end - pos));
            }
            for i in 0..self.extents.len() {
                let e = self.extents[i];
                // Whole blocks of the destination only: a partial one is zeroed.
                let n = e.len.min(end - pos);
                let whole = n.next_multiple_of(lbs).min(end - pos);
                if n == 0 {
                    break;
                }
                if !e.zero || whole != n {
                    self.make_zero(pos, whole)?;
                }
                pos += whole;
                if pos >= end {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Zero `[offset, offset + len)` of the destination: write-zeroes if it
    /// has them, zero buffers otherwise.
    fn make_zero(&mut self, offset: u64, len: u64) -> Result<(), CopyError> {
        let dst = self.shared.dst;
        let end = offset + len;
        let mut pos = offset;
        let mut buf_zeroed = false;
        while pos < end {
            if self.write_zeroes {
                let n = piece(end - pos, self.shared.plan.zero_max);
                let req = Request::new(Op::WriteZeroes, pos, n);
                match self.dst.run_in_place(dst, req) {
                    Ok(_) => {
                        Progress::add(&self.shared.progress.zeroed, n.into());
                        pos += u64::from(n);
                        continue;
                    }
                    Err(Errno::OPNOTSUPP) => {
                        tracing::debug!(
                            "copy: the destination refused write-zeroes; writing zeroes"
                        );
                        self.write_zeroes = false;
                    }
                    Err(errno) => return Err(zero_error(req, errno)),
                }
            }
            let n = piece(end - pos, self.shared.plan.chunk);
            if !buf_zeroed {
                self.dst.buf_mut()[..n as usize].fill(0);
                buf_zeroed = true;
            }
            let req = Request::new(Op::Write, pos, n);
            match self.dst.run_in_place(dst, req) {
                Ok(done) if done == n => {}
                Ok(_) => return Err(zero_error(req, Errno::IO)),
                Err(errno) => return Err(zero_error(req, errno)),
            }
            Progress::add(&self.shared.progress.zeroed, n.into());
            pos += u64::from(n);
        }
        Ok(())
    }

    /// Flush the destination, then record that everything below `mark` is copied.
    fn checkpoint(&mut self, mark: u64) -> Result<(), CopyError> {
        self.dst
            .run_in_place(self.shared.dst, Request::new(Op::Flush, 0, 0))
            .map_err(CopyError::Flush)?;
        if let Some(save) = self.shared.checkpoint {
            save(mark).map_err(|err| CopyError::Checkpoint { offset: mark, err })?;
        }
        self.shared.lock_cursor().saved(mark);
        Ok(())
    }
}

/// At most `max` of `left` bytes (`max` is a whole number of units, so
/// the pieces stay aligned).
fn piece(left: u64, max: u32) -> u32 {
    u32::try_from(left).map_or(max, |l| l.min(max))
}

fn read_error(w: Work, errno: Errno) -> CopyError {
    CopyError::Read {
        offset: w.offset,
        len: w.len,
        errno,
    }
}

fn write_error(req: Request, errno: Errno) -> CopyError {
    CopyError::Write {
        offset: req.offset,
        len: req.len,
        errno,
    }
}

fn zero_error(req: Request, errno: Errno) -> CopyError {
    CopyError::Zero {
        offset: req.offset,
        len: req.len,
        errno,
    }
}

/// Whether every byte of `b` is zero (a loop the compiler vectorises).
fn is_zero(b: &[u8]) -> bool {
    b.chunks(64)
        .all(|c| c.iter().fold(0, |acc, &x| acc | x) == 0)
}

/// Split `data` into alternating runs of all-zero and other `block`s.
fn split_runs(data: &[u8], block: usize, runs: &mut Vec<Run>) {
    runs.clear();
    for (i, b) in data.chunks(block).enumerate() {
        let zero = is_zero(b);
        match runs.last_mut() {
            Some(r) if r.zero == zero => r.len += b.len(),
            _ => runs.push(Run {
                at: i * block,
                len: b.len(),
                zero,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_at_zero_blocks() {
        let mut data = vec![0u8; 5 * 4096];
        data[4096 + 17] = 1;
        data[3 * 4096] = 2;
        let mut runs = Vec::new();
        split_runs(&data, 4096, &mut runs);
        let got: Vec<_> = runs.iter().map(|r| (r.at, r.len, r.zero)).collect();
        assert_eq!(
            got,
            [
                (0, 4096, true),
                (4096, 4096, false),
                (8192, 4096, true),
                (12288, 4096, false),
                (16384, 4096, true)
            ]
        );
        split_runs(&[0u8; 1000], 4096, &mut runs);
        assert_eq!(runs.len(), 1);
        assert!(runs[0].zero && runs[0].len == 1000);
        assert!(is_zero(&[]));
        assert!(!is_zero(&[0, 0, 0, 1]));
    }

    #[test]
    fn pieces_stay_within_their_limit() {
        assert_eq!(piece(10, 4096), 10);
        assert_eq!(piece(1 << 40, 1 << 20), 1 << 20);
        assert_eq!(piece(8192, 4096), 4096);
    }
}
