//! Live resize of an s3 volume. The manifest in the bucket is the truth:
//! `resize` answers only once it has the new size, and a later open
//! (`recover`, a new `add`) follows it.
//!
//! A grow clears any stray objects of the chunks it takes in (deleted, or
//! hidden by a tombstone where an older epoch or a parent has one), writes the
//! manifest, then extends the cache and the table: the new chunks are holes
//! (zeroes, nothing fetched) until written. The last chunk of the old size
//! may be short; its object stays short, and the bytes past an object's
//! payload read as zeroes ([`decode_chunk`](super::super::layout::decode_chunk)).
//!
//! A shrink first moves the end (requests past it fail from then on), waits
//! for what was in flight on the chunks it cuts, drops the chunks wholly
//! past the end from the cache, uploads the new last chunk again with
//! zeroes past the new end (when it is cut mid-way), clears the chunks past
//! the end the same way, and only then writes the manifest. So no object ever holds
//! data past the manifest's size, and a later grow reads zeroes there, even
//! after a crash half-way. If a step fails the device keeps its old size.

use std::ops::Range;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{lock, Core, State, Task};
use crate::targets::s3::cache::ABSENT;
use crate::targets::s3::chunks::Stored;
use crate::targets::s3::layout::{Geometry, Lease, MANIFEST_KEY};
use crate::targets::s3::{lease, S3Error};

/// Longest a shrink waits for requests and transfers on the chunks it cuts.
const DRAIN_WAIT: Duration = Duration::from_secs(30);

fn failed(why: impl std::fmt::Display) -> crate::Error {
    crate::Error::cannot_resize("the s3 volume", why.to_string())
}

fn task_chunk(t: &Task) -> u64 {
    match *t {
        Task::Upload(i) | Task::Fetch(i) => i,
    }
}

impl Core {
    /// Resize to `new_size` bytes as the holder of lease `ours`.
    pub(super) fn resize(&self, ours: &Lease, new_size: u64) -> crate::Result<u64> {
        let old = self.geometry();
        let new = Geometry::new(new_size, old.chunk_size()).map_err(failed)?;
        if new.size() > old.size() {
            self.grow(ours, new)?;
        } else if new.size() < old.size() {
            self.shrink(ours, old, new)?;
        }
        Ok(new.size())
    }

    fn set_geometry(&self, _st: &State, g: Geometry) {
        // Under the state lock (`_st`): requests see the size and the table agree.
        *self
            .geometry
            .write()
            .unwrap_or_else(PoisonError::into_inner) = g;
    }

    /// The manifest with `size`, in the bucket, by the lease's holder only.
    fn write_manifest(&self, ours: &Lease, size: u64) -> Result<(), S3Error> {
        lease::check(&self.store, ours)?;
        let mut m = lock(&self.manifest).clone();
        m.device_size = size;
        self.store.put(MANIFEST_KEY, Bytes::from(m.encode()?))?;
        *lock(&self.manifest) = m;
        Ok(())
    }

    fn grow(&self, ours: &Lease, new: Geometry) -> crate::Result<()> {
        let old_n = self.geometry().chunk_count();
        let (epoch, strays) = {
            let st = lock(&self.state);
            let strays: Vec<(u64, Stored)> = st
                .strays
                .range(old_n..new.chunk_count())
                .map(|(&i, &s)| (i, s))
                .collect();
            (st.epoch, strays)
        };
        for (i, stored) in strays.into_iter().filter(|(_, s)| s.has_data()) {
            let now = self
                .clear(i, stored, epoch)
                .map_err(|e| failed(format!("clearing chunk {i}'s stale object: {e}")))?;
            lock(&self.state).strays.insert(i, now);
        }
        self.write_manifest(ours, new.size())
            .map_err(|e| failed(format!("writing the manifest: {e}")))?;
        let mut st = lock(&self.state);
        // The cache's files before the size: a write past the old end
        // must find its bytes' place.
        if let Err(e) = self.cache.resize(new) {
            return Err(failed(format!(
                "the bucket's manifest says {} bytes now, but the cache could not follow ({e}); \
                 this daemon serves the old size until the device is recovered",
                new.size()
            )));
        }
        let n = usize::try_from(new.chunk_count()).map_err(|_| failed("too many chunks"))?;
        st.table.resize(n);
        // What the bucket has for the chunks taken in (tombstones hiding
        // older data) stays known, so a later zero upload keeps them.
        let taken: Vec<u64> = st.strays.range(old_n..).map(|(&i, _)| i).collect();
        for i in taken.into_iter().filter(|&i| i < new.chunk_count()) {
            if let Some(stored) = st.strays.remove(&i) {
                st.table.get(i).set_stored(stored);
            }
        }
        self.set_geometry(&st, new);
        Ok(())
    }

    fn shrink(&self, ours: &Lease, old: Geometry, new: Geometry) -> crate::Result<()> {
        let n = new.chunk_count();
        {
            // From here no request reaches past the new end, and no
            // transfer of a chunk past it starts.
            let mut st = lock(&self.state);
            self.set_geometry(&st, new);
            st.queue.retain(|t| task_chunk(t) < n);
            st.queued.retain(|t| task_chunk(t) < n);
            st.last_read = None;
        }
        if let Err(e) = self.cut(ours, old, new) {
            let st = lock(&self.state);
            self.set_geometry(&st, old);
            return Err(failed(format!(
                "{e}; the device keeps its {} bytes, but the data past {} may be gone",
                old.size(),
                new.size()
            )));
        }
        let mut st = lock(&self.state);
        st.table
            .resize(usize::try_from(n).map_err(|_| failed("too many chunks"))?);
        // The bucket has the new size; a cache left longer is cut at the next open.
        if let Err(e) = self.cache.resize(new) {
            tracing::warn!("s3: cutting the cache to {} bytes: {e}", new.size());
        }
        Ok(())
    }

    /// The bucket's half of a shrink from `old` to `new`, up to the manifest.
    fn cut(&self, ours: &Lease, old: Geometry, new: Geometry) -> Result<(), String> {
        let n = new.chunk_count();
        let tail = (!new.size().is_multiple_of(new.chunk_size())).then(|| n - 1);
        self.drain(tail.unwrap_or(n)..old.chunk_count())?;
        let (epoch, gone) = {
            let mut st = lock(&self.state);
            let mut gone = Vec::new();
            for i in n..old.chunk_count() {
                let c = st.table.get(i);
                // Clean and absent: nothing of it is uploaded or read again.
                c.uploaded = c.gen;
                c.restored = false;
                c.upload_failed = false;
                let resident = std::mem::take(&mut c.resident);
                let stored = c.stored();
                if stored != Stored::default() {
                    gone.push((i, stored));
                }
                st.table.dirty.remove(&i);
                if resident {
                    st.table.resident = st.table.resident.saturating_sub(1);
                    self.persist(i, ABSENT).map_err(|e| e.to_string())?;
                }
            }
            (st.epoch, gone)
        };
        if let Some(t) = tail {
            self.zero_tail(t, old, new)?;
        }
        // Whole chunks past the end: their bytes in the cache go now (the
        // file is cut after the manifest).
        let at = n * new.chunk_size();
        self.cache
            .zero(at, old.size().saturating_sub(at))
            .map_err(|e| format!("clearing the cache past the new end: {e}"))?;
        for (i, stored) in gone {
            let now = self
                .clear(i, stored, epoch)
                .map_err(|e| format!("clearing chunk {i}: {e}"))?;
            let mut st = lock(&self.state);
            st.table.get(i).set_stored(now);
            // Kept past the end, for a later grow.
            st.strays.insert(i, now);
        }
        self.write_manifest(ours, new.size())
            .map_err(|e| format!("writing the manifest: {e}"))
    }

    /// Chunk `t`, cut by the new end: zeroes past the end, in the cache and
    /// (uploaded again at its new length) in the bucket.
    fn zero_tail(&self, t: u64, old: Geometry, new: Geometry) -> Result<(), String> {
        let end = ((t + 1) * new.chunk_size()).min(old.size());
        let mut tries = 0;
        loop {
            {
                let c = lock(&self.state).table.chunk(t).clone();
                if c.hole() {
                    // A hole: its cached bytes were zeroed at eviction.
                    return Ok(());
                }
            }
            self.ensure_cached(t)
                .map_err(|e| format!("fetching chunk {t}: {e}"))?;
            let mut st = lock(&self.state);
            if !st.table.chunk(t).resident {
                // Evicted again in between.
                tries += 1;
                if tries > 8 {
                    return Err(format!("chunk {t} kept leaving the cache"));
                }
                continue;
            }
            // Dirty on record before the bytes change; dirty chunks stay.
            let was = st.table.chunk(t).state_byte();
            self.mark_dirty(&mut st, t, was, self.now_ms())
                .map_err(|e| e.to_string())?;
            self.cache
                .zero(new.size(), end - new.size())
                .map_err(|e| format!("clearing chunk {t} past the new end: {e}"))?;
            break;
        }
        self.flush(Some(t..=t))
            .map_err(|e| format!("uploading chunk {t}: {e}"))
    }

    /// Wait until no request, fetch, eviction or upload begun before the
    /// end moved still uses a chunk of `range`.
    fn drain(&self, range: Range<u64>) -> Result<(), String> {
        let deadline = Instant::now() + DRAIN_WAIT;
        let mut st = lock(&self.state);
        loop {
            let in_use = range.clone().find(|&i| {
                let c = st.table.chunk(i);
                c.pins > 0 || c.busy.is_some() || c.uploading
            });
            let Some(i) = in_use else { return Ok(()) };
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "chunk {i} stayed in use for {} s",
                    DRAIN_WAIT.as_secs()
                ));
            }
            // Readers leave without a notification: look again soon.
            st = self
                .cv
                .wait_timeout(st, (deadline - now).min(Duration::from_millis(20)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}
