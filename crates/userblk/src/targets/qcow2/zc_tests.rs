//! qcow2 zero copy on the host: the pieces a request maps to, and reads
//! and writes through a registered buffer (as ublk's `AUTO_BUF_REG` gives
//! them) over every kind of cluster, checked against the image's own
//! path and the image checker.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::map::{Piece, Source};
use super::meta::{Mapping, COMPRESSED};
use super::tests::{check, new_image, opts};
use super::*;
use crate::target::{FixedEntry, Request};
use crate::Flags;

const CS: u64 = 65536;
const CSU: usize = 65536;

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed) % 253) as u8)
        .collect()
}

/// Guest cluster `gc` of `img` as a compressed cluster holding `data`.
fn put_compressed(img: &Image, gc: u64, data: &[u8]) {
    let mut m = img.meta();
    let z = compress::deflate(data);
    let host = m.alloc(1).unwrap();
    // Unaligned inside its cluster, as qemu packs them.
    let at = host + 512;
    img.file.write_all_at(&z, at).unwrap();
    let sectors = (512 + z.len() as u64).div_ceil(512) - 1;
    let x = 62 - (16 - 8);
    m.set_entry(gc, COMPRESSED | ((sectors - 1) << x) | at)
        .unwrap();
    m.flush().unwrap();
}

/// A 1 MiB image over a 512 KiB raw backing file: cluster 0 compressed,
/// 1 unallocated (the backing file's), 2 data, 3 a zero cluster, 4 and 5
/// data next to each other in the file, 8 on unallocated past the backing
/// file's end. Returns the image and what it reads as.
fn layout(dir: &Path) -> (PathBuf, Vec<u8>) {
    let base = pattern(512 << 10, 1);
    std::fs::write(dir.join("base.raw"), &base).unwrap();
    let path = dir.join("top.qcow2");
    let mut o = CreateOptions::new(&path, 1 << 20);
    o.backing = Some("base.raw".into());
    create(&o).unwrap();
    let mut want = base;
    want.resize(1 << 20, 0);
    let img = Image::open(&path, &opts(false, 8, 2)).unwrap();
    let c0 = pattern(CSU, 7);
    put_compressed(&img, 0, &c0);
    want[..CSU].copy_from_slice(&c0);
    for gc in [2usize, 4, 5] {
        let d = pattern(CSU, gc as u32 * 11);
        img.write(gc as u64 * CS, &d).unwrap();
        want[gc * CSU..(gc + 1) * CSU].copy_from_slice(&d);
    }
    img.write_zeroes(3 * CS, CS, false).unwrap();
    want[3 * CSU..4 * CSU].fill(0);
    drop(img);
    (path, want)
}

fn host_of(img: &Image, gc: u64) -> u64 {
    match img.meta().mapping(gc).unwrap() {
        Mapping::Data { host, .. } => host,
        m => panic!("cluster {gc} is {m:?}"),
    }
}

fn piece(at: u64, len: u64, source: Source) -> Piece {
    Piece { at, len, source }
}

#[test]
fn requests_map_to_pieces_of_each_kind() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = layout(dir.path());
    let img = Image::open(&path, &opts(false, 8, 2)).unwrap();
    let (h2, h4) = (host_of(&img, 2), host_of(&img, 4));
    assert_eq!(
        host_of(&img, 5),
        h4 + CS,
        "the layout puts 4 and 5 together"
    );
    assert_eq!(
        img.map_read(0, 6 * CS).unwrap(),
        [
            piece(0, CS, Source::Compressed),
            piece(CS, CS, Source::Backing),
            piece(2 * CS, CS, Source::Host(h2)),
            piece(3 * CS, CS, Source::Zeroes),
            piece(4 * CS, 2 * CS, Source::Host(h4)),
        ]
    );
    // Unaligned at both ends, inside clusters.
    let off = CS / 2 + 512;
    assert_eq!(
        img.map_read(off, 2 * CS).unwrap(),
        [
            piece(0, CS - off, Source::Compressed),
            piece(CS - off, CS, Source::Backing),
            piece(2 * CS - off, off, Source::Host(h2)),
        ]
    );
    // Past the backing file the pieces still say backing (which reads zeroes there).
    assert_eq!(
        img.map_read(8 * CS, 4096).unwrap(),
        [piece(0, 4096, Source::Backing)]
    );

    // Writes go in place only where every cluster is allocated.
    assert_eq!(img.in_place.load(Ordering::Acquire), 0);
    let p = img.map_in_place(2 * CS + 4096, 8192).unwrap();
    assert_eq!(p, Some(vec![piece(0, 8192, Source::Host(h2 + 4096))]));
    assert_eq!(img.in_place.load(Ordering::Acquire), 1);
    img.in_place_done();
    let p = img.map_in_place(4 * CS + 512, CS).unwrap();
    assert_eq!(p, Some(vec![piece(0, CS, Source::Host(h4 + 512))]));
    img.in_place_done();
    for (off, len) in [(CS, 4096), (0, 512), (2 * CS, 2 * CS), (3 * CS, 512)] {
        assert_eq!(img.map_in_place(off, len).unwrap(), None, "{off}+{len}");
    }
    assert_eq!(img.in_place.load(Ordering::Acquire), 0);

    // Without a backing file unallocated clusters are zeroes.
    let plain = new_image(dir.path(), "plain.qcow2", 1 << 20, CS);
    let img = Image::open(&plain, &opts(false, 8, 2)).unwrap();
    assert_eq!(
        img.map_read(512, 3 * CS).unwrap(),
        [piece(0, 3 * CS, Source::Zeroes)]
    );
}

/// Read `len` bytes at `off` through zero copy.
fn zc_read(t: &Qcow2Target, e: &mut FixedEntry, off: usize, len: usize) -> Vec<u8> {
    e.bytes().fill(0xee);
    let r = e.run(t, Request::new(Op::Read, off as u64, len as u32));
    assert_eq!(r, Ok(len as u32), "read {off}+{len}");
    e.bytes()[..len].to_vec()
}

/// Write `len` bytes of a pattern at `off` through zero copy, and into `want`.
fn zc_write(
    t: &Qcow2Target,
    e: &mut FixedEntry,
    want: &mut [u8],
    at: (usize, usize),
    flags: Flags,
) {
    let (off, len) = at;
    let d = pattern(len, (off / 512) as u32);
    e.bytes()[..len].copy_from_slice(&d);
    let req = Request::new(Op::Write, off as u64, len as u32).with_flags(flags);
    assert_eq!(e.run(t, req), Ok(len as u32), "write {off}+{len}");
    want[off..off + len].copy_from_slice(&d);
}

#[test]
fn zero_copy_reads_and_writes_match_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut want) = layout(dir.path());
    let t = Qcow2Target::open(&path, false).unwrap();
    assert!(t.data_on_ring_only());
    let mut e = FixedEntry::new(6 * CSU);
    // Every kind at once, unaligned, and past the backing file.
    assert!(zc_read(&t, &mut e, 0, 6 * CSU) == want[..6 * CSU]);
    let off = CSU / 2 + 512;
    assert!(zc_read(&t, &mut e, off, 2 * CSU) == want[off..off + 2 * CSU]);
    assert!(zc_read(&t, &mut e, 7 * CSU, 2 * CSU) == want[7 * CSU..9 * CSU]);

    let none = Flags::NONE;
    // In place (allocated), with and without FUA, across two clusters.
    zc_write(&t, &mut e, &mut want, (2 * CSU + 4096, 8192), none);
    zc_write(&t, &mut e, &mut want, (4 * CSU + 512, CSU), Flags::FUA);
    // Allocating: over the backing file (copy on write), a zero cluster,
    // a compressed one, and a request over several kinds.
    zc_write(&t, &mut e, &mut want, (CSU + 1024, 4096), none);
    zc_write(&t, &mut e, &mut want, (3 * CSU, 512), none);
    zc_write(&t, &mut e, &mut want, (4096, 4096), none);
    zc_write(&t, &mut e, &mut want, (5 * CSU + 4096, 3 * CSU), Flags::FUA);
    assert_eq!(t.image().in_place.load(Ordering::Acquire), 0);
    let n = 9 * CSU;
    let mut back = vec![0u8; n];
    t.image().read(0, &mut back).unwrap();
    assert!(back == want[..n], "the image's own reads agree");
    for (off, len) in [(0, 6 * CSU), (3 * CSU, 6 * CSU)] {
        assert!(zc_read(&t, &mut e, off, len) == want[off..off + len]);
    }
    drop(t);
    let (errors, _) = check(&path);
    assert!(errors.is_empty(), "{errors:?}");
    let t = Qcow2Target::open(&path, true).unwrap();
    assert!(zc_read(&t, &mut e, 3 * CSU, 6 * CSU) == want[3 * CSU..9 * CSU]);
}

#[test]
fn a_write_in_place_in_flight_keeps_released_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path(), "f.qcow2", 1 << 20, CS);
    let img = Image::open(&path, &opts(false, 8, 2)).unwrap();
    img.write(0, &pattern(CSU, 1)).unwrap();
    img.flush().unwrap();
    let h0 = host_of(&img, 0);
    assert!(img.map_in_place(0, 4096).unwrap().is_some());
    // Released while the write may still land there: not reusable yet.
    img.discard(0, CS).unwrap();
    img.flush().unwrap();
    assert_eq!(img.meta().pending_free, [h0 / CS]);
    img.write(CS, &pattern(CSU, 2)).unwrap();
    assert_ne!(host_of(&img, 1), h0);
    img.in_place_done();
    img.flush().unwrap();
    assert!(img.meta().pending_free.is_empty());
    drop(img);
    assert_eq!(check(&path), (vec![], 0));
}

#[test]
fn requests_over_many_small_clusters_copy_and_stay_right() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path(), "small.qcow2", 1 << 20, 512);
    let t = Qcow2Target::open(&path, false).unwrap();
    let mut want = vec![0u8; 1 << 20];
    // Every other 512-byte cluster: data and zeroes alternate.
    for i in (0..256).step_by(2) {
        let d = pattern(512, i);
        t.image().write(u64::from(i) * 512, &d).unwrap();
        want[i as usize * 512..(i as usize + 1) * 512].copy_from_slice(&d);
    }
    assert!(t.image().map_read(0, 128 << 10).unwrap().len() > 64);
    let mut e = FixedEntry::new(128 << 10);
    assert!(zc_read(&t, &mut e, 0, 128 << 10) == want[..128 << 10]);
    // Allocating, then all allocated (in place, in many pieces).
    zc_write(&t, &mut e, &mut want, (4096, 96 << 10), Flags::NONE);
    zc_write(&t, &mut e, &mut want, (8192, 64 << 10), Flags::NONE);
    assert_eq!(t.image().in_place.load(Ordering::Acquire), 0);
    assert!(zc_read(&t, &mut e, 0, 128 << 10) == want[..128 << 10]);
    drop(t);
    assert_eq!(check(&path).0, Vec::<String>::new());
}
