//! What every filter shares: its inner target, its layer (which picks its
//! ring steps and per-request marks) and its description.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustix::io::Errno;

use super::FilterError;
use crate::target::{
    filter_step, filter_step_owner, Caps, Ctx, Extent, IoResult, Submit, Target, MAX_FILTER_LAYERS,
};

/// The step of [`Base::hold`]'s timer.
const STEP_HOLD: u8 = 0;

/// Whether a timer's completion is its normal expiry.
pub(crate) fn timer_fired(res: i32) -> bool {
    res == -Errno::TIME.raw_os_error() || res == 0
}

/// What every filter holds: its inner target, its layer in the stack and
/// its spec (for `describe`).
///
/// The layer is the inner target's [`Target::filter_depth`]: 0 for the
/// filter right over the target, one more for each filter above. It picks
/// the filter's ring steps ([`Base::step`], [`crate::target::FILTER_STEP_BASE`])
/// and its slot in per-request marks ([`crate::Ctx::mark`]), so filters
/// stacked in any order never mistake each other's completions.
///
/// A filter keeps its `Base` and hands it out through
/// [`Filter::base`](super::Filter::base); everything the filter does not
/// change passes through it (see the example there).
///
/// ```
/// use std::sync::Arc;
/// use userblk::filters::{Base, DataUse};
/// use userblk::targets::NullTarget;
///
/// let over: Arc<dyn userblk::Target> = Arc::new(NullTarget::new(1 << 20));
/// let base = Base::new(over, "count-errors", DataUse::Untouched).unwrap();
/// assert_eq!((base.layer(), base.depth()), (0, 1));
/// assert_eq!(base.describe()["filters"][0], "count-errors");
/// ```
pub struct Base {
    inner: Arc<dyn Target>,
    layer: u8,
    spec: String,
    data: DataUse,
    caps: Caps,
    /// What `caps().size` says: changed by a resize.
    size: AtomicU64,
    timed: bool,
}

/// What a filter does with request data: the one thing every filter must
/// declare (in [`Base::new`]), as no pass-through default is safe for
/// every filter. It decides [`Target::data_on_ring_only`] and whether
/// block status passes through ([`Filter`](super::Filter)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataUse {
    /// Never touches request data in memory, and a read returns what the
    /// inner target's read at the same offset does (or fails whole):
    /// zero copy and block status pass through. (`stats`, `delay`, ...)
    Untouched,
    /// Never touches request data in memory, but reads are the inner
    /// target's at other offsets or lengths: zero copy passes through,
    /// block status is the filter's to answer. (`offset`)
    Remapped,
    /// May touch request data in memory ([`Ctx::data`], [`Ctx::data_mut`],
    /// [`Ctx::zero_data`], [`Ctx::defer`]), and so reads may be its own:
    /// no zero copy, and block status is the filter's to answer. (`cow`)
    InMemory,
}

impl Base {
    /// The shared part of a filter over `inner`, described by `spec`,
    /// using request data as `data` says.
    pub fn new(
        inner: Arc<dyn Target>,
        spec: impl std::fmt::Display,
        data: DataUse,
    ) -> Result<Self, FilterError> {
        let layer = inner.filter_depth();
        if layer >= MAX_FILTER_LAYERS {
            return Err(FilterError::TooDeep);
        }
        let caps = inner.caps();
        Ok(Base {
            size: AtomicU64::new(caps.size),
            caps,
            inner,
            layer,
            spec: spec.to_string(),
            data,
            timed: false,
        })
    }

    /// The same, advertising `caps` instead of the inner target's (caps
    /// never change, so a filter works its own out once, when it is made).
    #[must_use]
    pub fn with_caps(mut self, caps: Caps) -> Self {
        self.caps = caps;
        self.size = AtomicU64::new(caps.size);
        self
    }

    /// The same, for a filter that measures how long its requests take
    /// (log, stats): the default [`Filter::filter_submit`](super::Filter::filter_submit)
    /// marks when each request reaches it, and [`Base::finished`] reads
    /// the time since.
    #[must_use]
    pub fn timed(mut self) -> Self {
        self.timed = true;
        self
    }

    /// Whether requests are marked on arrival ([`Base::timed`]).
    pub fn is_timed(&self) -> bool {
        self.timed
    }

    /// For a [`Base::timed`] filter: `s`'s result and the time since the
    /// request reached the filter, once `s` is finished.
    pub fn finished(&self, ctx: &Ctx<'_>, s: Submit) -> Option<(IoResult, Duration)> {
        let Submit::Done(result) = s else {
            return None;
        };
        let since = ctx
            .marked(self.layer)
            .map_or(Duration::ZERO, |t| t.elapsed());
        Some((result, since))
    }

    /// What the filter advertises: the inner target's capabilities, or
    /// those given to [`Base::with_caps`].
    pub fn caps(&self) -> Caps {
        Caps {
            size: self.size(),
            ..self.caps
        }
    }

    /// The size advertised now.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Resize the inner target to `new_size` and advertise what it then
    /// has: [`Filter::filter_resize`](super::Filter::filter_resize) of a
    /// filter whose size is its inner target's.
    pub fn resize(&self, new_size: u64) -> crate::Result<u64> {
        let now = self.inner.resize(new_size)?;
        self.size.store(now, Ordering::Release);
        Ok(now)
    }

    /// A refusal to resize, naming this filter (for filters whose size is their own).
    pub fn cannot_resize(&self, why: &str) -> crate::Error {
        crate::Error::cannot_resize(format!("the {} filter", self.spec), why)
    }

    /// How the filter uses request data.
    pub fn data_use(&self) -> DataUse {
        self.data
    }

    /// The target beneath.
    pub fn inner(&self) -> &dyn Target {
        &*self.inner
    }

    /// This filter's layer (0 right over the target).
    pub fn layer(&self) -> u8 {
        self.layer
    }

    /// This filter's step `n`, for its own ring operations.
    pub fn step(&self, n: u8) -> u16 {
        filter_step(self.layer, n)
    }

    /// Which of this filter's steps `step` is, or `None` if it belongs to
    /// the target or another filter (and must be passed down).
    pub fn own_step(&self, step: u16) -> Option<u8> {
        match filter_step_owner(step) {
            Some((layer, n)) if layer == self.layer => Some(n),
            _ => None,
        }
    }

    /// Pass the request down after `wait` on a ring timer (at once when
    /// `wait` is zero, or when no timer can be had: better late limits than
    /// a failed request). The timer's completion comes back through
    /// [`Base::complete_held`]. For filters that hold requests back (delay, rate).
    pub fn hold(&self, ctx: &mut Ctx<'_>, wait: Duration, who: &str) -> Submit {
        if wait.is_zero() {
            return self.inner.submit(ctx);
        }
        match ctx.timeout(wait, self.step(STEP_HOLD)) {
            Ok(()) => Submit::Pending,
            Err(e) => {
                tracing::warn!("{who}: no timer ({e}); not holding this request back");
                self.inner.submit(ctx)
            }
        }
    }

    /// [`Target::complete`] for a filter that uses [`Base::hold`]: its
    /// timer firing sends the request down; every other step goes down too.
    pub fn complete_held(&self, ctx: &mut Ctx<'_>, step: u16, res: i32, who: &str) -> Submit {
        match self.own_step(step) {
            Some(STEP_HOLD) if timer_fired(res) => self.inner.submit(ctx),
            Some(_) => {
                tracing::warn!("{who}: timer failed: {res}");
                Submit::Done(Err(Errno::IO))
            }
            None => self.inner.complete(ctx, step, res),
        }
    }

    /// [`Target::filter_depth`] for the filter.
    pub fn depth(&self) -> u8 {
        self.layer + 1
    }

    /// The spec, as `list` shows it.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// [`Target::describe`] for the filter: the inner target's description
    /// with this filter's spec first in its `filters` list (outermost
    /// first), so the target's own fields stay where tools look for them.
    pub fn describe(&self) -> serde_json::Value {
        let mut d = match self.inner.describe() {
            serde_json::Value::Object(m) => m,
            serde_json::Value::Null => serde_json::Map::new(),
            other => {
                let mut m = serde_json::Map::new();
                m.insert("target".into(), other);
                m
            }
        };
        let mut filters = match d.remove("filters") {
            Some(serde_json::Value::Array(a)) => a,
            _ => Vec::new(),
        };
        filters.insert(0, serde_json::Value::String(self.spec.clone()));
        d.insert("filters".into(), serde_json::Value::Array(filters));
        serde_json::Value::Object(d)
    }
}

impl std::fmt::Debug for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Base")
            .field("layer", &self.layer)
            .field("spec", &self.spec)
            .field("data", &self.data)
            .field("timed", &self.timed)
            .finish()
    }
}

/// Make the extents appended to `out` from index `start` cover at most
/// `len` bytes (a filter whose target answered for more than it asked).
pub fn clip_extents(out: &mut Vec<Extent>, start: usize, len: u64) {
    let mut left = len;
    let mut keep = start;
    for e in out.iter_mut().skip(start) {
        if left == 0 {
            break;
        }
        e.len = e.len.min(left);
        left -= e.len;
        keep += 1;
    }
    out.truncate(keep);
}

/// The filter specs in a description made by [`Base::describe`], outermost first.
pub fn described_filters(describe: &serde_json::Value) -> Vec<String> {
    describe
        .get("filters")
        .and_then(|f| f.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::targets::NullTarget;

    #[test]
    fn layers_own_their_steps() {
        let null: Arc<dyn Target> = Arc::new(NullTarget::new(1 << 20));
        let a = Base::new(null, "a", DataUse::Untouched).unwrap();
        assert_eq!(a.layer(), 0);
        assert_eq!(a.own_step(a.step(3)), Some(3));
        assert_eq!(a.own_step(3), None);
        assert_eq!(a.own_step(filter_step(1, 3)), None);
    }
}
