//! An open qcow2 image: guest reads, writes, discards and zeroes, cluster
//! by cluster, over [`Meta`] and an optional backing chain.
//!
//! Metadata is behind one lock; reads and in-place writes of allocated
//! clusters happen outside it, so queues only meet on lookups and
//! allocations.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};

use rustix::io::Errno;

use super::header::{self, Header};
use super::meta::{self, CacheSizes, Mapping, Meta, COPIED, ZERO};
use super::{compress, Qcow2Error};
use crate::target::Extent;

/// Longest backing chain followed.
pub const MAX_CHAIN: usize = 16;

/// Something a qcow2 image reads unallocated clusters from.
pub trait Backing: Send + Sync + std::fmt::Debug {
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `off` (inside the size).
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), Errno>;
    /// Its description, for `list`.
    fn describe(&self) -> serde_json::Value;
}

/// A raw file as a backing file.
#[derive(Debug)]
struct Raw {
    file: File,
    size: u64,
    path: PathBuf,
}

impl Backing for Raw {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), Errno> {
        meta::read_full(&self.file, buf, off)
    }
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "format": "raw", "path": self.path })
    }
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open (and serve) read-only.
    pub read_only: bool,
    /// Metadata cache sizes.
    pub caches: CacheSizes,
}

/// An open qcow2 image.
#[derive(Debug)]
pub struct Image {
    pub(super) file: Arc<File>,
    path: PathBuf,
    pub(super) meta: Mutex<Meta>,
    backing: Option<Box<dyn Backing>>,
    header: Header,
    /// The virtual size: the header's, until [`Image::grow`].
    size: AtomicU64,
    read_only: bool,
    cluster_size: u64,
    /// The last compressed cluster read, decompressed: sequential reads
    /// of one cluster inflate it once.
    inflated: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// Held (shared) by writes from their lookup to their last byte, and
    /// (exclusive) by flushes, which free clusters: a write outside the
    /// metadata lock never lands in a cluster freed and reused meanwhile.
    writes: RwLock<()>,
    /// Writes in place whose data is still on its way through the ring
    /// (zero copy, `map.rs`): while there are any, a flush keeps released
    /// clusters unreused, since such a write may still land in one.
    pub(super) in_place: AtomicU64,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Qcow2Error {
    move |e| Qcow2Error::Io(what, e)
}

impl Image {
    /// Open the image at `path` and its backing chain.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image, Qcow2Error> {
        Self::open_chain(path, opts, &mut HashSet::new())
    }

    fn open_chain(
        path: &Path,
        opts: &OpenOptions,
        seen: &mut HashSet<PathBuf>,
    ) -> Result<Image, Qcow2Error> {
        // Both callers name `path` in their errors: the OS errors need not.
        let canon = std::fs::canonicalize(path).map_err(io(String::new()))?;
        if !seen.insert(canon.clone()) {
            return Err(Qcow2Error::Corrupt(format!(
                "backing file loop: {} appears twice in the chain",
                canon.display()
            )));
        }
        if seen.len() > MAX_CHAIN {
            return Err(Qcow2Error::Corrupt(format!(
                "backing chain longer than {MAX_CHAIN} images"
            )));
        }
        let file = File::from(
            crate::targets::file::open_data(path, opts.read_only, false)
                .map_err(io(String::new()))?,
        );
        if !opts.read_only {
            // One writer per image: a second daemon would corrupt it.
            rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                .map_err(|_| {
                    Qcow2Error::Busy("another process has the image open for writing".into())
                })?;
        }
        let file_len = file.metadata().map_err(io(String::new()))?.len();
        let mut first = vec![0u8; 4096];
        let n = read_prefix(&file, &mut first)?;
        first.truncate(n);
        let bits = Header::peek_cluster_bits(&first)?;
        let mut first = vec![0u8; 1 << bits];
        let n = read_prefix(&file, &mut first)?;
        first.truncate(n);
        let mut h = Header::parse(&first, file_len)?;
        if !opts.read_only {
            if h.incompatible & header::INCOMPAT_CORRUPT != 0 {
                return Err(Qcow2Error::Unsupported(
                    "the image is marked corrupt; open it read-only, or repair it with `qemu-img check -r all`".into(),
                ));
            }
            if h.incompatible & header::INCOMPAT_DIRTY != 0 {
                return Err(Qcow2Error::Unsupported(
                    "the image is dirty (lazy refcounts not written back); repair it with `qemu-img check -r all`, or open it read-only".into(),
                ));
            }
            if h.nb_snapshots > 0 {
                return Err(Qcow2Error::Unsupported(format!(
                    "writing to an image with internal snapshots ({}); open it read-only",
                    h.nb_snapshots
                )));
            }
            if h.autoclear != 0 {
                // Bitmaps and other auto-clear data we do not keep up to
                // date: the specification says to clear their bits first.
                file.write_all_at(&0u64.to_be_bytes(), header::OFF_AUTOCLEAR)
                    .and_then(|()| file.sync_data())
                    .map_err(io(format!("{}: clearing autoclear bits", path.display())))?;
                h.autoclear = 0;
            }
        }
        let backing = match &h.backing_file {
            None => None,
            Some(name) => Some(open_backing(path, name, h.backing_format.as_deref(), seen)?),
        };
        let file = Arc::new(file);
        let meta = Meta::open(file.clone(), &h, file_len, opts.caches, opts.read_only)?;
        Ok(Image {
            cluster_size: h.cluster_size(),
            file,
            path: path.to_path_buf(),
            meta: Mutex::new(meta),
            backing,
            size: AtomicU64::new(h.size),
            header: h,
            read_only: opts.read_only,
            inflated: Mutex::new(None),
            writes: RwLock::new(()),
            in_place: AtomicU64::new(0),
        })
    }

    /// The header as read at open.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The virtual size.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grow the virtual size to `new_size` bytes, durably (see `grow.rs`).
    pub fn grow(&self, new_size: u64) -> Result<(), Errno> {
        if new_size < self.size() {
            return Err(Errno::INVAL);
        }
        // No write between its lookup and its last byte while the tables move.
        let _writes = self.writes.write().unwrap_or_else(PoisonError::into_inner);
        self.meta().grow(new_size)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Where the image is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether there is a backing file.
    pub fn has_backing(&self) -> bool {
        self.backing.is_some()
    }

    /// The shared side of `writes`, held by a write from lookup to last byte.
    fn writing(&self) -> RwLockReadGuard<'_, ()> {
        self.writes.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn meta(&self) -> MutexGuard<'_, Meta> {
        // A panic while holding the lock cannot leave the tables half
        // updated in a way later calls trust more than the disk.
        self.meta.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where `[off, off + len)` splits into cluster pieces: (guest cluster,
    /// offset inside it, length).
    fn pieces(&self, off: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        let cs = self.cluster_size;
        let end = off + len;
        let mut pos = off;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let within = pos % cs;
            let n = (cs - within).min(end - pos);
            let p = (pos / cs, within, n);
            pos += n;
            Some(p)
        })
    }

    /// Read `buf.len()` bytes at guest offset `off`.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let cs = self.cluster_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let gc = pos / cs;
            let within = pos % cs;
            let left = (buf.len() - done) as u64;
            let max_clusters = (within + left).div_ceil(cs);
            let (m, run) = self.meta().mapping_run(gc, max_clusters)?;
            let n = usize::try_from((run * cs - within).min(left)).map_err(|_| Errno::IO)?;
            let piece = &mut buf[done..done + n];
            match m {
                Mapping::Unallocated => self.read_backing(pos, piece)?,
                Mapping::Zero { .. } => piece.fill(0),
                Mapping::Data { host, .. } => meta::read_full(&self.file, piece, host + within)?,
                Mapping::Compressed { host, len } => {
                    let c = self.inflate(host, len)?;
                    let w = usize::try_from(within).map_err(|_| Errno::IO)?;
                    piece.copy_from_slice(c.get(w..w + n).ok_or(Errno::IO)?);
                }
            }
            done += n;
        }
        Ok(())
    }

    fn read_backing(&self, pos: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        // Past the backing file's end reads as zeroes.
        let inside = usize::try_from(b.size().saturating_sub(pos))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if inside > 0 {
            b.read_at(&mut buf[..inside], pos)?;
        }
        buf[inside..].fill(0);
        Ok(())
    }

    fn inflate(&self, host: u64, len: u64) -> Result<Arc<Vec<u8>>, Errno> {
        let mut last = self.inflated.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((h, data)) = &*last {
            if *h == host {
                return Ok(data.clone());
            }
        }
        let mut raw = vec![0u8; usize::try_from(len).map_err(|_| Errno::IO)?];
        meta::read_full(&self.file, &mut raw, host)?;
        let cs = usize::try_from(self.cluster_size).map_err(|_| Errno::IO)?;
        let data = match compress::inflate(&raw, cs) {
            Ok(d) => Arc::new(d),
            Err(why) => {
                return Err(self
                    .meta()
                    .mark_corrupt(format!("compressed cluster at {host:#x}: {why}")))
            }
        };
        *last = Some((host, data.clone()));
        Ok(data)
    }

    /// The whole content of guest cluster `gc` as `m` maps it.
    fn cluster_content(&self, gc: u64, m: Mapping) -> Result<Vec<u8>, Errno> {
        let cs = usize::try_from(self.cluster_size).map_err(|_| Errno::IO)?;
        let mut buf = vec![0u8; cs];
        match m {
            Mapping::Unallocated => self.read_backing(gc * self.cluster_size, &mut buf)?,
            Mapping::Zero { .. } => {}
            Mapping::Data { host, .. } => meta::read_full(&self.file, &mut buf, host)?,
            Mapping::Compressed { host, len } => buf.copy_from_slice(&self.inflate(host, len)?),
        }
        Ok(buf)
    }

    /// Write `data` at guest offset `off`.
    pub fn write(&self, off: u64, data: &[u8]) -> Result<(), Errno> {
        if self.read_only {
            return Err(Errno::ROFS);
        }
        let _writing = self.writing();
        let mut done = 0usize;
        for (gc, within, n) in self.pieces(off, data.len() as u64) {
            let n = usize::try_from(n).map_err(|_| Errno::IO)?;
            self.write_piece(gc, within, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn write_piece(&self, gc: u64, within: u64, piece: &[u8]) -> Result<(), Errno> {
        let mut meta = self.meta();
        if let Some(why) = meta.corrupt() {
            tracing::debug!("qcow2: write refused: {why}");
            return Err(Errno::IO);
        }
        let m = meta.mapping(gc)?;
        if let Mapping::Data { host, copied } = m {
            // A clear flag on a cluster nothing else uses (other tools
            // leave that) is set on the way, not copied.
            let in_place = copied || meta.refcount(host / self.cluster_size)? == 1;
            if in_place {
                if !copied {
                    meta.set_entry(gc, host | COPIED)?;
                }
                drop(meta);
                return self
                    .file
                    .write_all_at(piece, host + within)
                    .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO));
            }
        }
        // Allocating: under the lock, so two writes to one new cluster
        // cannot both allocate it.
        let full = piece.len() as u64 == self.cluster_size;
        let content;
        let whole: &[u8] = if full {
            piece
        } else {
            let mut c = self.cluster_content(gc, m)?;
            let w = usize::try_from(within).map_err(|_| Errno::IO)?;
            c.get_mut(w..w + piece.len())
                .ok_or(Errno::IO)?
                .copy_from_slice(piece);
            content = c;
            &content
        };
        // The L2 table first, so data clusters written in order lie in order.
        meta.writable_l2(gc)?;
        let host = match m {
            // A preallocated zero cluster only this image uses: write into it.
            Mapping::Zero { host, copied: true } if host != 0 => host,
            _ => meta.alloc(1)?,
        };
        self.file
            .write_all_at(whole, host)
            .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
        meta.set_entry(gc, host | COPIED)
    }

    /// Discard whole clusters in `[off, off + len)`: they read as zeroes
    /// after (a zero cluster over a backing file, unallocated otherwise).
    /// Partial clusters are left as they are.
    pub fn discard(&self, off: u64, len: u64) -> Result<(), Errno> {
        let entry = if self.backing.is_none() {
            0
        } else if self.header.version >= 3 {
            ZERO
        } else {
            // Version 2 cannot hide the backing file's data: keep it.
            return Ok(());
        };
        for (gc, _, n) in self.pieces(off, len) {
            if n == self.cluster_size {
                self.meta().set_entry(gc, entry)?;
            }
        }
        Ok(())
    }

    /// Make `[off, off + len)` read as zeroes: whole clusters by their
    /// entries (keeping their allocation with `keep_allocated`), the rest
    /// by writing zeroes.
    pub fn write_zeroes(&self, off: u64, len: u64, keep_allocated: bool) -> Result<(), Errno> {
        if self.read_only {
            return Err(Errno::ROFS);
        }
        let cs = usize::try_from(self.cluster_size).map_err(|_| Errno::IO)?;
        let _writing = self.writing();
        for (gc, within, n) in self.pieces(off, len) {
            if n < self.cluster_size {
                let zeros = vec![0u8; usize::try_from(n).map_err(|_| Errno::IO)?];
                self.write_piece(gc, within, &zeros)?;
                continue;
            }
            let mut meta = self.meta();
            let m = meta.mapping(gc)?;
            if self.header.version >= 3 {
                let entry = match m {
                    Mapping::Data { host, copied: true } | Mapping::Zero { host, copied: true }
                        if keep_allocated && host != 0 =>
                    {
                        host | COPIED | ZERO
                    }
                    _ => ZERO,
                };
                meta.set_entry(gc, entry)?;
            } else if self.backing.is_none() && !keep_allocated {
                meta.set_entry(gc, 0)?;
            } else {
                drop(meta);
                self.write_piece(gc, 0, &vec![0u8; cs])?;
            }
        }
        Ok(())
    }

    /// Make every completed write durable.
    pub fn flush(&self) -> Result<(), Errno> {
        // Before the metadata lock, in the order writes take them.
        let _no_writes = self.writes.write().unwrap_or_else(PoisonError::into_inner);
        let mut meta = self.meta();
        // Read under the metadata lock, where in-place writes are counted.
        if self.in_place.load(Ordering::Acquire) == 0 {
            return meta.flush();
        }
        // Released clusters stay taken until a flush with none in flight.
        let keep = std::mem::take(&mut meta.pending_free);
        let r = meta.flush();
        meta.pending_free.extend(keep);
        r
    }

    /// Allocation of `[off, off + len)` as extents (see [`crate::Target::extents`]).
    pub fn extents(&self, off: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), Errno> {
        let first = out.len();
        for (gc, _, n) in self.pieces(off, len).take(4096) {
            let m = self.meta().mapping(gc)?;
            let e = match m {
                // Unallocated over a backing file reads the backing file's data.
                Mapping::Unallocated if self.backing.is_some() => Extent::data(n),
                Mapping::Unallocated => Extent::hole(n),
                Mapping::Zero { host, .. } => Extent {
                    len: n,
                    hole: host == 0,
                    zero: true,
                },
                Mapping::Data { .. } | Mapping::Compressed { .. } => Extent::data(n),
            };
            let ours = out.len() > first;
            match out.last_mut() {
                Some(l) if ours && l.hole == e.hole && l.zero == e.zero => l.len += e.len,
                _ => out.push(e),
            }
        }
        Ok(())
    }

    /// For `list`: the image, its format details and the backing chain.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "path": self.path,
            "version": self.header.version,
            "cluster_size": self.cluster_size,
            "backing": self.backing.as_ref().map(|b| b.describe()),
        })
    }
}

impl Backing for Image {
    fn size(&self) -> u64 {
        self.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), Errno> {
        self.read(off, buf)
    }
    fn describe(&self) -> serde_json::Value {
        let mut d = Image::describe(self);
        d["format"] = "qcow2".into();
        d
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if !self.read_only {
            if let Err(e) = self.meta().flush() {
                tracing::error!("qcow2: {}: final flush failed: {e}", self.path.display());
            }
        }
    }
}

fn read_prefix(file: &File, buf: &mut [u8]) -> Result<usize, Qcow2Error> {
    meta::read_upto(file, buf, 0).map_err(|e| Qcow2Error::Io("reading the header".into(), e))
}

/// Where the backing file `name` of the image at `image` is: relative
/// names are relative to the image's directory.
pub(super) fn backing_path(image: &Path, name: &str) -> PathBuf {
    match Path::new(name) {
        p if p.is_absolute() => p.to_path_buf(),
        p => image.parent().unwrap_or(Path::new(".")).join(p),
    }
}

/// The format of a backing file whose image records none: qcow2 if it
/// says so, raw otherwise.
pub(super) fn probe_format(file: &File) -> Result<&'static str, Qcow2Error> {
    let mut magic = [0u8; 4];
    let n = read_prefix(file, &mut magic)?;
    Ok(if n == 4 && u32::from_be_bytes(magic) == header::MAGIC {
        "qcow2"
    } else {
        "raw"
    })
}

/// Open the backing file `name` of the image at `image` (relative names
/// are relative to the image's directory), read-only.
fn open_backing(
    image: &Path,
    name: &str,
    format: Option<&str>,
    seen: &mut HashSet<PathBuf>,
) -> Result<Box<dyn Backing>, Qcow2Error> {
    let path = backing_path(image, name);
    let what =
        |e: std::io::Error| Qcow2Error::Backing(format!("{name} (as {}): {e}", path.display()));
    let file = File::from(crate::targets::file::open_data(&path, true, false).map_err(what)?);
    let format = match format {
        Some(f) => f.to_string(),
        None => probe_format(&file)?.to_string(),
    };
    match format.as_str() {
        "qcow2" => {
            let opts = OpenOptions {
                read_only: true,
                caches: CacheSizes {
                    l2: 64,
                    refblocks: 2,
                },
            };
            let img = Image::open_chain(&path, &opts, seen)
                .map_err(|e| Qcow2Error::Backing(format!("{}: {e}", path.display())))?;
            Ok(Box::new(img))
        }
        "raw" => {
            let size = file.metadata().map_err(what)?.len();
            Ok(Box::new(Raw { file, size, path }))
        }
        other => Err(Qcow2Error::Unsupported(format!(
            "backing file format {other:?} (qcow2 and raw are)"
        ))),
    }
}
