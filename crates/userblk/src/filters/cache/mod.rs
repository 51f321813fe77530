//! `cache`: a read cache, or with `mode=writeback` a write-back cache, for
//! slow targets (`size=256M,block=64K[,file=PATH][,mode=writeback]`).
//!
//! Blocks of `block` bytes are kept in memory (or in `file=PATH`), at most
//! `size` bytes of them, least recently used evicted first (the `store`
//! module says how). A read served entirely from the cache is a hit; any
//! other read goes down whole (a miss) and, on its way back, gives the
//! cache the sectors it did not have.
//!
//! - **write-through** (the default): writes, discards and write-zeroes go
//!   down; when a write comes back, the sectors it wrote that were cached
//!   take its data (or are dropped, if another write in the shard was in
//!   flight at the same time, whose order below is unknown). A read that
//!   was in flight while a write went on does not fill the cache.
//! - **write-back**: a write completes into the cache as dirty data. Dirty
//!   blocks are written down (synchronously, on the thread that needs it)
//!   when a flush comes (which then goes down too, and completes only
//!   after both), when a FUA write is made (its blocks, then a flush
//!   below), before a discard or write-zeroes of their range, when they are
//!   evicted, and at exit. The device then advertises a volatile cache and
//!   FUA. What was not flushed is lost if the daemon dies: a volatile
//!   cache, as advertised.
//!
//! Hits, misses, evictions and write-backs are counted ([`Cache::counters`])
//! and logged at exit.

mod lru;
mod store;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

use std::fmt;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use super::side::SideIo;
use super::spec::{self, Options, Printer, Spec};
use super::{Base, DataUse, Filter, FilterError};
use crate::io::fd::{read_exact, write_all};
use crate::target::{Caps, Ctx, Extent, Flags, Op, Submit, Target};
use store::{FileStore, Store};

/// Cache size when `size=` is not given.
pub const DEFAULT_SIZE: u64 = 256 << 20;
/// Block size when `block=` is not given.
pub const DEFAULT_BLOCK: u32 = 64 << 10;
/// Largest block.
pub const MAX_BLOCK: u32 = 1 << 20;

const MAGIC: &[u8; 16] = b"UBLKCACHE1\0\0\0\0\0\0";

/// The options of `cache`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Most bytes of blocks kept.
    pub size: u64,
    /// Block size: the unit of eviction.
    pub block: u32,
    /// Keep the blocks in this file instead of memory.
    pub file: Option<PathBuf>,
    /// Writes complete into the cache.
    pub writeback: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            size: DEFAULT_SIZE,
            block: DEFAULT_BLOCK,
            file: None,
            writeback: false,
        }
    }
}

fn block_size(s: &str) -> Result<u32, String> {
    match u32::try_from(spec::size(s)?) {
        Ok(b) if b.is_power_of_two() && (512..=MAX_BLOCK).contains(&b) => Ok(b),
        _ => Err(format!(
            "a block is a power of two from 512 to {}",
            crate::size::format(MAX_BLOCK.into())
        )),
    }
}

fn mode(s: &str) -> Result<bool, String> {
    match s.trim() {
        "writethrough" | "write-through" => Ok(false),
        "writeback" | "write-back" => Ok(true),
        _ => Err(format!("'{s}' is not writethrough or writeback")),
    }
}

fn invalid(msg: String) -> FilterError {
    FilterError::Invalid {
        filter: "cache",
        msg,
    }
}

impl Config {
    /// Parse `[size=SIZE][,block=SIZE][,file=PATH][,mode=writethrough|writeback]`.
    pub fn parse(s: &Spec) -> Result<Self, FilterError> {
        let mut o = Options::new("cache", s);
        let d = Config::default();
        let size = o.get("size", spec::size)?.unwrap_or(d.size);
        let block = o.get("block", block_size)?.unwrap_or(d.block);
        let file = o.get("file", spec::path)?;
        let writeback = o.get("mode", mode)?.unwrap_or(false);
        o.finish()?;
        if size < u64::from(block) {
            return Err(invalid(format!(
                "size={} holds no {} block",
                crate::size::format(size),
                crate::size::format(block.into())
            )));
        }
        Ok(Config {
            size,
            block,
            file,
            writeback,
        })
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut p = Printer::new(f, "cache")?;
        p.opt("size", crate::size::format(self.size))?;
        p.opt("block", crate::size::format(self.block.into()))?;
        p.opt_some("file", self.file.as_ref().map(|path| path.display()))?;
        p.opt_some("mode", self.writeback.then_some("writeback"))
    }
}

/// What the cache has counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounters {
    /// Reads served entirely from the cache.
    pub hits: u64,
    /// Reads that went down.
    pub misses: u64,
    /// Bytes of the hits.
    pub hit_bytes: u64,
    /// Bytes of the misses.
    pub miss_bytes: u64,
    /// Blocks added.
    pub inserts: u64,
    /// Blocks evicted to make room.
    pub evictions: u64,
    /// Dirty blocks written down (write-back).
    pub writebacks: u64,
    /// Blocks held now.
    pub blocks: u64,
}

/// The `cache` filter.
pub struct Cache {
    base: Base,
    cfg: Config,
    store: Store,
    side: SideIo,
    /// The inner target has a volatile cache to flush.
    inner_volatile: bool,
}

impl Cache {
    /// Cache `inner`'s blocks as `cfg` says.
    pub fn new(inner: Arc<dyn Target>, mut cfg: Config) -> Result<Self, FilterError> {
        let ic = inner.caps();
        if cfg.block < ic.logical_block_size {
            return Err(invalid(format!(
                "block={} is smaller than the target's {}-byte blocks",
                cfg.block, ic.logical_block_size
            )));
        }
        let file = match &cfg.file {
            Some(p) => {
                let abs = super::absolute("cache", p, p.display().to_string())?;
                let f = open_file(&abs, cfg.block)?;
                cfg.file = Some(abs);
                Some(f)
            }
            None => None,
        };
        let blocks = cfg.size / u64::from(cfg.block);
        let store = Store::new(blocks, cfg.block, ic.logical_block_size, ic.size, file);
        let caps = if cfg.writeback {
            Caps {
                volatile_cache: true,
                fua: true,
                ..ic
            }
        } else {
            ic
        };
        tracing::debug!(
            "cache: {blocks} blocks of {} in {} shards",
            cfg.block,
            store.shard_count()
        );
        Ok(Cache {
            side: SideIo::new(&*inner, cfg.block),
            base: Base::new(inner, &cfg, DataUse::InMemory)?.with_caps(caps),
            cfg,
            store,
            inner_volatile: ic.volatile_cache,
        })
    }

    /// What has been counted so far.
    pub fn counters(&self) -> CacheCounters {
        let c = &self.store.counters;
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        CacheCounters {
            hits: n(&c.hits),
            misses: n(&c.misses),
            hit_bytes: n(&c.hit_bytes),
            miss_bytes: n(&c.miss_bytes),
            inserts: n(&c.inserts),
            evictions: n(&c.evictions),
            writebacks: n(&c.writebacks),
            blocks: self.store.len() as u64,
        }
    }

    /// Write block `b`'s dirty data down, if it has any.
    fn write_down(&self, b: u64) -> Result<(), Errno> {
        let Some(mut wd) = self.store.take_dirty(b)? else {
            return Ok(());
        };
        let mut r = Ok(());
        for (offset, data) in &mut wd.runs {
            r = self
                .side
                .write(self.base.inner(), *offset, Flags::NONE, data);
            if r.is_err() {
                break;
            }
        }
        self.store.finish_write_down(&wd, r.is_ok());
        if let Err(e) = r {
            tracing::warn!("cache: writing block {b} back: {e}");
        }
        r
    }

    /// Write every dirty block (of a range, or all) down.
    fn write_down_all(&self, range: Option<(u64, u64)>) -> Result<(), Errno> {
        for b in self.store.dirty_blocks(range) {
            self.write_down(b)?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) {
        let mask = self.store.shards_of(offset, len);
        self.store.trim(mask, &|b| self.write_down(b));
    }

    /// Whether the cache holds data of `[offset, offset + len)` that the
    /// target has not been given yet.
    fn holds_dirty(&self, offset: u64, len: u64) -> bool {
        self.cfg.writeback && !self.store.dirty_blocks(Some((offset, len))).is_empty()
    }

    /// A write-back write: into the cache, and down at once if FUA.
    fn write_in(&self, ctx: &Ctx<'_>) -> Result<u32, Errno> {
        let req = *ctx.req();
        let len = u64::from(req.len);
        self.store.write_in(req.offset, ctx.data())?;
        if req.flags.contains(Flags::FUA) {
            for b in self.store.blocks(req.offset, len) {
                self.write_down(b)?;
            }
            if self.inner_volatile {
                self.side.flush(self.base.inner())?;
            }
        }
        self.trim(req.offset, len);
        Ok(req.len)
    }

    /// What happens to a request's result on its way up.
    fn after(&self, ctx: &mut Ctx<'_>, s: Submit) -> Submit {
        let Submit::Done(r) = s else {
            return s;
        };
        let req = *ctx.req();
        let len = u64::from(req.len);
        match req.op {
            Op::Read => {
                let filled = match r {
                    Ok(_) => {
                        let since = ctx.marked(self.base.layer());
                        self.store.fill(req.offset, ctx.data_mut(), since)
                    }
                    Err(_) => Ok(()),
                };
                self.store.unpin(req.offset, len);
                if let Err(e) = filled {
                    tracing::warn!("cache: {e}");
                    return Submit::Done(Err(e));
                }
                self.trim(req.offset, len);
            }
            Op::Write => self
                .store
                .end_down(req.offset, len, r.is_ok().then(|| ctx.data())),
            Op::Discard | Op::WriteZeroes => self.store.end_down(req.offset, len, None),
            Op::Flush => {}
        }
        s
    }
}

/// Open (or make) the file the blocks are kept in: a new file, or one an
/// earlier cache left (its contents are not used); never anything else.
fn open_file(path: &std::path::Path, block: u32) -> Result<FileStore, FilterError> {
    let shown = path.display();
    let io = |what: String| FilterError::io::<Errno>("cache", what);
    let fd = crate::io::open::open_checked(
        path,
        OFlags::RDWR | OFlags::CREATE,
        Mode::RUSR | Mode::WUSR,
        crate::io::open::Kinds::Regular,
    )
    .map_err(FilterError::io("cache", format!("opening {shown}")))?;
    let st = rustix::fs::fstat(&fd).map_err(io(format!("stat {shown}")))?;
    if st.st_size > 0 {
        let mut head = [0u8; 16];
        if read_exact(fd.as_fd(), &mut head, 0).is_err() || &head != MAGIC {
            return Err(invalid(format!(
                "{shown} exists and is not a cache file; refusing to overwrite it"
            )));
        }
    }
    match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(Errno::WOULDBLOCK) => return Err(invalid(format!("{shown}: in use by another cache"))),
        Err(e) => return Err(io(format!("locking {shown}"))(e)),
    }
    let w = io(format!("writing {shown}"));
    rustix::fs::ftruncate(&fd, 0)
        .and_then(|()| write_all(fd.as_fd(), MAGIC, 0))
        .map_err(w)?;
    Ok(FileStore {
        fd,
        data_off: u64::from(block).max(4096),
    })
}

impl Drop for Cache {
    fn drop(&mut self) {
        if self.cfg.writeback {
            let r = self.write_down_all(None).and_then(|()| {
                if self.inner_volatile {
                    self.side.flush(self.base.inner())
                } else {
                    Ok(())
                }
            });
            if let Err(e) = r {
                tracing::error!("cache: writing dirty blocks back at exit: {e}; they are lost");
            }
        }
        if let Some(p) = &self.cfg.file {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::warn!("cache: removing {}: {e}", p.display());
            }
        }
        let c = self.counters();
        tracing::info!(
            "cache at exit: {} hits ({} bytes), {} misses ({} bytes), {} inserts, {} evictions, {} write-backs",
            c.hits,
            c.hit_bytes,
            c.misses,
            c.miss_bytes,
            c.inserts,
            c.evictions,
            c.writebacks
        );
    }
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("base", &self.base)
            .field("counters", &self.counters())
            .finish()
    }
}

impl Filter for Cache {
    fn base(&self) -> &Base {
        &self.base
    }

    fn filter_resize(&self, _new_size: u64) -> crate::Result<u64> {
        Err(self
            .base
            .cannot_resize("its cache file is laid out for the size it was made with"))
    }

    fn filter_submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        let req = *ctx.req();
        let len = u64::from(req.len);
        let c = &self.store.counters;
        match req.op {
            Op::Read => {
                if self.store.read_hit(req.offset, ctx.data_mut()) {
                    c.hits.fetch_add(1, Ordering::Relaxed);
                    c.hit_bytes.fetch_add(len, Ordering::Relaxed);
                    return Submit::Done(Ok(req.len));
                }
                c.misses.fetch_add(1, Ordering::Relaxed);
                c.miss_bytes.fetch_add(len, Ordering::Relaxed);
                ctx.mark(self.base.layer());
                self.store.pin(req.offset, len);
            }
            Op::Write if self.cfg.writeback => return Submit::Done(self.write_in(ctx)),
            Op::Write => self.store.begin_down(req.offset, len),
            Op::Discard | Op::WriteZeroes => {
                // Dirty data there must not land after the zeroes.
                if self.cfg.writeback {
                    if let Err(e) = self.write_down_all(Some((req.offset, len))) {
                        return Submit::Done(Err(e));
                    }
                }
                self.store.begin_down(req.offset, len);
            }
            Op::Flush => {
                if self.cfg.writeback {
                    if let Err(e) = self.write_down_all(None) {
                        return Submit::Done(Err(e));
                    }
                }
            }
        }
        let s = self.base.inner().submit(ctx);
        self.after(ctx, s)
    }

    // No ring work of its own: every completion is the inner target's,
    // and its result comes here.
    fn filter_result(&self, ctx: &mut Ctx<'_>, s: Submit) -> Submit {
        self.after(ctx, s)
    }

    fn filter_extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), Errno> {
        if self.holds_dirty(offset, len) {
            // Data not below yet: call it all data (always true).
            out.push(Extent::data(len));
            return Ok(());
        }
        self.base.inner().extents(offset, len, out)
    }

    fn filter_reads_zeroes(&self, offset: u64, len: u64) -> Result<bool, Errno> {
        // Dirty blocks may hold anything; elsewhere the cache holds the target's bytes.
        if self.holds_dirty(offset, len) {
            return Ok(false);
        }
        self.base.inner().reads_zeroes(offset, len)
    }
}
