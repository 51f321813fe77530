//! Live resize of the targets that can change their size: requests past
//! the old end work once grown (through one engine kept from before, as a
//! frontend keeps its slots), old data stays, shrinking drops the tail.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use super::file::{FileOptions, FileTarget};
use super::{MemTarget, NullTarget};
use crate::filters::spec::Spec;
use crate::slots::Engine;
use crate::target::{Op, Request, Target};
use crate::{resize, Error};

const MIB: u64 = 1 << 20;

fn write(e: &mut Engine, t: &dyn Target, off: u64, byte: u8) -> crate::IoResult {
    e.run(t, Request::new(Op::Write, off, 4096), &mut [byte; 4096])
}

fn read(e: &mut Engine, t: &dyn Target, off: u64) -> Vec<u8> {
    let mut b = vec![0xEE; 4096];
    e.run(t, Request::new(Op::Read, off, 4096), &mut b).unwrap();
    b
}

/// Grow `t` from 1 MiB to 3 MiB and back to 2 MiB, checking data on the way.
fn grow_then_shrink(t: &dyn Target) {
    let mut e = Engine::new(t, 4096).unwrap();
    write(&mut e, t, MIB - 4096, 1).unwrap();
    assert!(write(&mut e, t, MIB, 2).is_err(), "past the end before");
    assert_eq!(resize::apply(t, 3 * MIB, false).unwrap(), 3 * MIB);
    assert_eq!((t.size(), t.caps().size), (3 * MIB, 3 * MIB));
    write(&mut e, t, 3 * MIB - 4096, 3).unwrap();
    assert_eq!(read(&mut e, t, MIB - 4096), [1; 4096]);
    assert_eq!(
        read(&mut e, t, 2 * MIB),
        [0; 4096],
        "grown range reads zero"
    );
    assert_eq!(read(&mut e, t, 3 * MIB - 4096), [3; 4096]);
    // Shrinking needs the caller's leave, and then drops the tail.
    let e2 = resize::apply(t, 2 * MIB, false).unwrap_err();
    assert!(e2.to_string().contains("--allow-shrink"), "{e2}");
    assert_eq!(t.size(), 3 * MIB);
    assert_eq!(resize::apply(t, 2 * MIB, true).unwrap(), 2 * MIB);
    assert!(write(&mut e, t, 2 * MIB, 4).is_err(), "past the new end");
    resize::apply(t, 3 * MIB, false).unwrap();
    assert_eq!(
        read(&mut e, t, 3 * MIB - 4096),
        [0; 4096],
        "dropped tail reads zero"
    );
    assert_eq!(read(&mut e, t, MIB - 4096), [1; 4096]);
}

#[test]
fn mem_grows_past_its_mapping_and_shrinks() {
    grow_then_shrink(&MemTarget::new(MIB).unwrap());
}

#[test]
fn a_shared_mem_file_follows_the_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    let t = MemTarget::create_shared(MIB, &path).unwrap();
    grow_then_shrink(&t);
    drop(t);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * MIB);
    assert!(MemTarget::open_shared(&path, 3 * MIB).is_ok());
}

#[test]
fn a_file_is_extended_and_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let open = || {
        FileTarget::open(FileOptions {
            path: path.clone(),
            offset: 0,
            buffered: true,
            read_only: false,
        })
        .unwrap()
    };
    grow_then_shrink(&open());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * MIB);
    assert_eq!(open().size(), 3 * MIB);
}

#[test]
fn bad_sizes_and_unresizable_stacks_change_nothing() {
    let t = NullTarget::new(MIB);
    for (size, what) in [(0, "greater than 0"), (MIB + 100, "multiple")] {
        let e = resize::apply(&t, size, true).unwrap_err();
        assert!(e.to_string().contains(what), "{e}");
    }
    assert_eq!(resize::apply(&t, 4 * MIB, false).unwrap(), 4 * MIB);
    // Filters pass a resize through, or refuse where their size is their own.
    let stack = |f: &str| {
        let inner: Arc<dyn Target> = Arc::new(MemTarget::new(MIB).unwrap());
        let specs = [f.parse::<Spec>().unwrap()];
        crate::filters::build(inner, &specs, &Default::default()).unwrap()
    };
    let s = stack("stats");
    assert_eq!(resize::apply(&*s, 2 * MIB, false).unwrap(), 2 * MIB);
    assert_eq!(s.caps().size, 2 * MIB);
    for f in ["offset:offset=4096", "truncate:size=512K"] {
        let s = stack(f);
        let e = resize::apply(&*s, 2 * MIB, false).unwrap_err();
        assert!(matches!(e, Error::CannotResize { .. }), "{f}: {e}");
        assert_eq!(s.size(), s.caps().size, "{f}");
    }
    let ro = stack("readonly");
    assert!(resize::apply(&*ro, 2 * MIB, false).is_err());
}

#[test]
fn writes_racing_a_shrink_never_extend_a_shared_mem_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mem");
    let t = MemTarget::create_shared(4 * MIB, &path).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let (t, stop) = (&t, &stop);
        s.spawn(move || {
            let mut e = Engine::new(t, 4096).unwrap();
            let mut off = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Past the end after a shrink: refused, never written.
                let _ = write(&mut e, t, off, 7);
                off = (off + 64 * 4096) % (4 * MIB);
            }
        });
        for _ in 0..200 {
            resize::apply(t, MIB, true).unwrap();
            let len = std::fs::metadata(&path).unwrap().len();
            assert_eq!(len, MIB, "a write in flight extended the file");
            resize::apply(t, 4 * MIB, false).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert!(MemTarget::open_shared(&path, 4 * MIB).is_ok());
}
