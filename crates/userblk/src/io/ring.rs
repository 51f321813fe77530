//! The per-thread io_uring and the request context targets queue work through.
//!
//! Each frontend thread owns one [`Ring`]. Entries carry a [`UserData`] that
//! says whether the completion belongs to the frontend (a ublk command) or
//! to a target operation for a slot, and which step of that request it was.
//! [`Ctx`] is the only way targets touch the ring, so buffer addresses handed
//! to the kernel always come from the slot's own buffer.
//!
//! Targets whose work happens on threads of their own (network targets)
//! take a [`Deferred`] from [`Ctx::defer`]: its completion is posted to the
//! ring's mailbox and reaped like any ring completion, so frontends need
//! no second way of waiting.
//!
//! Filters get a little more: a timer on the ring ([`Ctx::timeout`]), a
//! per-request instant per filter layer ([`Ctx::mark`]), and a way to show
//! their inner target a changed request ([`Ctx::with_request`]). The ring
//! keeps this per slot, allocated on a slot's first use and reused after.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use rustix::fs::FallocateFlags;
use rustix::io::{Errno, ReadWriteFlags};

use crate::io::AlignedBuf;
use crate::target::{Op, Request};

/// Who a completion belongs to, packed into the 64-bit `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserData {
    /// The frontend's own command for a slot (a ublk FETCH or COMMIT).
    Frontend {
        /// Slot (tag).
        slot: u16,
    },
    /// A target operation queued for a slot.
    Target {
        /// Slot (tag).
        slot: u16,
        /// The target's step number for multi-step requests.
        step: u16,
    },
}

const TARGET_BIT: u64 = 1 << 63;
/// The mailbox eventfd's poll: ring-internal, never handed to a frontend.
const MAILBOX_UD: u64 = 1 << 62;

impl UserData {
    /// Pack for an SQE.
    pub const fn pack(self) -> u64 {
        match self {
            UserData::Frontend { slot } => slot as u64,
            UserData::Target { slot, step } => TARGET_BIT | ((step as u64) << 16) | slot as u64,
        }
    }

    /// Unpack from a CQE.
    pub const fn unpack(v: u64) -> Self {
        let slot = (v & 0xffff) as u16;
        if v & TARGET_BIT != 0 {
            UserData::Target {
                slot,
                step: ((v >> 16) & 0xffff) as u16,
            }
        } else {
            UserData::Frontend { slot }
        }
    }
}

/// One thread's io_uring.
pub struct Ring {
    ring: IoUring,
    /// Operations pushed (or deferred) whose completion has not been reaped yet.
    in_flight: usize,
    /// Completions posted by other threads; made on first use.
    mailbox: Option<Arc<Mailbox>>,
    /// The mailbox's eventfd poll is in the ring.
    mailbox_armed: bool,
    /// Deferred operations not yet delivered.
    deferred: usize,
    /// Target operations outstanding per slot (grown on demand).
    slot_ops: Vec<u32>,
    /// What filters keep per slot (grown on demand; boxed so a queued
    /// timeout's timespec does not move when the table grows).
    extras: Vec<Option<Box<SlotExtra>>>,
}

/// Per-slot state the ring keeps for filters.
struct SlotExtra {
    /// The duration of the slot's queued timeout; the kernel reads it when
    /// the entry is submitted.
    timespec: types::Timespec,
    /// The step of the slot's queued timeout, until its completion is reaped.
    timer: Option<u16>,
    /// Instants recorded by filter layers ([`Ctx::mark`]), by layer.
    marks: Vec<Option<Instant>>,
}

/// Where [`Deferred`] completions wait for the ring's thread.
#[derive(Debug)]
struct Mailbox {
    eventfd: OwnedFd,
    posted: Mutex<Vec<(u64, i32)>>,
}

impl Mailbox {
    fn post(&self, user_data: u64, res: i32) {
        match self.posted.lock() {
            Ok(mut q) => q.push((user_data, res)),
            Err(poisoned) => poisoned.into_inner().push((user_data, res)),
        }
        // Cannot fail short of a full counter (2^64 - 2 posts unread).
        let _ = rustix::io::write(&self.eventfd, &1u64.to_ne_bytes());
    }

    fn take(&self, out: &mut Vec<(UserData, i32)>) -> usize {
        let mut counter = [0u8; 8];
        let _ = rustix::io::read(&self.eventfd, &mut counter);
        let mut q = match self.posted.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        };
        let n = q.len();
        out.extend(q.drain(..).map(|(ud, res)| (UserData::unpack(ud), res)));
        n
    }
}

/// A target operation finished by another thread: the request's buffer,
/// lent to that thread, and the way to report the result to the ring.
///
/// Dropping it without [`complete`](Self::complete) completes it with
/// `-EIO`, so a request is never lost.
pub struct Deferred {
    mailbox: Arc<Mailbox>,
    user_data: u64,
    buf: *mut u8,
    len: usize,
    done: bool,
}

// SAFETY: the buffer is lent to whichever thread holds the Deferred: the
// frontend does not touch it until the completion is reaped (the contract of
// `Ctx::new`), and the mailbox is a Mutex and an eventfd.
unsafe impl Send for Deferred {}

impl Deferred {
    /// The request's data: a write's payload, or where a read's data goes.
    pub fn data(&self) -> &[u8] {
        // SAFETY: `buf` points to `len` bytes of the request's buffer, which
        // the frontend keeps allocated and untouched until completion.
        unsafe { std::slice::from_raw_parts(self.buf, self.len) }
    }

    /// The request's data, to fill for a read.
    pub fn data_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `data`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.buf, self.len) }
    }

    /// Report the result (a byte count or `-errno`, as a ring completion)
    /// to the ring's thread, which passes it to [`crate::Target::complete`].
    pub fn complete(mut self, res: i32) {
        self.done = true;
        self.mailbox.post(self.user_data, res);
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        if !self.done {
            self.mailbox.post(self.user_data, -Errno::IO.raw_os_error());
        }
    }
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deferred")
            .field("user_data", &UserData::unpack(self.user_data))
            .field("len", &self.len)
            .finish()
    }
}

/// Environment variable choosing the ring set-up flags: `defer` (the
/// default: `SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN`), `coop`
/// (`COOP_TASKRUN` only) or `plain` (none). For benchmarks.
pub const RING_SETUP_ENV: &str = "USERBLK_RING_SETUP";

impl Ring {
    /// A ring with `entries` submission slots (the completion queue is twice that).
    ///
    /// Set-up flags suit one issuing thread (`SINGLE_ISSUER`, `DEFER_TASKRUN`,
    /// `COOP_TASKRUN`); kernels without them get a plain ring.
    /// [`RING_SETUP_ENV`] (`coop` or `plain`) asks for fewer flags, to
    /// measure what they are worth.
    pub fn new(entries: u32) -> crate::Result<Self> {
        let entries = entries.clamp(8, 4096).next_power_of_two();
        let attempts: [fn(&mut io_uring::Builder); 3] = [
            |b| {
                b.setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_coop_taskrun();
            },
            |b| {
                b.setup_coop_taskrun();
            },
            |_| {},
        ];
        let first = match std::env::var(RING_SETUP_ENV).as_deref() {
            Ok("coop") => 1,
            Ok("plain") => 2,
            _ => 0,
        };
        let mut last = None;
        for setup in attempts.into_iter().skip(first) {
            let mut builder = IoUring::builder();
            builder.setup_cqsize(entries * 2);
            setup(&mut builder);
            match builder.build(entries) {
                Ok(ring) => {
                    return Ok(Ring {
                        ring,
                        in_flight: 0,
                        mailbox: None,
                        mailbox_armed: false,
                        deferred: 0,
                        slot_ops: Vec::new(),
                        extras: Vec::new(),
                    })
                }
                Err(e) if e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => last = Some(e),
                Err(e) => return Err(crate::Error::io("io_uring_setup", e)),
            }
        }
        Err(crate::Error::io(
            "io_uring_setup",
            last.unwrap_or_else(|| io::Error::other("no ring flags accepted")),
        ))
    }

    /// Register `fd` as fixed file 0, so entries can name it with
    /// `types::Fixed(0)` and the kernel skips looking the descriptor up on
    /// every operation. The caller keeps `fd` open for the ring's life.
    pub fn register_file(&mut self, fd: BorrowedFd<'_>) -> Result<(), Errno> {
        use std::os::fd::AsRawFd;
        self.ring
            .submitter()
            .register_files(&[fd.as_raw_fd()])
            .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::INVAL))
    }

    /// Give the ring an empty registered-buffer table of `entries` slots,
    /// for buffers the kernel registers itself (ublk's automatic buffer
    /// registration puts each request's pages there).
    pub fn register_buffer_table(&mut self, entries: u32) -> Result<(), Errno> {
        self.ring
            .submitter()
            .register_buffers_sparse(entries)
            .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::INVAL))
    }

    /// Put user memory `buf` at entry `index` of the registered-buffer
    /// table (made by [`register_buffer_table`](Self::register_buffer_table)).
    ///
    /// # Safety
    /// `buf` must stay allocated until the entry is replaced or the ring is
    /// dropped.
    pub unsafe fn register_buffer(&mut self, index: u16, buf: &mut [u8]) -> Result<(), Errno> {
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the caller keeps `buf` alive while it is registered.
        unsafe {
            self.ring
                .submitter()
                .register_buffers_update(u32::from(index), &[iov], None)
        }
        .map(|_| ())
        .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::INVAL))
    }

    /// Queue an entry, submitting first if the submission queue is full.
    ///
    /// # Safety
    /// Every buffer and file the entry refers to must stay valid until its
    /// completion has been reaped.
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> Result<(), Errno> {
        for _ in 0..2 {
            // SAFETY: the caller guarantees what the entry points to outlives the operation.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                self.in_flight += 1;
                return Ok(());
            }
            self.ring
                .submit()
                .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
        }
        Err(Errno::BUSY)
    }

    /// Submit what is queued and wait for at least `want` completions.
    pub fn submit_and_wait(&mut self, want: usize) -> crate::Result<()> {
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(code) if code == Errno::INTR.raw_os_error() || code == Errno::AGAIN.raw_os_error() || code == Errno::BUSY.raw_os_error()) => {
                Ok(())
            }
            Err(e) => Err(crate::Error::io("io_uring_enter", e)),
        }
    }

    /// Submit what is queued without waiting.
    pub fn submit(&mut self) -> crate::Result<()> {
        self.submit_and_wait(0)
    }

    /// Move every available completion into `out` as `(user_data, res)`,
    /// including [`Deferred`] completions posted by other threads.
    pub fn reap(&mut self, out: &mut Vec<(UserData, i32)>) {
        let mut mail = false;
        let first = out.len();
        for cqe in self.ring.completion() {
            if cqe.user_data() == MAILBOX_UD {
                self.mailbox_armed = false;
                mail = true;
                continue;
            }
            self.in_flight = self.in_flight.saturating_sub(1);
            out.push((UserData::unpack(cqe.user_data()), cqe.result()));
        }
        if mail {
            if let Some(mb) = self.mailbox.clone() {
                let n = mb.take(out);
                self.in_flight = self.in_flight.saturating_sub(n);
                self.deferred = self.deferred.saturating_sub(n);
            }
        }
        for (ud, _) in &out[first..] {
            if let UserData::Target { slot, step } = ud {
                if let Some(c) = self.slot_ops.get_mut(usize::from(*slot)) {
                    *c = c.saturating_sub(1);
                }
                if let Some(Some(x)) = self.extras.get_mut(usize::from(*slot)) {
                    if x.timer == Some(*step) {
                        x.timer = None;
                    }
                }
            }
        }
        if mail && self.deferred > 0 {
            if let Err(e) = self.arm_mailbox() {
                tracing::error!("ring: re-arming the mailbox poll: {e}");
            }
        }
    }

    /// Target operations queued for `slot` whose completion has not been reaped.
    pub fn slot_ops(&self, slot: u16) -> u32 {
        self.slot_ops.get(usize::from(slot)).copied().unwrap_or(0)
    }

    fn note_slot_op(&mut self, slot: u16) {
        let i = usize::from(slot);
        if self.slot_ops.len() <= i {
            self.slot_ops.resize(i + 1, 0);
        }
        self.slot_ops[i] += 1;
    }

    /// `slot`'s filter state, made on first use.
    fn extra(&mut self, slot: u16) -> &mut SlotExtra {
        let i = usize::from(slot);
        if self.extras.len() <= i {
            self.extras.resize_with(i + 1, || None);
        }
        self.extras[i].get_or_insert_with(|| {
            Box::new(SlotExtra {
                timespec: types::Timespec::new(),
                timer: None,
                marks: Vec::new(),
            })
        })
    }

    /// Queue a timeout of `after` for `slot` with `user_data`.
    fn timeout(
        &mut self,
        slot: u16,
        step: u16,
        after: Duration,
        user_data: u64,
    ) -> Result<(), Errno> {
        let x = self.extra(slot);
        if x.timer.is_some() {
            // Its timespec may not have been read by the kernel yet.
            return Err(Errno::BUSY);
        }
        x.timespec = types::Timespec::from(after);
        let ts: *const types::Timespec = &x.timespec;
        // A pure timer: count 0 means only expiry completes it (with -ETIME).
        let e = opcode::Timeout::new(ts).build().user_data(user_data);
        // SAFETY: `ts` points into this slot's boxed SlotExtra, which the
        // ring owns and never frees or moves while it lives (growing the
        // table moves only the box pointers); the slot has no other timeout
        // queued (checked above), so nothing rewrites the timespec until
        // this one's completion is reaped, and the kernel reads it no later
        // than at submission.
        unsafe { self.push(&e) }?;
        self.extra(slot).timer = Some(step);
        self.note_slot_op(slot);
        Ok(())
    }

    /// Start an operation completed by another thread through a [`Deferred`].
    fn defer(&mut self, user_data: u64, buf: *mut u8, len: usize) -> Result<Deferred, Errno> {
        let mailbox = match &self.mailbox {
            Some(mb) => mb.clone(),
            None => {
                let eventfd = rustix::event::eventfd(
                    0,
                    rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
                )?;
                let mb = Arc::new(Mailbox {
                    eventfd,
                    posted: Mutex::new(Vec::new()),
                });
                self.mailbox = Some(mb.clone());
                mb
            }
        };
        if !self.mailbox_armed {
            self.arm_mailbox()?;
        }
        self.in_flight += 1;
        self.deferred += 1;
        if let UserData::Target { slot, .. } = UserData::unpack(user_data) {
            self.note_slot_op(slot);
        }
        Ok(Deferred {
            mailbox,
            user_data,
            buf,
            len,
            done: false,
        })
    }

    fn arm_mailbox(&mut self) -> Result<(), Errno> {
        let Some(mb) = &self.mailbox else {
            return Ok(());
        };
        let e = opcode::PollAdd::new(
            types::Fd(mb.eventfd.as_raw_fd()),
            rustix::event::PollFlags::IN.bits().into(),
        )
        .build()
        .user_data(MAILBOX_UD);
        // SAFETY: the eventfd lives in `self.mailbox` as long as the ring; no buffer is involved.
        unsafe { self.push(&e) }?;
        // The poll is bookkeeping, not an operation anyone waits for.
        self.in_flight -= 1;
        self.mailbox_armed = true;
        Ok(())
    }

    /// Queue a one-shot poll for `fd` becoming readable; it completes as
    /// [`UserData::Frontend`] with `slot`. For frontends that wait on a
    /// socket and their targets' work at once.
    pub fn poll_readable(&mut self, fd: BorrowedFd<'_>, slot: u16) -> Result<(), Errno> {
        let e = opcode::PollAdd::new(
            types::Fd(fd.as_raw_fd()),
            rustix::event::PollFlags::IN.bits().into(),
        )
        .build()
        .user_data(UserData::Frontend { slot }.pack());
        // SAFETY: no buffer is involved, and io_uring holds its own
        // reference to the file for as long as the poll is armed.
        unsafe { self.push(&e) }
    }

    /// Operations queued or running whose completion has not been reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("fd", &self.ring.as_raw_fd())
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

/// Where a request's data is.
enum DataBuf<'a> {
    /// A buffer of the frontend's.
    Mem(&'a mut AlignedBuf),
    /// A buffer in the ring's registered-buffer table (zero copy): entry
    /// `index`, `len` bytes, whose first byte io_uring knows as address
    /// `base` (0 for pages the kernel registered, the address for user memory).
    Fixed { index: u16, base: u64, len: u32 },
}

/// One request as a target sees it: the request, its data buffer, and the
/// thread's ring for io_uring-native targets.
pub struct Ctx<'a> {
    req: Request,
    slot: u16,
    buf: DataBuf<'a>,
    ring: &'a mut Ring,
}

impl<'a> Ctx<'a> {
    /// Build the context for `slot`'s request.
    ///
    /// # Safety
    /// `buf` must stay allocated, and must not be read or written by anyone
    /// else, until every operation queued through this context (and through
    /// later contexts for the same request) has completed and been reaped.
    /// `req.len` must not exceed `buf.len()` for reads and writes.
    pub unsafe fn new(
        req: Request,
        slot: u16,
        buf: &'a mut AlignedBuf,
        ring: &'a mut Ring,
    ) -> Self {
        buf.fault_in_once();
        if req.op == crate::target::Op::Write {
            // The frontend put the payload there.
            buf.mark_written(usize::try_from(req.len).unwrap_or(usize::MAX));
        }
        Ctx {
            req,
            slot,
            buf: DataBuf::Mem(buf),
            ring,
        }
    }

    /// Build the context for `slot`'s request whose data is entry `index`
    /// of the ring's registered-buffer table (zero copy): `len` bytes that
    /// io_uring addresses from `base` (0 for a buffer the kernel registered,
    /// such as a ublk request's pages; the buffer's address for user memory).
    /// Only [`read_at`](Self::read_at) and [`write_at`](Self::write_at) reach
    /// such data, so it suits targets whose
    /// [`data_on_ring_only`](crate::Target::data_on_ring_only) is true; to
    /// others it looks empty.
    ///
    /// # Safety
    /// The entry must stay registered, and its memory must not be touched
    /// by anyone else, until every operation queued through this context
    /// (and later contexts for the same request) has completed and been
    /// reaped. `req.len` must not exceed `len` for reads and writes.
    pub unsafe fn new_fixed(
        req: Request,
        slot: u16,
        index: u16,
        base: u64,
        len: u32,
        ring: &'a mut Ring,
    ) -> Self {
        Ctx {
            req,
            slot,
            buf: DataBuf::Fixed { index, base, len },
            ring,
        }
    }

    /// Whether the data is in memory this thread can touch ([`data`](Self::data),
    /// [`data_mut`](Self::data_mut)); false under zero copy.
    pub fn has_data_buffer(&self) -> bool {
        matches!(self.buf, DataBuf::Mem(_))
    }

    /// The request.
    pub fn req(&self) -> &Request {
        &self.req
    }

    /// The slot (ublk tag) this request occupies.
    pub fn slot(&self) -> u16 {
        self.slot
    }

    /// Bytes a successful completion reports: `len` for reads and writes, 0 otherwise.
    pub fn done_bytes(&self) -> u32 {
        if self.req.op.has_data() {
            self.req.len
        } else {
            0
        }
    }

    fn data_len(&self) -> usize {
        self.data_len_u32() as usize
    }

    fn data_len_u32(&self) -> u32 {
        if !self.req.op.has_data() {
            return 0;
        }
        let room = match &self.buf {
            DataBuf::Mem(b) => u32::try_from(b.len()).unwrap_or(u32::MAX),
            DataBuf::Fixed { len, .. } => *len,
        };
        self.req.len.min(room)
    }

    /// The data of a write (empty for other ops, and under zero copy).
    pub fn data(&self) -> &[u8] {
        let n = self.data_len();
        match &self.buf {
            DataBuf::Mem(b) => &b.as_slice()[..n],
            DataBuf::Fixed { .. } => &[],
        }
    }

    /// Where a read's data goes (empty for ops without data, and under zero copy).
    pub fn data_mut(&mut self) -> &mut [u8] {
        let n = self.data_len();
        match &mut self.buf {
            DataBuf::Mem(b) => b.prefix_mut(n),
            DataBuf::Fixed { .. } => &mut [],
        }
    }

    /// Answer a read with zeroes. Cheaper than filling
    /// [`data_mut`](Self::data_mut): the buffer knows which of its bytes
    /// may not be zero, and a buffer that last served a zero read is
    /// left alone. (Under zero copy there is no buffer here to zero; such
    /// contexts go only to targets that never call it.)
    pub fn zero_data(&mut self) {
        let n = self.data_len();
        match &mut self.buf {
            DataBuf::Mem(b) => b.zero_prefix(n),
            DataBuf::Fixed { .. } => {
                debug_assert!(false, "zero_data under zero copy");
                tracing::error!("zero_data on a zero-copy request: its data is not ours to zero");
            }
        }
    }

    fn push(&mut self, entry: squeue::Entry, step: u16) -> Result<(), Errno> {
        let entry = entry.user_data(
            UserData::Target {
                slot: self.slot,
                step,
            }
            .pack(),
        );
        // SAFETY: buffer addresses in `entry` come from `self.buf`: memory or
        // a registered-buffer entry, which the frontend keeps alive and
        // untouched until the completion is reaped (the contract of
        // `Ctx::new` and `Ctx::new_fixed`).
        unsafe { self.ring.push(&entry) }?;
        self.ring.note_slot_op(self.slot);
        Ok(())
    }

    /// Queue a read of the request's `len` bytes from `fd` at `file_offset` into the buffer.
    pub fn read_at(
        &mut self,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        step: u16,
    ) -> Result<(), Errno> {
        debug_assert_eq!(self.req.op, Op::Read);
        let len = self.data_len_u32();
        let fd = types::Fd(fd.as_raw_fd());
        let e = match &mut self.buf {
            DataBuf::Mem(b) => opcode::Read::new(fd, b.as_mut_ptr(), len)
                .offset(file_offset)
                .build(),
            // io_uring takes the address as an offset into the entry from `base`.
            DataBuf::Fixed { index, base, .. } => {
                opcode::ReadFixed::new(fd, *base as *mut u8, len, *index)
                    .offset(file_offset)
                    .build()
            }
        };
        self.push(e, step)
    }

    /// Queue a write of the request's data to `fd` at `file_offset`; `flags` may add `RWF_DSYNC` for FUA.
    pub fn write_at(
        &mut self,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        flags: ReadWriteFlags,
        step: u16,
    ) -> Result<(), Errno> {
        debug_assert_eq!(self.req.op, Op::Write);
        let len = self.data_len_u32();
        let fd = types::Fd(fd.as_raw_fd());
        let rw_flags = flags.bits().cast_signed();
        let e = match &self.buf {
            DataBuf::Mem(b) => opcode::Write::new(fd, b.as_ptr(), len)
                .offset(file_offset)
                .rw_flags(rw_flags)
                .build(),
            DataBuf::Fixed { index, base, .. } => {
                opcode::WriteFixed::new(fd, *base as *const u8, len, *index)
                    .offset(file_offset)
                    .rw_flags(rw_flags)
                    .build()
            }
        };
        self.push(e, step)
    }

    /// Run `f` with this context showing `req` instead of the request, then
    /// put the request back: how a filter hands its inner target a request
    /// as that target sees it (another offset, a shorter length). The data
    /// buffer stays the same: a read or write still starts at its first
    /// byte, and a length beyond the buffer is cut to the buffer.
    ///
    /// A filter calls it on `submit` and again on every `complete` it
    /// passes down, with the same rewritten request: the frontend always
    /// builds the context from its own, original request.
    pub fn with_request<R>(&mut self, req: Request, f: impl FnOnce(&mut Ctx<'_>) -> R) -> R {
        let outer = std::mem::replace(&mut self.req, req);
        let r = f(self);
        self.req = outer;
        r
    }

    /// Queue a timer on the ring that completes after `after` (with
    /// `-ETIME`, the normal expiry), arriving at [`crate::Target::complete`]
    /// with `step`. For filters that hold a request back (delays, rate
    /// limits) without blocking the thread: the other requests of the ring
    /// keep flowing meanwhile. One timer per request at a time (`EBUSY` otherwise).
    pub fn timeout(&mut self, after: Duration, step: u16) -> Result<(), Errno> {
        let ud = UserData::Target {
            slot: self.slot,
            step,
        }
        .pack();
        self.ring.timeout(self.slot, step, after, ud)
    }

    /// Record the current instant for filter `layer` of this request (its
    /// start, as that layer sees it); read back by [`Ctx::marked`] in a later
    /// call for the same request. Allocation-free after a slot's first use.
    pub fn mark(&mut self, layer: u8) {
        let marks = &mut self.ring.extra(self.slot).marks;
        let i = usize::from(layer);
        if marks.len() <= i {
            marks.resize(i + 1, None);
        }
        marks[i] = Some(Instant::now());
    }

    /// The instant filter `layer` last [marked](Ctx::mark) for this slot.
    pub fn marked(&self, layer: u8) -> Option<Instant> {
        let x = self.ring.extras.get(usize::from(self.slot))?.as_ref()?;
        x.marks.get(usize::from(layer)).copied().flatten()
    }

    /// Hand the request to another thread: the returned [`Deferred`] lends
    /// it the request's data, and its [`complete`](Deferred::complete)
    /// arrives at [`crate::Target::complete`] with `step`, on this thread.
    pub fn defer(&mut self, step: u16) -> Result<Deferred, Errno> {
        let ud = UserData::Target {
            slot: self.slot,
            step,
        }
        .pack();
        let (buf, len) = match &mut self.buf {
            DataBuf::Mem(b) => (b.as_mut_ptr(), self.data_len_u32() as usize),
            // Another thread cannot reach a registered buffer: lend nothing.
            DataBuf::Fixed { .. } => (std::ptr::null_mut(), 0),
        };
        self.ring.defer(ud, buf, len)
    }

    /// Queue `fsync` (or `fdatasync` when `datasync`) of `fd`.
    pub fn fsync(&mut self, fd: BorrowedFd<'_>, datasync: bool, step: u16) -> Result<(), Errno> {
        let flags = if datasync {
            types::FsyncFlags::DATASYNC
        } else {
            types::FsyncFlags::empty()
        };
        let e = opcode::Fsync::new(types::Fd(fd.as_raw_fd()))
            .flags(flags)
            .build();
        self.push(e, step)
    }

    /// Queue `fallocate(fd, mode, offset, len)`.
    pub fn fallocate(
        &mut self,
        fd: BorrowedFd<'_>,
        mode: FallocateFlags,
        offset: u64,
        len: u64,
        step: u16,
    ) -> Result<(), Errno> {
        let e = opcode::Fallocate::new(types::Fd(fd.as_raw_fd()), len)
            .offset(offset)
            .mode(mode.bits().cast_signed())
            .build();
        self.push(e, step)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        for ud in [
            UserData::Frontend { slot: 0 },
            UserData::Frontend { slot: 4095 },
            UserData::Target { slot: 0, step: 0 },
            UserData::Target { slot: 17, step: 3 },
            UserData::Target {
                slot: u16::MAX,
                step: u16::MAX,
            },
        ] {
            assert_eq!(UserData::unpack(ud.pack()), ud);
        }
    }

    #[test]
    fn timers_marks_and_rewritten_requests() {
        let mut ring = Ring::new(8).unwrap();
        let mut buf = AlignedBuf::new(4096).unwrap();
        let req = Request::new(Op::Read, 8192, 4096);
        // SAFETY: only timers are queued (no buffer addresses), and they are
        // reaped below, before `buf` and `ring` go.
        let mut ctx = unsafe { Ctx::new(req, 3, &mut buf, &mut ring) };

        // The inner view of a request, and the outer one back afterwards.
        let inner = Request::new(Op::Read, 1 << 20, 512);
        let seen = ctx.with_request(inner, |c| (*c.req(), c.data().len()));
        assert_eq!(seen, (inner, 512));
        assert_eq!((*ctx.req(), ctx.data().len()), (req, 4096));

        // Marks are per layer and per slot.
        assert_eq!(ctx.marked(2), None);
        ctx.mark(2);
        let m = ctx.marked(2);
        assert!(m.is_some() && ctx.marked(0).is_none() && ctx.marked(7).is_none());

        // One timer per slot until its completion is reaped.
        ctx.timeout(Duration::from_millis(5), 9).unwrap();
        assert_eq!(ctx.timeout(Duration::ZERO, 10), Err(Errno::BUSY));
        let start = Instant::now();
        let mut out = Vec::new();
        while out.is_empty() {
            ring.submit_and_wait(1).unwrap();
            ring.reap(&mut out);
        }
        assert!(start.elapsed() >= Duration::from_millis(5));
        let etime = -Errno::TIME.raw_os_error();
        assert_eq!(out, [(UserData::Target { slot: 3, step: 9 }, etime)]);
        assert_eq!((ring.slot_ops(3), ring.in_flight()), (0, 0));
        // SAFETY: as above.
        let mut ctx = unsafe { Ctx::new(req, 3, &mut buf, &mut ring) };
        assert_eq!(ctx.marked(2), m, "the mark is kept across contexts");
        ctx.timeout(Duration::ZERO, 10).unwrap();
        out.clear();
        while out.is_empty() {
            ring.submit_and_wait(1).unwrap();
            ring.reap(&mut out);
        }
        assert_eq!(out, [(UserData::Target { slot: 3, step: 10 }, etime)]);
    }

    /// Run `req` on `target` through a zero-copy context whose data is
    /// registered-buffer entry `index` (user memory at `base`, `len` bytes).
    fn run_fixed(
        target: &dyn crate::Target,
        ring: &mut Ring,
        req: Request,
        (index, base, len): (u16, u64, u32),
    ) -> crate::target::IoResult {
        // SAFETY: the entry stays registered (the caller's buffer outlives
        // this call) and every operation is reaped before returning.
        let mut outcome =
            target.submit(&mut unsafe { Ctx::new_fixed(req, 1, index, base, len, ring) });
        loop {
            match outcome {
                crate::Submit::Done(r) => return r,
                crate::Submit::Pending => {
                    let mut out = Vec::new();
                    while out.is_empty() {
                        ring.submit_and_wait(1).unwrap();
                        ring.reap(&mut out);
                    }
                    let (UserData::Target { step, .. }, res) = out[0] else {
                        panic!("unexpected completion {out:?}");
                    };
                    // SAFETY: as above.
                    let mut ctx = unsafe { Ctx::new_fixed(req, 1, index, base, len, ring) };
                    outcome = target.complete(&mut ctx, step, res);
                }
            }
        }
    }

    #[test]
    fn zero_copy_contexts_use_fixed_buffers() {
        use crate::targets::file::{FileOptions, FileTarget};
        let dir = std::env::temp_dir().join(format!("userblk-zc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.img");
        let pattern: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &pattern).unwrap();
        let target = FileTarget::open(FileOptions {
            path: path.clone(),
            offset: 0,
            buffered: true,
            read_only: false,
        })
        .unwrap();
        assert!(crate::Target::data_on_ring_only(&target));

        let mut ring = Ring::new(8).unwrap();
        ring.register_buffer_table(4).unwrap();
        let mut buf = AlignedBuf::new(8192).unwrap();
        let base = buf.as_ptr() as u64;
        // SAFETY: `buf` outlives the ring's use of it (both live to the end).
        unsafe { ring.register_buffer(2, buf.prefix_mut(8192)) }.unwrap();
        let entry = (2, base, 8192);

        // A read lands in the registered memory, from the file.
        let read = Request::new(Op::Read, 4096, 8192);
        assert_eq!(run_fixed(&target, &mut ring, read, entry), Ok(8192));
        assert_eq!(buf.as_slice()[..8192], pattern[4096..4096 + 8192]);

        // A write goes from it to the file.
        buf.prefix_mut(4096).fill(0xab);
        let write = Request::new(Op::Write, 32768, 4096);
        assert_eq!(run_fixed(&target, &mut ring, write, entry), Ok(4096));
        let now = std::fs::read(&path).unwrap();
        assert!(now[32768..32768 + 4096].iter().all(|&b| b == 0xab));
        assert_eq!(now[..32768], pattern[..32768]);

        // Such data is not reachable as memory through the context.
        // SAFETY: nothing is queued through this context.
        let ctx = unsafe { Ctx::new_fixed(read, 1, 2, base, 8192, &mut ring) };
        assert!(!ctx.has_data_buffer());
        assert!(ctx.data().is_empty());

        // An entry that was never filled: the operation fails, nothing breaks.
        assert!(run_fixed(&target, &mut ring, read, (3, 0, 8192)).is_err());
        drop(ring);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
