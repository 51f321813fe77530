//! `userblk`: add, list and delete userspace block devices.
//!
//! Modules use only those before them in this order (no module uses one
//! that uses it back):
//! `progress`, `s3`, `rbd`, `stale_replies`, `exit`, `exposition`, `http` → `endpoint` → `cli` → `names` →
//! `checkpoint`, `ctl`, `stats`, `list`, `man`, `metrics`, `apply` → `targets` → `copy` → `notify` →
//! `frontend::{service, del_all, limits}` → `frontend::lifecycle` → `frontend::{ublk, fuse, nbd}` →
//! `frontend` → `main`.

// Output goes through `out`, which survives a closed pipe; `print!` panics.
#![deny(clippy::print_stdout)]

mod apply;
mod checkpoint;
mod cli;
mod copy;
mod ctl;
mod endpoint;
mod exit;
mod exposition;
mod frontend;
mod gc;
mod http;
mod list;
mod man;
mod metrics;
mod names;
mod notify;
mod out;
mod progress;
mod rbd;
mod resize;
mod s3;
mod snapshot;
mod stale_replies;
mod stats;
mod targets;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use userblk::ublk::Control;

use crate::cli::{Cli, Command, JsonArgs};
use crate::out::outln;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{filter::FilterExt as _, Layer as _};

fn init_logging(verbose: u8, default: &str) {
    let level = match verbose {
        0 => default,
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // The FUSE library warns about routine things (a second unmount
        // attempt after ours); its errors still show.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!("{level},fuser=error,object_store=warn"))
        });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colour only on a terminal: daemon output goes to a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let stale = stale_replies::StaleReplies { keep: verbose > 0 };
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter.and(stale)))
        .try_init();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    let default_level = if matches!(cli.command, Command::Add(_) | Command::Recover(_)) {
        "info"
    } else {
        "warn"
    };
    init_logging(cli.verbose, default_level);
    let result = match cli.command {
        Command::Add(args) => frontend::add(*args),
        Command::Del(args) => frontend::del(&args),
        Command::List(args) => list::run(&args),
        Command::Recover(args) => frontend::recover(&args),
        Command::Upgrade(args) => frontend::upgrade(&args),
        Command::Stats(args) => stats::run(&args),
        Command::Ctl(args) => ctl::run(&args),
        Command::Resize(args) => resize::run(&args),
        Command::Apply(args) => apply::run(&args),
        Command::Create(args) => create(&args),
        Command::Copy(args) => copy::run(&args),
        Command::Snapshot(args) => snapshot::run(&args),
        Command::Clone(args) => snapshot::clone(&args),
        Command::Gc(args) => gc::run(&args),
        Command::Features(args) => features(&args),
        Command::Completions(args) => {
            // Into memory first: the generator panics on a failed write.
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut buf = Vec::new();
            clap_complete::generate(args.shell, &mut cmd, "userblk", &mut buf);
            out::bytes(&buf);
            Ok(())
        }
        Command::Man(args) => man::run(&args),
        Command::Metrics(args) => metrics::run(&args),
        Command::UdevName(args) => names::udev_name(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("userblk: {e:#}");
            ExitCode::from(exit::status_of(&e))
        }
    }
}

/// Help and version as clap prints them; a usage error as one line
/// (`userblk: invalid value ...`), exit status 2, like every other error
/// being one line.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        // clap's own routing: help to stdout, help for a bare command to
        // stderr; a closed pipe is ignored there.
        let _ = e.print();
        return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
    }
    eprintln!("userblk: {} (see --help)", cli::error_line(e));
    ExitCode::from(exit::USAGE)
}

fn create(args: &cli::CreateArgs) -> anyhow::Result<()> {
    match &args.format {
        cli::CreateFormat::Qcow2(a) => {
            use userblk::targets::qcow2::{create, CreateOptions};
            if a.size.is_none() && a.backing.is_none() {
                anyhow::bail!("--size is needed (or --backing, to take its size)");
            }
            let opts = CreateOptions {
                path: a.path.clone(),
                size: a.size.unwrap_or(0),
                cluster_size: a.cluster_size,
                backing: a.backing.clone(),
                backing_format: a.backing_format.clone(),
            };
            create(&opts).with_context(|| format!("creating {}", a.path.display()))?;
            // The file is ours from here: an image that does not open is
            // removed, so that the command can simply be run again.
            let t = userblk::targets::qcow2::Qcow2Target::open(&a.path, true)
                .inspect_err(|_| {
                    let _ = std::fs::remove_file(&a.path);
                })
                .context("reopening the new image")?;
            let d = userblk::Target::describe(&t);
            if a.json {
                outln!("{d}");
            } else {
                outln!(
                    "created {}: qcow2 v3, {} bytes, {}-byte clusters{}",
                    a.path.display(),
                    d["size"],
                    a.cluster_size,
                    a.backing
                        .as_ref()
                        .map(|b| format!(", backing file {b}"))
                        .unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

fn features(args: &JsonArgs) -> anyhow::Result<()> {
    let mut ctrl = Control::open()?;
    let f = userblk::ublk::Features(ctrl.features().context("reading kernel features")?);
    let table = userblk::ublk::capabilities::table(f);
    if args.json {
        outln!(
            "{}",
            serde_json::json!({ "features": f.0, "names": f.names(), "capabilities": table })
        );
    } else {
        outln!("ublk features {:#x}", f.0);
        for c in table.iter().filter(|c| c.offered) {
            outln!("\t{:<24}{}", c.flag, c.enables);
        }
        // Bits newer than this userblk: named as hex, with no capability.
        for name in f.names().iter().filter(|n| n.starts_with("0x")) {
            outln!("\t{name:<24}unknown to this userblk");
        }
        // Without the flags' names: scripts test for a flag with `grep -q NAME`.
        let mut missing: Vec<&str> = table
            .iter()
            .filter(|c| !c.offered)
            .map(|c| c.enables)
            .collect();
        missing.dedup();
        if !missing.is_empty() {
            outln!("not offered by this kernel (see --json for the flags):");
            for what in missing {
                outln!("\t{what}");
            }
        }
    }
    Ok(())
}
