//! `log`: every request and its result, as JSON lines (`file=PATH`).
//!
//! One line per request, written when its result passes up through the filter:
//!
//! ```text
//! {"ts":1718000000.123456,"op":"write","offset":4096,"len":4096,"flags":["fua"],"latency_us":38,"result":4096}
//! {"ts":1718000000.124001,"op":"read","offset":0,"len":512,"flags":[],"latency_us":5,"result":-5,"errno":"EIO"}
//! ```
//!
//! `ts` is the completion time (seconds since the epoch), `latency_us` the
//! time from the request reaching this filter to its result coming back,
//! `result` the bytes moved (0 for ops without data) or `-errno`. Offsets
//! and lengths are as this filter sees them (below an `offset` filter, say,
//! they are the target's). Lines are buffered and written out at least
//! every second, and when the filter is dropped. The file is appended to.

use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustix::fs::{Mode, OFlags};

use super::spec::{self, errno_name, Options, Spec};
use super::{op_name, Base, DataUse, Filter, FilterError};
use crate::target::{Ctx, Flags, IoResult, Request, Submit, Target};

/// How often buffered lines are written out at the latest.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// The options of `log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file the lines are appended to.
    pub file: PathBuf,
}

impl Config {
    /// Parse `file=PATH`.
    pub fn parse(s: &Spec) -> Result<Self, FilterError> {
        let mut o = Options::new("log", s);
        let file = o.get("file", |p| Ok(PathBuf::from(p)))?;
        o.finish()?;
        let file = spec::required(file, "log", "file")?;
        Ok(Config { file })
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "log:file={}", self.file.display())
    }
}

/// The buffered file and whether writing it has failed.
struct Out {
    w: BufWriter<File>,
    failed: bool,
}

impl Out {
    fn flush(&mut self) {
        if let Err(e) = self.w.flush() {
            self.failed(&e);
        }
    }

    fn failed(&mut self, e: &std::io::Error) {
        if !self.failed {
            tracing::error!("log filter: writing the request log: {e}; requests go on unlogged");
            self.failed = true;
        }
    }
}

fn lock(out: &Mutex<Out>) -> std::sync::MutexGuard<'_, Out> {
    out.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The `log` filter.
pub struct Log {
    base: Base,
    out: Arc<Mutex<Out>>,
    /// Dropping it stops the flushing thread.
    stop: Option<mpsc::Sender<()>>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

impl Log {
    /// Log `inner`'s requests to `cfg.file` (a relative path is taken from
    /// the current directory now).
    pub fn new(inner: Arc<dyn Target>, cfg: Config) -> Result<Self, FilterError> {
        let io = |what: String| FilterError::io::<std::io::Error>("log", what);
        let path = super::absolute("log", &cfg.file, cfg.file.display().to_string())?;
        let file = crate::io::open::open_checked(
            &path,
            OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE,
            Mode::from_raw_mode(0o666),
            crate::io::open::Kinds::Regular,
        )
        .map(std::fs::File::from)
        .map_err(io(format!("opening {}", path.display())))?;
        let out = Arc::new(Mutex::new(Out {
            w: BufWriter::with_capacity(64 << 10, file),
            failed: false,
        }));
        let (stop, stopped) = mpsc::channel::<()>();
        let flusher = {
            let out = Arc::clone(&out);
            std::thread::Builder::new()
                .name("log-filter".into())
                .spawn(move || {
                    // Until the filter is dropped (a message or a hang-up).
                    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(FLUSH_EVERY) {
                        lock(&out).flush();
                    }
                })
                .map_err(io("starting its flushing thread".into()))?
        };
        Ok(Log {
            base: Base::new(inner, Config { file: path }, DataUse::Untouched)?.timed(),
            out,
            stop: Some(stop),
            flusher: Some(flusher),
        })
    }
}

/// One request's JSON line.
fn write_line(
    w: &mut impl Write,
    req: &Request,
    result: IoResult,
    latency: Duration,
    now: SystemTime,
) -> std::io::Result<()> {
    let ts = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let op = op_name(req.op);
    write!(
        w,
        r#"{{"ts":{}.{:06},"op":"{op}","offset":{},"len":{},"flags":["#,
        ts.as_secs(),
        ts.subsec_micros(),
        req.offset,
        req.len
    )?;
    let mut sep = "";
    for (flag, name) in [(Flags::FUA, "fua"), (Flags::NOUNMAP, "nounmap")] {
        if req.flags.contains(flag) {
            write!(w, r#"{sep}"{name}""#)?;
            sep = ",";
        }
    }
    write!(w, r#"],"latency_us":{}"#, latency.as_micros())?;
    match result {
        Ok(n) => writeln!(w, r#","result":{n}}}"#),
        Err(e) => writeln!(
            w,
            r#","result":-{},"errno":"{}"}}"#,
            e.raw_os_error(),
            errno_name(e)
        ),
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
        lock(&self.out).flush();
    }
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Log").field("base", &self.base).finish()
    }
}

impl Filter for Log {
    fn base(&self) -> &Base {
        &self.base
    }

    /// Write the request's line, once its result is in.
    fn filter_result(&self, ctx: &mut Ctx<'_>, s: Submit) -> Submit {
        if let Some((result, latency)) = self.base.finished(ctx, s) {
            let mut out = lock(&self.out);
            if let Err(e) = write_line(&mut out.w, ctx.req(), result, latency, SystemTime::now()) {
                out.failed(&e);
            }
        }
        s
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::filters::testing::{probe, run_on};
    use crate::filters::{build, Env, Spec};
    use crate::slots::Engine;
    use crate::target::Op;

    fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect()
    }

    #[test]
    fn every_request_is_a_json_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("req.log");
        let (inner, _) = probe(1 << 20);
        // Below the log, a delay (so latency shows) and an error in a range.
        let specs: Vec<Spec> = [
            format!("log:file={}", path.display()),
            "delay:read=20ms".into(),
            "error:ops=write,range=64K-128K,errno=ENOSPC".into(),
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let t = build(inner, &specs, &Env::default()).unwrap();
        let mut e = Engine::new(&*t, 1 << 20).unwrap();
        let reqs = [
            Request::new(Op::Read, 4096, 8192),
            Request::new(Op::Write, 0, 4096).with_flags(Flags::FUA),
            Request::new(Op::Write, 64 << 10, 4096),
            Request::new(Op::Flush, 0, 0),
            Request::new(Op::WriteZeroes, 0, 4096).with_flags(Flags::NOUNMAP),
        ];
        for r in reqs {
            let _ = run_on(&mut e, &*t, r);
        }
        drop(e);
        drop(t); // flushes
        let got = lines(&path);
        assert_eq!(got.len(), reqs.len());
        let fields = |v: &serde_json::Value| {
            (
                v["op"].as_str().unwrap().to_string(),
                v["offset"].as_u64().unwrap(),
                v["len"].as_u64().unwrap(),
                v["flags"].clone(),
                v["result"].as_i64().unwrap(),
                v.get("errno").and_then(|e| e.as_str()).map(str::to_string),
            )
        };
        let s = |x: &str| x.to_string();
        assert_eq!(
            fields(&got[0]),
            (s("read"), 4096, 8192, serde_json::json!([]), 8192, None)
        );
        assert_eq!(
            fields(&got[1]),
            (s("write"), 0, 4096, serde_json::json!(["fua"]), 4096, None)
        );
        assert_eq!(
            fields(&got[2]),
            (
                s("write"),
                65536,
                4096,
                serde_json::json!([]),
                -28,
                Some(s("ENOSPC"))
            )
        );
        assert_eq!(fields(&got[3]).0, "flush");
        assert_eq!(fields(&got[4]).3, serde_json::json!(["nounmap"]));
        assert_eq!(fields(&got[4]).0, "write_zeroes");
        // The delayed read's latency includes its 20 ms; the others are quick.
        let lat = |i: usize| got[i]["latency_us"].as_u64().unwrap();
        assert!(
            (20_000..60_000).contains(&lat(0)),
            "read latency {}",
            lat(0)
        );
        assert!(lat(1) < 20_000, "write latency {}", lat(1));
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        let ts = got[0]["ts"].as_f64().unwrap();
        assert!((now.as_secs_f64() - ts).abs() < 10.0, "ts {ts}");
    }

    #[test]
    fn lines_reach_the_file_within_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("req.log");
        let (inner, _) = probe(1 << 20);
        let cfg = Config::parse(&format!("log:file={}", path.display()).parse().unwrap()).unwrap();
        let t = Log::new(inner, cfg).unwrap();
        let mut e = Engine::new(&t, 4096).unwrap();
        let _ = run_on(&mut e, &t, Request::new(Op::Read, 0, 512));
        let start = Instant::now();
        while std::fs::metadata(&path).unwrap().len() == 0 {
            assert!(
                start.elapsed() < Duration::from_millis(1500),
                "not flushed after 1.5 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(lines(&path).len(), 1);
    }

    #[test]
    fn unopenable_file_is_a_clear_error() {
        let (inner, _) = probe(1 << 20);
        let cfg = Config::parse(&"log:file=/nonexistent/dir/x.log".parse().unwrap()).unwrap();
        let e = Log::new(inner, cfg).err().unwrap().to_string();
        assert!(
            e.starts_with("filter log: opening /nonexistent/dir/x.log: "),
            "{e}"
        );
        assert!(Config::parse(&"log".parse().unwrap()).is_err());
    }
}
