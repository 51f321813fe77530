//! The s3 target under zero copy on the host: requests whose data is a
//! registered buffer, as ublk's `AUTO_BUF_REG` gives them, against a real
//! S3 server (s3s-fs on loopback; skipped without it). Cached reads and
//! writes, misses a worker fetches first, a partial write over a chunk only
//! the bucket has, FUA and flushes, pins held while the ring operation is
//! in flight, eviction, and a reopen from the bucket alone.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{lock, S3Options, S3Target};
use crate::skip::{require, Prereq};
use crate::slots::Engine;
use crate::target::FixedEntry;
use crate::targets::s3::{chunk_key, Credentials, RetryPolicy, S3Config};
use crate::{Flags, Op, Request, Submit, Target};

const MIB: u64 = 1 << 20;
const LEN: usize = 256 << 10;
const LEN32: u32 = 256 << 10;
const BUCKET: &str = "zcbucket";
const PREFIX: &str = "vol";
/// The fixed test credentials of tests/s3/server.sh (loopback only).
const KEY: &str = "userblk-test-key";
const SECRET: &str = "userblk-test-secret";

/// s3s-fs serving a temporary directory on a loopback port; killed when dropped.
struct Server {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Server {
    /// `None` (a skip reported) when s3s-fs is not installed.
    fn start() -> Option<Server> {
        let bin = std::env::var_os("S3S_FS").map_or_else(
            || {
                let root = std::env::var_os("S3S_FS_ROOT").unwrap_or_else(|| "/opt/s3s-fs".into());
                PathBuf::from(root).join("bin/s3s-fs")
            },
            PathBuf::from,
        );
        let why = "s3s-fs not installed (run tests/s3/server.sh install)";
        if !require(bin.is_file(), Prereq::CiInstalls, why) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(BUCKET)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", KEY, "--secret-key", SECRET])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut server = Server { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(server.child.try_wait().unwrap().is_none(), "s3s-fs exited");
            assert!(Instant::now() < deadline, "s3s-fs did not listen in 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    /// Whether the bucket has chunk `i`'s object.
    fn has(&self, i: u64) -> bool {
        let key = format!("{PREFIX}/{}", chunk_key(i));
        self.dir.path().join(BUCKET).join(key).exists()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An 8 MiB volume in 1 MiB chunks, cached in `cache`, uploaded only when flushed.
fn open(server: &Server, cache: &Path) -> S3Target {
    let mut c = S3Config::new(BUCKET, PREFIX);
    c.endpoint = Some(format!("http://127.0.0.1:{}", server.port));
    c.credentials = Some(Credentials {
        access_key_id: KEY.into(),
        secret_access_key: SECRET.into(),
        session_token: None,
    });
    c.retry = RetryPolicy {
        max_retries: 2,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        budget: Duration::from_secs(3),
    };
    let mut o = S3Options::new(c, cache.into());
    o.size = Some(8 * MIB);
    o.chunk_size = Some(MIB);
    o.writeback_delay = Duration::from_secs(600);
    // s3s-fs: its conditional writes are not atomic (lease/probe.rs).
    o.lease = crate::targets::s3::LeaseMode::Host;
    S3Target::open(o).unwrap()
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..LEN)
        .map(|i| u8::try_from(i % 251).unwrap() ^ seed)
        .collect()
}

/// `len` bytes at `off` through the copying path.
fn copied(t: &S3Target, off: u64, len: usize) -> Vec<u8> {
    let mut e = Engine::new(t, len).unwrap();
    let mut buf = vec![0x55; len];
    let req = Request::new(Op::Read, off, u32::try_from(len).unwrap());
    assert_eq!(e.run(t, req, &mut buf), Ok(req.len));
    buf
}

fn fetched(t: &S3Target) -> u64 {
    t.status()["counters"]["fetched"].as_u64().unwrap()
}

#[test]
fn zero_copy_reads_and_writes_hit_and_miss_and_uploads_keep_their_rules() {
    let Some(server) = Server::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = open(&server, &tmp.path().join("a"));
    assert!(t.data_on_ring_only());
    let mut e = FixedEntry::new(LEN);
    let a = pattern(1);
    let at = 2 * MIB + (64 << 10);
    let read = Request::new(Op::Read, at, LEN32);

    // Part of chunk 2, neither cached nor in the bucket: a worker makes it
    // ready (zeroes), then the bytes go from the entry to the cache file.
    e.bytes().copy_from_slice(&a);
    assert_eq!(e.run(&t, Request::new(Op::Write, at, LEN32)), Ok(LEN32));
    e.bytes().fill(0);
    assert_eq!(e.run(&t, read), Ok(LEN32));
    assert_eq!(e.bytes(), &a[..]);
    assert_eq!(copied(&t, at, LEN), a, "the copying path reads the same");
    assert!(copied(&t, 2 * MIB, 64 << 10).iter().all(|&b| b == 0));
    assert!(!server.has(2), "uploaded before any flush");

    // While the read's ring operation is in flight its chunk is pinned:
    // eviction leaves it alone. Afterwards it can go.
    let outcome = e.start(&t, read);
    assert_eq!(outcome, Submit::Pending);
    assert_eq!(lock(&t.core.state).table.chunk(2).pins, 1);
    t.core.flush(None).unwrap();
    t.core.evict(2);
    assert!(
        lock(&t.core.state).table.chunk(2).resident,
        "evicted under a read"
    );
    assert_eq!(e.finish(&t, read, outcome), Ok(LEN32));
    assert_eq!(e.bytes(), &a[..]);
    assert_eq!(lock(&t.core.state).table.chunk(2).pins, 0);
    assert!(server.has(2), "the flush uploaded the zero-copy write");

    // A write in flight holds a writer's pin, the chunk dirty on record
    // before its bytes move: eviction leaves it alone, and an upload
    // waits until the bytes landed, so the flush that completes after it
    // sent them.
    let c = pattern(3);
    e.bytes().copy_from_slice(&c);
    let write = Request::new(Op::Write, at, LEN32);
    let outcome = e.start(&t, write);
    assert_eq!(outcome, Submit::Pending);
    {
        let st = lock(&t.core.state);
        let chunk = st.table.chunk(2);
        assert!(chunk.writers == 1 && chunk.dirty(), "{chunk:?}");
    }
    t.core.evict(2);
    assert!(
        lock(&t.core.state).table.chunk(2).resident,
        "evicted under a write"
    );
    let core = std::sync::Arc::clone(&t.core);
    let flush = std::thread::spawn(move || core.flush(Some(2..=2)));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !flush.is_finished(),
        "a flush finished under a write in flight"
    );
    assert_eq!(e.finish(&t, write, outcome), Ok(LEN32));
    assert_eq!(flush.join().unwrap(), Ok(()));
    assert!(!lock(&t.core.state).table.chunk(2).dirty());

    // Part of chunk 5, which is not cached: made ready, then written.
    e.bytes().copy_from_slice(&pattern(2));
    let write = Request::new(Op::Write, 5 * MIB, LEN32);
    assert_eq!(e.run(&t, write), Ok(LEN32));
    assert_eq!(lock(&t.core.state).table.chunk(5).writers, 0);

    // A flush (no data; a worker's under zero copy) uploads it.
    assert_eq!(e.run(&t, Request::new(Op::Flush, 0, 0)), Ok(0));
    assert!(server.has(5));
    assert_eq!(t.status()["dirty_chunks"], 0);

    // Evicted, chunk 2 misses: a worker fetches it from the bucket into
    // the cache (the bytes of the write that was in flight at the
    // upload), then the read goes from there to the entry.
    t.core.evict(2);
    assert!(!lock(&t.core.state).table.chunk(2).resident);
    let before = fetched(&t);
    e.bytes().fill(0);
    assert_eq!(e.run(&t, read), Ok(LEN32));
    assert_eq!(e.bytes(), &c[..]);
    assert_eq!(fetched(&t), before + 1);

    // A FUA write of part of evicted chunk 5: fetched, written over in
    // the cache, and in the bucket before it completes.
    t.core.evict(5);
    e.bytes()[..4096].fill(0xee);
    let fua = Request::new(Op::Write, 5 * MIB + 4096, 4096).with_flags(Flags::FUA);
    assert_eq!(e.run(&t, fua), Ok(4096));
    assert_eq!(t.status()["dirty_chunks"], 0, "FUA left the chunk dirty");
    let mut b = pattern(2);
    b[4096..8192].fill(0xee);
    assert_eq!(copied(&t, 5 * MIB, LEN), b);
    drop(t);

    // A fresh cache: everything from the bucket, read with zero copy.
    let t = open(&server, &tmp.path().join("b"));
    e.bytes().fill(0);
    assert_eq!(e.run(&t, read), Ok(LEN32));
    assert_eq!(e.bytes(), &c[..]);
    assert_eq!(e.run(&t, Request::new(Op::Read, 5 * MIB, LEN32)), Ok(LEN32));
    assert_eq!(e.bytes(), &b[..]);
    // Discard and write-zeroes under zero copy go as before.
    let zeroes = Request::new(Op::WriteZeroes, 5 * MIB, 8192);
    assert_eq!(e.run(&t, zeroes), Ok(0));
    assert!(copied(&t, 5 * MIB, 8192).iter().all(|&b| b == 0));
}

#[test]
fn a_layer_answering_early_does_not_leave_chunks_pinned() {
    let Some(server) = Server::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = open(&server, &tmp.path().join("a"));
    let mut e = FixedEntry::new(LEN);
    // Not zeroes: an all-zero chunk would have no object to look for.
    e.bytes().copy_from_slice(&pattern(4));
    let write = Request::new(Op::Write, 0, LEN32);
    assert_eq!(e.run(&t, write), Ok(LEN32));
    // The write's ring operation, whose completion never reaches the
    // target (as when a filter above answers first).
    let outcome = e.start(&t, write);
    assert_eq!(outcome, Submit::Pending);
    assert_eq!(lock(&t.core.state).table.chunk(0).writers, 1);
    e.reap_unseen();
    // The slot's next request, even one without data, lets the pins go,
    // so it can upload.
    assert_eq!(e.run(&t, Request::new(Op::Flush, 0, 0)), Ok(0));
    assert_eq!(lock(&t.core.state).table.chunk(0).writers, 0);
    assert_eq!(lock(&t.core.state).table.chunk(0).pins, 0);
    assert!(server.has(0));
    let read = Request::new(Op::Read, 4 * MIB, 4096);
    assert_eq!(e.run(&t, read), Ok(4096));
}
