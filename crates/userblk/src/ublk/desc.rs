//! The read-only descriptor array of one queue, mmap'd from `/dev/ublkcN`.
#![allow(unsafe_code)]

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use rustix::mm::{MapFlags, ProtFlags};
use userblk_uapi::{desc_mmap_len, desc_mmap_offset, UblksrvIoDesc};

use crate::{Error, Result};

/// Queue `q`'s `ublksrv_io_desc` array. The kernel writes entry `tag` before
/// completing that tag's fetch; we only ever read it, by value.
pub struct DescArray {
    base: NonNull<UblksrvIoDesc>,
    depth: u16,
    len: usize,
}

impl DescArray {
    /// Map the descriptors of queue `q` with `depth` tags.
    pub fn map(cdev: BorrowedFd<'_>, q: u16, depth: u16) -> Result<Self> {
        let page = rustix::param::page_size();
        let len = desc_mmap_len(depth, page);
        // SAFETY: a fresh shared read-only mapping of the char device; it
        // aliases no Rust memory, and is unmapped exactly once in Drop.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED,
                cdev,
                desc_mmap_offset(q, page),
            )
        }
        .map_err(|e| Error::io(format!("mmap of queue {q} descriptors"), e))?;
        let base = NonNull::new(ptr.cast::<UblksrvIoDesc>())
            .ok_or_else(|| Error::invalid("mmap returned null"))?;
        Ok(DescArray { base, depth, len })
    }

    /// A copy of the descriptor of `tag`, or `None` for a tag out of range.
    pub fn get(&self, tag: u16) -> Option<UblksrvIoDesc> {
        if tag >= self.depth {
            return None;
        }
        // SAFETY: tag < depth, and the mapping holds `depth` descriptors
        // (len >= depth * 24); the page-aligned base keeps every 24-byte entry
        // 8-aligned. The kernel writes the entry only before it completes the
        // tag's fetch, which we have already reaped, so a volatile read of the
        // whole entry sees a settled value.
        Some(unsafe { std::ptr::read_volatile(self.base.as_ptr().add(usize::from(tag))) })
    }
}

impl Drop for DescArray {
    fn drop(&mut self) {
        // SAFETY: base/len are exactly the mapping made in `map`; no reference into it outlives self.
        if let Err(e) = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) } {
            tracing::warn!("munmap of descriptors: {e}");
        }
    }
}
