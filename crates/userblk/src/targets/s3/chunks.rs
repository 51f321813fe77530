//! The s3 target's table of chunks: which are cached, which are dirty and
//! how dirty, who is using them. One mutex over the table, one condition
//! variable for everything that waits (a fetch to finish, writers to leave
//! a chunk, an upload to land).
//!
//! Dirtiness is counted, not flagged: every write bumps its chunk's
//! `gen`, and an upload records the `gen` it read (`uploaded`). A chunk is
//! clean when `uploaded == gen`. A flush notes each dirty chunk's `gen` and
//! waits until `uploaded` reaches it, so writes that land during an upload
//! are never mistaken for uploaded.

use std::collections::BTreeSet;

use super::cache::{ABSENT, CLEAN, DIRTY};

/// What a chunk is busy with, exclusively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// Being fetched from the bucket into the cache.
    Fetch,
    /// Being dropped from the cache.
    Evict,
}

/// One chunk.
#[derive(Debug, Clone, Default)]
pub struct Chunk {
    /// In the cache (clean or dirty).
    pub resident: bool,
    /// Bumped by each write (and each discard or write-zeroes).
    pub gen: u64,
    /// The `gen` whose bytes the bucket holds.
    pub uploaded: u64,
    /// Requests reading or writing the cached bytes right now.
    pub pins: u32,
    /// Of `pins`, the writers: an upload waits for them to leave.
    pub writers: u32,
    /// An upload of this chunk is under way.
    pub uploading: bool,
    /// A fetch or an eviction is under way.
    pub busy: Option<Busy>,
    /// Whether the bucket has an object for it (else it reads as zeroes).
    pub in_bucket: bool,
    /// When it was last used, in ms since the target started (for LRU eviction).
    pub last_use: u64,
    /// The last upload failed: flushes waiting for it fail too.
    pub upload_failed: bool,
    /// When it became dirty, in ms since the target started.
    pub dirty_since_ms: u64,
    /// When it was last written, in ms since the target started.
    pub last_write_ms: u64,
    /// Dirty since before this start, and not written since: upload soon.
    pub restored: bool,
}

impl Chunk {
    /// Newer bytes in the cache than in the bucket.
    pub fn dirty(&self) -> bool {
        self.gen != self.uploaded
    }

    /// The byte recorded in the cache's state file.
    pub fn state_byte(&self) -> u8 {
        match (self.resident, self.dirty()) {
            (false, _) => ABSENT,
            (true, false) => CLEAN,
            (true, true) => DIRTY,
        }
    }
}

/// All chunks, and the sets kept to avoid scanning them.
#[derive(Debug, Default)]
pub struct Table {
    /// Per chunk.
    pub chunks: Vec<Chunk>,
    /// Indices of dirty chunks.
    pub dirty: BTreeSet<u64>,
    /// Cached chunks (clean or dirty).
    pub resident: u64,
    /// Set when the target is going away: background work stops.
    pub closing: bool,
    /// Uploads waiting for a chunk's writers to leave.
    pub upload_waiters: u32,
}

impl Table {
    /// A table from the cache's state bytes and the set of chunks the bucket has.
    pub fn new(states: &[u8], in_bucket: &BTreeSet<u64>) -> Self {
        let mut t = Table::default();
        t.chunks = states
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let i = i as u64;
                let mut c = Chunk {
                    resident: s != ABSENT,
                    in_bucket: in_bucket.contains(&i),
                    ..Chunk::default()
                };
                if s == DIRTY {
                    // Dirty before a restart: one upload will do.
                    c.gen = 1;
                    c.restored = true;
                    t.dirty.insert(i);
                }
                c
            })
            .collect();
        t.resident = t.chunks.iter().filter(|c| c.resident).count() as u64;
        t
    }

    /// Index of chunk `i` (which callers got from the geometry, so in
    /// range; clamped, never a panic, if not).
    fn index(&self, i: u64) -> usize {
        let n = self.chunks.len();
        usize::try_from(i)
            .unwrap_or(usize::MAX)
            .min(n.saturating_sub(1))
    }

    /// The chunk at `i`.
    pub fn get(&mut self, i: u64) -> &mut Chunk {
        let idx = self.index(i);
        &mut self.chunks[idx]
    }

    /// The chunk at `i`, to look at.
    pub fn chunk(&self, i: u64) -> &Chunk {
        &self.chunks[self.index(i)]
    }

    /// Whether chunk `i` is in the table (a resize changes its length).
    pub fn has(&self, i: u64) -> bool {
        usize::try_from(i).is_ok_and(|i| i < self.chunks.len())
    }

    /// Make the table `n` chunks long: new chunks are holes (not cached,
    /// not in the bucket); those cut off leave the counts.
    pub fn resize(&mut self, n: usize) {
        self.chunks.resize_with(n, Chunk::default);
        self.dirty
            .retain(|&i| usize::try_from(i).is_ok_and(|i| i < n));
        self.resident = self.chunks.iter().filter(|c| c.resident).count() as u64;
    }

    /// Mark chunk `i` used at `now_ms`.
    pub fn touch(&mut self, i: u64, now_ms: u64) {
        self.get(i).last_use = now_ms;
    }

    /// A write went into chunk `i`: bump its generation.
    pub fn bump(&mut self, i: u64) {
        let c = self.get(i);
        c.gen += 1;
        self.dirty.insert(i);
    }

    /// The clean, idle, cached chunks unused since `before_ms`, least
    /// recently used first, up to `n`. (A chunk just fetched for a request
    /// must not go before the request uses it.)
    pub fn eviction_candidates(&self, n: usize, before_ms: u64) -> Vec<u64> {
        let mut v: Vec<(u64, u64)> = self
            .chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                c.resident
                    && !c.dirty()
                    && c.pins == 0
                    && c.busy.is_none()
                    && !c.uploading
                    && c.last_use < before_ms
            })
            .map(|(i, c)| (c.last_use, i as u64))
            .collect();
        v.sort_unstable();
        v.into_iter().take(n).map(|(_, i)| i).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn states_from_the_cache_and_lru_order() {
        let in_bucket: BTreeSet<u64> = [0, 2].into_iter().collect();
        let mut t = Table::new(&[CLEAN, DIRTY, ABSENT, CLEAN], &in_bucket);
        assert_eq!(t.resident, 3);
        assert_eq!(t.dirty.iter().copied().collect::<Vec<_>>(), vec![1]);
        assert!(t.get(1).dirty() && !t.get(0).dirty());
        assert_eq!(t.get(1).state_byte(), DIRTY);
        assert_eq!(t.get(2).state_byte(), ABSENT);
        assert!(t.get(2).in_bucket && !t.get(3).in_bucket);
        t.touch(3, 10);
        t.touch(0, 20);
        // Chunk 1 is dirty: never a candidate. 3 was used before 0.
        assert_eq!(t.eviction_candidates(10, 100), vec![3, 0]);
        // Used too recently.
        assert_eq!(t.eviction_candidates(10, 15), vec![3]);
        t.get(3).pins = 1;
        assert_eq!(t.eviction_candidates(10, 100), vec![0]);
        t.bump(0);
        assert!(t.get(0).dirty());
        assert!(t.eviction_candidates(10, 100).is_empty());
    }
}
