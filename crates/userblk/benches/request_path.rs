//! Host-side micro-benchmarks of the request path, so regressions show
//! without the VM: one request through validate/submit/complete
//! ([`Engine::run_in_place`], what every frontend's queue loop does per
//! request), bare and under filter stacks, and the NBD request parser.
//!
//! `cargo bench -p userblk --bench request_path`; compare a change against
//! a saved baseline with `-- --save-baseline before` / `-- --baseline before`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use userblk::filters::{build, Env, Spec};
use userblk::nbd::proto::{CMD_READ, CMD_WRITE};
use userblk::nbd::server::handshake::Negotiated;
use userblk::nbd::server::transmission::{command, Header, Limits};
use userblk::slots::Engine;
use userblk::targets::{MemTarget, NullTarget};
use userblk::{Op, Request, Target};

const SIZE: u64 = 1 << 30;

fn stack(target: Arc<dyn Target>, specs: &[&str]) -> Arc<dyn Target> {
    let specs: Vec<Spec> = specs.iter().map(|s| s.parse().expect("spec")).collect();
    build(target, &specs, &Env::default()).expect("stack")
}

/// 4 KiB requests at offsets that walk the first 64 MiB.
fn run_requests(c: &mut Criterion, group: &str, target: &Arc<dyn Target>, op: Op) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(1));
    let mut engine = Engine::new(&**target, 4096).expect("engine");
    let mut i = 0u64;
    g.bench_function(format!("{op:?}").to_lowercase(), |b| {
        b.iter(|| {
            i = (i + 1) % 16384;
            let req = Request::new(op, i * 4096, 4096);
            black_box(engine.run_in_place(&**target, black_box(req))).expect("request");
        });
    });
    g.finish();
}

fn request_path(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let stats_file = dir.path().join("stats.json").display().to_string();
    let null: Arc<dyn Target> = Arc::new(NullTarget::new(SIZE));
    let mem: Arc<dyn Target> = Arc::new(MemTarget::new(SIZE).expect("mem"));
    let stats = format!("stats:file={stats_file}");
    let five = [
        stats.as_str(),
        "error:rate=0",
        "delay:all=0ms",
        "rate:iops=1000000000",
        "offset:offset=0",
    ];
    run_requests(c, "null", &null, Op::Read);
    run_requests(c, "null+stats", &stack(null.clone(), &[&stats]), Op::Read);
    run_requests(
        c,
        "null+five-filters",
        &stack(null.clone(), &five),
        Op::Read,
    );
    run_requests(c, "mem", &mem, Op::Write);
    run_requests(c, "mem", &mem, Op::Read);
    run_requests(c, "mem+five-filters", &stack(mem.clone(), &five), Op::Read);
}

fn nbd_parser(c: &mut Criterion) {
    let limits = Limits::new(MemTarget::new(SIZE).expect("mem").caps());
    let neg = Negotiated {
        structured: true,
        ..Negotiated::default()
    };
    let raw: Vec<[u8; 28]> = (0..64u64)
        .map(|i| {
            Header {
                flags: 0,
                kind: if i % 2 == 0 { CMD_READ } else { CMD_WRITE },
                cookie: i,
                offset: i * 4096,
                len: 4096,
            }
            .encode()
        })
        .collect();
    let mut g = c.benchmark_group("nbd");
    g.throughput(Throughput::Elements(raw.len() as u64));
    g.bench_function("parse+check 64 headers", |b| {
        b.iter(|| {
            for r in &raw {
                let h = Header::parse(black_box(r)).expect("header");
                black_box(command(&h, &neg, &limits)).expect("command");
            }
        });
    });
    g.finish();
}

criterion_group!(benches, request_path, nbd_parser);
criterion_main!(benches);
