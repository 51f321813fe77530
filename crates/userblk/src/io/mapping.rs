//! A shared, writable mapping of a whole file, for targets whose data lives
//! in memory (the `mem` target's memfd).
//!
//! Copying into a mapped page is a `memcpy`; `pwrite` to tmpfs looks the
//! page up, locks it and updates the LRU for every 4 KiB, which costs more
//! than the copy itself for small writes.
//!
//! Reading through the mapping is only done where the pages are known to
//! be there: a fault on a tmpfs hole allocates a page, so reading a sparse
//! RAM disk end to end would fill it. The mapping keeps one bit per page,
//! set by [`SharedMapping::write`] and cleared by [`SharedMapping::forget`]
//! (before the caller punches a hole); [`SharedMapping::read`] declines
//! ranges with a clear bit, and the caller reads those with `pread`.
//!
//! Only raw-pointer copies touch the mapped bytes; no Rust reference to them
//! ever exists, since other threads (and, for a shared file, other
//! processes) may write them at any time.
#![allow(unsafe_code)]

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};

use super::AlignedBuf;

/// Bytes per bit of the populated-page map.
const PAGE: usize = 4096;
/// Bytes per word of the populated-page map.
const WORD_BYTES: usize = PAGE * 64;

/// `len` bytes of a file mapped shared and writable.
pub struct SharedMapping {
    ptr: NonNull<u8>,
    len: usize,
    /// One bit per 4 KiB page known to be allocated, as `AtomicU64` words,
    /// in an anonymous mapping so that only the words in use take memory.
    populated: AlignedBuf,
}

// SAFETY: the mapping is plain memory owned by this value; every access is
// a bounds-checked raw copy, and racing copies to one range can only mix
// bytes, which is what a block device promises for racing writes.
unsafe impl Send for SharedMapping {}
// SAFETY: as above: `&self` methods only copy bytes in or out.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Map the first `len` bytes of `fd` (which must be at least that long).
    pub fn new(fd: BorrowedFd<'_>, len: u64) -> Result<Self, Errno> {
        let len = usize::try_from(len).map_err(|_| Errno::NOMEM)?;
        if len == 0 {
            return Err(Errno::INVAL);
        }
        // SAFETY: a new mapping at an address the kernel picks aliases no
        // Rust object; it is owned by the returned value and unmapped once, in Drop.
        let raw = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }?;
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or(Errno::NOMEM)?;
        let words = len.div_ceil(WORD_BYTES);
        let unmap = |e| {
            // SAFETY: the mapping was just made and nothing else refers to it.
            let _ = unsafe { rustix::mm::munmap(raw, len) };
            e
        };
        let populated = AlignedBuf::new(words * 8).map_err(|_| unmap(Errno::NOMEM))?;
        Ok(SharedMapping {
            ptr,
            len,
            populated,
        })
    }

    /// The populated-page bits.
    fn bits(&self) -> &[AtomicU64] {
        let words = self.len.div_ceil(WORD_BYTES);
        // SAFETY: the buffer is page-aligned, zero-initialised and at least
        // `words * 8` bytes; it is only ever accessed as these atomics.
        unsafe { std::slice::from_raw_parts(self.populated.as_ptr().cast::<AtomicU64>(), words) }
    }

    /// Set (or clear) the bits of pages `first..=last`.
    fn mark(&self, first: usize, last: usize, set: bool) {
        let bits = self.bits();
        for page in first..=last {
            let (w, b) = (page / 64, page % 64);
            if let Some(word) = bits.get(w) {
                if set {
                    word.fetch_or(1 << b, Ordering::Release);
                } else {
                    word.fetch_and(!(1 << b), Ordering::Release);
                }
            }
        }
    }

    /// Whether every page of `first..=last` is known to be allocated.
    fn all_populated(&self, first: usize, last: usize) -> bool {
        let bits = self.bits();
        (first..=last).all(|page| {
            bits.get(page / 64)
                .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
        })
    }

    /// The pages `[start, start + n)` touches (n > 0, inside the mapping).
    fn pages(start: usize, n: usize) -> (usize, usize) {
        (start / PAGE, (start + n - 1) / PAGE)
    }

    /// The pages of `[offset, offset + len)` are about to be freed (a hole
    /// punched): read them with `pread` from now on.
    pub fn forget(&self, offset: u64, len: u64) {
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        let n = usize::try_from(len).unwrap_or(usize::MAX);
        let n = n.min(self.len.saturating_sub(start));
        if n > 0 {
            let (first, last) = Self::pages(start, n);
            self.mark(first, last, false);
        }
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an empty mapping cannot be made.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn check(&self, offset: u64, n: usize) -> Result<usize, Errno> {
        let start = usize::try_from(offset).map_err(|_| Errno::INVAL)?;
        match start.checked_add(n) {
            Some(end) if end <= self.len => Ok(start),
            _ => Err(Errno::INVAL),
        }
    }

    /// Copy `data` into the file at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let start = self.check(offset, data.len())?;
        // SAFETY: `start + data.len() <= len` (checked), so the destination
        // lies inside the mapping, which lives as long as `self`; `data` is a
        // Rust slice, so it cannot overlap the mapping (no reference to the
        // mapping is ever handed out).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(start), data.len());
        }
        if !data.is_empty() {
            let (first, last) = Self::pages(start, data.len());
            self.mark(first, last, true);
        }
        Ok(())
    }

    /// Copy bytes of the file at `offset` into `out`, if every page of the
    /// range was written through this mapping since it was last forgotten;
    /// `Ok(false)` (nothing copied) otherwise: read those with `pread`.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<bool, Errno> {
        let start = self.check(offset, out.len())?;
        if out.is_empty() {
            return Ok(true);
        }
        let (first, last) = Self::pages(start, out.len());
        if !self.all_populated(first, last) {
            return Ok(false);
        }
        // SAFETY: the source range is inside the mapping (checked) and
        // cannot overlap `out`, a Rust slice.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(start),
                out.as_mut_ptr(),
                out.len(),
            );
        }
        Ok(true)
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` are exactly what mmap returned, and
        // nothing borrows the mapping once its owner is dropped.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl std::fmt::Debug for SharedMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMapping")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn writes_reach_the_file_and_bounds_are_checked() {
        let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 1 << 20).unwrap();
        let m = SharedMapping::new(fd.as_fd(), 1 << 20).unwrap();
        m.write(4096, &[7u8; 512]).unwrap();
        let mut back = [0u8; 512];
        rustix::io::pread(&fd, &mut back, 4096).unwrap();
        assert_eq!(back, [7u8; 512]);
        // Written through the mapping: read through it too.
        let mut via_map = [0u8; 16];
        assert_eq!(m.read(4096 + 100, &mut via_map), Ok(true));
        assert_eq!(via_map, [7u8; 16]);
        // Never written through it: declined, whatever the file holds.
        rustix::io::pwrite(&fd, &[9u8; 16], 8192).unwrap();
        assert_eq!(m.read(8192, &mut via_map), Ok(false));
        // A range with one unknown page is declined as a whole.
        let mut two = vec![0u8; 8192];
        assert_eq!(m.read(4096, &mut two), Ok(false));
        m.write(8192, &[3u8; 4096]).unwrap();
        assert_eq!(m.read(4096, &mut two), Ok(true));
        assert_eq!(&two[..512], &[7u8; 512]);
        assert_eq!(&two[4096..], &[3u8; 4096]);
        m.forget(4096, 4096);
        assert_eq!(m.read(4096, &mut two), Ok(false));
        assert_eq!(m.read(8192, &mut via_map), Ok(true));
        assert_eq!(m.write((1 << 20) - 8, &[0u8; 16]), Err(Errno::INVAL));
        assert_eq!(m.read(u64::MAX, &mut via_map), Err(Errno::INVAL));
        assert!(m.write((1 << 20) - 16, &[1u8; 16]).is_ok());
        assert_eq!(m.read((1 << 20) - 16, &mut via_map), Ok(true));
        assert_eq!(via_map, [1u8; 16]);
    }

    #[test]
    fn reading_holes_does_not_allocate_them() {
        let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 64 << 20).unwrap();
        let m = SharedMapping::new(fd.as_fd(), 64 << 20).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for i in 0..64 {
            assert_eq!(m.read(i << 20, &mut buf), Ok(false));
        }
        let blocks = rustix::fs::fstat(&fd).unwrap().st_blocks;
        assert_eq!(blocks, 0, "reads allocated memory");
    }
}
