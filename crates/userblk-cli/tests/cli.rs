//! The `userblk` binary's argument handling and error reporting, on the host.
//!
//! These never reach the kernel's ublk driver: each case fails before a
//! device would be created (bad arguments, bad targets), or checks the
//! message for a kernel without ublk. Real devices are tested in the VM
//! suite (vm/suite/ublk.sh).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../userblk/tests/skip/mod.rs"]
mod skip;

use std::process::{Command, Output};

fn userblk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_userblk"))
        .args(args)
        // Keep any daemon the binary spawns from writing state outside the test.
        .env(
            "USERBLK_STATE_DIR",
            std::env::temp_dir().join("userblk-cli-test"),
        )
        .output()
        .expect("run userblk")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Assert exit `code` and a message containing `phrase`, and no panic.
fn fails(args: &[&str], code: i32, phrase: &str) {
    let o = userblk(args);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(code), "{args:?}: {t}");
    assert!(t.contains(phrase), "{args:?}: expected '{phrase}' in: {t}");
    assert!(!t.contains("panicked"), "{args:?} panicked: {t}");
}

#[test]
fn help_and_version() {
    let o = userblk(&["--help"]);
    assert!(o.status.success());
    for cmd in ["add", "del", "list", "features"] {
        assert!(text(&o).contains(cmd), "help lacks {cmd}");
    }
    let o = userblk(&["add", "--help"]);
    for t in ["null", "mem", "file"] {
        assert!(text(&o).contains(t), "add help lacks {t}");
    }
    assert!(userblk(&["--version"]).status.success());
}

#[test]
fn add_help_is_grouped_and_h_is_short() {
    let short = text(&userblk(&["add", "-h"]));
    let long = text(&userblk(&["add", "--help"]));
    for heading in ["Device:", "ublk:", "FUSE:", "NBD:", "Filters:"] {
        assert!(
            short.contains(&format!("\n{heading}\n")),
            "-h lacks {heading}: {short}"
        );
        assert!(
            long.contains(&format!("\n{heading}\n")),
            "--help lacks {heading}"
        );
    }
    // -h: one line an option; --help: the whole text.
    assert!(
        short.lines().count() < 60,
        "-h is {} lines",
        short.lines().count()
    );
    assert!(long.lines().count() > short.lines().count() * 2);
    assert!(long.contains("automatic buffer registration") && !short.contains("automatic buffer"));
    // FUSE and NBD ids are not the kernel's choice.
    assert!(!long.contains("kernel picks"), "{long}");
}

#[test]
fn completions_and_man_page() {
    for shell in ["bash", "zsh", "fish"] {
        let o = userblk(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", text(&o));
        let t = text(&o);
        assert!(
            t.contains("recover") && t.contains("io-buf-size"),
            "{shell} completion lacks commands"
        );
    }
    let o = userblk(&["man"]);
    assert!(o.status.success());
    let t = text(&o);
    assert!(
        t.starts_with(".ie") || t.contains(".TH userblk 8"),
        "not roff: {}",
        &t[..t.len().min(200)]
    );
    fails(&["completions", "tcsh"], 2, "invalid value");
}

#[test]
fn man_pages_for_every_command() {
    // One page per command, each with the sections clap does not write.
    let t = text(&userblk(&["man", "add"]));
    assert!(
        t.contains(".TH userblk-add 8"),
        "{}",
        &t[..t.len().min(300)]
    );
    for section in [
        ".SH EXAMPLES",
        ".SH \"EXIT STATUS\"",
        ".SH FILES",
        "ublk\\-control",
    ] {
        assert!(t.contains(section), "userblk-add.8 lacks {section}");
    }
    // Every documented exit status (docs/cli.md "Exit status").
    for status in 0..=4 {
        assert!(
            t.contains(&format!(".TP\n{status}\n")),
            "no exit status {status}"
        );
    }
    assert!(text(&userblk(&["man", "add-file"])).contains(".TH userblk-add-file 8"));
    fails(&["man", "nosuch"], 1, "no manual page 'userblk-nosuch'");
    fails(&["man", "add", "--dir", "/tmp"], 2, "cannot be used with");
    let dir = tempfile::tempdir().unwrap();
    let o = userblk(&["man", "--dir", dir.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    for page in [
        "userblk.8",
        "userblk-add.8",
        "userblk-del.8",
        "userblk-create-qcow2.8",
    ] {
        let roff = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(roff.contains(".SH \"EXIT STATUS\""), "{page}");
    }
    // Hidden commands (the test target `early`) get no page.
    assert!(!dir.path().join("userblk-add-early.8").exists());
    fails(&["man", "--dir", "/nonexistent/man8"], 1, "not a directory");
}

#[test]
fn success_exits_0() {
    let o = userblk(&["list", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn argument_errors_exit_2() {
    fails(&["add", "mem"], 2, "--size");
    fails(&["add", "-q", "0", "mem", "--size", "1M"], 2, "1..=4096");
    fails(&["add", "-d", "5000", "null"], 2, "1..=4096");
    fails(&["add", "mem", "--size", "12Q"], 2, "invalid size");
    fails(&["add", "mem", "--size", "-1"], 2, "'-1'");
    fails(&["add", "nosuch"], 2, "unrecognized subcommand");
    fails(&["add", "file"], 2, "--file");
    fails(&["del"], 2, "--number");
    fails(&["del", "-n", "x"], 2, "invalid value");
    fails(&["frobnicate"], 2, "unrecognized subcommand");
}

#[test]
fn global_device_options_go_after_the_target_too() {
    // Fails later (size 0), but only once parsing accepted -q/-d after the target name.
    fails(
        &[
            "add",
            "mem",
            "--size",
            "0",
            "-q",
            "2",
            "-d",
            "64",
            "--foreground",
        ],
        1,
        "greater than 0",
    );
}

#[test]
fn target_errors_exit_1_with_one_clear_line() {
    fails(&["add", "mem", "--size", "0"], 1, "greater than 0");
    fails(
        &["add", "mem", "--size", "1000"],
        1,
        "not a multiple of the block size 512",
    );
    fails(
        &["add", "file", "-f", "/nonexistent/disk.img"],
        1,
        "/nonexistent/disk.img: No such file",
    );
    fails(
        &["add", "loop", "-f", "/dev/null"],
        1,
        "not a regular file or block device",
    );
    fails(
        &["add", "--io-buf-size", "1000", "null"],
        1,
        "io buffer size 1000",
    );
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    fails(
        &["add", "file", "-f", empty.to_str().unwrap()],
        1,
        "no data to serve",
    );
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, vec![0u8; 8192]).unwrap();
    fails(
        &[
            "add",
            "file",
            "-f",
            odd.to_str().unwrap(),
            "--offset",
            "100",
        ],
        1,
        "offset 100 is not a multiple",
    );
    // One line on stderr, not a repeated cause chain.
    let o = userblk(&["add", "file", "-f", "/nonexistent/disk.img"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}

#[test]
fn a_failed_add_says_one_line_even_after_the_daemon_logged() {
    // The cow filter logs an INFO line as it opens; the NBD server then fails
    // in the daemon. Only the error reaches the user.
    let add = [
        "add",
        "--listen",
        "unix:/nonexistent/x.sock",
        "mem",
        "-s",
        "16M",
        "--filter",
        "cow",
    ];
    let o = userblk(&add);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("userblk: starting the NBD server: /nonexistent/x.sock"),
        "{err}"
    );
    // With -v, what the daemon logged too.
    let o = userblk(&[&["-v"][..], &add].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("INFO cow"), "{err}");
}

#[test]
fn without_the_ublk_driver_the_message_says_what_to_do() {
    let no_ublk = !std::path::Path::new("/dev/ublk-control").exists();
    let why = "this kernel has /dev/ublk-control; the VM suite covers real devices";
    if !skip::require(no_ublk, skip::Prereq::Environment, why) {
        return;
    }
    // Exit status 4: this host lacks what the command needs, here or in
    // the daemon `add` spawned. `del` of an unknown id is a plain failure.
    for (args, code) in [
        (&["features"][..], 4),
        (&["del", "-n", "4000"], 1),
        (&["add", "--frontend", "ublk", "null"], 4),
        (&["add", "--frontend", "ublk", "--foreground", "null"], 4),
    ] {
        fails(args, code, "needs the ublk driver");
        fails(args, code, "modprobe ublk_drv");
    }
    // FUSE devices may still exist: `list` works and shows none here.
    let o = userblk(&["list"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(text(&o), "");
}

#[test]
fn a_closed_pipe_ends_output_quietly() {
    // `userblk man | head -c1`: the reader goes away; no panic, success.
    let mut child = Command::new(env!("CARGO_BIN_EXE_userblk"))
        .arg("man")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

#[test]
fn copy_errors_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    std::fs::File::create(&src)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let small = dir.path().join("small.raw");
    std::fs::write(&small, vec![1u8; 4096]).unwrap();
    let s = src.to_str().unwrap();
    fails(&["copy", s, "http://x/y"], 2, "unknown scheme 'http'");
    fails(&["copy", "tape:1", s], 2, "nbd+unix:///EXPORT?socket=PATH");
    fails(&["copy", "null:1000", s], 2, "multiple of 512");
    let missing = dir.path().join("missing.raw");
    fails(
        &["copy", missing.to_str().unwrap(), "null:1M"],
        1,
        "No such file",
    );
    assert!(!missing.exists());
    fails(
        &["copy", s, small.to_str().unwrap()],
        1,
        "smaller than the source",
    );
    assert_eq!(std::fs::read(&small).unwrap(), vec![1u8; 4096], "touched");
    fails(&["copy", s, s], 1, "are the same file");
    fails(
        &["copy", "s3://bucket/disk?colour=red", s],
        2,
        "unknown option 'colour'",
    );
}

#[test]
fn copy_counts_data_and_holes() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(8 << 20).unwrap();
    f.write_all_at(&[0xAB; 65536], 1 << 20).unwrap();
    drop(f);
    let dst = dir.path().join("dst.qcow2");
    let o = userblk(&[
        "copy",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["bytes_total"], 8 << 20);
    assert_eq!(j["bytes_data"], 65536, "{j}");
    assert_eq!(j["bytes_skipped"], (8 << 20) - 65536, "{j}");
    assert_eq!(j["complete"], true);
    let back = dir.path().join("back.raw");
    let o = userblk(&["copy", dst.to_str().unwrap(), back.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).starts_with("copied 8.0 MiB in "),
        "summary: {}",
        text(&o)
    );
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap());
}
