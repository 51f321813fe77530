//! Fixtures for targets that live on more than a buffer or one file: qcow2
//! images, filters over a read-only file or mem, and targets served by a
//! process (nbdkit, s3s-fs). Those return `None` when the server is not
//! installed, after reporting the skip.
//!
//! The `_sized` forms are for the differential test, whose devices are
//! smaller and start as zeroes.

use std::sync::Arc;

use userblk::nbd::client::NbdUri;
use userblk::targets::nbd::{NbdOptions, NbdTarget};
use userblk::targets::qcow2::{create, CreateOptions, Qcow2Target};
use userblk::targets::s3::{S3Options, S3Target};
use userblk::targets::{FileOptions, FileTarget};
use userblk::Target;

use super::{filtered, pattern, servers, us, Backing, Fixture, DEV_SIZE};

/// A writable fixture of `target`, keeping `keep` alive until after it.
fn other<K: 'static>(target: Arc<dyn Target>, filter: bool, keep: K, initial: Vec<u8>) -> Fixture {
    Fixture {
        size: initial.len() as u64,
        backing: Backing::Other {
            target,
            filter,
            _keep: Box::new(keep),
        },
        read_only: false,
        stores_data: true,
        initial,
        direct: None,
    }
}

/// A fresh qcow2 image of `size` bytes and `cluster`-byte clusters, made
/// by the library's `create`.
pub fn qcow2_sized(size: u64, cluster: u64) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.qcow2");
    let mut o = CreateOptions::new(&path, size);
    o.cluster_size = cluster;
    create(&o).expect("create qcow2");
    let t = Qcow2Target::open(&path, false).expect("open qcow2");
    other(Arc::new(t), false, dir, vec![0; us(size)])
}

/// A fresh qcow2 image.
pub fn qcow2() -> Fixture {
    qcow2_sized(DEV_SIZE, 64 << 10)
}

/// A qcow2 image over a raw backing file full of data: every cluster
/// starts in the backing file, so writes, discards and zeroes must hide it.
pub fn qcow2_backed() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = pattern(0xBA5E, us(DEV_SIZE));
    std::fs::write(dir.path().join("base.raw"), &base).expect("write the base");
    let path = dir.path().join("top.qcow2");
    let mut o = CreateOptions::new(&path, 0);
    o.backing = Some("base.raw".into());
    o.backing_format = Some("raw".into());
    create(&o).expect("create qcow2 over base.raw");
    let t = Qcow2Target::open(&path, false).expect("open qcow2");
    other(Arc::new(t), false, dir, base)
}

/// `cow` (its overlay a named file, of `cluster`-byte clusters) over a
/// read-only file target of `size` bytes, full of data or sparse.
pub fn cow_sized(size: u64, filled: bool, cluster: u32) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("base.img");
    let initial = if filled {
        pattern(0xC0, us(size))
    } else {
        vec![0; us(size)]
    };
    std::fs::write(&path, &initial).expect("write the base");
    let base = FileTarget::open(FileOptions {
        path,
        read_only: true,
        ..FileOptions::default()
    })
    .expect("open the base read-only");
    let spec = format!(
        "cow:file={}/overlay.cow,cluster={cluster}",
        dir.path().display()
    );
    let specs = [spec.parse().expect("cow spec")];
    let env = userblk::filters::Env::default();
    let stack = userblk::filters::build(Arc::new(base), &specs, &env).expect("cow over the base");
    other(stack, true, dir, initial)
}

/// `cow` over a read-only file full of data.
pub fn cow() -> Fixture {
    cow_sized(DEV_SIZE, true, 64 << 10)
}

/// A write-back layer over mem: what mem holds lags behind the device, so
/// mem's memory says nothing about the device's allocation (no storage checks).
fn write_back_over_mem(size: u64, spec: &str) -> Fixture {
    let fx = filtered(size, &[spec], size, false);
    match fx.backing {
        Backing::Filtered { stack, mem, _dir } => other(stack, true, (mem, _dir), fx.initial),
        _ => unreachable!("filtered() makes a filtered fixture"),
    }
}

/// `flakey` over mem, the power on: a write-back cache that flushes hold to.
pub fn flakey_sized(size: u64) -> Fixture {
    write_back_over_mem(size, "flakey")
}

/// `flakey` over mem.
pub fn flakey() -> Fixture {
    flakey_sized(DEV_SIZE)
}

/// mem behind a write-back `cache` a quarter of its size (so it evicts,
/// writing dirty blocks back).
pub fn cache_writeback_sized(size: u64) -> Fixture {
    let spec = format!("cache:size={},block=16K,mode=writeback", size / 4);
    write_back_over_mem(size, &spec)
}

/// mem behind a write-back `cache`.
pub fn cache_writeback() -> Fixture {
    cache_writeback_sized(DEV_SIZE)
}

/// The nbd target on `nbdkit memory` over a Unix socket.
pub fn nbd_sized(size: u64) -> Option<Fixture> {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("nbd.sock");
    let server = servers::nbdkit_memory(&sock, size)?;
    let uri = NbdUri::parse(&format!("nbd+unix:///?socket={}", sock.display())).expect("uri");
    let t = NbdTarget::connect(NbdOptions::new(uri)).expect("connect to nbdkit");
    Some(other(Arc::new(t), false, (server, dir), vec![0; us(size)]))
}

/// The nbd target on `nbdkit memory`.
pub fn nbd() -> Option<Fixture> {
    nbd_sized(DEV_SIZE)
}

/// The s3 target on a fresh volume in s3s-fs, with 64 KiB chunks (the
/// smallest) so that the device spans many.
pub fn s3_sized(size: u64) -> Option<Fixture> {
    let server = servers::S3sFs::start("vol")?;
    let cache = tempfile::tempdir().expect("tempdir");
    let config = servers::s3_config(&server.endpoint(), "vol", "conformance");
    let mut o = S3Options::new(config, cache.path().join("cache"));
    o.size = Some(size);
    o.chunk_size = Some(64 << 10);
    // s3s-fs: its conditional writes are not atomic (lease/probe.rs).
    o.lease = userblk::targets::s3::LeaseMode::Host;
    let t = S3Target::open(o).expect("open the s3 volume");
    Some(other(
        Arc::new(t),
        false,
        (server, cache),
        vec![0; us(size)],
    ))
}

/// The s3 target on s3s-fs.
pub fn s3() -> Option<Fixture> {
    s3_sized(DEV_SIZE)
}
