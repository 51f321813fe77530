//! The built-in targets. Each file is one target; filters (later) wrap them.

pub mod file;
pub mod mem;
pub mod nbd;
pub mod null;
pub mod qcow2;
pub mod s3;

pub use file::{FileOptions, FileTarget};

use std::os::fd::AsFd;

use rustix::fs::SeekFrom;
use rustix::io::Errno;

use crate::target::Extent;

/// Most extents one call reports: enough for any client, bounded for a
/// hostile one (a fragmented file could otherwise need millions).
const MAX_EXTENTS: usize = 1024;

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
    let push = |out: &mut Vec<Extent>, e: Extent| {
        let ours = out.len() > first;
        match out.last_mut() {
            Some(last) if ours && last.hole == e.hole && last.zero == e.zero => last.len += e.len,
            _ => out.push(e),
        }
    };
    while pos < end && out.len() - first < MAX_EXTENTS {
        let file_pos = base.checked_add(pos).ok_or(Errno::INVAL)?;
        // Where the next data starts (ENXIO: none before the end of the file).
        let data = match rustix::fs::seek(fd, SeekFrom::Data(file_pos)) {
            Ok(d) => d.saturating_sub(base).min(end),
            Err(Errno::NXIO) => end,
            // No SEEK_DATA here: everything is data.
            Err(Errno::INVAL | Errno::OPNOTSUPP) => {
                push(out, Extent::data(end - pos));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        // A hole only from the next block boundary to the last one before data.
        let hole_start = pos.next_multiple_of(block).min(end);
        let hole_end = (data / block * block).max(hole_start);
        if hole_end > hole_start {
            if hole_start > pos {
                push(out, Extent::data(hole_start - pos));
            }
            push(out, Extent::hole(hole_end - hole_start));
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
            match rustix::fs::seek(fd, SeekFrom::Hole(data_pos)) {
                Ok(h) => h.saturating_sub(base).min(end),
                Err(Errno::NXIO) => end,
                Err(e) => return Err(e),
            }
        };
        let mut data_end = hole.next_multiple_of(block).min(end);
        if data_end <= pos {
            data_end = (pos + block).min(end);
        }
        push(out, Extent::data(data_end - pos));
        pos = data_end;
    }
    Ok(())
}
pub use mem::MemTarget;
pub use null::NullTarget;
