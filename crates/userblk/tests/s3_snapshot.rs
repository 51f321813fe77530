//! Snapshots and clones of the s3 target against a real S3 server (s3s-fs
//! on loopback; skipped without it): a snapshot never changes whatever its
//! volume writes, clones read their parents until they write their own,
//! clones of clones, tombstones hide what is below, a shrink and a grow
//! after a snapshot read zeroes, a version 1 volume upgrades, and a clone
//! whose parent is gone fails with the reason.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

#[allow(dead_code)] // the nbdkit half is for the conformance suite
#[path = "common/servers.rs"]
mod servers;
mod skip;

use std::path::Path;
use std::time::Duration;

use servers::S3sFs as Server;
use userblk::slots::Engine;
use userblk::targets::s3::layout::{FORMAT_V1, FORMAT_VERSION, TOMBSTONE_LEN};
use userblk::targets::s3::{snapshots, Manifest, S3Options, S3Store, S3Target, MANIFEST_KEY};
use userblk::{Op, Request, Target};

const BUCKET: &str = "vol";
const MIB: u64 = 1 << 20;

macro_rules! server_or_skip {
    () => {
        match Server::start(BUCKET) {
            Some(s) => s,
            None => return,
        }
    };
}

fn store(server: &Server, prefix: &str) -> S3Store {
    S3Store::new(&servers::s3_config(&server.endpoint(), BUCKET, prefix)).unwrap()
}

fn options(server: &Server, prefix: &str, cache: &Path) -> S3Options {
    let mut o = S3Options::new(
        servers::s3_config(&server.endpoint(), BUCKET, prefix),
        cache.into(),
    );
    o.chunk_size = Some(MIB);
    o.writeback_delay = Duration::from_secs(600);
    // s3s-fs: its conditional writes are not atomic (lease/probe.rs).
    o.lease = userblk::targets::s3::LeaseMode::Host;
    o
}

fn open(server: &Server, prefix: &str, cache: &Path, size: Option<u64>) -> S3Target {
    let mut o = options(server, prefix, cache);
    o.size = size;
    S3Target::open(o).unwrap()
}

fn open_snapshot(server: &Server, prefix: &str, name: &str, cache: &Path) -> S3Target {
    let mut o = options(server, prefix, cache);
    o.snapshot = Some(name.into());
    S3Target::open(o).unwrap()
}

fn run(t: &S3Target, op: Op, off: u64, data: &mut [u8]) -> Result<u32, rustix::io::Errno> {
    let mut e = Engine::new(t, 4 << 20).unwrap();
    let len = u32::try_from(data.len()).unwrap();
    e.run(t, Request::new(op, off, len), data)
}

fn write(t: &S3Target, off: u64, len: u64, byte: u8) {
    let mut d = vec![byte; usize::try_from(len).unwrap()];
    assert_eq!(
        run(t, Op::Write, off, &mut d),
        Ok(u32::try_from(len).unwrap())
    );
}

fn flush(t: &S3Target) {
    assert_eq!(run(t, Op::Flush, 0, &mut []), Ok(0));
}

/// What each MiB chunk of the first `n` reads as, if it is one byte throughout.
fn chunks(t: &S3Target, n: u64) -> Vec<Option<u8>> {
    (0..n)
        .map(|i| {
            let mut d = vec![0u8; MIB as usize];
            assert_eq!(run(t, Op::Read, i * MIB, &mut d), Ok(MIB as u32));
            d.iter().all(|&b| b == d[0]).then_some(d[0])
        })
        .collect()
}

fn objects(server: &Server, prefix: &str) -> Vec<(String, u64)> {
    store(server, prefix).list("chunks").unwrap()
}

#[test]
fn snapshots_keep_their_content_and_clones_read_their_parents() {
    let server = server_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let c = |n: &str| tmp.path().join(n);
    let t = open(&server, "golden", &c("g"), Some(4 * MIB));
    for (i, b) in [1u8, 2, 3, 4].iter().enumerate() {
        write(&t, i as u64 * MIB, MIB, *b);
    }
    let s1 = t.snapshot("s1").unwrap();
    assert_eq!((s1.epoch, s1.device_size), (0, 4 * MIB));
    assert_eq!(
        t.snapshot("s1").unwrap_err().to_string(),
        "the volume has a snapshot named \"s1\" already"
    );
    // After the snapshot: new data, a zeroed chunk (a tombstone hides the
    // snapshot's), a discard.
    write(&t, 0, MIB, 9);
    write(&t, MIB, MIB, 0);
    let mut e = Engine::new(&t, 4 << 20).unwrap();
    let discard = Request::new(Op::Discard, 2 * MIB, MIB as u32);
    assert!(e.run(&t, discard, &mut []).is_ok());
    drop(e);
    flush(&t);
    let objs = objects(&server, "golden");
    assert!(
        objs.iter()
            .any(|(k, s)| k.ends_with("0000000000000001.0000000000000001") && *s == TOMBSTONE_LEN),
        "{objs:?}"
    );
    assert_eq!(chunks(&t, 4), [Some(9), Some(0), Some(0), Some(4)]);
    let snap = open_snapshot(&server, "golden", "s1", &c("s1"));
    assert_eq!(chunks(&snap, 4), [Some(1), Some(2), Some(3), Some(4)]);
    assert!(snap.caps().read_only);
    let mut d = vec![7u8; 4096];
    // Refused before the target (a read-only device's writes fail with EIO).
    assert_eq!(run(&snap, Op::Write, 0, &mut d), Err(rustix::io::Errno::IO));
    drop(snap);

    // A clone of s1: the parent's bytes, then its own, apart from the golden.
    let m =
        snapshots::clone_volume(&store(&server, "golden"), "s1", &store(&server, "c1")).unwrap();
    assert_eq!(m.parents.len(), 1);
    assert!(objects(&server, "c1").is_empty(), "a clone copies nothing");
    let c1 = open(&server, "c1", &c("c1"), None);
    assert_eq!(c1.size(), 4 * MIB);
    assert_eq!(chunks(&c1, 4), [Some(1), Some(2), Some(3), Some(4)]);
    write(&c1, 2 * MIB, MIB, 0xc1);
    write(&c1, 3 * MIB, MIB, 0);
    flush(&c1);
    assert_eq!(chunks(&c1, 4), [Some(1), Some(2), Some(0xc1), Some(0)]);
    assert_eq!(chunks(&t, 4), [Some(9), Some(0), Some(0), Some(4)]);
    // Clone of the clone, taken while the first clone is open.
    c1.snapshot("c1s").unwrap();
    write(&c1, 0, MIB, 0xee);
    flush(&c1);
    snapshots::clone_volume(&store(&server, "c1"), "c1s", &store(&server, "c2")).unwrap();
    drop(c1);
    let c2 = open(&server, "c2", &c("c2"), None);
    assert_eq!(chunks(&c2, 4), [Some(1), Some(2), Some(0xc1), Some(0)]);
    drop(c2);
    // Reopened with fresh caches, everything reads the same.
    let c1 = open(&server, "c1", &c("c1b"), None);
    assert_eq!(chunks(&c1, 4), [Some(0xee), Some(2), Some(0xc1), Some(0)]);
    drop(c1);
    drop(t);
    let t = open(&server, "golden", &c("g2"), None);
    assert_eq!(chunks(&t, 4), [Some(9), Some(0), Some(0), Some(4)]);
    drop(t);
    // Listing and deleting.
    let names: Vec<String> = snapshots::list(&store(&server, "golden"))
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["s1"]);
    snapshots::delete(&store(&server, "golden"), "s1").unwrap();
    assert!(snapshots::list(&store(&server, "golden"))
        .unwrap()
        .is_empty());
    let e = snapshots::clone_volume(&store(&server, "golden"), "s1", &store(&server, "c3"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no snapshot \"s1\""), "{e}");
    // A deleted snapshot's clones still read it (gc keeps what they see).
    let c2 = open(&server, "c2", &c("c2b"), None);
    assert_eq!(chunks(&c2, 4), [Some(1), Some(2), Some(0xc1), Some(0)]);
}

#[test]
fn a_parent_gone_is_named_and_a_clone_is_refused_where_a_volume_is() {
    let server = server_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let t = open(&server, "p", &tmp.path().join("p"), Some(2 * MIB));
    write(&t, 0, MIB, 5);
    t.snapshot("base").unwrap();
    drop(t);
    snapshots::clone_volume(&store(&server, "p"), "base", &store(&server, "k")).unwrap();
    let e = snapshots::clone_volume(&store(&server, "p"), "base", &store(&server, "k"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds a volume already"), "{e}");
    let e = snapshots::clone_volume(&store(&server, "p"), "nope", &store(&server, "k2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no snapshot \"nope\""), "{e}");
    // The parent deleted without gc.
    store(&server, "p").delete(MANIFEST_KEY).unwrap();
    let e = S3Target::open(options(&server, "k", &tmp.path().join("k")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("parent at prefix \"p\" has no manifest"), "{e}");
    // A new volume at the parent's prefix is not the parent.
    drop(open(&server, "p", &tmp.path().join("p2"), Some(2 * MIB)));
    let e = S3Target::open(options(&server, "k", &tmp.path().join("k")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds another volume"), "{e}");
}

#[test]
fn a_version_1_volume_serves_then_upgrades_at_its_first_snapshot() {
    let server = server_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let t = open(&server, "old", &tmp.path().join("a"), Some(2 * MIB));
    write(&t, 0, MIB, 1);
    flush(&t);
    drop(t);
    // Rewrite its manifest as the first format did.
    let s = store(&server, "old");
    let mut v: serde_json::Value =
        serde_json::from_slice(&s.get(MANIFEST_KEY).unwrap().unwrap()).unwrap();
    v["format_version"] = FORMAT_V1.into();
    v.as_object_mut().unwrap().remove("epoch");
    s.put(MANIFEST_KEY, serde_json::to_vec(&v).unwrap().into())
        .unwrap();
    let t = open(&server, "old", &tmp.path().join("a"), None);
    assert_eq!(chunks(&t, 2), [Some(1), Some(0)]);
    write(&t, MIB, MIB, 2);
    flush(&t);
    let m = Manifest::decode(&s.get(MANIFEST_KEY).unwrap().unwrap()).unwrap();
    assert_eq!(m.format_version, FORMAT_V1, "writes alone keep version 1");
    t.snapshot("first").unwrap();
    let m = Manifest::decode(&s.get(MANIFEST_KEY).unwrap().unwrap()).unwrap();
    assert_eq!((m.format_version, m.epoch), (FORMAT_VERSION, 1));
    write(&t, 0, MIB, 3);
    flush(&t);
    drop(t);
    let snap = open_snapshot(&server, "old", "first", &tmp.path().join("s"));
    assert_eq!(chunks(&snap, 2), [Some(1), Some(2)]);
    // A newer format than this build knows is refused with the reason.
    v["format_version"] = 3.into();
    s.put(MANIFEST_KEY, serde_json::to_vec(&v).unwrap().into())
        .unwrap();
    let e = S3Target::open(options(&server, "old", &tmp.path().join("b")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("format version 3 is not supported"), "{e}");
}

#[test]
fn a_shrink_and_grow_after_a_snapshot_read_zeroes_and_the_snapshot_keeps_its_end() {
    let server = server_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let t = open(&server, "rs", &tmp.path().join("a"), Some(4 * MIB));
    for i in 0..4 {
        write(&t, i * MIB, MIB, 0x10 + i as u8);
    }
    t.snapshot("full").unwrap();
    assert_eq!(userblk::resize::apply(&t, 2 * MIB, true).unwrap(), 2 * MIB);
    assert_eq!(userblk::resize::apply(&t, 4 * MIB, false).unwrap(), 4 * MIB);
    assert_eq!(chunks(&t, 4), [Some(0x10), Some(0x11), Some(0), Some(0)]);
    // Written and zeroed again past the old end: still zeroes, not the
    // snapshot's bytes.
    write(&t, 3 * MIB, MIB, 0x77);
    flush(&t);
    write(&t, 3 * MIB, MIB, 0);
    flush(&t);
    drop(t);
    let t = open(&server, "rs", &tmp.path().join("b"), None);
    assert_eq!(chunks(&t, 4), [Some(0x10), Some(0x11), Some(0), Some(0)]);
    drop(t);
    let snap = open_snapshot(&server, "rs", "full", &tmp.path().join("s"));
    assert_eq!(
        chunks(&snap, 4),
        [Some(0x10), Some(0x11), Some(0x12), Some(0x13)]
    );
}

#[test]
fn a_snapshot_of_a_volume_being_written_is_one_point_of_its_writes() {
    let server = server_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let mut o = options(&server, "live", &tmp.path().join("a"));
    o.size = Some(8 * MIB);
    // Uploads run all along, as on a busy volume.
    o.writeback_delay = Duration::ZERO;
    let t = S3Target::open(o).unwrap();
    const WRITES: u64 = 1500;
    let acked = std::sync::atomic::AtomicU64::new(0);
    let (before, after) = std::thread::scope(|s| {
        s.spawn(|| {
            // Write n into block n, one at a time: the n-th write is
            // acknowledged before the (n+1)-th starts.
            for n in 1..=WRITES {
                let mut d: Vec<u8> = std::iter::repeat_n((n as u32).to_le_bytes(), 1024)
                    .flatten()
                    .collect();
                assert_eq!(run(&t, Op::Write, n * 4096, &mut d), Ok(4096));
                acked.store(n, std::sync::atomic::Ordering::SeqCst);
            }
        });
        while acked.load(std::sync::atomic::Ordering::SeqCst) < WRITES / 3 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let before = acked.load(std::sync::atomic::Ordering::SeqCst);
        t.snapshot("mid").unwrap();
        let after = acked.load(std::sync::atomic::Ordering::SeqCst);
        (before, after)
    });
    drop(t);
    let snap = open_snapshot(&server, "live", "mid", &tmp.path().join("s"));
    let mut d = vec![0u8; 8 * MIB as usize];
    for (i, part) in d.chunks_mut(MIB as usize).enumerate() {
        assert_eq!(run(&snap, Op::Read, i as u64 * MIB, part), Ok(MIB as u32));
    }
    let block = |n: u64| {
        let b = &d[n as usize * 4096..][..4096];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    };
    // The snapshot holds writes 1..=k, in full, and none after k.
    let k = (1..=WRITES).take_while(|&n| block(n) == n as u32).count() as u64;
    assert!(
        (1..=WRITES).skip(k as usize).all(|n| block(n) == 0),
        "writes after {k} leaked in"
    );
    assert!(
        before <= k && k <= after,
        "snapshot at write {k}, taken between acknowledgements {before} and {after}"
    );
    assert!(
        after < WRITES,
        "the writer ended before the snapshot: nothing was tested"
    );
}
