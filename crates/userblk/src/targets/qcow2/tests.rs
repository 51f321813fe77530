//! qcow2 tests on the host: a model-checked random workload with an
//! image checker of our own (every cluster's refcount against the
//! references to it), backing files, compressed clusters, and a table of
//! corrupt images. Interop with qemu-img is tests/host/qcow2.sh.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::Header;
use super::meta::{refcount_get, Geometry, Mapping, COMPRESSED, OFFSET_MASK};
use super::*;

/// A small deterministic generator (xorshift), so failures replay.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

pub(super) fn opts(read_only: bool, l2: usize, refblocks: usize) -> OpenOptions {
    OpenOptions {
        read_only,
        caches: CacheSizes { l2, refblocks },
    }
}

fn be64(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().unwrap())
}

/// What a qemu-img check would say: (errors, leaks). An error is a
/// cluster referenced more often than its refcount says (or referenced
/// while free); a leak a refcount with fewer references.
pub(super) fn check(path: &Path) -> (Vec<String>, u64) {
    let raw = std::fs::read(path).unwrap();
    let h = Header::parse(&raw, raw.len() as u64).unwrap();
    let g = Geometry::new(h.cluster_bits, h.refcount_order, h.version);
    let cs = g.cluster_size;
    let mut refs: HashMap<u64, u64> = HashMap::new();
    let mut add = |off: u64, n: u64| {
        for c in off / cs..(off + n).div_ceil(cs) {
            *refs.entry(c).or_default() += 1;
        }
    };
    add(0, cs);
    add(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
    );
    add(h.l1_table_offset, u64::from(h.l1_size) * 8);
    let rt_entries = u64::from(h.refcount_table_clusters) * cs / 8;
    let reftable: Vec<u64> = (0..rt_entries as usize)
        .map(|i| be64(&raw[h.refcount_table_offset as usize..], i))
        .collect();
    for &rb in &reftable {
        if rb != 0 {
            add(rb, cs);
        }
    }
    for i in 0..h.l1_size as usize {
        let l2 = be64(&raw[h.l1_table_offset as usize..], i) & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        add(l2, cs);
        for j in 0..g.l2_entries as usize {
            match g.decode(be64(&raw[l2 as usize..], j)).unwrap() {
                Mapping::Data { host, .. } => add(host, cs),
                Mapping::Zero { host, .. } if host != 0 => add(host, cs),
                Mapping::Compressed { host, len } => add(host, len),
                _ => {}
            }
        }
    }
    let refcount = |c: u64| -> u64 {
        let rb = reftable
            .get((c / g.rb_entries) as usize)
            .copied()
            .unwrap_or(0);
        if rb == 0 {
            return 0;
        }
        refcount_get(
            &raw[rb as usize..rb as usize + cs as usize],
            c % g.rb_entries,
            g.refcount_bits,
        )
    };
    let mut errors = Vec::new();
    let mut leaks = 0;
    let last = refs
        .keys()
        .max()
        .copied()
        .unwrap_or(0)
        .max(raw.len() as u64 / cs);
    for c in 0..=last {
        let want = refs.get(&c).copied().unwrap_or(0);
        let have = refcount(c);
        if have < want {
            errors.push(format!(
                "cluster {c}: refcount {have}, referenced {want} times"
            ));
        } else if have > want {
            leaks += 1;
        }
    }
    (errors, leaks)
}

pub(super) fn new_image(dir: &Path, name: &str, size: u64, cs: u64) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut o = CreateOptions::new(&path, size);
    o.cluster_size = cs;
    create(&o).unwrap();
    path
}

#[test]
fn created_images_check_clean_and_read_zero() {
    let dir = tempfile::tempdir().unwrap();
    for (cs, size) in [(512u64, 1u64 << 20), (65536, 1 << 30), (2 << 20, 10 << 30)] {
        let p = new_image(dir.path(), &format!("c{cs}.qcow2"), size, cs);
        assert_eq!(check(&p), (vec![], 0), "cluster size {cs}");
        let img = Image::open(&p, &opts(true, 4, 4)).unwrap();
        let mut b = vec![1u8; 8192];
        img.read(size - 8192, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
    }
    // No overwriting, no nonsense.
    let p = dir.path().join("c512.qcow2");
    assert!(create(&CreateOptions::new(&p, 1 << 20)).is_err());
    let mut o = CreateOptions::new(dir.path().join("x.qcow2"), 1 << 20);
    o.cluster_size = 3000;
    assert!(create(&o).is_err());
    assert!(create(&CreateOptions::new(dir.path().join("y.qcow2"), 0)).is_err());
}

/// Random writes, zeroes and discards against a model, with flushes and
/// reopens, on tiny caches (evictions) and 512-byte clusters (the
/// refcount table must grow): every read matches, every check is clean.
#[test]
fn random_workload_matches_a_model_and_checks_clean() {
    let dir = tempfile::tempdir().unwrap();
    for (cs, size, l2cache) in [
        (512u64, 24u64 << 20, 2usize),
        (4096, 8 << 20, 3),
        (65536, 16 << 20, 64),
    ] {
        let p = new_image(dir.path(), &format!("w{cs}.qcow2"), size, cs);
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng::new(cs);
        let mut img = Image::open(&p, &opts(false, l2cache, 2)).unwrap();
        for round in 0..6 {
            for _ in 0..150 {
                let len = (rng.below(64) + 1) * 512;
                let off = rng.below((size - len) / 512) * 512;
                let (o, l) = (off as usize, len as usize);
                match rng.below(10) {
                    0 => {
                        img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                        model[o..o + l].fill(0);
                    }
                    1 => {
                        img.discard(off, len).unwrap();
                        // Whole clusters only.
                        let first = off.div_ceil(cs) * cs;
                        let end = (off + len) / cs * cs;
                        if end > first {
                            model[first as usize..end as usize].fill(0);
                        }
                    }
                    _ => {
                        let data: Vec<u8> = (0..l).map(|_| rng.below(256) as u8).collect();
                        img.write(off, &data).unwrap();
                        model[o..o + l].copy_from_slice(&data);
                    }
                }
            }
            // The last rounds write far, to need more refcount blocks.
            if round == 3 {
                let data = vec![0x5a; 1 << 20];
                img.write(size - (1 << 20), &data).unwrap();
                model[(size - (1 << 20)) as usize..].copy_from_slice(&data);
            }
            let mut back = vec![0u8; size as usize];
            img.read(0, &mut back).unwrap();
            assert!(
                back == model,
                "cs {cs} round {round}: reads differ from the model"
            );
            img.flush().unwrap();
            let (errors, _) = check(&p);
            assert!(errors.is_empty(), "cs {cs} round {round}: {errors:?}");
            drop(img);
            let (errors, leaks) = check(&p);
            assert_eq!((errors, leaks), (vec![], 0), "cs {cs} after close");
            img = Image::open(&p, &opts(false, l2cache, 2)).unwrap();
        }
        let mut back = vec![0u8; size as usize];
        img.read(0, &mut back).unwrap();
        assert!(back == model);
        drop(img);
        if cs == 512 {
            // 64 entries of 256 clusters cover 8 MiB: the table had to move.
            let raw = std::fs::read(&p).unwrap();
            let h = Header::parse(&raw, raw.len() as u64).unwrap();
            assert!(
                h.refcount_table_clusters > 1,
                "the refcount table never grew"
            );
            assert_ne!(h.refcount_table_offset, 512);
        }
    }
}

#[test]
fn backing_files_read_through_and_copy_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let base: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("base.raw"), &base).unwrap();
    // raw <- mid.qcow2 <- top.qcow2, with a relative name each.
    let mut o = CreateOptions::new(dir.path().join("mid.qcow2"), 0);
    o.backing = Some("base.raw".into());
    create(&o).unwrap();
    let mid = Image::open(&dir.path().join("mid.qcow2"), &opts(false, 8, 2)).unwrap();
    assert_eq!(mid.size(), 4 << 20);
    mid.write(65536 + 100, b"mid").unwrap();
    drop(mid);
    let mut o = CreateOptions::new(dir.path().join("top.qcow2"), 8 << 20);
    o.backing = Some("mid.qcow2".into());
    create(&o).unwrap();
    let top = Image::open(&dir.path().join("top.qcow2"), &opts(false, 8, 2)).unwrap();
    let mut want = base.clone();
    want.resize(8 << 20, 0); // past the backing file: zeroes
    want[65536 + 100..65536 + 103].copy_from_slice(b"mid");
    let mut got = vec![0u8; 8 << 20];
    top.read(0, &mut got).unwrap();
    assert!(got == want, "read through the chain");
    // A partial write copies the rest of the cluster up from the chain.
    top.write(65536 + 1000, b"top").unwrap();
    want[65536 + 1000..65536 + 1003].copy_from_slice(b"top");
    // Discard over a backing file leaves zeroes, not the base's data.
    top.discard(3 << 16, 65536).unwrap();
    want[3 << 16..4 << 16].fill(0);
    top.read(0, &mut got).unwrap();
    assert!(got == want);
    drop(top);
    assert_eq!(check(&dir.path().join("top.qcow2")), (vec![], 0));
    // The base was never written.
    assert!(std::fs::read(dir.path().join("base.raw")).unwrap() == base);
}

#[test]
fn backing_loops_and_missing_backing_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    std::fs::write(dir.path().join("raw"), vec![0u8; 65536]).unwrap();
    let mut o = CreateOptions::new(&a, 1 << 20);
    o.backing = Some("raw".into());
    create(&o).unwrap();
    let mut o = CreateOptions::new(&b, 1 << 20);
    o.backing = Some("a.qcow2".into());
    create(&o).unwrap();
    // Point a at b (a qcow2): a -> b -> a.
    let mut raw = std::fs::read(&a).unwrap();
    assert_eq!(&raw[112..115], b"raw", "the backing format extension");
    raw[108..112].copy_from_slice(&5u32.to_be_bytes());
    raw[112..117].copy_from_slice(b"qcow2");
    let name_at = u64::from_be_bytes(raw[8..16].try_into().unwrap()) as usize;
    raw[name_at..name_at + 7].copy_from_slice(b"b.qcow2");
    raw[16..20].copy_from_slice(&7u32.to_be_bytes());
    std::fs::write(&a, &raw).unwrap();
    let err = Image::open(&a, &opts(true, 4, 4)).unwrap_err().to_string();
    assert!(err.contains("loop"), "{err}");
    let mut o = CreateOptions::new(dir.path().join("c.qcow2"), 1 << 20);
    o.backing = Some("missing.raw".into());
    assert!(create(&o).is_err());
}

#[test]
fn compressed_clusters_read_and_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_image(dir.path(), "z.qcow2", 1 << 20, 65536);
    let data: Vec<u8> = (0..65536u32).map(|i| (i / 7) as u8).collect();
    {
        let img = Image::open(&p, &opts(false, 8, 2)).unwrap();
        let mut m = img.meta.lock().unwrap();
        let z = compress::deflate(&data);
        let host = m.alloc(1).unwrap();
        // Unaligned inside its cluster, as qemu packs them.
        let at = host + 512;
        img.file.write_all_at(&z, at).unwrap();
        let sectors = (512 + z.len() as u64).div_ceil(512) - 1;
        let x = 62 - (16 - 8);
        m.set_entry(2, COMPRESSED | ((sectors - 1) << x) | at)
            .unwrap();
        m.flush().unwrap();
    }
    let img = Image::open(&p, &opts(false, 8, 2)).unwrap();
    let mut back = vec![0u8; 65536];
    img.read(2 << 16, &mut back).unwrap();
    assert!(back == data);
    // A 4K write into it: a new cluster with the rest inflated.
    img.write((2 << 16) + 4096, &[9u8; 4096]).unwrap();
    let mut want = data.clone();
    want[4096..8192].fill(9);
    img.read(2 << 16, &mut back).unwrap();
    assert!(back == want);
    drop(img);
    let (errors, _) = check(&p);
    assert!(errors.is_empty(), "{errors:?}");
}

/// Corrupt images: each gives a clear error at open or EIO on the
/// requests it affects, never a panic or a write outside the image.
#[test]
fn corrupt_images() {
    let dir = tempfile::tempdir().unwrap();
    let good = new_image(dir.path(), "good.qcow2", 4 << 20, 65536);
    {
        let img = Image::open(&good, &opts(false, 8, 2)).unwrap();
        img.write(0, &[1u8; 65536 * 2]).unwrap();
        img.flush().unwrap();
    }
    let raw = std::fs::read(&good).unwrap();
    let h = Header::parse(&raw, raw.len() as u64).unwrap();
    let l1 = h.l1_table_offset as usize;
    let l2 = (be64(&raw[l1..], 0) & OFFSET_MASK) as usize;
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let put = |at: usize, v: u64| -> Edit {
        Box::new(move |b: &mut Vec<u8>| b[at..at + 8].copy_from_slice(&v.to_be_bytes()))
    };
    // (what, edit, expected: "open" fails at open, "read" reads fail)
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("L1 entry unaligned", put(l1, 0x10200 | (1 << 63)), "open"),
        (
            "L2 table past the end",
            put(l1, (1 << 40) | (1 << 63)),
            "read",
        ),
        ("L2 table over the header", put(l1, 1 << 63), "read-ok"),
        (
            "L2 table over the L1 table",
            put(l1, l1 as u64 | (1 << 63)),
            "read",
        ),
        (
            "data cluster unaligned",
            put(l2, 0x30200 | (1 << 63)),
            "read",
        ),
        (
            "L2 reserved bits",
            put(l2, 0x30000 | (1 << 63) | 0x10),
            "read",
        ),
        (
            "reftable entry unaligned",
            put(h.refcount_table_offset as usize, 0x20100),
            "open",
        ),
        ("dirty bit", put(72, 1), "write"),
        ("corrupt bit", put(72, 2), "write"),
        (
            "compression type zstd",
            Box::new(|b: &mut Vec<u8>| {
                b[72..80].copy_from_slice(&8u64.to_be_bytes());
                b[100..104].copy_from_slice(&112u32.to_be_bytes());
                b[104] = 1;
            }),
            "open",
        ),
    ];
    for (what, edit, expect) in cases {
        let p = dir.path().join("bad.qcow2");
        let mut b = raw.clone();
        edit(&mut b);
        std::fs::write(&p, &b).unwrap();
        let before = std::fs::metadata(&p).unwrap().len();
        match expect {
            "open" => {
                let e = Image::open(&p, &opts(true, 8, 2)).unwrap_err();
                assert!(!e.to_string().is_empty(), "{what}");
            }
            "write" => {
                let e = Image::open(&p, &opts(false, 8, 2)).unwrap_err();
                assert!(e.to_string().contains("qemu-img check"), "{what}: {e}");
                // Read-only still works.
                let img = Image::open(&p, &opts(true, 8, 2)).unwrap();
                let mut buf = vec![0u8; 4096];
                img.read(0, &mut buf).unwrap();
                assert_eq!(buf, vec![1u8; 4096], "{what}");
            }
            _ => {
                let img = Image::open(&p, &opts(false, 8, 2)).unwrap();
                let mut buf = vec![0u8; 4096];
                let r = img.read(0, &mut buf);
                if expect == "read" {
                    assert_eq!(r, Err(Errno::IO), "{what}");
                    // Marked corrupt: no more writes, anywhere.
                    assert_eq!(img.write(1 << 20, &[2u8; 512]), Err(Errno::IO), "{what}");
                    drop(img);
                    let after = std::fs::read(&p).unwrap();
                    assert_eq!(after.len() as u64, before, "{what}: the file grew");
                    assert_ne!(after[79] & 2, 0, "{what}: corrupt bit not set");
                } else {
                    drop(img);
                }
            }
        }
    }
}

#[test]
fn the_target_advertises_and_serves() {
    use crate::slots::Engine;
    use crate::target::Request;
    let dir = tempfile::tempdir().unwrap();
    let p = new_image(dir.path(), "t.qcow2", (64 << 20) + 1000, 65536);
    let t = Qcow2Target::open(&p, false).unwrap();
    let c = t.caps();
    assert_eq!(c.size, (64 << 20) + 512, "rounded down to a sector");
    assert!(c.volatile_cache && c.fua && !c.read_only);
    assert_eq!(c.discard.unwrap().granularity, 65536);
    let mut e = Engine::new(&t, 1 << 20).unwrap();
    let mut buf = vec![3u8; 1 << 20];
    let fua = Request::new(Op::Write, 1 << 20, 1 << 20).with_flags(crate::Flags::FUA);
    assert_eq!(e.run(&t, fua, &mut buf), Ok(1 << 20));
    let mut ext = Vec::new();
    t.extents(0, 4 << 20, &mut ext).unwrap();
    assert_eq!(
        ext,
        [
            Extent::hole(1 << 20),
            Extent::data(1 << 20),
            Extent::hole(2 << 20)
        ]
    );
    assert_eq!(
        e.run(&t, Request::new(Op::WriteZeroes, 1 << 20, 65536), &mut []),
        Ok(0)
    );
    let mut back = vec![1u8; 65536];
    assert_eq!(
        e.run(&t, Request::new(Op::Read, 1 << 20, 65536), &mut back),
        Ok(65536)
    );
    assert!(back.iter().all(|&b| b == 0));
    drop(e);
    // A second writer is refused while the first holds the image.
    assert!(Qcow2Target::open(&p, false).is_err());
    drop(t);
    let ro = Qcow2Target::open(&p, true).unwrap();
    assert!(ro.caps().read_only && ro.caps().discard.is_none());
    assert_eq!(t_describe_type(&ro), "qcow2");
}

fn t_describe_type(t: &Qcow2Target) -> String {
    t.describe()["type"].as_str().unwrap_or("").to_string()
}

/// Growing the virtual size past what the L1 table maps (512-byte
/// clusters: one L1 cluster maps 2 MiB) moves the table; data written
/// before and after survives a reopen, the image checks clean (ours, and
/// qemu-img's where installed), and shrinking is refused.
#[test]
fn growing_moves_the_l1_table_and_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_image(dir.path(), "grow.qcow2", 1 << 20, 512);
    let t = Qcow2Target::open(&p, false).unwrap();
    let mut e = crate::slots::Engine::new(&t, 4096).unwrap();
    let mut w = |t: &Qcow2Target, off: u64, b: u8| {
        e.run(t, crate::Request::new(Op::Write, off, 4096), &mut [b; 4096])
            .unwrap();
    };
    w(&t, 0, 1);
    w(&t, (1 << 20) - 4096, 2);
    let l1_before = Header::parse(&std::fs::read(&p).unwrap(), 1 << 30)
        .unwrap()
        .l1_table_offset;
    assert_eq!(crate::resize::apply(&t, 8 << 20, false).unwrap(), 8 << 20);
    w(&t, (8 << 20) - 4096, 3);
    w(&t, 4 << 20, 4);
    assert!(crate::resize::apply(&t, 4 << 20, true).is_err(), "shrink");
    assert_eq!(t.size(), 8 << 20);
    drop(t);
    let raw = std::fs::read(&p).unwrap();
    let h = Header::parse(&raw, raw.len() as u64).unwrap();
    assert_eq!(h.size, 8 << 20);
    assert_ne!(h.l1_table_offset, l1_before, "the L1 table moved");
    assert_eq!(check(&p), (vec![], 0));
    let img = Image::open(&p, &opts(true, 4, 4)).unwrap();
    for (off, b) in [
        (0, 1u8),
        ((1 << 20) - 4096, 2),
        ((8 << 20) - 4096, 3),
        (4 << 20, 4),
        (2 << 20, 0),
    ] {
        let mut buf = vec![9u8; 4096];
        img.read(off, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == b), "at {off}");
    }
    // Within the table it has: the header's size only.
    drop(img);
    let t = Qcow2Target::open(&p, false).unwrap();
    crate::resize::apply(&t, (8 << 20) + 4096, false).unwrap();
    drop(t);
    assert_eq!(check(&p), (vec![], 0));
    match std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&p)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "qemu-img check: {}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(_) => crate::skip::skip(
            crate::skip::Prereq::Environment,
            "no qemu-img to check the grown image",
        ),
    }
}
