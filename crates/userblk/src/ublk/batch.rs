//! The batch queue driver (`UBLK_F_BATCH_IO`, Linux 7.0): the second
//! driver of the one slot state machine, beside the per-tag one in
//! [`queue`](super::queue).
//!
//! Instead of a command per tag, a queue hands the kernel every tag's
//! buffer once (PREP_IO_CMDS), keeps one multishot FETCH_IO_CMDS in the
//! kernel, which writes the tags of new requests into a provided buffer,
//! and commits the results that came back in one pass of its loop with one
//! COMMIT_IO_CMDS. A tag is still a slot: its request starts in the tag's
//! slot and is committed only on [`Event::Done`], once no ring operation
//! of the request is left. The kernel makes a tag ready for its next
//! request when it handles the tag's commit. The fetch ending with ABORT
//! (STOP_DEV, or the device going away) means no more requests: the queue
//! leaves once every request it holds is committed. Asked to drain (a
//! handover), it leaves as soon as it holds nothing, as the per-tag driver
//! does: QUIESCE_DEV does not abort a fetch the kernel is delivering on.
#![allow(unsafe_code)]

use std::os::fd::OwnedFd;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use rustix::io::Errno;
use userblk_uapi::*;

use crate::io::provided::{multishot_uring_cmd, ProvidedBuf};
use crate::io::ring::{with_len, UserData};
use crate::slots::{Event, Slots};
use crate::target::{IoResult, Op, Request, Target};
use crate::ublk::desc::DescArray;
use crate::ublk::queue::{
    commit_result, exited, prepare, ready, request_from, uring_cmd, user_copy_in, user_copy_out,
    watch_shutdown, DataMode, DrainFlush, Prepared, QueueEvent, QueueSetup, Shutdown,
    FAILPOINT_ENV, WAKE_SLOT,
};
use crate::{Error, Result};

/// Frontend tokens (tags never appear as tokens here).
const FETCH: u16 = u16::MAX - 1;
const PREP: u16 = u16::MAX - 2;
/// The no-op a draining queue waits for (see [`Batch::drained`]).
const FLUSH: u16 = u16::MAX - 3;
/// Commit `k` in flight completes with token `COMMIT_BASE + k`.
const COMMIT_BASE: u16 = 0x8000;
/// Commits in flight at once, at most (one per loop pass is the rule).
const MAX_COMMITS: usize = 0x1000;
/// The fetch buffer: 32768 tags before the kernel runs out and the fetch is re-armed.
const FETCH_BUF_BYTES: usize = 64 << 10;
/// The provided-buffer group of the fetch (each queue has its own ring).
const FETCH_GROUP: u16 = 0;

/// How PREP and COMMIT elements are laid out for a data mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ElemFormat {
    /// `UBLK_BATCH_F_*` of the command.
    pub flags: u16,
    /// Bytes per element.
    pub bytes: u8,
}

impl ElemFormat {
    /// Copying through the daemon's buffers, every element names the tag's
    /// buffer; under user copy and zero copy (where `buf_index` is the
    /// registration index) the header is all.
    pub(crate) fn of(data: DataMode) -> Self {
        match data {
            DataMode::Buffers => ElemFormat {
                flags: UBLK_BATCH_F_HAS_BUF_ADDR,
                bytes: 16,
            },
            DataMode::UserCopy | DataMode::ZeroCopy => ElemFormat { flags: 0, bytes: 8 },
        }
    }
}

/// One element of a PREP or COMMIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Elem {
    pub tag: u16,
    /// Zero copy: where the kernel registers the tag's next request.
    pub buf_index: u16,
    /// COMMIT: the request's result.
    pub result: i32,
    /// Copying: the tag's buffer.
    pub buf_addr: u64,
}

/// Append `elems` to `out` in the kernel's layout for `fmt`.
pub(crate) fn encode(fmt: ElemFormat, elems: &[Elem], out: &mut Vec<u8>) {
    for e in elems {
        out.extend_from_slice(&e.tag.to_ne_bytes());
        out.extend_from_slice(&e.buf_index.to_ne_bytes());
        out.extend_from_slice(&e.result.to_ne_bytes());
        if fmt.flags & UBLK_BATCH_F_HAS_BUF_ADDR != 0 {
            out.extend_from_slice(&e.buf_addr.to_ne_bytes());
        }
    }
}

/// The tags a fetch completion delivered (`u16`s in native order).
pub(crate) fn decode_tags(bytes: &[u8]) -> impl Iterator<Item = u16> + '_ {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_ne_bytes([c[0], c[1]]))
}

/// What a COMMIT_IO_CMDS completion says about the `n` elements it carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CommitOutcome {
    /// Elements `0..handled` were committed.
    pub handled: usize,
    /// Element `handled` was refused (the kernel stops at it); the ones
    /// after it were not looked at and must be sent again.
    pub refused: bool,
}

/// Read a COMMIT_IO_CMDS result: the bytes of the elements handled, or
/// an error when none was (the first was refused).
pub(crate) fn commit_outcome(res: i32, n: usize, elem_bytes: u8) -> CommitOutcome {
    let Ok(bytes) = usize::try_from(res) else {
        return CommitOutcome {
            handled: 0,
            refused: n > 0,
        };
    };
    let handled = (bytes / usize::from(elem_bytes.max(1))).min(n);
    CommitOutcome {
        handled,
        refused: handled < n,
    }
}

/// A COMMIT_IO_CMDS in the kernel: its element buffer must live until its
/// completion.
struct Commit {
    /// Read by the kernel only; held here until the completion.
    _bytes: Vec<u8>,
    elems: Vec<Elem>,
}

struct Batch {
    // First, so its ring closes before the buffers its commands point into are freed.
    slots: Slots,
    fetch_buf: ProvidedBuf,
    q: u16,
    depth: u16,
    cdev: Arc<OwnedFd>,
    descs: DescArray,
    target: Arc<dyn Target>,
    data: DataMode,
    fmt: ElemFormat,
    buf_bytes: u32,
    fixed_cdev: bool,
    fail_after: Option<u64>,
    failure: Option<String>,
    wake_armed: bool,
    fetch_armed: bool,
    /// The kernel sends no more requests (the fetch was aborted or failed).
    ended: bool,
    /// Handing over: leave once nothing is held (see [`Batch::drained`]).
    draining: bool,
    /// Handing over: the wait for a flush no-op (see [`Batch::drained`]).
    flush: DrainFlush,
    /// Tags whose request we hold: delivered, not yet committed.
    held: Vec<bool>,
    held_count: usize,
    /// Results waiting for the next commit.
    pending: Vec<Elem>,
    commits: Vec<Option<Commit>>,
    /// The PREP element buffer (the kernel reads it while handling PREP).
    prep: Vec<u8>,
    tags: Vec<u16>,
}

/// Run queue `setup.q` with batch commands until the kernel ends its fetch
/// and every request it handed over is committed.
pub(crate) fn run(setup: QueueSetup, events: &Sender<QueueEvent>) {
    let q = setup.q;
    exited(q, serve(setup, events), events);
}

fn serve(setup: QueueSetup, events: &Sender<QueueEvent>) -> Result<()> {
    let q = setup.q;
    // Room for the target's operations and a few commands of our own.
    let Prepared {
        descs,
        slots,
        fixed_cdev,
    } = prepare(&setup, u32::from(setup.depth) * 2)?;
    let mut b = Batch {
        slots,
        fetch_buf: ProvidedBuf::new(FETCH_GROUP, FETCH_BUF_BYTES)?,
        q,
        depth: setup.depth,
        cdev: setup.cdev,
        descs,
        target: setup.target,
        data: setup.data,
        fmt: ElemFormat::of(setup.data),
        buf_bytes: setup.buf_bytes,
        fixed_cdev,
        fail_after: setup.fail_after,
        failure: None,
        wake_armed: false,
        fetch_armed: false,
        ended: false,
        draining: false,
        flush: DrainFlush::default(),
        held: vec![false; usize::from(setup.depth)],
        held_count: 0,
        pending: Vec::with_capacity(usize::from(setup.depth)),
        commits: Vec::new(),
        prep: Vec::new(),
        tags: Vec::with_capacity(usize::from(setup.depth)),
    };
    watch_shutdown(&mut b.slots, &setup.shutdown, q)?;
    b.wake_armed = true;
    b.slots
        .provide(&mut b.fetch_buf)
        .map_err(|e| b.err(format!("cannot provide the fetch buffer: {e}")))?;
    // PREP first: the kernel takes fetches only for a queue whose tags are prepared.
    b.push_prep()?;
    b.arm_fetch()?;
    let mut early = Vec::new();
    let prepared = b.wait_prep(&mut early)?;
    if prepared != 0 {
        return Err(b.err(format!(
            "the kernel refused PREP_IO_CMDS: {}",
            Errno::from_raw_os_error(-prepared)
        )));
    }
    ready(q, events);
    let result = b.run(&setup.shutdown, early);
    if result.is_err() && !setup.shutdown.requested() {
        // As for the per-tag driver (see queue::serve): a failed queue keeps
        // its ring open until the process exits.
        std::mem::forget(b);
    }
    result
}

impl Batch {
    fn err(&self, msg: String) -> Error {
        Error::Queue { queue: self.q, msg }
    }

    /// The element for `tag`, with `result`.
    fn elem(&self, tag: u16, result: i32) -> Elem {
        Elem {
            tag,
            buf_index: if self.data == DataMode::ZeroCopy {
                tag
            } else {
                0
            },
            result,
            // The slot is free whenever an element is made (PREP, or after
            // Done), so this is its buffer, lent to the kernel from now on.
            buf_addr: match self.data {
                DataMode::Buffers => self.slots.buf(tag).as_ptr() as u64,
                DataMode::UserCopy | DataMode::ZeroCopy => 0,
            },
        }
    }

    fn header(&self, nr_elem: u16, flags: u16, elem_bytes: u8) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..2].copy_from_slice(&self.q.to_ne_bytes());
        h[2..4].copy_from_slice(&flags.to_ne_bytes());
        h[4..6].copy_from_slice(&nr_elem.to_ne_bytes());
        h[6] = elem_bytes;
        h
    }

    /// Queue a PREP or COMMIT of `nr_elem` elements, whose `len` bytes are at `addr`.
    ///
    /// # Safety
    /// `addr` must be the heap buffer of `self.prep` or of a commit in
    /// `self.commits`, kept there, unmoved, until this command's completion
    /// is reaped (or leaked with the queue on an error path).
    unsafe fn push_elems(
        &mut self,
        cmd_op: u32,
        token: u16,
        (addr, len): (u64, usize),
        nr_elem: u16,
    ) -> Result<()> {
        let len = u32::try_from(len).map_err(|_| self.err("batch too large".into()))?;
        let e = uring_cmd(self.fixed_cdev, &self.cdev, cmd_op)
            .cmd(self.header(nr_elem, self.fmt.flags, self.fmt.bytes))
            .addr(Some(addr))
            .build()
            .user_data(UserData::Frontend { slot: token }.pack());
        let e = with_len(e, len);
        // SAFETY: the kernel only reads the element buffer, which the
        // caller keeps (see above). The buffers the elements name are free
        // slots' buffers, lent to the kernel as under the per-tag driver,
        // and live in `self.slots` as long as the ring.
        unsafe { self.slots.push(&e) }.map_err(|e| self.err(format!("queueing a batch: {e}")))
    }

    fn push_prep(&mut self) -> Result<()> {
        let elems: Vec<Elem> = (0..self.depth).map(|t| self.elem(t, 0)).collect();
        let mut bytes = Vec::with_capacity(elems.len() * usize::from(self.fmt.bytes));
        encode(self.fmt, &elems, &mut bytes);
        self.prep = bytes;
        let buf = (self.prep.as_ptr() as u64, self.prep.len());
        // SAFETY: `self.prep` is never touched again while the queue lives.
        unsafe { self.push_elems(UBLK_U_IO_PREP_IO_CMDS, PREP, buf, self.depth) }
    }

    /// Wait for the PREP's completion; anything else that completes
    /// meanwhile goes to `early`, for the loop.
    fn wait_prep(&mut self, early: &mut Vec<Event>) -> Result<i32> {
        let mut events = Vec::new();
        loop {
            self.slots.wait(&*self.target, true, &mut events)?;
            let mut res = None;
            for ev in events.drain(..) {
                match ev {
                    Event::Frontend {
                        token: PREP,
                        res: r,
                    } => res = Some(r),
                    other => early.push(other),
                }
            }
            if let Some(r) = res {
                return Ok(r);
            }
        }
    }

    fn arm_fetch(&mut self) -> Result<()> {
        let mut h = self.header(0, 0, 2);
        // The kernel fills as much of the buffer as it has tags for.
        h[4..6].copy_from_slice(&self.depth.to_ne_bytes());
        let e = uring_cmd(self.fixed_cdev, &self.cdev, UBLK_U_IO_FETCH_IO_CMDS)
            .cmd(h)
            .build()
            .user_data(UserData::Frontend { slot: FETCH }.pack());
        let e = multishot_uring_cmd(e, self.fetch_buf.group());
        // SAFETY: the command points at no memory; the buffer it selects
        // from is `self.fetch_buf`, registered on this ring and dropped
        // after it.
        unsafe { self.slots.push(&e) }.map_err(|e| self.err(format!("queueing the fetch: {e}")))?;
        self.fetch_armed = true;
        Ok(())
    }

    fn finished(&self) -> bool {
        self.ended
            && !self.fetch_armed
            && self.held_count == 0
            && self.commits.iter().all(Option::is_none)
    }

    fn run(&mut self, shutdown: &Shutdown, mut events: Vec<Event>) -> Result<()> {
        loop {
            for ev in events.drain(..) {
                match ev {
                    Event::Frontend {
                        token: WAKE_SLOT, ..
                    } => {
                        self.wake_armed = false;
                        if shutdown.requested() {
                            return Err(self.err("shut down".into()));
                        }
                        self.draining |= shutdown.draining();
                    }
                    Event::Frontend { token: FLUSH, .. } => self.flush.completed(),
                    Event::Frontend { token: FETCH, res } => self.on_fetch(res)?,
                    Event::Frontend { token, res } if token >= COMMIT_BASE => {
                        self.on_commit(usize::from(token - COMMIT_BASE), res);
                    }
                    Event::Frontend { token, res } => {
                        tracing::warn!("queue {}: unexpected completion {token}: {res}", self.q);
                    }
                    Event::Done { slot, req, result } => self.done(slot, req, result),
                }
            }
            self.flush()?;
            if self.finished() || (self.draining && self.drained()?) {
                break;
            }
            self.slots.wait(&*self.target, true, &mut events)?;
        }
        match self.failure.take() {
            Some(msg) => Err(self.err(msg)),
            None => Ok(()),
        }
    }

    /// Whether a draining queue may leave: nothing held, no result left to
    /// commit, and a flush no-op completed since. Waiting for it runs the
    /// kernel's pending work for this thread first, so tags it was about to
    /// deliver arrive (and are served) before we leave. The fetch may stay
    /// in the kernel; closing the ring cancels it.
    fn drained(&mut self) -> Result<bool> {
        let busy = self.held_count > 0
            || !self.pending.is_empty()
            || self.commits.iter().any(Option::is_some);
        self.flush.may_leave(busy, &mut self.slots, FLUSH, self.q)
    }

    fn on_fetch(&mut self, res: i32) -> Result<()> {
        if res < 0 {
            self.fetch_armed = false;
            if res == -Errno::NOBUFS.raw_os_error() && !self.ended {
                // The buffer is used up (or a completion could not be
                // posted): the kernel keeps the tags queued until a fetch
                // is back.
                self.slots
                    .provide(&mut self.fetch_buf)
                    .map_err(|e| self.err(format!("cannot provide the fetch buffer again: {e}")))?;
                return self.arm_fetch();
            }
            if res != UBLK_IO_RES_ABORT {
                let msg = format!(
                    "the kernel ended the fetch: {}",
                    Errno::from_raw_os_error(-res)
                );
                self.failure.get_or_insert(msg);
            }
            self.ended = true;
            return Ok(());
        }
        let n = usize::try_from(res).unwrap_or(0);
        let mut tags = std::mem::take(&mut self.tags);
        match self.fetch_buf.take(n) {
            Some(bytes) => tags.extend(decode_tags(bytes)),
            None => {
                self.tags = tags;
                return Err(self.err(format!("the fetch overran its buffer ({n} bytes)")));
            }
        }
        let mut r = Ok(());
        for &tag in &tags {
            r = self.start(tag);
            if r.is_err() {
                break;
            }
        }
        tags.clear();
        self.tags = tags;
        r
    }

    /// Start the request the kernel delivered for `tag`.
    fn start(&mut self, tag: u16) -> Result<()> {
        match self.held.get(usize::from(tag)) {
            Some(false) => {}
            _ => {
                tracing::warn!(
                    "queue {}: fetch delivered tag {tag}, which is not ours to take",
                    self.q
                );
                return Ok(());
            }
        }
        self.held[usize::from(tag)] = true;
        self.held_count += 1;
        if let Some(left) = self.fail_after.as_mut() {
            if *left == 0 {
                return Err(self.err(format!("fail point {FAILPOINT_ENV} fired")));
            }
            *left -= 1;
        }
        let desc = self.descs.get(tag).unwrap_or_default();
        let req = match request_from(&desc, self.buf_bytes) {
            Ok(req) => req,
            Err(e) => {
                tracing::debug!("queue {}: tag {tag}: refusing {desc:?}: {e}", self.q);
                let el = self.elem(tag, -e.raw_os_error());
                self.pending.push(el);
                return Ok(());
            }
        };
        if self.data == DataMode::UserCopy
            && req.op == Op::Write
            && user_copy_in(&self.cdev, &mut self.slots, self.q, tag, req).is_err()
        {
            self.done(tag, req, Err(Errno::IO));
            return Ok(());
        }
        if let Some(result) = self.slots.start(&*self.target, tag, req) {
            self.done(tag, req, result);
        }
        Ok(())
    }

    /// `tag`'s request finished and its slot is free: its result joins the next commit.
    fn done(&mut self, tag: u16, req: Request, mut r: IoResult) {
        if let (DataMode::UserCopy, Op::Read, Ok(n)) = (self.data, req.op, r) {
            if user_copy_out(&self.cdev, &self.slots, self.q, tag, n).is_err() {
                r = Err(Errno::IO);
            }
        }
        if let Err(e) = r {
            tracing::debug!("queue {}: tag {tag}: {req:?} failed: {e}", self.q);
        }
        let el = self.elem(tag, commit_result(req.op, r));
        self.pending.push(el);
    }

    /// Commit every pending result: one command per pass of the loop.
    fn flush(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            let k = match self.commits.iter().position(Option::is_none) {
                Some(k) => k,
                None if self.commits.len() < MAX_COMMITS => {
                    self.commits.push(None);
                    self.commits.len() - 1
                }
                None => return Err(self.err("too many commits in flight".into())),
            };
            let take = self.pending.len().min(usize::from(self.depth));
            let elems: Vec<Elem> = self.pending.drain(..take).collect();
            let mut bytes = Vec::with_capacity(take * usize::from(self.fmt.bytes));
            encode(self.fmt, &elems, &mut bytes);
            let nr = u16::try_from(take).map_err(|_| self.err("batch too large".into()))?;
            let buf = (bytes.as_ptr() as u64, bytes.len());
            self.commits[k] = Some(Commit {
                _bytes: bytes,
                elems,
            });
            let token = COMMIT_BASE + u16::try_from(k).unwrap_or(0);
            // SAFETY: `buf` is the heap buffer of the commit now in
            // `self.commits[k]` (moving the Vec did not move it), which
            // stays there until this command's completion is reaped.
            let pushed = unsafe { self.push_elems(UBLK_U_IO_COMMIT_IO_CMDS, token, buf, nr) };
            if let Err(e) = pushed {
                // Not queued: give the results back for the next try.
                if let Some(c) = self.commits[k].take() {
                    self.pending.extend(c.elems);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn on_commit(&mut self, k: usize, res: i32) {
        let Some(c) = self.commits.get_mut(k).and_then(Option::take) else {
            tracing::warn!("queue {}: completion for unknown commit {k}", self.q);
            return;
        };
        let out = commit_outcome(res, c.elems.len(), self.fmt.bytes);
        let mut release = out.handled;
        if out.refused {
            if let Some(e) = c.elems.get(out.handled) {
                let why = if res < 0 {
                    Errno::from_raw_os_error(-res).to_string()
                } else {
                    "refused".into()
                };
                tracing::warn!(
                    "queue {}: the kernel did not take tag {}'s result ({why})",
                    self.q,
                    e.tag
                );
            }
            release += 1;
            // The elements after the refused one were not looked at.
            self.pending
                .extend(c.elems.iter().skip(out.handled + 1).copied());
        }
        for e in c.elems.iter().take(release) {
            if let Some(h) = self.held.get_mut(usize::from(e.tag)) {
                if *h {
                    *h = false;
                    self.held_count -= 1;
                }
            }
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // Leaving with commands still in the kernel (an error path): the
        // kernel may yet copy into the buffers, so leak them.
        if self.slots.in_flight() > usize::from(self.wake_armed) {
            self.slots.leak_buffers();
            std::mem::forget(std::mem::take(&mut self.commits));
            std::mem::forget(std::mem::take(&mut self.prep));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_have_the_kernels_layout() {
        let e = Elem {
            tag: 3,
            buf_index: 3,
            result: -5,
            buf_addr: 0x1000,
        };
        let mut b = Vec::new();
        encode(ElemFormat::of(DataMode::Buffers), &[e, e], &mut b);
        assert_eq!(b.len(), 32);
        assert_eq!(&b[0..2], &3u16.to_ne_bytes());
        assert_eq!(&b[2..4], &3u16.to_ne_bytes());
        assert_eq!(&b[4..8], &(-5i32).to_ne_bytes());
        assert_eq!(&b[8..16], &0x1000u64.to_ne_bytes());
        b.clear();
        encode(ElemFormat::of(DataMode::ZeroCopy), &[e], &mut b);
        assert_eq!(b.len(), 8, "no buffer address under zero copy");
        assert_eq!(ElemFormat::of(DataMode::UserCopy).flags, 0);
        assert_eq!(
            ElemFormat::of(DataMode::Buffers).flags,
            UBLK_BATCH_F_HAS_BUF_ADDR
        );
    }

    #[test]
    fn fetched_tags_are_decoded_in_order() {
        let mut b = Vec::new();
        for t in [5u16, 0, 4095] {
            b.extend_from_slice(&t.to_ne_bytes());
        }
        b.push(0xff); // a stray odd byte is not a tag
        assert_eq!(decode_tags(&b).collect::<Vec<_>>(), [5, 0, 4095]);
    }

    #[test]
    fn partial_commits() {
        // All handled.
        assert_eq!(
            commit_outcome(48, 3, 16),
            CommitOutcome {
                handled: 3,
                refused: false
            }
        );
        // Two handled, the third refused (and any after it to resend).
        assert_eq!(
            commit_outcome(16, 4, 8),
            CommitOutcome {
                handled: 2,
                refused: true
            }
        );
        // None handled: the first was refused.
        assert_eq!(
            commit_outcome(-16, 4, 8),
            CommitOutcome {
                handled: 0,
                refused: true
            }
        );
        // A count past what was sent is capped.
        assert_eq!(commit_outcome(800, 2, 8).handled, 2);
    }
}
