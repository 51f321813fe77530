//! `delay`: hold each request back for a fixed or random time per op
//! (`read=5ms,write=1ms-5ms,flush=50ms`).
//!
//! The wait is a timer on the queue's own ring ([`Ctx::timeout`]), not a
//! sleep: the thread goes on serving every other request meanwhile, so a
//! delay adds latency without taking throughput from requests it does not
//! delay. The request goes down to the target when its timer fires.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::rng::Rng;
use super::spec::{self, DurationRange, Options, Printer, Spec};
use super::{op_index, Base, DataUse, Filter, FilterError, OP_KEYS};
use crate::target::{Ctx, Op, Submit, Target};

/// The options of `delay`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    /// For every op not given on its own.
    pub all: Option<DurationRange>,
    /// Per op, in the order read, write, flush, discard, write_zeroes.
    pub ops: [Option<DurationRange>; 5],
    /// Seed for random delays (default: from the clock).
    pub seed: Option<u64>,
}

impl Config {
    /// Parse `[all=D][,read=D][,write=D][,flush=D][,discard=D][,write_zeroes=D][,seed=N]`,
    /// each `D` a duration or a range `LOW-HIGH`.
    pub fn parse(s: &Spec) -> Result<Self, FilterError> {
        let mut o = Options::new("delay", s);
        let mut c = Config {
            all: o.get("all", DurationRange::parse)?,
            ..Config::default()
        };
        for (slot, key) in c.ops.iter_mut().zip(OP_KEYS) {
            *slot = o.get(key, DurationRange::parse)?;
        }
        c.seed = o.get("seed", spec::number)?;
        o.finish()?;
        Ok(c)
    }

    /// The delay range for `op`.
    pub fn for_op(&self, op: Op) -> Option<DurationRange> {
        self.ops[op_index(op)].or(self.all)
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut p = Printer::new(f, "delay")?;
        p.opt_some("all", self.all)?;
        for (k, d) in OP_KEYS.iter().zip(self.ops) {
            p.opt_some(k, d)?;
        }
        p.opt_some("seed", self.seed)
    }
}

/// The `delay` filter.
#[derive(Debug)]
pub struct Delay {
    base: Base,
    cfg: Config,
    rng: Rng,
}

impl Delay {
    /// Delay `inner`'s requests as `cfg` says.
    pub fn new(inner: Arc<dyn Target>, cfg: Config) -> Result<Self, FilterError> {
        Ok(Delay {
            base: Base::new(inner, &cfg, DataUse::Untouched)?,
            rng: Rng::new(cfg.seed),
            cfg,
        })
    }

    /// The delay for the next request of `op`.
    pub fn pick(&self, op: Op) -> Duration {
        match self.cfg.for_op(op) {
            None => Duration::ZERO,
            Some(r) if r.low == r.high => r.low,
            Some(r) => r.pick(self.rng.unit()),
        }
    }
}

impl Filter for Delay {
    fn base(&self) -> &Base {
        &self.base
    }

    fn filter_submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        let d = self.pick(ctx.req().op);
        self.base.hold(ctx, d, "delay")
    }

    fn filter_complete(&self, ctx: &mut Ctx<'_>, step: u16, res: i32) -> Submit {
        self.base.complete_held(ctx, step, res, "delay")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::filters::testing::{ms, probe, ring_probe, run, timed};
    use crate::slots::Engine;
    use crate::slots::{Event, Slots};
    use crate::target::Request;

    fn delay(inner: Arc<dyn Target>, spec: &str) -> Delay {
        Delay::new(inner, Config::parse(&spec.parse().unwrap()).unwrap()).unwrap()
    }

    #[test]
    fn options_round_trip() {
        for s in [
            "delay:read=5ms,write=1ms-5ms,flush=50ms",
            "delay:all=1ms,discard=0,seed=3",
        ] {
            let c = Config::parse(&s.parse().unwrap()).unwrap();
            assert_eq!(c.to_string(), s);
        }
        let c = Config::parse(&"delay:all=2ms,read=1ms".parse().unwrap()).unwrap();
        assert_eq!(c.for_op(Op::Read), Some(DurationRange::fixed(ms(1))));
        assert_eq!(c.for_op(Op::Flush), Some(DurationRange::fixed(ms(2))));
        assert!(Config::parse(&"delay:reed=1ms".parse().unwrap()).is_err());
        assert!(Config::parse(&"delay:read=5ms-1ms".parse().unwrap()).is_err());
    }

    #[test]
    fn fixed_delays_per_op_within_tolerance() {
        for (inner, seen) in [probe(1 << 20), ring_probe(1 << 20)] {
            let d = delay(inner, "delay:read=30ms,write=10ms");
            let mut e = Engine::new(&d, 1 << 20).unwrap();
            for (req, want) in [
                (Request::new(Op::Read, 0, 4096), ms(30)),
                (Request::new(Op::Write, 0, 4096), ms(10)),
                (Request::new(Op::Flush, 0, 0), ms(0)),
            ] {
                let took = timed(&mut e, &d, req, 1);
                assert!(took >= want, "{req:?} took {took:?}, less than {want:?}");
                assert!(
                    took < want + ms(40),
                    "{req:?} took {took:?}, far more than {want:?}"
                );
            }
            assert_eq!(seen.take().len(), 3);
        }
    }

    #[test]
    fn random_delays_stay_in_their_range_and_spread() {
        let (inner, _) = probe(1 << 20);
        let d = delay(inner, "delay:read=2ms-12ms,seed=42");
        let mut e = Engine::new(&d, 4096).unwrap();
        let took: Vec<Duration> = (0..30)
            .map(|_| timed(&mut e, &d, Request::new(Op::Read, 0, 4096), 1))
            .collect();
        let (min, max) = (took.iter().min().unwrap(), took.iter().max().unwrap());
        assert!(*min >= ms(2), "shortest {min:?}");
        assert!(*max < ms(12) + ms(40), "longest {max:?}");
        // 30 uniform draws from 2-12ms: both ends of the range show up.
        assert!(*min < ms(6) && *max > ms(8), "not spread: {min:?}..{max:?}");
    }

    #[test]
    fn other_requests_keep_flowing_while_one_waits() {
        let (inner, _) = probe(1 << 20);
        let d = delay(inner, "delay:read=200ms");
        let mut slots = Slots::new(d.caps(), 4, 4096).unwrap();
        let start = Instant::now();
        assert_eq!(slots.start(&d, 0, Request::new(Op::Read, 0, 4096)), None);
        // Writes are not delayed: they finish at once, with the read still waiting.
        for slot in 1..4 {
            let r = slots.start(&d, slot, Request::new(Op::Write, 4096, 4096));
            assert_eq!(r, Some(Ok(4096)));
        }
        assert!(start.elapsed() < ms(100), "writes waited behind the read");
        assert_eq!(slots.in_use(), 1);
        let mut events = Vec::new();
        slots.drain(&d, &mut events).unwrap();
        assert!(start.elapsed() >= ms(200));
        assert!(matches!(
            events[..],
            [Event::Done {
                slot: 0,
                result: Ok(4096),
                ..
            }]
        ));
    }

    #[test]
    fn many_delayed_requests_wait_together_not_in_turn() {
        let (inner, _) = ring_probe(1 << 20);
        let d = delay(inner, "delay:all=100ms");
        let mut slots = Slots::new(d.caps(), 8, 4096).unwrap();
        let start = Instant::now();
        for slot in 0..8 {
            let off = u64::from(slot) * 4096;
            assert_eq!(
                slots.start(&d, slot, Request::new(Op::Read, off, 4096)),
                None
            );
        }
        let mut events = Vec::new();
        slots.drain(&d, &mut events).unwrap();
        let took = start.elapsed();
        assert_eq!(events.len(), 8);
        assert!(
            took >= ms(100) && took < ms(300),
            "8 delayed requests took {took:?}"
        );
    }

    #[test]
    fn stacked_delays_add_up() {
        let (inner, seen) = ring_probe(1 << 20);
        let inner: Arc<dyn Target> = Arc::new(delay(inner, "delay:read=20ms"));
        let outer = delay(inner, "delay:read=30ms");
        let start = Instant::now();
        assert_eq!(run(&outer, Op::Read, 0, 512).0, Ok(512));
        let took = start.elapsed();
        assert!(took >= ms(50) && took < ms(90), "took {took:?}");
        assert_eq!(seen.take(), [Request::new(Op::Read, 0, 512)]);
    }
}
