//! `error`: fail chosen requests with a chosen errno
//! (`ops=read,write,errno=EIO,rate=0.01,range=1M-2M,file=/run/fail`).
//!
//! A request fails, without reaching the target, when all of these hold:
//! its op is in `ops` (default: every op); it overlaps `range` (if given;
//! flushes have no range and never match one); the trigger `file` exists
//! (if given; checked on every request, so creating and removing it turns
//! failures on and off live); and a draw with probability `rate` (default
//! 1) says so.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rustix::io::Errno;

use super::rng::Rng;
use super::spec::{self, errno_name, Options, Printer, Spec};
use super::{op_index, Base, DataUse, Filter, FilterError, OPS, OP_KEYS};
use crate::target::{Ctx, Request, Submit, Target};

/// The options of `error`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Which ops may fail, in the order read, write, flush, discard, write_zeroes.
    pub ops: [bool; 5],
    /// The errno they fail with.
    pub errno: Errno,
    /// The probability a matching request fails.
    pub rate: f64,
    /// Only requests overlapping these bytes `[start, end)`.
    pub range: Option<(u64, u64)>,
    /// Only while this file exists.
    pub file: Option<PathBuf>,
    /// Seed for the draws (default: from the clock).
    pub seed: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ops: [true; 5],
            errno: Errno::IO,
            rate: 1.0,
            range: None,
            file: None,
            seed: None,
        }
    }
}

/// Parse `read,write` (or `all`) into per-op flags.
fn ops(s: &str) -> Result<[bool; 5], String> {
    let mut on = [false; 5];
    for name in s.split(',').map(str::trim) {
        if name == "all" {
            on = [true; 5];
            continue;
        }
        let i = OP_KEYS
            .iter()
            .position(|k| *k == name)
            .ok_or_else(|| format!("unknown op '{name}' (use all, {})", OP_KEYS.join(", ")))?;
        on[i] = true;
    }
    Ok(on)
}

impl Config {
    /// Parse `[ops=OP,...][,errno=E][,rate=P][,range=START-END][,file=PATH][,seed=N]`.
    pub fn parse(s: &Spec) -> Result<Self, FilterError> {
        let mut o = Options::new("error", s);
        let d = Config::default();
        let c = Config {
            ops: o.get("ops", ops)?.unwrap_or(d.ops),
            errno: o.get("errno", spec::errno)?.unwrap_or(d.errno),
            rate: o.get("rate", spec::probability)?.unwrap_or(d.rate),
            range: o.get("range", spec::byte_range)?,
            file: o.get("file", |p| Ok(PathBuf::from(p)))?,
            seed: o.get("seed", spec::number)?,
        };
        o.finish()?;
        Ok(c)
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut p = Printer::new(f, "error")?;
        if self.ops != [true; 5] {
            let names: Vec<&str> = OP_KEYS
                .iter()
                .zip(self.ops)
                .filter_map(|(k, on)| on.then_some(*k))
                .collect();
            p.opt("ops", names.join(","))?;
        }
        p.opt("errno", errno_name(self.errno))?;
        p.opt("rate", self.rate)?;
        let fmt = crate::size::format;
        p.opt_some(
            "range",
            self.range.map(|(a, b)| format!("{}-{}", fmt(a), fmt(b))),
        )?;
        p.opt_some("file", self.file.as_ref().map(|path| path.display()))?;
        p.opt_some("seed", self.seed)
    }
}

/// The `error` filter.
#[derive(Debug)]
pub struct ErrorFilter {
    base: Base,
    cfg: Config,
    rng: Rng,
}

impl ErrorFilter {
    /// Fail `inner`'s requests as `cfg` says. A relative trigger file is
    /// taken from the current directory now.
    pub fn new(inner: Arc<dyn Target>, mut cfg: Config) -> Result<Self, FilterError> {
        if let Some(p) = &cfg.file {
            cfg.file = Some(super::absolute(
                "error",
                p,
                format!("trigger file {}", p.display()),
            )?);
        }
        if !OPS.iter().any(|&op| cfg.ops[op_index(op)]) {
            return Err(FilterError::Invalid {
                filter: "error",
                msg: "no ops to fail".into(),
            });
        }
        Ok(ErrorFilter {
            base: Base::new(inner, &cfg, DataUse::Untouched)?,
            rng: Rng::new(cfg.seed),
            cfg,
        })
    }

    /// Whether `req` fails (draws a random number when it could).
    fn fails(&self, req: &Request) -> bool {
        let c = &self.cfg;
        if !c.ops[op_index(req.op)] {
            return false;
        }
        if let Some((start, end)) = c.range {
            let req_end = req.offset.saturating_add(u64::from(req.len));
            if req.len == 0 || req_end <= start || req.offset >= end {
                return false;
            }
        }
        if let Some(p) = &c.file {
            if std::fs::symlink_metadata(p).is_err() {
                return false;
            }
        }
        self.rng.chance(c.rate)
    }
}

impl Filter for ErrorFilter {
    fn base(&self) -> &Base {
        &self.base
    }

    fn filter_submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        if self.fails(ctx.req()) {
            return Submit::Done(Err(self.cfg.errno));
        }
        self.base.inner().submit(ctx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::filters::testing::{assert_refused, probe, run, run_on};
    use crate::slots::Engine;
    use crate::target::Op;

    fn filter(inner: Arc<dyn Target>, spec: &str) -> ErrorFilter {
        ErrorFilter::new(inner, Config::parse(&spec.parse().unwrap()).unwrap()).unwrap()
    }

    #[test]
    fn options() {
        let c = Config::parse(
            &"error:ops=read,flush,errno=ENOSPC,rate=0.25,range=0-1M"
                .parse()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(c.ops, [true, false, true, false, false]);
        assert_eq!(
            (c.errno, c.rate, c.range),
            (Errno::NOSPC, 0.25, Some((0, 1 << 20)))
        );
        assert_eq!(
            c.to_string(),
            "error:ops=read,flush,errno=ENOSPC,rate=0.25,range=0-1M"
        );
        assert_eq!(Config::parse(&c.to_string().parse().unwrap()).unwrap(), c);
        assert_refused(
            Config::parse,
            &[
                ("error:ops=read,wirte", "unknown op 'wirte'"),
                ("error:errno=EWHAT", "unknown errno"),
                ("error:rate=2", "not between 0 and 1"),
                ("error:range=5-1", "empty"),
            ],
        );
    }

    #[test]
    fn chosen_ops_fail_with_the_chosen_errno() {
        let (inner, seen) = probe(1 << 20);
        let f = filter(inner, "error:ops=write,flush,errno=ENOSPC");
        assert_eq!(run(&f, Op::Write, 0, 4096).0, Err(Errno::NOSPC));
        assert_eq!(run(&f, Op::Flush, 0, 0).0, Err(Errno::NOSPC));
        assert!(
            seen.take().is_empty(),
            "a failed request reached the target"
        );
        assert_eq!(run(&f, Op::Read, 0, 4096).0, Ok(4096));
        assert_eq!(run(&f, Op::Discard, 0, 4096).0, Ok(0));
        assert_eq!(seen.take().len(), 2);
    }

    #[test]
    fn rate_holds_statistically() {
        let (inner, _) = probe(1 << 20);
        let f = filter(inner, "error:rate=0.1,seed=1");
        let mut e = Engine::new(&f, 4096).unwrap();
        let n = 20_000;
        let failed = (0..n)
            .filter(|_| {
                run_on(&mut e, &f, Request::new(Op::Read, 0, 512))
                    .0
                    .is_err()
            })
            .count();
        // Binomial(20000, 0.1): sd = 42.4; 5 sd either side.
        assert!(
            (1788..=2212).contains(&failed),
            "{failed} of {n} failed at rate 0.1"
        );
        // And different seeds give different (but as likely) sequences.
        let g = filter(probe(1 << 20).0, "error:rate=0.1,seed=2");
        let mut e = Engine::new(&g, 4096).unwrap();
        let failed2 = (0..n)
            .filter(|_| {
                run_on(&mut e, &g, Request::new(Op::Read, 0, 512))
                    .0
                    .is_err()
            })
            .count();
        assert!((1788..=2212).contains(&failed2) && failed2 != failed);
    }

    #[test]
    fn range_is_exact_to_the_byte() {
        let (inner, _) = probe(1 << 20);
        let f = filter(inner, "error:range=64K-128K");
        let k = |n: u64| n << 10;
        for (off, len, fails) in [
            (k(60), 4096, false),      // ends where the range starts
            (k(60), 4608, true),       // one sector into it
            (k(64), 512, true),        // its first sector
            (k(128) - 512, 512, true), // its last sector
            (k(128), 4096, false),     // starts where it ends
            (k(32), 256 << 10, true),  // covers it
            (0, 0, false),             // flush: no range
        ] {
            let op = if len == 0 { Op::Flush } else { Op::Read };
            let r = run(&f, op, off, len).0;
            assert_eq!(r.is_err(), fails, "{op:?} {off}+{len}: {r:?}");
        }
    }

    #[test]
    fn trigger_file_turns_failures_on_and_off() {
        let dir = tempfile::tempdir().unwrap();
        let trigger = dir.path().join("fail");
        let (inner, _) = probe(1 << 20);
        let f = filter(inner, &format!("error:file={}", trigger.display()));
        assert_eq!(run(&f, Op::Read, 0, 512).0, Ok(512));
        std::fs::write(&trigger, b"").unwrap();
        assert_eq!(run(&f, Op::Read, 0, 512).0, Err(Errno::IO));
        std::fs::remove_file(&trigger).unwrap();
        assert_eq!(run(&f, Op::Read, 0, 512).0, Ok(512));
    }
}
