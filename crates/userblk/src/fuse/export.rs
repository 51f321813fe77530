//! The target as one regular file: FUSE file operations become block requests.
//!
//! The file system has a root directory holding one file, [`DISK_NAME`], of
//! the target's size. File operations map to requests:
//!
//! | file operation                  | request                                   |
//! |---------------------------------|-------------------------------------------|
//! | `read`                          | [`Op::Read`]                              |
//! | `write`                         | [`Op::Write`] (FUA with `O_SYNC`/`O_DSYNC`) |
//! | `fsync`, `fdatasync`            | [`Op::Flush`]                             |
//! | `fallocate(PUNCH_HOLE)`         | [`Op::WriteZeroes`] that may deallocate    |
//! | `fallocate(ZERO_RANGE)`         | [`Op::WriteZeroes`] with `NOUNMAP`         |
//!
//! A punched hole must read back as zeroes, which a discard does not
//! promise, hence write-zeroes for both. A target without write-zeroes gets
//! writes of zeroes instead. Byte ranges that are not block-aligned (small
//! buffered writes, `echo x > disk`) are widened to whole blocks with a
//! read-modify-write, serialised against other writes by a lock that aligned
//! requests, the common case, only share.
//!
//! Each FUSE thread runs requests on an [`Engine`] of its own, so a target
//! behaves here exactly as under ublk.

use std::ffi::OsStr;
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig, LockOwner,
    OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request as FuseRequest, WriteFlags,
};
use rustix::fs::OFlags;
use rustix::io::Errno;

use crate::slots::Engine;
use crate::target::{Caps, Flags, IoResult, Op, Request, Target};

/// Name of the file that is the device, in the mount's root directory.
pub const DISK_NAME: &str = "disk";

const ROOT_INO: u64 = 1;
const DISK_INO: u64 = 2;
/// Attributes never change behind the kernel's back: cache them for long.
const TTL: Duration = Duration::from_secs(3600);

/// `fallocate` mode bits (from `linux/falloc.h`).
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

thread_local! {
    /// Each serving thread's engine, per file system (tests mount several in one process).
    static ENGINES: std::cell::RefCell<std::collections::HashMap<u64, Engine>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Operation counters, for tests and logs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Reads served.
    pub reads: std::sync::atomic::AtomicU64,
    /// Writes served.
    pub writes: std::sync::atomic::AtomicU64,
    /// Flushes (`fsync`/`fdatasync`) served.
    pub flushes: std::sync::atomic::AtomicU64,
    /// Punch-hole and zero-range calls served.
    pub zeroes: std::sync::atomic::AtomicU64,
}

impl Counters {
    fn bump(counter: &std::sync::atomic::AtomicU64) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The inode of the file that is the device (for invalidations after a resize).
pub const DISK_INODE: u64 = DISK_INO;

/// The FUSE file system: one file backed by a target.
pub struct DiskFs {
    target: std::sync::Arc<dyn Target>,
    caps: Caps,
    buf_bytes: usize,
    /// Key of this file system's engines in [`ENGINES`].
    id: u64,
    /// Writes share it; read-modify-writes of partial blocks hold it alone.
    rmw: RwLock<()>,
    uid: u32,
    gid: u32,
    created: SystemTime,
    counters: std::sync::Arc<Counters>,
}

impl DiskFs {
    /// A file system serving `target`, moving at most `buf_bytes` per target request.
    pub fn new(
        target: std::sync::Arc<dyn Target>,
        buf_bytes: u32,
        counters: std::sync::Arc<Counters>,
    ) -> crate::Result<Self> {
        let caps = target.caps();
        caps.check()?;
        let lbs = caps.logical_block_size as usize;
        // Whole blocks, and at least one.
        let buf_bytes = (buf_bytes as usize / lbs).max(1) * lbs;
        // Fail now, not on the first request, if no ring can be made.
        drop(Engine::new(&*target, buf_bytes)?);
        Ok(DiskFs {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            target,
            caps,
            buf_bytes,
            rmw: RwLock::new(()),
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            created: SystemTime::now(),
            counters,
        })
    }

    /// The capabilities the file is served with (its size as at mount:
    /// the file's size is the target's now, which a resize changes).
    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    /// Run `f` with this thread's engine for this file system. Engines are
    /// per thread, not pooled: their rings are single-issuer.
    fn with_engine<R>(&self, f: impl FnOnce(&mut Engine) -> Result<R, Errno>) -> Result<R, Errno> {
        ENGINES.with(|cell| {
            let mut engines = cell.borrow_mut();
            let engine = match engines.entry(self.id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let engine = Engine::new(&*self.target, self.buf_bytes).map_err(|e| {
                        tracing::error!("fuse: no engine for a request: {e}");
                        Errno::NOMEM
                    })?;
                    v.insert(engine)
                }
            };
            f(engine)
        })
    }

    fn lbs(&self) -> u64 {
        u64::from(self.caps.logical_block_size)
    }

    fn chunk(&self) -> u64 {
        self.buf_bytes as u64
    }

    /// Read the block-aligned range `[offset, offset + out.len())` into `out`.
    fn read_aligned(&self, e: &mut Engine, offset: u64, out: &mut [u8]) -> Result<(), Errno> {
        for (i, piece) in out.chunks_mut(self.buf_bytes).enumerate() {
            let at = offset + i as u64 * self.chunk();
            let len = u32::try_from(piece.len()).map_err(|_| Errno::INVAL)?;
            expect_all(
                e.run(&*self.target, Request::new(Op::Read, at, len), piece),
                len,
            )?;
        }
        Ok(())
    }

    /// Write the block-aligned range `[offset, offset + data.len())`.
    fn write_aligned(
        &self,
        e: &mut Engine,
        offset: u64,
        data: &[u8],
        flags: Flags,
    ) -> Result<(), Errno> {
        for (i, piece) in data.chunks(self.buf_bytes).enumerate() {
            let at = offset + i as u64 * self.chunk();
            let len = u32::try_from(piece.len()).map_err(|_| Errno::INVAL)?;
            e.buf_mut()[..piece.len()].copy_from_slice(piece);
            let req = Request::new(Op::Write, at, len).with_flags(flags);
            expect_all(e.run_in_place(&*self.target, req), len)?;
        }
        Ok(())
    }

    /// Bytes of the file that `[offset, offset + len)` covers, clipped at its end.
    fn clip(&self, offset: u64, len: u64) -> u64 {
        len.min(self.target.size().saturating_sub(offset))
    }

    fn do_read(&self, offset: u64, size: u32, reply: ReplyData) {
        let len = self.clip(offset, u64::from(size));
        if len == 0 {
            reply.data(&[]);
            return;
        }
        Counters::bump(&self.counters.reads);
        let lbs = self.lbs();
        let start = offset - offset % lbs;
        let end = (offset + len).div_ceil(lbs) * lbs;
        let mut reply = Some(reply);
        let r = self.with_engine(|e| {
            let span = end - start;
            if start == offset && span == len && span <= self.chunk() {
                // The common case: one request, answered from the engine's buffer.
                let n = u32::try_from(span).map_err(|_| Errno::INVAL)?;
                expect_all(
                    e.run_in_place(&*self.target, Request::new(Op::Read, start, n)),
                    n,
                )?;
                if let Some(reply) = reply.take() {
                    reply.data(&e.buf()[..n as usize]);
                }
                return Ok(());
            }
            let mut whole = vec![0u8; usize::try_from(span).map_err(|_| Errno::NOMEM)?];
            self.read_aligned(e, start, &mut whole)?;
            let skip = usize::try_from(offset - start).map_err(|_| Errno::INVAL)?;
            if let Some(reply) = reply.take() {
                reply.data(&whole[skip..skip + to_usize(len)?]);
            }
            Ok(())
        });
        if let (Err(err), Some(reply)) = (r, reply) {
            tracing::debug!("fuse: read {offset}+{size}: {err}");
            reply.error(errno(err));
        }
    }

    fn do_write(&self, offset: u64, data: &[u8], sync: bool) -> Result<u32, Errno> {
        if self.caps.read_only {
            return Err(Errno::ROFS);
        }
        let len = self.clip(offset, data.len() as u64);
        if len == 0 {
            return if data.is_empty() {
                Ok(0)
            } else {
                Err(Errno::NOSPC)
            };
        }
        Counters::bump(&self.counters.writes);
        let data = &data[..to_usize(len)?];
        let flags = if sync && self.caps.volatile_cache && self.caps.fua {
            Flags::FUA
        } else {
            Flags::NONE
        };
        let lbs = self.lbs();
        if offset.is_multiple_of(lbs) && len.is_multiple_of(lbs) {
            let _shared = self.rmw.read().unwrap_or_else(PoisonError::into_inner);
            self.with_engine(|e| self.write_aligned(e, offset, data, flags))?;
        } else {
            let _alone = self.rmw.write().unwrap_or_else(PoisonError::into_inner);
            self.with_engine(|e| self.write_unaligned(e, offset, data, flags))?;
        }
        if sync && self.caps.volatile_cache && !self.caps.fua {
            self.flush()?;
        }
        u32::try_from(len).map_err(|_| Errno::INVAL)
    }

    /// Merge `data` into the whole blocks around it and write them back.
    fn write_unaligned(
        &self,
        e: &mut Engine,
        offset: u64,
        data: &[u8],
        flags: Flags,
    ) -> Result<(), Errno> {
        let lbs = self.lbs();
        let start = offset - offset % lbs;
        let end = (offset + data.len() as u64).div_ceil(lbs) * lbs;
        let mut whole = vec![0u8; usize::try_from(end - start).map_err(|_| Errno::NOMEM)?];
        let lbs_usize = to_usize(lbs)?;
        // Only the first and last blocks hold bytes we must keep.
        self.read_aligned(e, start, &mut whole[..lbs_usize])?;
        if end - start > lbs {
            let tail = whole.len() - lbs_usize;
            self.read_aligned(e, end - lbs, &mut whole[tail..])?;
        }
        let skip = to_usize(offset - start)?;
        whole[skip..skip + data.len()].copy_from_slice(data);
        self.write_aligned(e, start, &whole, flags)
    }

    fn flush(&self) -> Result<(), Errno> {
        Counters::bump(&self.counters.flushes);
        self.with_engine(|e| {
            e.run(&*self.target, Request::new(Op::Flush, 0, 0), &mut [])
                .map(drop)
        })
    }

    /// Make `[offset, offset + len)` read as zeroes; `keep` keeps it allocated.
    fn zero(&self, offset: u64, len: u64, keep: bool) -> Result<(), Errno> {
        if self.caps.read_only {
            return Err(Errno::ROFS);
        }
        let len = self.clip(offset, len);
        if len == 0 {
            return Ok(());
        }
        Counters::bump(&self.counters.zeroes);
        let lbs = self.lbs();
        let head_end = offset.div_ceil(lbs) * lbs;
        let tail_start = ((offset + len) / lbs * lbs).max(head_end);
        let _alone = self.rmw.write().unwrap_or_else(PoisonError::into_inner);
        self.with_engine(|e| {
            // Partial blocks at either end: write zeroes into them.
            if head_end > offset {
                let n = to_usize(head_end.min(offset + len) - offset)?;
                self.write_unaligned(e, offset, &vec![0u8; n], Flags::NONE)?;
            }
            if tail_start < offset + len && tail_start >= head_end {
                let n = to_usize(offset + len - tail_start)?;
                self.write_unaligned(e, tail_start, &vec![0u8; n], Flags::NONE)?;
            }
            if tail_start > head_end {
                self.zero_aligned(e, head_end, tail_start - head_end, keep)?;
            }
            Ok(())
        })
    }

    fn zero_aligned(&self, e: &mut Engine, offset: u64, len: u64, keep: bool) -> Result<(), Errno> {
        let Some(wz) = self.caps.write_zeroes else {
            // No write-zeroes: write buffers of zeroes.
            e.buf_mut().fill(0);
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(self.chunk());
                let n32 = u32::try_from(n).map_err(|_| Errno::INVAL)?;
                expect_all(
                    e.run_in_place(&*self.target, Request::new(Op::Write, at, n32)),
                    n32,
                )?;
                at += n;
            }
            return Ok(());
        };
        let flags = if keep { Flags::NOUNMAP } else { Flags::NONE };
        let max = (wz.max_bytes.min(u64::from(u32::MAX)) / self.lbs()) * self.lbs();
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(max);
            let n32 = u32::try_from(n).map_err(|_| Errno::INVAL)?;
            let req = Request::new(Op::WriteZeroes, at, n32).with_flags(flags);
            e.run(&*self.target, req, &mut [])?;
            at += n;
        }
        Ok(())
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT_INO => (FileType::Directory, 0o755, 0, 2),
            DISK_INO => (
                FileType::RegularFile,
                if self.caps.read_only { 0o444 } else { 0o644 },
                self.target.size(),
                1,
            ),
            _ => return None,
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: self.caps.physical_block_size,
            flags: 0,
        })
    }
}

/// A read or write that moved fewer bytes than asked is an I/O error here.
fn expect_all(r: IoResult, len: u32) -> Result<(), Errno> {
    match r {
        Ok(n) if n == len => Ok(()),
        Ok(n) => {
            tracing::warn!("fuse: target moved {n} of {len} bytes");
            Err(Errno::IO)
        }
        Err(e) => Err(e),
    }
}

fn errno(e: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e.raw_os_error())
}

fn to_usize(x: u64) -> Result<usize, Errno> {
    usize::try_from(x).map_err(|_| Errno::NOMEM)
}

fn oflags(flags: OpenFlags) -> OFlags {
    OFlags::from_bits_retain(flags.0.cast_unsigned())
}

fn is_sync(flags: OpenFlags) -> bool {
    oflags(flags).intersects(OFlags::SYNC | OFlags::DSYNC)
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &FuseRequest, config: &mut KernelConfig) -> std::io::Result<()> {
        // Let loop devices and io_uring keep many direct requests in flight.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO);
        let _ = config.set_max_write(u32::try_from(self.buf_bytes).unwrap_or(u32::MAX));
        let _ = config.set_max_background(256);
        let _ = config.set_congestion_threshold(192);
        Ok(())
    }

    fn lookup(&self, _req: &FuseRequest, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent.0, self.attr(DISK_INO)) {
            (ROOT_INO, Some(attr)) if name == DISK_NAME => {
                reply.entry(&TTL, &attr, fuser::Generation(0));
            }
            _ => reply.error(fuser::Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &FuseRequest, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(fuser::Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino.0) else {
            reply.error(fuser::Errno::ENOENT);
            return;
        };
        // The device has the size of its target: truncating or growing is refused.
        // Mode, owner and time changes are accepted and forgotten (cp -p, touch).
        match size {
            Some(s) if s != attr.size => reply.error(fuser::Errno::EPERM),
            _ => reply.attr(&TTL, &attr),
        }
    }

    fn open(&self, _req: &FuseRequest, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 != DISK_INO {
            reply.error(fuser::Errno::EISDIR);
            return;
        }
        if self.caps.read_only && oflags(flags) & OFlags::ACCMODE != OFlags::RDONLY {
            reply.error(fuser::Errno::EROFS);
            return;
        }
        // O_DIRECT opens bypass the page cache and may write in parallel;
        // buffered opens keep the cache (only this file system changes the data).
        let fopen = if oflags(flags).contains(OFlags::DIRECT) {
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        };
        reply.opened(FileHandle(0), fopen);
    }

    fn read(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino.0 != DISK_INO {
            reply.error(fuser::Errno::EISDIR);
            return;
        }
        self.do_read(offset, size, reply);
    }

    fn write(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino.0 != DISK_INO {
            reply.error(fuser::Errno::EISDIR);
            return;
        }
        match self.do_write(offset, data, is_sync(flags)) {
            Ok(n) => reply.written(n),
            Err(e) => {
                tracing::debug!("fuse: write {offset}+{}: {e}", data.len());
                reply.error(errno(e));
            }
        }
    }

    fn flush(
        &self,
        _req: &FuseRequest,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() is not a durability point; fsync is.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &FuseRequest,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &FuseRequest, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == ROOT_INO {
            reply.opened(FileHandle(0), FopenFlags::empty());
        } else {
            reply.error(fuser::Errno::ENOTDIR);
        }
    }

    fn readdir(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT_INO {
            reply.error(fuser::Errno::ENOTDIR);
            return;
        }
        let entries = [
            (ROOT_INO, FileType::Directory, "."),
            (ROOT_INO, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DISK_NAME),
        ];
        for (i, (ino, kind, name)) in entries
            .iter()
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        {
            // The offset given is that of the next entry.
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &FuseRequest, _ino: INodeNo, reply: ReplyStatfs) {
        // A loop device on the file takes its discard granularity from f_bsize.
        let bsize = self
            .caps
            .write_zeroes
            .map_or(self.caps.physical_block_size, |w| {
                w.granularity.max(self.caps.logical_block_size)
            });
        let blocks = self.target.size() / u64::from(bsize);
        reply.statfs(blocks, 0, 0, 2, 0, bsize, 255, bsize);
    }

    // No extended attributes and no SEEK_DATA/SEEK_HOLE: ENOSYS tells the
    // kernel once, quietly (the library's defaults log a warning per call).
    fn getxattr(
        &self,
        _req: &FuseRequest,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(fuser::Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &FuseRequest, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(fuser::Errno::ENOSYS);
    }

    fn lseek(
        &self,
        _req: &FuseRequest,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        reply.error(fuser::Errno::ENOSYS);
    }

    fn create(
        &self,
        _req: &FuseRequest,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(fuser::Errno::EPERM);
    }

    fn fallocate(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino.0 != DISK_INO {
            reply.error(fuser::Errno::EISDIR);
            return;
        }
        let known = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
        let end = offset.checked_add(length);
        let r = if mode & !known != 0 {
            Err(Errno::OPNOTSUPP)
        } else if mode & FALLOC_FL_PUNCH_HOLE != 0 {
            if mode & FALLOC_FL_ZERO_RANGE != 0 || mode & FALLOC_FL_KEEP_SIZE == 0 {
                // PUNCH_HOLE must come with KEEP_SIZE and alone, as for any file system.
                Err(Errno::OPNOTSUPP)
            } else {
                self.zero(offset, length, false)
            }
        } else if mode & FALLOC_FL_ZERO_RANGE != 0 {
            if end.is_none_or(|e| e > self.target.size()) && mode & FALLOC_FL_KEEP_SIZE == 0 {
                Err(Errno::NOSPC)
            } else {
                self.zero(offset, length, true)
            }
        } else if end.is_none_or(|e| e > self.target.size()) && mode & FALLOC_FL_KEEP_SIZE == 0 {
            // Plain allocation past the end would grow the file.
            Err(Errno::NOSPC)
        } else {
            Ok(())
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }
}
