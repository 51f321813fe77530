//! The targets that serve ublk zero copy (null, mem), run on the host with
//! an ordinary buffer registered where the kernel would put a request's
//! pages: the same fixed-buffer ring operations, without ublk.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use crate::filters::{build, Env, Spec};
use crate::slots::Engine;
use crate::target::FixedEntry;
use crate::targets::{MemTarget, NullTarget};
use crate::{Op, Request, Target};

const LEN: usize = 16384;

fn pattern(seed: u8) -> Vec<u8> {
    (0..LEN)
        .map(|i| u8::try_from(i % 251).unwrap() ^ seed)
        .collect()
}

#[test]
fn null_zero_copy_reads_are_zeroes_and_writes_move_nothing() {
    let t = NullTarget::new(1 << 20);
    assert!(t.data_on_ring_only());
    let mut e = FixedEntry::new(LEN);
    e.bytes().fill(0xaa);
    let write = Request::new(Op::Write, 4096, 8192);
    assert_eq!(e.run(&t, write), Ok(8192));
    assert!(
        e.bytes().iter().all(|&b| b == 0xaa),
        "a write left the data alone"
    );
    // A read shorter than the entry zeroes just its own bytes.
    assert_eq!(e.run(&t, Request::new(Op::Read, 0, 8192)), Ok(8192));
    assert!(e.bytes()[..8192].iter().all(|&b| b == 0));
    assert!(e.bytes()[8192..].iter().all(|&b| b == 0xaa));
    let flush = Request::new(Op::Flush, 0, 0);
    assert_eq!(e.run(&t, flush), Ok(0));
}

#[test]
fn null_without_zero_fill_leaves_reads_alone_in_both_modes() {
    let t = NullTarget::without_zero_fill(1 << 20);
    assert!(t.data_on_ring_only());
    assert_eq!(t.describe()["zero_fill"], false);
    let read = Request::new(Op::Read, 0, 4096);
    let mut e = FixedEntry::new(LEN);
    e.bytes().fill(0x5c);
    assert_eq!(e.run(&t, read), Ok(4096));
    assert!(e.bytes().iter().all(|&b| b == 0x5c));
    // With buffers too: the read returns what the buffer held, here the
    // data of the write before it (the zero-filling target zeroes it).
    let mut buf = vec![0x77u8; 4096];
    let write = Request::new(Op::Write, 8192, 4096);
    for (target, left) in [(&t, 0x77), (&NullTarget::new(1 << 20), 0)] {
        let mut eng = Engine::new(target, 4096).unwrap();
        buf.fill(0x77);
        assert_eq!(eng.run(target, write, &mut buf), Ok(4096));
        buf.fill(0x11);
        assert_eq!(eng.run(target, read, &mut buf), Ok(4096));
        assert!(buf.iter().all(|&b| b == left));
    }
    // And block status no longer claims zeroes.
    assert!(!t.reads_zeroes(0, 4096).unwrap());
    assert!(NullTarget::new(1 << 20).reads_zeroes(0, 4096).unwrap());
}

#[test]
fn mem_zero_copy_writes_and_reads_the_memfd() {
    let t = MemTarget::new(4 << 20).unwrap();
    assert!(t.data_on_ring_only());
    let mut e = FixedEntry::new(LEN);
    let data = pattern(3);
    e.bytes().copy_from_slice(&data);
    assert_eq!(
        e.run(&t, Request::new(Op::Write, 1 << 20, 16384)),
        Ok(16384)
    );
    // Back through zero copy.
    e.bytes().fill(0xee);
    assert_eq!(e.run(&t, Request::new(Op::Read, 1 << 20, 16384)), Ok(16384));
    assert_eq!(e.bytes(), &data[..]);
    // A hole reads as zeroes.
    assert_eq!(e.run(&t, Request::new(Op::Read, 2 << 20, 4096)), Ok(4096));
    assert!(e.bytes()[..4096].iter().all(|&b| b == 0));
    // The same data through the copying path, and the other way round.
    let mut eng = Engine::new(&t, LEN).unwrap();
    let mut buf = vec![0u8; LEN];
    assert_eq!(
        eng.run(&t, Request::new(Op::Read, 1 << 20, 16384), &mut buf),
        Ok(16384)
    );
    assert_eq!(buf, data);
    let other = pattern(9);
    buf.copy_from_slice(&other);
    assert_eq!(
        eng.run(&t, Request::new(Op::Write, 0, 16384), &mut buf),
        Ok(16384)
    );
    assert_eq!(e.run(&t, Request::new(Op::Read, 0, 16384)), Ok(16384));
    assert_eq!(e.bytes(), &other[..]);
    // Discard (no data) is served inline as before.
    assert_eq!(e.run(&t, Request::new(Op::Discard, 0, 16384)), Ok(0));
    assert_eq!(e.run(&t, Request::new(Op::Read, 0, 4096)), Ok(4096));
    assert!(e.bytes()[..4096].iter().all(|&b| b == 0));
}

#[test]
fn pass_through_filters_over_mem_keep_zero_copy_working() {
    let mem: Arc<dyn Target> = Arc::new(MemTarget::new(4 << 20).unwrap());
    let specs: Vec<Spec> = [
        "offset:offset=1M",
        "stats",
        "error:rate=0",
        "delay:read=1ms",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let t = build(Arc::clone(&mem), &specs, &Env::default()).unwrap();
    assert!(t.data_on_ring_only());
    let mut e = FixedEntry::new(LEN);
    let data = pattern(5);
    e.bytes().copy_from_slice(&data);
    assert_eq!(e.run(&*t, Request::new(Op::Write, 8192, 8192)), Ok(8192));
    e.bytes().fill(0);
    assert_eq!(e.run(&*t, Request::new(Op::Read, 8192, 8192)), Ok(8192));
    assert_eq!(&e.bytes()[..8192], &data[..8192]);
    // The offset filter moved it 1 MiB into the memfd.
    let mut eng = Engine::new(&*mem, LEN).unwrap();
    let mut buf = vec![0u8; 8192];
    assert_eq!(
        eng.run(
            &*mem,
            Request::new(Op::Read, (1 << 20) + 8192, 8192),
            &mut buf
        ),
        Ok(8192)
    );
    assert_eq!(buf, data[..8192]);
}
