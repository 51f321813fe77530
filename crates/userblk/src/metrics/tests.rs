#![allow(clippy::unwrap_used)]

use super::layout::{self as l, BLOCKS, FILE_BYTES};
use super::*;
use crate::target::{Op, Request};

#[test]
fn what_is_recorded_is_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.metrics");
    let c = Counters::create(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), FILE_BYTES as u64);
    let a = c.block();
    let b = c.block();
    a.record(Op::Write, 4096, true, 1500);
    b.record(Op::Write, 8192, true, 3_000_000);
    b.record(Op::Write, 4096, false, 10);
    a.record(Op::Flush, 0, true, 0);
    a.record(Op::WriteZeroes, 1 << 20, true, 40_000_000_000);
    a.set_inflight(3);
    b.set_inflight(2);

    let s = Snapshot::read(&path).unwrap().unwrap();
    let w = s.op(Op::Write);
    assert_eq!((w.requests, w.bytes, w.errors), (3, 12288, 1));
    assert_eq!(w.sum_ns, 1500 + 3_000_000 + 10);
    assert_eq!(w.buckets[1], 1, "1.5 µs");
    assert_eq!(w.buckets[12], 1, "3 ms <= 4096 µs");
    assert_eq!(w.buckets[0], 1, "10 ns");
    assert_eq!(w.buckets.iter().sum::<u64>(), 3);
    assert_eq!(s.op(Op::Flush).requests, 1);
    assert_eq!(s.op(Op::WriteZeroes).bytes, 1 << 20);
    assert_eq!(s.op(Op::WriteZeroes).buckets[l::FINITE_BUCKETS], 1, "40 s");
    assert_eq!(*s.op(Op::Read), OpTotals::default());
    assert_eq!((s.inflight, s.recoveries), (5, 0));

    // A thread that leaves clears its gauge; its counts stay.
    drop(b);
    let s = Snapshot::read(&path).unwrap().unwrap();
    assert_eq!((s.inflight, s.op(Op::Write).requests), (3, 3));
}

#[test]
fn a_new_daemon_keeps_the_counts_and_counts_a_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("1.metrics");
    let old = Counters::create(&path).unwrap();
    let blk = old.block();
    blk.record(Op::Read, 512, true, 1);
    blk.set_inflight(7);
    // The old daemon dies: its block is never given back.
    std::mem::forget(blk);
    drop(old);

    let new = Counters::take_over(&path).unwrap();
    let s = Snapshot::read(&path).unwrap().unwrap();
    assert_eq!(
        (s.op(Op::Read).bytes, s.recoveries, s.inflight),
        (512, 1, 0)
    );
    drop(new);
    let _again = Counters::take_over(&path).unwrap();
    assert_eq!(Snapshot::read(&path).unwrap().unwrap().recoveries, 2);

    // A fresh add starts from zero.
    let _fresh = Counters::create(&path).unwrap();
    let s = Snapshot::read(&path).unwrap().unwrap();
    assert_eq!((s.op(Op::Read).requests, s.recoveries), (0, 0));

    // Taking over a foreign file (or none) starts again, counting this one.
    std::fs::write(&path, b"not a counter file").unwrap();
    assert_eq!(Snapshot::read(&path).unwrap(), None);
    let _c = Counters::take_over(&path).unwrap();
    assert_eq!(Snapshot::read(&path).unwrap().unwrap().recoveries, 1);
    assert_eq!(Snapshot::read(&dir.path().join("none")).unwrap(), None);
}

#[test]
fn threads_beyond_the_blocks_share_and_freed_blocks_are_reused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("2.metrics");
    let c = Counters::create(&path).unwrap();
    let blocks: Vec<Block> = (0..BLOCKS + 3).map(|_| c.block()).collect();
    for b in &blocks {
        b.record(Op::Read, 1, true, 1);
    }
    let s = Snapshot::read(&path).unwrap().unwrap();
    assert_eq!(
        s.op(Op::Read).requests,
        (BLOCKS + 3) as u64,
        "none lost when shared"
    );
    drop(blocks);
    let one = c.block();
    one.record(Op::Read, 1, true, 1);
    assert_eq!(c.blocks_used(), BLOCKS as u64, "the high-water mark stays");
    let s = Snapshot::read(&path).unwrap().unwrap();
    assert_eq!(s.op(Op::Read).requests, (BLOCKS + 4) as u64);
}

#[test]
fn slots_count_into_the_installed_file() {
    use crate::slots::Engine;
    use crate::targets::NullTarget;
    use crate::Target;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("3.metrics");
    let guard = install_file(&path, false).unwrap();
    let t = NullTarget::new(1 << 20);
    let mut e = Engine::new(&t, 4096).unwrap();
    assert!(t.caps().size > 0);
    for i in 0..10u64 {
        e.run_in_place(&t, Request::new(Op::Write, i * 4096, 4096))
            .unwrap();
    }
    // Past the end: refused, and counted as a failed read.
    assert!(e
        .run_in_place(&t, Request::new(Op::Read, 1 << 20, 4096))
        .is_err());
    drop(e);
    drop(guard);
    // Other tests' slots may count here too while it is installed: at least ours.
    let s = Snapshot::read(&path).unwrap().unwrap();
    assert!(s.op(Op::Write).requests >= 10, "{s:?}");
    assert!(s.op(Op::Write).bytes >= 40960, "{s:?}");
    assert!(s.op(Op::Read).errors >= 1, "{s:?}");
}

#[test]
fn a_request_answered_later_counts_the_time_until_its_answer() {
    use std::sync::Arc;

    use crate::filters::delay::{Config, Delay};
    use crate::slots::Engine;
    use crate::targets::NullTarget;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("4.metrics");
    let guard = install_file(&path, false).unwrap();
    // A timer on the ring: the reads are answered by a later wakeup, whose
    // clock read is what their latency ends at.
    let spec = "delay:read=20ms".parse().unwrap();
    let t = Delay::new(
        Arc::new(NullTarget::new(1 << 20)),
        Config::parse(&spec).unwrap(),
    )
    .unwrap();
    let mut e = Engine::new(&t, 4096).unwrap();
    for i in 0..3u64 {
        e.run_in_place(&t, Request::new(Op::Read, i * 4096, 4096))
            .unwrap();
    }
    drop(e);
    drop(guard);
    // Other tests' slots may add to the file while it is installed: at least ours.
    let s = Snapshot::read(&path).unwrap().unwrap();
    assert!(s.op(Op::Read).requests >= 3, "{s:?}");
    assert!(s.op(Op::Read).sum_ns >= 3 * 20_000_000, "{s:?}");
}
