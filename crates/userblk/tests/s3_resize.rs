//! Live resize of the s3 target against a real S3 server (s3s-fs on
//! loopback, as in s3_store.rs; skipped without it): the manifest follows,
//! new chunks read as zeroes, a shrink's data never comes back, a reopen
//! sees the new size.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)] // the nbdkit half is for the conformance suite
#[path = "common/servers.rs"]
mod servers;
mod skip;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use servers::S3sFs as Server;
use userblk::slots::Engine;
use userblk::targets::s3::{
    chunk_key, Lease, Manifest, S3Options, S3Store, S3Target, LEASE_KEY, MANIFEST_KEY,
};
use userblk::{Op, Request, Target};

const BUCKET: &str = "vol";
const PREFIX: &str = "tests/resize";
const MIB: u64 = 1 << 20;

macro_rules! server_or_skip {
    () => {
        match Server::start(BUCKET) {
            Some(s) => s,
            None => return,
        }
    };
}

fn store(server: &Server) -> S3Store {
    S3Store::new(&servers::s3_config(&server.endpoint(), BUCKET, PREFIX)).unwrap()
}

fn object(server: &Server, i: u64) -> PathBuf {
    server
        .dir
        .path()
        .join("data")
        .join(BUCKET)
        .join(PREFIX)
        .join(chunk_key(i))
}

/// Open the volume with cache `cache`; `size` creates it (or must match).
fn open(server: &Server, cache: &Path, size: Option<u64>) -> Result<S3Target, String> {
    let mut o = S3Options::new(
        servers::s3_config(&server.endpoint(), BUCKET, PREFIX),
        cache.into(),
    );
    o.size = size;
    o.chunk_size = Some(MIB);
    // Uploads only when asked: the bucket holds what flushes put there.
    o.writeback_delay = Duration::from_secs(600);
    // s3s-fs: its conditional writes are not atomic (lease/probe.rs).
    o.lease = userblk::targets::s3::LeaseMode::Host;
    S3Target::open(o).map_err(|e| e.to_string())
}

fn manifest_size(server: &Server) -> u64 {
    let b = store(server).get(MANIFEST_KEY).unwrap().unwrap();
    Manifest::decode(&b).unwrap().device_size
}

fn write(t: &S3Target, off: u64, len: u64, byte: u8) {
    let mut e = Engine::new(t, 4 << 20).unwrap();
    let mut d = vec![byte; usize::try_from(len).unwrap()];
    let r = e.run(
        t,
        Request::new(Op::Write, off, u32::try_from(len).unwrap()),
        &mut d,
    );
    assert_eq!(r, Ok(u32::try_from(len).unwrap()), "write at {off}+{len}");
}

fn flush(t: &S3Target) {
    let mut e = Engine::new(t, 4096).unwrap();
    assert_eq!(e.run(t, Request::new(Op::Flush, 0, 0), &mut []), Ok(0));
}

/// Whether `[off, off + len)` reads as `byte` throughout.
fn reads(t: &S3Target, off: u64, len: u64, byte: u8) -> bool {
    let mut e = Engine::new(t, 4 << 20).unwrap();
    let mut d = vec![!byte; usize::try_from(len).unwrap()];
    let r = e.run(
        t,
        Request::new(Op::Read, off, u32::try_from(len).unwrap()),
        &mut d,
    );
    assert_eq!(r, Ok(u32::try_from(len).unwrap()), "read at {off}+{len}");
    d.iter().all(|&b| b == byte)
}

#[test]
fn grow_writes_past_the_old_end_and_a_reopen_sees_it() {
    let server = server_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    // 2.5 MiB: the last chunk is short, and full of data.
    let old = 5 * MIB / 2;
    {
        let t = open(&server, &tmp.path().join("a"), Some(old)).unwrap();
        write(&t, 2 * MIB, MIB / 2, 0xaa);
        flush(&t);
        assert_eq!(userblk::resize::apply(&t, 5 * MIB, false).unwrap(), 5 * MIB);
        assert_eq!(
            manifest_size(&server),
            5 * MIB,
            "the manifest follows before resize answers"
        );
        assert_eq!(t.size(), 5 * MIB);
        assert!(
            reads(&t, old, MIB / 2, 0),
            "the short chunk's new half is zeroes"
        );
        assert!(reads(&t, 3 * MIB, 2 * MIB, 0), "new chunks are holes");
        assert!(!object(&server, 3).exists(), "a new chunk cost an object");
        write(&t, 4 * MIB, MIB / 2, 0xbb);
        flush(&t);
    }
    // A fresh cache (another host) and the same one (recover) agree.
    for cache in ["b", "a"] {
        let t = open(&server, &tmp.path().join(cache), None).unwrap();
        assert_eq!(t.size(), 5 * MIB, "cache {cache}");
        assert!(reads(&t, 2 * MIB, MIB / 2, 0xaa), "cache {cache}");
        assert!(reads(&t, old, MIB / 2, 0), "cache {cache}");
        assert!(reads(&t, 4 * MIB, MIB / 2, 0xbb), "cache {cache}");
        drop(t);
    }
    // The old size on re-open is one clear line, not a silent shrink.
    let e = open(&server, &tmp.path().join("a"), Some(old)).unwrap_err();
    assert!(
        e.contains("size mismatch") && e.contains(&(5 * MIB).to_string()),
        "{e}"
    );
}

#[test]
fn data_past_a_shrink_never_comes_back() {
    let server = server_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let cut = 3 * MIB / 2;
    {
        let t = open(&server, &tmp.path().join("a"), Some(4 * MIB)).unwrap();
        write(&t, 0, 4 * MIB, 0x11);
        flush(&t);
        // Dirty, not uploaded, past the new end: dropped, not uploaded later.
        write(&t, 3 * MIB, MIB, 0x22);
        assert!(
            userblk::resize::apply(&t, cut, false).is_err(),
            "a shrink needs allow_shrink"
        );
        assert_eq!(userblk::resize::apply(&t, cut, true).unwrap(), cut);
        assert_eq!(manifest_size(&server), cut);
        assert!(!object(&server, 2).exists() && !object(&server, 3).exists());
        let mut e = Engine::new(&t, 4096).unwrap();
        let mut d = vec![0u8; 4096];
        assert!(
            e.run(&t, Request::new(Op::Read, cut, 4096), &mut d)
                .is_err(),
            "read past the end"
        );
        assert!(reads(&t, 0, cut, 0x11));
        userblk::resize::apply(&t, 4 * MIB, false).unwrap();
        assert!(reads(&t, 0, cut, 0x11));
        assert!(
            reads(&t, cut, 4 * MIB - cut, 0),
            "the old data is back after a grow"
        );
        // Shrink again, and grow from a fresh open.
        userblk::resize::apply(&t, cut, true).unwrap();
    }
    for cache in ["b", "a"] {
        let t = open(&server, &tmp.path().join(cache), None).unwrap();
        assert_eq!(t.size(), cut, "cache {cache}");
        userblk::resize::apply(&t, 4 * MIB, false).unwrap();
        assert!(reads(&t, 0, cut, 0x11), "cache {cache}");
        assert!(
            reads(&t, cut, 4 * MIB - cut, 0),
            "cache {cache}: data past the cut came back"
        );
        userblk::resize::apply(&t, cut, true).unwrap();
    }
}

#[test]
fn writes_in_flight_during_a_shrink_are_kept_or_refused_never_resurrected() {
    let server = server_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let cut = 5 * MIB / 2;
    let t = open(&server, &tmp.path().join("a"), Some(4 * MIB)).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let t = &t;
        let stop = &stop;
        for w in 0..2u64 {
            s.spawn(move || {
                let mut e = Engine::new(t, 64 << 10).unwrap();
                let mut d = vec![0x33u8; 64 << 10];
                let mut off = w * (64 << 10);
                while !stop.load(Ordering::Relaxed) {
                    // Past the end once the shrink moved it: refused.
                    let _ = e.run(t, Request::new(Op::Write, off, 64 << 10), &mut d);
                    off = (off + (128 << 10)) % (4 * MIB);
                }
            });
        }
        std::thread::sleep(Duration::from_millis(200));
        userblk::resize::apply(t, cut, true).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
    });
    flush(&t);
    userblk::resize::apply(&t, 4 * MIB, false).unwrap();
    assert!(
        reads(&t, cut, 4 * MIB - cut, 0),
        "a write in flight landed past the new end"
    );
    drop(t);
    let t = open(&server, &tmp.path().join("b"), None).unwrap();
    assert!(
        reads(&t, cut, 4 * MIB - cut, 0),
        "the bucket holds data past the old cut"
    );
}

#[test]
fn only_the_lease_holder_resizes() {
    let server = server_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let t = open(&server, &tmp.path().join("a"), Some(4 * MIB)).unwrap();
    // Another host broke the lease.
    let b = store(&server).get(LEASE_KEY).unwrap().unwrap();
    let mut other = Lease::decode(&b).unwrap();
    other.host = "elsewhere".into();
    store(&server)
        .put(LEASE_KEY, other.encode().unwrap().into())
        .unwrap();
    let e = userblk::resize::apply(&t, 8 * MIB, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("elsewhere"), "{e}");
    assert_eq!(manifest_size(&server), 4 * MIB);
    assert_eq!(t.size(), 4 * MIB);
}
