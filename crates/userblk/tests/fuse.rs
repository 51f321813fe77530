//! The FUSE export on the real kernel: file operations reach the target as
//! the right requests, with the right data.
//!
//! Needs root (mount) and /dev/fuse; without them every test prints
//! `SKIP` (see tests/skip) and returns, so the run shows what did not run.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

mod skip;

use rustix::fs::FallocateFlags;
use skip::Prereq;
use userblk::fuse::{FuseDisk, FuseOptions, Unmounted};
use userblk::targets::MemTarget;
use userblk::{Caps, Ctx, Op, Submit, Target};

/// Whether the test can mount; if not, reports it skipped (CI has both).
fn can_mount() -> bool {
    let root = rustix::process::geteuid().is_root();
    skip::require(
        root,
        Prereq::CiInstalls,
        "FUSE tests mount file systems and need root",
    ) && skip::require(
        userblk::fuse::disk::check_fuse_available().is_ok(),
        Prereq::CiInstalls,
        "no /dev/fuse on this machine",
    )
}

/// A mounted export that is unmounted (and waited for) on drop.
struct Mounted {
    disk: FuseDisk,
    ended: mpsc::Receiver<()>,
    _dir: tempfile::TempDir,
}

impl Mounted {
    fn new(target: Arc<dyn Target>) -> Mounted {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, ended) = mpsc::channel();
        let disk = FuseDisk::mount(target, &FuseOptions::new(dir.path()), move |_| {
            let _ = tx.send(());
        })
        .expect("mount");
        Mounted {
            disk,
            ended,
            _dir: dir,
        }
    }

    fn open(&self, direct: bool) -> File {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if direct {
            o.custom_flags(rustix::fs::OFlags::DIRECT.bits().cast_signed());
        }
        o.open(self.disk.file()).expect("open disk")
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let r = self.disk.unmount();
        if !std::thread::panicking() {
            assert_eq!(r.expect("unmount"), Unmounted::Clean);
            self.ended
                .recv_timeout(Duration::from_secs(10))
                .expect("session ends after unmount");
        }
    }
}

/// 4 KiB-aligned buffer for O_DIRECT.
fn aligned(len: usize, fill: u8) -> Vec<u8> {
    // A Vec<u8> is not aligned; over-allocate and use an aligned window.
    let mut v = vec![fill; len + 4096];
    let off = v.as_ptr().align_offset(4096);
    v.drain(..off);
    v.truncate(len);
    v
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i % 251) as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn file_has_the_target_size_and_is_alone() {
    if !can_mount() {
        return;
    }
    let m = Mounted::new(Arc::new(MemTarget::new(64 << 20).expect("mem")));
    let meta = std::fs::metadata(m.disk.file()).expect("stat");
    assert!(meta.is_file());
    assert_eq!(meta.len(), 64 << 20);
    let names: Vec<_> = std::fs::read_dir(m.disk.mountpoint())
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["disk"]);
    // Nothing else can be created, and the size is fixed.
    assert!(File::create(m.disk.mountpoint().join("other")).is_err());
    let f = m.open(false);
    let e = f.set_len(1 << 20).expect_err("truncate must be refused");
    assert_eq!(e.raw_os_error(), Some(libc_eperm()));
    f.set_len(64 << 20).expect("same size is fine");
}

fn libc_eperm() -> i32 {
    rustix::io::Errno::PERM.raw_os_error()
}

#[test]
fn buffered_and_direct_io_agree_unaligned_included() {
    if !can_mount() {
        return;
    }
    let m = Mounted::new(Arc::new(MemTarget::new(16 << 20).expect("mem")));
    let direct = m.open(true);
    let data = pattern(7, 1 << 20);
    let mut buf = aligned(1 << 20, 0);
    buf.copy_from_slice(&data);
    direct.write_all_at(&buf, 3 << 20).expect("direct write");
    let mut back = aligned(1 << 20, 0);
    direct
        .read_exact_at(&mut back, 3 << 20)
        .expect("direct read");
    assert_eq!(back, data);

    // Byte-granular writes (read-modify-write inside) land exactly.
    let buffered = m.open(false);
    buffered
        .write_all_at(b"hello", (3 << 20) + 1001)
        .expect("small write");
    buffered.sync_all().expect("fsync");
    let mut expect = data.clone();
    expect[1001..1006].copy_from_slice(b"hello");
    let mut back = aligned(1 << 20, 0);
    direct
        .read_exact_at(&mut back, 3 << 20)
        .expect("read after rmw");
    assert_eq!(back, expect);
    // A buffered read across the edge of the written range.
    let mut small = [0u8; 10];
    buffered
        .read_exact_at(&mut small, (3 << 20) + 1000)
        .expect("small read");
    assert_eq!(&small, &expect[1000..1010]);
}

#[test]
fn end_of_device() {
    if !can_mount() {
        return;
    }
    let m = Mounted::new(Arc::new(MemTarget::new(1 << 20).expect("mem")));
    let f = m.open(true);
    let mut buf = aligned(8192, 0);
    // Reads stop at the end.
    assert_eq!(f.read_at(&mut buf, (1 << 20) - 4096).expect("read"), 4096);
    assert_eq!(f.read_at(&mut buf, 1 << 20).expect("read at end"), 0);
    // Writes past the end: no space, the file does not grow.
    let e = f
        .write_at(&buf[..4096], 1 << 20)
        .expect_err("write past end");
    assert_eq!(
        e.raw_os_error(),
        Some(rustix::io::Errno::NOSPC.raw_os_error())
    );
    assert_eq!(
        std::fs::metadata(m.disk.file()).expect("stat").len(),
        1 << 20
    );
}

#[test]
fn punch_hole_and_zero_range_read_as_zeroes_and_free_memory() {
    if !can_mount() {
        return;
    }
    let mem = Arc::new(MemTarget::new(8 << 20).expect("mem"));
    let m = Mounted::new(Arc::clone(&mem) as Arc<dyn Target>);
    let f = m.open(true);
    let buf = aligned(8 << 20, 0x5a);
    f.write_all_at(&buf, 0).expect("fill");
    let before = mem.resident_bytes().expect("resident");
    assert!(before >= 8 << 20, "filled device holds {before} bytes");
    // Punch 4 MiB at an unaligned start: the edges are zeroed by writes.
    rustix::fs::fallocate(
        &f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        1000,
        4 << 20,
    )
    .expect("punch");
    let after = mem.resident_bytes().expect("resident");
    assert!(
        after <= before - (3 << 20),
        "punching must free memory: {before} -> {after}"
    );
    rustix::fs::fallocate(&f, FallocateFlags::ZERO_RANGE, 6 << 20, 4096).expect("zero range");
    let mut back = aligned(8 << 20, 0);
    f.read_exact_at(&mut back, 0).expect("read");
    for (i, b) in back.iter().enumerate() {
        let zero =
            (1000..1000 + (4 << 20)).contains(&i) || (6 << 20..(6 << 20) + 4096).contains(&i);
        assert_eq!(*b, if zero { 0 } else { 0x5a }, "byte {i}");
    }
    // Modes a fixed-size disk cannot honour are refused.
    assert!(rustix::fs::fallocate(&f, FallocateFlags::empty(), 8 << 20, 4096).is_err());
}

/// Counts the requests that reach it; stores nothing.
#[derive(Default)]
struct Counting {
    flushes: AtomicU64,
    fua_writes: AtomicU64,
    writes: AtomicU64,
}

impl Target for Counting {
    fn caps(&self) -> Caps {
        let mut c = Caps::new(16 << 20);
        c.volatile_cache = true;
        c.fua = true;
        c
    }
    fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        let req = *ctx.req();
        match req.op {
            Op::Flush => {
                self.flushes.fetch_add(1, Ordering::SeqCst);
            }
            Op::Write => {
                self.writes.fetch_add(1, Ordering::SeqCst);
                if req.flags.contains(userblk::Flags::FUA) {
                    self.fua_writes.fetch_add(1, Ordering::SeqCst);
                }
            }
            Op::Read => ctx.data_mut().fill(0),
            _ => {}
        }
        Submit::Done(Ok(ctx.done_bytes()))
    }
}

#[test]
fn fsync_and_o_sync_reach_the_target() {
    if !can_mount() {
        return;
    }
    let t = Arc::new(Counting::default());
    let m = Mounted::new(Arc::clone(&t) as Arc<dyn Target>);
    let f = m.open(true);
    let buf = aligned(4096, 1);
    f.write_all_at(&buf, 0).expect("write");
    assert_eq!(t.flushes.load(Ordering::SeqCst), 0);
    f.sync_data().expect("fdatasync");
    assert_eq!(t.flushes.load(Ordering::SeqCst), 1);
    f.sync_all().expect("fsync");
    assert_eq!(t.flushes.load(Ordering::SeqCst), 2);
    // O_DSYNC writes are durable when they return: FUA (or a flush after).
    let sync = OpenOptions::new()
        .write(true)
        .custom_flags(
            (rustix::fs::OFlags::DIRECT | rustix::fs::OFlags::DSYNC)
                .bits()
                .cast_signed(),
        )
        .open(m.disk.file())
        .expect("open O_DSYNC");
    sync.write_all_at(&buf, 4096).expect("dsync write");
    assert!(
        t.fua_writes.load(Ordering::SeqCst) + t.flushes.load(Ordering::SeqCst) > 2,
        "an O_DSYNC write must reach the target as FUA or be followed by a flush"
    );
}

#[test]
fn read_only_target_refuses_writes() {
    if !can_mount() {
        return;
    }
    struct Ro;
    impl Target for Ro {
        fn caps(&self) -> Caps {
            let mut c = Caps::new(1 << 20);
            c.read_only = true;
            c
        }
        fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
            ctx.data_mut().fill(0xee);
            Submit::Done(Ok(ctx.done_bytes()))
        }
    }
    let m = Mounted::new(Arc::new(Ro));
    let e = OpenOptions::new()
        .write(true)
        .open(m.disk.file())
        .expect_err("writable open of a read-only disk");
    assert_eq!(
        e.raw_os_error(),
        Some(rustix::io::Errno::ROFS.raw_os_error())
    );
    let mut b = [0u8; 16];
    File::open(m.disk.file())
        .expect("read-only open")
        .read_exact_at(&mut b, 512)
        .expect("read");
    assert_eq!(b, [0xee; 16]);
}

#[test]
fn bad_mount_points_are_refused_clearly() {
    if !can_mount() {
        return;
    }
    let t: Arc<dyn Target> = Arc::new(MemTarget::new(1 << 20).expect("mem"));
    let missing = FuseDisk::mount(
        Arc::clone(&t),
        &FuseOptions::new("/nonexistent/userblk-test"),
        |_| {},
    )
    .expect_err("missing mount point");
    assert!(
        missing.to_string().contains("/nonexistent/userblk-test"),
        "{missing}"
    );

    let file = tempfile::NamedTempFile::new().expect("tempfile");
    let not_dir = FuseDisk::mount(Arc::clone(&t), &FuseOptions::new(file.path()), |_| {})
        .expect_err("file as mount point");
    assert!(not_dir.to_string().contains("not a directory"), "{not_dir}");

    let m = Mounted::new(Arc::clone(&t));
    let busy = FuseDisk::mount(
        Arc::clone(&t),
        &FuseOptions::new(m.disk.mountpoint()),
        |_| {},
    )
    .expect_err("busy mount point");
    assert!(busy.to_string().contains("busy"), "{busy}");
}

#[test]
fn busy_unmount_is_lazy_and_serves_until_closed() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (tx, ended) = mpsc::channel();
    let disk = FuseDisk::mount(
        Arc::new(MemTarget::new(1 << 20).expect("mem")),
        &FuseOptions::new(dir.path()),
        move |_| {
            let _ = tx.send(());
        },
    )
    .expect("mount");
    let f = File::options()
        .read(true)
        .write(true)
        .open(disk.file())
        .expect("open");
    f.write_all_at(b"still here", 0).expect("write");
    assert_eq!(disk.unmount().expect("unmount"), Unmounted::Lazy);
    // The open file keeps working after the lazy detach.
    let mut b = [0u8; 10];
    f.read_exact_at(&mut b, 0).expect("read after detach");
    assert_eq!(&b, b"still here");
    assert!(ended.recv_timeout(Duration::from_millis(200)).is_err());
    drop(f);
    ended
        .recv_timeout(Duration::from_secs(10))
        .expect("session ends once the last user closed the file");
}
