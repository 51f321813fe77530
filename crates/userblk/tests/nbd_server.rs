//! The NBD server against a raw client on a real Unix socket: well-formed
//! traffic, and every kind of malformed or hostile input, each answered by
//! the protocol's error reply or a closed connection.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use userblk::nbd::proto::*;
use userblk::nbd::server::transmission::Header;
use userblk::nbd::server::{Listen, Server, ServerOptions};
use userblk::targets::{FileOptions, FileTarget, MemTarget};
use userblk::Target;

const SIZE: u64 = 8 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    server: Option<Server>,
}

fn serve_with(target: Arc<dyn Target>, tweak: impl FnOnce(&mut ServerOptions)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let mut opts = ServerOptions::new(vec![Listen::Unix(sock.clone())]);
    opts.export_name = "disk".into();
    opts.depth = 16;
    tweak(&mut opts);
    let server = Server::start(target, opts).unwrap();
    Fixture {
        _dir: dir,
        sock,
        server: Some(server),
    }
}

fn serve() -> Fixture {
    serve_with(Arc::new(MemTarget::new(SIZE).unwrap()), |_| {})
}

struct Client {
    s: UnixStream,
    structured: bool,
    /// The chunk type of the last structured reply.
    last_kind: u16,
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0; n];
    s.read_exact(&mut b).unwrap();
    b
}

fn opt(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

/// One option reply: (type, data).
fn opt_reply(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let h = read_n(s, 20);
    assert_eq!(&h[..8], &OPT_REPLY_MAGIC.to_be_bytes());
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    (kind, read_n(s, len))
}

fn until_ack(s: &mut UnixStream) -> Vec<(u32, Vec<u8>)> {
    let mut v = Vec::new();
    loop {
        let r = opt_reply(s);
        let done = r.0 == REP_ACK || r.0 & REP_FLAG_ERROR != 0;
        v.push(r);
        if done {
            return v;
        }
    }
}

impl Client {
    fn hello(sock: &PathBuf) -> UnixStream {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let g = read_n(&mut s, 18);
        assert_eq!(&g[..8], &NBDMAGIC.to_be_bytes());
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        s
    }

    /// Connect and GO, optionally with structured replies and base:allocation.
    fn connect(sock: &PathBuf, structured: bool) -> (Client, u16) {
        let mut s = Self::hello(sock);
        if structured {
            opt(&mut s, OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(until_ack(&mut s).last().unwrap().0, REP_ACK);
            let mut d = 4u32.to_be_bytes().to_vec();
            d.extend_from_slice(b"disk");
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            opt(&mut s, OPT_SET_META_CONTEXT, &d);
            let r = until_ack(&mut s);
            assert_eq!(r[0].0, REP_META_CONTEXT);
        }
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        opt(&mut s, OPT_GO, &d);
        let r = until_ack(&mut s);
        assert_eq!(r.last().unwrap().0, REP_ACK, "GO refused: {r:?}");
        let info = r
            .iter()
            .find(|(k, d)| *k == REP_INFO && d[..2] == INFO_EXPORT.to_be_bytes())
            .unwrap();
        assert_eq!(&info.1[2..10], &SIZE.to_be_bytes());
        let flags = u16::from_be_bytes([info.1[10], info.1[11]]);
        (
            Client {
                s,
                structured,
                last_kind: 0,
            },
            flags,
        )
    }

    fn send(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
        let h = Header {
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        let mut b = h.encode().to_vec();
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// The next reply: (cookie, error, read data or block status payload).
    fn reply(&mut self) -> (u64, u32, Vec<u8>) {
        if !self.structured {
            let h = read_n(&mut self.s, 16);
            assert_eq!(&h[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
            let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
            return (cookie, err, Vec::new());
        }
        let h = read_n(&mut self.s, 20);
        assert_eq!(&h[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let flags = u16::from_be_bytes([h[4], h[5]]);
        assert_ne!(flags & REPLY_FLAG_DONE, 0, "one chunk per reply");
        let kind = u16::from_be_bytes([h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let payload = read_n(&mut self.s, len);
        self.last_kind = kind;
        match kind {
            REPLY_TYPE_NONE => (cookie, 0, Vec::new()),
            REPLY_TYPE_OFFSET_DATA => (cookie, 0, payload[8..].to_vec()),
            REPLY_TYPE_OFFSET_HOLE => {
                assert_eq!(payload.len(), 12, "hole chunk payload");
                let n = u32::from_be_bytes(payload[8..12].try_into().unwrap());
                (cookie, 0, vec![0; n as usize])
            }
            REPLY_TYPE_BLOCK_STATUS => (cookie, 0, payload),
            REPLY_TYPE_ERROR => (
                cookie,
                u32::from_be_bytes(payload[..4].try_into().unwrap()),
                Vec::new(),
            ),
            other => panic!("unexpected chunk type {other}"),
        }
    }

    fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        self.send(CMD_WRITE, 0, cookie, offset, data.len() as u32, data);
        let (c, e, _) = self.reply();
        assert_eq!(c, cookie);
        e
    }

    fn read(&mut self, cookie: u64, offset: u64, len: u32) -> (u32, Vec<u8>) {
        self.read_flags(cookie, 0, offset, len)
    }

    fn read_flags(&mut self, cookie: u64, flags: u16, offset: u64, len: u32) -> (u32, Vec<u8>) {
        self.send(CMD_READ, flags, cookie, offset, len, &[]);
        let (c, e, d) = self.reply();
        assert_eq!(c, cookie);
        if !self.structured && e == 0 {
            return (e, read_n(&mut self.s, len as usize));
        }
        (e, d)
    }

    /// True if the server closed the connection (EOF or reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| seed.wrapping_add((i * 7 % 251) as u8))
        .collect()
}

#[test]
fn flags_say_what_mem_supports() {
    let f = serve();
    let (_, flags) = Client::connect(&f.sock, true);
    for want in [
        FLAG_HAS_FLAGS,
        FLAG_SEND_FLUSH,
        FLAG_SEND_FUA,
        FLAG_SEND_TRIM,
        FLAG_SEND_WRITE_ZEROES,
        FLAG_SEND_FAST_ZERO,
        FLAG_CAN_MULTI_CONN,
        FLAG_SEND_CACHE,
        FLAG_SEND_DF,
    ] {
        assert_ne!(flags & want, 0, "flag {want:#x} missing from {flags:#x}");
    }
    assert_eq!(flags & FLAG_READ_ONLY, 0);
}

#[test]
fn data_round_trips_simple_and_structured() {
    let f = serve();
    for structured in [false, true] {
        let (mut c, _) = Client::connect(&f.sock, structured);
        let data = pattern(structured as u8 + 1, 128 * 1024);
        assert_eq!(c.write(1, 1 << 20, &data), 0);
        let (e, back) = c.read(2, 1 << 20, data.len() as u32);
        assert_eq!(e, 0);
        assert_eq!(back, data);
        // FUA write, flush, trim then read zeroes, write-zeroes with NO_HOLE.
        c.send(CMD_WRITE, CMD_FLAG_FUA, 3, 0, 4096, &data[..4096]);
        assert_eq!(c.reply().1, 0);
        c.send(CMD_FLUSH, 0, 4, 0, 0, &[]);
        assert_eq!(c.reply().1, 0);
        c.send(CMD_TRIM, 0, 5, 1 << 20, 65536, &[]);
        assert_eq!(c.reply().1, 0);
        assert_eq!(c.read(6, 1 << 20, 65536).1, vec![0; 65536]);
        c.send(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 7, 0, 4096, &[]);
        assert_eq!(c.reply().1, 0);
        assert_eq!(c.read(8, 0, 4096).1, vec![0; 4096]);
        c.send(CMD_CACHE, 0, 9, 0, 1 << 20, &[]);
        assert_eq!(c.reply().1, 0);
        c.send(CMD_DISC, 0, 10, 0, 0, &[]);
        assert!(c.closed(), "DISC must close the connection");
    }
}

#[test]
fn many_requests_in_flight_get_their_own_replies() {
    let f = serve();
    let (mut c, _) = Client::connect(&f.sock, true);
    // 200 writes pipelined in one go, more than the 16 slots.
    let mut burst = Vec::new();
    for i in 0..200u64 {
        let h = Header {
            flags: 0,
            kind: CMD_WRITE,
            cookie: 1000 + i,
            offset: i * 8192,
            len: 8192,
        };
        burst.extend_from_slice(&h.encode());
        burst.extend_from_slice(&pattern(i as u8, 8192));
    }
    let mut w = c.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&burst).unwrap());
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let (cookie, e, _) = c.reply();
        assert_eq!(e, 0);
        assert!(seen.insert(cookie), "cookie {cookie} answered twice");
    }
    writer.join().unwrap();
    for i in (0..200u64).step_by(37) {
        assert_eq!(c.read(5000 + i, i * 8192, 8192).1, pattern(i as u8, 8192));
    }
}

#[test]
fn bad_requests_get_errors_and_the_connection_survives() {
    let f = serve();
    for structured in [false, true] {
        let (mut c, _) = Client::connect(&f.sock, structured);
        // Unknown command, unknown flag, past the end, unaligned, DF without
        // structured replies, block status without the context.
        c.send(42, 0, 1, 0, 512, &[]);
        assert_eq!(c.reply().1, EINVAL);
        c.send(CMD_READ, 1 << 12, 2, 0, 512, &[]);
        assert_eq!(c.reply().1, EINVAL);
        c.send(CMD_READ, 0, 3, SIZE, 512, &[]);
        assert_eq!(c.reply().1, EINVAL);
        c.send(CMD_READ, 0, 4, u64::MAX - 100, 512, &[]);
        assert_eq!(c.reply().1, EINVAL);
        // A write past the end: refused, and its payload skipped, not taken as requests.
        let junk = vec![0x25; 4096];
        c.send(CMD_WRITE, 0, 5, SIZE - 2048, 4096, &junk);
        assert_eq!(c.reply().1, ENOSPC);
        c.send(CMD_WRITE, 0, 6, 100, 512, &junk[..512]);
        assert_eq!(c.reply().1, EINVAL);
        if !structured {
            c.send(CMD_READ, CMD_FLAG_DF, 7, 0, 512, &[]);
            assert_eq!(c.reply().1, EINVAL);
            c.send(CMD_BLOCK_STATUS, 0, 8, 0, 512, &[]);
            assert_eq!(c.reply().1, EINVAL);
        }
        // Nothing was written by any of that.
        assert_eq!(c.read(9, SIZE - 4096, 4096), (0, vec![0; 4096]));
        assert_eq!(c.read(10, 0, 4096), (0, vec![0; 4096]));
    }
}

#[test]
fn protocol_violations_close_the_connection() {
    let f = serve();
    // Bad request magic.
    let (mut c, _) = Client::connect(&f.sock, false);
    c.s.write_all(&[0xAA; 28]).unwrap();
    assert!(c.closed());
    // A write longer than the protocol's 32 MiB.
    let (mut c, _) = Client::connect(&f.sock, false);
    c.send(CMD_WRITE, 0, 1, 0, 64 << 20, &[]);
    assert!(c.closed());
    // Bad option magic and unknown client flags during the handshake.
    let mut s = Client::hello(&f.sock);
    s.write_all(&[0x55; 16]).unwrap();
    assert!(Client {
        s,
        structured: false,
        last_kind: 0,
    }
    .closed());
    let mut s = UnixStream::connect(&f.sock).unwrap();
    read_n(&mut s, 18);
    s.write_all(&0x8000_0000u32.to_be_bytes()).unwrap();
    assert!(Client {
        s,
        structured: false,
        last_kind: 0,
    }
    .closed());
    // The server still serves.
    let (mut c, _) = Client::connect(&f.sock, true);
    assert_eq!(c.read(1, 0, 512).0, 0);
}

#[test]
fn client_vanishing_mid_write_leaves_data_and_server_intact() {
    let f = serve();
    let (mut c, _) = Client::connect(&f.sock, false);
    assert_eq!(c.write(1, 0, &pattern(9, 65536)), 0);
    // Half of a write's payload, then gone.
    c.send(CMD_WRITE, 0, 2, 0, 65536, &vec![0xEE; 30000]);
    drop(c);
    let (mut c, _) = Client::connect(&f.sock, false);
    assert_eq!(
        c.read(3, 0, 65536).1,
        pattern(9, 65536),
        "a partial write reached the disk"
    );
    // Requests in flight when a client leaves do not take the server down either.
    for i in 0..8u64 {
        c.send(CMD_READ, 0, 10 + i, i * 65536, 65536, &[]);
    }
    drop(c);
    let (mut c, _) = Client::connect(&f.sock, true);
    assert_eq!(c.read(4, 0, 512).0, 0);
}

#[test]
fn unknown_export_and_options_are_refused_politely() {
    let f = serve();
    let mut s = Client::hello(&f.sock);
    let mut d = 5u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"other");
    d.extend_from_slice(&0u16.to_be_bytes());
    opt(&mut s, OPT_GO, &d);
    let r = until_ack(&mut s);
    assert_eq!(r[0].0, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].1).contains("disk"));
    opt(&mut s, 1234, b"xyz");
    assert_eq!(until_ack(&mut s)[0].0, REP_ERR_UNSUP);
    opt(&mut s, OPT_LIST, &[]);
    let r = until_ack(&mut s);
    assert_eq!(r[0].0, REP_SERVER);
    assert_eq!(&r[0].1[4..8], b"disk");
    opt(&mut s, OPT_ABORT, &[]);
    assert_eq!(opt_reply(&mut s).0, REP_ACK);
    assert!(Client {
        s,
        structured: false,
        last_kind: 0,
    }
    .closed());
}

#[test]
fn block_status_reports_holes() {
    let f = serve();
    let (mut c, _) = Client::connect(&f.sock, true);
    assert_eq!(c.write(1, 1 << 20, &pattern(3, 65536)), 0);
    c.send(CMD_BLOCK_STATUS, 0, 2, 0, 4 << 20, &[]);
    let (cookie, e, payload) = c.reply();
    assert_eq!((cookie, e), (2, 0));
    assert_eq!(&payload[..4], &1u32.to_be_bytes());
    let ext: Vec<(u32, u32)> = payload[4..]
        .chunks(8)
        .map(|x| {
            (
                u32::from_be_bytes(x[..4].try_into().unwrap()),
                u32::from_be_bytes(x[4..].try_into().unwrap()),
            )
        })
        .collect();
    let hole = STATE_HOLE | STATE_ZERO;
    assert_eq!(ext[0], (1 << 20, hole), "extents {ext:?}");
    assert_eq!(ext[1].1, 0, "data after the hole: {ext:?}");
    assert!(ext[1].0 >= 65536 && ext[1].0 <= 65536 + 4096, "{ext:?}");
    assert_eq!(ext[2].1, hole);
    assert!(ext.iter().map(|e| u64::from(e.0)).sum::<u64>() <= 4 << 20);
    // REQ_ONE: exactly one extent.
    c.send(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 3, 0, 4 << 20, &[]);
    let (_, _, payload) = c.reply();
    assert_eq!(payload.len(), 4 + 8);
}

#[test]
fn large_reads_of_holes_are_sent_as_hole_chunks() {
    let f = serve();
    let data = pattern(9, 65536);
    let (mut c, _) = Client::connect(&f.sock, true);
    assert_eq!(c.write(1, 1 << 20, &data), 0);
    // All hole: one OFFSET_HOLE chunk, no data on the wire.
    assert_eq!(c.read(2, 0, 1 << 20), (0, vec![0; 1 << 20]));
    assert_eq!(c.last_kind, REPLY_TYPE_OFFSET_HOLE);
    // Data inside: sent as data, and right.
    let (e, got) = c.read(3, (1 << 20) - 65536, 3 * 65536);
    assert_eq!(e, 0);
    assert_eq!(c.last_kind, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(got[..65536], vec![0; 65536][..]);
    assert_eq!(got[65536..131072], data[..]);
    assert_eq!(got[131072..], vec![0; 65536][..]);
    // DF forbids fragments: data, even for a hole.
    assert_eq!(
        c.read_flags(4, CMD_FLAG_DF, 0, 1 << 20),
        (0, vec![0; 1 << 20])
    );
    assert_eq!(c.last_kind, REPLY_TYPE_OFFSET_DATA);
    // Small reads are not worth the lookup.
    assert_eq!(c.read(5, 0, 4096), (0, vec![0; 4096]));
    assert_eq!(c.last_kind, REPLY_TYPE_OFFSET_DATA);
    // Simple replies always carry the data.
    let (mut c, _) = Client::connect(&f.sock, false);
    assert_eq!(c.read(6, 2 << 20, 1 << 20), (0, vec![0; 1 << 20]));
}

/// mem with a 64 KiB limit on trims and write-zeroes, recording the
/// largest one it was given.
struct Capped {
    inner: MemTarget,
    largest: std::sync::atomic::AtomicU32,
    calls: std::sync::atomic::AtomicU32,
}

impl Target for Capped {
    fn caps(&self) -> userblk::Caps {
        let mut c = self.inner.caps();
        for r in [&mut c.discard, &mut c.write_zeroes].into_iter().flatten() {
            r.max_bytes = 65536;
        }
        c
    }
    fn submit(&self, ctx: &mut userblk::Ctx<'_>) -> userblk::Submit {
        use std::sync::atomic::Ordering::Relaxed;
        let req = *ctx.req();
        if matches!(req.op, userblk::Op::Discard | userblk::Op::WriteZeroes) {
            self.largest.fetch_max(req.len, Relaxed);
            self.calls.fetch_add(1, Relaxed);
        }
        self.inner.submit(ctx)
    }
}

#[test]
fn range_ops_are_split_to_the_targets_limit() {
    use std::sync::atomic::Ordering::Relaxed;
    let target = Arc::new(Capped {
        inner: MemTarget::new(SIZE).unwrap(),
        largest: 0.into(),
        calls: 0.into(),
    });
    let f = serve_with(target.clone(), |_| {});
    let (mut c, flags) = Client::connect(&f.sock, true);
    assert_ne!(flags & FLAG_SEND_WRITE_ZEROES, 0);
    let data = pattern(9, 1 << 20);
    assert_eq!(c.write(1, 0, &data), 0);
    // 1 MiB - 8 KiB of zeroes from 4 KiB: 15 whole pieces and a short one.
    c.send(CMD_WRITE_ZEROES, 0, 2, 4096, (1 << 20) - 8192, &[]);
    assert_eq!(c.reply().1, 0);
    assert_eq!(target.largest.load(Relaxed), 65536);
    assert_eq!(target.calls.load(Relaxed), 16);
    let (e, back) = c.read(3, 0, 1 << 20);
    assert_eq!(e, 0);
    assert_eq!(&back[..4096], &data[..4096]);
    assert!(back[4096..(1 << 20) - 4096].iter().all(|&b| b == 0));
    assert_eq!(&back[(1 << 20) - 4096..], &data[(1 << 20) - 4096..]);
    c.send(CMD_TRIM, 0, 4, 0, 4 << 20, &[]);
    assert_eq!(c.reply().1, 0);
    assert_eq!(target.largest.load(Relaxed), 65536);
    assert_eq!(target.calls.load(Relaxed), 16 + 64);
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    std::fs::write(&path, pattern(5, SIZE as usize)).unwrap();
    let t = FileTarget::open(FileOptions {
        path,
        read_only: true,
        buffered: true,
        ..FileOptions::default()
    })
    .unwrap();
    let f = serve_with(Arc::new(t), |_| {});
    let (mut c, flags) = Client::connect(&f.sock, true);
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(flags & FLAG_SEND_TRIM, 0);
    assert_eq!(c.write(1, 0, &[0; 512]), EPERM);
    c.send(CMD_TRIM, 0, 2, 0, 4096, &[]);
    assert_eq!(c.reply().1, EPERM);
    assert_eq!(c.read(3, 0, 4096).1, pattern(5, SIZE as usize)[..4096]);
}

#[test]
fn many_clients_at_once() {
    let f = serve();
    let sock = f.sock.clone();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let (mut c, _) = Client::connect(&sock, t % 2 == 0);
                for i in 0..50u64 {
                    let off = t * (1 << 20) + (i % 16) * 65536;
                    let data = pattern((t * 50 + i) as u8, 65536);
                    assert_eq!(c.write(i * 2, off, &data), 0);
                    assert_eq!(c.read(i * 2 + 1, off, 65536).1, data);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        f.server
            .as_ref()
            .unwrap()
            .counters()
            .connections
            .load(std::sync::atomic::Ordering::Relaxed),
        8
    );
}

#[test]
fn idle_handshakes_time_out_and_connections_are_capped() {
    let f = serve_with(Arc::new(MemTarget::new(SIZE).unwrap()), |o| {
        o.handshake_timeout = Duration::from_millis(500);
        o.max_connections = 2;
    });
    let mut idle = UnixStream::connect(&f.sock).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    read_n(&mut idle, 18);
    let t = Instant::now();
    assert!(Client {
        s: idle,
        structured: false,
        last_kind: 0,
    }
    .closed());
    assert!(t.elapsed() < Duration::from_secs(5));
    let (mut a, _) = Client::connect(&f.sock, false);
    let (mut b, _) = Client::connect(&f.sock, false);
    // A reply proves the server counts the connection as transmitting (it
    // does so after sending the handshake's last reply, which is all that
    // `connect` waits for).
    assert_eq!(a.read(2, 0, 512).0, 0);
    assert_eq!(b.read(2, 0, 512).0, 0);
    let third = UnixStream::connect(&f.sock).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(
        Client {
            s: third,
            structured: false,
            last_kind: 0,
        }
        .closed(),
        "a third connection is refused"
    );
    assert_eq!(a.read(1, 0, 512).0, 0);
    assert_eq!(b.read(1, 0, 512).0, 0);
}

#[test]
fn trickling_handshakes_hit_the_deadline() {
    let f = serve_with(Arc::new(MemTarget::new(SIZE).unwrap()), |o| {
        o.handshake_timeout = Duration::from_millis(1000);
    });
    let mut s = UnixStream::connect(&f.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    read_n(&mut s, 18);
    // Client flags, then an ABORT option, one byte every 150 ms: each read
    // is quick, but the handshake as a whole is not.
    let mut bytes = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
    bytes.extend_from_slice(&OPT_ABORT.to_be_bytes());
    bytes.extend_from_slice(&0u32.to_be_bytes());
    let t = Instant::now();
    let mut cut = false;
    for b in bytes {
        std::thread::sleep(Duration::from_millis(150));
        if s.write_all(&[b]).is_err() {
            cut = true;
            break;
        }
    }
    // 20 bytes take 3 s; the server must hang up after about 1 s.
    let mut buf = [0u8; 64];
    let got = s.read(&mut buf);
    assert!(
        cut || matches!(got, Ok(0) | Err(_)),
        "the trickling client got {got:?} after {:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_millis(3500));
}

#[test]
fn stop_ends_idle_connections_and_removes_the_socket() {
    let mut f = serve();
    let (mut c, _) = Client::connect(&f.sock, false);
    let t = Instant::now();
    f.server.take().unwrap().stop();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(c.closed());
    assert!(!f.sock.exists());
}

#[test]
fn listen_addresses_are_checked() {
    assert!("unix:".parse::<Listen>().is_err());
    assert!("tcp:localhost".parse::<Listen>().is_err());
    assert!("udp:1.2.3.4:5".parse::<Listen>().is_err());
    assert_eq!(
        "tcp:127.0.0.1:0".parse::<Listen>().unwrap(),
        Listen::Tcp("127.0.0.1:0".into())
    );
    // A regular file where the socket should go is not replaced.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    std::fs::write(&p, b"keep").unwrap();
    let t = Arc::new(MemTarget::new(SIZE).unwrap());
    let e =
        Server::start(t.clone(), ServerOptions::new(vec![Listen::Unix(p.clone())])).unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), b"keep");
    // A socket another server listens on is not taken over.
    let f = serve();
    let e = Server::start(
        t.clone(),
        ServerOptions::new(vec![Listen::Unix(f.sock.clone())]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("another server"), "{e}");
    // TCP port 0 reports the real port.
    let s = Server::start(
        t,
        ServerOptions::new(vec!["tcp:127.0.0.1:0".parse().unwrap()]),
    )
    .unwrap();
    let Listen::Tcp(a) = &s.addresses()[0] else {
        panic!("not tcp")
    };
    assert!(!a.ends_with(":0"), "{a}");
    let mut c = std::net::TcpStream::connect(a).unwrap();
    let mut g = [0u8; 8];
    c.read_exact(&mut g).unwrap();
    assert_eq!(g, NBDMAGIC.to_be_bytes());
}

/// Hello and GO on export "disk" of any size: a transmission-phase stream.
fn go_any_size(sock: &PathBuf) -> UnixStream {
    let mut s = Client::hello(sock);
    let mut d = 4u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"disk");
    d.extend_from_slice(&0u16.to_be_bytes());
    opt(&mut s, OPT_GO, &d);
    assert_eq!(until_ack(&mut s).last().unwrap().0, REP_ACK);
    s
}

#[test]
fn idle_connections_do_not_lock_out_a_real_client() {
    let f = serve();
    // Far more idle sockets than there are places for handshakes (64) or
    // for connections (64): none of them sends a byte.
    let idle: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(&f.sock).unwrap())
        .collect();
    let t = Instant::now();
    let (mut c, _) = Client::connect(&f.sock, false);
    assert_eq!(c.write(1, 0, &pattern(3, 4096)), 0);
    assert_eq!(c.read(2, 0, 4096), (0, pattern(3, 4096)));
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the real client waited {:?}",
        t.elapsed()
    );
    // The oldest idle sockets were pushed out to make room.
    let mut first = idle.into_iter().next().unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Its greeting, then end of file (a still-open socket would time out).
    let mut greeting = Vec::new();
    let got = first.read_to_end(&mut greeting);
    assert!(
        matches!(got, Ok(n) if n <= 18),
        "the oldest idle socket is still open: {got:?}"
    );
}

#[test]
fn stalled_large_writes_stay_within_the_payload_budget() {
    const BIG: u32 = 32 << 20;
    const BUDGET: usize = 64 << 20;
    let f = serve_with(Arc::new(MemTarget::new(64 << 20).unwrap()), |o| {
        o.payload_budget = BUDGET;
    });
    let server = f.server.as_ref().unwrap();
    // Each announces a 32 MiB write, sends a little of its data, and stops.
    let stalled: Vec<UnixStream> = (0..16u64)
        .map(|i| {
            let mut s = go_any_size(&f.sock);
            let h = Header {
                flags: 0,
                kind: CMD_WRITE,
                cookie: i,
                offset: 0,
                len: BIG,
            };
            let mut b = h.encode().to_vec();
            b.extend_from_slice(&[7u8; 4096]);
            s.write_all(&b).unwrap();
            s
        })
        .collect();
    // Two writes fit the budget; the other fourteen must wait for it.
    let t = Instant::now();
    while server.payload_bytes().0 < 2 * u64::from(BIG) {
        assert!(t.elapsed() < Duration::from_secs(10), "budget never used");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (now, peak) = server.payload_bytes();
    assert!(peak <= BUDGET as u64, "peak {peak} over the budget");
    assert_eq!(now, 2 * u64::from(BIG));
    // Small requests need no budget: a normal client is served meanwhile.
    let mut c = Client {
        s: go_any_size(&f.sock),
        structured: false,
        last_kind: 0,
    };
    assert_eq!(c.write(1, 1 << 20, &pattern(5, 65536)), 0);
    assert_eq!(c.read(2, 1 << 20, 65536), (0, pattern(5, 65536)));
    // Hanging up gives the budget back.
    drop(stalled);
    let t = Instant::now();
    while server.payload_bytes().0 > 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "budget not returned");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(server.payload_bytes().1 <= BUDGET as u64);
}
