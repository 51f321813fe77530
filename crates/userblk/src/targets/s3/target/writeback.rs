//! The background half of [`super::S3Target`]: transfer workers that
//! upload dirty chunks and read ahead, the write-back thread that queues
//! uploads for idle chunks and evicts clean ones, and flushes that wait for
//! their uploads.

use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use std::time::Duration;

use bytes::Bytes;
use rustix::io::Errno;

use super::{lock, queue, Core, Task, EVICT_MIN_IDLE_MS, WRITEBACK_TICK};
use crate::targets::s3::cache::{ABSENT, CLEAN};
use crate::targets::s3::chunks::Busy;
use crate::targets::s3::chunks::Stored;
use crate::targets::s3::layout::{chunk_key_at, encode_chunk, encode_tombstone, is_all_zero};

impl Core {
    /// Upload the dirty chunks (all, or those in `only`) as they are now,
    /// and wait until the bucket has them.
    pub(super) fn flush(&self, only: Option<std::ops::RangeInclusive<u64>>) -> Result<(), Errno> {
        let mut st = lock(&self.state);
        let want: Vec<(u64, u64)> = match &only {
            None => st.table.dirty.iter().copied().collect::<Vec<u64>>(),
            Some(r) => st.table.dirty.range(r.clone()).copied().collect(),
        }
        .into_iter()
        .map(|i| (i, st.table.get(i).gen))
        .collect();
        for &(i, _) in &want {
            st.table.get(i).upload_failed = false;
            queue(&mut st, Task::Upload(i));
        }
        self.work.notify_all();
        loop {
            let mut pending = false;
            for &(i, gen) in &want {
                // Cut off by a shrink: nothing left to upload.
                if !st.table.has(i) {
                    continue;
                }
                let c = st.table.get(i);
                if c.uploaded >= gen {
                    continue;
                }
                if c.upload_failed && !c.uploading && !st.queued.contains(&Task::Upload(i)) {
                    tracing::error!(
                        "s3: flush failed: chunk {i} could not be uploaded; it stays dirty in \
                         the cache and uploads when the bucket is reachable"
                    );
                    return Err(Errno::IO);
                }
                pending = true;
            }
            if !pending {
                return Ok(());
            }
            st = self
                .cv
                .wait_timeout(st, Duration::from_secs(1))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// A transfer worker: uploads and read-aheads until closing.
    pub(super) fn transfers(&self) {
        let mut buf = Vec::new();
        loop {
            let task = {
                let mut st = lock(&self.state);
                loop {
                    // Closing: the last flush is done; what is left stays
                    // dirty in the cache for the next daemon.
                    if st.table.closing {
                        return;
                    }
                    if let Some(t) = st.queue.pop_front() {
                        st.queued.remove(&t);
                        break t;
                    }
                    st = self.work.wait(st).unwrap_or_else(PoisonError::into_inner);
                }
            };
            match task {
                Task::Upload(i) => self.upload(i, &mut buf),
                Task::Fetch(i) => {
                    // A failed read-ahead is retried by the read itself.
                    let _ = self.ensure_cached(i);
                }
            }
        }
    }

    /// Upload chunk `i` if it is dirty.
    pub(super) fn upload(&self, i: u64, buf: &mut Vec<u8>) {
        let (gen, stored, epoch) = {
            let mut st = lock(&self.state);
            loop {
                // Past the end after a shrink: the resize drops it.
                if i >= self.geometry().chunk_count() || !st.table.has(i) {
                    return;
                }
                let c = st.table.get(i);
                if !c.dirty() {
                    return;
                }
                // One upload per chunk at a time, and never with a writer
                // half-way: the bytes read must hold every write of `gen`.
                if c.uploading || c.writers > 0 || c.busy.is_some() {
                    st.table.upload_waiters += 1;
                    st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
                    st.table.upload_waiters -= 1;
                    continue;
                }
                c.uploading = true;
                // A snapshot moves the epoch only with no upload under way.
                break (c.gen, c.stored(), st.epoch);
            }
        };
        let len = usize::try_from(self.geometry().chunk_len(i)).unwrap_or(0);
        buf.resize(len, 0);
        let r = self
            .cache
            .read(i * self.cs(), buf)
            .map_err(|e| format!("reading it from the cache: {e}"))
            .and_then(|()| {
                if is_all_zero(buf) {
                    self.clear(i, stored, epoch)
                } else {
                    encode_chunk(self.volume, i, buf)
                        .map_err(|e| e.to_string())
                        .and_then(|obj| {
                            self.store
                                .put(&chunk_key_at(i, epoch), Bytes::from(obj))
                                .map_err(|e| e.to_string())
                        })
                        .map(|()| Stored {
                            head: Some(false),
                            below: stored.below,
                        })
                }
            });
        let mut st = lock(&self.state);
        let c = st.table.get(i);
        c.uploading = false;
        match r {
            Ok(now) => {
                c.uploaded = c.uploaded.max(gen);
                c.set_stored(now);
                c.upload_failed = false;
                let stored = now.has_data();
                let clean = !c.dirty();
                if clean {
                    st.table.dirty.remove(&i);
                    // Clean on record only after the bucket has it; a crash
                    // before this uploads the same bytes again.
                    let _ = self.persist(i, CLEAN);
                }
                if stored {
                    self.counters.uploaded.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .uploaded_bytes
                        .fetch_add(len as u64, Ordering::Relaxed);
                } else {
                    self.counters.deleted.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                c.upload_failed = true;
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!("s3: uploading chunk {i}: {e}");
            }
        }
        self.cv.notify_all();
    }

    /// Make chunk `i`, stored as `stored`, read as zeroes in `epoch`
    /// (the head): nothing stored for zeroes where nothing is below, else a
    /// tombstone hides what is. What the bucket has for it then.
    pub(super) fn clear(&self, i: u64, stored: Stored, epoch: u64) -> Result<Stored, String> {
        let key = chunk_key_at(i, epoch);
        if stored.below.is_some() {
            if stored.head != Some(true) {
                let tomb = encode_tombstone(self.volume, i).map_err(|e| e.to_string())?;
                self.store
                    .put(&key, Bytes::from(tomb))
                    .map_err(|e| e.to_string())?;
            }
            return Ok(Stored {
                head: Some(true),
                below: stored.below,
            });
        }
        if stored.head.is_some() {
            self.store.delete(&key).map_err(|e| e.to_string())?;
        }
        Ok(Stored::default())
    }

    /// The write-back thread: queue uploads of idle dirty chunks, evict
    /// clean ones over the cache size.
    pub(super) fn writeback(&self) {
        let delay = u64::try_from(self.writeback_delay.as_millis()).unwrap_or(u64::MAX);
        // Past half the cache in dirty chunks, upload without waiting.
        let dirty_limit = (self.cache_size / 2 / self.cs()).max(1);
        let cap = (self.cache_size / self.cs()).max(1);
        loop {
            let evict = {
                let st = lock(&self.state);
                let mut st = self
                    .tick
                    .wait_timeout(st, WRITEBACK_TICK)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                if st.table.closing {
                    return;
                }
                let now = self.now_ms();
                let hurry = st.table.dirty.len() as u64 > dirty_limit;
                let due: Vec<u64> = st
                    .table
                    .dirty
                    .iter()
                    .copied()
                    .filter(|&i| {
                        let c = st.table.chunk(i);
                        let idle = now.saturating_sub(c.last_write_ms) >= delay;
                        let old = now.saturating_sub(c.dirty_since_ms) >= delay.saturating_mul(4);
                        !c.uploading && (hurry || idle || old || c.restored)
                    })
                    .collect();
                let mut queued = false;
                for i in due {
                    queued |= queue(&mut st, Task::Upload(i));
                }
                if queued {
                    self.work.notify_all();
                }
                let over = st.table.resident.saturating_sub(cap);
                if over > 0 {
                    // A little below the cap, so eviction runs in batches.
                    let n = usize::try_from(over + cap / 16).unwrap_or(1);
                    st.table
                        .eviction_candidates(n, now.saturating_sub(EVICT_MIN_IDLE_MS))
                } else {
                    Vec::new()
                }
            };
            for i in evict {
                self.evict(i);
            }
        }
    }

    /// Drop clean chunk `i` from the cache, if it is still idle and clean.
    pub(super) fn evict(&self, i: u64) {
        {
            let mut st = lock(&self.state);
            if !st.table.has(i) {
                return;
            }
            let c = st.table.get(i);
            if !c.resident || c.dirty() || c.pins > 0 || c.busy.is_some() || c.uploading {
                return;
            }
            c.busy = Some(Busy::Evict);
            c.resident = false;
            st.table.resident = st.table.resident.saturating_sub(1);
        }
        // Absent on record before the bytes go; a crash between re-fetches.
        let r = self.persist(i, ABSENT).and_then(|()| {
            self.cache
                .zero(i * self.cs(), self.geometry().chunk_len(i))
                .map_err(|_| Errno::IO)
        });
        if r.is_ok() {
            self.counters.evicted.fetch_add(1, Ordering::Relaxed);
        }
        let mut st = lock(&self.state);
        st.table.get(i).busy = None;
        self.cv.notify_all();
    }
}
