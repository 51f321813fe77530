//! Page-aligned, zero-initialised byte buffers for request data.
//!
//! O_DIRECT and the ublk driver both want buffers aligned to the page; the
//! kernel writes into them while no Rust reference exists, so they are held
//! as a raw allocation and lent out as slices only between operations.
#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// An owned, page-aligned, zeroed buffer.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is uniquely owned; moving it between threads moves that ownership.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// Allocate `len` zeroed bytes (at least one page) aligned to the page size.
    pub fn new(len: usize) -> crate::Result<Self> {
        let page = rustix::param::page_size();
        let len = len.max(page).div_ceil(page) * page;
        let layout = Layout::from_size_align(len, page)
            .map_err(|_| crate::Error::invalid(format!("buffer size {len} is too large")))?;
        // SAFETY: layout has a non-zero size (at least one page).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            crate::Error::invalid(format!("out of memory allocating {len} bytes"))
        })?;
        Ok(AlignedBuf { ptr, layout })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Always false: a buffer is at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Address for the kernel.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Mutable address for the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The whole buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of layout.size() initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// The whole buffer, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len())
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
}
