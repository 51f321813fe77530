//! The qcow2 target with a hostile image: header, extensions, L1/L2
//! tables, refcount table and blocks, compressed clusters, all from the
//! fuzz input.
//!
//! Input: one control byte, then the image file. Bit 0 of the control byte
//! opens the image writable, the other bits pick the writes. The seeds
//! (`fuzz/corpus/qcow2_image/`, written by `fuzz/qcow2_seeds.sh` with
//! qemu-img) are small valid images with 512-byte clusters, so mutations
//! start past the header checks.
//!
//! For each input the image is written to a file in a private directory
//! (which also holds `base.raw` and `base.qcow2`, for images that name a
//! backing file), opened with `Qcow2Target`, and then, through an
//! `Engine` as a frontend would: every cluster is read (the first 4 KiB of
//! each, for at most 4096 clusters: the first 3072 and the last 1024), one
//! read spans many clusters, the extents of the whole device are asked
//! for, and if it opened writable a few writes, write-zeroes, discards and
//! a flush follow, then a read-only reopen and the same reads. Checked:
//! no panic (arithmetic overflow included: the build has overflow checks),
//! opening fails with an error message or succeeds, a read succeeds with
//! the whole length or fails with an errno, and a read-only open never
//! changes the file.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use userblk::slots::Engine;
use userblk::targets::qcow2::header::Header;
use userblk::targets::qcow2::{create, CreateOptions, Qcow2Target};
use userblk::{Op, Request, Target};

/// The file each input becomes.
const IMAGE: &str = "image.qcow2";
/// Clusters read one by one: all of them up to this many.
const MAX_CLUSTER_READS: u64 = 4096;
/// Bytes read from each cluster (clusters go up to 2 MiB).
const PIECE: u64 = 4096;

/// The directory of the image and its possible backing files.
fn dir() -> &'static Path {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        // scripts/fuzz.sh points TMPDIR at a tmpfs directory (flushes sync
        // the file) that it removes afterwards.
        let d = std::env::temp_dir().join(format!("userblk-qcow2-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("creating the image directory");
        let raw: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(d.join("base.raw"), raw).expect("writing base.raw");
        let base = d.join("base.qcow2");
        if !base.exists() {
            let mut o = CreateOptions::new(&base, 1 << 20);
            o.cluster_size = 512;
            create(&o).expect("creating base.qcow2");
        }
        d
    })
}

/// Whether the image names a backing file outside the directory: such
/// inputs are skipped (the fuzzer must not read the host's files).
fn escapes(image: &[u8]) -> bool {
    let Ok(bits) = Header::peek_cluster_bits(image) else {
        return false;
    };
    let first = &image[..image.len().min(1 << bits)];
    match Header::parse(first, image.len() as u64) {
        Ok(h) => h.backing_file.is_some_and(|n| n.contains('/')),
        Err(_) => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, image)) = data.split_first() else {
        return;
    };
    if escapes(image) {
        return;
    }
    let path = dir().join(IMAGE);
    std::fs::write(&path, image).expect("writing the image");
    let writable = control & 1 == 1;
    let t = match Qcow2Target::open(&path, !writable) {
        Ok(t) => t,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "an empty error message");
            if !writable {
                assert_unchanged(&path, image);
            }
            return;
        }
    };
    read_everything(&t);
    if writable {
        write_some(&t, control >> 1);
        drop(t);
        // Whatever the writes did, the image opens again or says why.
        if let Ok(t) = Qcow2Target::open(&path, true) {
            read_everything(&t);
        }
    } else {
        drop(t);
        assert_unchanged(&path, image);
    }
});

fn assert_unchanged(path: &Path, image: &[u8]) {
    let now = std::fs::read(path).expect("reading the image back");
    assert!(now == image, "a read-only open changed the image");
}

/// Read every cluster (or the first and last ones of a big device), one
/// long read, and the extents.
fn read_everything(t: &Qcow2Target) {
    let caps = t.caps();
    let size = caps.size;
    let cs = t.image().header().cluster_size();
    let piece = cs.min(PIECE).min(size);
    let mut e = Engine::new(t, 1 << 20).expect("an engine");
    let mut buf = vec![0u8; 1 << 20];
    let clusters = size.div_ceil(cs);
    let (head, tail) = if clusters <= MAX_CLUSTER_READS {
        (clusters, 0)
    } else {
        (MAX_CLUSTER_READS * 3 / 4, MAX_CLUSTER_READS / 4)
    };
    let picks = (0..head).chain(clusters - tail..clusters);
    for c in picks {
        let off = c * cs;
        let len = piece.min(size - off);
        read(&mut e, t, off, len, &mut buf);
    }
    // Across clusters: contiguous runs are read at once.
    read(&mut e, t, 0, size.min(1 << 20), &mut buf);
    let mut ext = Vec::new();
    if t.extents(0, size, &mut ext).is_ok() {
        let total: u64 = ext.iter().map(|x| x.len).sum();
        assert!(total <= size, "extents past the end: {total} > {size}");
    }
}

fn read(e: &mut Engine, t: &Qcow2Target, off: u64, len: u64, buf: &mut [u8]) {
    let n = u32::try_from(len).expect("read lengths are at most 1 MiB");
    let buf = &mut buf[..n as usize];
    match e.run(t, Request::new(Op::Read, off, n), buf) {
        Ok(done) => assert_eq!(done, n, "a short read at {off}"),
        Err(errno) => assert_ne!(
            errno,
            rustix::io::Errno::INVAL,
            "a valid read at {off}+{len} was called invalid"
        ),
    }
}

/// A few modifications chosen by `pick`, then a flush; their results are
/// not checked (a hostile image may fail them), only that they return.
fn write_some(t: &Qcow2Target, pick: u8) {
    let size = t.caps().size;
    let cs = t.image().header().cluster_size();
    let mut e = Engine::new(t, 1 << 20).expect("an engine");
    let data = vec![0xa5u8; 8192];
    let mut state = u64::from(pick) | 0x100;
    let mut next = |n: u64| {
        // xorshift: a few deterministic offsets from seven bits.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n.max(1)
    };
    for _ in 0..4 {
        let sectors = size / 512;
        let off = next(sectors) * 512;
        let len = ((next(16) + 1) * 512).min(size - off);
        let n = u32::try_from(len).unwrap_or(512);
        let req = match next(4) {
            0 => Request::new(Op::WriteZeroes, off, n),
            1 => {
                // Whole clusters, as the discard granularity says.
                let off = off / cs * cs;
                let n = u32::try_from(cs.min(size - off) / cs * cs).unwrap_or(0);
                Request::new(Op::Discard, off, n)
            }
            _ => Request::new(Op::Write, off, n),
        };
        let payload = if req.op == Op::Write {
            &mut data.clone()[..n as usize]
        } else {
            &mut [][..]
        };
        let _ = e.run(t, req, payload);
    }
    let _ = e.run(t, Request::new(Op::Flush, 0, 0), &mut []);
}
