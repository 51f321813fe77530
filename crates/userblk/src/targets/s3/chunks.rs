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

use std::collections::{BTreeMap, BTreeSet};

use super::cache::{ABSENT, CLEAN, DIRTY};

/// An object below the head epoch that a chunk reads when the head has
/// none: the volume's own of an older epoch (layer 0) or a parent's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Below {
    /// 0: the volume; then its parents, nearest first.
    pub layer: u16,
    /// The object's epoch.
    pub epoch: u64,
}

/// What the bucket has for one chunk, as listed at open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stored {
    /// An object of the head epoch: `Some(true)` if it is a tombstone.
    pub head: Option<bool>,
    /// What it reads without the head's object.
    pub below: Option<Below>,
}

impl Stored {
    /// Whether the chunk reads as anything but zeroes.
    pub fn has_data(&self) -> bool {
        match self.head {
            Some(tomb) => !tomb,
            None => self.below.is_some(),
        }
    }
}

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
    /// Whether the bucket has an object for it in the head epoch (else it
    /// reads as `below`, or zeroes).
    pub in_bucket: bool,
    /// That object is a tombstone: the chunk reads as zeroes.
    pub tomb: bool,
    /// What it reads when the head epoch has no object for it. An all-zero
    /// upload then writes a tombstone rather than delete the head's object.
    pub below: Option<Below>,
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

    /// What the bucket has for it.
    pub fn stored(&self) -> Stored {
        Stored {
            head: self.in_bucket.then_some(self.tomb),
            below: self.below,
        }
    }

    /// Take what the bucket has for it.
    pub fn set_stored(&mut self, s: Stored) {
        self.in_bucket = s.head.is_some();
        self.tomb = s.head == Some(true);
        self.below = s.below;
    }

    /// Where a fetch reads it: (layer, epoch) of its object, `None` for zeroes.
    pub fn source(&self, head_epoch: u64) -> Option<(u16, u64)> {
        if self.in_bucket {
            return (!self.tomb).then_some((0, head_epoch));
        }
        self.below.map(|b| (b.layer, b.epoch))
    }

    /// Reads as zeroes and is not cached: a hole.
    pub fn hole(&self) -> bool {
        !self.resident && !self.stored().has_data()
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
    /// A table from the cache's state bytes and what the bucket has.
    pub fn new(states: &[u8], stored: &BTreeMap<u64, Stored>) -> Self {
        let mut t = Table::default();
        t.chunks = states
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let i = i as u64;
                let mut c = Chunk {
                    resident: s != ABSENT,
                    ..Chunk::default()
                };
                c.set_stored(stored.get(&i).copied().unwrap_or_default());
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

    /// A snapshot moved the head epoch from `old` on: the head's objects
    /// are below now, and the new head has none.
    pub fn next_epoch(&mut self, old: u64) {
        for c in &mut self.chunks {
            if c.in_bucket {
                // A tombstone reads as zeroes from below too.
                c.below = (!c.tomb).then_some(Below {
                    layer: 0,
                    epoch: old,
                });
                c.in_bucket = false;
                c.tomb = false;
            }
        }
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
        let head = Stored {
            head: Some(false),
            below: None,
        };
        let stored: BTreeMap<u64, Stored> = [(0, head), (2, head)].into_iter().collect();
        let mut t = Table::new(&[CLEAN, DIRTY, ABSENT, CLEAN], &stored);
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

    #[test]
    fn epochs_move_the_head_below() {
        let b = Below { layer: 1, epoch: 3 };
        let stored: BTreeMap<u64, Stored> = [
            (
                0,
                Stored {
                    head: Some(false),
                    below: Some(b),
                },
            ),
            (
                1,
                Stored {
                    head: Some(true),
                    below: Some(b),
                },
            ),
            (
                2,
                Stored {
                    head: None,
                    below: Some(b),
                },
            ),
        ]
        .into_iter()
        .collect();
        let mut t = Table::new(&[ABSENT; 4], &stored);
        assert_eq!(t.chunk(0).source(5), Some((0, 5)));
        assert_eq!(t.chunk(1).source(5), None);
        assert_eq!(t.chunk(2).source(5), Some((1, 3)));
        assert!(t.chunk(1).hole() && t.chunk(3).hole() && !t.chunk(2).hole());
        t.next_epoch(5);
        assert_eq!(t.chunk(0).source(6), Some((0, 5)));
        assert_eq!(t.chunk(0).below, Some(Below { layer: 0, epoch: 5 }));
        // The tombstone of epoch 5 still hides the parent's chunk.
        assert_eq!(t.chunk(1).stored(), Stored::default());
        assert_eq!(t.chunk(2).source(6), Some((1, 3)));
    }
}
