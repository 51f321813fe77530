//! The per-thread io_uring and the request context targets queue work through.
//!
//! Each frontend thread owns one [`Ring`]. Entries carry a [`UserData`] that
//! says whether the completion belongs to the frontend (a ublk command) or
//! to a target operation for a slot, and which step of that request it was.
//! Targets reach the ring only through the request context
//! ([`crate::target::Ctx`]), so buffer addresses handed to the kernel
//! always come from the slot's own buffer.
//!
//! Targets whose work happens on threads of their own (network targets)
//! take a [`Deferred`] from [`Ctx::defer`](crate::target::Ctx::defer): its completion is posted to the
//! ring's mailbox and reaped like any ring completion, so frontends need
//! no second way of waiting.
//!
//! For filters the ring also keeps, per slot, one timer and an instant per
//! filter layer, allocated on a slot's first use and reused after.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use rustix::io::Errno;

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
    /// Instants recorded by filter layers ([`Ctx::mark`](crate::target::Ctx::mark)), by layer.
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
        // Nothing lent (a flush, or data in a registered buffer): a null
        // pointer must not make a slice, even an empty one.
        if self.buf.is_null() {
            return &[];
        }
        // SAFETY: `buf` points to `len` bytes of the request's buffer, which
        // the frontend keeps allocated and untouched until completion.
        unsafe { std::slice::from_raw_parts(self.buf, self.len) }
    }

    /// The request's data, to fill for a read.
    pub fn data_mut(&mut self) -> &mut [u8] {
        if self.buf.is_null() {
            return &mut [];
        }
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

    /// Register the provided-buffer ring at `ring_addr` (`entries` entries
    /// of 16 bytes, page-aligned) as buffer group `bgid`, with
    /// `IOU_PBUF_RING_*` `flags`.
    ///
    /// # Safety
    /// The ring memory and every buffer put in it must stay allocated until
    /// the group is unregistered or the ring dropped.
    pub unsafe fn register_buf_ring(
        &mut self,
        ring_addr: u64,
        entries: u16,
        bgid: u16,
        flags: u16,
    ) -> Result<(), Errno> {
        // SAFETY: the caller's promise, passed on.
        unsafe {
            self.ring
                .submitter()
                .register_buf_ring_with_flags(ring_addr, entries, bgid, flags)
        }
        .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::INVAL))
    }

    /// Unregister buffer group `bgid`; the kernel no longer touches its memory.
    pub fn unregister_buf_ring(&mut self, bgid: u16) -> Result<(), Errno> {
        self.ring
            .submitter()
            .unregister_buf_ring(bgid)
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
            // A multishot operation (ublk's batch fetch) stays in flight
            // until its last completion, the one without F_MORE.
            if !io_uring::cqueue::more(cqe.flags()) {
                self.in_flight = self.in_flight.saturating_sub(1);
            }
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

    /// Count one more target operation outstanding for `slot`.
    pub(crate) fn note_slot_op(&mut self, slot: u16) {
        let i = usize::from(slot);
        if self.slot_ops.len() <= i {
            self.slot_ops.resize(i + 1, 0);
        }
        self.slot_ops[i] += 1;
    }

    /// Record the current instant for filter `layer` of `slot`'s request.
    pub(crate) fn set_mark(&mut self, slot: u16, layer: u8) {
        let marks = &mut self.extra(slot).marks;
        let i = usize::from(layer);
        if marks.len() <= i {
            marks.resize(i + 1, None);
        }
        marks[i] = Some(Instant::now());
    }

    /// The instant filter `layer` last marked for `slot`.
    pub(crate) fn mark(&self, slot: u16, layer: u8) -> Option<Instant> {
        let x = self.extras.get(usize::from(slot))?.as_ref()?;
        x.marks.get(usize::from(layer)).copied().flatten()
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

    /// Queue a timeout of `after` for `slot` with `user_data`; one per slot
    /// at a time (`EBUSY` otherwise).
    pub(crate) fn timeout(
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
    pub(crate) fn defer(
        &mut self,
        user_data: u64,
        buf: *mut u8,
        len: usize,
    ) -> Result<Deferred, Errno> {
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

/// `entry` with `sqe->len` set to `len`, a field the io-uring crate sets
/// only for the opcodes it knows a length for (ublk's batch commands carry
/// their element buffer's length there).
pub fn with_len(entry: squeue::Entry, len: u32) -> squeue::Entry {
    let mut entry = entry;
    let sqe: *mut u8 = std::ptr::addr_of_mut!(entry).cast();
    // SAFETY: `Entry` is `#[repr(C)]` around the kernel's 64-byte
    // `struct io_uring_sqe`, whose `len` (u32) is at byte 24, naturally
    // aligned in the 8-byte aligned entry.
    unsafe { sqe.add(24).cast::<u32>().write(len) };
    entry
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("fd", &self.ring.as_raw_fd())
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_length_is_where_the_kernel_reads_it() {
        let e = with_len(opcode::Nop::new().build(), 0x1234_5678);
        // SAFETY: Entry is a 64-byte repr(C) struct of plain integers.
        let b: [u8; 64] = unsafe { std::mem::transmute(e) };
        assert_eq!(b[24..28], 0x1234_5678u32.to_ne_bytes());
    }

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
}
