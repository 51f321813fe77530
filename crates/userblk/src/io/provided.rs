//! A provided buffer for multishot operations: one buffer in a buffer ring
//! of one entry, which the kernel consumes a piece at a time
//! (`IOU_PBUF_RING_INC`), so each completion's data follows the previous
//! one's and the reader only keeps an offset.
//!
//! When the buffer is used up (or anything else ends the multishot
//! operation with `ENOBUFS`), [`ProvidedBuf::reset`] unregisters the group
//! and registers it again with the whole buffer: whatever the kernel did
//! with the ring, it starts over from a known state.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::squeue::{Entry, Flags};
use rustix::io::Errno;

use crate::io::{AlignedBuf, Ring};

/// `IOU_PBUF_RING_INC`: buffers are consumed incrementally (Linux 6.12).
const PBUF_RING_INC: u16 = 1 << 1;
/// `IORING_URING_CMD_MULTISHOT` in `sqe->uring_cmd_flags` (Linux 6.19).
const URING_CMD_MULTISHOT: u32 = 1 << 1;

/// Byte offsets in a 64-byte SQE (`struct io_uring_sqe`).
const SQE_URING_CMD_FLAGS: usize = 28;
const SQE_BUF_GROUP: usize = 40;
/// Byte offset of the ring's tail: the `resv` field of entry 0.
const RING_TAIL: usize = 14;

/// One buffer, provided to the kernel as buffer group `bgid` of a ring.
#[derive(Debug)]
pub struct ProvidedBuf {
    /// The one-entry buffer ring (a page).
    ring_mem: AlignedBuf,
    buf: AlignedBuf,
    bgid: u16,
    /// Bytes of `buf` the kernel has filled and we have read.
    read: usize,
    /// The ring's tail as last published.
    tail: u16,
    registered: bool,
}

impl ProvidedBuf {
    /// A buffer of `len` bytes (rounded up to the page) for group `bgid`;
    /// registered on first [`reset`](Self::reset).
    pub fn new(bgid: u16, len: usize) -> crate::Result<Self> {
        Ok(ProvidedBuf {
            ring_mem: AlignedBuf::new(16)?,
            buf: AlignedBuf::new(len)?,
            bgid,
            read: 0,
            tail: 0,
            registered: false,
        })
    }

    /// The buffer group operations select from.
    pub fn group(&self) -> u16 {
        self.bgid
    }

    /// (Re)register the group on `ring` with the whole buffer in it.
    ///
    /// The caller keeps `self` alive as long as `ring` (the kernel writes
    /// into the buffer until the group is unregistered or the ring closed).
    pub fn reset(&mut self, ring: &mut Ring) -> Result<(), Errno> {
        if self.registered {
            ring.unregister_buf_ring(self.bgid)?;
            self.registered = false;
        }
        let addr = self.buf.as_mut_ptr() as u64;
        let len = u32::try_from(self.buf.len()).map_err(|_| Errno::INVAL)?;
        let ring_ptr = self.ring_mem.as_mut_ptr();
        // A fresh registration starts with head 0: put the buffer at entry 0
        // and publish tail 1.
        self.tail = 1;
        // SAFETY: `ring_mem` is a page-aligned page we own; entry 0 is
        // `struct io_uring_buf` { addr: u64 @0, len: u32 @8, bid: u16 @12,
        // resv/tail: u16 @14 }, all naturally aligned, and the group is not
        // registered, so the kernel does not read it concurrently.
        unsafe {
            ring_ptr.cast::<u64>().write(addr);
            ring_ptr.add(8).cast::<u32>().write(len);
            ring_ptr.add(12).cast::<u16>().write(0);
            (*ring_ptr.add(RING_TAIL).cast::<AtomicU16>()).store(self.tail, Ordering::Release);
        }
        // SAFETY: `ring_mem` and `buf` live in `self`, which the caller
        // keeps as long as the ring (see above).
        unsafe { ring.register_buf_ring(ring_ptr as u64, 1, self.bgid, PBUF_RING_INC) }?;
        self.registered = true;
        self.read = 0;
        Ok(())
    }

    /// The next `n` bytes the kernel wrote (a completion's `res`), or
    /// `None` if that runs past the buffer (a kernel we do not understand).
    pub fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.read.checked_add(n)?;
        let data = self.buf.as_slice().get(self.read..end)?;
        self.read = end;
        Some(data)
    }
}

/// `entry` (a `URING_CMD`) as a multishot command whose completions select
/// a buffer from group `bgid`.
pub fn multishot_uring_cmd(entry: Entry, bgid: u16) -> Entry {
    let mut entry = entry.flags(Flags::BUFFER_SELECT);
    let sqe: *mut u8 = std::ptr::addr_of_mut!(entry).cast();
    // SAFETY: `Entry` is `#[repr(C)]` around the kernel's 64-byte
    // `struct io_uring_sqe`, in which `uring_cmd_flags` (u32) is at byte 28
    // and `buf_group` (u16) at byte 40; both are naturally aligned within
    // the entry, which is 8-byte aligned.
    unsafe {
        let flags = sqe.add(SQE_URING_CMD_FLAGS).cast::<u32>();
        flags.write(flags.read() | URING_CMD_MULTISHOT);
        sqe.add(SQE_BUF_GROUP).cast::<u16>().write(bgid);
    }
    entry
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn multishot_fields_land_where_the_kernel_reads_them() {
        const _: () = assert!(std::mem::size_of::<Entry>() == 64);
        let e = io_uring::opcode::UringCmd16::new(io_uring::types::Fixed(0), 0x1234)
            .build()
            .user_data(7);
        let e = multishot_uring_cmd(e, 0xabcd);
        // SAFETY: Entry is a 64-byte repr(C) struct of plain integers.
        let b: [u8; 64] = unsafe { std::mem::transmute(e) };
        assert_eq!(u32::from_ne_bytes(b[28..32].try_into().unwrap()), 1 << 1);
        assert_eq!(u16::from_ne_bytes(b[40..42].try_into().unwrap()), 0xabcd);
        assert_eq!(b[1] & (1 << 5), 1 << 5, "IOSQE_BUFFER_SELECT");
        assert_eq!(u64::from_ne_bytes(b[32..40].try_into().unwrap()), 7);
    }

    #[test]
    fn reads_follow_each_other_and_stop_at_the_end() {
        let mut p = ProvidedBuf::new(0, 4096).unwrap();
        assert_eq!(p.take(4).map(<[u8]>::len), Some(4));
        assert_eq!(p.take(4092).map(<[u8]>::len), Some(4092));
        assert!(p.take(2).is_none());
    }
}
