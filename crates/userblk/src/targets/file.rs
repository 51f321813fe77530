//! `file` (alias `loop`): a regular file or a block device, with I/O on the queue's own ring.
//!
//! O_DIRECT by default, so the page cache is not paid twice (once for the
//! device, once for the file). Flush is `fdatasync`; FUA writes carry
//! `RWF_DSYNC`; discard punches a hole; write-zeroes uses `ZERO_RANGE` when
//! the range must stay allocated (NOUNMAP) and a hole otherwise.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rustix::fs::{FallocateFlags, FileType, Mode, OFlags, SeekFrom};
use rustix::io::{Errno, ReadWriteFlags};
use serde_json::json;

use crate::io::open::{open_checked, Kinds};
use crate::target::{ring_result, Caps, Ctx, Extent, Flags, Op, RangeOpCaps, Submit, Target};
use crate::{Error, Result};

/// How to open the backing file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// Regular file or block device.
    pub path: PathBuf,
    /// Byte offset into the file where the device starts.
    pub offset: u64,
    /// Use the page cache instead of O_DIRECT.
    pub buffered: bool,
    /// Open read-only and present a read-only device.
    pub read_only: bool,
}

// Steps of a request, passed through the ring and back to `complete`.
const STEP_IO: u16 = 0;
const STEP_ZERO_RANGE: u16 = 1;
const STEP_PUNCH_THEN_ALLOC: u16 = 2;
const STEP_ALLOC: u16 = 3;

/// The file target.
#[derive(Debug)]
pub struct FileTarget {
    fd: OwnedFd,
    opts: FileOptions,
    direct: bool,
    block_device: bool,
    /// Bytes served, from `opts.offset`; changed only by a resize.
    size: AtomicU64,
    logical_block_size: u32,
    physical_block_size: u32,
    can_punch: bool,
    /// Cleared when the filesystem turns out not to support `FALLOC_FL_ZERO_RANGE` (tmpfs).
    zero_range: AtomicBool,
}

/// Open `path` as a device's data: a regular file or a block device and
/// nothing else. The one place every target and `copy` opens such a file,
/// so that none of them can hang in `open()` on a FIFO (which waits for a
/// peer; see [`open_checked`]). The error names no path: the caller's does.
pub fn open_data(path: &Path, read_only: bool, direct: bool) -> std::io::Result<OwnedFd> {
    let mut flags = if read_only {
        OFlags::RDONLY
    } else {
        OFlags::RDWR
    };
    if direct {
        flags |= OFlags::DIRECT;
    }
    open_checked(path, flags, Mode::empty(), Kinds::Data).map_err(|e| writable_hint(e, read_only))
}

/// A file that cannot be written can still be served read-only: say how.
fn writable_hint(e: std::io::Error, read_only: bool) -> std::io::Error {
    match Errno::from_io_error(&e) {
        Some(Errno::ACCESS | Errno::PERM | Errno::ROFS) if !read_only => {
            std::io::Error::new(e.kind(), format!("{e}; --read-only serves it read-only"))
        }
        _ => e,
    }
}

fn pow2_in(v: u32, lo: u32, hi: u32) -> Option<u32> {
    (v.is_power_of_two() && (lo..=hi).contains(&v)).then_some(v)
}

impl FileTarget {
    /// Open the backing file and work out the device's geometry and abilities.
    pub fn open(opts: FileOptions) -> Result<Self> {
        let path = opts.path.clone();
        let perr = |e: Errno| Error::path(&path, e);
        let open = |direct| open_data(&path, opts.read_only, direct);
        let mut direct = !opts.buffered;
        let fd = match open(direct) {
            Ok(fd) => fd,
            Err(e) if direct && Errno::from_io_error(&e) == Some(Errno::INVAL) => {
                tracing::warn!(
                    "{}: O_DIRECT not supported here; using buffered I/O",
                    path.display()
                );
                direct = false;
                open(false).map_err(|e| Error::path(&path, e))?
            }
            Err(e) => return Err(Error::path(&path, e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(perr)?;
        // `open_data` let nothing else through.
        let block_device = FileType::from_raw_mode(st.st_mode) == FileType::BlockDevice;
        let (raw_size, lbs, pbs) = if block_device {
            let size = rustix::fs::seek(&fd, SeekFrom::End(0)).map_err(perr)?;
            let lbs = rustix::fs::ioctl_blksszget(&fd).map_err(perr)?;
            let pbs = rustix::fs::ioctl_blkpbszget(&fd).unwrap_or(lbs);
            (size, lbs, pbs)
        } else {
            let size = u64::try_from(st.st_size).unwrap_or(0);
            let mut lbs = 512;
            if direct {
                let sx = rustix::fs::statx(
                    &fd,
                    "",
                    rustix::fs::AtFlags::EMPTY_PATH,
                    rustix::fs::StatxFlags::DIOALIGN,
                );
                if let Ok(sx) = sx {
                    lbs = pow2_in(sx.stx_dio_offset_align, 512, 4096).unwrap_or(512);
                }
            }
            let pbs = pow2_in(u32::try_from(st.st_blksize).unwrap_or(4096), lbs, 65536)
                .unwrap_or(4096.max(lbs));
            (size, lbs, pbs)
        };
        let lbs = pow2_in(lbs, 512, 4096).ok_or_else(|| {
            Error::invalid(format!(
                "{}: unsupported logical block size {lbs}",
                path.display()
            ))
        })?;
        let pbs = pbs.max(lbs);
        if !opts.offset.is_multiple_of(u64::from(lbs)) {
            return Err(Error::invalid(format!(
                "--offset {} is not a multiple of the block size {lbs}",
                opts.offset
            )));
        }
        let usable = raw_size.saturating_sub(opts.offset);
        let size = usable - usable % u64::from(lbs);
        if size == 0 {
            return Err(Error::invalid(format!(
                "{}: no data to serve (size {raw_size}, offset {}); the device needs at least {lbs} bytes",
                path.display(),
                opts.offset
            )));
        }
        if size != usable {
            tracing::warn!(
                "{}: ignoring {} trailing bytes that do not fill a block",
                path.display(),
                usable - size
            );
        }
        let can_punch = !opts.read_only && Self::probe_punch(&fd, block_device, raw_size, &st);
        Ok(FileTarget {
            fd,
            opts,
            direct,
            block_device,
            size: AtomicU64::new(size),
            logical_block_size: lbs,
            physical_block_size: pbs,
            can_punch,
            zero_range: AtomicBool::new(true),
        })
    }

    /// Whether holes can be punched: for a file, punch past the end (a
    /// no-op that fails only where unsupported); for a block device, ask sysfs.
    fn probe_punch(fd: &OwnedFd, block_device: bool, raw_size: u64, st: &rustix::fs::Stat) -> bool {
        if block_device {
            let rdev = st.st_rdev;
            let sysfs = format!(
                "/sys/dev/block/{}:{}/queue/discard_max_bytes",
                rustix::fs::major(rdev),
                rustix::fs::minor(rdev)
            );
            return std::fs::read_to_string(sysfs)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0)
                > 0;
        }
        let past_end = raw_size.div_ceil(4096) * 4096 + 4096;
        rustix::fs::fallocate(
            fd,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            past_end,
            4096,
        )
        .is_ok()
    }

    /// Whether O_DIRECT is in use.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn queue(&self, ctx: &mut Ctx<'_>, step: u16, mode: FallocateFlags) -> Submit {
        let req = *ctx.req();
        let off = self.opts.offset + req.offset;
        let fd = self.fd.as_fd();
        let queued = match step {
            STEP_IO => match req.op {
                Op::Read => ctx.read_at(fd, off, step),
                Op::Write => {
                    let flags = if req.flags.contains(Flags::FUA) {
                        ReadWriteFlags::DSYNC
                    } else {
                        ReadWriteFlags::empty()
                    };
                    ctx.write_at(fd, off, flags, step)
                }
                Op::Flush => ctx.fsync(fd, true, step),
                Op::Discard | Op::WriteZeroes => ctx.fallocate(fd, mode, off, req.len.into(), step),
            },
            _ => ctx.fallocate(fd, mode, off, req.len.into(), step),
        };
        match queued {
            Ok(()) => Submit::Pending,
            Err(e) => Submit::Done(Err(e)),
        }
    }

    fn zero_step(&self, req: &crate::Request) -> (u16, FallocateFlags) {
        let keep = FallocateFlags::KEEP_SIZE;
        let punch = FallocateFlags::PUNCH_HOLE | keep;
        if self.block_device {
            // The kernel writes zeroes itself where the device cannot.
            return (STEP_IO, FallocateFlags::ZERO_RANGE | keep);
        }
        if !req.flags.contains(Flags::NOUNMAP) {
            return (STEP_IO, punch);
        }
        if self.zero_range.load(Ordering::Relaxed) {
            (STEP_ZERO_RANGE, FallocateFlags::ZERO_RANGE | keep)
        } else {
            (STEP_PUNCH_THEN_ALLOC, punch)
        }
    }
}

impl Target for FileTarget {
    fn caps(&self) -> Caps {
        let lbs = self.logical_block_size;
        let range = RangeOpCaps::with_granularity(self.physical_block_size.max(lbs));
        Caps {
            logical_block_size: lbs,
            physical_block_size: self.physical_block_size,
            read_only: self.opts.read_only,
            // Even with O_DIRECT, allocation metadata and the disk's own cache need fdatasync.
            volatile_cache: true,
            fua: true,
            discard: self.can_punch.then_some(range),
            write_zeroes: (!self.opts.read_only && (self.can_punch || self.block_device))
                .then_some(range),
            ..Caps::new(self.size())
        }
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// A regular file is truncated or extended (sparse) to the new size; a
    /// block device has the size its disk has.
    fn resize(&self, new_size: u64) -> crate::Result<u64> {
        let path = &self.opts.path;
        if self.block_device {
            return Err(crate::Error::cannot_resize(
                format!("the file target on block device {}", path.display()),
                "a block device's size is its disk's",
            ));
        }
        let len = self
            .opts
            .offset
            .checked_add(new_size)
            .ok_or_else(|| crate::Error::invalid("the new size and the offset overflow"))?;
        rustix::fs::ftruncate(&self.fd, len).map_err(|e| crate::Error::path(path, e))?;
        self.size.store(new_size, Ordering::Release);
        Ok(new_size)
    }

    fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        let req = *ctx.req();
        match req.op {
            Op::Read | Op::Write | Op::Flush => self.queue(ctx, STEP_IO, FallocateFlags::empty()),
            Op::Discard => self.queue(
                ctx,
                STEP_IO,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            ),
            Op::WriteZeroes => {
                let (step, mode) = self.zero_step(&req);
                self.queue(ctx, step, mode)
            }
        }
    }

    fn data_on_ring_only(&self) -> bool {
        // Reads and writes are ring operations on the request's buffer; the
        // other ops carry no data.
        true
    }

    fn complete(&self, ctx: &mut Ctx<'_>, step: u16, res: i32) -> Submit {
        let op = ctx.req().op;
        let result = ring_result(res);
        match (step, result) {
            (STEP_IO, Err(Errno::OPNOTSUPP)) if op == Op::Discard && self.block_device => {
                // Discard is a hint; a device that cannot drop the blocks keeps them.
                Submit::Done(Ok(0))
            }
            (STEP_IO, Ok(n)) if op.has_data() => Submit::Done(Ok(n)),
            (STEP_IO | STEP_ALLOC, r) => Submit::Done(r.map(|_| 0)),
            (STEP_ZERO_RANGE, Err(Errno::OPNOTSUPP)) => {
                self.zero_range.store(false, Ordering::Relaxed);
                self.queue(
                    ctx,
                    STEP_PUNCH_THEN_ALLOC,
                    FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                )
            }
            (STEP_ZERO_RANGE, r) => Submit::Done(r.map(|_| 0)),
            (STEP_PUNCH_THEN_ALLOC, Ok(_)) => {
                self.queue(ctx, STEP_ALLOC, FallocateFlags::KEEP_SIZE)
            }
            (STEP_PUNCH_THEN_ALLOC, Err(e)) => Submit::Done(Err(e)),
            (_, _) => {
                tracing::error!(step, res, "file: completion for an unknown step");
                Submit::Done(Err(Errno::IO))
            }
        }
    }

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), Errno> {
        if self.block_device {
            out.push(Extent::data(len));
            return Ok(());
        }
        let block = u64::from(self.logical_block_size);
        super::file_extents(&self.fd, self.opts.offset, offset, len, block, out)
    }

    fn reads_zeroes(&self, offset: u64, len: u64) -> Result<bool, Errno> {
        if self.block_device {
            return Ok(false);
        }
        super::file_reads_zeroes(&self.fd, self.opts.offset, offset, len)
    }

    fn describe(&self) -> serde_json::Value {
        json!({
            "type": "file",
            "path": self.opts.path,
            "offset": self.opts.offset,
            "direct": self.direct,
            "read_only": self.opts.read_only,
            "block_device": self.block_device,
            "size": self.size(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_peer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            FileType::Fifo,
            Mode::RUSR | Mode::WUSR,
            0,
        )
        .unwrap();
        for read_only in [true, false] {
            let (tx, rx) = std::sync::mpsc::channel();
            let f = fifo.clone();
            // In a thread: a regression hangs in open(), and the deadline
            // below reports it instead of hanging the test run.
            std::thread::spawn(move || {
                let _ = tx.send(open_data(&f, read_only, false).map(drop));
            });
            let e = rx
                .recv_timeout(std::time::Duration::from_secs(5))
                .expect("open_data waited on a FIFO")
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                "not a regular file or block device: it is a FIFO"
            );
        }
        let e = open_data(dir.path(), true, false).unwrap_err();
        assert!(e.to_string().ends_with("it is a directory"), "{e}");
        let file = dir.path().join("f");
        std::fs::write(&file, [0u8; 512]).unwrap();
        let fd = open_data(&file, false, false).unwrap();
        // Blocking again once the type is known.
        assert!(!rustix::fs::fcntl_getfl(&fd)
            .unwrap()
            .contains(OFlags::NONBLOCK));
    }

    #[test]
    fn a_file_that_cannot_be_written_says_read_only_serves_it() {
        let denied = || std::io::Error::from_raw_os_error(Errno::ACCESS.raw_os_error());
        let e = writable_hint(denied(), false);
        assert!(
            e.to_string().ends_with("; --read-only serves it read-only"),
            "{e}"
        );
        assert_eq!(
            writable_hint(denied(), true).to_string(),
            denied().to_string()
        );
    }
}
