//! The shared cursor: hands out the source's ranges in order, from its
//! extents, and knows up to where everything handed out is done.

use std::collections::{BTreeSet, VecDeque};

use super::{CopyError, Plan, Progress};
use crate::target::{Extent, Target};

/// Zero extents shorter than this, between data, are read with it: one
/// larger read beats two small ones, and the zeroes are found anyway.
const SMALL_HOLE: u64 = 64 << 10;

/// One range for a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Work {
    /// Where it starts (a multiple of the plan's unit).
    pub offset: u64,
    /// Its length (a multiple of the plan's unit).
    pub len: u32,
    /// The source reads as zeroes here: nothing to read.
    pub zero: bool,
}

/// The cursor's state, behind the workers' mutex.
#[derive(Debug)]
pub(super) struct Cursor {
    /// Next byte not handed out.
    pos: u64,
    plan: Plan,
    /// Extents of the source from `pos` on, not handed out yet.
    ahead: VecDeque<Extent>,
    /// Starts of the ranges handed out and not finished.
    in_flight: BTreeSet<u64>,
    /// Checkpoint interval (0: none).
    every: u64,
    /// Offset of the last checkpoint.
    checkpointed: u64,
    /// A worker is taking a checkpoint now.
    checkpointing: bool,
}

impl Cursor {
    /// A cursor from `start` to the end of the source.
    pub(super) fn new(start: u64, plan: &Plan, every: u64) -> Self {
        Cursor {
            pos: start,
            plan: *plan,
            ahead: VecDeque::new(),
            in_flight: BTreeSet::new(),
            every,
            checkpointed: start,
            checkpointing: false,
        }
    }

    /// Everything below this offset is done.
    pub(super) fn watermark(&self) -> u64 {
        self.in_flight.first().copied().unwrap_or(self.pos)
    }

    /// The next range to work on, or `None` at the end. On a fresh
    /// destination, zero ranges are counted as skipped and passed over here.
    pub(super) fn next(
        &mut self,
        src: &dyn Target,
        progress: &Progress,
    ) -> Result<Option<Work>, CopyError> {
        while self.pos < self.plan.size {
            self.fill(src)?;
            let w = self.take();
            if w.zero && self.plan.fresh {
                Progress::add(&progress.skipped, w.len.into());
                Progress::add(&progress.done, w.len.into());
                continue;
            }
            self.in_flight.insert(w.offset);
            return Ok(Some(w));
        }
        Ok(None)
    }

    /// A range is done. Returns the offset to checkpoint at when one is due
    /// (the caller flushes, saves, then calls [`saved`](Self::saved)).
    pub(super) fn finish(&mut self, w: Work) -> Option<u64> {
        self.in_flight.remove(&w.offset);
        let mark = self.watermark();
        let due = self.every > 0 && mark >= self.checkpointed.saturating_add(self.every);
        if due && !self.checkpointing {
            self.checkpointing = true;
            return Some(mark);
        }
        None
    }

    /// A checkpoint at `mark` is saved.
    pub(super) fn saved(&mut self, mark: u64) {
        self.checkpointed = self.checkpointed.max(mark);
        self.checkpointing = false;
    }

    /// Make sure `ahead` describes at least one byte at `pos`.
    fn fill(&mut self, src: &dyn Target) -> Result<(), CopyError> {
        if !self.ahead.is_empty() {
            return Ok(());
        }
        let left = self.plan.size - self.pos;
        let mut got = Vec::new();
        src.extents(self.pos, left, &mut got)
            .map_err(|errno| CopyError::Extents {
                offset: self.pos,
                errno,
            })?;
        // Never trust a target past what was asked: clip, drop empty extents.
        let mut room = left;
        for mut e in got {
            e.len = e.len.min(room);
            if e.len > 0 {
                room -= e.len;
                self.ahead.push_back(e);
            }
        }
        if self.ahead.is_empty() {
            self.ahead
                .push_back(Extent::data(left.min(self.plan.chunk.into())));
        }
        Ok(())
    }

    /// Cut the next range from `ahead` (not empty): a zero range of whole
    /// units up to the largest write-zeroes (or one chunk without it), else
    /// data up to one chunk, taking small zero extents along and rounded
    /// up to whole units.
    fn take(&mut self) -> Work {
        let unit = self.plan.unit;
        let chunk = u64::from(self.plan.chunk);
        let start = self.pos;
        let first = self.ahead.front().copied().unwrap_or(Extent::data(unit));
        if first.zero {
            let max = match (self.plan.fresh, self.plan.zero_max) {
                (true, _) => u64::from(u32::MAX),
                (false, 0) => chunk,
                (false, z) => u64::from(z),
            };
            let end = (start + first.len.min(max)) / unit * unit;
            if end > start {
                return self.cut(end, true);
            }
        }
        let mut end = start;
        for e in &self.ahead {
            let small_hole = e.zero && e.len < SMALL_HOLE;
            if end > start && e.zero && !small_hole {
                break;
            }
            end += e.len;
            if end - start >= chunk {
                break;
            }
        }
        let end = end
            .min(start + chunk)
            .next_multiple_of(unit)
            .min(self.plan.size);
        self.cut(end, false)
    }

    /// Hand out `[pos, end)`, consuming it from `ahead`.
    fn cut(&mut self, end: u64, zero: bool) -> Work {
        let offset = self.pos;
        let mut n = end - offset;
        while n > 0 {
            let Some(front) = self.ahead.front_mut() else {
                break;
            };
            if front.len > n {
                front.len -= n;
                break;
            }
            n -= front.len;
            self.ahead.pop_front();
        }
        self.pos = end;
        Work {
            offset,
            // Ranges are at most a chunk or a write-zeroes, both u32.
            len: u32::try_from(end - offset).unwrap_or(u32::MAX),
            zero,
        }
    }
}
