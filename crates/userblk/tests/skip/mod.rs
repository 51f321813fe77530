// Tests that cannot run say so: one helper shared by the library's unit
// tests (lib.rs includes this file under #[cfg(test)]), the integration
// tests of this crate (`mod skip;`) and the CLI crate's (by #[path]).
//
// A skipped test still passes in libtest, which hides what a passing test
// prints; so a skip is written straight to stderr (past libtest's capture)
// and appended to a log a runner can count (scripts/test.sh does). Under
// CI=true a missing prerequisite that CI installs is a failure, not a skip.

// Each includer uses part of it.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;

/// What kind of prerequisite is missing: decides whether CI may skip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prereq {
    /// Something CI has: a package scripts/test.sh installs (nbdkit,
    /// s3s-fs, fuse3, e2fsprogs), root, /dev/fuse, /dev/loop-control.
    /// With `CI=true` its absence fails the test.
    CiInstalls,
    /// Something no runner can be asked for (the host kernel has ublk_drv,
    /// the temp dir is on tmpfs): always a skip.
    Environment,
}

/// The environment variable naming the file skips are appended to.
pub const LOG_VAR: &str = "USERBLK_SKIP_LOG";

/// `true` when `have`; otherwise reports the running test as skipped for
/// `reason` (or fails it, see [`Prereq::CiInstalls`]) and returns `false`,
/// so the test returns: `if !skip::require(ok, Prereq::X, "why") { return; }`.
pub fn require(have: bool, prereq: Prereq, reason: &str) -> bool {
    if !have {
        skip(prereq, reason);
    }
    have
}

/// Reports the running test as skipped for `reason`: a `SKIP <test>: <reason>`
/// line on stderr and in the skip log. Panics instead when `prereq` is one
/// CI installs and `CI=true`.
pub fn skip(prereq: Prereq, reason: &str) {
    let test = test_name();
    if prereq == Prereq::CiInstalls && on_ci() {
        panic!("{test}: {reason}; CI installs this prerequisite, so it may not be skipped there");
    }
    let line = format!("SKIP {test}: {reason}\n");
    // Straight to the stream: eprintln! would be captured and dropped.
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(path) = log_path() {
        // One write of one short line to an O_APPEND file: lines of tests
        // running in parallel do not interleave.
        let logged = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = logged {
            let _ = writeln!(std::io::stderr(), "skip log {}: {e}", path.display());
        }
    }
}

fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// `<test binary>::<test>`: libtest runs each test on a thread named after it.
fn test_name() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe
        .as_deref()
        .and_then(|p| p.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // target/debug/deps/<name>-<hash>
    let binary = stem
        .rsplit_once('-')
        .map_or(stem.as_str(), |(name, _)| name);
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("?");
    format!("{binary}::{test}")
}

/// `$USERBLK_SKIP_LOG`, else `test-skips.log` in the target directory (the
/// test binary lives in `<target>/<profile>/deps/`).
fn log_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(LOG_VAR) {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.join("test-skips.log"))
}
