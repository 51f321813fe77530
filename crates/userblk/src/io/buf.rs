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
use std::sync::atomic::{AtomicUsize, Ordering};

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
    /// Whether the buffer has been faulted in for writing (see
    /// [`fault_in_once`](Self::fault_in_once)).
    faulted: bool,
    /// The mapping a buffer from [`many`](Self::many) was carved from,
    /// unmapped once with its last buffer; `None`: the buffer is its own.
    span: Option<std::sync::Arc<Span>>,
}

/// One mapping shared by the buffers carved from it. Unmapped in one call
/// when the last goes: a queue's 128 buffers unmapped one by one cost a
/// daemon's exit (and so `del`) ~30 ms in the test VM.
struct Span {
    ptr: NonNull<u8>,
    len: usize,
    /// How many of its buffers have been used (each counted once).
    used: AtomicUsize,
}

/// Buffers of a span used before it asks for huge pages: more than an idle
/// device's partition table read takes, few enough that a busy queue gets
/// them at once.
const BUSY_AFTER: usize = 8;

impl Span {
    /// One of the span's buffers is used for the first time. The use that
    /// makes the span busy asks for huge pages for all of it.
    fn first_use(&self) {
        if self.used.fetch_add(1, Ordering::Relaxed) + 1 == BUSY_AFTER {
            let advice = rustix::mm::Advice::LinuxHugepage;
            // SAFETY: the range is the span's mapping; advice changes no contents.
            let advised =
                unsafe { rustix::mm::madvise(self.ptr.as_ptr().cast(), self.len, advice) };
            if let Err(e) = advised {
                tracing::debug!("no transparent huge pages for request buffers: {e}");
            }
        }
    }
}

// SAFETY: the span is only an address range, unmapped once in Drop; no
// bytes are accessed through it.
unsafe impl Send for Span {}
// SAFETY: as above.
unsafe impl Sync for Span {}

impl Drop for Span {
    fn drop(&mut self) {
        // SAFETY: ptr is the mapping of exactly `len` bytes the buffers were
        // carved from; the last of them is gone, and it is unmapped once.
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            tracing::error!("unmapping request buffers: {e}");
        }
    }
}

// SAFETY: the buffer is uniquely owned; moving it between threads moves that ownership.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// Allocate `len` zeroed bytes (at least one page) aligned to the page size.
    pub fn new(len: usize) -> crate::Result<Self> {
        let len = page_multiple(len)?;
        let ptr = map_anonymous(len, || format!("allocating a {len}-byte buffer"))?;
        // The mapping is owned by the returned value and unmapped once in Drop.
        Ok(AlignedBuf {
            ptr,
            len,
            dirty: (0, 0),
            faulted: true,
            span: None,
        })
    }

    /// `count` buffers of `len` bytes (rounded up to the page) carved from
    /// one mapping aligned to 2 MiB, marked for transparent huge pages once
    /// [`BUSY_AFTER`] of them have been used (and against them until then).
    ///
    /// The kernel copies request data to and from these buffers through
    /// page lookups; with huge pages it walks one entry per 2 MiB instead of
    /// per 4 KiB, which made 128 KiB null reads in the test VM ~40% faster
    /// once the buffers had been written. Memory is still only used as it
    /// is touched, now in 2 MiB steps; call
    /// [`fault_in_once`](Self::fault_in_once) before a buffer's first use.
    /// An idle device's few first uses (the kernel reads its partition
    /// table on random tags) stay in 4 KiB pages: with huge pages each would
    /// make 2 MiB resident, and khugepaged would collapse a range they had
    /// touched into 2 MiB later (an idle daemon's RSS grew so by 2 MiB
    /// steps). The mapping goes, in one piece, with the last of its buffers.
    pub fn many(count: usize, len: usize) -> crate::Result<Vec<Self>> {
        const HUGE: usize = 2 << 20;
        let len = page_multiple(len)?;
        let total = count
            .checked_mul(len)
            .ok_or_else(|| crate::Error::invalid(format!("{count} buffers of {len} bytes")))?;
        if total == 0 {
            return Ok(Vec::new());
        }
        let span = total
            .checked_add(HUGE)
            .ok_or_else(|| crate::Error::invalid(format!("{count} buffers of {len} bytes")))?;
        // Every byte of the mapping ends up either unmapped below or in the
        // span, which the returned buffers share and the last one unmaps.
        let raw = map_anonymous(span, || {
            format!("allocating {count} buffers of {len} bytes")
        })?
        .as_ptr();
        let addr = raw as usize;
        let head = addr.next_multiple_of(HUGE) - addr;
        let tail = span - head - total;
        // SAFETY: head and tail are page-aligned slack at the two ends of
        // the mapping just made, outside the buffers handed out.
        unsafe {
            if head > 0 {
                let _ = rustix::mm::munmap(raw.cast(), head);
            }
            if tail > 0 {
                let _ = rustix::mm::munmap(raw.add(head + total).cast(), tail);
            }
        }
        // SAFETY: as above: `raw + head` starts `total` bytes of our mapping.
        let base = unsafe { raw.add(head) };
        let span = NonNull::new(base).map(|ptr| {
            std::sync::Arc::new(Span {
                ptr,
                len: total,
                used: AtomicUsize::new(0),
            })
        });
        // A hint, until the span is busy (THP "always" would give huge pages
        // at once); without THP the buffers still work.
        let advice = rustix::mm::Advice::LinuxNoHugepage;
        // SAFETY: the range is our mapping; advice changes no contents.
        let advised = unsafe { rustix::mm::madvise(base.cast(), total, advice) };
        if let Err(e) = advised {
            tracing::debug!("no transparent huge pages for request buffers: {e}");
        }
        Ok((0..count)
            .filter_map(|i| {
                // SAFETY: buffer i is bytes i*len..(i+1)*len of the range.
                let ptr = NonNull::new(unsafe { base.add(i * len) })?;
                Some(AlignedBuf {
                    ptr,
                    len,
                    dirty: (0, 0),
                    faulted: false,
                    span: span.clone(),
                })
            })
            .collect())
    }

    /// Before its first use, fault a buffer from [`many`](Self::many) in
    /// for writing, keeping its contents. Were the kernel's first touch a
    /// read (answering a read request), it would map the shared huge zero
    /// page, and the first write would then break it into 4 KiB pages: the
    /// huge page is only had by writing first.
    ///
    /// The fault must be a write from the start: reading the byte first (to
    /// write it back) is itself such a first read (on 6.12).
    /// `MADV_POPULATE_WRITE` (5.14+) write-faults without touching the
    /// contents; before it, the read and write back. It also counts the
    /// use towards the span's huge pages (see [`many`](Self::many)).
    pub fn fault_in_once(&mut self) {
        if self.faulted {
            return;
        }
        self.faulted = true;
        if let Some(span) = &self.span {
            span.first_use();
        }
        let p = self.ptr.as_ptr();
        let page = rustix::param::page_size().min(self.len);
        let advice = rustix::mm::Advice::LinuxPopulateWrite;
        // SAFETY: the first page of the buffer is our mapping; populating
        // it changes no contents.
        let populated = unsafe { rustix::mm::madvise(p.cast(), page, advice) };
        if populated.is_ok() {
            return;
        }
        // SAFETY: byte 0 is ours and nothing else reads or writes the
        // buffer now (the caller holds it mutably); it is rewritten with
        // its own value, volatile so that the write is not elided.
        unsafe { p.write_volatile(p.read_volatile()) };
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

/// `len` rounded up to whole pages, at least one.
fn page_multiple(len: usize) -> crate::Result<usize> {
    let page = rustix::param::page_size();
    len.max(page)
        .checked_next_multiple_of(page)
        .ok_or_else(|| crate::Error::invalid(format!("buffer size {len} is too large")))
}

/// A new private anonymous read-write mapping of `len` bytes; the caller
/// owns it and unmaps it. `what` names the allocation in errors.
fn map_anonymous(len: usize, what: impl FnOnce() -> String) -> crate::Result<NonNull<u8>> {
    // SAFETY: a new private anonymous mapping aliases nothing.
    let raw = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE,
        )
    }
    .map_err(|e| crate::Error::io(what(), e))?;
    NonNull::new(raw.cast::<u8>())
        .ok_or_else(|| crate::Error::invalid("mmap returned a null buffer"))
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.span.is_some() {
            // Carved from a span: it goes with the last of its buffers.
            return;
        }
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
    fn many_buffers_are_disjoint_aligned_and_zeroed() {
        let page = rustix::param::page_size();
        let mut bufs = AlignedBuf::many(5, 100 << 10).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bufs.len(), 5);
        assert_eq!(bufs[0].as_ptr() as usize % (2 << 20), 0);
        for (i, b) in bufs.iter_mut().enumerate() {
            assert_eq!(b.len(), (100usize << 10).next_multiple_of(page));
            assert_eq!(b.as_ptr() as usize % page, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice().fill(u8::try_from(i + 1).unwrap_or(0));
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.as_slice().iter().all(|&x| usize::from(x) == i + 1));
        }
        // Dropping one leaves the others' memory alone.
        let third = bufs.remove(2);
        drop(third);
        assert!(bufs[2].as_slice().iter().all(|&x| x == 4));
        // The last one takes the whole mapping (one munmap) with it.
        let span = bufs.first().and_then(|b| b.span.clone());
        let addr = bufs.first().map_or(0, |b| b.as_ptr() as usize);
        assert!(span.is_some());
        drop(bufs);
        assert!(mapped(addr), "unmapped while a buffer's span was held");
        drop(span);
        assert!(!mapped(addr), "the buffers' mapping outlived them");
        assert!(AlignedBuf::many(0, 4096)
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty());
        assert!(AlignedBuf::many(usize::MAX, 4096).is_err());
    }

    /// Whether `addr` is inside a mapping of this process.
    fn mapped(addr: usize) -> bool {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        maps.lines().any(|l| {
            l.split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'))
                .and_then(|(a, b)| {
                    Some((
                        usize::from_str_radix(a, 16).ok()?,
                        usize::from_str_radix(b, 16).ok()?,
                    ))
                })
                .is_some_and(|(a, b)| (a..b).contains(&addr))
        })
    }

    /// `AnonHugePages` of the mapping holding `addr`, from /proc/self/smaps.
    fn huge_kib_at(addr: usize) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().and_then(|r| {
                let (a, b) = r.split_once('-')?;
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            });
            if let Some((start, end)) = range {
                inside = (start..end).contains(&addr);
            } else if let Some(v) = line.strip_prefix("AnonHugePages:").filter(|_| inside) {
                return v.trim().trim_end_matches("kB").trim().parse().ok();
            }
        }
        None
    }

    #[test]
    fn first_use_is_a_write_fault_that_keeps_the_contents() {
        let mut bufs = AlignedBuf::many(4, 512 << 10).unwrap_or_else(|e| panic!("{e}"));
        // Written by "the kernel" before the daemon's first use (a write request).
        // SAFETY: the pointer covers the buffer; nothing else borrows it.
        unsafe { bufs[1].as_ptr().cast_mut().add(3).write(7) };
        bufs[1].fault_in_once();
        assert_eq!(bufs[1].as_slice()[3], 7);
        assert_eq!(bufs[1].as_slice()[0], 0);
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if !crate::skip::require(
            !thp.is_empty() && !thp.contains("[never]"),
            crate::skip::Prereq::Environment,
            "no transparent huge pages on this host",
        ) {
            return;
        }
        // 16 buffers, four to each 2 MiB (measured before and after, should
        // the kernel have merged the mapping with a neighbour).
        let mut fresh = AlignedBuf::many(16, 512 << 10).unwrap_or_else(|e| panic!("{e}"));
        let addr = fresh[0].as_ptr() as usize;
        let before = huge_kib_at(addr).unwrap_or(0);
        // An idle queue's few first uses (buffers 0-6: two of the 2 MiB
        // ranges) stay in 4 KiB pages.
        for b in &mut fresh[..BUSY_AFTER - 1] {
            b.fault_in_once();
        }
        let idle = huge_kib_at(addr).unwrap_or(0);
        assert_eq!(
            idle.saturating_sub(before),
            0,
            "AnonHugePages {before} -> {idle} kB while idle"
        );
        // The use that makes it busy (buffer 8, in the third range) is a
        // huge page; a read before the write would have mapped the huge
        // zero page, and the write after it 4 KiB pages. (At least: once
        // the mapping may have huge pages, khugepaged may also merge the
        // ranges used while idle.)
        fresh[BUSY_AFTER].fault_in_once();
        let busy = huge_kib_at(addr).unwrap_or(0);
        assert!(
            busy.saturating_sub(idle) >= 2048,
            "AnonHugePages {idle} -> {busy} kB once busy"
        );
        assert!(fresh[BUSY_AFTER].as_slice().iter().all(|&x| x == 0));
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
