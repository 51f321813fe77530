//! Standard output, written so that a reader that has gone away
//! (`userblk list | head -1`) ends nothing in a panic.
//!
//! Rust ignores `SIGPIPE`, so a write into a closed pipe fails with
//! `EPIPE`, and `print!` panics on that. Every command's output goes through
//! here instead (`clippy::print_stdout` is denied in this crate): a command
//! whose output is its whole job ends quietly with success when its reader
//! has gone, as if the reader had read it all; a running device's
//! announcements are best effort and never end the device.

use std::io::Write;

/// Write `bytes` as a command's output. A closed reader ends the process
/// with status 0; any other failure (a full disk) with one line and status 1.
pub fn bytes(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("userblk: writing to standard output: {e}");
        std::process::exit(1);
    }
}

/// [`bytes`] of formatted text (see [`outln!`]).
pub fn fmt(args: std::fmt::Arguments<'_>) {
    bytes(args.to_string().as_bytes());
}

/// Best-effort output from a process that serves a device: a reader that
/// went away must not take the device down with it.
pub fn announce(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// `println!` through [`fmt`].
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::out::fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;
