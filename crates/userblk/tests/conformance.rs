//! Target conformance: one suite of semantic checks, written once against
//! `&dyn Target` and run for every built-in target through [`Engine`], the
//! same validate/submit/complete path the ublk queue loop uses.
//!
//! Each (target, check) pair is its own test, named `<target>::<check>`.
//! A check skips an op only where the target's caps say it is unsupported,
//! and asserts that they do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{len32, pattern, us, Backing, Dev, Fixture, MAX_IO};
use userblk::slots::Engine;
use userblk::target::Errno;
use userblk::targets::FileTarget;
use userblk::{Op, Request, Target};

type Check = fn(&dyn Target, &Fixture);

/// Run `check` on a fresh fixture; a fixture that cannot be made here
/// (`None`: its server is not installed) has reported the skip.
fn run<F: Into<Option<Fixture>>>(make: fn() -> F, check: Check) {
    if let Some(fx) = make().into() {
        check(fx.target(), &fx);
    }
}

/// One `#[test]` per check for the fixture `$make`.
macro_rules! tests {
    ($make:path => $($check:ident),+ $(,)?) => {
        $(
            #[test]
            fn $check() {
                crate::run($make, crate::$check);
            }
        )+
    };
}

/// Checks every target must pass.
macro_rules! common {
    ($make:path) => {
        tests!($make =>
            caps_consistent,
            initial_contents,
            write_read_back,
            out_of_range_is_eio,
            misaligned_is_eio,
            modifications_follow_read_only,
            discard_reads_zero,
            write_zeroes_reads_zero,
            flush_ok,
            fua_write,
            large_request,
        );
    };
}

/// Checks for targets that store data somewhere measurable.
macro_rules! storage {
    ($make:path) => {
        tests!($make => discard_deallocates, write_zeroes_nounmap_stays_allocated);
    };
}

/// Checks for targets backed by a file.
macro_rules! file {
    ($make:path) => {
        tests!($make => data_lands_in_file_window, data_survives_reopen);
    };
}

/// The instances: `module = fixture => check groups;`, each test named
/// `<module>::<check>`.
macro_rules! instances {
    ($($name:ident = $make:ident => $($group:ident)+;)+) => {
        $(
            mod $name {
                $($group!(crate::common::$make);)+
            }
        )+
    };
}

instances! {
    null = null => common;
    mem = mem => common storage;
    filters_pass_through = mem_pass_through_stack => common storage;
    filters_offset_window = mem_offset_window => common storage;
    filters_read_only = mem_read_only => common;
    filters_cache = mem_cache => common storage;
    filters_cache_writeback = cache_writeback => common;
    filters_flakey = flakey => common;
    filters_cow = cow => common;
    file_direct = file_direct => common storage file;
    file_buffered = file_buffered => common storage file;
    file_tmpfs = file_tmpfs => common storage file;
    file_offset = file_offset => common storage file;
    file_read_only = file_read_only => common storage file;
    qcow2 = qcow2 => common;
    qcow2_backed = qcow2_backed => common;
    nbd = nbd => common;
    s3 = s3 => common;
}

// ---------------------------------------------------------------------------
// Helpers

fn lbs(t: &dyn Target) -> u64 {
    u64::from(t.caps().logical_block_size)
}

/// Read `len` bytes at `off` and compare with the model, naming the first difference.
fn assert_reads(dev: &mut Dev<'_>, model: &common::Model, off: u64, len: usize, what: &str) {
    let got = dev
        .read(off, len)
        .unwrap_or_else(|e| panic!("{what}: read {off}+{len}: {e}"));
    assert_same(&got, model.get(off, len), off, what);
}

/// Compare device bytes starting at device offset `base`, reporting the first mismatch.
fn assert_same(got: &[u8], want: &[u8], base: u64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let end = (i + 16).min(got.len());
        panic!(
            "{what}: first difference at device offset {} (got {:02x?}, want {:02x?})",
            base + i as u64,
            &got[i..end],
            &want[i..end]
        );
    }
}

fn assert_device_is(dev: &mut Dev<'_>, model: &common::Model, what: &str) {
    let all = dev.read_all();
    assert_same(&all, model.all(), 0, what);
}

/// For an op the caps do not offer: assert they say so, and that it is refused.
fn assert_unsupported(t: &dyn Target, dev: &mut Dev<'_>, op: Op, len: u64) {
    let caps = t.caps();
    assert!(!caps.supports(op), "{op:?} declared but skipped");
    let want = if caps.read_only {
        Errno::IO
    } else {
        Errno::OPNOTSUPP
    };
    let r = match op {
        Op::Discard => dev.discard(0, len),
        Op::WriteZeroes => dev.write_zeroes(0, len, false),
        _ => unreachable!(),
    };
    assert_eq!(r, Err(want), "unsupported {op:?}");
}

// ---------------------------------------------------------------------------
// Checks every target must pass

fn caps_consistent(t: &dyn Target, fx: &Fixture) {
    let caps = t.caps();
    caps.check()
        .unwrap_or_else(|e| panic!("caps {caps:?} fail their own check: {e}"));
    assert_eq!(caps, t.caps(), "caps must not change");
    assert_eq!(caps.size, fx.size, "size");
    assert_eq!(caps.read_only, fx.read_only, "read_only");
    assert!(caps.supports(Op::Read) && caps.supports(Op::Flush));
    assert_eq!(caps.supports(Op::Write), !fx.read_only);
    if fx.read_only {
        assert!(!caps.supports(Op::Discard) && !caps.supports(Op::WriteZeroes));
    }
    for r in [caps.discard, caps.write_zeroes].into_iter().flatten() {
        assert!(r.granularity >= caps.logical_block_size);
        assert!(r.max_bytes >= u64::from(r.granularity));
    }
    if let Some(max) = caps.max_request {
        assert!(max >= caps.logical_block_size);
    }
    let desc = t.describe();
    if !matches!(
        fx.backing,
        Backing::Filtered { .. } | Backing::Other { filter: true, .. }
    ) {
        // A filter describes its target (and itself in `filters`).
        assert_eq!(desc["size"], serde_json::json!(fx.size), "describe: {desc}");
    }
    match &fx.backing {
        Backing::Null(_) | Backing::Mem(_) | Backing::Filtered { .. } => {
            assert_eq!(caps.logical_block_size, 512);
            assert!(!caps.volatile_cache, "nothing to flush");
            if !fx.read_only {
                assert!(caps.discard.is_some() && caps.write_zeroes.is_some());
            }
        }
        Backing::File(ft, f) => {
            assert!(caps.volatile_cache && caps.fua, "file needs flush and FUA");
            if !fx.read_only {
                // Every filesystem the suite uses can punch holes.
                assert!(caps.discard.is_some() && caps.write_zeroes.is_some());
            }
            assert_eq!(Some(ft.is_direct()), fx.direct, "O_DIRECT in use");
            assert_eq!(desc["offset"], serde_json::json!(f.opts.offset));
        }
        // Their own unit tests pin their caps down.
        Backing::Other { .. } => {}
    }
    assert!(Engine::new(t, MAX_IO).is_ok());
}

fn initial_contents(t: &dyn Target, fx: &Fixture) {
    let mut dev = Dev::new(t);
    let model = fx.model();
    assert_device_is(&mut dev, &model, "initial contents");
    // Reads of single blocks at both ends, too.
    let lbs = lbs(t);
    assert_reads(&mut dev, &model, 0, us(lbs), "first block");
    assert_reads(&mut dev, &model, fx.size - lbs, us(lbs), "last block");
}

fn write_read_back(t: &dyn Target, fx: &Fixture) {
    let caps = t.caps();
    if caps.read_only {
        assert!(!caps.supports(Op::Write));
        return;
    }
    let lbs = lbs(t);
    let size = caps.size;
    let mut dev = Dev::new(t);
    let mut model = fx.model();
    let spots = [
        (0, lbs.max(4096)),
        (9 * lbs, lbs),
        (size / 2 - 3 * lbs, 17 * lbs),
        (size - (64 << 10), (64 << 10) - lbs),
        (size - lbs, lbs),
    ];
    for (i, &(off, len)) in spots.iter().enumerate() {
        let data = pattern(i as u64 + 1, us(len));
        assert_eq!(
            dev.write(off, &data),
            Ok(len32(data.len())),
            "write {off}+{len}"
        );
        model.write(off, &data);
    }
    for &(off, len) in &spots {
        assert_reads(&mut dev, &model, off, us(len), "read back");
    }
    // Overwrite part of an earlier write, straddling its start.
    let (off, _) = spots[2];
    let data = pattern(99, us(4 * lbs));
    assert_eq!(
        dev.write(off - 2 * lbs, &data),
        Ok(len32(data.len())),
        "overwrite"
    );
    model.write(off - 2 * lbs, &data);
    assert_reads(&mut dev, &model, off - 4 * lbs, us(24 * lbs), "overwrite");
    // Everything else, unwritten, still reads as it started (zeroes).
    assert_device_is(&mut dev, &model, "after writes");
}

fn out_of_range_is_eio(t: &dyn Target, fx: &Fixture) {
    let caps = t.caps();
    let lbs = lbs(t);
    let size = caps.size;
    let mut dev = Dev::new(t);
    let model = fx.model();
    let ranges = [
        (size, lbs),
        (size - lbs, 2 * lbs),
        (size - 4096, 8192),
        (size + (1 << 30), lbs),
        // Offset + len overflows u64.
        (u64::MAX / lbs * lbs, 2 * lbs),
    ];
    for &(off, len) in &ranges {
        assert_eq!(dev.read(off, us(len)), Err(Errno::IO), "read {off}+{len}");
        let data = pattern(7, us(len));
        assert_eq!(dev.write(off, &data), Err(Errno::IO), "write {off}+{len}");
        if caps.supports(Op::Discard) {
            assert_eq!(dev.discard(off, len), Err(Errno::IO), "discard {off}+{len}");
        }
        if caps.supports(Op::WriteZeroes) {
            for nounmap in [false, true] {
                assert_eq!(
                    dev.write_zeroes(off, len, nounmap),
                    Err(Errno::IO),
                    "write-zeroes {off}+{len} nounmap={nounmap}"
                );
            }
        }
    }
    // A 1 MiB request crossing the end, too.
    let data = pattern(8, MAX_IO);
    assert_eq!(dev.write(size - (MAX_IO as u64) / 2, &data), Err(Errno::IO));
    // Nothing of the refused writes landed in the last blocks.
    assert_reads(
        &mut dev,
        &model,
        size - 8192,
        8192,
        "end after refused requests",
    );
}

fn misaligned_is_eio(t: &dyn Target, fx: &Fixture) {
    let caps = t.caps();
    let lbs = lbs(t);
    let mut dev = Dev::new(t);
    let model = fx.model();
    let ranges = [
        (1, lbs),
        (lbs / 2, lbs),
        (4096 + 100, 4096),
        (0, 100),
        (0, lbs + 1),
        (lbs, lbs / 2),
        // Zero length.
        (0, 0),
        (lbs, 0),
    ];
    for &(off, len) in &ranges {
        assert_eq!(dev.read(off, us(len)), Err(Errno::IO), "read {off}+{len}");
        let data = pattern(3, us(len));
        assert_eq!(dev.write(off, &data), Err(Errno::IO), "write {off}+{len}");
        if caps.supports(Op::Discard) {
            assert_eq!(dev.discard(off, len), Err(Errno::IO), "discard {off}+{len}");
        }
        if caps.supports(Op::WriteZeroes) {
            assert_eq!(
                dev.write_zeroes(off, len, true),
                Err(Errno::IO),
                "write-zeroes {off}+{len}"
            );
        }
    }
    assert_reads(&mut dev, &model, 0, 16384, "start after refused requests");
}

fn modifications_follow_read_only(t: &dyn Target, fx: &Fixture) {
    let caps = t.caps();
    let mut dev = Dev::new(t);
    let mut model = fx.model();
    let lbs = lbs(t);
    let mid = caps.size / 2;
    let data = pattern(11, 8192);
    let fua = userblk::Flags::FUA;
    if caps.read_only {
        for off in [0, mid, caps.size - 8192] {
            assert_eq!(dev.write(off, &data), Err(Errno::IO), "write at {off}");
            assert_eq!(
                dev.write_flags(off, &data, fua),
                Err(Errno::IO),
                "FUA at {off}"
            );
            assert_eq!(dev.discard(off, 8192), Err(Errno::IO), "discard at {off}");
            for nounmap in [false, true] {
                assert_eq!(
                    dev.write_zeroes(off, 8192, nounmap),
                    Err(Errno::IO),
                    "write-zeroes at {off} nounmap={nounmap}"
                );
            }
        }
        assert_eq!(dev.flush(), Ok(0));
        // Reads work, and see the data that was there.
        assert_reads(&mut dev, &model, mid - lbs, 3 * 8192, "read-only read");
    } else {
        assert_eq!(dev.write(mid, &data), Ok(8192));
        model.write(mid, &data);
        if let Some(d) = caps.discard {
            // Smaller than the granularity, a discard may leave the data
            // (discard_reads_zero checks that case).
            let len = u64::from(d.granularity).max(8192);
            assert_eq!(dev.discard(0, len), Ok(0));
            model.zero(0, len);
        }
        if caps.supports(Op::WriteZeroes) {
            assert_eq!(dev.write_zeroes(caps.size - 8192, 8192, false), Ok(0));
            model.zero(caps.size - 8192, 8192);
        }
    }
    assert_device_is(&mut dev, &model, "after modifications");
}

/// Data in the first `head` and the last `tail` bytes (patterns `seed`
/// and `seed + 1`), for zeroing ops to cut into.
fn write_ends(dev: &mut Dev<'_>, model: &mut common::Model, head: u64, tail: u64, seed: u64) {
    let size = model.all().len() as u64;
    for (off, len, seed) in [(0, head, seed), (size - tail, tail, seed + 1)] {
        let data = pattern(seed, us(len));
        assert_eq!(
            dev.write(off, &data),
            Ok(len32(data.len())),
            "write {off}+{len}"
        );
        model.write(off, &data);
    }
}

fn discard_reads_zero(t: &dyn Target, fx: &Fixture) {
    let caps = t.caps();
    let mut dev = Dev::new(t);
    let Some(d) = caps.discard else {
        assert_unsupported(t, &mut dev, Op::Discard, 4096);
        return;
    };
    let g = u64::from(d.granularity);
    let lbs = lbs(t);
    let size = caps.size;
    let mut model = fx.model();

    write_ends(&mut dev, &mut model, 16 * g, 2 * g, 21);

    // Granularity-aligned discards read back as zeroes; their neighbours keep their data.
    for (off, len) in [
        (4 * g, 4 * g),
        (size - g, g),
        (size / 2, 8 * g),
        (15 * g, g),
    ] {
        assert_eq!(dev.discard(off, len), Ok(0), "discard {off}+{len}");
        model.zero(off, len);
        assert_reads(
            &mut dev,
            &model,
            off.saturating_sub(g),
            us(len + g),
            "discarded",
        );
    }
    assert_device_is(&mut dev, &model, "after discards");

    // Smaller than the granularity: accepted, and must not touch neighbours. The
    // discarded bytes may read as anything the op allows: old data or zeroes.
    if lbs < g {
        let (off, len) = (10 * g + lbs, 2 * lbs);
        assert_eq!(dev.discard(off, len), Ok(0), "small discard");
        let got = dev.read(off, us(len)).unwrap();
        let zero = got.iter().all(|&b| b == 0);
        assert!(
            zero || got == model.get(off, us(len)),
            "sub-granularity discard left neither old data nor zeroes"
        );
        if zero {
            model.zero(off, len);
        }
        assert_device_is(&mut dev, &model, "after a small discard");
    }
}

fn write_zeroes_reads_zero(t: &dyn Target, fx: &Fixture) {
    let caps = t.caps();
    let mut dev = Dev::new(t);
    let Some(wz) = caps.write_zeroes else {
        assert_unsupported(t, &mut dev, Op::WriteZeroes, 4096);
        return;
    };
    let g = u64::from(wz.granularity);
    let lbs = lbs(t);
    let size = caps.size;
    let mut model = fx.model();

    write_ends(&mut dev, &mut model, 32 * g, 2 * g, 31);

    let ranges = [
        (2 * g, 2 * g, false),
        (6 * g, 3 * g, true),
        // A second NOUNMAP: a target that learnt a fallback on the first must still zero.
        (12 * g, g, true),
        // Not granularity-aligned: write-zeroes must zero exactly the range, both ways.
        (20 * g + lbs, 2 * lbs, false),
        (22 * g + lbs, 2 * lbs, true),
        (24 * g - lbs, g + 2 * lbs, true),
        (size - g, g, true),
        (size - 2 * g, g, false),
        // Never written.
        (size / 2, 4 * g, false),
        (size / 2 + 8 * g, 4 * g, true),
    ];
    for (off, len, nounmap) in ranges {
        assert_eq!(
            dev.write_zeroes(off, len, nounmap),
            Ok(0),
            "write-zeroes {off}+{len} nounmap={nounmap}"
        );
        model.zero(off, len);
        let from = off.saturating_sub(g);
        let to = (off + len + g).min(size);
        assert_reads(&mut dev, &model, from, us(to - from), "write-zeroes");
    }
    // FUA and NOUNMAP together are fine too.
    let req = Request::new(Op::WriteZeroes, 28 * g, len32(us(g)))
        .with_flags(userblk::Flags::NOUNMAP.with(userblk::Flags::FUA));
    assert_eq!(dev.run(req, &mut []), Ok(0));
    model.zero(28 * g, g);
    assert_device_is(&mut dev, &model, "after write-zeroes");
}

fn flush_ok(t: &dyn Target, fx: &Fixture) {
    let mut dev = Dev::new(t);
    assert_eq!(dev.flush(), Ok(0), "flush of an untouched device");
    if !fx.read_only {
        let data = pattern(41, 4096);
        assert_eq!(dev.write(4096, &data), Ok(4096));
        assert_eq!(dev.flush(), Ok(0), "flush after a write");
    }
    assert_eq!(dev.flush(), Ok(0), "flush twice");
}

fn fua_write(t: &dyn Target, fx: &Fixture) {
    let caps = t.caps();
    let mut dev = Dev::new(t);
    let fua = userblk::Flags::FUA;
    let data = pattern(51, 8192);
    if caps.read_only {
        assert!(!caps.supports(Op::Write));
        assert_eq!(dev.write_flags(0, &data, fua), Err(Errno::IO));
        return;
    }
    let lbs = lbs(t);
    let mut model = fx.model();
    for off in [3 * lbs, caps.size - 8192] {
        assert_eq!(
            dev.write_flags(off, &data, fua),
            Ok(8192),
            "FUA write at {off}"
        );
        model.write(off, &data);
        assert_reads(&mut dev, &model, off, 8192, "after FUA");
    }
    assert_device_is(&mut dev, &model, "after FUA writes");
}

fn large_request(t: &dyn Target, fx: &Fixture) {
    let caps = t.caps();
    let lbs = lbs(t);
    let size = caps.size;
    let mut dev = Dev::new(t);
    let mut model = fx.model();
    let big = MAX_IO as u64;
    let spots = [0, size - big, size / 2 + lbs];
    if !caps.read_only {
        for (i, &off) in spots.iter().enumerate() {
            let data = pattern(61 + i as u64, MAX_IO);
            assert_eq!(
                dev.write(off, &data),
                Ok(len32(MAX_IO)),
                "1 MiB write at {off}"
            );
            model.write(off, &data);
        }
    }
    for &off in &spots {
        assert_reads(&mut dev, &model, off, MAX_IO, "1 MiB read");
    }
    assert_device_is(&mut dev, &model, "after 1 MiB requests");
}

// ---------------------------------------------------------------------------
// Checks for targets with measurable storage

/// How far allocation accounting may be off from the bytes of a range: the
/// range need not start or end on a filesystem block (offset fixture), and
/// filesystems may add a metadata block.
const SLACK: u64 = 3 * 4096;
const REGION: u64 = 256 << 10;

fn allocated(fx: &Fixture) -> u64 {
    fx.allocated().expect("a storage fixture")
}

fn discard_deallocates(t: &dyn Target, fx: &Fixture) {
    let caps = t.caps();
    let mut dev = Dev::new(t);
    if caps.discard.is_none() {
        assert_unsupported(t, &mut dev, Op::Discard, 4096);
        return;
    }
    let mut model = fx.model();
    let off = caps.size / 4;
    let before = allocated(fx);
    let data = pattern(71, us(REGION));
    assert_eq!(dev.write(off, &data), Ok(len32(data.len())));
    model.write(off, &data);
    let written = allocated(fx);
    assert!(
        written >= before + REGION - SLACK,
        "writing {REGION} bytes allocated only {} (from {before} to {written})",
        written.saturating_sub(before)
    );
    assert_eq!(dev.discard(off, REGION), Ok(0));
    model.zero(off, REGION);
    let discarded = allocated(fx);
    assert!(
        discarded + REGION - SLACK <= written,
        "discard of {REGION} bytes freed only {} (from {written} to {discarded})",
        written.saturating_sub(discarded)
    );
    assert_reads(&mut dev, &model, off - 4096, us(REGION + 8192), "discarded");
}

fn write_zeroes_nounmap_stays_allocated(t: &dyn Target, fx: &Fixture) {
    let caps = t.caps();
    let mut dev = Dev::new(t);
    if caps.write_zeroes.is_none() {
        assert_unsupported(t, &mut dev, Op::WriteZeroes, 4096);
        return;
    }
    let mut model = fx.model();
    let off = caps.size / 4;
    let data = pattern(81, us(REGION));
    assert_eq!(dev.write(off, &data), Ok(len32(data.len())));
    model.write(off, &data);
    let written = allocated(fx);

    // Zeroing written data with NOUNMAP keeps it allocated.
    assert_eq!(dev.write_zeroes(off, REGION, true), Ok(0));
    model.zero(off, REGION);
    let zeroed = allocated(fx);
    assert!(
        zeroed >= written,
        "NOUNMAP write-zeroes deallocated {} bytes (from {written} to {zeroed})",
        written - zeroed
    );
    assert_reads(&mut dev, &model, off - 4096, us(REGION + 8192), "zeroed");

    // And zeroing a hole with NOUNMAP provisions it.
    if caps.discard.is_some() {
        assert_eq!(dev.discard(off, REGION), Ok(0));
    } else {
        assert_eq!(dev.write_zeroes(off, REGION, false), Ok(0));
    }
    let hole = allocated(fx);
    assert!(
        hole + REGION - SLACK <= zeroed,
        "unmapping {REGION} bytes freed only {} (from {zeroed} to {hole})",
        zeroed.saturating_sub(hole)
    );
    assert_eq!(dev.write_zeroes(off, REGION, true), Ok(0));
    let provisioned = allocated(fx);
    assert!(
        provisioned >= hole + REGION - SLACK,
        "NOUNMAP write-zeroes over a hole allocated only {} (from {hole} to {provisioned})",
        provisioned.saturating_sub(hole)
    );
    assert_device_is(&mut dev, &model, "after NOUNMAP write-zeroes");
}

// ---------------------------------------------------------------------------
// Checks for file targets

/// Some of every modification the target allows, mirrored in the model.
fn modify_everywhere(t: &dyn Target, dev: &mut Dev<'_>, model: &mut common::Model) {
    let caps = t.caps();
    if caps.read_only {
        return;
    }
    let lbs = lbs(t);
    let size = caps.size;
    for (i, (off, len)) in [
        (0, 8192),
        (lbs, lbs),
        (size / 2 - lbs, 3 * lbs),
        (size - 8192, 8192),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(91 + i as u64, us(len));
        assert_eq!(dev.write(off, &data), Ok(len32(data.len())));
        model.write(off, &data);
    }
    if caps.supports(Op::Discard) {
        for (off, len) in [(0, 4096), (size - 4096, 4096)] {
            assert_eq!(dev.discard(off, len), Ok(0));
            model.zero(off, len);
        }
    }
    if caps.supports(Op::WriteZeroes) {
        for (off, len, nounmap) in [
            (4096, 2 * lbs, true),
            (size / 2, lbs, false),
            (size - 8192, 4096, true),
            // The very last blocks, next to bytes that are not the device's.
            (size - lbs, lbs, true),
            (size - 2 * lbs, lbs, false),
        ] {
            assert_eq!(dev.write_zeroes(off, len, nounmap), Ok(0));
            model.zero(off, len);
        }
    }
    assert_eq!(dev.flush(), Ok(0));
}

fn data_lands_in_file_window(t: &dyn Target, fx: &Fixture) {
    let f = fx.file().expect("a file fixture");
    let mut dev = Dev::new(t);
    let mut model = fx.model();
    modify_everywhere(t, &mut dev, &mut model);
    // Refused requests must not reach the file either.
    let lbs = lbs(t);
    let data = pattern(5, us(2 * lbs));
    assert_eq!(dev.write(fx.size - lbs, &data), Err(Errno::IO));

    let raw = f.read_raw();
    let offset = us(f.opts.offset);
    let end = offset + us(fx.size);
    assert_eq!(
        raw.len(),
        end + f.trailer.len(),
        "the file's length must not change"
    );
    assert!(
        raw[..offset] == f.prefix[..],
        "bytes before the offset changed"
    );
    assert!(
        raw[end..] == f.trailer[..],
        "bytes after the device changed"
    );
    assert_same(
        &raw[offset..end],
        model.all(),
        0,
        "file window at the offset",
    );
}

fn data_survives_reopen(t: &dyn Target, fx: &Fixture) {
    let f = fx.file().expect("a file fixture");
    let mut model = fx.model();
    {
        let mut dev = Dev::new(t);
        modify_everywhere(t, &mut dev, &mut model);
    }
    let again = FileTarget::open(f.opts.clone()).expect("reopen");
    assert_eq!(again.caps(), t.caps(), "same file, same caps");
    let mut dev = Dev::new(&again);
    assert_device_is(&mut dev, &model, "after reopening");
}
