//! `userblk copy SRC DST`: open both ends, run the library's copy
//! ([`userblk::copy`]) with a progress bar, and print a summary.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context};
use userblk::copy::{Copier, CopyError, Progress, Summary, DEFAULT_CHECKPOINT_BYTES};

use crate::checkpoint::Checkpoint;
use crate::cli::CopyArgs;
use crate::endpoint::{self, Endpoint, Role};

/// Run `userblk copy`.
pub fn run(args: &CopyArgs) -> anyhow::Result<()> {
    let src =
        endpoint::open(&args.src, Role::Source).map_err(|e| naming(e, "source", &args.src))?;
    let size = src.target.caps().size;
    refuse_same_file(&args.src, &args.dst)?;
    let checkpoint = Checkpoint::new(&args.src, &args.dst, size, args.checkpoint.clone());
    if args.resume {
        checkpoint.check_writable()?;
    }
    let dst = endpoint::open(&args.dst, Role::Destination { size })
        .map_err(|e| naming(e, "destination", &args.dst))?;
    let start = match (args.resume, dst.created) {
        (true, false) => checkpoint.load()?,
        _ => None,
    };
    if args.resume && !args.quiet {
        match start {
            Some(at) => eprintln!("resuming at offset {at} ({})", human(at as f64)),
            None => eprintln!(
                "no checkpoint at {}: copying from the start",
                checkpoint.path().display()
            ),
        }
    }
    let mut copier = Copier::new(src.target, dst.target)
        .with_context(|| format!("{} to {}", args.src, args.dst))?
        .jobs(args.jobs.into())
        .fresh_destination(dst.created)
        .start_at(start.unwrap_or(0))
        .with_context(|| format!("{}", checkpoint.path().display()))?;
    if args.resume {
        copier = copier.on_checkpoint(DEFAULT_CHECKPOINT_BYTES, |offset| checkpoint.save(offset));
    }

    let progress = Progress::new();
    stop_on_signals(&progress)?;
    let show =
        args.progress || (!args.no_progress && !args.quiet && std::io::stderr().is_terminal());
    let bar = crate::progress::bar(show, size);
    let finished = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        let follower = std::thread::Builder::new()
            .name("progress".into())
            .spawn_scoped(s, || {
                crate::progress::follow(&bar, || progress.done(), &finished);
            });
        if let Err(e) = follower {
            tracing::warn!("no progress display: {e}");
        }
        let r = copier.run(&progress);
        finished.store(true, Ordering::Relaxed);
        r
    });
    bar.finish_and_clear();

    match result {
        Ok(summary) => {
            checkpoint.remove();
            report(args, &summary);
            Ok(())
        }
        Err(CopyError::Interrupted {
            summary,
            copied_up_to,
        }) => {
            report(args, &summary);
            let again = if args.resume {
                "`--resume` continues from there"
            } else {
                "running the same copy again finishes it"
            };
            bail!(
                "interrupted: {} is only partly copied (everything below offset {copied_up_to}); {again}",
                args.dst
            )
        }
        Err(e) => Err(e).with_context(|| format!("copying {} to {}", args.src, args.dst)),
    }
}

/// SIGINT and SIGTERM stop the copy cleanly; a second one ends the
/// process at once.
fn stop_on_signals(progress: &Progress) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = progress.stop_flag();
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 1, flag.clone())
            .context("installing a signal handler")?;
        signal_hook::flag::register(sig, flag.clone()).context("installing a signal handler")?;
    }
    Ok(())
}

/// Copying a file onto itself would read what it just wrote.
fn refuse_same_file(src: &Endpoint, dst: &Endpoint) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.dev(), m.ino(), m.rdev()))
    };
    if let (Some(s), Some(d)) = (src.path(), dst.path()) {
        if id(s).is_some() && id(s) == id(d) {
            bail!("{src} and {dst} are the same file");
        }
    }
    Ok(())
}

/// `ROLE ENDPOINT: error`, or `ROLE: error` where the error (a target's,
/// such as `qcow2 target: PATH: ...`) names the endpoint's file already: a
/// path said once.
fn naming(e: anyhow::Error, role: &str, ep: &Endpoint) -> anyhow::Error {
    let named = ep
        .path()
        .is_some_and(|p| format!("{e:#}").contains(&p.display().to_string()));
    if named {
        e.context(role.to_string())
    } else {
        e.context(format!("{role} {ep}"))
    }
}

/// The summary: one line, or JSON with `--json`; nothing with `--quiet`.
fn report(args: &CopyArgs, s: &Summary) {
    if args.json {
        match serde_json::to_string(s) {
            Ok(j) => crate::out::outln!("{j}"),
            Err(e) => tracing::warn!("summary: {e}"),
        }
    } else if !args.quiet {
        crate::out::outln!("{}", summary_line(s));
    }
}

/// `copied 1.0 GiB in 3.2 s (312 MiB/s): 120 MiB of data, 904 MiB of holes skipped`.
fn summary_line(s: &Summary) -> String {
    let moved = (s.bytes_data + s.bytes_skipped) as f64;
    let secs = s.seconds.max(1e-6);
    let mut line = format!(
        "{} {} in {:.1} s ({}/s): {} of data, {} of holes",
        if s.complete {
            "copied"
        } else {
            "interrupted after"
        },
        human(moved),
        s.seconds,
        human(moved / secs),
        human(s.bytes_data as f64),
        human(s.bytes_skipped as f64),
    );
    if s.bytes_zeroed > 0 {
        line += &format!(
            " ({} zeroed on the destination)",
            human(s.bytes_zeroed as f64)
        );
    } else {
        line += " skipped";
    }
    if s.bytes_resumed > 0 {
        line += &format!("; resumed at {}", human(s.bytes_resumed as f64));
    }
    if !s.complete {
        line += &format!(
            "; {} of {} done",
            human(s.bytes_done() as f64),
            human(s.bytes_total as f64)
        );
    }
    line
}

/// Bytes in binary units: `512 B`, `4.0 KiB`, `312 MiB`.
pub(crate) fn human(bytes: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < units.len() {
        v /= 1024.0;
        unit += 1;
    }
    match (unit, v) {
        (0, _) => format!("{v:.0} B"),
        (_, v) if v < 10.0 => format!("{v:.1} {}", units[unit]),
        _ => format!("{v:.0} {}", units[unit]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human(0.0), "0 B");
        assert_eq!(human(512.0), "512 B");
        assert_eq!(human(4096.0), "4.0 KiB");
        assert_eq!(human(312.0 * 1048576.0), "312 MiB");
        assert_eq!(human(1073741824.0), "1.0 GiB");
    }

    #[test]
    fn summary_lines() {
        let s = Summary {
            bytes_total: 1 << 30,
            bytes_data: 120 << 20,
            bytes_skipped: 904 << 20,
            bytes_zeroed: 0,
            bytes_resumed: 0,
            seconds: 3.2,
            complete: true,
        };
        assert_eq!(
            summary_line(&s),
            "copied 1.0 GiB in 3.2 s (320 MiB/s): 120 MiB of data, 904 MiB of holes skipped"
        );
        let s = Summary {
            bytes_zeroed: 4 << 20,
            bytes_resumed: 512 << 20,
            bytes_data: 100 << 20,
            bytes_skipped: 100 << 20,
            complete: false,
            seconds: 2.0,
            ..s
        };
        assert_eq!(
            summary_line(&s),
            "interrupted after 200 MiB in 2.0 s (100 MiB/s): 100 MiB of data, 100 MiB of holes \
             (4.0 MiB zeroed on the destination); resumed at 512 MiB; 712 MiB of 1.0 GiB done"
        );
    }
}
