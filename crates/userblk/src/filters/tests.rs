//! What every filter passes through: zero copy (`data_on_ring_only`) and
//! block status (`reads_zeroes`), checked over targets that answer them.

use std::sync::Arc;

use rustix::io::Errno;

use super::testing::{probe, run};
use super::{build, Env, Spec, FILTERS};
use crate::target::{Caps, Ctx, Extent, Op, Submit, Target};

/// A probe that answers block status as a file on tmpfs does: `extents`
/// only "all data" (the exact walk is too dear), `reads_zeroes` exactly;
/// and that says whether it moves data only on the ring (a claim only:
/// the tests run it on memory buffers).
struct Cheap {
    inner: Arc<dyn Target>,
    ring_only: bool,
}

impl Target for Cheap {
    fn caps(&self) -> Caps {
        self.inner.caps()
    }
    fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        self.inner.submit(ctx)
    }
    fn reads_zeroes(&self, offset: u64, len: u64) -> Result<bool, Errno> {
        self.inner.reads_zeroes(offset, len)
    }
    fn data_on_ring_only(&self) -> bool {
        self.ring_only
    }
}

/// A zeroed 4 MiB [`Cheap`] probe.
fn cheap(ring_only: bool) -> Arc<dyn Target> {
    Arc::new(Cheap {
        inner: probe(4 << 20).0,
        ring_only,
    })
}

fn stack(inner: Arc<dyn Target>, spec: &str) -> Arc<dyn Target> {
    let spec: Spec = spec.parse().unwrap_or_else(|e| panic!("{spec}: {e}"));
    build(inner, &[spec], &Env::default()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn zero_copy_passes_through_exactly_the_filters_that_never_touch_data() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = format!("log:file={}", dir.path().join("req.log").display());
    let want: &[(&str, bool)] = &[
        ("readonly", true),
        ("offset:offset=1M", true),
        // Smaller: every request is the target's. Larger: the filter
        // zeroes reads and checks writes past the target's end itself.
        ("truncate:size=1M", true),
        ("truncate:size=8M", false),
        ("delay:read=1ms", true),
        ("error:rate=0", true),
        ("rate:bw=1G", true),
        (&log, true),
        ("stats", true),
        ("cow", false),
        ("cache", false),
        ("flakey", false),
    ];
    for e in FILTERS {
        assert!(
            want.iter()
                .any(|(s, _)| s.split(':').next() == Some(e.name)),
            "no zero-copy answer decided for {}",
            e.name
        );
    }
    for &(spec, passes) in want {
        let t = stack(cheap(true), spec);
        assert_eq!(t.data_on_ring_only(), passes, "{spec}");
        // Never more than the target allows.
        assert!(!stack(cheap(false), spec).data_on_ring_only(), "{spec}");
    }
    // A whole stack of pass-through filters keeps it.
    let specs: Vec<Spec> = ["stats", "readonly", "delay", "offset:offset=4K"]
        .iter()
        .map(|s| s.parse().unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let t = build(cheap(true), &specs, &Env::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(t.data_on_ring_only());
}

#[test]
fn stats_over_a_file_target_keeps_zero_copy() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("disk");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap_or_else(|e| panic!("{e}"));
    let file = crate::targets::FileTarget::open(crate::targets::FileOptions {
        path,
        offset: 0,
        buffered: true,
        read_only: false,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let file: Arc<dyn Target> = Arc::new(file);
    assert!(file.data_on_ring_only());
    assert!(stack(file.clone(), "stats").data_on_ring_only());
    assert!(!stack(file, "cow").data_on_ring_only());
}

/// Write `pattern` data at `offset` through `t`.
fn write(t: &dyn Target, offset: u64, len: u32) {
    assert_eq!(run(t, Op::Write, offset, len).0, Ok(len));
}

#[test]
fn truncate_answers_past_the_end_and_asks_the_target_inside() {
    let grown = stack(cheap(false), "truncate:size=8M");
    // Zeroes inside by the target's word (its extents know nothing), and past its end.
    assert_eq!(grown.reads_zeroes(0, 8 << 20), Ok(true));
    assert_eq!(grown.reads_zeroes(5 << 20, 4096), Ok(true));
    write(&*grown, (4 << 20) - 4096, 4096);
    assert_eq!(grown.reads_zeroes((4 << 20) - 4096, 8192), Ok(false));
    assert_eq!(grown.reads_zeroes(4 << 20, 4 << 20), Ok(true));
    assert_eq!(grown.reads_zeroes(0, (4 << 20) - 4096), Ok(true));
    let shrunk = stack(cheap(false), "truncate:size=1M");
    assert_eq!(shrunk.reads_zeroes(0, 1 << 20), Ok(true));
    assert_eq!(
        shrunk.reads_zeroes(0, 2 << 20),
        Ok(false),
        "past the device"
    );
}

#[test]
fn offset_asks_the_target_at_the_moved_range() {
    let inner = cheap(false);
    write(&*inner, 1 << 20, 4096);
    let t = stack(inner, "offset:offset=1M");
    assert_eq!(t.reads_zeroes(0, 4096), Ok(false));
    assert_eq!(t.reads_zeroes(4096, 2 << 20), Ok(true));
}

#[test]
fn cow_asks_the_overlay_for_its_clusters_and_the_base_for_the_rest() {
    let inner = cheap(false);
    write(&*inner, 1 << 20, 4096);
    let t = stack(inner, "cow:cluster=64K");
    assert_eq!(t.reads_zeroes(0, 1 << 20), Ok(true), "the base's zeroes");
    assert_eq!(t.reads_zeroes(1 << 20, 4096), Ok(false), "the base's data");
    // Data in the overlay over the base's zeroes.
    write(&*t, 2 << 20, 4096);
    assert_eq!(t.reads_zeroes(2 << 20, 64 << 10), Ok(false));
    assert_eq!(t.reads_zeroes((2 << 20) + (64 << 10), 64 << 10), Ok(true));
    // Zeroes in the overlay over the base's data.
    assert_eq!(run(&*t, Op::WriteZeroes, 1 << 20, 64 << 10).0, Ok(0));
    assert_eq!(t.reads_zeroes(1 << 20, 64 << 10), Ok(true));
    // Overlay and base runs together: zero only where both are.
    assert_eq!(t.reads_zeroes(0, 2 << 20), Ok(true));
    assert_eq!(t.reads_zeroes(0, 4 << 20), Ok(false));
}

#[test]
fn a_write_back_cache_and_flakey_do_not_vouch_for_data_held_back() {
    for spec in ["cache:mode=writeback,block=64K", "flakey"] {
        let inner = cheap(false);
        let t = stack(inner.clone(), spec);
        assert_eq!(t.reads_zeroes(0, 4 << 20), Ok(true), "{spec}: the target's");
        write(&*t, 1 << 20, 4096);
        // The target still reads zeroes there; the device does not.
        assert_eq!(inner.reads_zeroes(1 << 20, 4096), Ok(true), "{spec}");
        assert_eq!(t.reads_zeroes(1 << 20, 4096), Ok(false), "{spec}");
        assert_eq!(t.reads_zeroes(2 << 20, 4096), Ok(true), "{spec}");
        assert_eq!(run(&*t, Op::Flush, 0, 0).0, Ok(0));
        assert_eq!(
            t.reads_zeroes(1 << 20, 4096),
            Ok(false),
            "{spec}: after a flush"
        );
    }
    // Write-through: the target always has the data.
    let inner = cheap(false);
    let t = stack(inner, "cache");
    assert_eq!(t.reads_zeroes(0, 4 << 20), Ok(true));
    write(&*t, 1 << 20, 4096);
    assert_eq!(run(&*t, Op::Read, 1 << 20, 4096).0, Ok(4096));
    assert_eq!(t.reads_zeroes(1 << 20, 4096), Ok(false));
    assert_eq!(t.reads_zeroes(2 << 20, 4096), Ok(true));
}

#[test]
fn watching_filters_pass_block_status_through() {
    for spec in ["readonly", "delay", "error:rate=0", "rate:bw=1G", "stats"] {
        let inner = cheap(false);
        write(&*inner, 1 << 20, 4096);
        let t = stack(inner, spec);
        assert_eq!(t.reads_zeroes(0, 1 << 20), Ok(true), "{spec}");
        assert_eq!(t.reads_zeroes(1 << 20, 4096), Ok(false), "{spec}");
        let mut out = Vec::new();
        t.extents(0, 4096, &mut out)
            .unwrap_or_else(|e| panic!("{e}"));
        // The Cheap target's own answer, passed through.
        assert_eq!(out, [Extent::data(4096)], "{spec}");
    }
}
