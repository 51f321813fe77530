use super::*;
use crate::filters::testing::{assert_refused, pattern, probe, ring_probe, run, run_on, Seen};
use crate::slots::Engine;
use crate::target::Request;

fn cache(inner: Arc<dyn Target>, spec: &str) -> Result<Cache, FilterError> {
    Cache::new(inner, Config::parse(&spec.parse().unwrap())?)
}

/// The ops the inner target saw, in order (offsets for data ops).
fn ops(seen: &Seen) -> Vec<(Op, u64, u32)> {
    seen.take()
        .iter()
        .map(|r| (r.op, r.offset, r.len))
        .collect()
}

fn counts(c: &Cache) -> (u64, u64, u64, u64) {
    let k = c.counters();
    (k.hits, k.misses, k.inserts, k.evictions)
}

#[test]
fn options_parse_and_print() {
    let c = Config::parse(&"cache".parse().unwrap()).unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.to_string(), "cache:size=256M,block=64K");
    let c = Config::parse(
        &"cache:size=1G,block=4K,file=/x/c,mode=writeback"
            .parse()
            .unwrap(),
    )
    .unwrap();
    assert!(c.writeback);
    assert_eq!(
        c.to_string(),
        "cache:size=1G,block=4K,file=/x/c,mode=writeback"
    );
    assert_refused(
        Config::parse,
        &[
            ("cache:block=3000", "power of two"),
            ("cache:block=2M", "power of two"),
            ("cache:size=32K", "holds no 64K block"),
            ("cache:mode=sometimes", "not writethrough or writeback"),
            (
                "cache:sise=1G",
                "unknown option 'sise' (known: size, block, file, mode)",
            ),
        ],
    );
}

/// A scripted sequence on a four-block cache: hits, misses, inserts and
/// evictions exactly as LRU says, and only misses reach the target.
#[test]
fn hits_misses_and_evictions_are_exact() {
    for (inner, seen) in [probe(1 << 20), ring_probe(1 << 20)] {
        let c = cache(inner, "cache:size=16K,block=4K").unwrap();
        let mut e = Engine::new(&c, 1 << 20).unwrap();
        let mut read = |off: u64, len: u32| {
            let (r, _) = run_on(&mut e, &c, Request::new(Op::Read, off, len));
            assert_eq!(r, Ok(len));
        };
        read(0, 4096);
        assert_eq!(counts(&c), (0, 1, 1, 0));
        read(0, 4096);
        assert_eq!(counts(&c), (1, 1, 1, 0));
        read(4096, 12288); // blocks 1, 2, 3: the cache is full
        assert_eq!(counts(&c), (1, 2, 4, 0));
        read(16384, 4096); // block 4 evicts block 0 (least recently used)
        assert_eq!(counts(&c), (1, 3, 5, 1));
        read(4096, 4096); // block 1 is still there; now most recently used
        assert_eq!(counts(&c), (2, 3, 5, 1));
        read(0, 4096); // block 0 again: evicts block 2
        assert_eq!(counts(&c), (2, 4, 6, 2));
        read(8192, 4096); // block 2 is gone: evicts block 3
        assert_eq!(counts(&c), (2, 5, 7, 3));
        read(0, 8192); // blocks 0 and 1: a hit across two blocks
        assert_eq!(counts(&c), (3, 5, 7, 3));
        // Part of a block: that part is cached, and only it.
        read(20480 + 512, 1024); // block 5, evicts block 4
        assert_eq!(counts(&c), (3, 6, 8, 4));
        read(20480 + 1024, 512);
        assert_eq!(counts(&c), (4, 6, 8, 4));
        read(20480, 4096); // the rest of block 5 was never read: a miss, no new block
        assert_eq!(counts(&c), (4, 7, 8, 4));
        read(20480, 4096);
        assert_eq!(counts(&c), (5, 7, 8, 4));
        let down = ops(&seen);
        assert_eq!(down.len(), 7, "only misses go down: {down:?}");
        assert!(down.iter().all(|(op, ..)| *op == Op::Read));
        assert_eq!(c.counters().blocks, 4);
        assert_eq!(c.counters().hit_bytes, 4096 + 4096 + 8192 + 512 + 4096);
    }
}

#[test]
fn write_through_updates_cached_blocks_and_discards_drop_them() {
    for (inner, seen) in [probe(1 << 20), ring_probe(1 << 20)] {
        let c = cache(inner.clone(), "cache:size=64K,block=4K").unwrap();
        assert_eq!(
            c.caps(),
            inner.caps(),
            "write-through changes nothing advertised"
        );
        assert_eq!(run(&c, Op::Read, 0, 8192).0, Ok(8192));
        // A write over a cached block: down, and the block takes its data.
        assert_eq!(run(&c, Op::Write, 1024, 2048).0, Ok(2048));
        let (r, got) = run(&c, Op::Read, 0, 4096);
        let mut want = vec![0; 4096];
        want[1024..3072].copy_from_slice(&pattern(1, 2048));
        assert_eq!((r, got), (Ok(4096), want));
        assert_eq!(counts(&c).0, 1, "served from the cache");
        // A write to an uncached block is not cached.
        assert_eq!(run(&c, Op::Write, 65536, 4096).0, Ok(4096));
        assert_eq!(run(&c, Op::Read, 65536, 4096).1, pattern(1, 4096));
        assert_eq!(counts(&c).1, 2);
        // Write-zeroes drops what it covers.
        assert_eq!(run(&c, Op::WriteZeroes, 0, 4096).0, Ok(0));
        assert_eq!(run(&c, Op::Read, 0, 4096).1, vec![0; 4096]);
        assert_eq!(counts(&c).1, 3);
        assert_eq!(
            ops(&seen),
            [
                (Op::Read, 0, 8192),
                (Op::Write, 1024, 2048),
                (Op::Write, 65536, 4096),
                (Op::Read, 65536, 4096),
                (Op::WriteZeroes, 0, 4096),
                (Op::Read, 0, 4096),
            ]
        );
    }
}

/// Write-back: writes stay in the cache until a flush, which goes down
/// only after them; FUA writes go down at once; evictions write back.
#[test]
fn write_back_flushes_in_order() {
    for (inner, seen) in [probe(1 << 20), ring_probe(1 << 20)] {
        let c = cache(inner.clone(), "cache:size=16K,block=4K,mode=writeback").unwrap();
        assert!(c.caps().volatile_cache && c.caps().fua);
        assert_eq!(run(&c, Op::Write, 0, 4096).0, Ok(4096));
        assert_eq!(run(&c, Op::Write, 8192 + 512, 1024).0, Ok(1024));
        assert_eq!(ops(&seen), [], "writes complete into the cache");
        // The target's data under a dirty part is stale; reads see the cache.
        let (r, got) = run(&c, Op::Read, 8192, 4096);
        let mut want = vec![0; 4096];
        want[512..1536].copy_from_slice(&pattern(1, 1024));
        assert_eq!((r, got), (Ok(4096), want));
        assert_eq!(ops(&seen), [(Op::Read, 8192, 4096)]);
        assert_eq!(run(&c, Op::Flush, 0, 0).0, Ok(0));
        assert_eq!(
            ops(&seen),
            [
                (Op::Write, 0, 4096),
                (Op::Write, 8192 + 512, 1024),
                (Op::Flush, 0, 0)
            ],
            "dirty data first, then the flush"
        );
        assert_eq!(run(&*inner, Op::Read, 0, 4096).1, pattern(1, 4096));
        seen.take();
        // Clean now: a second flush has nothing to write.
        assert_eq!(run(&c, Op::Flush, 0, 0).0, Ok(0));
        assert_eq!(ops(&seen), [(Op::Flush, 0, 0)]);
        // FUA: down at once, and the target flushed.
        let fua = Request::new(Op::Write, 4096, 4096).with_flags(Flags::FUA);
        let mut e = Engine::new(&c, 4096).unwrap();
        assert_eq!(run_on(&mut e, &c, fua).0, Ok(4096));
        assert_eq!(ops(&seen), [(Op::Write, 4096, 4096), (Op::Flush, 0, 0)]);
        // Four dirty blocks in a four-block cache, then a fifth: the
        // oldest is written back to make room.
        for b in [16u64, 17, 18, 19, 20] {
            assert_eq!(run(&c, Op::Write, b * 4096, 4096).0, Ok(4096));
        }
        assert_eq!(ops(&seen), [(Op::Write, 16 * 4096, 4096)]);
        assert_eq!(c.counters().writebacks, 4);
        // Write-zeroes writes dirty data under it back first.
        assert_eq!(run(&c, Op::WriteZeroes, 17 * 4096, 4096).0, Ok(0));
        assert_eq!(
            ops(&seen),
            [
                (Op::Write, 17 * 4096, 4096),
                (Op::WriteZeroes, 17 * 4096, 4096)
            ]
        );
        assert_eq!(run(&c, Op::Read, 17 * 4096, 4096).1, vec![0; 4096]);
        seen.take();
        // At exit, what is dirty goes down, then a flush.
        drop(c);
        assert_eq!(
            ops(&seen),
            [
                (Op::Write, 18 * 4096, 4096),
                (Op::Write, 19 * 4096, 4096),
                (Op::Write, 20 * 4096, 4096),
                (Op::Flush, 0, 0)
            ]
        );
    }
}

fn us(n: u64) -> usize {
    usize::try_from(n).unwrap()
}

fn u32_of(n: u64) -> u32 {
    u32::try_from(n).unwrap()
}

/// A small deterministic generator (xorshift64*).
struct Rand(u64);

impl Rand {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Random reads, writes, zeroes and flushes through a small cache (so it
/// evicts all the time) against a byte model, in both modes; in the end
/// the target holds the model.
#[test]
fn random_ops_match_a_model() {
    const SIZE: usize = 256 << 10;
    let dir = tempfile::tempdir().unwrap();
    let specs = [
        "cache:size=32K,block=4K".to_string(),
        "cache:size=64K,block=16K,mode=writeback".to_string(),
        format!(
            "cache:size=32K,block=8K,mode=writeback,file={}",
            dir.path().join("c").display()
        ),
    ];
    for (i, spec) in specs.iter().enumerate() {
        for (inner, _) in [probe(SIZE), ring_probe(SIZE)] {
            let c = cache(inner.clone(), spec).unwrap();
            let mut e = Engine::new(&c, 1 << 20).unwrap();
            let mut model = vec![0u8; SIZE];
            let mut rng = Rand(0x1234_5678 + i as u64);
            for step in 0..1500 {
                let off = rng.below(SIZE as u64 / 512) * 512;
                let len = (rng.below(((SIZE as u64 - off) / 512).min(48)) + 1) * 512;
                let (o, n) = (us(off), us(len));
                let len32 = u32::try_from(len).unwrap();
                match rng.below(10) {
                    0..=4 => {
                        let (r, got) = run_on(&mut e, &c, Request::new(Op::Read, off, len32));
                        assert_eq!(r, Ok(len32));
                        assert!(
                            got == model[o..o + n],
                            "{spec}: step {step}: read {off}+{len} differs"
                        );
                    }
                    5..=7 => {
                        let mut d = pattern(u8::try_from(step % 251).unwrap(), n);
                        let mut req = Request::new(Op::Write, off, len32);
                        if rng.below(5) == 0 {
                            req = req.with_flags(Flags::FUA);
                        }
                        assert_eq!(e.run(&c, req, &mut d), Ok(len32));
                        model[o..o + n].copy_from_slice(&d);
                    }
                    8 => {
                        assert_eq!(
                            e.run(&c, Request::new(Op::WriteZeroes, off, len32), &mut []),
                            Ok(0)
                        );
                        model[o..o + n].fill(0);
                    }
                    _ => assert_eq!(run_on(&mut e, &c, Request::new(Op::Flush, 0, 0)).0, Ok(0)),
                }
            }
            let k = c.counters();
            assert!(
                k.hits > 0 && k.misses > 0 && k.evictions > 0,
                "{spec}: {k:?}"
            );
            drop(e);
            drop(c);
            assert!(
                run(&*inner, Op::Read, 0, u32_of(SIZE as u64)).1 == model,
                "{spec}: the target differs"
            );
        }
    }
    assert!(
        !dir.path().join("c").exists(),
        "the cache file is removed at exit"
    );
}

/// Threads on disjoint ranges, sharing the shards: each sees its own data.
#[test]
fn threads_share_the_cache() {
    const PART: u64 = 256 << 10;
    for spec in [
        "cache:size=512K,block=4K",
        "cache:size=512K,block=4K,mode=writeback",
    ] {
        let (inner, _) = probe(us(4 * PART));
        let c = Arc::new(cache(inner.clone(), spec).unwrap());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let c = c.clone();
                let spec = spec.to_string();
                std::thread::spawn(move || {
                    let mut e = Engine::new(&*c, 64 << 10).unwrap();
                    let mut model = vec![0u8; us(PART)];
                    let mut rng = Rand(99 + t);
                    for step in 0..800u32 {
                        let off = rng.below(PART / 4096) * 4096;
                        let len = (rng.below(((PART - off) / 4096).min(8)) + 1) * 4096;
                        let (o, n) = (us(off), us(len));
                        let req = |op| Request::new(op, t * PART + off, u32_of(len));
                        if rng.below(3) == 0 {
                            let mut d = pattern(u8::try_from(step % 200).unwrap(), n);
                            assert_eq!(e.run(&*c, req(Op::Write), &mut d), Ok(u32_of(len)));
                            model[o..o + n].copy_from_slice(&d);
                        } else {
                            let (r, got) = run_on(&mut e, &*c, req(Op::Read));
                            assert_eq!(r, Ok(u32_of(len)));
                            assert!(got == model[o..o + n], "{spec}: thread {t} step {step}");
                        }
                    }
                    model
                })
            })
            .collect();
        let models: Vec<Vec<u8>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(c.counters().hits > 0);
        assert_eq!(run(&*c, Op::Flush, 0, 0).0, Ok(0));
        let (_, all) = run(&*inner, Op::Read, 0, u32_of(4 * PART));
        assert!(all == models.concat(), "{spec}");
    }
}

#[test]
fn a_cache_file_is_never_someone_elses_file() {
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("precious");
    std::fs::write(&precious, b"data").unwrap();
    let (inner, _) = probe(1 << 20);
    let spec = |p: &std::path::Path| format!("cache:size=64K,block=4K,file={}", p.display());
    let e = cache(inner.clone(), &spec(&precious))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is not a cache file; refusing to overwrite it"),
        "{e}"
    );
    assert_eq!(std::fs::read(&precious).unwrap(), b"data");
    let path = dir.path().join("c");
    let c = cache(inner.clone(), &spec(&path)).unwrap();
    assert_eq!(run(&c, Op::Read, 0, 8192).0, Ok(8192));
    assert_eq!(run(&c, Op::Read, 4096, 4096).0, Ok(4096));
    assert_eq!(counts(&c), (1, 1, 2, 0));
    let e = cache(inner.clone(), &spec(&path)).unwrap_err().to_string();
    assert!(e.contains("in use"), "{e}");
    drop(c);
    assert!(!path.exists(), "removed at exit");
    // A file an earlier cache left behind (its daemon was killed) is taken over.
    std::fs::write(&path, MAGIC).unwrap();
    let c = cache(inner, &spec(&path)).unwrap();
    assert_eq!(run(&c, Op::Read, 0, 4096).1, vec![0; 4096]);
    drop(c);
    assert!(!path.exists());
}
