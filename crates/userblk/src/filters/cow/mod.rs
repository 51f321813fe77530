//! `cow`: a writable copy-on-write overlay over any target, which is never
//! written (`file=PATH,cluster=64K,keep=yes`).
//!
//! The device is divided into clusters. A cluster is either in the base
//! or in the overlay, a sparse local file (its layout is in the `map`
//! module): cluster `c` lives at `data_off + c * cluster`, so a request's
//! byte range is one contiguous range of the file too.
//!
//! - **Reads** of clusters all in the overlay are read from the file on
//!   the ring. Others go to the base, and the parts that are in the
//!   overlay are then read over the base's data from the file.
//! - **Writes** go to the file on the ring. A cluster the write covers
//!   only partly and that is not in the overlay yet is first copied up:
//!   read whole from the base and written to the file. Copy-up is
//!   synchronous (a side request on a private engine of the thread): the
//!   queue thread waits for the base read, and its other requests with it.
//!   Two requests needing the same cluster copy it once (the second waits).
//! - **Write-zeroes** copies up partial clusters, then punches the range
//!   out of the file; whole clusters join the overlay as holes. **Discard**
//!   does the same without copy-ups (it is a hint): parts of clusters not
//!   in the overlay keep their data.
//! - **Flush** makes the file's data durable, then the map (see
//!   `Map::persist`); FUA writes are written `RWF_DSYNC` and
//!   persist the map when they added clusters to it.
//!
//! A cluster joins the overlay (its bit is set) only once its data is in
//! the file, and a bit reaches the file only once the data is durable. So
//! after a crash, a cluster is either whole in the overlay or wholly the
//! base's: every write completed before the last completed flush (or
//! FUA) is there, and an unflushed write to a cluster that was new to the
//! overlay since that flush is lost whole, as if never made.

mod map;
mod overlay;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

use std::collections::HashSet;
use std::fmt;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use rustix::fs::FallocateFlags;
use rustix::io::{Errno, ReadWriteFlags};

use super::side::SideIo;
use super::spec::{self, Options, Printer, Spec};
use super::{Base, DataUse, Filter, FilterError};
use crate::target::{ring_result, Caps, Ctx, Extent, Flags, Op, RangeOpCaps, Submit, Target};
use overlay::Overlay;

/// Cluster size when neither `cluster=` nor an existing overlay says.
pub const DEFAULT_CLUSTER: u32 = 64 << 10;
/// Largest cluster.
pub const MAX_CLUSTER: u32 = 2 << 20;

/// The options of `cow`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    /// The overlay file (default: an unnamed temporary file).
    pub file: Option<PathBuf>,
    /// Cluster size (default: the existing overlay's, or [`DEFAULT_CLUSTER`]).
    pub cluster: Option<u32>,
    /// Keep the overlay file at exit (default: yes, with `file=`).
    pub keep: Option<bool>,
}

/// `yes`/`no` (and `true`/`false`, `1`/`0`, `on`/`off`).
pub(crate) fn yes_no(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "yes" | "true" | "1" | "on" => Ok(true),
        "no" | "false" | "0" | "off" => Ok(false),
        _ => Err(format!("'{s}' is not yes or no")),
    }
}

fn cluster_size(s: &str) -> Result<u32, String> {
    let n = spec::size(s)?;
    match u32::try_from(n) {
        Ok(c) if c.is_power_of_two() && (512..=MAX_CLUSTER).contains(&c) => Ok(c),
        _ => Err(format!(
            "a cluster is a power of two from 512 to {}",
            crate::size::format(MAX_CLUSTER.into())
        )),
    }
}

impl Config {
    /// Parse `[file=PATH][,cluster=SIZE][,keep=yes|no]`.
    pub fn parse(s: &Spec) -> Result<Self, FilterError> {
        let mut o = Options::new("cow", s);
        let file = o.get("file", spec::path)?;
        let cluster = o.get("cluster", cluster_size)?;
        let keep = o.get("keep", yes_no)?;
        o.finish()?;
        if keep == Some(true) && file.is_none() {
            return Err(FilterError::Invalid {
                filter: "cow",
                msg:
                    "keep=yes needs file=PATH (without it the overlay is an unnamed temporary file)"
                        .into(),
            });
        }
        Ok(Config {
            file,
            cluster,
            keep,
        })
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut p = Printer::new(f, "cow")?;
        p.opt_some("file", self.file.as_ref().map(|path| path.display()))?;
        p.opt_some(
            "cluster",
            self.cluster.map(|c| crate::size::format(c.into())),
        )?;
        p.opt_some("keep", self.keep.map(|k| if k { "yes" } else { "no" }))
    }
}

// The filter's ring steps.
const STEP_READ: u8 = 0;
const STEP_WRITE: u8 = 1;
const STEP_PUNCH: u8 = 2;
const STEP_ALLOC: u8 = 3;
const STEP_FLUSH: u8 = 4;

/// Figures about the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CowCounters {
    /// Clusters in the overlay.
    pub clusters: u64,
    /// Clusters copied up from the base since the filter started.
    pub copy_ups: u64,
}

/// The `cow` filter.
pub struct Cow {
    base: Base,
    ov: Overlay,
    keep: bool,
    /// Make the overlay durable at exit (cleared by tests that play a crash).
    exit_durable: bool,
    caps: Caps,
    side: SideIo,
    /// Clusters being copied up, and the wait for them.
    busy: Mutex<HashSet<u64>>,
    copied: Condvar,
    copy_ups: AtomicU64,
}

impl Cow {
    /// A copy-on-write overlay over `inner`, in the file `cfg` names.
    pub fn new(inner: Arc<dyn Target>, cfg: Config) -> Result<Self, FilterError> {
        let ic = inner.caps();
        let identity = identity(&*inner);
        if let Some(c) = cfg.cluster.filter(|&c| c < ic.logical_block_size) {
            return Err(FilterError::Invalid {
                filter: "cow",
                msg: format!(
                    "cluster={c} is smaller than the base's {}-byte blocks",
                    ic.logical_block_size
                ),
            });
        }
        let default = DEFAULT_CLUSTER.max(ic.logical_block_size);
        let ov = Overlay::open(cfg.file.as_deref(), cfg.cluster, default, &ic, &identity)?;
        let cluster = ov.layout.cluster;
        let range = |g: u32| ov.can_punch.then_some(RangeOpCaps::with_granularity(g));
        let caps = Caps {
            read_only: false,
            volatile_cache: true,
            fua: true,
            discard: range(cluster),
            write_zeroes: range(ic.logical_block_size),
            ..ic
        };
        let shown = Config {
            file: ov.path.clone(),
            cluster: Some(cluster),
            keep: cfg.keep.filter(|_| ov.path.is_some()),
        };
        if ov.path.is_none() {
            tracing::info!("cow: the overlay is an unnamed temporary file, gone at exit");
        }
        Ok(Cow {
            side: SideIo::new(&*inner, cluster),
            keep: cfg.keep.unwrap_or(true) && ov.path.is_some(),
            exit_durable: true,
            base: Base::new(inner, shown, DataUse::InMemory)?.with_caps(caps),
            ov,
            caps,
            busy: Mutex::new(HashSet::new()),
            copied: Condvar::new(),
            copy_ups: AtomicU64::new(0),
        })
    }

    /// Figures about the overlay.
    pub fn counters(&self) -> CowCounters {
        CowCounters {
            clusters: self.ov.map.count(),
            copy_ups: self.copy_ups.load(Ordering::Relaxed),
        }
    }

    /// Whether an existing overlay file was opened (rather than a new one made).
    pub fn reopened(&self) -> bool {
        self.ov.reopened
    }

    fn cluster(&self) -> u64 {
        u64::from(self.ov.layout.cluster)
    }

    /// Where device byte `offset` is in the overlay file.
    fn file_pos(&self, offset: u64) -> u64 {
        self.ov.layout.data_off + offset
    }

    /// The clusters `[offset, offset + len)` touches (`len` > 0).
    fn touched(&self, offset: u64, len: u64) -> (u64, u64) {
        (offset / self.cluster(), (offset + len - 1) / self.cluster())
    }

    /// The range of cluster `c` on the device (the last one may be short).
    fn span(&self, c: u64) -> (u64, u64) {
        let start = c * self.cluster();
        (start, (start + self.cluster()).min(self.caps.size))
    }

    /// Whether `[offset, end)` covers cluster `c` only in part.
    fn partial(&self, c: u64, offset: u64, end: u64) -> bool {
        let (s, e) = self.span(c);
        offset > s || end < e
    }

    /// Put the clusters wholly inside `[offset, end)` in the overlay.
    fn insert_whole(&self, offset: u64, end: u64) {
        let (first, last) = self.touched(offset, end - offset);
        for c in first..=last {
            if !self.partial(c, offset, end) {
                self.ov.map.insert(c);
            }
        }
    }

    /// Copy the partial clusters at either end of `[offset, end)` up, if
    /// they are not in the overlay yet.
    fn copy_up_ends(&self, offset: u64, end: u64) -> Result<(), Errno> {
        let (first, last) = self.touched(offset, end - offset);
        for c in [first, last] {
            if self.partial(c, offset, end) {
                self.copy_up(c)?;
            }
        }
        Ok(())
    }

    /// Bring cluster `c` into the overlay from the base (once, however
    /// many requests ask at the same time).
    fn copy_up(&self, c: u64) -> Result<(), Errno> {
        if self.ov.map.contains(c) {
            return Ok(());
        }
        {
            let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if self.ov.map.contains(c) {
                    return Ok(());
                }
                if busy.insert(c) {
                    break;
                }
                busy = self
                    .copied
                    .wait(busy)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
        let r = self.copy_cluster(c);
        if r.is_ok() {
            self.ov.map.insert(c);
            self.copy_ups.fetch_add(1, Ordering::Relaxed);
        }
        self.busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&c);
        self.copied.notify_all();
        r
    }

    /// Read cluster `c` from the base and write it to the file.
    fn copy_cluster(&self, c: u64) -> Result<(), Errno> {
        let (start, end) = self.span(c);
        let len = usize::try_from(end - start).map_err(|_| Errno::INVAL)?;
        let mut buf = vec![0u8; len];
        if let Err(e) = self.side.read(self.base.inner(), start, &mut buf) {
            tracing::warn!("cow: copy-up of cluster {c}: reading the base: {e}");
            return Err(e);
        }
        let fd = self.ov.fd.as_fd();
        let at = self.file_pos(start);
        if self.ov.can_punch && buf.iter().all(|&b| b == 0) {
            // A hole reads as zeroes and takes no space.
            let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            rustix::fs::fallocate(fd, punch, at, end - start)
        } else {
            map::write_all(fd, &buf, at)
        }
    }

    /// After the base served a read: lay the overlay's clusters over it.
    fn base_read_done(&self, ctx: &mut Ctx<'_>, s: Submit) -> Submit {
        match s {
            Submit::Done(Ok(n)) if ctx.req().op == Op::Read => match self.patch(ctx) {
                Ok(()) => Submit::Done(Ok(n)),
                Err(e) => Submit::Done(Err(e)),
            },
            other => other,
        }
    }

    /// Read the parts of the request that are in the overlay from the file.
    fn patch(&self, ctx: &mut Ctx<'_>) -> Result<(), Errno> {
        let req = *ctx.req();
        let (offset, end) = (req.offset, req.offset + u64::from(req.len));
        let (first, last) = self.touched(offset, u64::from(req.len));
        let fd = self.ov.fd.as_fd();
        let data = ctx.data_mut();
        let mut c = first;
        while c <= last {
            let inside = self.ov.map.contains(c);
            let run_end = self.ov.map.run_end(c, inside, last + 1);
            if inside {
                let from = self.span(c).0.max(offset);
                let to = (run_end * self.cluster()).min(end);
                let (a, b) = (to_usize(from - offset)?, to_usize(to - offset)?);
                map::read_exact(fd, &mut data[a..b], self.file_pos(from))?;
            }
            c = run_end;
        }
        Ok(())
    }

    /// Make everything completed so far durable: data, then the map.
    fn durable(&self) -> Result<(), Errno> {
        if self.ov.map.is_clean() {
            rustix::fs::fdatasync(&self.ov.fd)
        } else {
            self.ov.map.persist(self.ov.fd.as_fd())
        }
    }

    fn queued(r: Result<(), Errno>) -> Submit {
        match r {
            Ok(()) => Submit::Pending,
            Err(e) => Submit::Done(Err(e)),
        }
    }

    /// The part of a discard of `[offset, end)` to punch: partial clusters
    /// at either end that are not in the overlay are left alone.
    fn discard_range(&self, offset: u64, end: u64) -> (u64, u64) {
        let (first, last) = self.touched(offset, end - offset);
        let mut from = offset;
        let mut to = end;
        if self.partial(first, offset, end) && !self.ov.map.contains(first) {
            from = self.span(first).1.min(end);
        }
        if self.partial(last, offset, end) && !self.ov.map.contains(last) {
            to = self.span(last).0.max(from);
        }
        (from, to)
    }

    fn submit_op(&self, ctx: &mut Ctx<'_>) -> Submit {
        let req = *ctx.req();
        let fd = self.ov.fd.as_fd();
        let (offset, end) = (req.offset, req.offset + u64::from(req.len));
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match req.op {
            Op::Read => {
                let (first, last) = self.touched(offset, u64::from(req.len));
                if self.ov.map.contains_all(first, last) {
                    let at = self.file_pos(offset);
                    return Self::queued(ctx.read_at(fd, at, self.base.step(STEP_READ)));
                }
                let s = self.base.inner().submit(ctx);
                self.base_read_done(ctx, s)
            }
            Op::Write => {
                if let Err(e) = self.copy_up_ends(offset, end) {
                    return Submit::Done(Err(e));
                }
                let flags = if req.flags.contains(Flags::FUA) {
                    ReadWriteFlags::DSYNC
                } else {
                    ReadWriteFlags::empty()
                };
                let step = self.base.step(STEP_WRITE);
                Self::queued(ctx.write_at(fd, self.file_pos(offset), flags, step))
            }
            Op::WriteZeroes => {
                if let Err(e) = self.copy_up_ends(offset, end) {
                    return Submit::Done(Err(e));
                }
                let step = self.base.step(STEP_PUNCH);
                Self::queued(ctx.fallocate(fd, punch, self.file_pos(offset), end - offset, step))
            }
            Op::Discard => {
                let (from, to) = self.discard_range(offset, end);
                if from >= to {
                    return Submit::Done(Ok(0));
                }
                let step = self.base.step(STEP_PUNCH);
                Self::queued(ctx.fallocate(fd, punch, self.file_pos(from), to - from, step))
            }
            Op::Flush => {
                if self.ov.map.is_clean() {
                    return Self::queued(ctx.fsync(fd, true, self.base.step(STEP_FLUSH)));
                }
                Submit::Done(self.ov.map.persist(fd).map(|()| 0))
            }
        }
    }

    /// One of the filter's own ring operations completed.
    fn own_complete(&self, ctx: &mut Ctx<'_>, step: u8, res: i32) -> Submit {
        let req = *ctx.req();
        let (offset, end) = (req.offset, req.offset + u64::from(req.len));
        let fua = req.flags.contains(Flags::FUA);
        let result = ring_result(res);
        match (step, result) {
            (_, Err(e)) => Submit::Done(Err(e)),
            (STEP_READ, Ok(n)) => Submit::Done(if n == req.len { Ok(n) } else { Err(Errno::IO) }),
            (STEP_WRITE, Ok(n)) => {
                if n != req.len {
                    return Submit::Done(Err(Errno::IO));
                }
                self.insert_whole(offset, end);
                if fua && !self.ov.map.is_clean() {
                    if let Err(e) = self.ov.map.persist(self.ov.fd.as_fd()) {
                        return Submit::Done(Err(e));
                    }
                }
                Submit::Done(Ok(n))
            }
            (STEP_PUNCH, Ok(_))
                if req.op == Op::WriteZeroes && req.flags.contains(Flags::NOUNMAP) =>
            {
                // The range must stay allocated: allocate it again, as zeroes.
                let step = self.base.step(STEP_ALLOC);
                let at = self.file_pos(offset);
                Self::queued(ctx.fallocate(
                    self.ov.fd.as_fd(),
                    FallocateFlags::KEEP_SIZE,
                    at,
                    end - offset,
                    step,
                ))
            }
            (STEP_PUNCH | STEP_ALLOC, Ok(_)) => {
                self.insert_whole(offset, end);
                if fua {
                    if let Err(e) = self.durable() {
                        return Submit::Done(Err(e));
                    }
                }
                Submit::Done(Ok(0))
            }
            (STEP_FLUSH, Ok(_)) => Submit::Done(Ok(0)),
            (other, Ok(_)) => {
                tracing::error!(step = other, "cow: completion for an unknown step");
                Submit::Done(Err(Errno::IO))
            }
        }
    }
}

fn to_usize(n: u64) -> Result<usize, Errno> {
    usize::try_from(n).map_err(|_| Errno::INVAL)
}

/// The base as its description says, without filters above it (for the header).
fn identity(inner: &dyn Target) -> String {
    let mut d = inner.describe();
    if let Some(m) = d.as_object_mut() {
        m.remove("filters");
    }
    d.to_string()
}

impl Drop for Cow {
    fn drop(&mut self) {
        let c = self.counters();
        if self.keep {
            if let Err(e) = if self.exit_durable {
                self.durable()
            } else {
                Ok(())
            } {
                tracing::error!("cow: making the overlay durable at exit: {e}");
            }
        } else if let Some(p) = &self.ov.path {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::warn!("cow: removing {}: {e}", p.display());
            }
        }
        tracing::info!(
            "cow at exit: {} clusters in the overlay, {} copied up from the base{}",
            c.clusters,
            c.copy_ups,
            match (&self.ov.path, self.keep) {
                (Some(p), true) => format!("; kept in {}", p.display()),
                _ => "; overlay discarded".to_string(),
            }
        );
    }
}

impl fmt::Debug for Cow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cow")
            .field("base", &self.base)
            .field("path", &self.ov.path)
            .finish()
    }
}

impl Filter for Cow {
    fn base(&self) -> &Base {
        &self.base
    }

    fn filter_resize(&self, _new_size: u64) -> crate::Result<u64> {
        Err(self
            .base
            .cannot_resize("its overlay is laid out for the size of the base it was made on"))
    }

    fn filter_submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        self.submit_op(ctx)
    }

    fn filter_complete(&self, ctx: &mut Ctx<'_>, step: u16, res: i32) -> Submit {
        match self.base.own_step(step) {
            Some(n) => self.own_complete(ctx, n, res),
            // Only reads go down to the base.
            None => {
                let s = self.base.inner().complete(ctx, step, res);
                self.base_read_done(ctx, s)
            }
        }
    }

    fn filter_extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), Errno> {
        let end = offset + len.min(self.caps.size.saturating_sub(offset));
        let block = u64::from(self.caps.logical_block_size);
        let first = out.len();
        let mut pos = offset;
        while pos < end && out.len() - first < 1024 {
            let c = pos / self.cluster();
            let inside = self.ov.map.contains(c);
            let last = (end - 1) / self.cluster();
            let run_end = (self.ov.map.run_end(c, inside, last + 1) * self.cluster()).min(end);
            if inside {
                let data_off = self.ov.layout.data_off;
                crate::targets::file_extents(
                    &self.ov.fd,
                    data_off,
                    pos,
                    run_end - pos,
                    block,
                    out,
                )?;
            } else {
                self.base.inner().extents(pos, run_end - pos, out)?;
            }
            // The base may have said more than asked, or grown our last extent.
            super::clip_extents(out, first, run_end - offset);
            let now = offset + out[first..].iter().map(|e| e.len).sum::<u64>();
            if now <= pos {
                break;
            }
            pos = now;
        }
        Ok(())
    }

    fn filter_reads_zeroes(&self, offset: u64, len: u64) -> Result<bool, Errno> {
        if len == 0
            || offset
                .checked_add(len)
                .is_none_or(|end| end > self.caps.size)
        {
            return Ok(false);
        }
        // Each run of clusters asks where it lives: one SEEK_DATA in the
        // overlay file, or the base's own (cheap) answer.
        let end = offset + len;
        let (first, last) = self.touched(offset, len);
        let mut c = first;
        while c <= last {
            let inside = self.ov.map.contains(c);
            let run_end = self.ov.map.run_end(c, inside, last + 1);
            let from = self.span(c).0.max(offset);
            let to = (run_end * self.cluster()).min(end);
            let zero = if inside {
                let data_off = self.ov.layout.data_off;
                crate::targets::file_reads_zeroes(&self.ov.fd, data_off, from, to - from)?
            } else {
                self.base.inner().reads_zeroes(from, to - from)?
            };
            if !zero {
                return Ok(false);
            }
            c = run_end;
        }
        Ok(true)
    }
}
