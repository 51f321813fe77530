//! [`S3Target`]: a device whose chunks live in a bucket, served through a
//! local cache directory ([`super::cache`]).
//!
//! The request path never waits for the network on the frontend's thread:
//! a read or write whose chunks are all cached is a `pread`/`pwrite` of
//! the cache's data file, inline. Anything else is handed to a request
//! worker ([`Ctx::defer`]): a read or partial write of a chunk not cached
//! fetches it first (verified against its checksum), a flush or FUA write
//! uploads what it covers and waits. Transfer workers upload dirty chunks
//! and read ahead, at most `upload_jobs` at once; a write-back thread
//! queues uploads for chunks idle for `writeback_delay` (sooner when dirty
//! data passes half the cache) and evicts the least recently used clean
//! chunks when the cache passes its size.
//!
//! An upload of an all-zero chunk deletes its object instead: discarded and
//! zeroed chunks cost nothing in the bucket. Where an older epoch or a
//! parent has data for the chunk, a tombstone (an empty chunk object)
//! hides it instead.
//!
//! Uploads go to the head epoch's keys. A snapshot (`target/snapshot.rs`)
//! holds new writes, uploads everything dirty, and moves the head to the
//! next epoch, so the snapshot's objects are never written again. A clone
//! reads its parents' objects until it writes its own (`super::view`). A
//! target opened at a snapshot (`S3Options::snapshot`) is read-only.
//!
//! Failure policy: each bucket request is retried with backoff for
//! `retry.budget` (60 s by default: a server restart or throttling rides
//! through). A flush whose uploads still fail completes with EIO; the data
//! stays dirty in the cache and the write-back keeps trying, so nothing is
//! lost and service resumes when the server does. A read whose chunk
//! cannot be fetched, or fails verification, fails with EIO.
//!
//! Under ublk zero copy the request's data stays in the kernel's pages and
//! moves between them and the cache's data file on the ring; misses are
//! fetched by a request worker first (`target/zc.rs`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use serde_json::json;

use super::cache::{CacheDir, CLEAN, DIRTY};
use super::chunks::{Busy, Stored, Table};
use super::layout::{chunk_key_at, decode_chunk, is_all_zero, Geometry, Lease, Manifest, VolumeId};
use super::{lease, S3Config, S3Error, S3Store};
use crate::control::{Registration, Registry};
use crate::io::Deferred;
use crate::target::{
    ring_result, Caps, Ctx, Extent, Flags, Op, RangeOpCaps, Request, Submit, Target,
    MAX_RANGE_OP_BYTES,
};

mod open;
mod resize;
mod snapshot;
mod writeback;
mod zc;
#[cfg(test)]
mod zc_tests;

use zc::Job;

/// Default cache size.
pub const DEFAULT_CACHE_SIZE: u64 = 1 << 30;
/// Default number of uploads and read-aheads at once.
pub const DEFAULT_UPLOAD_JOBS: usize = 8;
/// Default idle time before a dirty chunk is uploaded.
pub const DEFAULT_WRITEBACK_DELAY: Duration = Duration::from_secs(2);
/// Most bytes read ahead of a sequential reader.
const READ_AHEAD_BYTES: u64 = 16 << 20;
/// Threads serving requests that must wait for the bucket.
const REQUEST_WORKERS: usize = 8;
/// How often the write-back thread looks at the table.
const WRITEBACK_TICK: Duration = Duration::from_millis(100);
/// A chunk used this recently is not evicted (the cache may pass its size
/// for that long), so a chunk fetched for a request stays until it is used.
const EVICT_MIN_IDLE_MS: u64 = 1000;
/// Longest a write waits for uploads to make room under the dirty limit.
const ROOM_WAIT: Duration = Duration::from_secs(30);
/// Most extents one `extents` call reports.
const MAX_EXTENTS: usize = 1024;
/// Fetches a request that missed the cache tries before it fails: each
/// time, eviction may have taken a chunk back before the request got to it.
const MISS_TRIES: u16 = 8;

/// How to open an s3 volume.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// The bucket, prefix, endpoint, credentials and retry policy.
    pub store: S3Config,
    /// The device size: needed to create a volume, checked against an existing one.
    pub size: Option<u64>,
    /// `size` only sizes a new volume: an existing one keeps its own
    /// (`userblk copy`, whose destination may be larger than its source).
    pub size_for_new_only: bool,
    /// The chunk size: used to create a volume, checked against an existing one.
    pub chunk_size: Option<u64>,
    /// The local cache directory.
    pub cache_dir: PathBuf,
    /// Most bytes of clean chunks kept in the cache (dirty ones stay until uploaded).
    pub cache_size: u64,
    /// Uploads and read-aheads at once.
    pub upload_jobs: usize,
    /// A dirty chunk is uploaded once it has had no write for this long.
    pub writeback_delay: Duration,
    /// Take the volume even if another daemon holds its lease.
    pub break_lease: bool,
    /// What keeps a second writer out (`--lease`).
    pub lease: lease::LeaseMode,
    /// Remove the cache directory when the target closes with nothing
    /// dirty left (a cache made for one job, as `userblk copy` does).
    pub ephemeral_cache: bool,
    /// Open this snapshot of the volume, read-only, instead of its head
    /// (no lease: nothing of a snapshot changes).
    pub snapshot: Option<String>,
}

impl S3Options {
    /// Options with the defaults for everything but the store and the cache directory.
    pub fn new(store: S3Config, cache_dir: PathBuf) -> Self {
        S3Options {
            store,
            size: None,
            size_for_new_only: false,
            chunk_size: None,
            cache_dir,
            cache_size: DEFAULT_CACHE_SIZE,
            upload_jobs: DEFAULT_UPLOAD_JOBS,
            writeback_delay: DEFAULT_WRITEBACK_DELAY,
            break_lease: false,
            lease: lease::LeaseMode::Auto,
            ephemeral_cache: false,
            snapshot: None,
        }
    }
}

/// Work for the transfer workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Task {
    Upload(u64),
    Fetch(u64),
}

/// Counters, for the log and `describe`.
#[derive(Debug, Default)]
struct Counters {
    fetched: AtomicU64,
    fetched_bytes: AtomicU64,
    uploaded: AtomicU64,
    uploaded_bytes: AtomicU64,
    deleted: AtomicU64,
    evicted: AtomicU64,
    failed: AtomicU64,
}

/// The table and the transfer queue, under one lock.
#[derive(Debug)]
struct State {
    table: Table,
    queue: VecDeque<Task>,
    queued: BTreeSet<Task>,
    /// The last chunk a read touched, to spot sequential readers.
    last_read: Option<u64>,
    /// Chunks in a row a sequential reader has moved through: the
    /// read-ahead window grows with it.
    streak: u32,
    /// What the bucket has for chunks past the end (listed at open, or
    /// left by a shrink): a grow clears those it takes in, so they never
    /// read as data.
    strays: BTreeMap<u64, Stored>,
    /// The head epoch: uploads go to its keys.
    epoch: u64,
    /// A snapshot is being taken: writes wait.
    frozen: bool,
}

/// A volume the chunks may come from: the volume itself (layer 0) or one
/// of a clone's parents.
struct Layer {
    store: S3Store,
    volume: VolumeId,
}

/// What every thread of the target shares.
struct Core {
    store: S3Store,
    /// The size changes only by a resize (`resize.rs`), which takes the
    /// state lock too: under that lock the geometry and the table agree.
    geometry: RwLock<Geometry>,
    /// The manifest as the bucket has it (a resize rewrites its size).
    manifest: Mutex<Manifest>,
    volume: VolumeId,
    /// The parents' stores, nearest first (layers 1...).
    parents: Vec<Layer>,
    /// Opened at a snapshot: nothing is written.
    read_only: bool,
    /// That snapshot's name.
    snapshot: Option<String>,
    cache: CacheDir,
    state: Mutex<State>,
    /// Chunk state changed: a fetch, an upload or an eviction ended, the
    /// last writer left a chunk. Waited on by requests and uploads.
    cv: Condvar,
    /// The transfer queue got work, or the target is closing.
    work: Condvar,
    /// Only to end the write-back thread's sleep at close.
    tick: Condvar,
    cache_size: u64,
    /// Dirty chunks past which writes that dirty more wait for uploads.
    dirty_max: u64,
    writeback_delay: Duration,
    start: Instant,
    counters: Counters,
}

/// The s3 target. See the module docs.
pub struct S3Target {
    core: Arc<Core>,
    /// `None` at a snapshot (read-only).
    lease: Option<Lease>,
    /// What keeps a second writer out while the target lives (the host
    /// lock is released when it drops, after the lease).
    _guard: Option<lease::Guard>,
    created: bool,
    ephemeral_cache: bool,
    /// `userblk ctl` actions, offered until the target goes.
    actions: Mutex<Vec<Registration>>,
    /// One change of the volume (resize, snapshot) at a time.
    resizing: Arc<Mutex<()>>,
    jobs: Option<mpsc::Sender<(Deferred, Request, Job)>>,
    threads: Vec<JoinHandle<()>>,
    /// Tells this target's zero-copy requests apart from another's in
    /// the per-thread records (`zc.rs`).
    zc_id: u64,
}

impl std::fmt::Debug for S3Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Target")
            .field("bucket", &self.core.store.bucket())
            .field("prefix", &self.core.store.prefix())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl S3Target {
    fn defer(&self, ctx: &mut Ctx<'_>) -> Submit {
        self.send(ctx, Job::Serve, zc::STEP_SERVED)
    }

    /// Hand `ctx`'s request to a request worker to do `job`; its result
    /// comes back at `complete` with `step`.
    fn send(&self, ctx: &mut Ctx<'_>, job: Job, step: u16) -> Submit {
        let Some(tx) = &self.jobs else {
            return Submit::Done(Err(Errno::IO));
        };
        match ctx.defer(step) {
            Ok(d) => {
                // A worker that is gone drops the job, which fails the request.
                let _ = tx.send((d, *ctx.req(), job));
                Submit::Pending
            }
            Err(e) => Submit::Done(Err(e)),
        }
    }

    /// Whether this open created the volume (so it reads as zeroes).
    pub fn created(&self) -> bool {
        self.created
    }

    /// What the cache holds and what the transfers did (JSON for `userblk ctl`).
    pub fn status(&self) -> serde_json::Value {
        self.core.status()
    }

    /// Offer `status` and `upload` (`userblk ctl -n ID upload`: every
    /// dirty chunk up now, and wait) in `control`, for as long as the
    /// target lives.
    pub fn register_actions(&self, control: &Registry) {
        let core = Arc::clone(&self.core);
        let status = control.register(
            "status",
            "s3",
            "chunks cached and dirty, transfers and their counters (JSON)",
            move |_| Ok(core.status().to_string()),
        );
        let core = Arc::clone(&self.core);
        let upload = control.register(
            "upload",
            "s3",
            "upload every dirty chunk now and wait until the bucket has them",
            move |_| {
                let n = lock(&core.state).table.dirty.len();
                core.flush(None)
                    .map(|()| format!("uploaded {n} dirty chunks"))
                    .map_err(|e| format!("uploading: {e}; see the daemon's log"))
            },
        );
        lock(&self.actions).extend([status, upload]);
        if let Some(ours) = &self.lease {
            let (core, ours, one) = (
                Arc::clone(&self.core),
                ours.clone(),
                Arc::clone(&self.resizing),
            );
            let snapshot = control.register(
                "snapshot",
                "s3",
                "snapshot NAME: hold writes, upload everything, freeze this point as NAME",
                move |args| {
                    let [name] = args else {
                        return Err(
                            "takes the snapshot's name: `userblk snapshot create s3://BUCKET/PREFIX NAME` asks this daemon"
                                .into(),
                        );
                    };
                    let _one = lock(&one);
                    core.snapshot(&ours, name)
                        .map(|r| serde_json::json!(r).to_string())
                        .map_err(|e| e.to_string())
                },
            );
            lock(&self.actions).push(snapshot);
        }
    }

    /// Take snapshot `name` of the volume now (see `target/snapshot.rs`).
    ///
    /// # Errors
    /// A read-only target, a bad or taken name, or the bucket's errors.
    pub fn snapshot(&self, name: &str) -> Result<super::layout::SnapshotRecord, S3Error> {
        let Some(ours) = &self.lease else {
            return Err(S3Error::Invalid(
                "a snapshot opened read-only cannot be snapshotted".into(),
            ));
        };
        let _one = lock(&self.resizing);
        self.core.snapshot(ours, name)
    }
}

impl Core {
    fn geometry(&self) -> Geometry {
        *self.geometry.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn cs(&self) -> u64 {
        self.geometry().chunk_size()
    }

    /// Whether `[offset, offset + len)` lies within the device as it is
    /// now: a request admitted before a shrink may reach past the new end.
    fn within(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.geometry().size())
    }

    /// Whether `req` covers chunk `i` whole (a write then needs no fetch).
    fn covers(&self, req: &Request, i: u64) -> bool {
        let start = i * self.cs();
        req.offset <= start
            && req.offset + u64::from(req.len) >= start + self.geometry().chunk_len(i)
    }

    /// The chunks `[offset, offset + len)` touches.
    fn span(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        let first = offset / self.cs();
        let last = (offset + len.max(1) - 1) / self.cs();
        first..=last
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn persist(&self, i: u64, byte: u8) -> Result<(), Errno> {
        self.cache.set_state(i, byte).map_err(|e| {
            tracing::error!("s3: recording chunk {i}'s state in the cache: {e}");
            Errno::IO
        })
    }

    /// Pin the chunks of `req` and make writes dirty, if every chunk is
    /// ready: cached, or (for a write) wholly covered. `None`: not ready.
    fn pin(&self, st: &mut State, req: &Request, over: bool) -> Option<Result<(), Errno>> {
        let write = req.op != Op::Read;
        if !self.within(req.offset, u64::from(req.len)) {
            return Some(Err(past_end(req)));
        }
        // A snapshot is being taken: writes wait on a worker (`before_miss`).
        if write && st.frozen {
            return None;
        }
        let span = self.span(req.offset, u64::from(req.len));
        let full = st.table.dirty.len() as u64 >= self.dirty_max;
        for i in span.clone() {
            let whole = self.covers(req, i);
            let c = st.table.get(i);
            if c.busy.is_some() || !(c.resident || (write && whole)) {
                return None;
            }
            // Past the dirty limit a write that dirties one more chunk
            // waits (on a worker) for uploads to make room.
            if write && full && !over && !c.dirty() {
                return None;
            }
        }
        let now = self.now_ms();
        for i in span {
            st.table.touch(i, now);
            let c = st.table.get(i);
            c.pins += 1;
            if !write {
                continue;
            }
            c.writers += 1;
            let was = c.state_byte();
            if !c.resident {
                c.resident = true;
                st.table.resident += 1;
            }
            if let Err(e) = self.mark_dirty(st, i, was, now) {
                self.unpin(st, req);
                return Some(Err(e));
            }
        }
        Some(Ok(()))
    }

    /// Chunk `i` gets new bytes: a new generation, and dirty on record
    /// before the bytes change (see the cache docs) unless its state byte
    /// `was` said so already.
    fn mark_dirty(&self, st: &mut State, i: u64, was: u8, now: u64) -> Result<(), Errno> {
        let c = st.table.get(i);
        if !c.dirty() {
            c.dirty_since_ms = now;
        }
        c.last_write_ms = now;
        c.restored = false;
        st.table.bump(i);
        if was != DIRTY {
            self.persist(i, DIRTY)?;
        }
        Ok(())
    }

    fn unpin(&self, st: &mut State, req: &Request) {
        let write = req.op != Op::Read;
        for i in self.span(req.offset, u64::from(req.len)) {
            let c = st.table.get(i);
            c.pins = c.pins.saturating_sub(1);
            if write {
                c.writers = c.writers.saturating_sub(1);
            }
        }
        // Only uploads wait for writers to leave; nobody waits on readers.
        if write && st.table.upload_waiters > 0 {
            self.cv.notify_all();
        }
    }

    /// Pin the chunks of `req` if they are ready (see `pin`), and read
    /// ahead of a reader; `None` if not ready. The caller unpins once
    /// the request's bytes moved.
    fn begin(&self, req: &Request, over: bool) -> Option<Result<(), Errno>> {
        let mut st = lock(&self.state);
        match self.pin(&mut st, req, over)? {
            Ok(()) => {}
            Err(e) => return Some(Err(e)),
        }
        if req.op == Op::Read {
            self.read_ahead(&mut st, req);
        }
        Some(Ok(()))
    }

    /// Serve `req` from the cache if its chunks are ready; `None` if not.
    fn try_cached(&self, req: &Request, data: Data<'_>, over: bool) -> Option<Result<u32, Errno>> {
        if let Err(e) = self.begin(req, over)? {
            return Some(Err(e));
        }
        let len = u64::from(req.len);
        let r = match (req.op, data) {
            (Op::Read, Data::Out(out)) => self.cache.read(req.offset, out),
            (Op::Write, Data::In(data)) => self.cache.write(req.offset, data),
            (Op::Discard | Op::WriteZeroes, _) => self.cache.zero(req.offset, len),
            _ => Ok(()),
        };
        self.unpin(&mut lock(&self.state), req);
        // Bytes moved for reads and writes, 0 for other ops (the IoResult contract).
        let moved = if matches!(req.op, Op::Read | Op::Write) {
            req.len
        } else {
            0
        };
        Some(r.map(|()| moved).map_err(|e| {
            tracing::error!("s3: cache {:?} at {}+{len}: {e}", req.op, req.offset);
            Errno::IO
        }))
    }

    /// A read moved on to a new chunk right after the previous one: fetch
    /// the next ones in the background, a window that doubles (from 2
    /// chunks up to [`READ_AHEAD_BYTES`]) while the reader stays sequential.
    fn read_ahead(&self, st: &mut State, req: &Request) {
        let span = self.span(req.offset, u64::from(req.len));
        let (first, last) = (*span.start(), *span.end());
        let sequential = st
            .last_read
            .is_some_and(|p| p + 1 == first || (p >= first && p < last));
        let moved = st.last_read != Some(last);
        if !moved {
            return;
        }
        st.last_read = Some(last);
        if !sequential {
            st.streak = 0;
            return;
        }
        st.streak = st.streak.saturating_add(1);
        let most = (READ_AHEAD_BYTES / self.cs()).max(2);
        let window = (1u64 << st.streak.min(16)).clamp(2, most);
        let end = (last + window).min(self.geometry().chunk_count().saturating_sub(1));
        let mut queued = false;
        for i in (last + 1)..=end {
            let c = st.table.get(i);
            if !c.resident && c.busy.is_none() {
                queued |= queue(st, Task::Fetch(i));
            }
        }
        if queued {
            self.work.notify_all();
        }
    }

    /// A request worker: serve `req`, waiting for the bucket as needed.
    fn serve(&self, req: Request, data: &mut [u8]) -> Result<u32, Errno> {
        if req.op == Op::Flush {
            return self.flush(None).map(|()| 0);
        }
        if !self.within(req.offset, u64::from(req.len)) {
            return Err(past_end(&req));
        }
        let span = self.span(req.offset, u64::from(req.len));
        self.before_miss(&req);
        let mut done = None;
        // Eviction may take a chunk back between the fetch and the access:
        // a few tries, each fetching what is missing.
        for _ in 0..MISS_TRIES {
            if req.op != Op::Read {
                self.wait_thawed();
            }
            self.fetch_for(&req)?;
            let data = if req.op == Op::Read {
                Data::Out(&mut *data)
            } else {
                Data::In(&*data)
            };
            if let Some(r) = self.try_cached(&req, data, true) {
                done = Some(r?);
                break;
            }
        }
        let n = done.ok_or_else(|| kept_leaving(&req))?;
        if req.op == Op::Write && req.flags.contains(Flags::FUA) {
            self.flush(Some(span))?;
        }
        Ok(n)
    }

    /// What a request that missed the cache does first: a read starts
    /// reading ahead (at the miss, not after it: the next chunks are
    /// fetched while this one is), a write waits for room under the
    /// dirty limit.
    fn before_miss(&self, req: &Request) {
        if req.op == Op::Read {
            self.read_ahead(&mut lock(&self.state), req);
        } else {
            self.wait_thawed();
            self.wait_for_room();
        }
    }

    /// Wait while a snapshot holds writes. Its flush bounds the wait (the
    /// bucket's retry budget, then the snapshot fails and lets go).
    fn wait_thawed(&self) {
        let mut st = lock(&self.state);
        while st.frozen && !st.table.closing {
            st = self
                .cv
                .wait_timeout(st, Duration::from_secs(1))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Fetch the chunks `req` needs in the cache: all it reads, and those
    /// it writes only in part (whole ones it replaces).
    fn fetch_for(&self, req: &Request) -> Result<(), Errno> {
        for i in self.span(req.offset, u64::from(req.len)) {
            if req.op == Op::Read || !self.covers(req, i) {
                self.ensure_cached(i)?;
            }
        }
        Ok(())
    }

    /// Wait until dirty chunks are under the limit, or `ROOM_WAIT` passed
    /// (the bucket may be down: then the cache grows rather than stall).
    fn wait_for_room(&self) {
        let deadline = Instant::now() + ROOM_WAIT;
        let mut st = lock(&self.state);
        while st.table.dirty.len() as u64 >= self.dirty_max && !st.table.closing {
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    "s3: {} dirty chunks and uploads are not keeping up; the cache grows past its size",
                    st.table.dirty.len()
                );
                break;
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Make chunk `i` cached, fetching it if needed.
    fn ensure_cached(&self, i: u64) -> Result<(), Errno> {
        let mut st = lock(&self.state);
        loop {
            // Past the end after a shrink (a read-ahead queued before it).
            if i >= self.geometry().chunk_count() {
                return Err(Errno::IO);
            }
            let c = st.table.get(i);
            if c.busy.is_some() {
                st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            if c.resident {
                return Ok(());
            }
            c.busy = Some(Busy::Fetch);
            // Under the lock: a snapshot moves the head epoch.
            let epoch = st.epoch;
            let source = st.table.chunk(i).source(epoch);
            drop(st);
            let r = self.fetch(i, source);
            st = lock(&self.state);
            let c = st.table.get(i);
            c.busy = None;
            if r.is_ok() {
                c.resident = true;
                st.table.resident += 1;
                st.table.touch(i, self.now_ms());
            }
            self.cv.notify_all();
            return r;
        }
    }

    /// Bring chunk `i` from the bucket into the cache (the caller holds it
    /// busy): the object of `source`'s (layer, epoch), or zeroes.
    fn fetch(&self, i: u64, source: Option<(u16, u64)>) -> Result<(), Errno> {
        let at = i * self.cs();
        let len = self.geometry().chunk_len(i);
        // Whatever a crash left there goes: the chunk is absent.
        let mut r = self.cache.zero(at, len).map_err(|e| {
            tracing::error!("s3: clearing chunk {i} in the cache: {e}");
            Errno::IO
        });
        if let (true, Some((layer, epoch))) = (r.is_ok(), source) {
            let (store, volume) = match usize::from(layer).checked_sub(1) {
                None => (&self.store, self.volume),
                Some(p) => match self.parents.get(p) {
                    Some(l) => (&l.store, l.volume),
                    None => return Err(Errno::IO),
                },
            };
            r = match store.get(&chunk_key_at(i, epoch)) {
                // Up to a whole chunk, cut to the chunk's length now: during a
                // shrink the last chunk's object is longer until it is
                // uploaded again (see `resize.rs`).
                Ok(Some(obj)) => match decode_chunk(&obj, volume, i, self.cs()) {
                    Ok(mut payload) => {
                        payload.truncate(usize::try_from(len).unwrap_or(usize::MAX));
                        self.counters.fetched.fetch_add(1, Ordering::Relaxed);
                        self.counters
                            .fetched_bytes
                            .fetch_add(payload.len() as u64, Ordering::Relaxed);
                        if is_all_zero(&payload) {
                            Ok(())
                        } else {
                            self.cache.write(at, &payload).map_err(|e| {
                                tracing::error!("s3: writing chunk {i} into the cache: {e}");
                                Errno::IO
                            })
                        }
                    }
                    Err(e) => {
                        tracing::error!("s3: fetched chunk refused: {e}");
                        Err(Errno::IO)
                    }
                },
                // The head's object, listed at open but gone: reads as
                // zeroes, as any missing chunk.
                Ok(None) if layer == 0 && epoch == lock(&self.state).epoch => Ok(()),
                // A snapshot's or a parent's object never goes while it is
                // seen (gc keeps it): something else deleted it.
                Ok(None) => {
                    tracing::error!(
                        "s3: chunk {i}'s object {}/{} is gone from the bucket (deleted by \
                         something other than userblk gc?)",
                        store.prefix(),
                        chunk_key_at(i, epoch)
                    );
                    Err(Errno::IO)
                }
                Err(e) => {
                    tracing::error!("s3: fetching chunk {i}: {e}");
                    Err(Errno::IO)
                }
            };
        }
        if r.is_err() {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            return r;
        }
        self.persist(i, CLEAN)
    }

    fn status(&self) -> serde_json::Value {
        let (cached, dirty, uploading, queued, epoch) = {
            let st = lock(&self.state);
            let uploading = st.table.chunks.iter().filter(|c| c.uploading).count();
            (
                st.table.resident,
                st.table.dirty.len(),
                uploading,
                st.queue.len(),
                st.epoch,
            )
        };
        json!({
            "epoch": epoch,
            "chunk_size": self.cs(),
            "chunks": self.geometry().chunk_count(),
            "cached_chunks": cached,
            "dirty_chunks": dirty,
            "uploading": uploading,
            "queued": queued,
            "cache_bytes_on_disk": self.cache.allocated_bytes(),
            "counters": self.summary(),
        })
    }

    fn summary(&self) -> serde_json::Value {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        json!({
            "fetched": n(&c.fetched),
            "fetched_bytes": n(&c.fetched_bytes),
            "uploaded": n(&c.uploaded),
            "uploaded_bytes": n(&c.uploaded_bytes),
            "deleted": n(&c.deleted),
            "evicted": n(&c.evicted),
            "failed": n(&c.failed),
        })
    }
}

/// A request admitted before a shrink that reaches past the new end: it
/// fails rather than write (or read) where the device no longer is.
fn past_end(req: &Request) -> Errno {
    tracing::warn!(
        "s3: {:?} at {}+{} is past the end of the resized device",
        req.op,
        req.offset,
        req.len
    );
    Errno::IO
}

/// A request that missed the cache gave up: its chunks were evicted
/// again after each fetch.
fn kept_leaving(req: &Request) -> Errno {
    tracing::error!(
        "s3: chunks of {:?} at {} kept leaving the cache",
        req.op,
        req.offset
    );
    Errno::IO
}

/// A request's data, for the cache.
enum Data<'a> {
    /// Where a read's bytes go.
    Out(&'a mut [u8]),
    /// A write's bytes (empty for the others).
    In(&'a [u8]),
}

/// Queue `t` unless it is queued already; whether it was new.
fn queue(st: &mut State, t: Task) -> bool {
    let new = st.queued.insert(t);
    if new {
        st.queue.push_back(t);
    }
    new
}

impl Target for S3Target {
    fn size(&self) -> u64 {
        self.core.geometry().size()
    }

    /// Grow or shrink the volume; the manifest in the bucket has the new
    /// size before this returns (see `target/resize.rs`).
    fn resize(&self, new_size: u64) -> crate::Result<u64> {
        let Some(ours) = &self.lease else {
            return Err(crate::Error::cannot_resize(
                "the s3 volume",
                "a snapshot is read-only".to_owned(),
            ));
        };
        let _one = lock(&self.resizing);
        self.core.resize(ours, new_size)
    }

    fn caps(&self) -> Caps {
        let range = RangeOpCaps {
            granularity: 4096,
            max_bytes: MAX_RANGE_OP_BYTES,
        };
        Caps {
            physical_block_size: 4096,
            volatile_cache: true,
            fua: true,
            discard: Some(range),
            write_zeroes: Some(range),
            read_only: self.core.read_only,
            ..Caps::new(self.core.geometry().size())
        }
    }

    fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        let req = *ctx.req();
        if self.core.read_only && !matches!(req.op, Op::Read | Op::Flush) {
            return Submit::Done(Err(Errno::ROFS));
        }
        // Zero copy: the data is in the kernel's pages (`zc.rs`).
        if !ctx.has_data_buffer() {
            self.zc_new_request(ctx.slot());
            if req.op.has_data() {
                return self.zc_submit(ctx, 0);
            }
        }
        match req.op {
            Op::Flush => {
                if lock(&self.core.state).table.dirty.is_empty() {
                    return Submit::Done(Ok(0));
                }
                self.defer(ctx)
            }
            // FUA waits for an upload: never on this thread.
            Op::Write if req.flags.contains(Flags::FUA) => self.defer(ctx),
            Op::Read => match self.core.try_cached(&req, Data::Out(ctx.data_mut()), false) {
                Some(r) => Submit::Done(r),
                None => self.defer(ctx),
            },
            _ => match self.core.try_cached(&req, Data::In(ctx.data()), false) {
                Some(r) => Submit::Done(r),
                None => self.defer(ctx),
            },
        }
    }

    fn complete(&self, ctx: &mut Ctx<'_>, step: u16, res: i32) -> Submit {
        if step != zc::STEP_SERVED {
            return self.zc_complete(ctx, step, res);
        }
        Submit::Done(ring_result(res).map(|_| ctx.done_bytes()))
    }

    /// Reads and writes move between the request's pages and the cache's
    /// data file on the ring when the data is not in memory (`zc.rs`).
    fn data_on_ring_only(&self) -> bool {
        true
    }

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), Errno> {
        let st = lock(&self.core.state);
        let end = (offset + len).min(self.core.geometry().size());
        let mut at = offset;
        let first = out.len();
        while at < end && out.len() - first < MAX_EXTENTS {
            let i = at / self.core.cs();
            let chunk_end = (i * self.core.cs() + self.core.geometry().chunk_len(i)).min(end);
            let e = if st.table.chunk(i).hole() {
                Extent::hole(chunk_end - at)
            } else {
                Extent::data(chunk_end - at)
            };
            e.push_merged(out, first);
            at = chunk_end;
        }
        Ok(())
    }

    fn describe(&self) -> serde_json::Value {
        json!({
            "type": "s3",
            "endpoint": self.core.store.endpoint(),
            "bucket": self.core.store.bucket(),
            "prefix": self.core.store.prefix(),
            "size": self.core.geometry().size(),
            "chunk_size": self.core.cs(),
            "cache_dir": self.core.cache.path(),
            "cache_size": self.core.cache_size,
            "volume": self.core.volume.to_string(),
            "snapshot": self.core.snapshot,
            "parents": lock(&self.core.manifest).parents.iter().map(|p| &p.prefix).collect::<Vec<_>>(),
        })
    }
}

impl Drop for S3Target {
    fn drop(&mut self) {
        lock(&self.actions).clear();
        // Everything written goes up before the daemon lets go.
        let flushed = self.core.flush(None);
        {
            let mut st = lock(&self.core.state);
            st.table.closing = true;
        }
        self.core.cv.notify_all();
        self.core.work.notify_all();
        self.core.tick.notify_all();
        drop(self.jobs.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let dirty = lock(&self.core.state).table.dirty.len();
        tracing::info!("s3: closing; {}", self.core.summary());
        // Clean close: the cache is trusted even after a reboot.
        if let Err(e) = self.core.cache.close_clean() {
            tracing::warn!("s3: closing the cache: {e}");
        }
        if flushed.is_ok() && dirty == 0 {
            if let Some(ours) = &self.lease {
                lease::release(&self.core.store, ours);
            }
            if self.ephemeral_cache {
                let dir = self.core.cache.path();
                if let Err(e) = std::fs::remove_dir_all(dir) {
                    tracing::warn!("s3: removing the cache {}: {e}", dir.display());
                }
            }
        } else {
            tracing::warn!(
                "s3: {dirty} dirty chunks could not be uploaded; they stay in {} and upload when \
                 the volume is next opened with this cache, and the lease stays so no other host \
                 serves the volume without them",
                self.core.cache.path().display()
            );
        }
    }
}
