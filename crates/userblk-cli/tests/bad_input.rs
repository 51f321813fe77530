//! Bad input, table-driven: each case exits with its status, says exactly
//! one line on stderr, panics nowhere, hangs nowhere (a deadline), and
//! leaves nothing behind: no new file in its scratch directory, nothing in
//! its state directory. Plus output into a pipe closed early.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(20);

/// Run `userblk args` in `dir` with its own state directory; kill it at
/// the deadline. Returns (exit code, stdout, stderr).
fn run(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_userblk"))
        .args(args)
        .current_dir(dir)
        .env("USERBLK_STATE_DIR", dir.join("state"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait(&mut child, args);
    let out = read_all(child.stdout.take());
    let err = read_all(child.stderr.take());
    (status.code(), out, err)
}

/// All of a piped output of a child that has exited.
fn read_all(pipe: Option<impl Read>) -> String {
    let mut s = String::new();
    pipe.expect("piped").read_to_string(&mut s).unwrap();
    s
}

/// Wait for `child` up to the deadline; kill it and fail past that.
fn wait(child: &mut std::process::Child, args: &[&str]) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() > DEADLINE {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{args:?} still running after {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every path under `dir`, but the state directory itself: an add that
/// failed in its daemon may have made it, and only what is in it counts.
fn listing(dir: &Path) -> Vec<String> {
    let state = dir.join("state").display().to_string();
    let mut names: Vec<String> = walk(dir).into_iter().filter(|p| *p != state).collect();
    names.sort();
    names
}

fn walk(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        out.push(e.path().display().to_string());
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&e.path()));
        }
    }
    out
}

/// One case: arguments split at spaces ({} is the scratch directory), exit
/// code, a phrase of the one line on stderr.
type Case = (&'static str, i32, &'static str);

// A table: one case a line.
#[rustfmt::skip]
const CASES: &[Case] = &[
    ("create qcow2 --file {}/x.qcow2 --size 1", 1, "size 1 is below one sector"),
    ("create qcow2 --file {}/x.qcow2 --size 16383P", 2, "larger than the largest device, 8E"),
    ("create qcow2 --file {}/nodir/x.qcow2 --size 1M", 1, "No such file"),
    ("create qcow2 --file {}/x.qcow2 --size 1M --backing {}/fifo", 1, "it is a FIFO"),
    ("add --frontend fuse mem --size 16383P", 2, "larger than the largest device"),
    ("add s3 --bucket b --size 1G --chunk-size 1000", 2, "chunk size 1000 is invalid"),
    ("add s3 --bucket b --size 1G --lease shared", 2, "invalid value 'shared' for '--lease <HOW>'"),
    ("add null --scheduler Deadline/x", 2, "is not an I/O scheduler name"),
    ("add --frontend fuse -q 1000 null", 1, "out of range 1..=64"),
    ("add --frontend fuse file --file {}/fifo", 1, "it is a FIFO"),
    ("add --frontend fuse qcow2 --file {}/fifo", 1, "it is a FIFO"),
    ("add --frontend fuse qcow2 --file {}/nonexistent", 1, "No such file"),
    ("add --frontend fuse null --filter cow:file={}/fifo", 1, "not a regular file: it is a FIFO"),
    ("add --frontend fuse null --filter cache:file={}/fifo", 1, "not a regular file: it is a FIFO"),
    ("add --frontend fuse null --filter log:file={}/fifo", 1, "not a regular file: it is a FIFO"),
    ("add --frontend fuse null --filter log:file={}", 1, "not a regular file: it is a directory"),
    ("add --frontend fuse null --filter cow:file={}", 1, "not a regular file: it is a directory"),
    ("add --frontend fuse null --filter cache:file=/dev/null", 1, "not a regular file: it is a character device"),
    ("add --frontend fuse null --filter log:file=/dev/null", 1, "not a regular file: it is a character device"),
    ("copy {}/fifo {}/dst.img", 1, "it is a FIFO"),
    ("copy {}/src.img {}/fifo", 1, "it is a FIFO"),
    ("copy {}/src.img qcow2:{}/fifo", 1, "it is a FIFO"),
    ("copy {}/src.img {}/nodir/dst.img", 1, "No such file"),
    ("copy {}/src.img {}/dst.img --resume --checkpoint {}/nodir/x", 1, "its directory cannot be written"),
    ("copy {}/src.img s3://b/p?chunk-size=1000", 2, "chunk size 1000 is invalid"),
    ("add rbd --pool p", 2, "--image <IMAGE>"),
    ("add rbd --pool p --image i --size 1T7", 2, "--size"),
    ("copy {}/src.img rbd://pool", 2, "use rbd://POOL/IMAGE"),
    ("copy rbd://p/i?x=1 {}/dst.img", 2, "rbd:// takes conf=FILE and id=NAME"),
    ("copy {}/src.img s3://b/p?lease=shared", 2, "lease=shared: auto or host"),
    ("ctl -n 0 powercut junk", 2, "unexpected argument 'junk'"),
    ("ctl -n 0", 1, "no device with id 0"),
    ("resize -n 0 --size 1G", 1, "no device with id 0"),
    ("resize -n 0 --size 0", 1, "the new size must be greater than 0"),
    ("resize -n 0 --size lots", 2, "invalid size 'lots'"),
    ("resize -n 0 --size 16383P", 2, "larger than the largest device"),
    ("resize -n 0", 2, "--size <SIZE>"),
    ("upgrade -n x", 2, "invalid value 'x'"),
    ("upgrade -n 0 --binary {}/nonexistent", 1, "No such file"),
    ("upgrade -n 0 --binary {}/src.img", 1, "not an executable file"),
    ("upgrade -n 0 --binary {}/fifo", 1, "not an executable file"),
    ("upgrade -n 0 --binary /bin/sh", 1, "must be named userblk"),
    ("upgrade -n 0 --binary {}/fake/userblk", 1, "not a userblk binary"),
    ("add --frontend fuse --fail-io null", 1, "--fail-io"),
    ("add --frontend nbd --listen unix:{}/s --fail-io null", 1, "--fail-io"),
    ("add --fail-io --reissue null", 2, "cannot be used with"),
];

#[test]
fn bad_input_is_one_line_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fifo = d.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    std::fs::write(d.join("src.img"), vec![0u8; 4096]).unwrap();
    // An executable named userblk that is not one (`upgrade --binary`).
    std::fs::create_dir(d.join("fake")).unwrap();
    std::fs::write(d.join("fake/userblk"), "#!/bin/sh\necho hello\n").unwrap();
    let exec = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
    std::fs::set_permissions(d.join("fake/userblk"), exec).unwrap();
    let before = listing(d);
    let dstr = d.display().to_string();
    for &(args, want_code, phrase) in CASES {
        let args: Vec<String> = args.split(' ').map(|a| a.replace("{}", &dstr)).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _out, err) = run(d, &args);
        assert_eq!(code, Some(want_code), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
        assert!(
            err.contains(phrase),
            "{args:?}: expected '{phrase}' in: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        // A path said once: no "X: X: ..." (a name of the scratch
        // directory's files appears at most once).
        for name in ["fifo", "x.qcow2", "dst.img", "nonexistent"] {
            let p = format!("{dstr}/{name}");
            assert!(
                err.matches(&p).count() <= 1,
                "{args:?}: {p} repeated: {err}"
            );
        }
        assert_eq!(listing(d), before, "{args:?} left something behind");
    }
}

#[test]
fn a_closed_pipe_is_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["completions", "fish"][..],
        &["completions", "bash"],
        &["man"],
        &["--help"],
        &["add", "--help"],
        &["list"],
        &["list", "--json"],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_userblk"))
            .args(args)
            .env("USERBLK_STATE_DIR", dir.path().join("state"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes before the first byte is written.
        drop(child.stdout.take());
        let status = wait(&mut child, args);
        let err = read_all(child.stderr.take());
        assert_eq!(status.code(), Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}
