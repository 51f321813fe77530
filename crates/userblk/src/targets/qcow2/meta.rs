//! qcow2 metadata: the L1 table, cached L2 tables and refcount blocks,
//! cluster allocation, and the write order that keeps an image consistent
//! across a crash.
//!
//! The order (what qemu-img check calls "no corruption"; leaks are allowed):
//! - a cluster's refcount reaches the disk before any L2 or L1 entry
//!   pointing at it (so a crash can leak a cluster, never hand one out twice);
//! - a new L2 table reaches the disk before the L1 entry pointing at it;
//! - a cluster is freed (its refcount lowered, so it can be reused) only
//!   after the L2/L1 entries that stopped pointing at it are on disk.
//!
//! Metadata is cached and written back at flush ([`Meta::flush`]), or
//! when the caches evict, with the same ordering. Guest data is written
//! to the file at once; the flush's `fdatasync` makes it durable.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use rustix::io::Errno;

use super::header::{self, OFF_INCOMPATIBLE, OFF_REFCOUNT_TABLE};

/// L1/L2 entry: the cluster's refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// L2 entry: a compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 entry (version 3): the cluster reads as zeroes.
pub const ZERO: u64 = 1;
/// Host offset bits of L1 and standard L2 entries (9 to 55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// What a guest cluster maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Nothing here: the backing file's data, or zeroes.
    Unallocated,
    /// Reads as zeroes; `host` is a preallocated cluster (or 0).
    Zero {
        /// The preallocated cluster, 0 if none.
        host: u64,
        /// `host`'s refcount is one.
        copied: bool,
    },
    /// Data at `host`.
    Data {
        /// The host cluster.
        host: u64,
        /// Its refcount is one: it can be written in place.
        copied: bool,
    },
    /// Compressed data: `len` bytes at `host` (not aligned).
    Compressed {
        /// Where the compressed bytes start.
        host: u64,
        /// How many bytes they may span.
        len: u64,
    },
}

/// Sizes derived from the header.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// The cluster size in bytes.
    pub cluster_size: u64,
    /// Entries in one L2 table.
    pub l2_entries: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Refcounts in one refcount block.
    pub rb_entries: u64,
    /// The qcow2 version (zero clusters need 3).
    pub version: u32,
}

impl Geometry {
    /// From the header's fields.
    pub fn new(cluster_bits: u32, refcount_order: u32, version: u32) -> Self {
        let cluster_size = 1u64 << cluster_bits;
        let refcount_bits = 1u32 << refcount_order;
        Geometry {
            cluster_bits,
            cluster_size,
            l2_entries: cluster_size / 8,
            refcount_bits,
            rb_entries: cluster_size * 8 / u64::from(refcount_bits),
            version,
        }
    }

    /// The largest refcount an entry holds.
    pub fn refcount_max(&self) -> u64 {
        if self.refcount_bits == 64 {
            u64::MAX
        } else {
            (1u64 << self.refcount_bits) - 1
        }
    }

    /// Decode an L2 entry.
    pub fn decode(&self, e: u64) -> Result<Mapping, String> {
        if e & COMPRESSED != 0 {
            // x = 62 - (cluster_bits - 8) bits of offset, then the sector count.
            let x = 62 - (self.cluster_bits - 8);
            let host = e & ((1u64 << x) - 1);
            let sectors = ((e & !COPIED & !COMPRESSED) >> x) + 1;
            let len = (sectors * 512).saturating_sub(host & 511);
            if host == 0 || len == 0 {
                return Err(format!("compressed cluster entry {e:#x} is empty"));
            }
            return Ok(Mapping::Compressed { host, len });
        }
        let host = e & OFFSET_MASK;
        let copied = e & COPIED != 0;
        if e & 0x1fe != 0 || e & 0x3f00_0000_0000_0000 != 0 {
            return Err(format!("L2 entry {e:#x} has reserved bits set"));
        }
        if !host.is_multiple_of(self.cluster_size) {
            return Err(format!(
                "L2 entry {e:#x} points inside a cluster ({host:#x})"
            ));
        }
        if e & ZERO != 0 {
            if self.version < 3 {
                return Err(format!("L2 entry {e:#x}: zero flag in a version 2 image"));
            }
            return Ok(Mapping::Zero { host, copied });
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Data { host, copied })
    }
}

/// A cached metadata cluster (an L2 table or a refcount block), raw bytes.
#[derive(Debug)]
struct Table {
    data: Vec<u8>,
    dirty: bool,
    used: u64,
}

/// A bounded cache of metadata clusters by host offset, evicting the least
/// recently used (the caller writes dirty victims back first).
#[derive(Debug)]
struct Cache {
    tables: HashMap<u64, Table>,
    cap: usize,
    tick: u64,
}

impl Cache {
    fn new(cap: usize) -> Self {
        Cache {
            tables: HashMap::new(),
            cap: cap.max(2),
            tick: 0,
        }
    }

    fn get(&mut self, off: u64) -> Option<&mut Table> {
        self.tick += 1;
        let t = self.tables.get_mut(&off)?;
        t.used = self.tick;
        Some(t)
    }

    fn full(&self) -> bool {
        self.tables.len() >= self.cap
    }

    fn victim(&self) -> Option<(u64, bool)> {
        self.tables
            .iter()
            .min_by_key(|(_, t)| t.used)
            .map(|(&off, t)| (off, t.dirty))
    }

    fn insert(&mut self, off: u64, data: Vec<u8>, dirty: bool) {
        self.tick += 1;
        self.tables.insert(
            off,
            Table {
                data,
                dirty,
                used: self.tick,
            },
        );
    }

    /// Write table `off` back to `file` if it is dirty.
    fn write_back(&mut self, file: &File, off: u64) -> Result<(), Errno> {
        if let Some(t) = self.tables.get_mut(&off) {
            if t.dirty {
                file.write_all_at(&t.data, off).map_err(|e| io_err(&e))?;
                t.dirty = false;
            }
        }
        Ok(())
    }

    fn dirty(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .tables
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&o, _)| o)
            .collect();
        v.sort_unstable();
        v
    }
}

fn be64_at(b: &[u8], i: usize) -> u64 {
    let mut x = [0u8; 8];
    if let Some(s) = b.get(i * 8..i * 8 + 8) {
        x.copy_from_slice(s);
    }
    u64::from_be_bytes(x)
}

fn set_be64_at(b: &mut [u8], i: usize, v: u64) {
    if let Some(s) = b.get_mut(i * 8..i * 8 + 8) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// Write a table of 64-bit entries (L1, refcount table) at `off`, big-endian.
pub(super) fn write_entries(file: &File, entries: &[u64], off: u64) -> Result<(), Errno> {
    let raw: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
    file.write_all_at(&raw, off).map_err(|e| io_err(&e))
}

/// Entry `i` of a refcount block of `bits`-bit entries.
pub fn refcount_get(block: &[u8], i: u64, bits: u32) -> u64 {
    let bit = i * u64::from(bits);
    let Ok(byte) = usize::try_from(bit / 8) else {
        return 0;
    };
    if bits < 8 {
        let shift = bit % 8;
        let mask = (1u64 << bits) - 1;
        block
            .get(byte)
            .map_or(0, |&b| (u64::from(b) >> shift) & mask)
    } else {
        let n = (bits / 8) as usize;
        block.get(byte..byte + n).map_or(0, |s| {
            s.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        })
    }
}

/// Set entry `i` of a refcount block of `bits`-bit entries.
pub fn refcount_set(block: &mut [u8], i: u64, bits: u32, v: u64) {
    let bit = i * u64::from(bits);
    let Ok(byte) = usize::try_from(bit / 8) else {
        return;
    };
    if bits < 8 {
        let shift = bit % 8;
        let mask = ((1u64 << bits) - 1) << shift;
        if let Some(b) = block.get_mut(byte) {
            let cur = u64::from(*b) & !mask;
            *b = u8::try_from(cur | ((v << shift) & mask)).unwrap_or(0);
        }
    } else {
        let n = (bits / 8) as usize;
        if let Some(s) = block.get_mut(byte..byte + n) {
            for (k, b) in s.iter_mut().rev().enumerate() {
                *b = u8::try_from((v >> (8 * k)) & 0xff).unwrap_or(0);
            }
        }
    }
}

/// The two kinds of cached metadata cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    L2,
    Refblock,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::L2 => "an L2 table",
            Kind::Refblock => "a refcount block",
        }
    }
}

/// Everything about an open image's metadata, behind the image's lock.
#[derive(Debug)]
pub struct Meta {
    pub(super) file: Arc<File>,
    /// Sizes.
    pub g: Geometry,
    pub(super) l1: Vec<u64>,
    pub(super) l1_offset: u64,
    l1_dirty: bool,
    l2: Cache,
    reftable: Vec<u64>,
    reftable_offset: u64,
    reftable_clusters: u64,
    reftable_dirty: bool,
    /// The header must be told where the refcount table moved.
    reftable_moved: bool,
    refblocks: Cache,
    /// Clusters to release once no durable entry points at them.
    pub(super) pending_free: Vec<u64>,
    /// Where the search for a free cluster starts (a cluster index).
    free_hint: u64,
    /// The file's length in clusters, counting clusters allocated past it.
    file_clusters: u64,
    /// Set when the image turns out to be corrupt: no more writes.
    corrupt: Option<String>,
    read_only: bool,
}

/// Cache sizes: how many L2 tables and refcount blocks stay in memory.
#[derive(Debug, Clone, Copy)]
pub struct CacheSizes {
    /// L2 tables.
    pub l2: usize,
    /// Refcount blocks.
    pub refblocks: usize,
}

pub(super) fn io_err(e: &std::io::Error) -> Errno {
    Errno::from_io_error(e).unwrap_or(Errno::IO)
}

impl Meta {
    /// Load the L1 and refcount tables of an image whose header is `h`.
    pub fn open(
        file: Arc<File>,
        h: &header::Header,
        file_len: u64,
        caches: CacheSizes,
        read_only: bool,
    ) -> Result<Meta, super::Qcow2Error> {
        let g = Geometry::new(h.cluster_bits, h.refcount_order, h.version);
        let read_table = |off: u64, entries: u64| -> Result<Vec<u64>, super::Qcow2Error> {
            let bytes = usize::try_from(entries * 8)
                .map_err(|_| super::Qcow2Error::Corrupt("table too large".into()))?;
            let mut raw = vec![0u8; bytes];
            file.read_exact_at(&mut raw, off)
                .map_err(|e| super::Qcow2Error::Io(format!("reading a table at {off:#x}"), e))?;
            Ok((0..bytes / 8).map(|i| be64_at(&raw, i)).collect())
        };
        let l1 = read_table(h.l1_table_offset, u64::from(h.l1_size))?;
        let rt_clusters = u64::from(h.refcount_table_clusters);
        let reftable = read_table(h.refcount_table_offset, rt_clusters * g.cluster_size / 8)?;
        let file_clusters = file_len.div_ceil(g.cluster_size);
        let meta = Meta {
            file,
            g,
            l1,
            l1_offset: h.l1_table_offset,
            l1_dirty: false,
            l2: Cache::new(caches.l2),
            reftable,
            reftable_offset: h.refcount_table_offset,
            reftable_clusters: rt_clusters,
            reftable_dirty: false,
            reftable_moved: false,
            refblocks: Cache::new(caches.refblocks),
            pending_free: Vec::new(),
            free_hint: 0,
            file_clusters,
            corrupt: None,
            read_only,
        };
        // Every L1 entry and refcount table entry must point at a cluster
        // boundary: checked here once so lookups can trust them less.
        for (i, &e) in meta.l1.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if e & !(OFFSET_MASK | COPIED) != 0 || !off.is_multiple_of(g.cluster_size) {
                return Err(super::Qcow2Error::Corrupt(format!(
                    "L1 entry {i} ({e:#x}) is not a cluster-aligned offset"
                )));
            }
        }
        for (i, &e) in meta.reftable.iter().enumerate() {
            if e % g.cluster_size != 0 || e > header::MAX_HOST_OFFSET {
                return Err(super::Qcow2Error::Corrupt(format!(
                    "refcount table entry {i} ({e:#x}) is not a cluster-aligned offset"
                )));
            }
        }
        Ok(meta)
    }

    /// Why the image is marked corrupt, if it is.
    pub fn corrupt(&self) -> Option<&str> {
        self.corrupt.as_deref()
    }

    /// Note that the image is corrupt: log it once, refuse writes from now
    /// on, and (version 3, writable) set the corrupt bit in the header as
    /// qemu does. Returns EIO for the request that found it.
    pub fn mark_corrupt(&mut self, why: String) -> Errno {
        if self.corrupt.is_none() {
            tracing::error!("qcow2: image is corrupt: {why}; no more writes");
            if !self.read_only && self.g.version >= 3 {
                let mut b = [0u8; 8];
                if self.file.read_exact_at(&mut b, OFF_INCOMPATIBLE).is_ok() {
                    let v = u64::from_be_bytes(b) | header::INCOMPAT_CORRUPT;
                    let _ = self.file.write_all_at(&v.to_be_bytes(), OFF_INCOMPATIBLE);
                    let _ = self.file.sync_data();
                }
            }
            self.corrupt = Some(why);
        }
        Errno::IO
    }

    pub(super) fn writable(&self) -> Result<(), Errno> {
        if self.read_only {
            return Err(Errno::ROFS);
        }
        if self.corrupt.is_some() {
            return Err(Errno::IO);
        }
        Ok(())
    }

    /// Whether `[off, off + len)` overlaps the header, the L1 table or the
    /// refcount table: an L2 table or refcount block there is corruption.
    fn hits_fixed_metadata(&self, off: u64) -> bool {
        let cs = self.g.cluster_size;
        off < cs
            || header::overlap((off, cs), (self.l1_offset, self.l1.len() as u64 * 8))
            || header::overlap(
                (off, cs),
                (self.reftable_offset, self.reftable_clusters * cs),
            )
    }

    fn check_table_offset(&mut self, what: &str, off: u64) -> Result<(), Errno> {
        let cs = self.g.cluster_size;
        if !off.is_multiple_of(cs)
            || self.hits_fixed_metadata(off)
            || off / cs >= self.file_clusters
        {
            return Err(self.mark_corrupt(format!(
                "{what} at {off:#x} is misplaced (unaligned, over fixed metadata, or past the end)"
            )));
        }
        Ok(())
    }

    fn read_cluster(&self, off: u64) -> Result<Vec<u8>, Errno> {
        let mut data = vec![0u8; self.cluster_len()];
        read_full(&self.file, &mut data, off)?;
        Ok(data)
    }

    fn cluster_len(&self) -> usize {
        usize::try_from(self.g.cluster_size).unwrap_or(usize::MAX)
    }

    // ---- L2 ----------------------------------------------------------------

    fn cache(&mut self, kind: Kind) -> &mut Cache {
        match kind {
            Kind::L2 => &mut self.l2,
            Kind::Refblock => &mut self.refblocks,
        }
    }

    /// Make room in a cache, writing a dirty victim back first: an L2
    /// table only once the refcounts it may depend on are durable; a
    /// refcount block at any time (it only ever holds increments not yet
    /// durable, and decrements whose entries are already gone from disk).
    fn make_room(&mut self, kind: Kind) -> Result<(), Errno> {
        let cache = self.cache(kind);
        if !cache.full() {
            return Ok(());
        }
        let Some((off, dirty)) = cache.victim() else {
            return Ok(());
        };
        if dirty {
            if kind == Kind::L2 {
                self.write_refcounts(true)?;
            }
            self.write_table(kind, off)?;
        }
        self.cache(kind).tables.remove(&off);
        Ok(())
    }

    fn write_table(&mut self, kind: Kind, off: u64) -> Result<(), Errno> {
        let file = &self.file;
        match kind {
            Kind::L2 => self.l2.write_back(file, off),
            Kind::Refblock => self.refblocks.write_back(file, off),
        }
    }

    /// Have table `off` in its cache, checking where it is first.
    fn load(&mut self, kind: Kind, off: u64) -> Result<(), Errno> {
        if self.cache(kind).get(off).is_some() {
            return Ok(());
        }
        self.check_table_offset(kind.name(), off)?;
        let data = self.read_cluster(off)?;
        self.make_room(kind)?;
        self.cache(kind).insert(off, data, false);
        Ok(())
    }

    /// The raw L2 entry of guest cluster `gc` (0 when unmapped).
    pub fn entry(&mut self, gc: u64) -> Result<u64, Errno> {
        let l1_idx = usize::try_from(gc / self.g.l2_entries).map_err(|_| Errno::IO)?;
        let Some(&l1e) = self.l1.get(l1_idx) else {
            return Ok(0);
        };
        let l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(0);
        }
        self.load(Kind::L2, l2_off)?;
        let i = usize::try_from(gc % self.g.l2_entries).map_err(|_| Errno::IO)?;
        Ok(self.l2.get(l2_off).map_or(0, |t| be64_at(&t.data, i)))
    }

    /// What guest cluster `gc` maps to.
    pub fn mapping(&mut self, gc: u64) -> Result<Mapping, Errno> {
        let e = self.entry(gc)?;
        self.g.decode(e).map_err(|why| self.mark_corrupt(why))
    }

    /// Guest cluster `gc`'s mapping and how many clusters from it (up to
    /// `max`) continue it: unallocated or zero runs, or data clusters that
    /// are contiguous in the file, so one read serves them all.
    pub fn mapping_run(&mut self, gc: u64, max: u64) -> Result<(Mapping, u64), Errno> {
        let first = self.mapping(gc)?;
        let mut n = 1;
        while n < max {
            let next = self.mapping(gc + n)?;
            let continues = match (first, next) {
                (Mapping::Unallocated, Mapping::Unallocated) => true,
                (Mapping::Zero { .. }, Mapping::Zero { .. }) => true,
                (Mapping::Data { host: a, .. }, Mapping::Data { host: b, .. }) => {
                    b == a + n * self.g.cluster_size
                }
                _ => false,
            };
            if !continues {
                break;
            }
            n += 1;
        }
        Ok((first, n))
    }

    /// The L2 table for guest cluster `gc`, writable (refcount one), made
    /// if there is none. Returns its offset.
    pub fn writable_l2(&mut self, gc: u64) -> Result<u64, Errno> {
        let l1_idx = usize::try_from(gc / self.g.l2_entries).map_err(|_| Errno::IO)?;
        let l1e = *self.l1.get(l1_idx).ok_or(Errno::IO)?;
        let off = l1e & OFFSET_MASK;
        if off == 0 {
            let new = self.alloc(1)?;
            self.make_room(Kind::L2)?;
            self.l2.insert(new, vec![0u8; self.cluster_len()], true);
            self.l1[l1_idx] = new | COPIED;
            self.l1_dirty = true;
            return Ok(new);
        }
        if l1e & COPIED == 0 {
            // Images from other tools may leave the flag clear on a table
            // only the active L1 uses; a shared one means snapshots, which
            // are not opened for writing.
            let rc = self.refcount(off / self.g.cluster_size)?;
            if rc != 1 {
                return Err(self.mark_corrupt(format!(
                    "L2 table at {off:#x} is shared (refcount {rc}) by a snapshot"
                )));
            }
            self.l1[l1_idx] = off | COPIED;
            self.l1_dirty = true;
        }
        self.load(Kind::L2, off)?;
        Ok(off)
    }

    /// Point guest cluster `gc` at `entry`; the clusters the old entry
    /// used are released once the change is durable.
    pub fn set_entry(&mut self, gc: u64, entry: u64) -> Result<(), Errno> {
        self.writable()?;
        let old = self.mapping(gc)?;
        if entry == 0 && old == Mapping::Unallocated {
            return Ok(());
        }
        let off = self.writable_l2(gc)?;
        let i = usize::try_from(gc % self.g.l2_entries).map_err(|_| Errno::IO)?;
        let t = self.l2.get(off).ok_or(Errno::IO)?;
        set_be64_at(&mut t.data, i, entry);
        t.dirty = true;
        let keep = entry & OFFSET_MASK;
        match old {
            Mapping::Data { host, .. } | Mapping::Zero { host, .. }
                if host != 0 && host != keep =>
            {
                self.pending_free.push(host / self.g.cluster_size);
            }
            Mapping::Compressed { host, len } => {
                let cs = self.g.cluster_size;
                for c in host / cs..=(host + len - 1) / cs {
                    self.pending_free.push(c);
                }
            }
            _ => {}
        }
        Ok(())
    }

    // ---- refcounts -----------------------------------------------------------

    /// The refcount of host cluster `c`.
    pub fn refcount(&mut self, c: u64) -> Result<u64, Errno> {
        let rt = usize::try_from(c / self.g.rb_entries).map_err(|_| Errno::IO)?;
        let off = match self.reftable.get(rt) {
            Some(&o) if o != 0 => o,
            _ => return Ok(0),
        };
        self.load(Kind::Refblock, off)?;
        let bits = self.g.refcount_bits;
        Ok(self
            .refblocks
            .get(off)
            .map_or(0, |t| refcount_get(&t.data, c % self.g.rb_entries, bits)))
    }

    /// Set host cluster `c`'s refcount; its refcount block must exist.
    fn set_refcount(&mut self, c: u64, v: u64) -> Result<(), Errno> {
        if v > self.g.refcount_max() {
            return Err(self.mark_corrupt(format!("refcount of cluster {c} would overflow")));
        }
        let rt = usize::try_from(c / self.g.rb_entries).map_err(|_| Errno::IO)?;
        let off = match self.reftable.get(rt) {
            Some(&o) if o != 0 => o,
            _ => return Err(Errno::IO),
        };
        self.load(Kind::Refblock, off)?;
        let bits = self.g.refcount_bits;
        let i = c % self.g.rb_entries;
        let t = self.refblocks.get(off).ok_or(Errno::IO)?;
        refcount_set(&mut t.data, i, bits, v);
        t.dirty = true;
        Ok(())
    }

    /// Make sure cluster `c` has a refcount block, placing a new one in the
    /// range it covers (outside `avoid`, a run being allocated). Returns
    /// whether anything was allocated (the caller's free run may be stale).
    fn ensure_refblock(&mut self, c: u64, avoid: (u64, u64)) -> Result<bool, Errno> {
        let rt = usize::try_from(c / self.g.rb_entries).map_err(|_| Errno::IO)?;
        let mut grew = false;
        if rt >= self.reftable.len() {
            self.grow_reftable(rt + 1)?;
            grew = true;
        }
        if self.reftable[rt] != 0 {
            return Ok(grew);
        }
        // Nothing in this block's range has a refcount yet, so all of it is
        // free: the block goes at its first cluster not being allocated.
        let first = rt as u64 * self.g.rb_entries;
        let mut at = first;
        while at >= avoid.0 && at < avoid.0 + avoid.1 {
            at += 1;
        }
        let off = at * self.g.cluster_size;
        self.make_room(Kind::Refblock)?;
        let mut data = vec![0u8; self.cluster_len()];
        refcount_set(&mut data, at - first, self.g.refcount_bits, 1);
        self.refblocks.insert(off, data, true);
        self.reftable[rt] = off;
        self.reftable_dirty = true;
        self.file_clusters = self.file_clusters.max(at + 1);
        Ok(true)
    }

    /// Replace the refcount table with one of at least `min_entries`
    /// entries, at a new place; the old one is freed once the header
    /// points at the new one durably.
    fn grow_reftable(&mut self, min_entries: usize) -> Result<(), Errno> {
        let per_cluster = self.cluster_len() / 8;
        let want = (self.reftable.len() * 2)
            .max(min_entries + 1)
            .next_multiple_of(per_cluster);
        if want as u64 * 8 > header::MAX_REFTABLE_BYTES {
            tracing::error!(
                "qcow2: the refcount table cannot grow past {} entries",
                want
            );
            return Err(Errno::NOSPC);
        }
        let old = (self.reftable_offset, self.reftable_clusters);
        // In memory first, so allocating its new home can make refcount
        // blocks in the range it now covers.
        self.reftable.resize(want, 0);
        let clusters = (want / per_cluster) as u64;
        let off = self.alloc(clusters)?;
        self.reftable_offset = off;
        self.reftable_clusters = clusters;
        self.reftable_dirty = true;
        self.reftable_moved = true;
        let cs = self.g.cluster_size;
        for c in old.0 / cs..old.0 / cs + old.1 {
            self.pending_free.push(c);
        }
        tracing::debug!("qcow2: refcount table grew to {want} entries at {off:#x}");
        Ok(())
    }

    /// Allocate `n` contiguous host clusters (refcount one); their offset.
    pub fn alloc(&mut self, n: u64) -> Result<u64, Errno> {
        self.writable()?;
        let limit = header::MAX_HOST_OFFSET / self.g.cluster_size;
        'search: loop {
            let mut start = self.free_hint;
            let mut run = 0;
            while run < n {
                let c = start + run;
                if c >= limit {
                    return Err(Errno::NOSPC);
                }
                if self.refcount(c)? != 0 {
                    start = c + 1;
                    run = 0;
                } else {
                    run += 1;
                }
            }
            for c in start..start + n {
                if self.ensure_refblock(c, (start, n))? {
                    // A new block (or table) may have taken part of the run.
                    continue 'search;
                }
            }
            for c in start..start + n {
                self.set_refcount(c, 1)?;
            }
            self.free_hint = start + n;
            self.file_clusters = self.file_clusters.max(start + n);
            return Ok(start * self.g.cluster_size);
        }
    }

    /// Lower the refcount of every cluster released since the last flush.
    fn apply_frees(&mut self) -> Result<(), Errno> {
        let mut frees = std::mem::take(&mut self.pending_free);
        frees.sort_unstable();
        for c in frees {
            let rc = self.refcount(c)?;
            if rc == 0 {
                tracing::warn!("qcow2: cluster {c} released twice; left alone");
                continue;
            }
            self.set_refcount(c, rc - 1)?;
            if rc == 1 {
                self.free_hint = self.free_hint.min(c);
            }
        }
        Ok(())
    }

    // ---- write-back ------------------------------------------------------------

    pub(super) fn sync(&self) -> Result<(), Errno> {
        self.file.sync_data().map_err(|e| io_err(&e))
    }

    /// Write every dirty refcount block, then (after a sync, so it never
    /// points at an unwritten block) the refcount table, then (after
    /// another, so the header never points at an unwritten table) the
    /// header's refcount table fields. With `durable`, end with a sync.
    fn write_refcounts(&mut self, durable: bool) -> Result<(), Errno> {
        let blocks = self.refblocks.dirty();
        let wrote = !blocks.is_empty() || self.reftable_dirty;
        for off in blocks {
            self.write_table(Kind::Refblock, off)?;
        }
        if self.reftable_dirty {
            self.sync()?;
            write_entries(&self.file, &self.reftable, self.reftable_offset)?;
            self.reftable_dirty = false;
            if self.reftable_moved {
                self.sync()?;
                let mut f = [0u8; 12];
                f[..8].copy_from_slice(&self.reftable_offset.to_be_bytes());
                let clusters = u32::try_from(self.reftable_clusters).map_err(|_| Errno::IO)?;
                f[8..].copy_from_slice(&clusters.to_be_bytes());
                self.file
                    .write_all_at(&f, OFF_REFCOUNT_TABLE)
                    .map_err(|e| io_err(&e))?;
                self.reftable_moved = false;
            }
        }
        if durable && wrote {
            self.sync()?;
        }
        Ok(())
    }

    /// Make everything written so far durable, in the order that keeps the
    /// image consistent (see the module's documentation).
    pub fn flush(&mut self) -> Result<(), Errno> {
        if self.read_only {
            return Ok(());
        }
        // 1. Refcounts of everything newly used.
        self.write_refcounts(true)?;
        // 2. L2 tables, then the L1 entries that point at new ones.
        for off in self.l2.dirty() {
            self.write_table(Kind::L2, off)?;
        }
        if self.l1_dirty {
            self.sync()?;
            write_entries(&self.file, &self.l1, self.l1_offset)?;
            self.l1_dirty = false;
        }
        // Guest data written before this flush is durable from here on.
        self.sync()?;
        // 3. Nothing durable points at released clusters any more.
        if !self.pending_free.is_empty() {
            self.apply_frees()?;
            self.write_refcounts(false)?;
        }
        Ok(())
    }

    /// How many host clusters the file spans (allocated ones included).
    pub fn file_clusters(&self) -> u64 {
        self.file_clusters
    }
}

/// Read up to `buf.len()` bytes at `off`, stopping early only at the end
/// of the file; how many were read.
pub fn read_upto(file: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Read `buf.len()` bytes at `off`; bytes past the end of the file read as
/// zeroes (a cluster allocated at the end and never written).
pub fn read_full(file: &File, buf: &mut [u8], off: u64) -> Result<(), Errno> {
    let n = read_upto(file, buf, off).map_err(|e| io_err(&e))?;
    buf[n..].fill(0);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn refcount_widths() {
        for bits in [1u32, 2, 4, 8, 16, 32, 64] {
            let mut b = vec![0u8; 64];
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let n = 64 * 8 / u64::from(bits);
            for i in 0..n {
                refcount_set(&mut b, i, bits, (i * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    refcount_get(&b, i, bits),
                    (i * 7) & max,
                    "bits {bits} i {i}"
                );
            }
            refcount_set(&mut b, 1, bits, max);
            assert_eq!(refcount_get(&b, 1, bits), max);
            assert_eq!(refcount_get(&b, 0, bits), 0);
            assert_eq!(refcount_get(&b, 2, bits), 14 & max);
        }
        // 16-bit entries are big-endian.
        let mut b = vec![0u8; 4];
        refcount_set(&mut b, 1, 16, 0x0102);
        assert_eq!(b, [0, 0, 1, 2]);
    }

    #[test]
    fn l2_entries_decode() {
        let g = Geometry::new(16, 4, 3);
        assert_eq!(g.decode(0), Ok(Mapping::Unallocated));
        assert_eq!(
            g.decode(0x50000 | COPIED),
            Ok(Mapping::Data {
                host: 0x50000,
                copied: true
            })
        );
        assert_eq!(
            g.decode(ZERO),
            Ok(Mapping::Zero {
                host: 0,
                copied: false
            })
        );
        assert!(g.decode(0x50200).is_err(), "inside a cluster");
        assert!(g.decode(0x50000 | 2).is_err(), "reserved bit");
        assert!(
            Geometry::new(16, 4, 2).decode(ZERO).is_err(),
            "v2 zero flag"
        );
        // Compressed, 64K clusters: 54 offset bits, then sectors - 1.
        let e = COMPRESSED | (3u64 << 54) | 0x12345;
        assert_eq!(
            g.decode(e),
            Ok(Mapping::Compressed {
                host: 0x12345,
                len: 4 * 512 - 0x145
            })
        );
    }
}
