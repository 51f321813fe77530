//! The nbd target against real NBD servers: `nbdkit memory` and `qemu-nbd`
//! over a temp file, on Unix sockets (and TCP once).
//!
//! Requests go through `Engine` (one at a time) or `Slots` (many in flight),
//! the same validate/submit/complete path as the ublk queue loop. Servers
//! are killed and restarted to check reconnecting. A test whose server
//! program is missing prints `SKIP` (see tests/skip) and returns, so the run shows what
//! did not run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{len32, pattern, Dev};
use tempfile::TempDir;
use userblk::nbd::client::NbdUri;
use userblk::nbd::proto;
use userblk::slots::Event;
use userblk::slots::Slots;
use userblk::target::Errno;
use userblk::targets::nbd::{NbdOptions, NbdTarget};
use userblk::{Extent, Flags, IoResult, Op, Request, Target};

// ---- servers ----

use common::servers::installed;

/// Return from the test, visibly, when `program` is missing.
macro_rules! require {
    ($program:expr) => {
        let why = format!("{} is not installed", $program);
        if !common::skip::require(installed($program), common::skip::Prereq::CiInstalls, &why) {
            return;
        }
    };
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    sock: PathBuf,
}

impl Server {
    fn spawn(mut cmd: Command, sock: &Path) -> Server {
        let _ = std::fs::remove_file(sock);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let mut s = Server {
            child,
            sock: sock.to_path_buf(),
        };
        s.wait_ready();
        s
    }

    /// Wait until the socket accepts connections.
    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("the NBD server exited ({status}): {err}");
            }
            if UnixStream::connect(&self.sock).is_ok() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the NBD server did not listen on {}",
                self.sock.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the connection dies without a goodbye.
    fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn nbdkit(sock: &Path, args: &[&str]) -> Server {
    let mut cmd = Command::new("nbdkit");
    cmd.args(["--foreground", "--exit-with-parent", "--unix"])
        .arg(sock)
        .args(args);
    Server::spawn(cmd, sock)
}

/// `nbdkit` with `args`, listening on a socket in a new temp dir.
fn nbdkit_in_temp(args: &[&str]) -> (TempDir, PathBuf, Server) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let srv = nbdkit(&sock, args);
    (dir, sock, srv)
}

fn qemu_nbd(sock: &Path, file: &Path, args: &[&str]) -> Server {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "raw", "--persistent", "--shared=4", "-k"])
        .arg(sock)
        .args(args)
        .arg(file);
    Server::spawn(cmd, sock)
}

fn unix_uri(sock: &Path, export: &str) -> NbdUri {
    NbdUri::parse(&format!("nbd+unix:///{export}?socket={}", sock.display())).unwrap()
}

fn connect(sock: &Path) -> NbdTarget {
    NbdTarget::connect(NbdOptions::new(unix_uri(sock, ""))).unwrap()
}

fn connect_with_timeout(sock: &Path, reconnect: Duration) -> NbdTarget {
    let mut o = NbdOptions::new(unix_uri(sock, ""));
    o.reconnect_timeout = reconnect;
    NbdTarget::connect(o).unwrap()
}

/// A TCP port on 127.0.0.1 that nothing listens on (for the moment).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A temp dir with a socket path and a zero-filled `size`-byte disk image.
fn image(size: u64) -> (TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    std::fs::File::create(&file).unwrap().set_len(size).unwrap();
    let sock = dir.path().join("nbd.sock");
    (dir, sock, file)
}

/// Aborts the test binary if the test it guards runs longer than `limit`:
/// a request that never completes must fail the run, not hang it.
struct Watchdog(Option<std::sync::mpsc::Sender<()>>);

fn watchdog(test: &'static str, limit: Duration) -> Watchdog {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("{test}: still running after {limit:?}; aborting");
            std::process::abort();
        }
    });
    Watchdog(Some(tx))
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

// ---- checks shared by the servers ----

/// Writes of many sizes at many offsets (block-aligned, crossing 1 MiB,
/// at the end) read back byte-exact, and so does the whole device.
fn patterns_round_trip(t: &NbdTarget) {
    let size = t.caps().size;
    let mut dev = Dev::new(t);
    let mut model = vec![0u8; usize::try_from(size).unwrap()];
    let places: [(u64, usize); 10] = [
        (0, 512),
        (512, 4096),
        (4096 - 512, 1024),
        ((1 << 20) - 1536, 8192),
        (3 << 20, 1 << 20),
        (5 * 4096 + 512, 65536 + 512),
        (7 << 20, 128 << 10),
        (size - 4096, 4096),
        (size - (1 << 20), 512),
        (12345 * 512, 3 * 512),
    ];
    for (i, &(off, len)) in places.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        assert_eq!(dev.write(off, &data), Ok(len32(len)), "write {off}+{len}");
        let o = usize::try_from(off).unwrap();
        model[o..o + len].copy_from_slice(&data);
        assert_eq!(dev.read(off, len).unwrap(), data, "read back {off}+{len}");
    }
    // Every earlier write is still intact, and nothing else was touched.
    assert!(dev.read_all() == model, "the device differs from the model");
}

/// Write-zeroes (both kinds) and trim leave zeroes, and only where asked.
fn zeroing_reads_zero(t: &NbdTarget) {
    let caps = t.caps();
    assert!(caps.discard.is_some() && caps.write_zeroes.is_some());
    let mut dev = Dev::new(t);
    let base = 2u64 << 20;
    let data = pattern(99, 1 << 20);
    assert_eq!(dev.write(base, &data), Ok(1 << 20));
    let mut want = data.clone();
    for (off, len, op) in [
        (4096u64, 8192u64, 0),
        (65536, 65536, 1),
        (256 << 10, 128 << 10, 2),
    ] {
        let r = match op {
            0 => dev.write_zeroes(base + off, len, false),
            1 => dev.write_zeroes(base + off, len, true),
            _ => dev.discard(base + off, len),
        };
        assert_eq!(r, Ok(0), "op {op} at {off}+{len}");
        let o = usize::try_from(off).unwrap();
        want[o..o + usize::try_from(len).unwrap()].fill(0);
    }
    assert!(
        dev.read(base, 1 << 20).unwrap() == want,
        "zeroed ranges are wrong"
    );
}

fn flush_and_fua(t: &NbdTarget) {
    let caps = t.caps();
    assert!(caps.volatile_cache && caps.fua, "{caps:?}");
    let mut dev = Dev::new(t);
    let data = pattern(7, 8192);
    assert_eq!(dev.write_flags(1 << 20, &data, Flags::FUA), Ok(8192));
    assert_eq!(dev.flush(), Ok(0));
    assert_eq!(dev.read(1 << 20, 8192).unwrap(), data);
}

// ---- nbdkit memory ----

#[test]
fn nbdkit_memory_caps_follow_the_server() {
    require!("nbdkit");
    let (_dir, sock, _srv) = nbdkit_in_temp(&["memory", "64M"]);
    let t = connect(&sock);
    let caps = t.caps();
    let ex = t.export();
    assert_eq!(ex.size, 64 << 20);
    assert_eq!(caps.size, 64 << 20);
    assert_eq!(caps.logical_block_size, 512);
    assert!(!caps.read_only);
    // nbdkit memory advertises trim and write-zeroes.
    assert!(ex.has(proto::FLAG_SEND_TRIM) && ex.has(proto::FLAG_SEND_WRITE_ZEROES));
    assert!(caps.discard.is_some() && caps.write_zeroes.is_some());
    assert_eq!(caps.volatile_cache, ex.has(proto::FLAG_SEND_FLUSH));
    assert_eq!(caps.fua, ex.has(proto::FLAG_SEND_FUA));
    let max = caps.max_request.unwrap();
    assert!((1 << 20..=32 << 20).contains(&max), "max_request {max}");
    caps.check().unwrap();
    let d = t.describe();
    assert_eq!(d["type"], "nbd");
    assert_eq!(d["size"], 64u64 << 20);
    assert_eq!(d["uri"], unix_uri(&sock, "").to_string());
}

#[test]
fn nbdkit_memory_patterns() {
    require!("nbdkit");
    let (_dir, sock, _srv) = nbdkit_in_temp(&["memory", "64M"]);
    patterns_round_trip(&connect(&sock));
}

#[test]
fn nbdkit_memory_trim_and_write_zeroes() {
    require!("nbdkit");
    let (_dir, sock, _srv) = nbdkit_in_temp(&["memory", "64M"]);
    zeroing_reads_zero(&connect(&sock));
}

#[test]
fn nbdkit_memory_flush_and_fua() {
    require!("nbdkit");
    let (_dir, sock, _srv) = nbdkit_in_temp(&["memory", "64M"]);
    let t = connect(&sock);
    let mut dev = Dev::new(&t);
    // Whatever nbdkit advertises, flush and FUA writes succeed.
    let data = pattern(3, 4096);
    assert_eq!(dev.write_flags(0, &data, Flags::FUA), Ok(4096));
    assert_eq!(dev.flush(), Ok(0));
    assert_eq!(dev.read(0, 4096).unwrap(), data);
}

#[test]
fn nbdkit_readonly_is_a_read_only_device() {
    require!("nbdkit");
    let (_dir, sock, _srv) = nbdkit_in_temp(&["--readonly", "pattern", "1M"]);
    let t = connect(&sock);
    assert!(t.caps().read_only);
    let mut dev = Dev::new(&t);
    assert_eq!(dev.write(0, &[1; 512]), Err(Errno::IO));
    // The pattern plugin: each 8-byte word is its own offset, big-endian.
    let got = dev.read(4096, 16).unwrap_err();
    assert_eq!(got, Errno::IO, "16 bytes is not a whole block");
    let got = dev.read(4096, 512).unwrap();
    assert_eq!(&got[..8], &4096u64.to_be_bytes());
    assert_eq!(&got[504..], &(4096u64 + 504).to_be_bytes());
}

#[test]
fn odd_export_size_is_rounded_down_to_blocks() {
    require!("nbdkit");
    let (_dir, sock, _srv) = nbdkit_in_temp(&["memory", "1048676"]);
    let t = connect(&sock);
    assert_eq!(t.export().size, 1_048_676);
    assert_eq!(t.caps().size, 1 << 20);
    let mut dev = Dev::new(&t);
    assert_eq!(dev.read((1 << 20) - 512, 512).unwrap(), vec![0; 512]);
    assert_eq!(dev.read(1 << 20, 512), Err(Errno::IO));
}

#[test]
fn tcp_uri() {
    require!("nbdkit");
    let port = free_port();
    let mut cmd = Command::new("nbdkit");
    cmd.args([
        "--foreground",
        "--exit-with-parent",
        "--ipaddr",
        "127.0.0.1",
        "--port",
    ])
    .arg(port.to_string())
    .args(["memory", "4M"]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let uri = NbdUri::parse(&format!("nbd://127.0.0.1:{port}/")).unwrap();
    let start = Instant::now();
    let t = loop {
        match NbdTarget::connect(NbdOptions::new(uri.clone())) {
            Ok(t) => break t,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(t.caps().size, 4 << 20);
    let mut dev = Dev::new(&t);
    let data = pattern(11, 65536);
    assert_eq!(dev.write(8192, &data), Ok(65536));
    assert_eq!(dev.read(8192, 65536).unwrap(), data);
    drop(t);
    let _ = child.kill();
    let _ = child.wait();
}

// ---- qemu-nbd over a file ----

#[test]
fn qemu_nbd_caps_follow_the_server() {
    require!("qemu-nbd");
    let (_dir, sock, file) = image(16 << 20);
    let _srv = qemu_nbd(&sock, &file, &[]);
    let t = connect(&sock);
    let caps = t.caps();
    let ex = t.export();
    assert_eq!(caps.size, 16 << 20);
    assert!(!caps.read_only);
    assert_eq!(caps.volatile_cache, ex.has(proto::FLAG_SEND_FLUSH));
    assert!(
        caps.volatile_cache && caps.fua,
        "qemu-nbd has flush and FUA: {caps:?}"
    );
    assert!(caps.discard.is_some() && caps.write_zeroes.is_some());
    // qemu-nbd answers NBD_INFO_BLOCK_SIZE.
    let b = ex.block_sizes.expect("block sizes");
    assert_eq!(caps.logical_block_size, b.min.max(512));
    assert_eq!(caps.max_request, Some(b.max.min(32 << 20)));
}

#[test]
fn qemu_nbd_read_only() {
    require!("qemu-nbd");
    let (_dir, sock, file) = image(1 << 20);
    let _srv = qemu_nbd(&sock, &file, &["--read-only"]);
    let t = connect(&sock);
    assert!(t.caps().read_only);
    assert_eq!(Dev::new(&t).write(0, &[1; 512]), Err(Errno::IO));
}

#[test]
fn qemu_nbd_patterns_reach_the_file() {
    require!("qemu-nbd");
    let (_dir, sock, file) = image(16 << 20);
    let _srv = qemu_nbd(&sock, &file, &[]);
    let t = connect(&sock);
    patterns_round_trip(&t);
    let mut dev = Dev::new(&t);
    let data = pattern(42, 1 << 20);
    assert_eq!(dev.write(5 << 20, &data), Ok(1 << 20));
    assert_eq!(dev.flush(), Ok(0));
    let on_disk = std::fs::read(&file).unwrap();
    assert!(
        on_disk[5 << 20..6 << 20] == data[..],
        "the file does not hold the write"
    );
}

#[test]
fn qemu_nbd_trim_and_write_zeroes() {
    require!("qemu-nbd");
    let (_dir, sock, file) = image(16 << 20);
    // qemu-nbd ignores trims unless told to pass them on.
    let _srv = qemu_nbd(&sock, &file, &["--discard=unmap"]);
    zeroing_reads_zero(&connect(&sock));
}

#[test]
fn qemu_nbd_flush_and_fua() {
    require!("qemu-nbd");
    let (_dir, sock, file) = image(16 << 20);
    let _srv = qemu_nbd(&sock, &file, &[]);
    let t = connect(&sock);
    flush_and_fua(&t);
    let on_disk = std::fs::read(&file).unwrap();
    assert!(on_disk[1 << 20..(1 << 20) + 8192] == pattern(7, 8192)[..]);
}

// ---- block status ----

/// Every hole reads as zeroes, and the extents cover `len` from 0.
fn holes_read_zero(t: &NbdTarget, extents: &[Extent], len: u64) {
    assert_eq!(
        extents.iter().map(|e| e.len).sum::<u64>(),
        len,
        "{extents:?}"
    );
    let mut dev = Dev::new(t);
    let mut pos = 0;
    for e in extents {
        let mut at = pos;
        while e.zero && at < pos + e.len {
            let n = (pos + e.len - at).min(1 << 20);
            let data = dev.read(at, usize::try_from(n).unwrap()).unwrap();
            assert!(data.iter().all(|&b| b == 0), "{e:?} at {pos}: data at {at}");
            at += n;
        }
        pos += e.len;
    }
}

#[test]
fn nbdkit_block_status_finds_holes() {
    require!("nbdkit");
    let (_dir, sock, _srv) = nbdkit_in_temp(&["memory", "64M"]);
    let t = connect(&sock);
    let mut out = Vec::new();
    t.extents(0, 64 << 20, &mut out).unwrap();
    assert_eq!(out, vec![Extent::hole(64 << 20)]);
    let mut dev = Dev::new(&t);
    assert_eq!(dev.write(1 << 20, &pattern(5, 65536)), Ok(65536));
    out.clear();
    t.extents(0, 64 << 20, &mut out).unwrap();
    assert_eq!(out[0], Extent::hole(1 << 20), "{out:?}");
    assert_eq!(out[1], Extent::data(65536), "{out:?}");
    assert!(out[2].hole, "{out:?}");
    holes_read_zero(&t, &out, 64 << 20);
    // A range inside: extents from its start, no further than its end.
    out.clear();
    t.extents((1 << 20) + 32768, 1 << 20, &mut out).unwrap();
    assert_eq!(out[0], Extent::data(32768), "{out:?}");
    assert!(out.iter().map(|e| e.len).sum::<u64>() <= 1 << 20);
    // Trimmed, it is a hole again.
    assert_eq!(dev.discard(1 << 20, 65536), Ok(0));
    out.clear();
    t.extents(0, 64 << 20, &mut out).unwrap();
    assert_eq!(out, vec![Extent::hole(64 << 20)]);
    // The read path never asks the network.
    assert_eq!(t.reads_zeroes(0, 1 << 20), Ok(false));
}

#[test]
fn no_block_status_without_multi_conn() {
    require!("nbdkit");
    // A server for one client may never answer a second connection.
    let (_dir, sock, _srv) = nbdkit_in_temp(&[
        "--filter=multi-conn",
        "memory",
        "8M",
        "multi-conn-mode=disable",
    ]);
    let t = connect(&sock);
    assert!(!t.export().has(proto::FLAG_CAN_MULTI_CONN));
    let mut out = Vec::new();
    t.extents(0, 8 << 20, &mut out).unwrap();
    assert_eq!(out, vec![Extent::data(8 << 20)]);
    patterns_round_trip(&t);
}

#[test]
fn qemu_nbd_block_status_of_a_sparse_file() {
    require!("qemu-nbd");
    let (_dir, sock, file) = image(16 << 20);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(&pattern(9, 1 << 20), 4 << 20).unwrap();
    }
    let _srv = qemu_nbd(&sock, &file, &[]);
    let t = connect(&sock);
    let mut out = Vec::new();
    t.extents(0, 16 << 20, &mut out).unwrap();
    assert_eq!(out[0], Extent::hole(4 << 20), "{out:?}");
    assert_eq!(out[1], Extent::data(1 << 20), "{out:?}");
    assert_eq!(out[2], Extent::hole(11 << 20), "{out:?}");
    holes_read_zero(&t, &out, 16 << 20);
}

// ---- many requests in flight ----

const SLOTS: u16 = 32;
const REGION: usize = 64 << 10;

/// Start requests in `slots`, collecting results; `want` checks reads.
struct Driver {
    slots: Slots,
    events: Vec<Event>,
}

impl Driver {
    fn new(t: &NbdTarget) -> Self {
        Driver {
            slots: Slots::new(t.caps(), SLOTS, REGION).unwrap(),
            events: Vec::new(),
        }
    }

    fn region(slot: u16) -> u64 {
        u64::from(slot) * REGION as u64
    }

    /// Start a request in `slot`; it must go in flight (the target defers everything but no-op flushes).
    fn start(&mut self, t: &NbdTarget, slot: u16, req: Request, data: Option<&[u8]>) {
        if let Some(d) = data {
            self.slots.buf_mut(slot)[..d.len()].copy_from_slice(d);
        }
        let r = self.slots.start(t, slot, req);
        assert_eq!(r, None, "{req:?} finished at once");
    }

    /// Start a write of `pattern(slot)` over the whole of `slot`'s region.
    fn start_write_whole(&mut self, t: &NbdTarget, slot: u16) {
        let data = pattern(u64::from(slot), REGION);
        let req = Request::new(Op::Write, Self::region(slot), len32(REGION));
        self.start(t, slot, req, Some(&data));
    }

    /// Results that arrived, waiting for at least one if `block`.
    fn collect(&mut self, t: &NbdTarget, block: bool) -> Vec<(u16, Request, IoResult)> {
        self.events.clear();
        self.slots.wait(t, block, &mut self.events).unwrap();
        self.events
            .iter()
            .filter_map(|e| match *e {
                Event::Done { slot, req, result } => Some((slot, req, result)),
                Event::Frontend { .. } => None,
            })
            .collect()
    }

    /// Wait for everything in flight.
    fn drain(&mut self, t: &NbdTarget) -> Vec<(u16, Request, IoResult)> {
        let mut out = Vec::new();
        while self.slots.in_use() > 0 {
            out.extend(self.collect(t, true));
        }
        out
    }
}

#[test]
fn many_requests_in_flight() {
    let _w = watchdog("many_requests_in_flight", Duration::from_secs(120));
    require!("nbdkit");
    let (_dir, sock, _srv) = nbdkit_in_temp(&["memory", "64M"]);
    let t = connect(&sock);
    let mut d = Driver::new(&t);
    // Each slot owns a region, so results do not depend on ordering between slots.
    let mut model = vec![vec![0u8; REGION]; usize::from(SLOTS)];
    let mut rng = 0x1234_5678_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut free: Vec<u16> = (0..SLOTS).collect();
    let mut done = 0;
    let mut most_in_flight = 0;
    let mut seed = 1000;
    while done < 3000 {
        while let Some(slot) = free.pop() {
            let blocks = REGION / 512;
            let first = usize::try_from(next() % blocks as u64).unwrap();
            let n = 1 + usize::try_from(next() % (blocks - first) as u64).unwrap();
            let (off, len) = (first * 512, n * 512);
            let at = Driver::region(slot) + off as u64;
            let m = &mut model[usize::from(slot)];
            match next() % 4 {
                0 | 1 => {
                    seed += 1;
                    let data = pattern(seed, len);
                    m[off..off + len].copy_from_slice(&data);
                    d.start(
                        &t,
                        slot,
                        Request::new(Op::Write, at, len32(len)),
                        Some(&data),
                    );
                }
                2 => d.start(&t, slot, Request::new(Op::Read, at, len32(len)), None),
                _ => {
                    m[off..off + len].fill(0);
                    d.start(
                        &t,
                        slot,
                        Request::new(Op::WriteZeroes, at, len32(len)),
                        None,
                    );
                }
            }
        }
        most_in_flight = most_in_flight.max(d.slots.in_use());
        for (slot, req, result) in d.collect(&t, true) {
            let want = if req.op.has_data() { req.len } else { 0 };
            assert_eq!(result, Ok(want), "{req:?}");
            if req.op == Op::Read {
                let off = usize::try_from(req.offset - Driver::region(slot)).unwrap();
                let len = req.len as usize;
                assert!(
                    d.slots.buf(slot)[..len] == model[usize::from(slot)][off..off + len],
                    "read {req:?} returned wrong data"
                );
            }
            free.push(slot);
            done += 1;
        }
    }
    d.drain(&t);
    assert_eq!(most_in_flight, usize::from(SLOTS));
    let mut dev = Dev::new(&t);
    for slot in 0..SLOTS {
        let got = dev.read(Driver::region(slot), REGION).unwrap();
        assert!(got == model[usize::from(slot)], "region {slot} differs");
    }
}

// ---- reconnecting ----

/// Let the target connect its threads (the first request starts them).
fn warm_up(t: &NbdTarget) {
    assert_eq!(Dev::new(t).read(0, 512).map(|v| v.len()), Ok(512));
}

/// A qemu-nbd over a new `size`-byte image, and a target connected to it
/// that waits up to `reconnect` for a server that went away.
fn reconnecting(size: u64, reconnect: Duration) -> (TempDir, PathBuf, PathBuf, Server, NbdTarget) {
    let (dir, sock, file) = image(size);
    let srv = qemu_nbd(&sock, &file, &[]);
    let t = connect_with_timeout(&sock, reconnect);
    (dir, sock, file, srv, t)
}

#[test]
fn reconnect_resends_queued_and_in_flight_requests() {
    let _w = watchdog(
        "reconnect_resends_queued_and_in_flight_requests",
        Duration::from_secs(120),
    );
    require!("qemu-nbd");
    let (_dir, sock, file, srv, t) = reconnecting(8 << 20, Duration::from_secs(30));
    warm_up(&t);
    let mut d = Driver::new(&t);

    // Writes in flight as the server dies, then more while it is gone.
    for slot in 0..SLOTS / 2 {
        d.start_write_whole(&t, slot);
    }
    srv.kill();
    for slot in SLOTS / 2..SLOTS {
        d.start_write_whole(&t, slot);
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut results = d.collect(&t, false);
    assert!(
        d.slots.in_use() >= usize::from(SLOTS / 2),
        "requests sent after the server died did not wait for it"
    );
    let srv = qemu_nbd(&sock, &file, &[]);
    results.extend(d.drain(&t));
    assert_eq!(results.len(), usize::from(SLOTS));
    for (_, req, result) in &results {
        assert_eq!(*result, Ok(len32(REGION)), "{req:?}");
    }

    // Reads queued while the server is down.
    srv.kill();
    for slot in 0..SLOTS {
        d.start(
            &t,
            slot,
            Request::new(Op::Read, Driver::region(slot), len32(REGION)),
            None,
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        d.collect(&t, false).is_empty(),
        "reads finished with no server"
    );
    let _srv = qemu_nbd(&sock, &file, &[]);
    let results = d.drain(&t);
    assert_eq!(results.len(), usize::from(SLOTS));
    for (slot, req, result) in results {
        assert_eq!(result, Ok(len32(REGION)), "{req:?}");
        assert!(
            d.slots.buf(slot)[..REGION] == pattern(u64::from(slot), REGION)[..],
            "slot {slot} read wrong data after the reconnect"
        );
    }
    let on_disk = std::fs::read(&file).unwrap();
    for slot in 0..SLOTS {
        let at = usize::try_from(Driver::region(slot)).unwrap();
        assert!(on_disk[at..at + REGION] == pattern(u64::from(slot), REGION)[..]);
    }
}

#[test]
fn reconnect_timeout_fails_waiting_requests_with_eio() {
    let _w = watchdog(
        "reconnect_timeout_fails_waiting_requests_with_eio",
        Duration::from_secs(120),
    );
    require!("qemu-nbd");
    let (_dir, sock, file, srv, t) = reconnecting(1 << 20, Duration::from_secs(1));
    let mut dev = Dev::new(&t);
    let data = pattern(5, 4096);
    assert_eq!(dev.write(0, &data), Ok(4096));
    srv.kill();
    let start = Instant::now();
    assert_eq!(dev.read(0, 4096), Err(Errno::IO));
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "failed after {waited:?}"
    );
    // The target keeps trying: later requests work once the server is back.
    let _srv = qemu_nbd(&sock, &file, &[]);
    assert_eq!(dev.read(0, 4096).unwrap(), data);
}

#[test]
fn reconnect_refuses_an_export_of_another_size() {
    let _w = watchdog(
        "reconnect_refuses_an_export_of_another_size",
        Duration::from_secs(120),
    );
    require!("qemu-nbd");
    let (dir, sock, file, srv, t) = reconnecting(1 << 20, Duration::from_secs(2));
    let other = dir.path().join("other.img");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let mut dev = Dev::new(&t);
    let data = pattern(6, 4096);
    assert_eq!(dev.write(8192, &data), Ok(4096));
    srv.kill();
    let wrong = qemu_nbd(&sock, &other, &[]);
    // The only server has the wrong size: the request waits out the timeout.
    assert_eq!(dev.read(8192, 4096), Err(Errno::IO));
    wrong.kill();
    let _srv = qemu_nbd(&sock, &file, &[]);
    assert_eq!(dev.read(8192, 4096).unwrap(), data);
}

// ---- misbehaving servers ----

/// The 16-byte header of a simple reply with `error` for `cookie`.
fn simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    let mut r = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&error.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r
}

/// A minimal NBD server on a Unix socket: it negotiates a 1 MiB export with
/// `NBD_OPT_GO`, then answers each request on the first connection with
/// `bad`, and properly (reads return 0xAB) on later ones. Returns how many
/// connections it served before the client's `NBD_CMD_DISC`.
fn fake_server(sock: &Path, bad: fn(&mut UnixStream, u64)) -> std::thread::JoinHandle<usize> {
    let listener = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        for n in 0.. {
            let (mut c, _) = listener.accept().unwrap();
            let mut greeting = proto::NBDMAGIC.to_be_bytes().to_vec();
            greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
            greeting.extend_from_slice(
                &(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes(),
            );
            c.write_all(&greeting).unwrap();
            let mut flags = [0u8; 4];
            c.read_exact(&mut flags).unwrap();
            let mut head = [0u8; 16];
            c.read_exact(&mut head).unwrap();
            assert_eq!(&head[8..12], &proto::OPT_GO.to_be_bytes());
            let len = u32::from_be_bytes(head[12..16].try_into().unwrap());
            let mut payload = vec![0u8; len as usize];
            c.read_exact(&mut payload).unwrap();
            let reply = |ty: u32, data: &[u8]| {
                let mut v = proto::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
                v.extend_from_slice(&proto::OPT_GO.to_be_bytes());
                v.extend_from_slice(&ty.to_be_bytes());
                v.extend_from_slice(&len32(data.len()).to_be_bytes());
                v.extend_from_slice(data);
                v
            };
            let mut info = proto::INFO_EXPORT.to_be_bytes().to_vec();
            info.extend_from_slice(&(1u64 << 20).to_be_bytes());
            info.extend_from_slice(&proto::FLAG_HAS_FLAGS.to_be_bytes());
            c.write_all(&reply(proto::REP_INFO, &info)).unwrap();
            c.write_all(&reply(proto::REP_ACK, &[])).unwrap();
            loop {
                let mut req = [0u8; proto::REQUEST_LEN];
                if c.read_exact(&mut req).is_err() {
                    break; // The client hung up: serve the next connection.
                }
                let cmd = u16::from_be_bytes([req[6], req[7]]);
                let cookie = u64::from_be_bytes(req[8..16].try_into().unwrap());
                let len = u32::from_be_bytes(req[24..28].try_into().unwrap());
                if cmd == proto::CMD_DISC {
                    return n + 1;
                }
                assert_eq!(cmd, proto::CMD_READ);
                if n == 0 {
                    bad(&mut c, cookie);
                    continue;
                }
                let mut r = simple_reply(0, cookie);
                r.resize(r.len() + len as usize, 0xAB);
                c.write_all(&r).unwrap();
            }
        }
        unreachable!()
    })
}

/// The first connection's reply is broken in some way: the read still
/// succeeds, over a second connection.
fn survives(bad: fn(&mut UnixStream, u64)) {
    let _w = watchdog("misbehaving server", Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let server = fake_server(&sock, bad);
    let t = connect(&sock);
    assert_eq!(Dev::new(&t).read(4096, 4096).unwrap(), vec![0xAB; 4096]);
    drop(t);
    assert_eq!(
        server.join().unwrap(),
        2,
        "the client did not reconnect once"
    );
}

#[test]
fn reply_with_bad_magic_reconnects() {
    survives(|c, _| c.write_all(&[0xff; 16]).unwrap());
}

#[test]
fn reply_for_unknown_cookie_reconnects() {
    survives(|c, cookie| {
        c.write_all(&simple_reply(0, cookie + 1000)).unwrap();
    });
}

#[test]
fn structured_reply_reconnects() {
    survives(|c, cookie| {
        let mut r = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&[0, 1, 0, 0]);
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&0u32.to_be_bytes());
        c.write_all(&r).unwrap();
    });
}

#[test]
fn eshutdown_reconnects_and_retries() {
    survives(|c, cookie| {
        c.write_all(&simple_reply(proto::ESHUTDOWN, cookie))
            .unwrap();
    });
}

#[test]
fn truncated_read_data_reconnects() {
    survives(|c, cookie| {
        let mut r = simple_reply(0, cookie);
        r.extend_from_slice(&[0xCD; 100]);
        c.write_all(&r).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
    });
}

#[test]
fn server_errors_become_errnos() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    // Only the first connection is used: every read fails with ENOSPC.
    let server = fake_server(&sock, |c, cookie| {
        c.write_all(&simple_reply(proto::ENOSPC, cookie)).unwrap();
    });
    let t = connect(&sock);
    let mut dev = Dev::new(&t);
    assert_eq!(dev.read(0, 512), Err(Errno::NOSPC));
    assert_eq!(dev.read(512, 512), Err(Errno::NOSPC));
    drop(t);
    assert_eq!(server.join().unwrap(), 1);
}

// ---- refusals ----

#[test]
fn missing_socket_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody-listens");
    let uri = unix_uri(&sock, "disk");
    let e = NbdTarget::connect(NbdOptions::new(uri.clone())).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&uri.to_string()), "{msg}");
    assert!(msg.contains("cannot connect"), "{msg}");
    assert!(msg.contains("No such file or directory"), "{msg}");
}

#[test]
fn refused_tcp_connection_is_a_clear_error() {
    let port = free_port();
    let uri = NbdUri::parse(&format!("nbd://127.0.0.1:{port}/x")).unwrap();
    let msg = NbdTarget::connect(NbdOptions::new(uri))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("cannot connect") && msg.contains("refused"),
        "{msg}"
    );
}

#[test]
fn unknown_export_names_the_refusal() {
    require!("qemu-nbd");
    let (_dir, sock, file) = image(1 << 20);
    let _srv = qemu_nbd(&sock, &file, &["-x", "disk"]);
    let e = NbdTarget::connect(NbdOptions::new(unix_uri(&sock, "other"))).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("NBD_REP_ERR_UNKNOWN"), "{msg}");
    assert!(msg.contains("NBD_OPT_GO"), "{msg}");
    // The right name works.
    let t = NbdTarget::connect(NbdOptions::new(unix_uri(&sock, "disk"))).unwrap();
    assert_eq!(t.caps().size, 1 << 20);
}

#[test]
fn not_an_nbd_server_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let listener = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let _ = c.write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
        std::thread::sleep(Duration::from_millis(200));
    });
    let msg = NbdTarget::connect(NbdOptions::new(unix_uri(&sock, "")))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not an NBD server"), "{msg}");
    server.join().unwrap();
}

#[test]
fn silent_server_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let listener = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        let (c, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        drop(c);
    });
    let mut o = NbdOptions::new(unix_uri(&sock, ""));
    o.connect_timeout = Duration::from_millis(300);
    let start = Instant::now();
    let msg = NbdTarget::connect(o).unwrap_err().to_string();
    assert!(msg.contains("timed out"), "{msg}");
    assert!(start.elapsed() < Duration::from_secs(1));
    server.join().unwrap();
}

// ---- shutdown ----

/// Dropping `t` returns within 2 s.
fn drops_promptly(t: NbdTarget) {
    let start = Instant::now();
    drop(t);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn drop_ends_the_threads_promptly() {
    let _w = watchdog("drop_ends_the_threads_promptly", Duration::from_secs(120));
    require!("qemu-nbd");
    let (_dir, sock, file) = image(1 << 20);
    let srv = qemu_nbd(&sock, &file, &[]);
    // Connected and idle.
    let t = connect(&sock);
    warm_up(&t);
    drops_promptly(t);
    // Never started.
    drop(connect(&sock));
    // Reconnecting to a dead server.
    let t = connect(&sock);
    warm_up(&t);
    srv.kill();
    std::thread::sleep(Duration::from_millis(300));
    drops_promptly(t);
}
