//! What the slot state machine counts with: a [`Block`] of the installed
//! counter file (none outside a daemon) and each slot's start time.
//!
//! The clock is read once per ring wakeup ([`Meter::tick`]), not twice per
//! request: a clock read costs about as much as the rest of a null request
//! (`cargo bench -p userblk --bench metrics`). A request's latency runs from
//! the wakeup that brought it to the one that reaped its completion, or, if
//! the target answered at once, to a clock read just after that answer.

use std::time::{Duration, Instant};

use super::counters::Block;
use crate::target::{IoResult, Op, Request};

/// Counts the requests of one set of slots (one serving thread).
#[derive(Debug)]
pub struct Meter {
    block: Option<Block>,
    /// When each slot's request started.
    started: Vec<Instant>,
    /// The latest clock read: the time of the current wakeup.
    now: Instant,
}

impl Meter {
    /// A meter for `slots` slots, counting into the installed counter file
    /// ([`super::install`]); one that counts nothing if there is none.
    pub fn new(slots: usize) -> Meter {
        match super::installed() {
            Some(c) => Meter {
                block: Some(c.block()),
                started: vec![Instant::now(); slots],
                now: Instant::now(),
            },
            None => Meter::off(),
        }
    }

    /// A meter that counts nothing (and reads no clock).
    pub fn off() -> Meter {
        Meter {
            block: None,
            started: Vec::new(),
            now: Instant::now(),
        }
    }

    /// Whether requests are counted.
    pub fn is_on(&self) -> bool {
        self.block.is_some()
    }

    /// The ring woke up: read the clock once for what it brought.
    #[inline]
    pub fn tick(&mut self) {
        if self.block.is_some() {
            self.now = Instant::now();
        }
    }

    /// The time a request starts, if counting: the current wakeup's.
    #[inline]
    pub fn clock(&self) -> Option<Instant> {
        self.block.as_ref().map(|_| self.now)
    }

    /// The request started at `t` in `slot` is in flight; `in_use` slots are busy.
    pub fn began(&mut self, slot: u16, t: Option<Instant>, in_use: usize) {
        if let (Some(b), Some(t)) = (&self.block, t) {
            if let Some(s) = self.started.get_mut(usize::from(slot)) {
                *s = t;
            }
            b.set_inflight(in_use);
        }
    }

    /// `req`, started at `t`, ended at once with `result`.
    pub fn finished(&mut self, t: Option<Instant>, req: Request, result: IoResult, in_use: usize) {
        if let (Some(b), Some(t)) = (&self.block, t) {
            // The target's own time: read the clock after it (requests
            // started later in this wakeup start from this read too).
            self.now = Instant::now();
            record(b, self.now.saturating_duration_since(t), req, result);
            b.set_inflight(in_use);
        }
    }

    /// The request in `slot` ended with `result`.
    pub fn done(&self, slot: u16, req: Request, result: IoResult, in_use: usize) {
        if let Some(b) = &self.block {
            if let Some(&t) = self.started.get(usize::from(slot)) {
                record(b, self.now.saturating_duration_since(t), req, result);
            }
            b.set_inflight(in_use);
        }
    }
}

fn record(b: &Block, took: Duration, req: Request, result: IoResult) {
    let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
    let bytes = match (result, req.op) {
        (Ok(n), Op::Read | Op::Write) => u64::from(n),
        // The range they covered.
        (Ok(_), Op::Discard | Op::WriteZeroes) => u64::from(req.len),
        _ => 0,
    };
    b.record(req.op, bytes, result.is_ok(), ns);
}
