//! `userblk`: add, list and delete userspace block devices.
//!
//! Modules use only those before them in this order (no module uses one
//! that uses it back):
//! `progress`, `s3` → `endpoint` → `cli` → `checkpoint`, `ctl`, `stats`,
//! `list` → `targets` → `copy` → `frontend::lifecycle` →
//! `frontend::{ublk, fuse, nbd}` → `frontend` → `main`.

mod checkpoint;
mod cli;
mod copy;
mod ctl;
mod endpoint;
mod frontend;
mod list;
mod progress;
mod s3;
mod stats;
mod targets;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use userblk::ublk::Control;

use crate::cli::{Cli, Command, JsonArgs};

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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: daemon output goes to a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Output into a pipe whose reader has gone (`userblk list | grep -q ...`)
/// is not a failure of ours: end quietly with success, as if the reader
/// had read it all, instead of the panic `print!` raises on EPIPE (Rust
/// ignores SIGPIPE, so the write fails instead of killing us).
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = Cli::parse();
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
        Command::Stats(args) => stats::run(&args),
        Command::Ctl(args) => ctl::run(&args),
        Command::Create(args) => create(&args),
        Command::Copy(args) => copy::run(&args),
        Command::Features(args) => features(&args),
        Command::Completions(args) => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(args.shell, &mut cmd, "userblk", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => man(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `userblk man | head` is not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("userblk: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn man() -> anyhow::Result<()> {
    let cmd = <Cli as clap::CommandFactory>::command();
    clap_mangen::Man::new(cmd)
        .section("8")
        .render(&mut std::io::stdout())?;
    Ok(())
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
            let t = userblk::targets::qcow2::Qcow2Target::open(&a.path, true)
                .context("reopening the new image")?;
            let d = userblk::Target::describe(&t);
            if a.json {
                println!("{d}");
            } else {
                println!(
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
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "features": f.0, "names": f.names() })
        );
    } else {
        println!("ublk features {:#x}", f.0);
        for name in f.names() {
            println!("\t{name}");
        }
    }
    Ok(())
}
