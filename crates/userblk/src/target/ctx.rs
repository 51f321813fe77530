//! One request as a target sees it: the request, its data, and the
//! frontend thread's ring.
//!
//! [`Ctx`] is the only way targets touch the ring, so buffer addresses
//! handed to the kernel always come from the request's own buffer (memory,
//! or a registered-buffer entry under zero copy). Filters get a little
//! more: a timer on the ring ([`Ctx::timeout`]), a per-request instant per
//! filter layer ([`Ctx::mark`]), and a way to show their inner target a
//! changed request ([`Ctx::with_request`]).
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};
use rustix::fs::FallocateFlags;
use rustix::io::{Errno, ReadWriteFlags};

use crate::io::ring::UserData;
use crate::io::{AlignedBuf, Deferred, Ring};
use crate::target::{Op, Request};

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
        if req.op == Op::Write {
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
        let len = self.data_len_u32();
        self.read_at_part(fd, file_offset, 0, len, step)
    }

    /// Queue a write of the request's data to `fd` at `file_offset`; `flags` may add `RWF_DSYNC` for FUA.
    pub fn write_at(
        &mut self,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        flags: ReadWriteFlags,
        step: u16,
    ) -> Result<(), Errno> {
        let len = self.data_len_u32();
        self.write_at_part(fd, file_offset, (0, len), flags, step)
    }

    /// Where bytes `[buf_offset, buf_offset + len)` of the request's data
    /// are, as io_uring takes a buffer address for a plain (`Mem`) or fixed
    /// (`Fixed`, the entry's index) operation; `EINVAL` past the data.
    fn part(&mut self, buf_offset: u32, len: u32) -> Result<(*mut u8, Option<u16>), Errno> {
        let end = buf_offset.checked_add(len).ok_or(Errno::INVAL)?;
        if end > self.data_len_u32() {
            return Err(Errno::INVAL);
        }
        let at = buf_offset as usize;
        Ok(match &mut self.buf {
            DataBuf::Mem(b) => (b.as_mut_ptr().wrapping_add(at), None),
            // io_uring takes the address as an offset into the entry from `base`.
            DataBuf::Fixed { index, base, .. } => {
                ((*base + u64::from(buf_offset)) as *mut u8, Some(*index))
            }
        })
    }

    /// Queue a read of `len` bytes from `fd` at `file_offset` into the
    /// request's data from byte `buf_offset`: one piece of a request that
    /// maps onto several places (qcow2 clusters). A request may queue
    /// several; each completes on its own at [`crate::Target::complete`].
    pub fn read_at_part(
        &mut self,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        buf_offset: u32,
        len: u32,
        step: u16,
    ) -> Result<(), Errno> {
        debug_assert_eq!(self.req.op, Op::Read);
        let fd = types::Fd(fd.as_raw_fd());
        let e = match self.part(buf_offset, len)? {
            (ptr, None) => opcode::Read::new(fd, ptr, len).offset(file_offset).build(),
            (ptr, Some(index)) => opcode::ReadFixed::new(fd, ptr, len, index)
                .offset(file_offset)
                .build(),
        };
        self.push(e, step)
    }

    /// Queue a write of bytes `[buf_offset, buf_offset + len)` of the
    /// request's data to `fd` at `file_offset` (see [`read_at_part`](Self::read_at_part)).
    pub fn write_at_part(
        &mut self,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        (buf_offset, len): (u32, u32),
        flags: ReadWriteFlags,
        step: u16,
    ) -> Result<(), Errno> {
        debug_assert_eq!(self.req.op, Op::Write);
        let fd = types::Fd(fd.as_raw_fd());
        let rw_flags = flags.bits().cast_signed();
        let e = match self.part(buf_offset, len)? {
            (ptr, None) => opcode::Write::new(fd, ptr.cast_const(), len)
                .offset(file_offset)
                .rw_flags(rw_flags)
                .build(),
            (ptr, Some(index)) => opcode::WriteFixed::new(fd, ptr.cast_const(), len, index)
                .offset(file_offset)
                .rw_flags(rw_flags)
                .build(),
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
        self.ring.set_mark(self.slot, layer);
    }

    /// The instant filter `layer` last [marked](Ctx::mark) for this slot.
    pub fn marked(&self, layer: u8) -> Option<Instant> {
        self.ring.mark(self.slot, layer)
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
pub(crate) mod tests {
    use super::*;

    /// A ring whose registered-buffer entry [`FixedEntry::INDEX`] is
    /// ordinary memory: how host tests run a target as ublk zero copy would
    /// (the kernel registering a request's pages there), without ublk.
    pub(crate) struct FixedEntry {
        // Dropped first: the ring's registration points into `buf`.
        ring: Ring,
        buf: AlignedBuf,
        len: usize,
    }

    impl FixedEntry {
        pub(crate) const INDEX: u16 = 2;

        /// An entry of `len` bytes.
        pub(crate) fn new(len: usize) -> Self {
            let mut ring = Ring::new(8).unwrap();
            ring.register_buffer_table(4).unwrap();
            let mut buf = AlignedBuf::new(len).unwrap();
            // SAFETY: `buf` lives in the same struct as the ring and is
            // dropped after it (field order); its memory never moves.
            unsafe { ring.register_buffer(Self::INDEX, buf.prefix_mut(len)) }.unwrap();
            FixedEntry { ring, buf, len }
        }

        /// The entry's memory (what the "kernel pages" hold).
        pub(crate) fn bytes(&mut self) -> &mut [u8] {
            self.buf.prefix_mut(self.len)
        }

        /// Run `req` on `target` with its data in the entry, as under zero copy.
        pub(crate) fn run(
            &mut self,
            target: &dyn crate::Target,
            req: Request,
        ) -> crate::target::IoResult {
            let outcome = self.start(target, req);
            self.finish(target, req, outcome)
        }

        fn entry(&self) -> (u16, u64, u32) {
            let base = self.buf.as_ptr() as u64;
            (Self::INDEX, base, u32::try_from(self.len).unwrap())
        }

        /// Only submit `req` (data in the entry): what the target queued
        /// stays in flight until [`finish`](Self::finish), so a test can
        /// look at the target meanwhile.
        pub(crate) fn start(&mut self, target: &dyn crate::Target, req: Request) -> crate::Submit {
            let (index, base, len) = self.entry();
            // SAFETY: the entry stays registered (`self.buf` lives as long
            // as the ring) and `finish` reaps every operation.
            target.submit(&mut unsafe { Ctx::new_fixed(req, 1, index, base, len, &mut self.ring) })
        }

        /// Reap every ring operation without showing the target: as the
        /// slot machine does for a request a layer above already answered.
        pub(crate) fn reap_unseen(&mut self) {
            let mut out = Vec::new();
            while self.ring.in_flight() > 0 {
                self.ring.submit_and_wait(1).unwrap();
                self.ring.reap(&mut out);
            }
        }

        /// Drive `req`, which [`start`](Self::start) began with `outcome`, to its result.
        pub(crate) fn finish(
            &mut self,
            target: &dyn crate::Target,
            req: Request,
            outcome: crate::Submit,
        ) -> crate::target::IoResult {
            let entry = self.entry();
            let r = drive_fixed(target, &mut self.ring, req, entry, outcome);
            assert_eq!(self.ring.in_flight(), 0, "{req:?} left operations behind");
            r
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
        let outcome = target.submit(&mut unsafe { Ctx::new_fixed(req, 1, index, base, len, ring) });
        drive_fixed(target, ring, req, (index, base, len), outcome)
    }

    /// Carry on with `req`, submitted through a zero-copy context (see
    /// `run_fixed`) and answered `outcome`, until it is done and all its
    /// ring work reaped.
    fn drive_fixed(
        target: &dyn crate::Target,
        ring: &mut Ring,
        req: Request,
        (index, base, len): (u16, u64, u32),
        mut outcome: crate::Submit,
    ) -> crate::target::IoResult {
        // Completions reaped but not yet handed to the target, in order.
        let mut out = std::collections::VecDeque::new();
        let mut reaped = Vec::new();
        loop {
            if let crate::Submit::Done(r) = outcome {
                // As the slot machine does: an answered request's leftover
                // ring work is reaped (and not shown to the target).
                while ring.slot_ops(1) > 0 {
                    ring.submit_and_wait(1).unwrap();
                    ring.reap(&mut reaped);
                }
                return r;
            }
            while out.is_empty() {
                ring.submit_and_wait(1).unwrap();
                ring.reap(&mut reaped);
                out.extend(reaped.drain(..));
            }
            let Some((UserData::Target { step, .. }, res)) = out.pop_front() else {
                panic!("unexpected completion {out:?}");
            };
            // SAFETY: as above.
            let mut ctx = unsafe { Ctx::new_fixed(req, 1, index, base, len, ring) };
            outcome = target.complete(&mut ctx, step, res);
        }
    }

    #[test]
    fn parts_of_a_request_land_at_their_offsets() {
        use std::os::fd::AsFd;
        let fd = rustix::fs::memfd_create("parts", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let file: Vec<u8> = (0..16384u32).map(|i| (i % 249) as u8).collect();
        crate::io::fd::write_all(fd.as_fd(), &file, 0).unwrap();
        let mut ring = Ring::new(8).unwrap();
        let mut buf = AlignedBuf::new(8192).unwrap();
        let read = Request::new(Op::Read, 0, 8192);
        {
            // SAFETY: every operation is reaped below, before `buf` and `ring` go.
            let mut ctx = unsafe { Ctx::new(read, 2, &mut buf, &mut ring) };
            ctx.read_at_part(fd.as_fd(), 12288, 0, 4096, 1).unwrap();
            ctx.read_at_part(fd.as_fd(), 512, 4096, 4096, 2).unwrap();
            // Past the request's data: refused, nothing queued.
            assert_eq!(
                ctx.read_at_part(fd.as_fd(), 0, 4096, 8192, 3),
                Err(Errno::INVAL)
            );
            assert_eq!(
                ctx.read_at_part(fd.as_fd(), 0, u32::MAX, 2, 3),
                Err(Errno::INVAL)
            );
        }
        let mut out = Vec::new();
        while out.len() < 2 {
            ring.submit_and_wait(1).unwrap();
            ring.reap(&mut out);
        }
        assert!(out.iter().all(|&(_, res)| res == 4096), "{out:?}");
        assert_eq!(ring.slot_ops(2), 0);
        assert_eq!(buf.as_slice()[..4096], file[12288..]);
        assert_eq!(buf.as_slice()[4096..8192], file[512..4608]);
        // And the other way: the second half of a write's data to the file.
        buf.prefix_mut(8192)[4096..].fill(0x5a);
        let write = Request::new(Op::Write, 0, 8192);
        {
            // SAFETY: as above.
            let mut ctx = unsafe { Ctx::new(write, 2, &mut buf, &mut ring) };
            ctx.write_at_part(fd.as_fd(), 0, (4096, 4096), ReadWriteFlags::empty(), 1)
                .unwrap();
        }
        out.clear();
        while out.is_empty() {
            ring.submit_and_wait(1).unwrap();
            ring.reap(&mut out);
        }
        assert_eq!(out[0].1, 4096);
        let mut back = vec![0u8; 4096];
        crate::io::fd::read_exact(fd.as_fd(), &mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0x5a));
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
