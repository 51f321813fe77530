//! What the always-on request counters cost: one request through the slot
//! machine on a null target with no counter file installed and with one
//! (the clock reads and the atomic adds), and the adds alone.
//!
//! `cargo bench -p userblk --bench metrics`; a quick look:
//! `cargo bench -p userblk --bench metrics -- --quick`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use userblk::metrics::{self, Counters};
use userblk::slots::Engine;
use userblk::targets::NullTarget;
use userblk::{Op, Request};

fn per_request(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = NullTarget::new(1 << 30);
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Elements(1));
    for counted in [false, true] {
        let _installed = counted.then(|| {
            metrics::install(Counters::create(&dir.path().join("0.metrics")).expect("counters"))
        });
        // The engine's slots take their block (or none) when made.
        let mut engine = Engine::new(&target, 4096).expect("engine");
        let mut i = 0u64;
        let name = if counted {
            "null read, counted"
        } else {
            "null read, uncounted"
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % 16384;
                let req = Request::new(Op::Read, i * 4096, 4096);
                black_box(engine.run_in_place(&target, black_box(req))).expect("request");
            });
        });
    }
    g.finish();
}

fn record(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let counters = Counters::create(&dir.path().join("1.metrics")).expect("counters");
    let block = counters.block();
    let mut g = c.benchmark_group("counters");
    g.throughput(Throughput::Elements(1));
    let mut ns = 0u64;
    g.bench_function("record", |b| {
        b.iter(|| {
            ns = (ns + 997) % 5_000_000;
            block.record(black_box(Op::Write), 4096, true, black_box(ns));
        });
    });
    g.bench_function("clock", |b| b.iter(|| black_box(std::time::Instant::now())));
    g.finish();
}

criterion_group!(benches, per_request, record);
criterion_main!(benches);
