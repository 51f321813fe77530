//! `rate`: bandwidth and IOPS limits (`bw=10M,iops=1000`, and per
//! direction `read_bw`, `read_iops`, `write_bw`, `write_iops`).
//!
//! Each limit is a token bucket, kept as the time at which its tokens run
//! out (GCRA): a request books its cost in every bucket it counts against
//! and waits until the slowest of them lets it go, on a ring timer, so it
//! is delayed but never failed, and other requests keep flowing. Idle time
//! is not saved up beyond `burst` (default 0: a steady rate).
//!
//! Bandwidth counts the data of reads and writes; IOPS count every request
//! (`iops`), or only reads or only writes (`read_iops`, `write_iops`).
//! All queues share the buckets.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::spec::{self, format_duration, Options, Printer, Spec};
use super::{Base, DataUse, Filter, FilterError};
use crate::target::{Ctx, Op, Request, Submit, Target};

/// Which bucket a limit fills, in [`Config::limits`] order.
const KEYS: [&str; 6] = [
    "bw",
    "iops",
    "read_bw",
    "read_iops",
    "write_bw",
    "write_iops",
];

/// The options of `rate`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    /// Per second: bytes (`bw`), requests (`iops`), then the same for reads
    /// and for writes; `None` for no limit.
    pub limits: [Option<u64>; 6],
    /// How much unused rate may be saved up, as time at the full rate.
    pub burst: Duration,
}

/// A limit a second, with or without `/s`, its number read by `parse`:
/// [`spec::size`] for a bandwidth (`10M`, `10M/s`), [`spec::number`] for
/// a request rate (`1000`, `1000/s`).
fn limit(s: &str, parse: fn(&str) -> Result<u64, String>) -> Result<u64, String> {
    let v = parse(s.strip_suffix("/s").unwrap_or(s))?;
    if v == 0 {
        return Err("a limit of 0 would stop all I/O".into());
    }
    Ok(v)
}

impl Config {
    /// Parse `[bw=SIZE][,iops=N][,read_bw=..][,read_iops=..][,write_bw=..][,write_iops=..][,burst=DURATION]`.
    pub fn parse(s: &Spec) -> Result<Self, FilterError> {
        let mut o = Options::new("rate", s);
        let mut c = Config::default();
        for (i, key) in KEYS.iter().enumerate() {
            let number = if i % 2 == 0 { spec::size } else { spec::number };
            c.limits[i] = o.get(key, |s| limit(s, number))?;
        }
        c.burst = o.get("burst", spec::duration)?.unwrap_or(Duration::ZERO);
        o.finish()?;
        if c.limits.iter().all(Option::is_none) {
            return Err(FilterError::Invalid {
                filter: "rate",
                msg: format!("no limit given (use {})", KEYS.join(", ")),
            });
        }
        Ok(c)
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut p = Printer::new(f, "rate")?;
        for (i, (key, v)) in KEYS.iter().zip(self.limits).enumerate() {
            // Bandwidths (even places) as sizes, rates as plain numbers.
            p.opt_some(
                key,
                v.map(|v| {
                    if i % 2 == 0 {
                        crate::size::format(v)
                    } else {
                        v.to_string()
                    }
                }),
            )?;
        }
        p.opt_some(
            "burst",
            (!self.burst.is_zero()).then(|| format_duration(self.burst)),
        )
    }
}

/// One limit: `per_sec` units a second, booked up to `tat`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Nanoseconds one unit takes at the limit.
    nanos_per_unit: f64,
    /// When the units booked so far are paid for (the theoretical arrival time).
    tat: Instant,
}

impl Bucket {
    /// Book `cost` units arriving at `now`; how long they must wait.
    fn book(&mut self, now: Instant, cost: u64, burst: Duration) -> Duration {
        let start = self.tat.max(now);
        let wait = (start - now).saturating_sub(burst);
        // Precision loss on costs past 2^53 units is of no concern.
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
        #[allow(clippy::cast_sign_loss)]
        let nanos = (cost as f64 * self.nanos_per_unit) as u64;
        self.tat = start + Duration::from_nanos(nanos);
        wait
    }
}

/// The `rate` filter.
#[derive(Debug)]
pub struct Rate {
    base: Base,
    burst: Duration,
    buckets: Mutex<[Option<Bucket>; 6]>,
}

impl Rate {
    /// Limit `inner` as `cfg` says.
    pub fn new(inner: Arc<dyn Target>, cfg: Config) -> Result<Self, FilterError> {
        let now = Instant::now();
        #[allow(clippy::cast_precision_loss)]
        let buckets = cfg.limits.map(|l| {
            l.map(|per_sec| Bucket {
                nanos_per_unit: 1e9 / per_sec as f64,
                tat: now,
            })
        });
        Ok(Rate {
            base: Base::new(inner, &cfg, DataUse::Untouched)?,
            burst: cfg.burst,
            buckets: Mutex::new(buckets),
        })
    }

    /// Book `req` in its buckets; how long it must wait.
    fn book(&self, req: &Request) -> Duration {
        let bytes = if req.op.has_data() {
            u64::from(req.len)
        } else {
            0
        };
        // (bucket, cost) for the buckets this request counts against.
        let (dir_bw, dir_iops) = match req.op {
            Op::Read => (Some(2), Some(3)),
            Op::Write => (Some(4), Some(5)),
            Op::Flush | Op::Discard | Op::WriteZeroes => (None, None),
        };
        let costs = [
            (Some(0), bytes),
            (Some(1), 1),
            (dir_bw, bytes),
            (dir_iops, 1),
        ];
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut wait = Duration::ZERO;
        for (i, cost) in costs {
            if let Some(b) = i.and_then(|i| buckets[i].as_mut()) {
                if cost > 0 {
                    wait = wait.max(b.book(now, cost, self.burst));
                }
            }
        }
        wait
    }
}

impl Filter for Rate {
    fn base(&self) -> &Base {
        &self.base
    }

    fn filter_submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        let wait = self.book(ctx.req());
        self.base.hold(ctx, wait, "rate")
    }

    fn filter_complete(&self, ctx: &mut Ctx<'_>, step: u16, res: i32) -> Submit {
        self.base.complete_held(ctx, step, res, "rate")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::filters::testing::{assert_refused, ms, probe, ring_probe, timed};
    use crate::slots::Engine;
    use crate::slots::Slots;

    fn rate(inner: Arc<dyn Target>, spec: &str) -> Rate {
        Rate::new(inner, Config::parse(&spec.parse().unwrap()).unwrap()).unwrap()
    }

    /// Run `n` requests one after the other on a fresh engine; how long they took.
    fn sequential(t: &dyn Target, req: Request, n: usize) -> Duration {
        timed(&mut Engine::new(t, 1 << 20).unwrap(), t, req, n)
    }

    #[test]
    fn options() {
        let c = Config::parse(&"rate:bw=10M/s,write_iops=50,burst=100ms".parse().unwrap()).unwrap();
        assert_eq!(c.limits, [Some(10 << 20), None, None, None, None, Some(50)]);
        assert_eq!(c.to_string(), "rate:bw=10M,write_iops=50,burst=100ms");
        assert_refused(
            Config::parse,
            &[
                ("rate", "no limit"),
                ("rate:iops=0", "stop all I/O"),
                ("rate:bw=fast", "invalid size"),
                ("rate:iops=1.5", "whole number"),
            ],
        );
    }

    #[test]
    fn iops_limit_within_tolerance() {
        for (inner, _) in [probe(1 << 20), ring_probe(1 << 20)] {
            let r = rate(inner, "rate:iops=200");
            // 41 requests at 200/s: the first at once, then one every 5 ms.
            let took = sequential(&r, Request::new(Op::Read, 0, 4096), 41);
            assert!(
                took >= ms(200) && took < ms(280),
                "41 requests at 200 IOPS took {took:?}"
            );
        }
    }

    #[test]
    fn bandwidth_limit_within_tolerance() {
        let (inner, _) = probe(1 << 20);
        let r = rate(inner, "rate:bw=8M");
        // 17 x 64 KiB at 8 MiB/s: 16 of them wait 7.8 ms each.
        let took = sequential(&r, Request::new(Op::Write, 0, 64 << 10), 17);
        assert!(took >= ms(125) && took < ms(200), "took {took:?}");
        // Flushes move no data: not held back by a bandwidth limit.
        let took = sequential(&r, Request::new(Op::Flush, 0, 0), 100);
        assert!(took < ms(50), "flushes took {took:?}");
    }

    #[test]
    fn read_and_write_limits_are_separate() {
        let (inner, _) = probe(1 << 20);
        let r = rate(inner, "rate:write_iops=100");
        let took = sequential(&r, Request::new(Op::Read, 0, 4096), 200);
        assert!(took < ms(100), "reads held back by a write limit: {took:?}");
        let took = sequential(&r, Request::new(Op::Write, 0, 4096), 11);
        assert!(
            took >= ms(100) && took < ms(160),
            "11 writes at 100 IOPS took {took:?}"
        );
    }

    #[test]
    fn burst_lets_saved_up_rate_through() {
        let (inner, _) = probe(1 << 20);
        let r = rate(inner, "rate:iops=100,burst=50ms");
        // Six go at once (the first, and five saved up), then 10 ms apart.
        let took = sequential(&r, Request::new(Op::Read, 0, 512), 6);
        assert!(took < ms(20), "the burst was held back: {took:?}");
        let took = sequential(&r, Request::new(Op::Read, 0, 512), 5);
        assert!(took >= ms(45) && took < ms(90), "after the burst: {took:?}");
    }

    #[test]
    fn concurrent_requests_are_delayed_not_failed() {
        let (inner, _) = ring_probe(1 << 20);
        let r = rate(inner, "rate:iops=100");
        let mut slots = Slots::new(r.caps(), 16, 4096).unwrap();
        let start = Instant::now();
        let mut events = Vec::new();
        let mut done = 0;
        for slot in 0..16 {
            if let Some(res) = slots.start(&r, slot, Request::new(Op::Read, 0, 4096)) {
                assert_eq!(res, Ok(4096));
                done += 1;
            }
        }
        slots.drain(&r, &mut events).unwrap();
        let took = start.elapsed();
        assert_eq!(done + events.len(), 16);
        assert!(events.iter().all(|e| matches!(
            e,
            crate::slots::Event::Done {
                result: Ok(4096),
                ..
            }
        )));
        assert!(
            took >= ms(150) && took < ms(230),
            "16 requests at 100 IOPS took {took:?}"
        );
    }
}
