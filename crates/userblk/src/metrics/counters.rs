//! The counter file of one device, mapped shared: the daemon's writable
//! mapping with a [`Block`] per serving thread, and a reader's
//! [`Snapshot`] of it.
//!
//! Every word is only ever accessed as an `AtomicU64`, by any process, so
//! a reader loads while the daemon adds; relaxed order is enough (totals
//! read across counters may be torn by a request, never a counter itself).
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use rustix::mm::{MapFlags, ProtFlags};

use super::layout::{self as l, BLOCKS, BLOCK_WORDS, BUCKETS, FILE_BYTES, OPS};
use crate::target::Op;
use crate::{Error, Result};

/// A shared mapping of a whole counter file, seen as atomic words.
struct Words {
    ptr: NonNull<AtomicU64>,
    words: usize,
}

// SAFETY: the mapping is owned by this value and only ever accessed
// through `&AtomicU64`, which is `Sync`.
unsafe impl Send for Words {}
// SAFETY: as above.
unsafe impl Sync for Words {}

impl Words {
    /// Map the first [`FILE_BYTES`] of `file` (which must be that long),
    /// writable or read-only. A read-only mapping is only ever loaded from.
    fn map(file: &File, writable: bool) -> std::io::Result<Words> {
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        // SAFETY: a new mapping at an address the kernel picks aliases no
        // Rust object; it is owned by the returned value and unmapped once, in Drop.
        let raw = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                FILE_BYTES,
                prot,
                MapFlags::SHARED,
                file.as_fd(),
                0,
            )
        }?;
        let ptr = NonNull::new(raw.cast::<AtomicU64>()).ok_or(std::io::ErrorKind::OutOfMemory)?;
        Ok(Words {
            ptr,
            words: FILE_BYTES / 8,
        })
    }

    /// Words `start..start + n`, if inside the mapping.
    fn slice(&self, start: usize, n: usize) -> Option<&[AtomicU64]> {
        if start.checked_add(n)? > self.words {
            return None;
        }
        // SAFETY: the range is inside the mapping (checked), which is
        // page-aligned (so every word is aligned) and lives as long as
        // `&self`; its memory is only ever accessed as atomics, here and in
        // every other process mapping the file.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), n) })
    }

    fn word(&self, i: usize) -> Option<&AtomicU64> {
        self.slice(i, 1)?.first()
    }

    fn load(&self, i: usize) -> u64 {
        self.word(i).map_or(0, |w| w.load(Ordering::Relaxed))
    }
}

impl Drop for Words {
    fn drop(&mut self) {
        // SAFETY: exactly what mmap returned; nothing borrows the mapping
        // once its owner is dropped.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), FILE_BYTES) };
    }
}

fn path_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |err| Error::Path {
        path: path.to_path_buf(),
        err,
    }
}

/// Whether the header in `w` is one of this layout.
fn header_ok(w: &Words) -> bool {
    w.load(l::H_MAGIC) == l::MAGIC
        && w.load(l::H_VERSION) == l::VERSION
        && w.load(l::H_BLOCKS) == BLOCKS as u64
        && w.load(l::H_BLOCK_WORDS) == BLOCK_WORDS as u64
        && w.load(l::H_SHAPE) == l::shape()
}

/// A device's counter file, mapped writable by its daemon.
pub struct Counters {
    words: Words,
    path: PathBuf,
    /// Blocks a thread of this process holds.
    claimed: Vec<AtomicBool>,
    /// Where a thread that found every block taken shares one.
    next_shared: AtomicUsize,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters")
            .field("path", &self.path)
            .finish()
    }
}

impl Counters {
    /// A new, zeroed counter file at `path`, replacing any old one (made
    /// beside it and renamed, so a reader sees the old file or the new
    /// one, never a half-made header).
    pub fn create(path: &Path) -> Result<Arc<Counters>> {
        let tmp = path.with_extension("metrics.tmp");
        let err = path_err(&tmp);
        let _ = std::fs::remove_file(&tmp);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(&err)?;
        file.set_len(FILE_BYTES as u64).map_err(&err)?;
        let words = Words::map(&file, true).map_err(&err)?;
        for (i, v) in [
            (l::H_VERSION, l::VERSION),
            (l::H_BLOCKS, BLOCKS as u64),
            (l::H_BLOCK_WORDS, BLOCK_WORDS as u64),
            (l::H_SHAPE, l::shape()),
            (l::H_MAGIC, l::MAGIC),
        ] {
            if let Some(w) = words.word(i) {
                w.store(v, Ordering::Relaxed);
            }
        }
        std::fs::rename(&tmp, path).map_err(path_err(path))?;
        Ok(Arc::new(Counters::with(words, path)))
    }

    /// The counter file at `path` of a device a new daemon takes over
    /// (`recover`, `upgrade`): its counts go on and its recovery count
    /// goes up. A missing or foreign file is replaced by a new one (whose
    /// recovery count is then 1).
    pub fn take_over(path: &Path) -> Result<Arc<Counters>> {
        let existing = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .ok()
            .filter(|f| f.metadata().is_ok_and(|m| m.len() == FILE_BYTES as u64))
            .and_then(|f| Words::map(&f, true).ok())
            .filter(header_ok);
        let c = match existing {
            Some(words) => {
                // The old daemon's requests are gone with it (or were
                // handed over and are counted again by whoever ends them).
                let used = words.load(l::H_USED).min(BLOCKS as u64);
                for b in 0..usize::try_from(used).unwrap_or(BLOCKS) {
                    if let Some(w) = words.word(l::block_start(b) + l::B_INFLIGHT) {
                        w.store(0, Ordering::Relaxed);
                    }
                }
                Arc::new(Counters::with(words, path))
            }
            None => Counters::create(path)?,
        };
        c.add_header(l::H_RECOVERIES, 1);
        Ok(c)
    }

    fn with(words: Words, path: &Path) -> Counters {
        Counters {
            words,
            path: path.to_path_buf(),
            claimed: (0..BLOCKS).map(|_| AtomicBool::new(false)).collect(),
            next_shared: AtomicUsize::new(0),
        }
    }

    fn add_header(&self, i: usize, v: u64) {
        if let Some(w) = self.words.word(i) {
            w.fetch_add(v, Ordering::Relaxed);
        }
    }

    /// Blocks ever claimed (what readers sum).
    pub fn blocks_used(&self) -> u64 {
        self.words.load(l::H_USED)
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A block for one serving thread: a free one of its own if there is
    /// one, else one shared with another thread.
    pub fn block(self: &Arc<Self>) -> Block {
        let free = self.claimed.iter().position(|c| {
            c.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        });
        let (index, own) = match free {
            Some(i) => (i, true),
            None => (
                self.next_shared.fetch_add(1, Ordering::Relaxed) % BLOCKS,
                false,
            ),
        };
        if let Some(w) = self.words.word(l::H_USED) {
            w.fetch_max(index as u64 + 1, Ordering::Relaxed);
        }
        Block {
            counters: Arc::clone(self),
            start: l::block_start(index),
            own: own.then_some(index),
        }
    }
}

/// One serving thread's counters.
pub struct Block {
    counters: Arc<Counters>,
    /// First word of the block.
    start: usize,
    /// The block's index, if this thread holds it alone.
    own: Option<usize>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("start", &self.start)
            .field("own", &self.own)
            .finish()
    }
}

impl Block {
    fn words(&self) -> &[AtomicU64] {
        self.counters
            .words
            .slice(self.start, BLOCK_WORDS)
            .unwrap_or(&[])
    }

    /// Count a finished request: `op`, its result and how long it took.
    /// `bytes` counts only if it succeeded.
    pub fn record(&self, op: Op, bytes: u64, ok: bool, ns: u64) {
        let Some(w) = self
            .words()
            .get(l::op_word(op, 0)..l::op_word(op, l::OP_WORDS))
        else {
            return;
        };
        let add = |i: usize, v: u64| {
            if let Some(c) = w.get(i) {
                c.fetch_add(v, Ordering::Relaxed);
            }
        };
        add(l::O_REQUESTS, 1);
        if ok {
            add(l::O_BYTES, bytes);
        } else {
            add(l::O_ERRORS, 1);
        }
        add(l::O_SUM_NS, ns);
        add(l::O_BUCKETS + l::bucket(ns), 1);
    }

    /// Requests this thread's target holds now.
    pub fn set_inflight(&self, n: usize) {
        // A shared block's gauge is its last writer's: enough to see that
        // work is in flight.
        if let Some(w) = self.words().get(l::B_INFLIGHT) {
            w.store(n as u64, Ordering::Relaxed);
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        if let Some(i) = self.own {
            self.set_inflight(0);
            if let Some(c) = self.counters.claimed.get(i) {
                c.store(false, Ordering::Release);
            }
        }
    }
}

/// One op's totals over every block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpTotals {
    /// Requests finished.
    pub requests: u64,
    /// Bytes of those that succeeded.
    pub bytes: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Sum of latencies, in nanoseconds.
    pub sum_ns: u64,
    /// Requests per latency bucket (not cumulative); see [`layout::bucket`](super::layout::bucket).
    pub buckets: [u64; BUCKETS],
}

impl Default for OpTotals {
    fn default() -> Self {
        OpTotals {
            requests: 0,
            bytes: 0,
            errors: 0,
            sum_ns: 0,
            buckets: [0; BUCKETS],
        }
    }
}

/// A device's counters as read at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Per op, in [`OPS`] order.
    pub ops: [OpTotals; OPS.len()],
    /// Requests in flight now.
    pub inflight: u64,
    /// Times a daemon took the device over.
    pub recoveries: u64,
}

impl Snapshot {
    /// Read the counter file at `path`: `Ok(None)` if there is none, or it
    /// is not one of this layout (an older userblk's).
    pub fn read(path: &Path) -> Result<Option<Snapshot>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(path_err(path)(e)),
        };
        let len = file.metadata().map_err(path_err(path))?.len();
        if len != FILE_BYTES as u64 {
            return Ok(None);
        }
        // Files are replaced by rename, never shortened, so the mapping
        // stays backed while it is read.
        let words = Words::map(&file, false).map_err(path_err(path))?;
        if !header_ok(&words) {
            return Ok(None);
        }
        let used = usize::try_from(words.load(l::H_USED))
            .unwrap_or(BLOCKS)
            .min(BLOCKS);
        let mut s = Snapshot {
            recoveries: words.load(l::H_RECOVERIES),
            ..Snapshot::default()
        };
        for b in 0..used {
            let Some(w) = words.slice(l::block_start(b), BLOCK_WORDS) else {
                break;
            };
            let get = |i: usize| w.get(i).map_or(0, |c| c.load(Ordering::Relaxed));
            for (t, op) in s.ops.iter_mut().zip(OPS) {
                let at = |f: usize| get(l::op_word(op, f));
                // Counters wrap rather than stop (after centuries).
                t.requests = t.requests.wrapping_add(at(l::O_REQUESTS));
                t.bytes = t.bytes.wrapping_add(at(l::O_BYTES));
                t.errors = t.errors.wrapping_add(at(l::O_ERRORS));
                t.sum_ns = t.sum_ns.wrapping_add(at(l::O_SUM_NS));
                for (k, n) in t.buckets.iter_mut().enumerate() {
                    *n = n.wrapping_add(at(l::O_BUCKETS + k));
                }
            }
            s.inflight = s.inflight.wrapping_add(get(l::B_INFLIGHT));
        }
        Ok(Some(s))
    }

    /// The totals of `op`.
    pub fn op(&self, op: Op) -> &OpTotals {
        &self.ops[l::op_index(op)]
    }
}
