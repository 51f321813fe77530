//! `flakey`: a disk with a volatile write cache that can lose power
//! (`trigger=PATH,max_dirty=64M`; `broken=ack-flush` for a disk that lies).
//!
//! The device advertises a write-back cache with FUA, so the kernel and
//! file systems send flushes and FUA writes as they would to a real disk.
//! Writes, discards and write-zeroes are held back in memory (an
//! [`Overlay`](overlay::Overlay)) and complete at once; reads see them over
//! the target beneath. A flush writes everything held down to the target
//! and flushes it before it completes; a FUA write goes down before it
//! completes. When the overlay holds more than `max_dirty` bytes of data,
//! the oldest pieces are written down first (as a real cache drains), which
//! keeps the promise that matters: everything a completed flush covered
//! survives a power cut. Data written down early may survive too.
//!
//! A power cut (the trigger file appearing, or the `powercut` control
//! action: `userblk ctl -n ID powercut`) drops everything held back, and
//! from then on every request fails with EIO, as from a disk that is gone,
//! until power comes back (the file removed, or `powerup`). The device then
//! serves what had reached the target: the state a crash left.
//!
//! All writing down is done by one thread of the filter's own, on a
//! private ring, in the order it was asked for: flush and FUA requests are
//! handed to it ([`Ctx::defer`]) and complete when it is done, while the
//! queue goes on serving other requests. One writer means no two writes of
//! the same bytes are ever in flight to the target at once.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rustix::io::Errno;

use super::spec::{self, Options, Printer, Spec};
use super::{Base, DataUse, Filter, FilterError};
use crate::control::{Registration, Registry};
use crate::target::{ring_result, Caps, Ctx, Extent, Flags, Op, Submit, Target};

pub mod overlay;
mod writer;

use overlay::{Kind, Overlay};
use writer::{write_back, Job, Waiter, Work, Writer};

/// Default bound of the data held back.
pub const DEFAULT_MAX_DIRTY: u64 = 64 << 20;

/// How often the trigger file is looked at, at most (flushes always look).
pub const TRIGGER_INTERVAL: Duration = Duration::from_millis(2);

/// Largest write the writer sends down at once.
const CHUNK: u32 = 1 << 20;

/// A deliberately broken disk, to prove that a test catches the bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// Flushes complete at once and write nothing down.
    AckFlush,
}

/// The options of `flakey`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Power is cut when this file appears and comes back when it goes.
    pub trigger: Option<PathBuf>,
    /// Most bytes of data held back before the oldest are written down.
    pub max_dirty: u64,
    /// A broken variant.
    pub broken: Option<Broken>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            trigger: None,
            max_dirty: DEFAULT_MAX_DIRTY,
            broken: None,
        }
    }
}

impl Config {
    /// Parse `[trigger=PATH][,max_dirty=SIZE][,broken=ack-flush]`.
    pub fn parse(s: &Spec) -> Result<Self, FilterError> {
        let mut o = Options::new("flakey", s);
        let c = Config {
            trigger: o.get("trigger", |p| Ok(PathBuf::from(p)))?,
            max_dirty: o.get("max_dirty", spec::size)?.unwrap_or(DEFAULT_MAX_DIRTY),
            broken: o.get("broken", |b| match b {
                "ack-flush" => Ok(Broken::AckFlush),
                _ => Err(format!("unknown breakage '{b}' (known: ack-flush)")),
            })?,
        };
        o.finish()?;
        Ok(c)
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut p = Printer::new(f, "flakey")?;
        p.opt_some("trigger", self.trigger.as_ref().map(|t| t.display()))?;
        p.opt("max_dirty", crate::size::format(self.max_dirty))?;
        p.opt_some("broken", self.broken.map(|Broken::AckFlush| "ack-flush"))
    }
}

/// What a power cut threw away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Lost {
    /// Pieces of held-back requests (a write cut by later writes counts once per part).
    pub pieces: usize,
    /// Bytes of data in them.
    pub bytes: u64,
}

/// The filter's state, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    /// Whether the disk has power.
    pub powered: bool,
    /// Bytes of data held back now.
    pub dirty_bytes: u64,
    /// Pieces held back now.
    pub dirty_pieces: usize,
    /// The bound on `dirty_bytes`.
    pub max_dirty: u64,
    /// Writes received (FUA ones included).
    pub writes: u64,
    /// FUA writes received.
    pub fua_writes: u64,
    /// Flushes received.
    pub flushes: u64,
    /// Requests the writer sent down.
    pub written_down: u64,
    /// Bytes of data the writer sent down.
    pub written_down_bytes: u64,
    /// Power cuts so far.
    pub power_cuts: u64,
    /// What the last power cut threw away.
    pub lost_at_last_cut: Lost,
    /// The broken variant in use, if any.
    pub broken: Option<&'static str>,
}

#[derive(Debug, Default)]
struct Counters {
    writes: AtomicU64,
    fua_writes: AtomicU64,
    flushes: AtomicU64,
    written_down: AtomicU64,
    written_down_bytes: AtomicU64,
    power_cuts: AtomicU64,
}

#[derive(Debug)]
struct State {
    overlay: Overlay,
    powered: bool,
    /// Bumped by every power cut: work asked for before it fails.
    epoch: u64,
    /// When bytes last left the overlay (written down, or lost): a read
    /// started earlier may have missed them in both places, and is redone.
    last_removal: Instant,
    lost_at_last_cut: Lost,
}

/// What the filter's parts share: the queues, the writer thread and the
/// control actions.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Held by the writer while a request of its is at the target, so a
    /// power cut can wait until nothing more lands there.
    io: Mutex<()>,
    /// `!state.powered`, readable without the lock.
    off: AtomicBool,
    max_dirty: u64,
    broken: Option<Broken>,
    counters: Counters,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Cut the power: drop everything held back, fail every request from
    /// now on, and return once no write of the writer is at the target.
    /// `None` if the power was already off.
    fn power_cut(&self, why: &str) -> Option<Lost> {
        let lost = {
            let mut st = self.lock();
            if !st.powered {
                return None;
            }
            st.powered = false;
            self.off.store(true, Ordering::SeqCst);
            st.epoch += 1;
            let (pieces, bytes) = st.overlay.clear();
            st.last_removal = Instant::now();
            st.lost_at_last_cut = Lost { pieces, bytes };
            st.lost_at_last_cut
        };
        drop(self.io.lock().unwrap_or_else(PoisonError::into_inner));
        self.counters.power_cuts.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            "flakey: power cut ({why}): {} held-back pieces with {} bytes of data lost; every request fails with EIO until power is back",
            lost.pieces,
            lost.bytes
        );
        Some(lost)
    }

    /// Restore power; `false` if it was on.
    fn power_up(&self, why: &str) -> bool {
        let mut st = self.lock();
        if st.powered {
            return false;
        }
        st.powered = true;
        self.off.store(false, Ordering::SeqCst);
        drop(st);
        tracing::warn!("flakey: power restored ({why})");
        true
    }

    fn status(&self) -> Status {
        let st = self.lock();
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Status {
            powered: st.powered,
            dirty_bytes: st.overlay.data_bytes(),
            dirty_pieces: st.overlay.pieces(),
            max_dirty: self.max_dirty,
            writes: n(&c.writes),
            fua_writes: n(&c.fua_writes),
            flushes: n(&c.flushes),
            written_down: n(&c.written_down),
            written_down_bytes: n(&c.written_down_bytes),
            power_cuts: n(&c.power_cuts),
            lost_at_last_cut: st.lost_at_last_cut,
            broken: self.broken.map(|Broken::AckFlush| "ack-flush"),
        }
    }
}

/// Watches the trigger file, at most every [`TRIGGER_INTERVAL`].
#[derive(Debug)]
struct Trigger {
    path: PathBuf,
    start: Instant,
    next_us: AtomicU64,
    exists: AtomicBool,
}

impl Trigger {
    /// `Some(exists)` when the file appeared or went since the last look.
    fn poll(&self, force: bool) -> Option<bool> {
        let now = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let next = now.saturating_add(u64::try_from(TRIGGER_INTERVAL.as_micros()).unwrap_or(0));
        if force {
            self.next_us.store(next, Ordering::Relaxed);
        } else {
            let due = self.next_us.load(Ordering::Relaxed);
            if now < due
                || self
                    .next_us
                    .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                return None;
            }
        }
        let exists = std::fs::symlink_metadata(&self.path).is_ok();
        (self.exists.swap(exists, Ordering::SeqCst) != exists).then_some(exists)
    }
}

/// The step the writer's answers come back on.
const STEP_JOB: u8 = 0;

/// The `flakey` filter.
pub struct Flakey {
    base: Base,
    shared: Arc<Shared>,
    trigger: Option<Trigger>,
    inner_volatile: bool,
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
    actions: Vec<Registration>,
}

impl fmt::Debug for Flakey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flakey")
            .field("base", &self.base)
            .field("trigger", &self.trigger)
            .finish_non_exhaustive()
    }
}

impl Flakey {
    /// A power-cuttable cache over `inner`. Its control actions (`powercut`,
    /// `powerup`, `writeback`, `status`) go into `control`.
    pub fn new(
        inner: Arc<dyn Target>,
        mut cfg: Config,
        control: &Registry,
    ) -> Result<Self, FilterError> {
        let io = |what: String| FilterError::io::<std::io::Error>("flakey", what);
        if let Some(p) = &cfg.trigger {
            cfg.trigger = Some(super::absolute(
                "flakey",
                p,
                format!("trigger file {}", p.display()),
            )?);
        }
        // Before any thread starts: a stack too deep fails here.
        let caps = inner.caps();
        // A write-back cache with FUA, whatever the target has.
        let shown = Caps {
            volatile_cache: true,
            fua: true,
            ..caps
        };
        let base = Base::new(Arc::clone(&inner), &cfg, DataUse::InMemory)?.with_caps(shown);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                overlay: Overlay::new(),
                powered: true,
                epoch: 0,
                last_removal: Instant::now(),
                lost_at_last_cut: Lost::default(),
            }),
            io: Mutex::new(()),
            off: AtomicBool::new(false),
            max_dirty: cfg.max_dirty,
            broken: cfg.broken,
            counters: Counters::default(),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel();
        let writer = {
            let (shared, inner) = (Arc::clone(&shared), Arc::clone(&inner));
            std::thread::Builder::new()
                .name("flakey-writer".into())
                .spawn(move || {
                    // The engine's ring is made on the thread that uses it.
                    match Writer::new(shared, inner) {
                        Ok(mut w) => {
                            let _ = ready_tx.send(Ok(()));
                            for job in rx {
                                w.run(job);
                            }
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .map_err(io("starting the writer thread".into()))?
        };
        match ready.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = writer.join();
                return Err(FilterError::Invalid {
                    filter: "flakey",
                    msg: format!("the writer cannot drive the target: {e}"),
                });
            }
            Err(_) => {
                let _ = writer.join();
                return Err(FilterError::Invalid {
                    filter: "flakey",
                    msg: "the writer thread died".into(),
                });
            }
        }
        let actions = register_actions(control, &shared, &tx);
        Ok(Flakey {
            trigger: cfg.trigger.clone().map(|path| Trigger {
                path,
                start: Instant::now(),
                next_us: AtomicU64::new(0),
                exists: AtomicBool::new(false),
            }),
            base,
            shared,
            inner_volatile: caps.volatile_cache,
            jobs: Some(tx),
            writer: Some(writer),
            actions,
        })
    }

    /// Cut the power (see the module docs); `None` if it was off already.
    pub fn power_cut(&self) -> Option<Lost> {
        self.shared.power_cut("asked")
    }

    /// Restore power; `false` if it was on.
    pub fn power_up(&self) -> bool {
        self.shared.power_up("asked")
    }

    /// Write everything held back down now (the cache draining by itself),
    /// whatever `broken` says.
    pub fn write_back(&self) -> Result<(), Errno> {
        match &self.jobs {
            Some(tx) => write_back(&self.shared, tx),
            None => Err(Errno::IO),
        }
    }

    /// Counters and the power state.
    pub fn status(&self) -> Status {
        self.shared.status()
    }

    /// Whether `[offset, offset + len)` has pieces held back (EIO while
    /// the power is off: block status is as gone as the disk).
    fn holds_back(&self, offset: u64, len: u64) -> Result<bool, Errno> {
        let st = self.shared.lock();
        if !st.powered {
            return Err(Errno::IO);
        }
        Ok(st.overlay.intersects(offset, len))
    }

    fn watch_trigger(&self, op: Op) {
        let Some(t) = &self.trigger else { return };
        match t.poll(op == Op::Flush) {
            Some(true) => {
                self.shared.power_cut("trigger file appeared");
            }
            Some(false) => {
                self.shared.power_up("trigger file removed");
            }
            None => {}
        }
    }

    /// Hand `work` to the writer; the request completes when it is done.
    fn to_writer(&self, ctx: &mut Ctx<'_>, epoch: u64, work: Work) -> Submit {
        let Some(tx) = &self.jobs else {
            return Submit::Done(Err(Errno::IO));
        };
        match ctx.defer(self.base.step(STEP_JOB)) {
            Ok(d) => {
                let job = Job {
                    waiter: Waiter::Request(d),
                    epoch,
                    work,
                };
                // A writer that is gone drops the job, which fails the request.
                let _ = tx.send(job);
                Submit::Pending
            }
            Err(e) => Submit::Done(Err(e)),
        }
    }

    fn read(&self, ctx: &mut Ctx<'_>) -> Submit {
        let req = *ctx.req();
        {
            let st = self.shared.lock();
            if !st.powered {
                return Submit::Done(Err(Errno::IO));
            }
            if st.overlay.covers(req.offset, u64::from(req.len)) {
                st.overlay.patch(req.offset, ctx.data_mut());
                return Submit::Done(Ok(ctx.done_bytes()));
            }
        }
        ctx.mark(self.base.layer());
        let s = self.base.inner().submit(ctx);
        self.read_done(ctx, s)
    }

    /// The target answered a read: lay the overlay over it, or read again
    /// if bytes left the overlay since the read started (they may have
    /// reached the target only after it read there).
    fn read_done(&self, ctx: &mut Ctx<'_>, mut s: Submit) -> Submit {
        loop {
            match s {
                Submit::Pending => return Submit::Pending,
                Submit::Done(Err(e)) => {
                    let off = self.shared.off.load(Ordering::SeqCst);
                    return Submit::Done(Err(if off { Errno::IO } else { e }));
                }
                Submit::Done(Ok(n)) => {
                    let st = self.shared.lock();
                    if !st.powered {
                        return Submit::Done(Err(Errno::IO));
                    }
                    let layer = self.base.layer();
                    if ctx.marked(layer).is_none_or(|t| t <= st.last_removal) {
                        drop(st);
                        ctx.mark(layer);
                        s = self.base.inner().submit(ctx);
                        continue;
                    }
                    let at = ctx.req().offset;
                    st.overlay.patch(at, ctx.data_mut());
                    return Submit::Done(Ok(n));
                }
            }
        }
    }

    fn modify(&self, ctx: &mut Ctx<'_>) -> Submit {
        let req = *ctx.req();
        let fua = req.op == Op::Write && req.flags.contains(Flags::FUA);
        let kind = match req.op {
            Op::Write => Kind::Data(ctx.data().to_vec()),
            op => {
                let keep = if req.flags.contains(Flags::NOUNMAP) {
                    Flags::NOUNMAP
                } else {
                    Flags::NONE
                };
                Kind::Zero(op, keep)
            }
        };
        let (epoch, over) = {
            let mut st = self.shared.lock();
            if !st.powered {
                return Submit::Done(Err(Errno::IO));
            }
            st.overlay.insert(req.offset, u64::from(req.len), kind);
            (st.epoch, st.overlay.data_bytes() > self.shared.max_dirty)
        };
        if req.op == Op::Write {
            self.shared.counters.writes.fetch_add(1, Ordering::Relaxed);
        }
        if fua {
            self.shared
                .counters
                .fua_writes
                .fetch_add(1, Ordering::Relaxed);
        }
        if !fua && !over {
            return Submit::Done(Ok(ctx.done_bytes()));
        }
        let end = req.offset + u64::from(req.len);
        let work = Work::Write {
            durable: fua.then_some((req.offset, end)),
            evict: over,
        };
        self.to_writer(ctx, epoch, work)
    }

    fn flush(&self, ctx: &mut Ctx<'_>) -> Submit {
        self.shared.counters.flushes.fetch_add(1, Ordering::Relaxed);
        let (empty, epoch) = {
            let st = self.shared.lock();
            if !st.powered {
                return Submit::Done(Err(Errno::IO));
            }
            (st.overlay.is_empty(), st.epoch)
        };
        if self.shared.broken == Some(Broken::AckFlush) {
            return Submit::Done(Ok(0));
        }
        match (empty, self.inner_volatile) {
            (true, false) => Submit::Done(Ok(0)),
            // Nothing held: only the target's own cache to flush.
            (true, true) => {
                let s = self.base.inner().submit(ctx);
                self.passed(s)
            }
            (false, _) => self.to_writer(ctx, epoch, Work::Flush),
        }
    }

    /// A result of the target for a request passed down as it was.
    fn passed(&self, s: Submit) -> Submit {
        match s {
            Submit::Done(_) if self.shared.off.load(Ordering::SeqCst) => {
                Submit::Done(Err(Errno::IO))
            }
            s => s,
        }
    }
}

impl Drop for Flakey {
    fn drop(&mut self) {
        self.actions.clear();
        drop(self.jobs.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Filter for Flakey {
    fn base(&self) -> &Base {
        &self.base
    }

    fn filter_submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        let op = ctx.req().op;
        self.watch_trigger(op);
        if self.shared.off.load(Ordering::SeqCst) {
            return Submit::Done(Err(Errno::IO));
        }
        match op {
            Op::Read => self.read(ctx),
            Op::Write | Op::Discard | Op::WriteZeroes => self.modify(ctx),
            Op::Flush => self.flush(ctx),
        }
    }

    fn filter_complete(&self, ctx: &mut Ctx<'_>, step: u16, res: i32) -> Submit {
        match self.base.own_step(step) {
            Some(STEP_JOB) => Submit::Done(ring_result(res).map(|_| ctx.done_bytes())),
            Some(_) => Submit::Done(Err(Errno::IO)),
            None => {
                let s = self.base.inner().complete(ctx, step, res);
                if ctx.req().op == Op::Read {
                    self.read_done(ctx, s)
                } else {
                    self.passed(s)
                }
            }
        }
    }

    fn filter_extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), Errno> {
        if self.holds_back(offset, len)? {
            out.push(Extent::data(len));
            return Ok(());
        }
        self.base.inner().extents(offset, len, out)
    }

    fn filter_reads_zeroes(&self, offset: u64, len: u64) -> Result<bool, Errno> {
        // Held-back pieces may be anything; elsewhere reads are the target's.
        if self.holds_back(offset, len)? {
            return Ok(false);
        }
        self.base.inner().reads_zeroes(offset, len)
    }
}

/// Offer `powercut`, `powerup`, `writeback` and `status` in `control`.
fn register_actions(
    control: &Registry,
    shared: &Arc<Shared>,
    tx: &mpsc::Sender<Job>,
) -> Vec<Registration> {
    // Each action gets its own handle on the shared state.
    let action = |name, help, run: fn(&Shared, &mpsc::Sender<Job>) -> Result<String, String>| {
        let (s, tx) = (Arc::clone(shared), tx.clone());
        control.register(name, "flakey", help, move |_| run(&s, &tx))
    };
    vec![
        action(
            "powercut",
            "cut the power: lose every write no flush covered; requests fail with EIO",
            |s, _| {
                Ok(match s.power_cut("userblk ctl") {
                    Some(l) => format!(
                        "power cut: {} held-back pieces ({} bytes of data) lost; requests fail with EIO until powerup",
                        l.pieces, l.bytes
                    ),
                    None => "the power was already off".into(),
                })
            },
        ),
        action(
            "powerup",
            "restore the power: serve what reached the disk",
            |s, _| {
                Ok(if s.power_up("userblk ctl") {
                    "power restored".into()
                } else {
                    "the power was already on".into()
                })
            },
        ),
        action(
            "writeback",
            "write everything held back down now, as a cache draining by itself",
            |s, tx| match write_back(s, tx) {
                Ok(()) => Ok("written back".into()),
                Err(Errno::IO) if s.off.load(Ordering::SeqCst) => Err("the power is off".into()),
                Err(e) => Err(format!("writing back: {e}")),
            },
        ),
        action(
            "status",
            "power state, data held back, counters (JSON)",
            |s, _| serde_json::to_string(&s.status()).map_err(|e| e.to_string()),
        ),
    ]
}

#[cfg(test)]
mod tests;
