//! What is refused before any request: `FileTarget::open` errors, sizes
//! the targets refuse, and the engine's own checks (buffer lengths, stray
//! completions of a target that breaks the contract). Split from the
//! conformance suite, which runs requests against working targets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod common;

use common::{len32, pattern};
use userblk::slots::Engine;
use userblk::target::Errno;
use userblk::targets::{FileOptions, FileTarget, MemTarget, NullTarget};
use userblk::{Op, Request, Target};

fn open_err(opts: FileOptions) -> String {
    match FileTarget::open(opts.clone()) {
        Ok(t) => panic!("{opts:?} opened: {:?}", t.caps()),
        Err(e) => e.to_string(),
    }
}

fn opts(path: &std::path::Path) -> FileOptions {
    FileOptions {
        path: path.to_owned(),
        ..FileOptions::default()
    }
}

/// Every combination of read-only and buffered on the same path.
fn all_modes(base: &FileOptions) -> Vec<FileOptions> {
    let mut v = Vec::new();
    for read_only in [false, true] {
        for buffered in [false, true] {
            v.push(FileOptions {
                read_only,
                buffered,
                ..base.clone()
            });
        }
    }
    v
}

/// `base` fails to open in every mode, with a message holding each of `words`.
fn refused_in_every_mode(base: &FileOptions, words: &[&str]) {
    for o in all_modes(base) {
        let msg = open_err(o);
        for w in words {
            assert!(msg.contains(w), "{msg}");
        }
    }
}

/// A 1 MiB file `disk.img` in `dir`.
fn disk_1m(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    path
}

#[test]
fn open_missing_path_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-file.img");
    refused_in_every_mode(&opts(&path), &[&path.to_string_lossy(), "No such file"]);
}

#[test]
fn open_directory_fails() {
    let dir = tempfile::tempdir().unwrap();
    refused_in_every_mode(&opts(dir.path()), &[&dir.path().to_string_lossy()]);
}

#[test]
fn open_empty_or_tiny_file_fails() {
    let dir = tempfile::tempdir().unwrap();
    for len in [0, 1, 511] {
        let path = dir.path().join(format!("len{len}.img"));
        std::fs::write(&path, vec![1u8; len]).unwrap();
        refused_in_every_mode(&opts(&path), &[&path.to_string_lossy(), "no data"]);
    }
}

#[test]
fn open_offset_at_or_beyond_end_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk_1m(dir.path());
    for offset in [1 << 20, (1 << 20) + 4096, 1 << 40] {
        let o = FileOptions {
            offset,
            ..opts(&path)
        };
        refused_in_every_mode(&o, &["offset", &path.to_string_lossy()]);
    }
    // One block before the end is fine, and a one-block device.
    let t = FileTarget::open(FileOptions {
        offset: (1 << 20) - 4096,
        ..opts(&path)
    })
    .unwrap();
    assert_eq!(t.caps().size, 4096);
}

#[test]
fn open_offset_not_block_multiple_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk_1m(dir.path());
    for offset in [1, 100, 511, 4096 + 1] {
        let o = FileOptions {
            offset,
            ..opts(&path)
        };
        refused_in_every_mode(&o, &["offset", &offset.to_string()]);
    }
}

#[test]
fn zero_sized_devices_are_refused() {
    let msg = MemTarget::new(0).unwrap_err().to_string();
    assert!(msg.contains("size"), "{msg}");
    let null = NullTarget::new(0);
    assert!(null.caps().check().is_err());
    assert!(Engine::new(&null, 4096).is_err());
}

#[test]
fn engine_checks_buffer_lengths() {
    let t = NullTarget::new(1 << 20);
    let mut e = Engine::new(&t, 4096).unwrap();
    // Data shorter than the request, or longer than the engine's buffer.
    let mut short = vec![0u8; 512];
    assert_eq!(
        e.run(&t, Request::new(Op::Read, 0, 4096), &mut short),
        Err(Errno::INVAL)
    );
    let page = rustix::param::page_size();
    let mut big = vec![0u8; page * 2];
    assert_eq!(
        e.run(&t, Request::new(Op::Write, 0, len32(big.len())), &mut big),
        Err(Errno::INVAL)
    );
}

#[test]
fn open_fifo_fails_without_blocking() {
    use std::sync::mpsc;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let mut hung = Vec::new();
    for o in all_modes(&opts(&path)) {
        let (tx, rx) = mpsc::channel();
        let thread_opts = o.clone();
        let h = std::thread::spawn(move || {
            let r = FileTarget::open(thread_opts).map(|_| ());
            tx.send(r.map_err(|e| e.to_string())).unwrap();
        });
        let r = match rx.recv_timeout(Duration::from_secs(2)) {
            Ok(r) => r,
            Err(_) => {
                hung.push(format!("{o:?}"));
                // Unblock the open: a writer appears (non-blocking, so it cannot hang us).
                let _w = rustix::fs::open(
                    &path,
                    rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::NONBLOCK,
                    rustix::fs::Mode::empty(),
                );
                rx.recv().unwrap()
            }
        };
        h.join().unwrap();
        let msg = r.expect_err("a FIFO is not a block device");
        assert!(msg.contains("not a regular file or block device"), "{msg}");
    }
    assert!(hung.is_empty(), "FileTarget::open blocked for {hung:?}");
}

/// A target that breaks the contract on purpose: its flush queues two ring
/// operations and reports itself done at once. Reads are ordinary one-step
/// ring reads of its file. Every `complete` call is logged.
struct EarlyDone {
    file: std::fs::File,
    log: std::sync::Mutex<Vec<(Op, u16)>>,
}

impl Target for EarlyDone {
    fn caps(&self) -> userblk::Caps {
        userblk::Caps::new(1 << 20)
    }

    fn submit(&self, ctx: &mut userblk::Ctx<'_>) -> userblk::Submit {
        use std::os::fd::AsFd;
        let fd = self.file.as_fd();
        let req = *ctx.req();
        match req.op {
            Op::Flush => {
                let a = ctx.fsync(fd, false, 7);
                let b = ctx.fsync(fd, false, 8);
                userblk::Submit::Done(a.and(b).map(|()| 0))
            }
            Op::Read => match ctx.read_at(fd, req.offset, 1) {
                Ok(()) => userblk::Submit::Pending,
                Err(e) => userblk::Submit::Done(Err(e)),
            },
            _ => userblk::Submit::Done(Err(Errno::IO)),
        }
    }

    fn complete(&self, ctx: &mut userblk::Ctx<'_>, step: u16, res: i32) -> userblk::Submit {
        self.log.lock().unwrap().push((ctx.req().op, step));
        userblk::Submit::Done(userblk::target::ring_result(res))
    }
}

#[test]
fn engine_drops_completions_of_finished_requests() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.img");
    let data = pattern(123, 1 << 20);
    std::fs::write(&path, &data).unwrap();
    let t = EarlyDone {
        file: std::fs::File::open(&path).unwrap(),
        log: std::sync::Mutex::new(Vec::new()),
    };
    let mut e = Engine::new(&t, 4096).unwrap();
    // The engine waits for the flush's two fsyncs before returning (good)...
    assert_eq!(e.run(&t, Request::new(Op::Flush, 0, 0), &mut []), Ok(0));
    // ...but their completions must not reach the target as the next request's.
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        e.run(&t, Request::new(Op::Read, 8192, 4096), &mut buf),
        Ok(4096)
    );
    assert!(buf == data[8192..12288], "read data");
    assert_eq!(
        *t.log.lock().unwrap(),
        [(Op::Read, 1)],
        "complete() calls: only the read's own step"
    );
}
