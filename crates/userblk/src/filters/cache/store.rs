//! The cache's blocks: shards of an LRU list each, the data in memory or a
//! file, and per block which sectors are valid and which are dirty.
//!
//! A block is cached sector by sector (the target's logical block), so a
//! 4 KiB read of a 64 KiB block caches those 4 KiB and no read is ever
//! made larger than asked. Shards (by a hash of the block number) each
//! have a lock and an equal part of the capacity; the lock is held while
//! data is copied in or out (a memcpy, or a `pread`/`pwrite` of the file's
//! page cache), never while a request is in flight below.
//!
//! Capacity is a soft cap: a request inserts its blocks first and the
//! least recently used ones are evicted after, so a shard can be over by
//! a request's worth of blocks for a moment.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use rustix::io::Errno;

use super::lru::Lru;
use crate::io::fd::{read_exact, write_all};

/// Sectors of one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }

    fn update(&mut self, from: usize, to: usize, set: bool) {
        for i in from..to {
            let (w, b) = (i / 64, 1u64 << (i % 64));
            if set {
                self.0[w] |= b;
            } else {
                self.0[w] &= !b;
            }
        }
    }

    fn all(&self, from: usize, to: usize) -> bool {
        (from..to).all(|i| self.0[i / 64] & (1 << (i % 64)) != 0)
    }

    fn get(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// Runs of set bits in `from..to`, as `(start, end)`.
    fn runs(&self, from: usize, to: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut i = from;
        while i < to {
            if self.get(i) {
                let start = i;
                while i < to && self.get(i) {
                    i += 1;
                }
                out.push((start, i));
            } else {
                i += 1;
            }
        }
        out
    }
}

/// One cached block.
#[derive(Debug)]
struct Entry {
    valid: Bits,
    /// Written into the cache and not yet below (write-back only).
    dirty: Bits,
    /// Bumped by every change of data or dirtiness, so a write-down knows
    /// whether what it wrote is still what the block holds.
    version: u64,
    /// A write-down of the block is in flight.
    flushing: bool,
}

#[derive(Debug)]
struct Shard {
    lru: Lru<Entry>,
    cap: usize,
    /// Memory blocks, by slab index (empty for a file cache).
    mem: Vec<Option<Box<[u8]>>>,
    /// Writes going down (write-through) in flight.
    inflight: u32,
    /// Writes down started, ever; and that count when `inflight` last
    /// rose from 0: a write is alone if its period holds one start.
    started: u64,
    period_start: u64,
    /// When a write last went in or down, or finished.
    last_write: Option<Instant>,
    /// Blocks with reads in flight below, which count on the cache to
    /// patch in dirty data when they come back: not evicted meanwhile.
    pins: HashMap<u64, u32>,
}

/// Counters, for tests, logs and `describe`.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub hit_bytes: AtomicU64,
    pub miss_bytes: AtomicU64,
    pub inserts: AtomicU64,
    pub evictions: AtomicU64,
    pub writebacks: AtomicU64,
}

/// Where blocks are kept when not in memory.
#[derive(Debug)]
pub(super) struct FileStore {
    pub fd: OwnedFd,
    /// Where slot 0 starts.
    pub data_off: u64,
}

/// A block's dirty data, taken to be written down.
#[derive(Debug)]
pub(super) struct WriteDown {
    pub block: u64,
    version: u64,
    /// `(device offset, data)` runs.
    pub runs: Vec<(u64, Vec<u8>)>,
}

/// The blocks.
#[derive(Debug)]
pub(super) struct Store {
    shards: Vec<(Mutex<Shard>, Condvar)>,
    block: u64,
    sector: u64,
    size: u64,
    file: Option<FileStore>,
    pub counters: Counters,
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl Store {
    /// `blocks` blocks of `block` bytes, cached by `sector`s, for a device
    /// of `size` bytes; in `file` or in memory.
    pub(super) fn new(
        blocks: u64,
        block: u32,
        sector: u32,
        size: u64,
        file: Option<FileStore>,
    ) -> Self {
        let blocks = to_usize(blocks.max(1));
        let n = (blocks / 64).clamp(1, 16);
        let shards = (0..n)
            .map(|i| {
                let shard = Shard {
                    lru: Lru::new(),
                    cap: blocks / n + usize::from(i < blocks % n),
                    mem: Vec::new(),
                    inflight: 0,
                    started: 0,
                    period_start: 0,
                    last_write: None,
                    pins: HashMap::new(),
                };
                (Mutex::new(shard), Condvar::new())
            })
            .collect();
        Store {
            shards,
            block: block.into(),
            sector: sector.into(),
            size,
            file,
            counters: Counters::default(),
        }
    }

    /// Number of shards.
    pub(super) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    fn shard_of(&self, b: u64) -> usize {
        let h = b.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        to_usize(h % self.shards.len() as u64)
    }

    /// The blocks `[offset, offset + len)` touches.
    pub(super) fn blocks(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        offset / self.block..=(offset + len.max(1) - 1) / self.block
    }

    /// Shards touched by `[offset, offset + len)`, as a bit mask.
    pub(super) fn shards_of(&self, offset: u64, len: u64) -> u64 {
        self.blocks(offset, len)
            .fold(0, |m, b| m | 1 << self.shard_of(b))
    }

    fn sectors(&self) -> usize {
        to_usize(self.block / self.sector)
    }

    /// For block `b`, the part of `[offset, end)` in it: bytes into the
    /// block, and bytes into the request.
    fn cut(&self, b: u64, offset: u64, end: u64) -> (usize, usize, usize) {
        let start = b * self.block;
        let from = offset.max(start);
        let to = end.min(start + self.block).min(self.size);
        (
            to_usize(from - start),
            to_usize(to - start),
            to_usize(from - offset),
        )
    }

    fn file_pos(&self, shard: usize, idx: usize, at: usize) -> Option<(&FileStore, u64)> {
        let f = self.file.as_ref()?;
        let slot = (idx * self.shards.len() + shard) as u64;
        Some((f, f.data_off + slot * self.block + at as u64))
    }

    fn copy_out(
        &self,
        sh: &Shard,
        shard: usize,
        idx: usize,
        at: usize,
        out: &mut [u8],
    ) -> Result<(), Errno> {
        if let Some((f, pos)) = self.file_pos(shard, idx, at) {
            return read_exact(f.fd.as_fd(), out, pos);
        }
        let buf = sh.mem.get(idx).and_then(Option::as_ref).ok_or(Errno::IO)?;
        out.copy_from_slice(&buf[at..at + out.len()]);
        Ok(())
    }

    fn copy_in(
        &self,
        sh: &mut Shard,
        shard: usize,
        idx: usize,
        at: usize,
        data: &[u8],
    ) -> Result<(), Errno> {
        if let Some((f, pos)) = self.file_pos(shard, idx, at) {
            return write_all(f.fd.as_fd(), data, pos);
        }
        if sh.mem.len() <= idx {
            sh.mem.resize_with(idx + 1, || None);
        }
        let block = to_usize(self.block);
        let buf = sh.mem[idx].get_or_insert_with(|| vec![0u8; block].into_boxed_slice());
        buf[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn new_entry(&self) -> Entry {
        Entry {
            valid: Bits::new(self.sectors()),
            dirty: Bits::new(self.sectors()),
            version: 0,
            flushing: false,
        }
    }

    fn sec(&self, byte: usize) -> usize {
        byte / to_usize(self.sector)
    }

    /// Copy `[offset, offset + out.len())` out of the cache if every
    /// sector of it is there (a hit); `false` on any miss.
    pub(super) fn read_hit(&self, offset: u64, out: &mut [u8]) -> bool {
        let end = offset + out.len() as u64;
        for b in self.blocks(offset, out.len() as u64) {
            let s = self.shard_of(b);
            let mut sh = lock(&self.shards[s].0);
            let (from, to, at) = self.cut(b, offset, end);
            let Some(idx) = sh.lru.find(b) else {
                return false;
            };
            if !sh
                .lru
                .at(idx)
                .is_some_and(|(_, e)| e.valid.all(self.sec(from), self.sec(to)))
            {
                return false;
            }
            if self
                .copy_out(&sh, s, idx, from, &mut out[at..at + (to - from)])
                .is_err()
            {
                return false;
            }
            sh.lru.touch(idx);
        }
        true
    }

    /// After a read from below of `[offset, offset + data.len())`: put the
    /// cache's valid sectors over it (newer, with write-back), and keep the
    /// rest, unless a write went in or down since the read was sent
    /// (`since`), whose data the read may not have seen.
    pub(super) fn fill(
        &self,
        offset: u64,
        data: &mut [u8],
        since: Option<Instant>,
    ) -> Result<(), Errno> {
        let end = offset + data.len() as u64;
        for b in self.blocks(offset, data.len() as u64) {
            let s = self.shard_of(b);
            let mut sh = lock(&self.shards[s].0);
            let (from, to, at) = self.cut(b, offset, end);
            let may_insert =
                sh.inflight == 0 && since.is_some_and(|t| sh.last_write.is_none_or(|w| w < t));
            let idx = match sh.lru.find(b) {
                Some(idx) => idx,
                None if may_insert => {
                    self.counters.inserts.fetch_add(1, Ordering::Relaxed);
                    sh.lru.insert(b, self.new_entry())
                }
                None => continue,
            };
            let Some(valid) = sh.lru.at(idx).map(|(_, e)| e.valid.clone()) else {
                continue;
            };
            let (sf, st) = (self.sec(from), self.sec(to));
            let sector = to_usize(self.sector);
            for (r0, r1) in valid.runs(sf, st) {
                let (a, z) = (r0 * sector, r1 * sector);
                self.copy_out(&sh, s, idx, a, &mut data[at + a - from..at + z - from])?;
            }
            if may_insert {
                let mut added = false;
                for (r0, r1) in invert(&valid, sf, st) {
                    let (a, z) = (r0 * sector, r1 * sector);
                    self.copy_in(&mut sh, s, idx, a, &data[at + a - from..at + z - from])?;
                    added = true;
                }
                if let Some(e) = sh.lru.at_mut(idx) {
                    e.valid.update(sf, st, true);
                    if added {
                        e.version += 1;
                    }
                }
            }
            sh.lru.touch(idx);
        }
        Ok(())
    }

    /// A read of `[offset, offset + len)` goes down: keep its blocks
    /// until [`Store::unpin`], so dirty data in them is still there to
    /// lay over what the read brings back.
    pub(super) fn pin(&self, offset: u64, len: u64) {
        for b in self.blocks(offset, len) {
            *lock(&self.shards[self.shard_of(b)].0)
                .pins
                .entry(b)
                .or_insert(0) += 1;
        }
    }

    /// The read pinned by [`Store::pin`] is back.
    pub(super) fn unpin(&self, offset: u64, len: u64) {
        for b in self.blocks(offset, len) {
            let mut sh = lock(&self.shards[self.shard_of(b)].0);
            if let Some(n) = sh.pins.get_mut(&b) {
                *n -= 1;
                if *n == 0 {
                    sh.pins.remove(&b);
                }
            }
        }
    }

    /// A write (or discard, write-zeroes) of `[offset, offset + len)` is
    /// about to go down.
    pub(super) fn begin_down(&self, offset: u64, len: u64) {
        let mask = self.shards_of(offset, len);
        for (s, (m, _)) in self.shards.iter().enumerate() {
            if mask & 1 << s == 0 {
                continue;
            }
            let mut sh = lock(m);
            if sh.inflight == 0 {
                sh.period_start = sh.started;
            }
            sh.started += 1;
            sh.inflight += 1;
            sh.last_write = Some(Instant::now());
        }
    }

    /// The write begun by [`Store::begin_down`] finished. With `data` (a
    /// successful write), cached sectors of the range take the new data if
    /// no other write went down at the same time in the shard; otherwise
    /// they are dropped.
    pub(super) fn end_down(&self, offset: u64, len: u64, data: Option<&[u8]>) {
        let mask = self.shards_of(offset, len);
        let end = offset + len;
        for (s, (m, cv)) in self.shards.iter().enumerate() {
            if mask & 1 << s == 0 {
                continue;
            }
            let mut sh = lock(m);
            let alone = sh.inflight == 1 && sh.started - sh.period_start == 1;
            sh.inflight = sh.inflight.saturating_sub(1);
            sh.last_write = Some(Instant::now());
            for b in self.blocks(offset, len).filter(|&b| self.shard_of(b) == s) {
                let Some(idx) = sh.lru.find(b) else { continue };
                let (from, to, at) = self.cut(b, offset, end);
                let (sf, st) = (self.sec(from), self.sec(to));
                let updated = match data.filter(|_| alone) {
                    Some(d) => self
                        .copy_in(&mut sh, s, idx, from, &d[at..at + (to - from)])
                        .is_ok(),
                    None => false,
                };
                let Some(e) = sh.lru.at_mut(idx) else {
                    continue;
                };
                e.version += 1;
                e.dirty.update(sf, st, false);
                e.valid.update(sf, st, updated);
                if e.valid.is_empty() && !e.flushing {
                    sh.lru.remove(idx);
                }
            }
            cv.notify_all();
        }
    }

    /// Write-back: take `[offset, offset + data.len())` into the cache as
    /// dirty data.
    pub(super) fn write_in(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let end = offset + data.len() as u64;
        for b in self.blocks(offset, data.len() as u64) {
            let s = self.shard_of(b);
            let mut sh = lock(&self.shards[s].0);
            let (from, to, at) = self.cut(b, offset, end);
            let idx = match sh.lru.find(b) {
                Some(idx) => idx,
                None => {
                    self.counters.inserts.fetch_add(1, Ordering::Relaxed);
                    sh.lru.insert(b, self.new_entry())
                }
            };
            self.copy_in(&mut sh, s, idx, from, &data[at..at + (to - from)])?;
            let (sf, st) = (self.sec(from), self.sec(to));
            if let Some(e) = sh.lru.at_mut(idx) {
                e.valid.update(sf, st, true);
                e.dirty.update(sf, st, true);
                e.version += 1;
            }
            sh.lru.touch(idx);
            sh.last_write = Some(Instant::now());
        }
        Ok(())
    }

    /// Blocks holding dirty data, in `[offset, offset + len)` or everywhere.
    pub(super) fn dirty_blocks(&self, range: Option<(u64, u64)>) -> Vec<u64> {
        let mut out = Vec::new();
        for (m, _) in &self.shards {
            let sh = lock(m);
            out.extend(sh.lru.keys().filter(|&b| {
                range.is_none_or(|(o, l)| self.blocks(o, l).contains(&b))
                    && sh
                        .lru
                        .find(b)
                        .and_then(|i| sh.lru.at(i))
                        .is_some_and(|(_, e)| !e.dirty.is_empty())
            }));
        }
        out.sort_unstable();
        out
    }

    /// Take block `b`'s dirty data to write it down (after any write-down
    /// of it in flight); `None` if it has none.
    pub(super) fn take_dirty(&self, b: u64) -> Result<Option<WriteDown>, Errno> {
        let s = self.shard_of(b);
        let (m, cv) = &self.shards[s];
        let mut sh = lock(m);
        let idx = loop {
            let Some(idx) = sh.lru.find(b) else {
                return Ok(None);
            };
            match sh.lru.at(idx) {
                Some((_, e)) if e.dirty.is_empty() => return Ok(None),
                Some((_, e)) if e.flushing => {
                    sh = cv.wait(sh).unwrap_or_else(PoisonError::into_inner);
                }
                Some(_) => break idx,
                None => return Ok(None),
            }
        };
        let Some((_, e)) = sh.lru.at(idx) else {
            return Ok(None);
        };
        let (version, dirty) = (e.version, e.dirty.clone());
        let start = b * self.block;
        let sector = to_usize(self.sector);
        let mut runs = Vec::new();
        for (r0, r1) in dirty.runs(0, self.sectors()) {
            let mut buf = vec![0u8; (r1 - r0) * sector];
            self.copy_out(&sh, s, idx, r0 * sector, &mut buf)?;
            runs.push((start + (r0 * sector) as u64, buf));
        }
        if let Some(e) = sh.lru.at_mut(idx) {
            e.flushing = true;
        }
        sh.last_write = Some(Instant::now());
        Ok(Some(WriteDown {
            block: b,
            version,
            runs,
        }))
    }

    /// A write-down taken by [`Store::take_dirty`] is over: the block is
    /// clean if it went well and nothing changed the block meanwhile.
    pub(super) fn finish_write_down(&self, wd: &WriteDown, ok: bool) {
        let s = self.shard_of(wd.block);
        let (m, cv) = &self.shards[s];
        let mut sh = lock(m);
        sh.last_write = Some(Instant::now());
        if let Some(idx) = sh.lru.find(wd.block) {
            if let Some(e) = sh.lru.at_mut(idx) {
                e.flushing = false;
                if ok && e.version == wd.version {
                    e.dirty = Bits::new(self.sectors());
                }
                if e.valid.is_empty() {
                    sh.lru.remove(idx);
                }
            }
        }
        if ok {
            self.counters.writebacks.fetch_add(1, Ordering::Relaxed);
        }
        cv.notify_all();
    }

    /// Evict least recently used blocks of the shards in `mask` down to
    /// their capacity. Dirty ones are written down first by `write_down`
    /// (which may fail: the block then stays, over capacity).
    pub(super) fn trim(&self, mask: u64, write_down: &dyn Fn(u64) -> Result<(), Errno>) {
        for (s, (m, _)) in self.shards.iter().enumerate() {
            if mask & 1 << s == 0 {
                continue;
            }
            let mut tried = Vec::new();
            let mut rounds = 0;
            loop {
                let mut sh = lock(m);
                if sh.lru.len() <= sh.cap {
                    break;
                }
                let victim = sh.lru.oldest_first().find(|&i| {
                    sh.lru.at(i).is_some_and(|(k, e)| {
                        !e.flushing && !tried.contains(&k) && !sh.pins.contains_key(&k)
                    })
                });
                let Some(idx) = victim else { break };
                let Some((b, dirty)) = sh.lru.at(idx).map(|(k, e)| (k, !e.dirty.is_empty())) else {
                    break;
                };
                if !dirty {
                    // Its memory stays with the slab index, for the next insert.
                    sh.lru.remove(idx);
                    self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                drop(sh);
                // Written back, it is clean and goes on the next round;
                // one that cannot be written back stays.
                if let Err(e) = write_down(b) {
                    tracing::warn!("cache: writing block {b} back to evict it: {e}");
                    tried.push(b);
                }
                rounds += 1;
                if rounds > 64 {
                    break;
                }
            }
        }
    }

    /// Blocks cached, over all shards.
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|(m, _)| lock(m).lru.len()).sum()
    }
}

/// Runs of clear bits in `from..to`.
fn invert(bits: &Bits, from: usize, to: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = from;
    for (a, b) in bits.runs(from, to) {
        if a > start {
            out.push((start, a));
        }
        start = b;
    }
    if start < to {
        out.push((start, to));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bits_and_runs() {
        let mut b = Bits::new(128);
        b.update(3, 7, true);
        b.update(64, 70, true);
        b.update(5, 6, false);
        assert_eq!(b.runs(0, 128), [(3, 5), (6, 7), (64, 70)]);
        assert_eq!(invert(&b, 0, 10), [(0, 3), (5, 6), (7, 10)]);
        assert!(b.all(3, 5) && !b.all(3, 6) && b.all(64, 70));
        assert!(!b.is_empty());
        b.update(0, 128, false);
        assert!(b.is_empty());
        assert_eq!(invert(&b, 2, 4), [(2, 4)]);
    }
}
