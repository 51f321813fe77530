//! Copies between mem, null, file and probe targets: contents, holes,
//! counters, refusals, errors, stops and resumes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::*;
use crate::filters::error::{Config as ErrorConfig, ErrorFilter};
use crate::filters::testing::{pattern, ring_probe};
use crate::target::{Caps, Ctx, Extent, Submit};
use crate::targets::{FileOptions, FileTarget, MemTarget, NullTarget};

const MIB: u64 = 1 << 20;

/// `x` as a length in memory.
fn n(x: u64) -> usize {
    usize::try_from(x).unwrap()
}

fn write(t: &dyn Target, offset: u64, data: &[u8]) {
    let mut e = Engine::new(t, data.len()).unwrap();
    let len = u32::try_from(data.len()).unwrap();
    let mut buf = data.to_vec();
    assert_eq!(
        e.run(t, Request::new(Op::Write, offset, len), &mut buf),
        Ok(len)
    );
}

/// Every byte of `t`.
fn contents(t: &dyn Target) -> Vec<u8> {
    let size = t.caps().size;
    let mut e = Engine::new(t, n(MIB)).unwrap();
    let mut out = vec![0u8; n(size)];
    for (i, piece) in out.chunks_mut(n(MIB)).enumerate() {
        let len = u32::try_from(piece.len()).unwrap();
        let req = Request::new(Op::Read, i as u64 * MIB, len);
        assert_eq!(e.run(t, req, piece), Ok(len));
    }
    out
}

/// A 16 MiB mem target: data at 0 (1 MiB), at 5 MiB + 4 KiB (12 KiB),
/// written zeroes at 8 MiB (1 MiB, allocated), and 3 bytes at the end.
fn sparse_source() -> Arc<dyn Target> {
    let t = MemTarget::new(16 * MIB).unwrap();
    write(&t, 0, &pattern(1, n(MIB)));
    write(&t, 5 * MIB + 4096, &pattern(2, 12288));
    write(&t, 8 * MIB, &vec![0; n(MIB)]);
    let mut tail = vec![0u8; 4096];
    tail[4093..].copy_from_slice(&[7, 8, 9]);
    write(&t, 16 * MIB - 4096, &tail);
    Arc::new(t)
}

/// Data bytes of `sparse_source`, in whole 4 KiB blocks.
const SOURCE_DATA: u64 = MIB + 12288 + 4096;

/// A ring-native destination that records its requests. It tells its
/// requests apart by slot, and every worker's engine has only slot 0, so
/// copies into it run one worker (files cover several ring-native workers).
fn recording_destination(size: u64) -> (Arc<dyn Target>, crate::filters::testing::Seen) {
    ring_probe(n(size))
}

/// A file target on `path` through the page cache.
fn open_file(path: &Path, read_only: bool) -> Arc<dyn Target> {
    let opts = FileOptions {
        path: path.into(),
        buffered: true,
        read_only,
        ..FileOptions::default()
    };
    Arc::new(FileTarget::open(opts).unwrap())
}

/// A writable file target on `path`, grown to `size` if smaller.
fn file(path: &Path, size: u64) -> Arc<dyn Target> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    if f.metadata().unwrap().len() < size {
        f.set_len(size).unwrap();
    }
    open_file(path, false)
}

/// Copy `src` onto `dst`, taken as fresh, with `jobs` workers.
fn copy_fresh(src: &Arc<dyn Target>, dst: &Arc<dyn Target>, jobs: usize) -> Summary {
    Copier::new(Arc::clone(src), Arc::clone(dst))
        .unwrap()
        .fresh_destination(true)
        .jobs(jobs)
        .run(&Progress::new())
        .unwrap()
}

#[test]
fn sparse_source_copies_to_an_identical_fresh_destination() {
    let src = sparse_source();
    let dst: Arc<dyn Target> = Arc::new(MemTarget::new(16 * MIB).unwrap());
    let s = copy_fresh(&src, &dst, 4);
    assert!(contents(&*src) == contents(&*dst), "contents differ");
    assert!(s.complete);
    assert_eq!(s.bytes_total, 16 * MIB);
    assert_eq!(s.bytes_data, SOURCE_DATA, "{s:?}");
    assert_eq!(s.bytes_skipped, 16 * MIB - SOURCE_DATA, "{s:?}");
    assert_eq!(s.bytes_zeroed, 0, "a fresh destination needs no zeroing");
    assert_eq!(s.bytes_done(), 16 * MIB);
}

#[test]
fn holes_and_zero_blocks_never_reach_a_fresh_destination() {
    let src = sparse_source();
    let (dst, seen) = recording_destination(16 * MIB);
    let s = copy_fresh(&src, &dst, 1);
    let reqs = seen.take();
    assert!(contents(&*src) == contents(&*dst), "contents differ");
    let written: u64 = reqs
        .iter()
        .filter(|r| r.op == Op::Write)
        .map(|r| u64::from(r.len))
        .sum();
    assert_eq!(written, SOURCE_DATA, "{reqs:?}");
    assert!(
        reqs.iter().all(|r| r.op != Op::WriteZeroes),
        "zeroes sent to a fresh destination: {reqs:?}"
    );
    assert_eq!(reqs.last().map(|r| r.op), Some(Op::Flush), "no final flush");
    assert_eq!(s.bytes_data, written);
}

#[test]
fn holes_stay_unallocated_in_a_fresh_raw_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = sparse_source();
    let dst = file(&dir.path().join("dst.raw"), 16 * MIB);
    copy_fresh(&src, &dst, 4);
    let bytes = std::fs::read(dir.path().join("dst.raw")).unwrap();
    assert!(bytes == contents(&*src), "file contents differ");
    let meta = std::fs::metadata(dir.path().join("dst.raw")).unwrap();
    let allocated = meta.blocks() * 512;
    assert!(
        allocated <= SOURCE_DATA + 64 * 1024,
        "{allocated} bytes allocated for {SOURCE_DATA} bytes of data"
    );
    // And SEEK_DATA finds no data in the 8 MiB run of written zeroes.
    let mut ext = Vec::new();
    dst.extents(8 * MIB, MIB, &mut ext).unwrap();
    assert!(ext.iter().all(|e| e.hole), "{ext:?}");
}

#[test]
fn an_existing_destination_gets_zeroes_where_the_source_has_holes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.raw");
    std::fs::write(&path, pattern(9, n(20 * MIB))).unwrap();
    let src = sparse_source();
    let dst = file(&path, 20 * MIB);
    let s = Copier::new(Arc::clone(&src), Arc::clone(&dst))
        .unwrap()
        .jobs(2)
        .run(&Progress::new())
        .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let want = contents(&*src);
    assert!(bytes[..want.len()] == want[..], "the copied part differs");
    assert!(
        bytes[want.len()..] == pattern(9, bytes.len())[want.len()..],
        "past the source's end, the destination must be left alone"
    );
    assert_eq!(s.bytes_zeroed, s.bytes_skipped, "{s:?}");
    assert_eq!(s.bytes_zeroed, 16 * MIB - SOURCE_DATA);
}

#[test]
fn zeroes_without_write_zeroes_and_only_where_needed() {
    // A destination without write-zeroes gets zero buffers, and only where
    // it does not already read as zeroes (the probe's extents say which).
    let src = sparse_source();
    let (probe, seen) = recording_destination(16 * MIB);
    write(&*probe, 3 * MIB, &pattern(4, 8192));
    let dst: Arc<dyn Target> = Arc::new(Recap(probe, no_zeroes));
    seen.take();
    let s = Copier::new(Arc::clone(&src), Arc::clone(&dst))
        .unwrap()
        .jobs(1)
        .run(&Progress::new())
        .unwrap();
    assert!(contents(&*src) == contents(&*dst), "contents differ");
    let reqs = seen.take();
    let zero_writes: Vec<_> = reqs
        .iter()
        .filter(|r| r.op == Op::Write && r.offset / MIB == 3)
        .collect();
    assert_eq!(zero_writes.len(), 1, "{reqs:?}");
    assert_eq!(s.bytes_zeroed, 8192, "only the garbage is zeroed: {s:?}");
    assert!(reqs.iter().all(|r| r.op != Op::WriteZeroes));
}

/// A target with other capabilities (fewer, or larger blocks).
struct Recap(Arc<dyn Target>, fn(Caps) -> Caps);

impl Target for Recap {
    fn caps(&self) -> Caps {
        (self.1)(self.0.caps())
    }
    fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        self.0.submit(ctx)
    }
    fn complete(&self, ctx: &mut Ctx<'_>, step: u16, res: i32) -> Submit {
        self.0.complete(ctx, step, res)
    }
    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), Errno> {
        self.0.extents(offset, len, out)
    }
}

fn no_zeroes(c: Caps) -> Caps {
    Caps {
        write_zeroes: None,
        discard: None,
        ..c
    }
}

#[test]
fn requests_fit_both_sides_blocks_and_limits() {
    // 4 KiB blocks and 64 KiB requests on the destination; 512-byte
    // pieces of data in the source.
    let src = MemTarget::new(4 * MIB).unwrap();
    write(&src, 512, &pattern(5, 512));
    write(&src, 3 * MIB + 1536, &pattern(6, 1024));
    let src: Arc<dyn Target> = Arc::new(src);
    let (probe, seen) = recording_destination(4 * MIB);
    let dst: Arc<dyn Target> = Arc::new(Recap(probe, |c| Caps {
        logical_block_size: 4096,
        max_request: Some(65536),
        ..c
    }));
    let s = copy_fresh(&src, &dst, 1);
    let reqs = seen.take();
    assert!(contents(&*src) == contents(&*dst), "contents differ");
    for r in reqs.iter().filter(|r| r.op == Op::Write) {
        assert!(
            r.offset % 4096 == 0 && r.len % 4096 == 0 && r.len <= 65536,
            "{r:?}"
        );
    }
    assert_eq!(s.bytes_data, 8192);
    // A source that does not end on a destination block is refused.
    let odd: Arc<dyn Target> = Arc::new(NullTarget::new(MIB + 512));
    match Copier::new(odd, dst) {
        Err(CopyError::Unaligned { size, block }) => assert_eq!((size, block), (MIB + 512, 4096)),
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn a_smaller_or_read_only_destination_is_refused() {
    let src: Arc<dyn Target> = Arc::new(NullTarget::new(2 * MIB));
    let small: Arc<dyn Target> = Arc::new(MemTarget::new(MIB).unwrap());
    match Copier::new(Arc::clone(&src), small) {
        Err(e @ CopyError::TooSmall { src, dst }) => {
            assert_eq!((src, dst), (2 * MIB, MIB));
            assert!(e.to_string().contains("smaller than the source"), "{e}");
        }
        other => panic!("{:?}", other.err()),
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.raw");
    std::fs::write(&path, vec![0u8; n(4 * MIB)]).unwrap();
    let ro = open_file(&path, true);
    assert!(matches!(Copier::new(src, ro), Err(CopyError::ReadOnly)));
}

#[test]
fn a_read_error_names_its_offset_and_stops_the_copy() {
    let src = sparse_source();
    let cfg = ErrorConfig {
        ops: [true, false, false, false, false],
        range: Some((512 * 1024, 512 * 1024 + 512)),
        ..ErrorConfig::default()
    };
    let failing: Arc<dyn Target> = Arc::new(ErrorFilter::new(src, cfg).unwrap());
    let dst: Arc<dyn Target> = Arc::new(MemTarget::new(16 * MIB).unwrap());
    let e = Copier::new(failing, dst)
        .unwrap()
        .request_bytes(256 * 1024)
        .run(&Progress::new())
        .unwrap_err();
    assert!(
        matches!(e, CopyError::Read { offset, errno, .. } if offset == 512 * 1024 && errno == Errno::IO),
        "{e:?}"
    );
    assert!(e.to_string().contains("at offset 524288"), "{e}");
}

#[test]
fn a_stopped_copy_resumes_to_the_same_result() {
    let src = sparse_source();
    let dst: Arc<dyn Target> = Arc::new(MemTarget::new(16 * MIB).unwrap());
    let progress = Progress::new();
    let marks = Mutex::new(Vec::new());
    // Stop at the first checkpoint, as Ctrl-C would.
    let e = Copier::new(Arc::clone(&src), Arc::clone(&dst))
        .unwrap()
        .fresh_destination(true)
        .jobs(1)
        .request_bytes(256 * 1024)
        .on_checkpoint(MIB, |mark| {
            marks.lock().unwrap().push(mark);
            progress.stop();
            Ok(())
        })
        .run(&progress)
        .unwrap_err();
    let CopyError::Interrupted {
        summary,
        copied_up_to,
    } = e
    else {
        panic!("{e:?}")
    };
    assert!(!summary.complete);
    assert!((MIB..16 * MIB).contains(&copied_up_to), "{copied_up_to}");
    // The checkpoint at the stop records the same place.
    assert_eq!(marks.lock().unwrap().last(), Some(&copied_up_to));
    let s = Copier::new(Arc::clone(&src), Arc::clone(&dst))
        .unwrap()
        .start_at(copied_up_to)
        .unwrap()
        .run(&Progress::new())
        .unwrap();
    assert_eq!(s.bytes_resumed, copied_up_to);
    assert_eq!(s.bytes_done(), 16 * MIB);
    assert!(contents(&*src) == contents(&*dst), "contents differ");
}

#[test]
fn a_failing_checkpoint_fails_the_copy() {
    let src = sparse_source();
    let dst: Arc<dyn Target> = Arc::new(MemTarget::new(16 * MIB).unwrap());
    let e = Copier::new(src, dst)
        .unwrap()
        .on_checkpoint(MIB, |_| Err(std::io::Error::other("disk full")))
        .run(&Progress::new())
        .unwrap_err();
    assert!(matches!(e, CopyError::Checkpoint { .. }), "{e:?}");
    assert!(e.to_string().contains("disk full"), "{e}");
}

#[test]
fn resume_points_are_checked() {
    let src: Arc<dyn Target> = Arc::new(NullTarget::new(MIB));
    let dst: Arc<dyn Target> = Arc::new(NullTarget::new(MIB));
    let c = || Copier::new(Arc::clone(&src), Arc::clone(&dst)).unwrap();
    assert!(matches!(c().start_at(100), Err(CopyError::BadStart { .. })));
    assert!(matches!(
        c().start_at(2 * MIB),
        Err(CopyError::BadStart { .. })
    ));
    let s = c().start_at(MIB).unwrap().run(&Progress::new()).unwrap();
    assert_eq!(
        (s.bytes_resumed, s.bytes_data, s.bytes_skipped),
        (MIB, 0, 0)
    );
}

#[test]
fn many_workers_copy_a_large_data_source() {
    // Every block of data, 40 MiB, 4 workers, 1 MiB requests.
    let src = MemTarget::new(40 * MIB).unwrap();
    for i in 0..40u8 {
        write(&src, u64::from(i) * MIB, &pattern(i + 1, n(MIB)));
    }
    let src: Arc<dyn Target> = Arc::new(src);
    let dst: Arc<dyn Target> = Arc::new(MemTarget::new(48 * MIB).unwrap());
    let progress = Progress::new();
    let s = Copier::new(Arc::clone(&src), Arc::clone(&dst))
        .unwrap()
        .fresh_destination(true)
        .run(&progress)
        .unwrap();
    assert_eq!((s.bytes_data, s.bytes_skipped), (40 * MIB, 0));
    assert_eq!(progress.done(), 40 * MIB);
    assert!(
        contents(&*src) == contents(&*dst)[..n(40 * MIB)],
        "contents differ"
    );
}

#[test]
fn a_file_source_copies_its_holes_as_holes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("src.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(32 * MIB).unwrap();
    f.write_all_at(&pattern(3, n(3 * MIB)), 10 * MIB).unwrap();
    f.write_all_at(b"end", 32 * MIB - 3).unwrap();
    drop(f);
    let src = open_file(&path, true);
    let (dst, seen) = recording_destination(32 * MIB);
    let s = copy_fresh(&src, &dst, 1);
    assert!(
        contents(&*dst) == std::fs::read(&path).unwrap(),
        "contents differ"
    );
    // Only the data blocks are written (the last one is a file system block).
    assert!(
        s.bytes_data >= 3 * MIB && s.bytes_data <= 3 * MIB + 64 * 1024,
        "{s:?}"
    );
    assert!(seen
        .take()
        .iter()
        .all(|r| r.op != Op::Write || r.offset >= 10 * MIB));
}
