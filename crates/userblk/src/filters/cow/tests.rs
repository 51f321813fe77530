use std::path::Path;
use std::sync::atomic::AtomicU64;

use super::*;
use crate::filters::testing::{assert_refused, pattern, probe, ring_probe, run, run_on};
use crate::slots::Engine;
use crate::target::Request;

/// A base that refuses (and counts) anything but reads: the cow must
/// never send it a write, discard, write-zeroes or flush.
struct Guard {
    inner: Arc<dyn Target>,
    touched: Arc<AtomicU64>,
}

impl Target for Guard {
    fn caps(&self) -> Caps {
        Caps {
            read_only: true,
            volatile_cache: false,
            discard: None,
            write_zeroes: None,
            ..self.inner.caps()
        }
    }
    fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        if ctx.req().op != Op::Read {
            self.touched.fetch_add(1, Ordering::SeqCst);
            return Submit::Done(Err(Errno::ROFS));
        }
        self.inner.submit(ctx)
    }
    fn complete(&self, ctx: &mut Ctx<'_>, step: u16, res: i32) -> Submit {
        self.inner.complete(ctx, step, res)
    }
    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), Errno> {
        self.inner.extents(offset, len, out)
    }
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({"type": "guard", "size": self.inner.caps().size})
    }
}

/// A read-only base of `size` bytes holding `pattern(7, size)`, answering
/// inline or through the ring; and the count of modifications it was sent.
fn base(size: usize, ring: bool) -> (Arc<dyn Target>, Arc<AtomicU64>) {
    let (inner, _) = if ring { ring_probe(size) } else { probe(size) };
    let mut e = Engine::new(&*inner, size).unwrap();
    let mut data = pattern(7, size);
    let req = Request::new(Op::Write, 0, u32::try_from(size).unwrap());
    assert_eq!(e.run(&*inner, req, &mut data), Ok(req.len));
    let touched = Arc::new(AtomicU64::new(0));
    let g = Guard {
        inner,
        touched: touched.clone(),
    };
    (Arc::new(g), touched)
}

fn cow(inner: Arc<dyn Target>, spec: &str) -> Result<Cow, FilterError> {
    Cow::new(inner, Config::parse(&spec.parse().unwrap())?)
}

fn spec_for(path: &Path, rest: &str) -> String {
    format!("cow:file={}{rest}", path.display())
}

/// A small deterministic generator (xorshift64*).
struct Rand(u64);

impl Rand {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn options_parse_and_print() {
    let c = Config::parse(&"cow:file=/x/o.img,cluster=4K,keep=no".parse().unwrap()).unwrap();
    assert_eq!(c.cluster, Some(4096));
    assert_eq!(c.keep, Some(false));
    assert_eq!(c.to_string(), "cow:file=/x/o.img,cluster=4K,keep=no");
    assert_eq!(
        Config::parse(&"cow".parse().unwrap()).unwrap(),
        Config::default()
    );
    assert_refused(
        Config::parse,
        &[
            ("cow:cluster=3000", "power of two"),
            ("cow:cluster=4M", "power of two"),
            ("cow:keep=yes", "keep=yes needs file="),
            ("cow:keep=maybe", "not yes or no"),
            ("cow:file=", "empty path"),
            (
                "cow:size=1G",
                "unknown option 'size' (known: file, cluster, keep)",
            ),
        ],
    );
}

#[test]
fn a_read_only_base_becomes_a_writable_device() {
    let (b, _) = base(1 << 20, false);
    assert!(b.caps().read_only);
    let f = cow(b, "cow:cluster=64K").unwrap();
    let c = f.caps();
    assert!(!c.read_only && c.volatile_cache && c.fua);
    assert_eq!(c.size, 1 << 20);
    assert_eq!(c.discard, Some(RangeOpCaps::with_granularity(65536)));
    assert_eq!(c.write_zeroes, Some(RangeOpCaps::with_granularity(512)));
    assert_eq!(f.describe()["type"], "guard");
    assert_eq!(f.describe()["filters"][0], "cow:cluster=64K");
}

/// Random reads, writes (some FUA), write-zeroes, discards and flushes
/// against a byte model, with reopens of the overlay on the way: byte
/// for byte the same, and the base never touched.
#[test]
fn random_ops_match_a_model_and_never_touch_the_base() {
    let dir = tempfile::tempdir().unwrap();
    // The last case's base does not end on a cluster boundary.
    for (i, (cluster, ring, size)) in [
        (4096u32, false, 1usize << 20),
        (65536, true, 1 << 20),
        (4096, true, 1 << 20),
        (65536, false, 1 << 20),
        (65536, true, (1 << 20) + 3 * 512),
    ]
    .into_iter()
    .enumerate()
    {
        let (size32, size64) = (u32::try_from(size).unwrap(), size as u64);
        let path = dir.path().join(format!("o{i}.cow"));
        let spec = spec_for(&path, &format!(",cluster={cluster}"));
        let (b, touched) = base(size, ring);
        let mut model = pattern(7, size);
        // Bytes a discard left undefined, until written again.
        let mut known = vec![true; size];
        let mut f = cow(b.clone(), &spec).unwrap();
        let mut e = Engine::new(&f, 2 << 20).unwrap();
        let mut copy_ups = 0;
        let mut rng = Rand(0x9e37_79b9_7f4a_7c15 ^ u64::try_from(i).unwrap());
        for step in 0..400 {
            let sectors = size64 / 512;
            let off = rng.below(sectors) * 512;
            let max = (size64 - off) / 512;
            let len = (rng.below(max.min(160)) + 1) * 512;
            let (o, n) = (usize::try_from(off).unwrap(), usize::try_from(len).unwrap());
            let len32 = u32::try_from(len).unwrap();
            match rng.below(20) {
                0..=6 => {
                    let (r, data) = run_on(&mut e, &f, Request::new(Op::Read, off, len32));
                    assert_eq!(r, Ok(len32), "step {step}");
                    for (k, (got, want)) in data.iter().zip(&model[o..o + n]).enumerate() {
                        assert!(
                            !known[o + k] || got == want,
                            "step {step}: byte {} differs",
                            o + k
                        );
                    }
                }
                7..=12 => {
                    let mut data = pattern(u8::try_from(step % 251).unwrap(), n);
                    let mut req = Request::new(Op::Write, off, len32);
                    if rng.below(4) == 0 {
                        req = req.with_flags(Flags::FUA);
                    }
                    assert_eq!(e.run(&f, req, &mut data), Ok(len32), "step {step}");
                    model[o..o + n].copy_from_slice(&data);
                    known[o..o + n].fill(true);
                }
                13..=14 => {
                    let mut req = Request::new(Op::WriteZeroes, off, len32);
                    if rng.below(2) == 0 {
                        req = req.with_flags(Flags::NOUNMAP);
                    }
                    assert_eq!(e.run(&f, req, &mut []), Ok(0), "step {step}");
                    model[o..o + n].fill(0);
                    known[o..o + n].fill(true);
                }
                15 => {
                    let req = Request::new(Op::Discard, off, len32);
                    assert_eq!(e.run(&f, req, &mut []), Ok(0), "step {step}");
                    known[o..o + n].fill(false);
                }
                16..=17 => {
                    assert_eq!(run_on(&mut e, &f, Request::new(Op::Flush, 0, 0)).0, Ok(0));
                }
                _ => {
                    // Close and reopen: everything completed is still there.
                    drop(e);
                    copy_ups += f.counters().copy_ups;
                    drop(f);
                    f = cow(b.clone(), &spec).unwrap();
                    assert!(f.reopened());
                    e = Engine::new(&f, 2 << 20).unwrap();
                }
            }
        }
        let (r, all) = run_on(&mut e, &f, Request::new(Op::Read, 0, size32));
        assert_eq!(r, Ok(size32));
        for (k, (got, want)) in all.iter().zip(&model).enumerate() {
            assert!(
                !known[k] || got == want,
                "case {i}: byte {k} differs at the end"
            );
        }
        assert!(
            copy_ups + f.counters().copy_ups > 0,
            "case {i}: no copy-ups were exercised"
        );
        assert_eq!(
            touched.load(Ordering::SeqCst),
            0,
            "case {i}: the base was sent a modification"
        );
        // The base still holds what it started with.
        let mut eb = Engine::new(&*b, 2 << 20).unwrap();
        let (_, base_data) = run_on(&mut eb, &*b, Request::new(Op::Read, 0, size32));
        assert!(base_data == pattern(7, size), "case {i}: the base changed");
    }
}

#[test]
fn reads_spanning_base_and_overlay_are_stitched() {
    for ring in [false, true] {
        let (b, touched) = base(1 << 20, ring);
        let f = cow(b, "cow:cluster=4K").unwrap();
        let mut e = Engine::new(&f, 1 << 20).unwrap();
        // Cluster 1 whole, and 512 bytes in the middle of cluster 3 (a copy-up).
        let mut one = vec![0xAA; 4096];
        assert_eq!(
            e.run(&f, Request::new(Op::Write, 4096, 4096), &mut one),
            Ok(4096)
        );
        let mut mid = vec![0xBB; 512];
        assert_eq!(
            e.run(&f, Request::new(Op::Write, 3 * 4096 + 1024, 512), &mut mid),
            Ok(512)
        );
        assert_eq!(
            f.counters(),
            CowCounters {
                clusters: 2,
                copy_ups: 1
            }
        );
        let (r, got) = run_on(&mut e, &f, Request::new(Op::Read, 0, 5 * 4096));
        assert_eq!(r, Ok(5 * 4096));
        let mut want = pattern(7, 1 << 20)[..5 * 4096].to_vec();
        want[4096..8192].fill(0xAA);
        want[3 * 4096 + 1024..3 * 4096 + 1536].fill(0xBB);
        assert!(got == want, "ring {ring}");
        // All in the overlay: read from the file alone.
        let (r, got) = run_on(&mut e, &f, Request::new(Op::Read, 4096, 4096));
        assert_eq!((r, got), (Ok(4096), vec![0xAA; 4096]));
        assert_eq!(touched.load(Ordering::SeqCst), 0);
    }
}

#[test]
fn concurrent_partial_writes_to_one_cluster_copy_it_up_once() {
    let (b, touched) = base(1 << 20, true);
    let f = Arc::new(cow(b, "cow:cluster=64K").unwrap());
    // Eight threads each write their own 512-byte pieces of clusters 0..4.
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut e = Engine::new(&*f, 4096).unwrap();
                for c in 0..4u64 {
                    for k in 0..16u64 {
                        let off = c * 65536 + (u64::from(t) * 16 + k) * 512;
                        let mut d = vec![t + 1; 512];
                        assert_eq!(
                            e.run(&*f, Request::new(Op::Write, off, 512), &mut d),
                            Ok(512)
                        );
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        f.counters(),
        CowCounters {
            clusters: 4,
            copy_ups: 4
        }
    );
    let (_, got) = run(&*f, Op::Read, 0, 4 * 65536);
    for c in 0..4usize {
        for t in 0..8usize {
            let at = c * 65536 + t * 16 * 512;
            assert!(got[at..at + 16 * 512]
                .iter()
                .all(|&x| usize::from(x) == t + 1));
        }
        // The rest of each cluster is the base's, copied up once.
        let rest = c * 65536 + 8 * 16 * 512..(c + 1) * 65536;
        assert!(got[rest.clone()] == pattern(7, 1 << 20)[rest]);
    }
    assert_eq!(touched.load(Ordering::SeqCst), 0);
}

#[test]
fn overlays_reopen_only_for_the_same_base() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.cow");
    let spec = spec_for(&path, ",cluster=4K");
    let (b, _) = base(1 << 20, false);
    let f = cow(b.clone(), &spec).unwrap();
    assert!(!f.reopened());
    assert_eq!(run(&f, Op::Write, 8192, 4096).0, Ok(4096));
    // A second user of the same overlay is refused while the first has it.
    let e = cow(b.clone(), &spec).unwrap_err().to_string();
    assert!(e.contains("in use by another process"), "{e}");
    drop(f);
    // Reopened without cluster=: the file's is used.
    let f = cow(b.clone(), &spec_for(&path, "")).unwrap();
    assert!(f.reopened());
    assert_eq!(f.counters().clusters, 1);
    assert_eq!(run(&f, Op::Read, 8192, 4096).1, pattern(1, 4096));
    drop(f);
    let e = cow(b.clone(), &spec_for(&path, ",cluster=64K"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the overlay has 4K clusters, not cluster=64K"),
        "{e}"
    );
    let (other, _) = base(2 << 20, false);
    let e = cow(other, &spec).unwrap_err().to_string();
    assert!(
        e.contains("the overlay is for a base of 1048576 bytes, but this base has 2097152 bytes"),
        "{e}"
    );
    // Something that is not an overlay is never used (nor overwritten).
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"precious data").unwrap();
    let e = cow(b.clone(), &spec_for(&junk, ""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a cow overlay"), "{e}");
    assert_eq!(std::fs::read(&junk).unwrap(), b"precious data");
    // A damaged header is named as such.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let e = cow(b.clone(), &spec).unwrap_err().to_string();
    assert!(e.contains("damaged"), "{e}");
    // keep=no: the file goes at exit.
    let gone = dir.path().join("gone.cow");
    drop(cow(b, &spec_for(&gone, ",keep=no")).unwrap());
    assert!(!gone.exists());
}

#[test]
fn after_a_crash_flushed_writes_survive_and_unflushed_clusters_are_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.cow");
    let spec = spec_for(&path, ",cluster=4K");
    let (b, _) = base(1 << 20, false);
    let mut f = cow(b.clone(), &spec).unwrap();
    let mut e = Engine::new(&f, 1 << 20).unwrap();
    let mut w = |f: &Cow, req: Request, byte: u8| {
        let mut d = vec![byte; req.len as usize];
        assert_eq!(e.run(f, req, &mut d), Ok(req.len));
    };
    w(&f, Request::new(Op::Write, 0, 4096), 1); // flushed below
    w(&f, Request::new(Op::Write, 8192 + 512, 512), 2); // a copy-up, flushed below
    assert_eq!(run(&f, Op::Flush, 0, 0).0, Ok(0));
    w(
        &f,
        Request::new(Op::Write, 32768, 4096).with_flags(Flags::FUA),
        6,
    ); // FUA
    w(&f, Request::new(Op::Write, 512, 512), 3); // an overwrite in a flushed cluster
    w(&f, Request::new(Op::Write, 16384, 4096), 4); // a new cluster, not flushed
    w(&f, Request::new(Op::Write, 24576 + 1024, 512), 5); // a copy-up, not flushed
    f.exit_durable = false; // the daemon is killed: nothing more is written
    drop(f);
    let f = cow(b, &spec).unwrap();
    let base_data = pattern(7, 1 << 20);
    let read = |off: u64| run(&f, Op::Read, off, 4096).1;
    let mut want = vec![1; 4096];
    want[512..1024].fill(3);
    assert_eq!(read(0), want);
    let mut want = base_data[8192..12288].to_vec();
    want[512..1024].fill(2);
    assert_eq!(read(8192), want);
    assert!(
        read(16384) == base_data[16384..20480],
        "an unflushed new cluster is the base's"
    );
    assert!(
        read(24576) == base_data[24576..28672],
        "an unflushed copy-up is the base's, whole"
    );
    assert_eq!(read(32768), vec![6; 4096]);
}

#[test]
fn zeroes_and_discards_leave_holes_and_extents_say_so() {
    let (b, _) = base(1 << 20, false);
    let f = cow(b, "cow:cluster=4K").unwrap();
    assert_eq!(run(&f, Op::Write, 0, 8192).0, Ok(8192));
    assert_eq!(run(&f, Op::WriteZeroes, 16384, 8192).0, Ok(0));
    // A discard of part of a cluster not in the overlay leaves it alone;
    // of whole clusters, makes them holes.
    assert_eq!(run(&f, Op::Discard, 32768 + 512, 7680).0, Ok(0));
    assert_eq!(
        f.counters(),
        CowCounters {
            clusters: 5,
            copy_ups: 0
        }
    );
    let (_, got) = run(&f, Op::Read, 16384, 8192);
    assert_eq!(got, vec![0; 8192]);
    let base_data = pattern(7, 1 << 20);
    let (_, got) = run(&f, Op::Read, 32768, 4096);
    assert!(got == base_data[32768..36864]);
    let (_, got) = run(&f, Op::Read, 36864, 4096);
    assert_eq!(got, vec![0; 4096]);
    let mut out = Vec::new();
    f.extents(0, 1 << 20, &mut out).unwrap();
    assert_eq!(out.iter().map(|e| e.len).sum::<u64>(), 1 << 20, "{out:?}");
    let hole_at = |at: u64| {
        let mut pos = 0;
        for e in &out {
            if at < pos + e.len {
                return e.hole;
            }
            pos += e.len;
        }
        panic!("{at} not covered");
    };
    // Overlay data, base data, zeroed clusters (holes in the file), the
    // base, the discarded cluster (a hole), the base.
    for (at, hole) in [(0, false), (8192, false), (16384, true), (20480, true)] {
        assert_eq!(hole_at(at), hole, "{at}: {out:?}");
    }
    for (at, hole) in [(32768, false), (36864, true), (40960, false)] {
        assert_eq!(hole_at(at), hole, "{at}: {out:?}");
    }
}

#[test]
fn a_cluster_smaller_than_the_base_block_is_refused() {
    let (inner, _) = probe(1 << 20);
    struct Big(Arc<dyn Target>);
    impl Target for Big {
        fn caps(&self) -> Caps {
            Caps {
                logical_block_size: 4096,
                ..self.0.caps()
            }
        }
        fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
            self.0.submit(ctx)
        }
    }
    let e = cow(Arc::new(Big(inner)), "cow:cluster=512")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("smaller than the base's 4096-byte blocks"),
        "{e}"
    );
}
