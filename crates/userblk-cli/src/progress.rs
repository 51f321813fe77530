//! The progress display of `userblk copy`: an `indicatif` bar on a
//! terminal, or one plain line a second where `--progress` asks for one on
//! something else (a log file, a pipe).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// Redraws a second on a terminal.
const TERMINAL_HZ: u8 = 10;

/// A progress bar over `total` bytes on stderr (hidden if not `show`).
pub fn bar(show: bool, total: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr_with_hz(TERMINAL_HZ)
    } else {
        ProgressDrawTarget::term_like_with_hz(Box::new(PlainLines::default()), 1)
    };
    let style = ProgressStyle::with_template(
        "{bytes:>10} of {total_bytes} [{wide_bar}] {bytes_per_sec:>12}, ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    ProgressBar::with_draw_target(Some(total), target).with_style(style)
}

/// Move `bar` to `position()` every tenth of a second until `stop` is set.
pub fn follow(bar: &ProgressBar, position: impl Fn() -> u64, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        bar.set_position(position());
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.set_position(position());
}

/// A "terminal" that prints each redraw as a line of its own and ignores
/// cursor movement, for output that is not a terminal.
#[derive(Debug, Default)]
struct PlainLines {
    line: Mutex<String>,
}

impl TermLike for PlainLines {
    fn width(&self) -> u16 {
        100
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        writeln!(std::io::stderr(), "{s}")
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        let mut line = self.line.lock().unwrap_or_else(|e| e.into_inner());
        line.push_str(s.trim_start_matches('\r'));
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        let mut line = self.line.lock().unwrap_or_else(|e| e.into_inner());
        let text = line.trim_end();
        if !text.is_empty() {
            writeln!(std::io::stderr(), "{text}")?;
        }
        line.clear();
        Ok(())
    }
}
