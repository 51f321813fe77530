//! `stats`: counts, bytes, errors and latency histograms per op
//! (`file=PATH`, `prometheus=127.0.0.1:9100`).
//!
//! Latency is the time from a request reaching this filter to its result
//! coming back up, in log2 buckets of microseconds: bucket 0 holds
//! latencies under 1 µs, bucket `i` those in `[2^(i-1), 2^i)` µs.
//! Percentiles are read from the buckets: the upper bound of the bucket
//! holding that rank (never more than the largest latency seen), so
//! `p99 = 128` means 99% of requests took under 128 µs.
//!
//! With `file`, a JSON [`Snapshot`] is written there every second and when
//! the filter is dropped (`userblk stats` reads it); with `prometheus`, a
//! small HTTP server on that address answers `GET /metrics` in Prometheus'
//! text format. Both run on threads of their own; the request path only
//! adds to atomic counters, in a shard of its own thread's (one queue
//! thread's counters never share a cache line with another's), which a
//! snapshot sums.

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::spec::{Options, Printer, Spec};
use super::{op_index, op_name, Base, DataUse, Filter, FilterError, OPS};
use crate::control::serve_until;
use crate::target::{Ctx, IoResult, Op, Submit, Target};

/// Number of latency buckets: the last holds everything from 2^30 µs (18 minutes) up.
pub const BUCKETS: usize = 32;

/// How often the snapshot file is rewritten.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);

/// The options of `stats`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    /// Where to write JSON snapshots.
    pub file: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`HOST:PORT`).
    pub prometheus: Option<String>,
}

impl Config {
    /// Parse `[file=PATH][,prometheus=HOST:PORT]`.
    pub fn parse(s: &Spec) -> Result<Self, FilterError> {
        let mut o = Options::new("stats", s);
        let c = Config {
            file: o.get("file", |p| Ok(PathBuf::from(p)))?,
            prometheus: o.get("prometheus", |a| {
                if a.contains(':') {
                    Ok(a.to_string())
                } else {
                    Err("expected HOST:PORT, such as 127.0.0.1:9100".into())
                }
            })?,
        };
        o.finish()?;
        Ok(c)
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut p = Printer::new(f, "stats")?;
        p.opt_some("file", self.file.as_ref().map(|path| path.display()))?;
        p.opt_some("prometheus", self.prometheus.as_ref())
    }
}

/// The bucket of a latency of `us` microseconds.
pub fn bucket_of(us: u64) -> usize {
    // 0 for 0; i for [2^(i-1), 2^i).
    let i = (u64::BITS - us.leading_zeros()) as usize;
    i.min(BUCKETS - 1)
}

/// The exclusive upper bound of bucket `i`, in microseconds (`None` for the last).
pub fn bucket_bound(i: usize) -> Option<u64> {
    (i < BUCKETS - 1).then(|| 1u64 << i)
}

/// The `q` quantile (0 to 1) of the latencies counted in `buckets`: the
/// upper bound of the bucket holding that rank, at most `max`. 0 when empty.
pub fn quantile(buckets: &[u64], q: f64, max: u64) -> u64 {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return 0;
    }
    // The rank of the q-th sample, 1-based: ceil(q * total), at least 1.
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
    #[allow(clippy::cast_sign_loss)]
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return bucket_bound(i).map_or(max, |b| b.min(max));
        }
    }
    max
}

/// Counters of one op.
#[derive(Debug, Default)]
struct OpCounters {
    count: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    latency_sum_us: AtomicU64,
    latency_max_us: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

/// How many shards the counters are split into: queue threads beyond
/// this many share shards (still correct, the counters are atomic).
const SHARDS: usize = 8;

/// One thread's counters, on cache lines of their own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    ops: [OpCounters; 5],
}

/// The shard of the calling thread: threads take shards in turn on
/// their first request.
fn shard_index() -> usize {
    use std::cell::Cell;
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    MINE.with(|m| {
        if m.get() == usize::MAX {
            m.set(NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
        }
        m.get()
    })
}

/// Everything counted, shared by the queues and the reporting threads.
#[derive(Debug)]
struct Counters {
    shards: Box<[Shard]>,
    started: Instant,
}

impl Counters {
    fn new() -> Self {
        Counters {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            started: Instant::now(),
        }
    }

    fn record(&self, op: Op, result: IoResult, latency: Duration) {
        let Some(shard) = self.shards.get(shard_index()) else {
            return;
        };
        let c = &shard.ops[op_index(op)];
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        c.count.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(n) => {
                c.bytes.fetch_add(u64::from(n), Ordering::Relaxed);
            }
            Err(_) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        c.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        c.latency_max_us.fetch_max(us, Ordering::Relaxed);
        c.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Snapshot {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let ops = OPS
            .iter()
            .map(|&op| {
                let i = op_index(op);
                let sum = |f: fn(&OpCounters) -> &AtomicU64| -> u64 {
                    self.shards
                        .iter()
                        .map(|sh| f(&sh.ops[i]).load(Ordering::Relaxed))
                        .fold(0, u64::wrapping_add)
                };
                let mut buckets = vec![0u64; BUCKETS];
                for sh in self.shards.iter() {
                    for (total, b) in buckets.iter_mut().zip(&sh.ops[i].buckets) {
                        *total = total.wrapping_add(b.load(Ordering::Relaxed));
                    }
                }
                while buckets.last() == Some(&0) {
                    buckets.pop();
                }
                let max = self
                    .shards
                    .iter()
                    .map(|sh| sh.ops[i].latency_max_us.load(Ordering::Relaxed))
                    .max()
                    .unwrap_or(0);
                (
                    op_name(op).to_string(),
                    OpSnapshot::new(
                        sum(|c| &c.count),
                        sum(|c| &c.bytes),
                        sum(|c| &c.errors),
                        sum(|c| &c.latency_sum_us),
                        max,
                        buckets,
                    ),
                )
            })
            .collect();
        Snapshot {
            time: now.as_secs_f64(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            pid: std::process::id(),
            ops,
        }
    }
}

/// What `stats` has counted, at one moment: the snapshot file's contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When it was taken, in seconds since the epoch.
    pub time: f64,
    /// Seconds since the filter started counting.
    pub uptime_s: f64,
    /// The daemon's pid.
    pub pid: u32,
    /// Per op (`read`, `write`, `flush`, `discard`, `write_zeroes`).
    pub ops: std::collections::BTreeMap<String, OpSnapshot>,
}

/// One op's counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpSnapshot {
    /// Requests completed.
    pub count: u64,
    /// Bytes moved by the successful ones.
    pub bytes: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Latency figures.
    pub latency_us: Latency,
}

/// Latency figures of one op, in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Mean.
    pub mean: f64,
    /// Median (a bucket bound, see the module docs).
    pub p50: u64,
    /// 99th percentile (a bucket bound).
    pub p99: u64,
    /// Largest seen.
    pub max: u64,
    /// Sum of all latencies.
    pub sum: u64,
    /// The histogram: `buckets[0]` under 1 µs, `buckets[i]` in
    /// `[2^(i-1), 2^i)` µs; trailing empty buckets left out.
    pub buckets: Vec<u64>,
}

impl OpSnapshot {
    fn new(count: u64, bytes: u64, errors: u64, sum: u64, max: u64, buckets: Vec<u64>) -> Self {
        #[allow(clippy::cast_precision_loss)]
        let mean = if count == 0 {
            0.0
        } else {
            sum as f64 / count as f64
        };
        OpSnapshot {
            count,
            bytes,
            errors,
            latency_us: Latency {
                mean,
                p50: quantile(&buckets, 0.5, max),
                p99: quantile(&buckets, 0.99, max),
                max,
                sum,
                buckets,
            },
        }
    }
}

impl Snapshot {
    /// The snapshot in Prometheus' text exposition format.
    pub fn prometheus(&self) -> String {
        let mut s = String::with_capacity(8 << 10);
        let mut family =
            |name: &str, kind: &str, help: &str, value: &dyn Fn(&OpSnapshot) -> u64| {
                s += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
                for (op, o) in &self.ops {
                    s += &format!("{name}{{op=\"{op}\"}} {}\n", value(o));
                }
            };
        family(
            "userblk_requests_total",
            "counter",
            "Requests completed.",
            &|o| o.count,
        );
        family(
            "userblk_request_errors_total",
            "counter",
            "Requests that failed.",
            &|o| o.errors,
        );
        family(
            "userblk_bytes_total",
            "counter",
            "Bytes moved by successful requests.",
            &|o| o.bytes,
        );
        let name = "userblk_request_duration_seconds";
        s += &format!(
            "# HELP {name} Time from a request reaching the stats filter to its result.\n# TYPE {name} histogram\n"
        );
        for (op, o) in &self.ops {
            let mut cumulative = 0;
            for i in 0..BUCKETS - 1 {
                cumulative += o.latency_us.buckets.get(i).copied().unwrap_or(0);
                #[allow(clippy::cast_precision_loss)]
                let le = bucket_bound(i).unwrap_or(0) as f64 / 1e6;
                s += &format!("{name}_bucket{{op=\"{op}\",le=\"{le}\"}} {cumulative}\n");
            }
            s += &format!("{name}_bucket{{op=\"{op}\",le=\"+Inf\"}} {}\n", o.count);
            #[allow(clippy::cast_precision_loss)]
            let sum = o.latency_us.sum as f64 / 1e6;
            s += &format!("{name}_sum{{op=\"{op}\"}} {sum}\n");
            s += &format!("{name}_count{{op=\"{op}\"}} {}\n", o.count);
        }
        s += "# HELP userblk_stats_uptime_seconds Time since the stats filter started counting.\n";
        s += "# TYPE userblk_stats_uptime_seconds gauge\n";
        s += &format!("userblk_stats_uptime_seconds {}\n", self.uptime_s);
        s
    }
}

/// Write `snap` to `path` atomically (a temporary file, then rename).
pub fn write_snapshot(path: &Path, snap: &Snapshot) -> std::io::Result<()> {
    let body = serde_json::to_vec_pretty(snap).map_err(std::io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
}

/// The `stats` filter.
pub struct Stats {
    base: Base,
    counters: Arc<Counters>,
    file: Option<PathBuf>,
    prometheus: Option<SocketAddr>,
    stop: Arc<AtomicBool>,
    /// Dropping it wakes the snapshot thread to stop.
    wake: Option<mpsc::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Stats {
    /// Count `inner`'s requests; start the snapshot writer and the
    /// Prometheus server `cfg` asks for.
    pub fn new(inner: Arc<dyn Target>, mut cfg: Config) -> Result<Self, FilterError> {
        let io = |what: String| FilterError::io::<std::io::Error>("stats", what);
        if let Some(p) = &cfg.file {
            cfg.file = Some(super::absolute("stats", p, p.display().to_string())?);
        }
        let counters = Arc::new(Counters::new());
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut prometheus = None;
        if let Some(addr) = &cfg.prometheus {
            let listener = TcpListener::bind(addr).map_err(io(format!("listening on {addr}")))?;
            prometheus = Some(
                listener
                    .local_addr()
                    .map_err(io(format!("listening on {addr}")))?,
            );
            let (counters, stop) = (Arc::clone(&counters), Arc::clone(&stop));
            threads.push(
                std::thread::Builder::new()
                    .name("stats-http".into())
                    .spawn(move || serve_metrics(&listener, &counters, &stop))
                    .map_err(io("starting the metrics server".into()))?,
            );
        }
        let (wake, woken) = mpsc::channel::<()>();
        if let Some(path) = cfg.file.clone() {
            let counters = Arc::clone(&counters);
            // The first snapshot now, so the file exists as soon as the device does.
            write_snapshot(&path, &counters.snapshot())
                .map_err(io(format!("writing {}", path.display())))?;
            threads.push(
                std::thread::Builder::new()
                    .name("stats-snapshot".into())
                    .spawn(move || {
                        // Until the filter is dropped (a message or a hang-up).
                        while let Err(RecvTimeoutError::Timeout) =
                            woken.recv_timeout(SNAPSHOT_EVERY)
                        {
                            if let Err(e) = write_snapshot(&path, &counters.snapshot()) {
                                tracing::warn!("stats: {}: {e}", path.display());
                            }
                        }
                    })
                    .map_err(io("starting the snapshot writer".into()))?,
            );
        }
        Ok(Stats {
            file: cfg.file.clone(),
            base: Base::new(inner, cfg, DataUse::Untouched)?.timed(),
            counters,
            prometheus,
            stop,
            wake: Some(wake),
            threads,
        })
    }

    /// What has been counted so far.
    pub fn snapshot(&self) -> Snapshot {
        self.counters.snapshot()
    }

    /// The address the Prometheus server listens on (useful with port 0).
    pub fn prometheus_addr(&self) -> Option<SocketAddr> {
        self.prometheus
    }
}

impl Drop for Stats {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        drop(self.wake.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let snap = self.counters.snapshot();
        if let Some(path) = &self.file {
            if let Err(e) = write_snapshot(path, &snap) {
                tracing::warn!("stats: {}: {e}", path.display());
            }
        }
        let summary: Vec<String> = snap
            .ops
            .iter()
            .filter(|(_, o)| o.count > 0)
            .map(|(op, o)| {
                format!(
                    "{op} {} ({} errors, {} bytes, p50 {}us p99 {}us)",
                    o.count, o.errors, o.bytes, o.latency_us.p50, o.latency_us.p99
                )
            })
            .collect();
        tracing::info!(
            "stats at exit: {}",
            if summary.is_empty() {
                "no requests".into()
            } else {
                summary.join(", ")
            }
        );
    }
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stats").field("base", &self.base).finish()
    }
}

impl Filter for Stats {
    fn base(&self) -> &Base {
        &self.base
    }

    fn filter_result(&self, ctx: &mut Ctx<'_>, s: Submit) -> Submit {
        if let Some((result, latency)) = self.base.finished(ctx, s) {
            self.counters.record(ctx.req().op, result, latency);
        }
        s
    }
}

/// Serve `GET /metrics` on `listener` until `stop`, one connection at a time.
fn serve_metrics(listener: &TcpListener, counters: &Counters, stop: &AtomicBool) {
    let accept = || listener.accept().map(|(conn, _)| conn);
    serve_until(listener, accept, stop, "stats: metrics server", |conn| {
        if let Err(e) = answer(conn, counters) {
            tracing::debug!("stats: metrics request: {e}");
        }
    });
}

/// Read one HTTP request from `conn` and answer it.
fn answer(mut conn: TcpStream, counters: &Counters) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 << 10 {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = req
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (method, path) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    let (status, kind, body) = match (method, path) {
        (b"GET", b"/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            counters.snapshot().prometheus(),
        ),
        (b"GET", _) => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
