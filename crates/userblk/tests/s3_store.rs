//! The s3 store and layout against a real S3 server: s3s-fs on loopback,
//! one per test, on a free port with a temporary data directory.
//!
//! The binary comes from `tests/s3/server.sh install`; it is looked for at
//! `$S3S_FS`, then `${S3S_FS_ROOT:-/opt/s3s-fs}/bin/s3s-fs`. Without it each
//! test reports a skip (see tests/skip) and returns.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

#[allow(dead_code)] // the nbdkit half is for the conformance suite
#[path = "common/servers.rs"]
mod servers;
mod skip;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use userblk::targets::s3::{
    chunk_key, decode_chunk, encode_chunk, layout, ChunkProblem, Credentials, Geometry,
    LayoutError, Lease, Manifest, S3Config, S3Store, StoreError, VolumeId, LEASE_KEY, MANIFEST_KEY,
};

const BUCKET: &str = "vol";
const PREFIX: &str = "tests/volume1";

use servers::{free_port, S3sFs as Server, ACCESS_KEY, SECRET_KEY};

impl Server {
    fn config(&self) -> S3Config {
        config_for(&self.endpoint())
    }

    fn store(&self) -> S3Store {
        S3Store::new(&self.config()).unwrap()
    }

    /// Where s3s-fs keeps the object `{PREFIX}/{key}`.
    fn object_file(&self, key: &str) -> PathBuf {
        self.dir
            .path()
            .join("data")
            .join(BUCKET)
            .join(PREFIX)
            .join(key)
    }
}

macro_rules! server_or_skip {
    () => {
        match Server::start(BUCKET) {
            Some(s) => s,
            None => return,
        }
    };
}

fn config_for(endpoint: &str) -> S3Config {
    servers::s3_config(endpoint, BUCKET, PREFIX)
}

#[test]
fn put_get_range_list_delete() {
    let srv = server_or_skip!();
    let s = srv.store();
    s.check().unwrap();
    assert_eq!(s.get("missing").unwrap(), None);
    assert_eq!(s.get_range("missing", 0..4).unwrap(), None);
    assert!(s.list("").unwrap().is_empty());

    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    s.put("chunks/0000000000000002", Bytes::from(data.clone()))
        .unwrap();
    s.put("chunks/0000000000000001", Bytes::from_static(b"one"))
        .unwrap();
    s.put(MANIFEST_KEY, Bytes::from_static(b"{}")).unwrap();
    // The key really is under the prefix on the server.
    assert!(srv.object_file("chunks/0000000000000001").is_file());

    assert_eq!(
        s.get("chunks/0000000000000002").unwrap().unwrap(),
        Bytes::from(data.clone())
    );
    assert_eq!(
        s.get_range("chunks/0000000000000002", 1000..1010)
            .unwrap()
            .unwrap(),
        &data[1000..1010]
    );
    // Overwrite replaces.
    s.put("chunks/0000000000000001", Bytes::from_static(b"uno"))
        .unwrap();
    assert_eq!(
        s.get("chunks/0000000000000001").unwrap().unwrap(),
        &b"uno"[..]
    );

    assert_eq!(
        s.list("chunks").unwrap(),
        vec![
            ("chunks/0000000000000001".to_owned(), 3),
            ("chunks/0000000000000002".to_owned(), 100_000),
        ]
    );
    let all: Vec<String> = s.list("").unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        all,
        [
            "chunks/0000000000000001",
            "chunks/0000000000000002",
            MANIFEST_KEY
        ]
    );

    s.delete("chunks/0000000000000001").unwrap();
    assert_eq!(s.get("chunks/0000000000000001").unwrap(), None);
    // Deleting what is not there is fine.
    s.delete("chunks/0000000000000001").unwrap();
    s.delete("never-existed").unwrap();
    assert_eq!(s.list("chunks").unwrap().len(), 1);

    assert!(matches!(
        s.get("bad//key"),
        Err(StoreError::InvalidKey { .. })
    ));
}

#[test]
fn manifest_write_read_validate() {
    let srv = server_or_skip!();
    let s = srv.store();
    let g = Geometry::new(64 << 20, 1 << 20).unwrap();
    let m = Manifest::new(g, VolumeId::random().unwrap(), layout::unix_now());
    s.put(MANIFEST_KEY, Bytes::from(m.encode().unwrap()))
        .unwrap();
    let back = Manifest::decode(&s.get(MANIFEST_KEY).unwrap().unwrap()).unwrap();
    assert_eq!(back, m);
    back.check_matches(Some(64 << 20), Some(1 << 20)).unwrap();
    assert!(matches!(
        back.check_matches(Some(128 << 20), None),
        Err(LayoutError::SizeMismatch { .. })
    ));
}

#[test]
fn chunk_checksum_detects_corruption() {
    let srv = server_or_skip!();
    let s = srv.store();
    let vol = VolumeId::random().unwrap();
    let g = Geometry::new(4 << 20, 1 << 20).unwrap();
    let payload: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 256) as u8).collect();
    let key = chunk_key(3);
    s.put(&key, Bytes::from(encode_chunk(vol, 3, &payload).unwrap()))
        .unwrap();
    let got = s.get(&key).unwrap().unwrap();
    assert_eq!(decode_chunk(&got, vol, 3, g.chunk_len(3)).unwrap(), payload);

    // Damage the stored object behind the server's back (bit rot).
    let file = srv.object_file(&key);
    let mut raw = std::fs::read(&file).unwrap();
    raw[500_000] ^= 0x01;
    std::fs::write(&file, &raw).unwrap();
    let got = s.get(&key).unwrap().unwrap();
    match decode_chunk(&got, vol, 3, g.chunk_len(3)) {
        Err(LayoutError::Chunk {
            index: 3,
            problem: ChunkProblem::ChecksumMismatch { .. },
        }) => {}
        other => panic!("corruption not detected: {other:?}"),
    }

    // A truncated upload.
    let full = encode_chunk(vol, 3, &payload).unwrap();
    s.put(&key, Bytes::copy_from_slice(&full[..full.len() / 2]))
        .unwrap();
    let got = s.get(&key).unwrap().unwrap();
    assert!(matches!(
        decode_chunk(&got, vol, 3, g.chunk_len(3)),
        Err(LayoutError::Chunk {
            problem: ChunkProblem::Truncated { .. },
            ..
        })
    ));
}

#[test]
fn put_if_absent_is_exclusive() {
    let srv = server_or_skip!();
    let s = srv.store();
    let vol = VolumeId::random().unwrap();
    let mine = Lease::for_this_process(vol);
    let mut theirs = mine.clone();
    theirs.host = "other-host".into();

    assert!(s
        .put_if_absent(LEASE_KEY, Bytes::from(mine.encode().unwrap()))
        .unwrap());
    assert!(!s
        .put_if_absent(LEASE_KEY, Bytes::from(theirs.encode().unwrap()))
        .unwrap());
    // The refused create left the first holder's lease in place.
    let held = Lease::decode(&s.get(LEASE_KEY).unwrap().unwrap()).unwrap();
    assert_eq!(held, mine);
    s.delete(LEASE_KEY).unwrap();
    assert!(s
        .put_if_absent(LEASE_KEY, Bytes::from(theirs.encode().unwrap()))
        .unwrap());
}

#[test]
fn check_reports_unreachable_endpoint_quickly() {
    // Nothing listens on a port we just freed: connection refused.
    let port = free_port();
    let s = S3Store::new(&config_for(&format!("http://127.0.0.1:{port}"))).unwrap();
    let start = Instant::now();
    let err = s.check().unwrap_err();
    let took = start.elapsed();
    eprintln!("refused port reported as: {err}");
    assert!(
        matches!(
            err,
            StoreError::Unreachable {
                timed_out: false,
                ..
            }
        ),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(err.to_string().contains("unreachable"), "{err}");
    // Ordinary operations classify the same way.
    assert!(matches!(s.get("k"), Err(StoreError::Unreachable { .. })));
}

#[test]
fn check_reports_timeout_as_unreachable() {
    // Accepts connections, never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().take(16) {
            held.push(c);
        }
    });
    let mut cfg = config_for(&format!("http://127.0.0.1:{port}"));
    cfg.request_timeout = Duration::from_millis(500);
    let s = S3Store::new(&cfg).unwrap();
    let start = Instant::now();
    let err = s.check().unwrap_err();
    eprintln!(
        "silent server reported as: {err} (after {:?})",
        start.elapsed()
    );
    assert!(
        matches!(
            err,
            StoreError::Unreachable {
                timed_out: true,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn check_reports_bad_credentials() {
    let srv = server_or_skip!();
    let mut cfg = srv.config();
    cfg.credentials = Some(Credentials {
        access_key_id: ACCESS_KEY.to_owned(),
        secret_access_key: "wrong-secret".to_owned(),
        session_token: None,
    });
    let s = S3Store::new(&cfg).unwrap();
    let err = s.check().unwrap_err();
    match &err {
        StoreError::BadCredentials { status, code, .. } => {
            assert_eq!(*status, 403);
            assert_eq!(code, "SignatureDoesNotMatch");
        }
        other => panic!("expected BadCredentials, got {other}"),
    }
    // Data operations too, not just the probe; a GET of a missing key must
    // not read as "not found".
    assert!(matches!(s.get("k"), Err(StoreError::BadCredentials { .. })));
    assert!(matches!(
        s.put("k", Bytes::from_static(b"x")),
        Err(StoreError::BadCredentials { .. })
    ));

    cfg.credentials = Some(Credentials {
        access_key_id: "no-such-key".to_owned(),
        secret_access_key: SECRET_KEY.to_owned(),
        session_token: None,
    });
    let err = S3Store::new(&cfg).unwrap().check().unwrap_err();
    assert!(matches!(err, StoreError::BadCredentials { .. }), "{err}");
    eprintln!("unknown access key reported as: {err}");
}

#[test]
fn check_reports_missing_bucket() {
    let srv = server_or_skip!();
    let mut cfg = srv.config();
    cfg.bucket = "no-such-bucket".into();
    let s = S3Store::new(&cfg).unwrap();
    let err = s.check().unwrap_err();
    eprintln!("missing bucket reported as: {err}");
    assert!(matches!(err, StoreError::NoSuchBucket { .. }), "{err}");
    assert!(err.to_string().contains("no-such-bucket"), "{err}");
    assert!(matches!(s.list(""), Err(StoreError::NoSuchBucket { .. })));
    // A GET in a missing bucket must be an error, not an absent object.
    // s3s-fs answers it with NoSuchKey (real S3 says NoSuchBucket), so the
    // real answer comes from the proxy.
    assert_eq!(s.get("k").unwrap(), None);
    let p = proxy(srv.port, vec![response("404 Not Found", "NoSuchBucket")]);
    let s = S3Store::new(&config_for(&format!("http://127.0.0.1:{}", p.port))).unwrap();
    let err = s.get("k").unwrap_err();
    assert!(matches!(err, StoreError::NoSuchBucket { .. }), "{err}");
}

/// A loopback proxy in front of the server that answers the first requests
/// with canned responses, then forwards. Counts requests it answered
/// itself plus connections it forwarded.
struct Proxy {
    port: u16,
    seen: Arc<AtomicUsize>,
}

fn proxy(upstream: u16, canned: Vec<String>) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(AtomicUsize::new(0));
    let canned = Arc::new(Mutex::new(VecDeque::from(canned)));
    let counter = Arc::clone(&seen);
    std::thread::spawn(move || {
        // Bounded: a test makes a handful of connections.
        for conn in listener.incoming().take(64) {
            let Ok(mut client) = conn else { return };
            let canned = Arc::clone(&canned);
            let counter = Arc::clone(&counter);
            std::thread::spawn(move || {
                let Some(head) = read_request(&mut client) else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let reply = canned.lock().unwrap().pop_front();
                if let Some(reply) = reply {
                    let _ = client.write_all(reply.as_bytes());
                    let _ = client.shutdown(Shutdown::Both);
                    return;
                }
                let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    return;
                };
                if server.write_all(&head).is_err() {
                    return;
                }
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut s2);
                    let _ = s2.shutdown(Shutdown::Write);
                });
                let _ = std::io::copy(&mut server, &mut client);
                let _ = client.shutdown(Shutdown::Write);
            });
        }
    });
    Proxy { port, seen }
}

/// Reads one HTTP request (head, plus a Content-Length body).
fn read_request(c: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    loop {
        let n = c.read(&mut byte).ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&byte[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let body_len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + body_len {
                let n = c.read(&mut byte).ok().filter(|&n| n > 0)?;
                buf.extend_from_slice(&byte[..n]);
            }
            return Some(buf);
        }
    }
}

fn response(status: &str, code: &str) -> String {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>canned</Message></Error>"
    );
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn transient_errors_are_retried_permanent_are_not() {
    let srv = server_or_skip!();
    srv.store()
        .put("k", Bytes::from_static(b"payload"))
        .unwrap();
    let via = |p: &Proxy, retries: usize| {
        let mut cfg = config_for(&format!("http://127.0.0.1:{}", p.port));
        cfg.retry.max_retries = retries;
        S3Store::new(&cfg).unwrap()
    };

    // One 503 SlowDown, then the real server: the GET succeeds on retry.
    let p = proxy(srv.port, vec![response("503 Slow Down", "SlowDown")]);
    assert_eq!(via(&p, 2).get("k").unwrap().unwrap(), &b"payload"[..]);
    assert_eq!(p.seen.load(Ordering::SeqCst), 2);

    // 500 and 429 too, in a row, and for a PUT.
    let p = proxy(
        srv.port,
        vec![
            response("500 Internal Server Error", "InternalError"),
            response("429 Too Many Requests", "SlowDown"),
        ],
    );
    via(&p, 3).put("k2", Bytes::from_static(b"v2")).unwrap();
    assert_eq!(p.seen.load(Ordering::SeqCst), 3);
    assert_eq!(srv.store().get("k2").unwrap().unwrap(), &b"v2"[..]);

    // The budget ends retrying: 1 attempt + 2 retries, then the 503 surfaces.
    let p = proxy(
        srv.port,
        (0..10)
            .map(|_| response("503 Slow Down", "SlowDown"))
            .collect(),
    );
    let err = via(&p, 2).get("k").unwrap_err();
    eprintln!("persistent 503 reported as: {err}");
    assert_eq!(err.status(), Some(503), "{err}");
    assert_eq!(p.seen.load(Ordering::SeqCst), 3);

    // A permanent 4xx is not retried.
    let p = proxy(
        srv.port,
        vec![response("400 Bad Request", "InvalidRequest"); 10],
    );
    let err = via(&p, 5).get("k").unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    assert_eq!(p.seen.load(Ordering::SeqCst), 1);
}

// ---- The s3 target over the store: data path, flush, reopen, verification.

use userblk::slots::Engine;
use userblk::targets::s3::{S3Options, S3Target};
use userblk::{Flags, Op, Request};

fn target_opts(server: &Server, cache: &std::path::Path) -> S3Options {
    let mut o = S3Options::new(server.config(), cache.to_path_buf());
    o.size = Some(8 << 20);
    o.chunk_size = Some(1 << 20);
    // Uploads only when asked: what the bucket holds is what flushes put there.
    o.writeback_delay = Duration::from_secs(600);
    // s3s-fs: its conditional writes are not atomic (lease/probe.rs).
    o.lease = userblk::targets::s3::LeaseMode::Host;
    o
}

fn io(
    t: &S3Target,
    e: &mut Engine,
    op: Op,
    off: u64,
    data: &mut [u8],
) -> Result<u32, rustix::io::Errno> {
    let len = data.len() as u32;
    e.run(t, Request::new(op, off, len), data)
}

#[test]
fn target_flush_uploads_and_a_fresh_cache_reads_it_back() {
    let server = server_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let mut pattern: Vec<u8> = (0..(3 << 19)).map(|i| (i * 7 + 3) as u8).collect();
    {
        let t = S3Target::open(target_opts(&server, &tmp.path().join("a"))).unwrap();
        let mut e = Engine::new(&t, 4 << 20).unwrap();
        // 1.5 MiB across chunks 2 and 3, unaligned to them.
        assert_eq!(
            io(&t, &mut e, Op::Write, (2 << 20) + 4096, &mut pattern),
            Ok(3 << 19)
        );
        assert!(
            !server.object_file(&chunk_key(2)).exists(),
            "uploaded before a flush"
        );
        assert_eq!(io(&t, &mut e, Op::Flush, 0, &mut []), Ok(0));
        assert!(server.object_file(&chunk_key(2)).exists());
        assert!(server.object_file(&chunk_key(3)).exists());
        assert!(
            !server.object_file(&chunk_key(0)).exists(),
            "a zero chunk was stored"
        );
        // A FUA write is in the bucket when it completes.
        let mut one = vec![0xabu8; 4096];
        let req = Request::new(Op::Write, 6 << 20, 4096).with_flags(Flags::FUA);
        assert_eq!(e.run(&t, req, &mut one), Ok(4096));
        assert!(server.object_file(&chunk_key(6)).exists());
    }
    let t = S3Target::open(target_opts(&server, &tmp.path().join("b"))).unwrap();
    let mut e = Engine::new(&t, 4 << 20).unwrap();
    let mut back = vec![0u8; 3 << 19];
    assert_eq!(
        io(&t, &mut e, Op::Read, (2 << 20) + 4096, &mut back),
        Ok(3 << 19)
    );
    assert!(
        back == pattern,
        "data differs after a reopen from the bucket"
    );
    let mut zeros = vec![1u8; 4096];
    assert_eq!(io(&t, &mut e, Op::Read, 0, &mut zeros), Ok(4096));
    assert!(zeros.iter().all(|&b| b == 0));
    // Zeroing a whole chunk deletes its object at the next flush.
    let req = Request::new(Op::WriteZeroes, 6 << 20, 1 << 20);
    // 0 bytes moved, as for every op but reads and writes (the conformance
    // suite caught this target answering the length).
    assert_eq!(e.run(&t, req, &mut []), Ok(0));
    assert_eq!(io(&t, &mut e, Op::Flush, 0, &mut []), Ok(0));
    assert!(!server.object_file(&chunk_key(6)).exists());
    pattern.clear();
}

#[test]
fn target_refuses_a_corrupt_chunk_and_a_second_writer() {
    let server = server_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    {
        let t = S3Target::open(target_opts(&server, &tmp.path().join("a"))).unwrap();
        let mut e = Engine::new(&t, 1 << 20).unwrap();
        let mut d = vec![0x5au8; 1 << 20];
        assert_eq!(io(&t, &mut e, Op::Write, 1 << 20, &mut d), Ok(1 << 20));
        assert_eq!(io(&t, &mut e, Op::Flush, 0, &mut []), Ok(0));
        // One writer: a second daemon is refused while this one runs.
        let again = S3Target::open(target_opts(&server, &tmp.path().join("other")));
        let msg = again.map(drop).unwrap_err().to_string();
        assert!(msg.contains("volume is in use"), "{msg}");
    }
    // Flip one payload byte of chunk 1 behind the target's back.
    let f = server.object_file(&chunk_key(1));
    let mut bytes = std::fs::read(&f).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&f, bytes).unwrap();
    let t = S3Target::open(target_opts(&server, &tmp.path().join("fresh"))).unwrap();
    let mut e = Engine::new(&t, 1 << 20).unwrap();
    let mut back = vec![0u8; 4096];
    assert_eq!(
        io(&t, &mut e, Op::Read, 1 << 20, &mut back),
        Err(rustix::io::Errno::IO),
        "a corrupt chunk was served"
    );
    // Other chunks still read.
    assert_eq!(io(&t, &mut e, Op::Read, 0, &mut back), Ok(4096));
}
