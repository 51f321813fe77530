//! The built-in targets. Each file (or folder) is one target; filters wrap them.

pub mod early;
pub mod file;
pub mod mem;
pub mod nbd;
pub mod null;
pub mod qcow2;
pub mod rbd;
#[cfg(test)]
mod resize_tests;
pub mod s3;
mod zero_source;

pub use file::{FileOptions, FileTarget};
pub(crate) use zero_source::zero_source;

use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::SeekFrom;
use rustix::io::Errno;

use crate::target::{ring_result, Ctx, Extent, IoResult};

/// Most extents one call reports: enough for any client, bounded for a
/// hostile one (a fragmented file could otherwise need millions).
const MAX_EXTENTS: usize = 1024;

/// Where the next data at or after `at` starts: `None` if there is none
/// before the end of the file (`ENXIO`).
fn seek_data(fd: BorrowedFd<'_>, at: u64) -> Result<Option<u64>, Errno> {
    match rustix::fs::seek(fd, SeekFrom::Data(at)) {
        Ok(d) => Ok(Some(d)),
        Err(Errno::NXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The result of a ring read or write that must move all of `ctx`'s
/// request: a short one (which regular files, tmpfs and the zero source
/// never give inside the device) would leave part of the data undone, so it
/// is an error.
pub(crate) fn whole_transfer(ctx: &Ctx<'_>, res: i32) -> IoResult {
    match ring_result(res) {
        Ok(n) if n == ctx.done_bytes() => Ok(n),
        Ok(_) => Err(rustix::io::Errno::IO),
        Err(e) => Err(e),
    }
}

/// Whether the file's `[base + offset, base + offset + len)` lies wholly in
/// a hole: one `SEEK_DATA`, which skips holes quickly everywhere (unlike
/// `SEEK_HOLE`, which on tmpfs visits every page of the data it crosses).
pub(crate) fn file_reads_zeroes(
    fd: impl AsFd,
    base: u64,
    offset: u64,
    len: u64,
) -> Result<bool, Errno> {
    let start = base.checked_add(offset).ok_or(Errno::INVAL)?;
    let end = start.checked_add(len).ok_or(Errno::INVAL)?;
    match seek_data(fd.as_fd(), start) {
        // None: no data from `start` to the end of the file.
        Ok(data) => Ok(data.is_none_or(|d| d >= end)),
        // No SEEK_DATA here: nothing is known.
        Err(Errno::INVAL | Errno::OPNOTSUPP) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Probe step of [`next_hole`] on file systems whose `SEEK_HOLE` walks pages.
const HOLE_PROBE_STEP: u64 = 1 << 20;

/// Whether `SEEK_HOLE` on this file visits every page of the data it
/// crosses: tmpfs (and so memfds) keeps no extents, so a `SEEK_HOLE` in a
/// fully written 4 GiB file costs milliseconds, however short the range
/// asked about.
fn seek_hole_walks_pages(fd: BorrowedFd<'_>) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    // `f_type` is an i64 here but narrower on other architectures.
    #[allow(clippy::useless_conversion)]
    rustix::fs::fstatfs(fd).is_ok_and(|st| i64::from(st.f_type) == TMPFS_MAGIC)
}

/// The file position of the first hole at or after `from` (which holds
/// data), at most `limit`.
///
/// Where `SEEK_HOLE` walks pages, the run is followed in
/// [`HOLE_PROBE_STEP`] strides with `SEEK_DATA` (cheap: it skips holes by
/// their index) until a stride ends in a hole, and only that last stride
/// is walked: the cost follows the range asked about, not the distance to
/// the next hole. A hole that starts and ends between two probes is then
/// taken for data, which block status allows (data is never wrong).
fn next_hole(fd: BorrowedFd<'_>, from: u64, limit: u64, walks_pages: bool) -> Result<u64, Errno> {
    let seek_hole = |at: u64| match rustix::fs::seek(fd, SeekFrom::Hole(at)) {
        Ok(h) => Ok(h.min(limit)),
        Err(Errno::NXIO) => Ok(limit),
        Err(e) => Err(e),
    };
    if !walks_pages {
        return seek_hole(from);
    }
    let mut at = from;
    while at < limit {
        let probe = at.saturating_add(HOLE_PROBE_STEP).min(limit);
        if seek_data(fd, probe)?.is_none_or(|d| d > probe) {
            // A hole begins in (at, probe]: the walk stops there.
            return seek_hole(at).map(|h| h.min(probe));
        }
        at = probe;
    }
    Ok(limit)
}

/// Extents of a sparse file, from `SEEK_DATA`/`SEEK_HOLE`: the device's
/// `[offset, offset + len)` is the file's range from `base + offset`.
/// Holes are shrunk to whole `block`s so a block is never called a hole
/// while part of it holds data.
pub(crate) fn file_extents(
    fd: impl AsFd,
    base: u64,
    offset: u64,
    len: u64,
    block: u64,
    out: &mut Vec<Extent>,
) -> Result<(), Errno> {
    let fd = fd.as_fd();
    let end = offset.checked_add(len).ok_or(Errno::INVAL)?;
    let mut pos = offset;
    let first = out.len();
    let mut walks_pages = None;
    while pos < end && out.len() - first < MAX_EXTENTS {
        let file_pos = base.checked_add(pos).ok_or(Errno::INVAL)?;
        // Where the next data starts (ENXIO: none before the end of the file).
        let data = match seek_data(fd, file_pos) {
            Ok(d) => d.map_or(end, |d| d.saturating_sub(base).min(end)),
            // No SEEK_DATA here: everything is data.
            Err(Errno::INVAL | Errno::OPNOTSUPP) => {
                Extent::data(end - pos).push_merged(out, first);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        // A hole only from the next block boundary to the last one before data.
        let hole_start = pos.next_multiple_of(block).min(end);
        let hole_end = (data / block * block).max(hole_start);
        if hole_end > hole_start {
            if hole_start > pos {
                Extent::data(hole_start - pos).push_merged(out, first);
            }
            Extent::hole(hole_end - hole_start).push_merged(out, first);
            pos = hole_end;
            if pos >= end {
                break;
            }
        }
        // Data runs from here to the block boundary at or after the next hole.
        let hole = if data >= end {
            end
        } else {
            let data_pos = base.checked_add(data.max(pos)).ok_or(Errno::INVAL)?;
            let limit = base.checked_add(end).ok_or(Errno::INVAL)?;
            let walks = *walks_pages.get_or_insert_with(|| seek_hole_walks_pages(fd));
            next_hole(fd, data_pos, limit, walks)?.saturating_sub(base)
        };
        let mut data_end = hole.next_multiple_of(block).min(end);
        if data_end <= pos {
            data_end = (pos + block).min(end);
        }
        Extent::data(data_end - pos).push_merged(out, first);
        pos = data_end;
    }
    Ok(())
}

pub use mem::MemTarget;
pub use null::NullTarget;

#[cfg(test)]
mod zero_copy_tests;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::fd::OwnedFd;

    const M: u64 = 1 << 20;

    /// 8 MiB: data 0..3M, hole 3M..5M, data 5M..5M+4K, hole (8 KiB), data to 7M, hole to 8M.
    fn sparse(fd: &OwnedFd) {
        rustix::fs::ftruncate(fd, 8 * M).unwrap();
        let put = |off: u64, len: u64| {
            rustix::io::pwrite(fd, &vec![0xa5; usize::try_from(len).unwrap()], off).unwrap();
        };
        put(0, 3 * M);
        put(5 * M, 4096);
        put(5 * M + 12288, 2 * M - 12288);
    }

    fn check(fd: &OwnedFd, walks: bool) {
        let mut out = Vec::new();
        file_extents(fd, 0, 0, 8 * M, 512, &mut out).unwrap();
        assert_eq!(out.iter().map(|e| e.len).sum::<u64>(), 8 * M, "{out:?}");
        // Every hole is one: no data from its start to its end.
        let mut pos = 0;
        for e in &out {
            if e.hole {
                let data = rustix::fs::seek(fd, SeekFrom::Data(pos)).unwrap_or(8 * M);
                assert!(
                    data >= pos + e.len,
                    "hole at {pos} ({e:?}) holds data at {data}"
                );
            }
            pos += e.len;
        }
        // The big holes are found exactly.
        assert_eq!(out[0], Extent::data(3 * M));
        assert_eq!(out[1], Extent::hole(2 * M));
        assert_eq!(out.last(), Some(&Extent::hole(M)));
        // The 8 KiB hole lies between two probes, so a walking file system
        // reports it as data.
        assert_eq!(out.len(), if walks { 4 } else { 6 }, "{out:?}");
        // A range inside data is one extent, whatever lies past it.
        out.clear();
        file_extents(fd, 0, M, M, 512, &mut out).unwrap();
        assert_eq!(out, vec![Extent::data(M)]);
        // Zeroes: only wholly inside a hole.
        assert!(file_reads_zeroes(fd, 0, 3 * M, 2 * M).unwrap());
        assert!(file_reads_zeroes(fd, 0, 7 * M, M).unwrap());
        assert!(!file_reads_zeroes(fd, 0, 3 * M - 512, M).unwrap());
        assert!(!file_reads_zeroes(fd, 0, 4 * M, 2 * M).unwrap());
        assert!(!file_reads_zeroes(fd, 0, 0, 512).unwrap());
    }

    #[test]
    fn extents_of_a_memfd_follow_holes_in_strides() {
        let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        assert!(seek_hole_walks_pages(fd.as_fd()));
        sparse(&fd);
        check(&fd, true);
        assert_eq!(next_hole(fd.as_fd(), 0, 8 * M, true).unwrap(), 3 * M);
        assert_eq!(next_hole(fd.as_fd(), 5 * M, 8 * M, true).unwrap(), 7 * M);
        // Walking is exact, just slower.
        assert_eq!(
            next_hole(fd.as_fd(), 5 * M, 8 * M, false).unwrap(),
            5 * M + 4096
        );
        // A hole in the last stride, short of the limit.
        assert_eq!(
            next_hole(fd.as_fd(), 5 * M, 5 * M + 8192, true).unwrap(),
            5 * M + 4096
        );
    }

    #[test]
    fn extents_of_a_file_use_seek_hole() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("img")).unwrap();
        let fd = OwnedFd::from(f);
        let env = crate::skip::Prereq::Environment;
        if !crate::skip::require(
            !seek_hole_walks_pages(fd.as_fd()),
            env,
            "the test directory is on tmpfs",
        ) {
            return;
        }
        sparse(&fd);
        check(&fd, false);
    }
}
