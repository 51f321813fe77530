//! The ublk queue loop: a thread, its ring, its tags, shared by every target.
//!
//! The queue is a driver of the one slot state machine ([`Slots`]): a tag
//! is a slot. Each tag has a page-aligned buffer (none under zero copy,
//! where the kernel lends the request's own pages: see [`DataMode`]) and,
//! while the slot is free, exactly one ublk command in the kernel: FETCH at
//! start, then COMMIT_AND_FETCH after each request. A fetch completing with
//! 0 means the tag's descriptor holds a new request; it starts in the tag's
//! slot, and its result comes back from the slot machine only once the
//! target answered and no ring operation of the request still points into
//! the tag's buffer: only then is it committed. A fetch completing with
//! ABORT (after STOP_DEV) retires the tag; when every tag is retired the
//! thread exits.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use io_uring::{opcode, types};
use rustix::event::{EventfdFlags, PollFlags};
use rustix::io::Errno;
use userblk_uapi::*;

use crate::io::ring::UserData;
use crate::io::{AlignedBuf, Ring};
use crate::slots::{Event, SlotData, Slots};
use crate::target::{Caps, Flags, IoResult, Op, Request, Target};
use crate::ublk::desc::DescArray;
use crate::{Error, Result};

/// Slot number reserved for the shutdown eventfd's poll (tags are < 4096).
pub(crate) const WAKE_SLOT: u16 = u16::MAX;
/// Slot number of the no-op a draining queue sends to flush the kernel's
/// pending completions into its ring (see [`Queue::drained`]).
const FLUSH_SLOT: u16 = u16::MAX - 1;

/// A way to make queue threads leave their loop without STOP_DEV, for a
/// device that never started (its fetches would otherwise wait forever).
#[derive(Debug)]
pub(crate) struct Shutdown {
    fd: OwnedFd,
    now: AtomicBool,
    /// Leave once no request is being served (a handover: see `handover.rs`).
    drain: AtomicBool,
}

impl Shutdown {
    pub(crate) fn new() -> Result<Arc<Self>> {
        let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC)
            .map_err(|e| Error::io("eventfd", e))?;
        Ok(Arc::new(Shutdown {
            fd,
            now: AtomicBool::new(false),
            drain: AtomicBool::new(false),
        }))
    }

    /// Whether [`trigger`](Self::trigger) was called.
    pub(crate) fn requested(&self) -> bool {
        self.now.load(Ordering::SeqCst)
    }

    /// Ask every queue thread to exit at once, closing its ring; the kernel
    /// then cancels the tags' commands.
    pub(crate) fn trigger(&self) {
        self.now.store(true, Ordering::SeqCst);
        if let Err(e) = rustix::io::write(&self.fd, &1u64.to_ne_bytes()) {
            tracing::warn!("waking queue threads: {e}");
        }
    }
}

impl Shutdown {
    /// Ask every queue thread to leave once it serves no request: after
    /// QUIESCE_DEV no new request reaches it, and what it holds is
    /// committed first, so nothing fails when the process then exits.
    pub(crate) fn drain(&self) {
        self.drain.store(true, Ordering::SeqCst);
        if let Err(e) = rustix::io::write(&self.fd, &1u64.to_ne_bytes()) {
            tracing::warn!("waking queue threads: {e}");
        }
    }

    /// Whether [`drain`](Self::drain) was called.
    pub(crate) fn draining(&self) -> bool {
        self.drain.load(Ordering::SeqCst)
    }
}

/// What a queue thread tells the device.
#[derive(Debug)]
pub(crate) enum QueueEvent {
    /// Every tag is fetched; the queue is serving. Carries the thread id.
    Ready { q: u16, tid: i32 },
    /// The thread left its loop.
    Exited { q: u16, result: Result<()> },
}

/// Everything a queue thread needs.
pub(crate) struct QueueSetup {
    pub q: u16,
    pub depth: u16,
    pub buf_bytes: u32,
    pub cdev: Arc<OwnedFd>,
    pub cpus: Vec<usize>,
    pub target: Arc<dyn Target>,
    pub caps: Caps,
    pub shutdown: Arc<Shutdown>,
    /// Fail point for tests: leave the loop with an error after this many requests.
    pub fail_after: Option<u64>,
    /// How request data reaches the target.
    pub data: DataMode,
}

/// How request data moves between the kernel and the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DataMode {
    /// The kernel copies it to and from each tag's buffer (the default).
    Buffers,
    /// `UBLK_F_USER_COPY`: commands carry no buffer address; the queue
    /// copies with pread/pwrite on `/dev/ublkcN`.
    UserCopy,
    /// `UBLK_F_AUTO_BUF_REG`: the kernel registers each request's own pages
    /// in the ring's buffer table at the tag's index, and the target reads
    /// and writes them with fixed-buffer operations. No copy, no buffers.
    ZeroCopy,
}

impl DataMode {
    /// The mode a device with `flags` (as the kernel granted them) uses.
    pub(crate) fn of(flags: u64) -> Self {
        if flags & UBLK_F_AUTO_BUF_REG != 0 {
            DataMode::ZeroCopy
        } else if flags & UBLK_F_USER_COPY != 0 {
            DataMode::UserCopy
        } else {
            DataMode::Buffers
        }
    }
}

/// Environment variable of the queue fail point, `queue-exit:Q:N`: queue Q
/// fails after serving N requests, as a crashed queue thread would. Tests of
/// what the kernel and `recover` make of a partial failure use it.
pub const FAILPOINT_ENV: &str = "USERBLK_FAILPOINT";

/// The fail point for queue `q`, if the environment sets one.
pub(crate) fn failpoint(q: u16) -> Option<u64> {
    let spec = std::env::var(FAILPOINT_ENV).ok()?;
    let mut parts = spec.split(':');
    match (
        parts.next(),
        parts.next().and_then(|v| v.parse::<u16>().ok()),
        parts.next(),
    ) {
        (Some("queue-exit"), Some(fq), Some(n)) if fq == q => n.parse().ok(),
        _ => None,
    }
}

/// What the kernel side of a tag is doing (the slot machine knows the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    /// A FETCH or COMMIT_AND_FETCH is in the kernel.
    Armed,
    /// Its request is in the tag's slot.
    Serving,
    /// Aborted: never re-armed.
    Retired,
}

struct Queue {
    // First, so its ring closes before the buffers its commands point into are freed.
    slots: Slots,
    q: u16,
    cdev: Arc<OwnedFd>,
    descs: DescArray,
    tags: Vec<Tag>,
    target: Arc<dyn Target>,
    retired: usize,
    failure: Option<String>,
    /// Requests left before the test fail point fires.
    fail_after: Option<u64>,
    /// The shutdown poll is in the ring (it counts as in flight).
    wake_armed: bool,
    data: DataMode,
    /// Largest request (the device's max_io_buf_bytes).
    buf_bytes: u32,
    /// `/dev/ublkcN` is the ring's fixed file 0 (no descriptor lookup per command).
    fixed_cdev: bool,
    /// Handing over: leave once no tag is serving (see [`Queue::drained`]).
    draining: bool,
    /// Handing over: the wait for a flush no-op (see [`Queue::drained`]).
    flush: DrainFlush,
}

/// Run queue `setup.q` until every tag is aborted; reports through `events`.
pub(crate) fn run(setup: QueueSetup, events: &Sender<QueueEvent>) {
    let q = setup.q;
    exited(q, serve(setup, events), events);
}

/// Tell the device queue `q` serves (from its own thread).
pub(crate) fn ready(q: u16, events: &Sender<QueueEvent>) {
    let _ = events.send(QueueEvent::Ready {
        q,
        tid: rustix::thread::gettid().as_raw_nonzero().get(),
    });
}

/// Tell the device queue `q` left its loop with `result` (logged if an error).
pub(crate) fn exited(q: u16, result: Result<()>, events: &Sender<QueueEvent>) {
    if let Err(e) = &result {
        tracing::error!("queue {q}: {e}");
    }
    let _ = events.send(QueueEvent::Exited { q, result });
}

/// What every queue driver sets up the same way (see [`prepare`]).
pub(crate) struct Prepared {
    pub descs: DescArray,
    pub slots: Slots,
    /// `/dev/ublkcN` is the ring's fixed file 0.
    pub fixed_cdev: bool,
}

/// Set up queue `setup.q`'s thread (I/O flusher, CPU), its descriptors, its
/// ring (`ring_entries` entries; under zero copy a buffer table of one entry
/// per tag; `/dev/ublkcN` as fixed file 0 where it can) and its slots.
pub(crate) fn prepare(setup: &QueueSetup, ring_entries: u32) -> Result<Prepared> {
    let q = setup.q;
    if let Err(e) = crate::sys::set_io_flusher() {
        // Users' daemons lack CAP_SYS_RESOURCE for it; that is expected there.
        if rustix::process::geteuid().is_root() {
            tracing::warn!("queue {q}: {e}");
        } else {
            tracing::debug!("queue {q}: {e}");
        }
    }
    if !setup.cpus.is_empty() {
        let mut set = rustix::thread::CpuSet::new();
        setup.cpus.iter().for_each(|&c| set.set(c));
        if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
            tracing::debug!("queue {q}: cannot pin to {:?}: {e}", setup.cpus);
        }
    }
    let descs = DescArray::map(std::os::fd::AsFd::as_fd(&*setup.cdev), q, setup.depth)?;
    let mut ring = Ring::new(ring_entries)?;
    if setup.data == DataMode::ZeroCopy {
        // The kernel registers tag t's request pages at entry t.
        ring.register_buffer_table(u32::from(setup.depth))
            .map_err(|e| Error::Queue {
                queue: q,
                msg: format!("zero copy: cannot give the ring a buffer table: {e}"),
            })?;
    }
    let fixed_cdev = match ring.register_file(std::os::fd::AsFd::as_fd(&*setup.cdev)) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(
                "queue {q}: cannot register /dev/ublkc as a fixed file ({e}); using its descriptor"
            );
            false
        }
    };
    // Under zero copy the data stays in the kernel's pages: no buffers.
    let data = match setup.data {
        DataMode::ZeroCopy => SlotData::Registered {
            len: setup.buf_bytes,
        },
        DataMode::Buffers | DataMode::UserCopy => SlotData::Buffers(AlignedBuf::many(
            usize::from(setup.depth),
            setup.buf_bytes as usize,
        )?),
    };
    Ok(Prepared {
        descs,
        slots: Slots::with_ring(ring, setup.caps, setup.depth, data)?,
        fixed_cdev,
    })
}

fn serve(setup: QueueSetup, events: &Sender<QueueEvent>) -> Result<()> {
    let q = setup.q;
    // Room for one command per tag plus target operations.
    let Prepared {
        descs,
        slots,
        fixed_cdev,
    } = prepare(&setup, u32::from(setup.depth) * 2)?;
    let mut queue = Queue {
        slots,
        q,
        cdev: setup.cdev,
        descs,
        tags: vec![Tag::Armed; usize::from(setup.depth)],
        target: setup.target,
        retired: 0,
        failure: None,
        fail_after: setup.fail_after,
        wake_armed: false,
        data: setup.data,
        buf_bytes: setup.buf_bytes,
        fixed_cdev,
        draining: false,
        flush: DrainFlush::default(),
    };
    queue.watch_shutdown(&setup.shutdown)?;
    for tag in 0..setup.depth {
        queue.push_cmd(UBLK_U_IO_FETCH_REQ, tag, 0)?;
    }
    queue.slots.submit()?;
    ready(q, events);
    let result = queue.run(&setup.shutdown);
    if result.is_err() && !setup.shutdown.now.load(Ordering::SeqCst) {
        // A failed queue keeps its ring open until the process exits: on
        // Linux 6.12 closing a ublk queue's ring while the process lives
        // (with requests in flight) trips a kernel bug in io_ring_exit_work,
        // while process exit is the path the kernel handles (as a crash).
        std::mem::forget(queue);
    }
    result
}

/// Build the request a descriptor describes, or the errno to complete it with.
pub(crate) fn request_from(
    desc: &UblksrvIoDesc,
    buf_bytes: u32,
) -> std::result::Result<Request, Errno> {
    let op = match desc.op() {
        UBLK_IO_OP_READ => Op::Read,
        UBLK_IO_OP_WRITE => Op::Write,
        UBLK_IO_OP_FLUSH => Op::Flush,
        UBLK_IO_OP_DISCARD => Op::Discard,
        UBLK_IO_OP_WRITE_ZEROES => Op::WriteZeroes,
        _ => return Err(Errno::OPNOTSUPP),
    };
    if op == Op::Flush {
        // A flush has no range: the kernel leaves start_sector at -1.
        return Ok(Request::new(Op::Flush, 0, 0));
    }
    let offset = desc.start_sector.checked_mul(512).ok_or(Errno::IO)?;
    let len = desc.nr_sectors.checked_mul(512).ok_or(Errno::IO)?;
    if op.has_data() && len > buf_bytes {
        return Err(Errno::IO);
    }
    let mut flags = Flags::NONE;
    if desc.has_flag(UBLK_IO_F_FUA) {
        flags = flags.with(Flags::FUA);
    }
    if desc.has_flag(UBLK_IO_F_NOUNMAP) {
        flags = flags.with(Flags::NOUNMAP);
    }
    Ok(Request {
        op,
        offset,
        len,
        flags,
    })
}

/// The `result` a COMMIT carries: bytes for reads and writes, 0 for other
/// successes (a byte count could overflow i32), or `-errno`.
pub(crate) fn commit_result(op: Op, r: IoResult) -> i32 {
    match r {
        Ok(n) if op.has_data() => i32::try_from(n).unwrap_or(-Errno::IO.raw_os_error()),
        Ok(_) => 0,
        Err(e) => -e.raw_os_error(),
    }
}

/// Where request data of `(q, tag)` starts in `/dev/ublkcN` under user copy.
pub(crate) fn user_copy_offset(q: u16, tag: u16) -> u64 {
    UBLKSRV_IO_BUF_OFFSET + (u64::from(q) << UBLK_QID_OFF) + (u64::from(tag) << UBLK_TAG_OFF)
}

/// The `sqe->addr` of tag `tag`'s FETCH / COMMIT_AND_FETCH under zero copy:
/// its request pages go to buffer-table entry `tag`, and a failed
/// registration fails the request (no fallback flag: entry `tag` is only
/// ever this tag's, so it cannot be busy).
pub(crate) fn auto_buf_sqe_addr(tag: u16) -> u64 {
    AutoBufReg::at(tag).to_sqe_addr()
}

/// User copy: read write request `req`'s payload of `(q, tag)` from
/// `/dev/ublkcN` into the tag's (free) slot buffer.
pub(crate) fn user_copy_in(
    cdev: &OwnedFd,
    slots: &mut Slots,
    q: u16,
    tag: u16,
    req: Request,
) -> std::result::Result<(), Errno> {
    let len = usize::try_from(req.len).map_err(|_| Errno::IO)?;
    let at = user_copy_offset(q, tag);
    let buf = slots.buf_prefix_mut(tag, len);
    if buf.len() < len {
        return Err(Errno::IO);
    }
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(cdev, &mut buf[done..], at + done as u64) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) => {
                tracing::warn!("queue {q}: tag {tag}: user copy in: {e}");
                return Err(e);
            }
        }
    }
    Ok(())
}

/// User copy: write the first `n` bytes of `(q, tag)`'s (free) slot buffer,
/// a read's data, to `/dev/ublkcN`.
pub(crate) fn user_copy_out(
    cdev: &OwnedFd,
    slots: &Slots,
    q: u16,
    tag: u16,
    n: u32,
) -> std::result::Result<(), Errno> {
    let n = usize::try_from(n).map_err(|_| Errno::IO)?;
    let at = user_copy_offset(q, tag);
    let data = slots.buf(tag).get(..n).ok_or(Errno::IO)?;
    let mut done = 0;
    while done < data.len() {
        match rustix::io::pwrite(cdev, &data[done..], at + done as u64) {
            Ok(0) => return Err(Errno::IO),
            Ok(k) => done += k,
            Err(Errno::INTR) => {}
            Err(e) => {
                tracing::warn!("queue {q}: tag {tag}: user copy out: {e}");
                return Err(e);
            }
        }
    }
    Ok(())
}

fn io_cmd_bytes(c: &UblksrvIoCmd) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..2].copy_from_slice(&c.q_id.to_ne_bytes());
    b[2..4].copy_from_slice(&c.tag.to_ne_bytes());
    b[4..8].copy_from_slice(&c.result.to_ne_bytes());
    b[8..16].copy_from_slice(&c.addr.to_ne_bytes());
    b
}

/// Queue a poll for `shutdown`'s eventfd; it completes as
/// [`Event::Frontend`] with token [`WAKE_SLOT`].
pub(crate) fn watch_shutdown(slots: &mut Slots, shutdown: &Shutdown, q: u16) -> Result<()> {
    let e = opcode::PollAdd::new(
        types::Fd(shutdown.fd.as_raw_fd()),
        PollFlags::IN.bits().into(),
    )
    .build()
    .user_data(UserData::Frontend { slot: WAKE_SLOT }.pack());
    // SAFETY: the eventfd is kept open by the Arc<Shutdown> the caller
    // holds for the whole life of its queue; no buffer is involved.
    unsafe { slots.push(&e) }.map_err(|e| Error::Queue {
        queue: q,
        msg: format!("poll on eventfd: {e}"),
    })
}

/// A draining queue's wait for a no-op before it leaves (the reason is at
/// [`Queue::drained`]): both queue drivers use it.
#[derive(Debug, Default)]
pub(crate) struct DrainFlush {
    /// The no-op is in the ring.
    armed: bool,
    /// It completed, and the queue has held nothing since.
    done: bool,
}

impl DrainFlush {
    /// The no-op completed.
    pub(crate) fn completed(&mut self) {
        self.armed = false;
        self.done = true;
    }

    /// Whether the queue may leave now, `busy` saying whether it still
    /// holds a request; queues the no-op (completing as token `token`)
    /// when one is needed.
    pub(crate) fn may_leave(
        &mut self,
        busy: bool,
        slots: &mut Slots,
        token: u16,
        q: u16,
    ) -> Result<bool> {
        if busy {
            self.done = false;
            return Ok(false);
        }
        if self.done {
            slots.submit()?;
            return Ok(true);
        }
        if !self.armed {
            push_flush(slots, token, q)?;
            self.armed = true;
        }
        Ok(false)
    }
}

/// Queue the no-op a draining queue waits for; it completes as
/// [`Event::Frontend`] with `token`.
fn push_flush(slots: &mut Slots, token: u16, q: u16) -> Result<()> {
    let e = opcode::Nop::new()
        .build()
        .user_data(UserData::Frontend { slot: token }.pack());
    // SAFETY: a no-op points at no memory.
    unsafe { slots.push(&e) }.map_err(|e| Error::Queue {
        queue: q,
        msg: format!("queueing a flush: {e}"),
    })
}

/// A ublk I/O command `cmd_op` on `/dev/ublkcN`: the ring's fixed file 0
/// if `fixed`, else `cdev`'s descriptor.
pub(crate) fn uring_cmd(fixed: bool, cdev: &OwnedFd, cmd_op: u32) -> opcode::UringCmd16 {
    if fixed {
        opcode::UringCmd16::new(types::Fixed(0), cmd_op)
    } else {
        opcode::UringCmd16::new(types::Fd(cdev.as_raw_fd()), cmd_op)
    }
}

impl Queue {
    fn watch_shutdown(&mut self, shutdown: &Shutdown) -> Result<()> {
        watch_shutdown(&mut self.slots, shutdown, self.q)?;
        self.wake_armed = true;
        Ok(())
    }

    fn push_cmd(&mut self, cmd_op: u32, tag: u16, result: i32) -> Result<()> {
        // Under user copy and zero copy the kernel wants no buffer address.
        // Commands are queued only for free slots, whose buffer is the frontend's to lend.
        let addr = match self.data {
            DataMode::Buffers => self.slots.buf(tag).as_ptr() as u64,
            DataMode::UserCopy | DataMode::ZeroCopy => 0,
        };
        let cmd = UblksrvIoCmd {
            q_id: self.q,
            tag,
            result,
            addr,
        };
        let e = uring_cmd(self.fixed_cdev, &self.cdev, cmd_op).cmd(io_cmd_bytes(&cmd));
        let e = match self.data {
            // Where the kernel is to register the next request's pages.
            DataMode::ZeroCopy => e.addr(Some(auto_buf_sqe_addr(tag))),
            DataMode::Buffers | DataMode::UserCopy => e,
        }
        .build()
        .user_data(UserData::Frontend { slot: tag }.pack());
        // SAFETY: the tag's slot is free, so its buffer is ours to lend; it
        // lives in `self.slots` until this queue is dropped (and the fixed
        // file is `self.cdev`, open as long), which happens only after the
        // loop has seen every tag retired (or the buffers are leaked, see
        // `Drop`); the kernel writes WRITE data into it before completing
        // the fetch and reads READ data from it while processing this
        // commit, and no slot is started on the tag until the fetch completed.
        unsafe { self.slots.push(&e) }.map_err(|e| Error::Queue {
            queue: self.q,
            msg: format!("queueing tag {tag}: {e}"),
        })
    }

    fn run(&mut self, shutdown: &Shutdown) -> Result<()> {
        let depth = self.tags.len();
        let mut events = Vec::with_capacity(depth * 2);
        while self.retired < depth {
            self.slots.wait(&*self.target, true, &mut events)?;
            for ev in events.drain(..) {
                match ev {
                    Event::Frontend {
                        token: WAKE_SLOT, ..
                    } => {
                        self.wake_armed = false;
                        if shutdown.now.load(Ordering::SeqCst) {
                            return Err(Error::Queue {
                                queue: self.q,
                                msg: "shut down".into(),
                            });
                        }
                        self.draining |= shutdown.drain.load(Ordering::SeqCst);
                    }
                    Event::Frontend {
                        token: FLUSH_SLOT, ..
                    } => self.flush.completed(),
                    Event::Frontend { token, res } => self.on_fetch(token, res)?,
                    Event::Done { slot, req, result } => self.commit(slot, req, result)?,
                }
            }
            if self.draining && self.drained()? {
                break;
            }
        }
        match self.failure.take() {
            Some(msg) => Err(Error::Queue { queue: self.q, msg }),
            None => Ok(()),
        }
    }

    fn on_fetch(&mut self, tag: u16, res: i32) -> Result<()> {
        let Some(state) = self.tags.get(usize::from(tag)).copied() else {
            tracing::warn!("queue {}: completion for unknown tag {tag}", self.q);
            return Ok(());
        };
        if state != Tag::Armed {
            tracing::warn!(
                "queue {}: unexpected fetch completion for tag {tag} in state {state:?}",
                self.q
            );
            return Ok(());
        }
        match res {
            UBLK_IO_RES_OK => {
                if let Some(left) = self.fail_after.as_mut() {
                    if *left == 0 {
                        return Err(Error::Queue {
                            queue: self.q,
                            msg: format!("fail point {FAILPOINT_ENV} fired"),
                        });
                    }
                    *left -= 1;
                }
            }
            UBLK_IO_RES_ABORT => {
                self.retire(tag);
                return Ok(());
            }
            err => {
                let msg = format!(
                    "tag {tag}: kernel refused the command: {}",
                    Errno::from_raw_os_error(-err)
                );
                self.failure.get_or_insert(msg);
                self.retire(tag);
                return Ok(());
            }
        }
        let desc = self.descs.get(tag).unwrap_or_default();
        let req = match request_from(&desc, self.buf_bytes) {
            Ok(req) => req,
            Err(e) => {
                tracing::debug!("queue {}: tag {tag}: refusing {desc:?}: {e}", self.q);
                return self.push_cmd(UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, -e.raw_os_error());
            }
        };
        self.tags[usize::from(tag)] = Tag::Serving;
        if self.data == DataMode::UserCopy && req.op == Op::Write && self.copy_in(tag, req).is_err()
        {
            return self.commit(tag, req, Err(Errno::IO));
        }
        match self.slots.start(&*self.target, tag, req) {
            Some(result) => self.commit(tag, req, result),
            None => Ok(()),
        }
    }

    /// Hand tag `tag`'s result to the kernel, with a fetch for its next
    /// request. Called only once the tag's slot is free again.
    fn commit(&mut self, tag: u16, req: Request, mut r: IoResult) -> Result<()> {
        if let (DataMode::UserCopy, Op::Read, Ok(n)) = (self.data, req.op, r) {
            if self.copy_out(tag, n).is_err() {
                r = Err(Errno::IO);
            }
        }
        if let Err(e) = r {
            tracing::debug!("queue {}: tag {tag}: {req:?} failed: {e}", self.q);
        }
        self.tags[usize::from(tag)] = Tag::Armed;
        self.push_cmd(
            UBLK_U_IO_COMMIT_AND_FETCH_REQ,
            tag,
            commit_result(req.op, r),
        )
    }

    /// User copy: fetch a write's payload from the kernel into the tag's buffer.
    fn copy_in(&mut self, tag: u16, req: Request) -> std::result::Result<(), Errno> {
        user_copy_in(&self.cdev, &mut self.slots, self.q, tag, req)
    }

    /// User copy: hand a read's `n` bytes of data to the kernel.
    fn copy_out(&mut self, tag: u16, n: u32) -> std::result::Result<(), Errno> {
        user_copy_out(&self.cdev, &self.slots, self.q, tag, n)
    }

    /// Whether a draining queue may leave: no tag serving, and a flush has
    /// completed since the last request came. The flush is a no-op waited
    /// for: the wait first runs the kernel's pending work for this thread,
    /// so a request dispatched before QUIESCE_DEV shows up in the same batch
    /// rather than after we left (it would then fail). Armed tags stay in
    /// the kernel; closing the ring cancels them.
    fn drained(&mut self) -> Result<bool> {
        let busy = self.tags.contains(&Tag::Serving);
        self.flush
            .may_leave(busy, &mut self.slots, FLUSH_SLOT, self.q)
    }

    fn retire(&mut self, tag: u16) {
        self.tags[usize::from(tag)] = Tag::Retired;
        self.retired += 1;
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // Leaving with commands still in the kernel (an error path): the
        // kernel may yet copy into these buffers, so leak them rather than
        // free memory it could write to.
        if self.slots.in_flight() > usize::from(self.wake_armed) {
            self.slots.leak_buffers();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(op: u8, flags: u32, start: u64, sectors: u32) -> UblksrvIoDesc {
        UblksrvIoDesc {
            op_flags: u32::from(op) | flags,
            nr_sectors: sectors,
            start_sector: start,
            addr: 0,
        }
    }

    #[test]
    fn descriptors_become_requests() {
        let r = request_from(&desc(UBLK_IO_OP_WRITE, UBLK_IO_F_FUA, 8, 8), 1 << 20);
        assert_eq!(
            r,
            Ok(Request::new(Op::Write, 4096, 4096).with_flags(Flags::FUA))
        );
        let r = request_from(
            &desc(UBLK_IO_OP_WRITE_ZEROES, UBLK_IO_F_NOUNMAP, 0, 1 << 20),
            4096,
        );
        assert_eq!(
            r,
            Ok(Request::new(Op::WriteZeroes, 0, 512 << 20).with_flags(Flags::NOUNMAP))
        );
        assert_eq!(
            request_from(&desc(UBLK_IO_OP_FLUSH, 0, 0, 0), 4096).map(|r| r.op),
            Ok(Op::Flush)
        );
        assert_eq!(
            request_from(&desc(UBLK_IO_OP_DISCARD, 0, 0, 8), 4096).map(|r| r.op),
            Ok(Op::Discard)
        );
        assert_eq!(
            request_from(&desc(UBLK_IO_OP_READ, 0, 0, 8), 4096).map(|r| r.flags),
            Ok(Flags::NONE)
        );
    }

    #[test]
    fn bad_descriptors_are_refused() {
        assert_eq!(
            request_from(&desc(UBLK_IO_OP_WRITE_SAME, 0, 0, 8), 4096),
            Err(Errno::OPNOTSUPP)
        );
        assert_eq!(
            request_from(&desc(UBLK_IO_OP_ZONE_APPEND, 0, 0, 8), 4096),
            Err(Errno::OPNOTSUPP)
        );
        assert_eq!(
            request_from(&desc(UBLK_IO_OP_READ, 0, 0, 16), 4096),
            Err(Errno::IO)
        );
        assert_eq!(
            request_from(&desc(UBLK_IO_OP_READ, 0, u64::MAX, 1), 4096),
            Err(Errno::IO)
        );
        assert_eq!(
            request_from(&desc(UBLK_IO_OP_DISCARD, 0, 0, u32::MAX), 4096),
            Err(Errno::IO)
        );
    }

    #[test]
    fn commit_results() {
        assert_eq!(commit_result(Op::Read, Ok(4096)), 4096);
        assert_eq!(commit_result(Op::Discard, Ok(1 << 31)), 0);
        assert_eq!(commit_result(Op::Flush, Ok(0)), 0);
        assert_eq!(
            commit_result(Op::Write, Err(Errno::NOSPC)),
            -Errno::NOSPC.raw_os_error()
        );
    }

    #[test]
    fn zero_copy_commands_name_the_tags_buffer_entry() {
        assert_eq!(auto_buf_sqe_addr(0), 0);
        assert_eq!(auto_buf_sqe_addr(127), 127);
        // No flags (no fallback), reserved fields zero.
        assert_eq!(auto_buf_sqe_addr(u16::MAX) >> 16, 0);
        assert_eq!(DataMode::of(0), DataMode::Buffers);
        assert_eq!(DataMode::of(UBLK_F_USER_COPY), DataMode::UserCopy);
        assert_eq!(
            DataMode::of(UBLK_F_AUTO_BUF_REG | UBLK_F_USER_RECOVERY),
            DataMode::ZeroCopy
        );
    }

    #[test]
    fn user_copy_offsets() {
        assert_eq!(user_copy_offset(0, 0), 0x8000_0000);
        assert_eq!(user_copy_offset(0, 1), 0x8000_0000 + (1 << 25));
        assert_eq!(user_copy_offset(1, 0), 0x8000_0000 + (1 << 41));
        assert_eq!(
            user_copy_offset(3, 4095),
            0x8000_0000 + (3 << 41) + (4095 << 25)
        );
    }

    #[test]
    fn io_cmd_encoding() {
        let b = io_cmd_bytes(&UblksrvIoCmd {
            q_id: 1,
            tag: 2,
            result: -5,
            addr: 0xabcd,
        });
        assert_eq!(&b[0..2], &1u16.to_ne_bytes());
        assert_eq!(&b[2..4], &2u16.to_ne_bytes());
        assert_eq!(&b[4..8], &(-5i32).to_ne_bytes());
        assert_eq!(&b[8..16], &0xabcdu64.to_ne_bytes());
    }
}
