use std::io::{Read, Write};
use std::net::TcpStream;

use rustix::io::Errno;

use super::*;
use crate::filters::testing::{probe, ring_probe, run_on};
use crate::filters::{build, Env};
use crate::slots::Engine;
use crate::target::Request;

#[test]
fn buckets_are_log2_microseconds() {
    assert_eq!(bucket_of(0), 0);
    assert_eq!(bucket_of(1), 1);
    assert_eq!((bucket_of(2), bucket_of(3)), (2, 2));
    assert_eq!((bucket_of(4), bucket_of(7)), (3, 3));
    assert_eq!((bucket_of(1023), bucket_of(1024)), (10, 11));
    assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    // Every latency is below its bucket's bound and at least the previous one's.
    for us in [0, 1, 5, 100, 1000, 123_456, 1 << 29] {
        let i = bucket_of(us);
        assert!(us < bucket_bound(i).unwrap(), "{us}");
        assert!(i == 0 || us >= bucket_bound(i - 1).unwrap(), "{us}");
    }
    assert_eq!(bucket_bound(BUCKETS - 1), None);
}

#[test]
fn quantiles_from_buckets() {
    assert_eq!(quantile(&[], 0.5, 0), 0);
    // 90 requests of 3 µs (bucket 2, bound 4), 9 of 100 µs (bucket 7,
    // bound 128), 1 of 5000 µs (bucket 13, bound 8192).
    let mut b = vec![0u64; 14];
    b[2] = 90;
    b[7] = 9;
    b[13] = 1;
    assert_eq!(quantile(&b, 0.5, 5000), 4);
    assert_eq!(quantile(&b, 0.9, 5000), 4);
    assert_eq!(quantile(&b, 0.91, 5000), 128);
    assert_eq!(quantile(&b, 0.99, 5000), 128);
    // The top bucket's bound is more than anything seen: the max instead.
    assert_eq!(quantile(&b, 0.999, 5000), 5000);
    assert_eq!(quantile(&b, 1.0, 5000), 5000);
    // q = 0 is the first sample's bucket.
    assert_eq!(quantile(&b, 0.0, 5000), 4);
    // A single sample of 5 µs (bucket 3, bound 8) is every quantile, capped at itself.
    assert_eq!(quantile(&[0, 0, 0, 1], 0.5, 5), 5);
    assert_eq!(quantile(&[0, 0, 0, 1], 0.01, 5), 5);
}

#[test]
fn snapshot_math_from_recorded_latencies() {
    let c = Counters::new();
    for us in 1..=100u64 {
        c.record(Op::Read, Ok(4096), Duration::from_micros(us));
    }
    c.record(Op::Write, Err(Errno::IO), Duration::from_micros(10));
    let s = c.snapshot();
    let r = &s.ops["read"];
    assert_eq!((r.count, r.bytes, r.errors), (100, 409_600, 0));
    assert_eq!(r.latency_us.sum, 5050);
    assert!((r.latency_us.mean - 50.5).abs() < 1e-9);
    assert_eq!(r.latency_us.max, 100);
    // 1 | 2-3 | 4-7 | 8-15 | 16-31 | 32-63 | 64-100
    assert_eq!(r.latency_us.buckets, [0, 1, 2, 4, 8, 16, 32, 37]);
    // The 50th is 50 µs, in [32, 64); the 99th is 99 µs: bound 128, capped at the max.
    assert_eq!((r.latency_us.p50, r.latency_us.p99), (64, 100));
    let w = &s.ops["write"];
    assert_eq!((w.count, w.bytes, w.errors), (1, 0, 1));
    assert_eq!(s.ops["flush"].count, 0);
    assert!(s.ops["flush"].latency_us.buckets.is_empty());
    // The file form reads back the same.
    let back: Snapshot = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s);
}

#[test]
fn snapshot_sums_every_threads_shard() {
    // More threads than shards: some share one, and nothing is lost.
    let c = Counters::new();
    std::thread::scope(|s| {
        for t in 0..(SHARDS as u64 + 3) {
            let c = &c;
            s.spawn(move || {
                for _ in 0..1000 {
                    c.record(Op::Read, Ok(512), Duration::from_micros(t + 1));
                }
            });
        }
    });
    let r = &c.snapshot().ops["read"];
    let threads = SHARDS as u64 + 3;
    assert_eq!((r.count, r.bytes), (threads * 1000, threads * 512_000));
    assert_eq!(r.latency_us.sum, 1000 * threads * (threads + 1) / 2);
    assert_eq!(r.latency_us.max, threads);
    assert_eq!(r.latency_us.buckets.iter().sum::<u64>(), threads * 1000);
}

#[test]
fn counts_what_passes_through_with_its_latency() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stats.json");
    for (inner, _) in [probe(1 << 20), ring_probe(1 << 20)] {
        // stats over a 10 ms read delay and an error on writes past 512K.
        let specs: Vec<Spec> = ["stats", "delay:read=10ms", "error:ops=write,range=512K-1M"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let env = Env {
            stats_file: Some(file.clone()),
            ..Env::default()
        };
        let t = build(inner, &specs, &env).unwrap();
        let mut e = Engine::new(&*t, 1 << 20).unwrap();
        for i in 0..5 {
            let _ = run_on(&mut e, &*t, Request::new(Op::Read, i * 4096, 4096));
        }
        for i in 0..4 {
            let _ = run_on(&mut e, &*t, Request::new(Op::Write, i * (256 << 10), 8192));
        }
        let _ = run_on(&mut e, &*t, Request::new(Op::Flush, 0, 0));
        drop(e);
        drop(t); // the final snapshot
        let s: Snapshot = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(s.pid, std::process::id());
        let r = &s.ops["read"];
        assert_eq!((r.count, r.bytes, r.errors), (5, 5 * 4096, 0));
        assert!(
            r.latency_us.p50 >= 10_000,
            "p50 {} under the 10 ms delay",
            r.latency_us.p50
        );
        assert!(r.latency_us.max >= 10_000 && r.latency_us.max < 60_000);
        let w = &s.ops["write"];
        // Writes at 0 and 256K succeed; at 512K and 768K they fail.
        assert_eq!((w.count, w.bytes, w.errors), (4, 2 * 8192, 2));
        assert!(
            w.latency_us.max < 10_000,
            "writes were delayed: {}",
            w.latency_us.max
        );
        assert_eq!(s.ops["flush"].count, 1);
    }
}

#[test]
fn snapshot_file_is_refreshed_every_second() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stats.json");
    let (inner, _) = probe(1 << 20);
    let cfg = Config {
        file: Some(file.clone()),
        prometheus: None,
    };
    let t = Stats::new(inner, cfg).unwrap();
    let read = || -> Snapshot { serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap() };
    assert_eq!(read().ops["read"].count, 0, "no first snapshot at start");
    let mut e = Engine::new(&t, 4096).unwrap();
    let _ = run_on(&mut e, &t, Request::new(Op::Read, 0, 512));
    let start = Instant::now();
    while read().ops["read"].count == 0 {
        assert!(
            start.elapsed() < Duration::from_millis(1500),
            "not refreshed in 1.5 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn http(addr: SocketAddr, request: &str) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn prometheus_exporter_serves_metrics() {
    let (inner, _) = probe(1 << 20);
    let cfg = Config::parse(&"stats:prometheus=127.0.0.1:0".parse().unwrap()).unwrap();
    let t = Stats::new(inner, cfg).unwrap();
    let addr = t.prometheus_addr().unwrap();
    let mut e = Engine::new(&t, 4096).unwrap();
    for _ in 0..3 {
        let _ = run_on(&mut e, &t, Request::new(Op::Write, 0, 4096));
    }
    let resp = http(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{head}"
    );
    let value = |metric: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(metric)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {metric} in\n{body}"))
    };
    assert_eq!(value(r#"userblk_requests_total{op="write"}"#), 3.0);
    assert_eq!(value(r#"userblk_bytes_total{op="write"}"#), 12288.0);
    assert_eq!(value(r#"userblk_request_errors_total{op="write"}"#), 0.0);
    assert_eq!(value(r#"userblk_requests_total{op="read"}"#), 0.0);
    assert_eq!(
        value(r#"userblk_request_duration_seconds_count{op="write"}"#),
        3.0
    );
    assert_eq!(
        value(r#"userblk_request_duration_seconds_bucket{op="write",le="+Inf"}"#),
        3.0
    );
    // Buckets are cumulative and end at the count.
    let buckets: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with(r#"userblk_request_duration_seconds_bucket{op="write""#))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(buckets.len(), BUCKETS);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]));
    assert!(body.contains(r#"userblk_request_duration_seconds_bucket{op="write",le="0.000001"} "#));
    // Every sample line is NAME{labels} VALUE or NAME VALUE; every family has HELP and TYPE.
    for l in body.lines().filter(|l| !l.starts_with('#')) {
        let v = l.rsplit(' ').next().unwrap();
        assert!(v.parse::<f64>().is_ok(), "bad sample line {l}");
    }
    assert_eq!(body.matches("# TYPE ").count(), 5);

    assert!(http(addr, "GET / HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(http(addr, "POST /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 405"));
    drop(e);
    drop(t);
    // The server stops with the filter.
    assert!(
        TcpStream::connect(addr).is_err(),
        "still listening after drop"
    );
}

#[test]
fn exporter_address_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let spec = format!("stats:prometheus={}", taken.local_addr().unwrap());
    let cfg = Config::parse(&spec.parse().unwrap()).unwrap();
    let e = Stats::new(probe(4096).0, cfg).err().unwrap().to_string();
    assert!(
        e.starts_with("filter stats: listening on 127.0.0.1:"),
        "{e}"
    );
    assert!(Config::parse(&"stats:prometheus=9100".parse().unwrap()).is_err());
}
