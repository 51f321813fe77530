//! `mem`: a sparse RAM disk.
//!
//! Data lives in a memfd (tmpfs): unwritten ranges read as zeroes without
//! using memory, and discard and write-zeroes punch holes that give the
//! memory back. Writes are copied into a shared mapping of the memfd, and
//! reads out of it where every page was written that way; other reads are
//! `pread`, which reads holes as zeroes without allocating them (see
//! [`SharedMapping`]). All inline on the queue thread: tmpfs never blocks
//! on a disk.
//!
//! Under ublk zero copy the data never passes through the daemon's
//! memory: reads and writes are fixed-buffer operations between the
//! memfd and the request's own pages, on the queue's ring.
//!
//! A RAM disk in a named tmpfs file (for recovery) writes with `pwrite`
//! instead: that tmpfs has a size limit, and a write fault past it would
//! kill the daemon with SIGBUS, where `pwrite` returns ENOSPC.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use rustix::fs::{FallocateFlags, MemfdFlags, Mode, OFlags};
use rustix::io::{Errno, ReadWriteFlags};
use serde_json::json;

use crate::io::fd::{read_exact, write_all};
use crate::io::open::{open_checked, Kinds};
use crate::io::SharedMapping;
use crate::target::{Caps, Ctx, Extent, Flags, Op, RangeOpCaps, Submit, Target};
use crate::{Error, Result};

/// What a device kept in memory advertises (`mem`, and `null`, which
/// keeps nothing): discard and write-zeroes in 4 KiB pages, and no volatile
/// cache (a completed write is as durable as it will ever be).
pub(crate) fn ram_caps(size: u64) -> Caps {
    let range = RangeOpCaps::with_granularity(4096);
    Caps {
        discard: Some(range),
        write_zeroes: Some(range),
        ..Caps::new(size)
    }
}

/// A new memfd of `size` bytes (all holes) for target `name`.
pub(crate) fn sized_memfd(name: &str, size: u64) -> Result<OwnedFd> {
    if size == 0 {
        return Err(Error::invalid("size must be greater than 0"));
    }
    let fd = rustix::fs::memfd_create(format!("userblk-{name}"), MemfdFlags::CLOEXEC)
        .map_err(|e| Error::io("memfd_create", e))?;
    rustix::fs::ftruncate(&fd, size)
        .map_err(|e| Error::io(format!("{name}: cannot size the memfd to {size} bytes"), e))?;
    Ok(fd)
}

/// The mem target.
///
/// ```
/// use userblk::{slots::Engine, targets::MemTarget, Op, Request};
/// let t = MemTarget::new(1 << 20).unwrap();
/// let mut e = Engine::new(&t, 4096).unwrap();
/// let mut data = vec![0x5a; 4096];
/// assert_eq!(e.run(&t, Request::new(Op::Write, 8192, 4096), &mut data), Ok(4096));
/// let mut back = vec![0; 4096];
/// assert_eq!(e.run(&t, Request::new(Op::Read, 8192, 4096), &mut back), Ok(4096));
/// assert_eq!(back, data);
/// ```
#[derive(Debug)]
pub struct MemTarget {
    fd: OwnedFd,
    /// The memfd mapped, for writes (not for a named file: see the module docs).
    map: Option<SharedMapping>,
    /// Bytes served; changed only by a resize (see [`MemTarget::resize`]).
    size: AtomicU64,
    /// The tmpfs file holding the data when it must outlive the daemon.
    path: Option<PathBuf>,
    /// Writes hold it shared, a resize exclusively: a write admitted before
    /// a shrink must not land past the new end (it would extend a shared
    /// file again, which `recover` refuses, or come back after a grow).
    resizing: RwLock<()>,
}

impl MemTarget {
    /// A zero-filled RAM disk of `size` bytes; memory is used only as it is written.
    pub fn new(size: u64) -> Result<Self> {
        let fd = sized_memfd("mem", size)?;
        // Without the mapping (no address space for it) writes use pwrite.
        let map = SharedMapping::new(fd.as_fd(), size).ok();
        Ok(MemTarget {
            fd,
            map,
            size: AtomicU64::new(size),
            path: None,
            resizing: RwLock::new(()),
        })
    }

    /// A RAM disk whose data lives in a new tmpfs file at `path` (under
    /// `/dev/shm`), so a later daemon can find it again with
    /// [`MemTarget::open_shared`] after this one dies. The file is the
    /// caller's to remove when the device is deleted.
    pub fn create_shared(size: u64, path: &Path) -> Result<Self> {
        if size == 0 {
            return Err(Error::invalid("size must be greater than 0"));
        }
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL;
        let fd = open_checked(path, flags, Mode::RUSR | Mode::WUSR, Kinds::Regular)
            .map_err(|e| Error::path(path, e))?;
        if let Err(e) = rustix::fs::ftruncate(&fd, size) {
            let _ = std::fs::remove_file(path);
            return Err(Error::io(
                format!("mem: cannot size {} to {size} bytes", path.display()),
                e,
            ));
        }
        Ok(MemTarget {
            fd,
            map: None,
            size: AtomicU64::new(size),
            path: Some(path.to_path_buf()),
            resizing: RwLock::new(()),
        })
    }

    /// Reopen the data of an earlier [`MemTarget::create_shared`].
    pub fn open_shared(path: &Path, size: u64) -> Result<Self> {
        let fd = open_checked(path, OFlags::RDWR, Mode::empty(), Kinds::Regular)
            .map_err(|e| Error::path(path, e))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| Error::path(path, e))?;
        if u64::try_from(st.st_size).ok() != Some(size) {
            return Err(Error::invalid(format!(
                "{}: holds {} bytes, expected {size}",
                path.display(),
                st.st_size
            )));
        }
        Ok(MemTarget {
            fd,
            map: None,
            size: AtomicU64::new(size),
            path: Some(path.to_path_buf()),
            resizing: RwLock::new(()),
        })
    }

    /// Where the data lives, for a shared RAM disk.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Bytes of memory the data currently occupies.
    pub fn resident_bytes(&self) -> Result<u64> {
        let st = rustix::fs::fstat(&self.fd).map_err(|e| Error::io("fstat memfd", e))?;
        Ok(u64::try_from(st.st_blocks).unwrap_or(0) * 512)
    }

    fn read(&self, ctx: &mut Ctx<'_>) -> Result<u32, Errno> {
        let off = ctx.req().offset;
        let buf = ctx.data_mut();
        if let Some(map) = self.mapped(off, buf.len()) {
            if map.read(off, buf)? {
                return Ok(ctx.done_bytes());
            }
        }
        read_exact(self.fd.as_fd(), buf, off)?;
        Ok(ctx.done_bytes())
    }

    fn write(&self, ctx: &Ctx<'_>) -> Result<u32, Errno> {
        let off = ctx.req().offset;
        let buf = ctx.data();
        let _no_resize = self.resizing.read().unwrap_or_else(PoisonError::into_inner);
        if off.saturating_add(buf.len() as u64) > self.size() {
            return Err(Errno::IO);
        }
        if let Some(map) = self.mapped(off, buf.len()) {
            map.write(off, buf)?;
            return Ok(ctx.done_bytes());
        }
        write_all(self.fd.as_fd(), buf, off)?;
        Ok(ctx.done_bytes())
    }

    /// The mapping, if it covers `[offset, offset + len)`: a device grown
    /// past it is read and written with `pread`/`pwrite` there.
    fn mapped(&self, offset: u64, len: usize) -> Option<&SharedMapping> {
        let map = self.map.as_ref()?;
        let end = offset.checked_add(len as u64)?;
        (end <= map.len() as u64).then_some(map)
    }

    /// The memfd's length now.
    fn file_len(&self) -> Result<u64> {
        let st = rustix::fs::fstat(&self.fd).map_err(|e| Error::io("fstat memfd", e))?;
        Ok(u64::try_from(st.st_size).unwrap_or(0))
    }

    /// A read or write under zero copy: the kernel moves the data between
    /// the memfd and the request's pages. Reads of holes give zeroes
    /// without allocating them, as `pread` does; the mapping is left out
    /// (it serves only requests whose data is in the daemon's memory, and
    /// reads it only where it wrote every page itself).
    fn submit_fixed(&self, ctx: &mut Ctx<'_>) -> Submit {
        let off = ctx.req().offset;
        let queued = if ctx.req().op == Op::Read {
            ctx.read_at(self.fd.as_fd(), off, 0)
        } else {
            ctx.write_at(self.fd.as_fd(), off, ReadWriteFlags::empty(), 0)
        };
        match queued {
            Ok(()) => Submit::Pending,
            Err(e) => Submit::Done(Err(e)),
        }
    }

    fn zero(&self, offset: u64, len: u64, keep_allocated: bool) -> Result<u32, Errno> {
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if let Some(map) = &self.map {
            map.forget(offset, len);
        }
        rustix::fs::fallocate(&self.fd, punch, offset, len)?;
        if keep_allocated {
            // NOUNMAP: the range must stay provisioned, so allocate it again (as zeroes).
            rustix::fs::fallocate(&self.fd, FallocateFlags::KEEP_SIZE, offset, len)?;
        }
        Ok(0)
    }
}

impl Target for MemTarget {
    fn caps(&self) -> Caps {
        ram_caps(self.size())
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Growing extends the memfd (holes: no memory until written).
    /// Shrinking gives the memory past the new end back; a memfd that is
    /// mapped keeps its length, since a mapped page past the end of a file
    /// faults with SIGBUS, and a request in flight may still touch it.
    fn resize(&self, new_size: u64) -> Result<u64> {
        let _no_writes = self
            .resizing
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let old = self.size();
        let what = || format!("mem: resizing from {old} to {new_size} bytes");
        if self.map.is_none() || new_size > self.file_len()? {
            rustix::fs::ftruncate(&self.fd, new_size).map_err(|e| Error::io(what(), e))?;
        }
        if new_size < old {
            // Past the end now: it must read as zeroes if the device grows again.
            if let Some(map) = &self.map {
                map.forget(new_size, old - new_size);
                let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                rustix::fs::fallocate(&self.fd, punch, new_size, old - new_size)
                    .map_err(|e| Error::io(what(), e))?;
            }
        }
        self.size.store(new_size, Ordering::Release);
        Ok(new_size)
    }

    fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        let req = *ctx.req();
        if req.op.has_data() && !ctx.has_data_buffer() {
            return self.submit_fixed(ctx);
        }
        Submit::Done(match req.op {
            Op::Read => self.read(ctx),
            Op::Write => self.write(ctx),
            Op::Flush => Ok(0),
            Op::Discard => self.zero(req.offset, req.len.into(), false),
            Op::WriteZeroes => self.zero(
                req.offset,
                req.len.into(),
                req.flags.contains(Flags::NOUNMAP),
            ),
        })
    }

    fn complete(&self, ctx: &mut Ctx<'_>, _step: u16, res: i32) -> Submit {
        Submit::Done(super::whole_transfer(ctx, res))
    }

    fn data_on_ring_only(&self) -> bool {
        true
    }

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), Errno> {
        super::file_extents(&self.fd, 0, offset, len, 512, out)
    }

    fn reads_zeroes(&self, offset: u64, len: u64) -> Result<bool, Errno> {
        super::file_reads_zeroes(&self.fd, 0, offset, len)
    }

    fn describe(&self) -> serde_json::Value {
        match &self.path {
            Some(p) => json!({ "type": "mem", "size": self.size(), "path": p }),
            None => json!({ "type": "mem", "size": self.size() }),
        }
    }
}
