//! The whole transmission path: a real `Server` on a Unix socket, fed
//! arbitrary request bytes by a real client connection.
//!
//! Once per process, a server starts over a 1 MiB `MemTarget` with 8 slots
//! of one page, so larger reads and writes take the grown-buffer path
//! (scripts/fuzz.sh allows 16 KiB inputs here, so writes can be large too).
//! For each input the harness connects, negotiates structured replies,
//! `base:allocation` and `GO`, sends the input as transmission data from a
//! second thread while it reads replies, closes its sending side, and reads
//! until EOF. Then it checks:
//!
//! - the server answered within 5 s and hung up (no hang), and did not crash
//!   (a panic in any server thread aborts the process);
//! - the replies are well-formed structured chunks, each the answer the
//!   protocol gives to a request that was sent (matched by cookie): the
//!   error `command` chose, the read's data at its offset, block status in
//!   whole blocks covering at most the range asked for;
//! - when the input is a clean conversation (it ends between requests or
//!   with `NBD_CMD_DISC`), every request got exactly one reply;
//! - read data equals what a byte-array model of the disk holds, and no
//!   block status extent marked `STATE_ZERO` covers data in the model. The
//!   model follows every write, trim and write-zeroes the server carried out
//!   (the `MemTarget` finishes requests inline, in the order they arrive);
//! - a fresh connection still negotiates and disconnects, and afterwards no
//!   connection thread is left running.
//!
//! Requests are split and judged with `transmission::command` as the server
//! does (its own correctness is `nbd_request`'s job); the state of the disk
//! carries over from input to input, as it would for a real client.
#![no_main]

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rustix::io::Errno;
use rustix::net::SendFlags;
use userblk::nbd::proto::*;
use userblk::nbd::server::handshake::{Negotiated, BASE_ALLOCATION_ID};
use userblk::nbd::server::transmission::{command, Command, Header, Limits, MAX_PAYLOAD};
use userblk::nbd::server::{Listen, Server, ServerOptions};
use userblk::targets::MemTarget;
use userblk::{Op, Target};
use userblk_fuzz::replies::{self, Chunk};
use userblk_fuzz::seeds::SERVER_SIZE;
use userblk_fuzz::wire::{self, EXPORT_NAME};

/// Longest the server may stay silent before it counts as hung.
const TIMEOUT: Duration = Duration::from_secs(5);

struct Fixture {
    sock: PathBuf,
    server: Server,
    limits: Limits,
    /// What the disk holds, as far as the requests sent so far say.
    disk: Mutex<Vec<u8>>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // scripts/fuzz.sh points TMPDIR at a directory it removes afterwards.
        let dir = std::env::temp_dir().join(format!("userblk-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the socket directory");
        let sock = dir.join("nbd.sock");
        let target = Arc::new(MemTarget::new(SERVER_SIZE).expect("MemTarget"));
        let limits = Limits::new(target.caps());
        let mut opts = ServerOptions::new(vec![Listen::Unix(sock.clone())]);
        opts.export_name = EXPORT_NAME.into();
        opts.depth = 8;
        opts.buf_bytes = 4096;
        opts.handshake_timeout = TIMEOUT;
        let server = Server::start(target, opts).expect("starting the server");
        Fixture {
            sock,
            server,
            limits,
            disk: Mutex::new(vec![0; SERVER_SIZE as usize]),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let fix = fixture();
    let mut disk = fix.disk.lock().unwrap_or_else(|p| p.into_inner());
    let (sent, clean) = walk(data, &fix.limits, &mut disk);
    drop(disk);
    let s = connect(fix);
    let (received, reset) = exchange(&s, data);
    check_replies(&sent, clean && !reset, &received, reset);
    still_alive(fix);
});

/// One request as the server will see it, and what its reply must say.
#[derive(Debug)]
struct Sent {
    h: Header,
    cmd: Result<Command, u32>,
    /// For a read carried out: hash of the data it must return.
    data: Option<u64>,
    /// For block status: which 512-byte blocks of the range hold only zeroes.
    zero_blocks: Vec<bool>,
}

/// Split the input as the server does, judge each request as it will, and
/// apply to `disk` what it will carry out. Returns the requests and whether
/// the conversation is clean (ends between requests or with a disconnect,
/// so that every request must get its reply).
fn walk(data: &[u8], limits: &Limits, disk: &mut [u8]) -> (Vec<Sent>, bool) {
    let neg = Negotiated {
        structured: true,
        base_allocation: true,
        block_size_agreed: true,
        ..Negotiated::default()
    };
    let mut sent = Vec::new();
    let mut p = data;
    loop {
        let Some((raw, rest)) = p.split_first_chunk::<REQUEST_LEN>() else {
            return (sent, true);
        };
        let Some(h) = Header::parse(raw) else {
            return (sent, false);
        };
        if h.payload_len() > MAX_PAYLOAD {
            return (sent, false);
        }
        let cmd = command(&h, &neg, limits);
        if cmd == Ok(Command::Disconnect) {
            return (sent, true);
        }
        let Some((payload, rest)) = rest.split_at_checked(h.payload_len() as usize) else {
            // The client went away in the middle of the write's data.
            return (sent, false);
        };
        p = rest;
        let mut read = None;
        let mut zero_blocks = Vec::new();
        if let Ok(Command::BlockStatus { offset, len, .. }) = cmd {
            let range = offset as usize..(offset + u64::from(len)) as usize;
            zero_blocks = disk[range]
                .chunks(512)
                .map(|b| b.iter().all(|&x| x == 0))
                .collect();
        }
        if let Ok(Command::Io(req)) = cmd {
            let range = req.offset as usize..(req.offset + u64::from(req.len)) as usize;
            match req.op {
                Op::Read => read = Some(hash(&disk[range])),
                Op::Write => disk[range].copy_from_slice(payload),
                Op::Discard | Op::WriteZeroes => disk[range].fill(0),
                Op::Flush => {}
            }
        }
        sent.push(Sent {
            h,
            cmd,
            data: read,
            zero_blocks,
        });
    }
}

fn hash(b: &[u8]) -> u64 {
    let mut s = DefaultHasher::new();
    b.hash(&mut s);
    s.finish()
}

/// Connect and negotiate as `wire::transmission_prefix` says, checking
/// every reply on the way.
fn connect(fix: &Fixture) -> UnixStream {
    let mut s = UnixStream::connect(&fix.sock).expect("the server no longer accepts connections");
    s.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    s.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
    let mut hello = [0u8; 18];
    read_exact(&mut s, &mut hello, "greeting");
    assert_eq!(&hello[..8], &NBDMAGIC.to_be_bytes(), "greeting");
    send_all(&s, &wire::transmission_prefix());
    let ack = opt_reply(&mut s, OPT_STRUCTURED_REPLY);
    assert_eq!(ack.0, REP_ACK, "structured replies refused: {ack:?}");
    let ctx = opt_reply(&mut s, OPT_SET_META_CONTEXT);
    let mut want = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    want.extend_from_slice(BASE_ALLOCATION.as_bytes());
    assert_eq!(ctx, (REP_META_CONTEXT, want), "meta context");
    assert_eq!(opt_reply(&mut s, OPT_SET_META_CONTEXT).0, REP_ACK);
    let mut export = None;
    loop {
        let (kind, d) = opt_reply(&mut s, OPT_GO);
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_INFO, "GO refused: {d:02x?}");
        if d.starts_with(&INFO_EXPORT.to_be_bytes()) {
            export = Some(d);
        }
    }
    let export = export.expect("GO without INFO_EXPORT");
    assert_eq!(&export[2..10], &SERVER_SIZE.to_be_bytes(), "export size");
    let flags = u16::from_be_bytes([export[10], export[11]]);
    assert_ne!(
        flags & FLAG_SEND_DF,
        0,
        "structured replies without SEND_DF"
    );
    s
}

/// One option reply to `opt`: (type, data).
fn opt_reply(s: &mut UnixStream, opt: u32) -> (u32, Vec<u8>) {
    let mut b = vec![0u8; replies::OPT_REPLY_HEADER];
    read_exact(s, &mut b, option_name(opt));
    let len = u32::from_be_bytes(replies::field(&b, 16)) as usize;
    assert!(
        len <= 64 << 10,
        "{}: option reply of {len} bytes",
        option_name(opt)
    );
    b.resize(b.len() + len, 0);
    read_exact(s, &mut b[replies::OPT_REPLY_HEADER..], option_name(opt));
    let r = replies::opt_reply(&mut &b[..])
        .unwrap_or_else(|e| panic!("{}: {e}", option_name(opt)))
        .expect("a whole reply");
    assert_eq!(r.opt, opt, "reply to another option: {r:?}");
    (r.kind, r.data.to_vec())
}

fn read_exact(s: &mut UnixStream, b: &mut [u8], what: &str) {
    if let Err(e) = s.read_exact(b) {
        panic!("handshake, {what}: {e} (server hung or hung up)");
    }
}

/// Send everything, as the server does (no SIGPIPE: libFuzzer's `main`
/// leaves it at its default, which would kill the process). Stops quietly
/// if the server hung up, which it may do after a protocol error.
fn send_all(s: &UnixStream, mut b: &[u8]) {
    while !b.is_empty() {
        match rustix::net::send(s, b, SendFlags::NOSIGNAL) {
            Ok(n) => b = &b[n..],
            Err(Errno::INTR) => {}
            Err(Errno::PIPE | Errno::CONNRESET) => return,
            Err(Errno::AGAIN) => panic!("the server read nothing for {TIMEOUT:?}: hung"),
            Err(e) => panic!("send: {e}"),
        }
    }
}

/// Send `data` from a second thread, close the sending side, and read
/// until EOF. Returns the bytes received and whether the server reset the
/// connection (which can cut the last reply short).
fn exchange(s: &UnixStream, data: &[u8]) -> (Vec<u8>, bool) {
    std::thread::scope(|scope| {
        scope.spawn(|| {
            send_all(s, data);
            let _ = s.shutdown(Shutdown::Write);
        });
        let mut got = Vec::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut reader = s;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return (got, false),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return (got, true),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!(
                        "no reply and no EOF for {TIMEOUT:?} after {} bytes: the server hung",
                        got.len()
                    )
                }
                Err(e) => panic!("reading replies: {e}"),
            }
        }
    })
}

fn check_replies(sent: &[Sent], clean: bool, received: &[u8], reset: bool) {
    let mut pending: Vec<&Sent> = sent.iter().collect();
    let mut rest = received;
    loop {
        let c = match replies::chunk(&mut rest) {
            Ok(Some(c)) => c,
            Ok(None) => break,
            // Only a reset connection may cut a reply short.
            Err(_) if reset => break,
            Err(e) => panic!("reply stream: {e}; requests {sent:?}"),
        };
        assert_eq!(c.flags, REPLY_FLAG_DONE, "chunk flags of {:?}", Brief(&c));
        let mut why = Vec::new();
        // Cookies may repeat: the reply answers the first request it fits.
        let found = pending
            .iter()
            .position(|s| s.h.cookie == c.cookie && fits(s, &c).map_err(|e| why.push(e)).is_ok());
        match found {
            Some(i) => {
                pending.remove(i);
            }
            None => panic!(
                "reply {:?} answers no request sent: {why:?}; pending {pending:?}",
                Brief(&c)
            ),
        }
    }
    if clean {
        assert!(pending.is_empty(), "requests never answered: {pending:?}");
    }
}

/// A chunk without its (possibly large) payload, for messages.
struct Brief<'a>(&'a Chunk<'a>);

impl std::fmt::Debug for Brief<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = self.0;
        let head = &c.payload[..c.payload.len().min(32)];
        write!(
            f,
            "chunk type {} cookie {:#x} len {} starting {head:02x?}",
            c.kind,
            c.cookie,
            c.payload.len()
        )
    }
}

/// Whether `c` is a possible reply to `s`.
fn fits(s: &Sent, c: &Chunk<'_>) -> Result<(), String> {
    let p = c.payload;
    if c.kind == REPLY_TYPE_ERROR {
        if p.len() < 6 {
            return Err(format!("error chunk of {} bytes", p.len()));
        }
        let err = u32::from_be_bytes(replies::field(p, 0));
        let mlen = usize::from(u16::from_be_bytes(replies::field(p, 4)));
        if mlen != p.len() - 6 || err == 0 {
            return Err(format!(
                "error chunk {err} with message length {mlen} of {}",
                p.len() - 6
            ));
        }
        return match s.cmd {
            Err(e) if e == err => Ok(()),
            Err(e) => Err(format!("error {err}, expected {e}")),
            // The MemTarget fails nothing `command` let through.
            Ok(c) => Err(format!("error {err} for {c:?}")),
        };
    }
    let want = |kind: u16| {
        if c.kind == kind {
            Ok(())
        } else {
            Err(format!(
                "chunk type {}, expected {kind} for {:?}",
                c.kind, s.cmd
            ))
        }
    };
    match s.cmd {
        Err(e) => Err(format!("success chunk for a request refused with {e}")),
        Ok(Command::Disconnect) => Err("reply to a disconnect".into()),
        Ok(Command::Nothing) => want(REPLY_TYPE_NONE).and_then(|()| empty(p)),
        Ok(Command::BlockStatus { len, one, .. }) => {
            want(REPLY_TYPE_BLOCK_STATUS)?;
            block_status(p, len, one, &s.zero_blocks)
        }
        Ok(Command::Io(req)) if req.op == Op::Read && c.kind == REPLY_TYPE_OFFSET_HOLE => {
            // A read of 64 KiB or more wholly in zeroes may be one hole
            // chunk (the server's HOLE_CHECK_MIN), unless DF forbids it.
            if req.len < 64 * 1024 || s.h.flags & CMD_FLAG_DF != 0 {
                return Err(format!(
                    "hole chunk for {req:?} with flags {:#x}",
                    s.h.flags
                ));
            }
            if p.len() != 12 {
                return Err(format!("hole chunk of {} bytes", p.len()));
            }
            let offset = u64::from_be_bytes(replies::field(p, 0));
            let size = u32::from_be_bytes(replies::field(p, 8));
            if offset != req.offset || size != req.len {
                return Err(format!("hole {offset}+{size} for a read of {req:?}"));
            }
            if s.data != Some(hash(&vec![0u8; req.len as usize])) {
                return Err(format!(
                    "hole chunk for {}+{}, which holds data",
                    req.offset, req.len
                ));
            }
            Ok(())
        }
        Ok(Command::Io(req)) if req.op == Op::Read => {
            want(REPLY_TYPE_OFFSET_DATA)?;
            if p.len() != 8 + req.len as usize {
                return Err(format!(
                    "{} bytes of read data, expected {}",
                    p.len() - 8.min(p.len()),
                    req.len
                ));
            }
            let offset = u64::from_be_bytes(replies::field(p, 0));
            if offset != req.offset {
                return Err(format!("read data at {offset}, expected {}", req.offset));
            }
            if s.data != Some(hash(&p[8..])) {
                return Err(format!(
                    "read of {}+{} returned other data than was written",
                    req.offset, req.len
                ));
            }
            Ok(())
        }
        Ok(Command::Io(_)) => want(REPLY_TYPE_NONE).and_then(|()| empty(p)),
    }
}

fn empty(p: &[u8]) -> Result<(), String> {
    if p.is_empty() {
        Ok(())
    } else {
        Err(format!("{} bytes of payload on a NONE chunk", p.len()))
    }
}

/// A `base:allocation` block status payload for a request of `len` bytes,
/// whose 512-byte blocks hold only zeroes where `zero_blocks` says so: an
/// extent marked `STATE_ZERO` must not cover data (clients such as
/// `qemu-img convert` skip reading it).
fn block_status(p: &[u8], len: u32, one: bool, zero_blocks: &[bool]) -> Result<(), String> {
    if p.len() < 12 || !(p.len() - 4).is_multiple_of(8) {
        return Err(format!("block status payload of {} bytes", p.len()));
    }
    let id = u32::from_be_bytes(replies::field(p, 0));
    if id != BASE_ALLOCATION_ID {
        return Err(format!("block status for context {id}"));
    }
    let extents = (p.len() - 4) / 8;
    if one && extents != 1 {
        return Err(format!("{extents} extents with REQ_ONE"));
    }
    let mut total = 0u64;
    for e in p[4..].chunks_exact(8) {
        let l = u32::from_be_bytes(replies::field(e, 0));
        let flags = u32::from_be_bytes(replies::field(e, 4));
        if l == 0 || !l.is_multiple_of(512) || flags & !(STATE_HOLE | STATE_ZERO) != 0 {
            return Err(format!("extent of {l} bytes with flags {flags:#x}"));
        }
        let blocks = (total / 512) as usize..((total + u64::from(l)) / 512) as usize;
        total += u64::from(l);
        if total > u64::from(len) {
            break;
        }
        if flags & STATE_ZERO != 0 && !zero_blocks[blocks.clone()].iter().all(|&z| z) {
            return Err(format!(
                "extent {blocks:?} (512-byte blocks) says zero but holds data"
            ));
        }
    }
    if total > u64::from(len) {
        return Err(format!(
            "extents cover {total} bytes of a {len}-byte request"
        ));
    }
    Ok(())
}

/// A new connection negotiates and disconnects cleanly, and no connection
/// thread outlives its connection.
fn still_alive(fix: &Fixture) {
    let s = connect(fix);
    let mut disc = Vec::new();
    wire::request(&mut disc, CMD_DISC, 0, 0, 0, 0);
    let (got, _) = exchange(&s, &disc);
    assert!(got.is_empty(), "reply to a disconnect: {got:02x?}");
    drop(s);
    let counters = fix.server.counters();
    let deadline = Instant::now() + TIMEOUT;
    while counters.open.load(Ordering::Relaxed) != 0 {
        assert!(
            Instant::now() < deadline,
            "a connection thread is still running after {TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_micros(50));
    }
}
