//! Page-aligned, zero-initialised byte buffers for request data.
//!
//! O_DIRECT and the ublk driver both want buffers aligned to the page; the
//! kernel writes into them while no Rust reference exists, so they are held
//! as a raw allocation and lent out as slices only between operations.
//!
//! Each buffer is an anonymous mapping: page-aligned by construction, and
//! zeroed lazily by the kernel, so a frontend can size its slots for the
//! largest request while memory is used only as requests touch it (an
//! aligned `alloc_zeroed` would write every byte up front).
#![allow(unsafe_code)]

use std::ptr::NonNull;

use rustix::mm::{MapFlags, ProtFlags};

/// An owned, page-aligned, zeroed buffer.
///
/// It remembers how much of it may hold something other than zeroes, so
/// that a read answered with zeroes (a null device, a hole) costs nothing
/// when the buffer is still zero from the last such read:
///
/// ```
/// use userblk::io::AlignedBuf;
/// let mut b = AlignedBuf::new(8192).unwrap();
/// b.prefix_mut(100)[99] = 7;
/// b.zero_prefix(4096); // clears the 100 bytes that may be dirty
/// assert!(b.as_slice().iter().all(|&x| x == 0));
/// ```
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// The bytes that may be non-zero, `dirty.0..dirty.1`; all others are
    /// zero. A range, not a prefix: after a 512 KiB write, 128 KiB zero
    /// reads clear the front once and then cost nothing, where a prefix
    /// would have stayed 512 KiB and been zeroed again on every read.
    dirty: (usize, usize),
}

// SAFETY: the buffer is uniquely owned; moving it between threads moves that ownership.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// Allocate `len` zeroed bytes (at least one page) aligned to the page size.
    pub fn new(len: usize) -> crate::Result<Self> {
        let page = rustix::param::page_size();
        let len = len
            .max(page)
            .checked_next_multiple_of(page)
            .ok_or_else(|| crate::Error::invalid(format!("buffer size {len} is too large")))?;
        // SAFETY: a new private anonymous mapping aliases nothing; it is
        // owned by the returned value and unmapped exactly once in Drop.
        let raw = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .map_err(|e| crate::Error::io(format!("allocating a {len}-byte buffer"), e))?;
        let ptr = NonNull::new(raw.cast::<u8>())
            .ok_or_else(|| crate::Error::invalid("mmap returned a null buffer"))?;
        Ok(AlignedBuf {
            ptr,
            len,
            dirty: (0, 0),
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a buffer is at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Address for the kernel.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Mutable address for the kernel (the whole buffer may then be written).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.dirty = (0, self.len);
        self.ptr.as_ptr()
    }

    /// Note that the first `n` bytes were written through [`as_ptr`](Self::as_ptr)
    /// (by the kernel, say), so they may no longer be zero.
    pub fn mark_written(&mut self, n: usize) {
        let n = n.min(self.len);
        if n == 0 {
            return;
        }
        self.dirty = if self.dirty.0 >= self.dirty.1 {
            (0, n)
        } else {
            (0, self.dirty.1.max(n))
        };
    }

    /// The first `n` bytes (at most the buffer), mutably.
    pub fn prefix_mut(&mut self, n: usize) -> &mut [u8] {
        let n = n.min(self.len);
        self.mark_written(n);
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), n) }
    }

    /// Make the first `n` bytes zero, writing only those that may not be.
    pub fn zero_prefix(&mut self, n: usize) {
        let n = n.min(self.len);
        let (from, to) = self.dirty;
        if from >= to || n <= from {
            return;
        }
        let end = to.min(n);
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access;
        // from < end <= len.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(from), end - from) }.fill(0);
        self.dirty = if end >= to { (0, 0) } else { (end, to) };
    }

    /// The whole buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live mapping of `len` initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The whole buffer, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.dirty = (0, self.len);
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr is our mapping of exactly `len` bytes, unmapped once.
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            tracing::error!("unmapping a request buffer: {e}");
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len())
            .field("dirty", &self.dirty)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_rounded() {
        let page = rustix::param::page_size();
        let mut b = AlignedBuf::new(100).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.len(), page);
        assert_eq!(b.as_ptr() as usize % page, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[7] = 9;
        assert_eq!(b.as_slice()[7], 9);
        assert_eq!(
            AlignedBuf::new(page + 1).map(|b| b.len()).ok(),
            Some(2 * page)
        );
    }

    #[test]
    fn zeroing_clears_whatever_may_be_dirty() {
        let mut b = AlignedBuf::new(3 * 4096).unwrap_or_else(|e| panic!("{e}"));
        let zero = |b: &AlignedBuf| b.as_slice().iter().all(|&x| x == 0);
        // Written through a slice, partly zeroed: the rest stays dirty.
        b.prefix_mut(8192).fill(1);
        b.zero_prefix(4096);
        assert!(b.as_slice()[..4096].iter().all(|&x| x == 0));
        assert!(b.as_slice()[4096..8192].iter().all(|&x| x == 1));
        b.zero_prefix(8192);
        assert!(zero(&b));
        // Written by "the kernel" through the raw address.
        // SAFETY: the pointer covers the buffer; nothing else borrows it.
        unsafe { b.as_ptr().cast_mut().add(100).write(5) };
        b.mark_written(4096);
        b.zero_prefix(512);
        assert!(zero(&b));
        // The whole buffer lent out: everything may be dirty.
        b.as_mut_slice()[3 * 4096 - 1] = 9;
        b.zero_prefix(4096);
        assert_eq!(b.as_slice()[3 * 4096 - 1], 9);
        b.zero_prefix(usize::MAX);
        assert!(zero(&b));
    }

    #[test]
    fn short_zero_reads_after_a_long_write_zero_once() {
        let mut b = AlignedBuf::new(4 * 4096).unwrap_or_else(|e| panic!("{e}"));
        b.prefix_mut(4 * 4096).fill(1);
        b.zero_prefix(4096);
        assert_eq!(b.dirty, (4096, 4 * 4096));
        // Nothing left to zero in the first page: a later zero read of it
        // writes nothing, even if the bytes were changed behind our back.
        // SAFETY: the pointer covers the buffer; nothing else borrows it.
        unsafe { b.as_ptr().cast_mut().write(7) };
        b.zero_prefix(4096);
        assert_eq!(b.as_slice()[0], 7);
        b.zero_prefix(2 * 4096);
        assert!(b.as_slice()[4096..2 * 4096].iter().all(|&x| x == 0));
        assert!(b.as_slice()[2 * 4096..].iter().all(|&x| x == 1));
        // A write of the first page widens the range back to the start.
        b.mark_written(4096);
        assert_eq!(b.dirty, (0, 4 * 4096));
        b.zero_prefix(usize::MAX);
        assert_eq!(b.dirty, (0, 0));
        assert!(b.as_slice().iter().all(|&x| x == 0));
    }
}
