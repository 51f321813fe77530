//! `userblk apply FILE.toml`: make the running devices match a pool file
//! (docs/pool.md). The file is read and checked whole ([`file`]), the
//! running named devices are compared with it ([`plan`]), and each change
//! is an `add`, `del` or `resize` of its own ([`exec`]).

mod exec;
mod file;
mod plan;

use std::collections::BTreeSet;

use clap::Parser;
use serde_json::json;
use userblk::state::DeviceState;

use crate::cli::{ApplyArgs, Cli, Command};
use crate::exit::{Coded, FAILURE, IN_USE};
use crate::out::outln;
use plan::{Action, Canon, Running, Step};

/// What became of one step.
struct Done {
    step: Step,
    /// The `add` command line (add, recreate).
    argv: Vec<String>,
    /// Whether it worked (none: nothing was run).
    ok: Option<bool>,
    /// The failing command's exit status and error.
    status: Option<i32>,
    error: Option<String>,
    /// Where an added device is now: its id and path.
    now: Option<(u32, String)>,
}

/// `userblk apply FILE [--dry-run] [--json] [--recreate]`.
pub fn run(args: &ApplyArgs) -> anyhow::Result<()> {
    let devices = file::read(&args.file)?;
    let _lock = if args.dry_run {
        None
    } else {
        Some(exec::Lock::take()?)
    };
    let managed = exec::managed()?;
    let wanted: Vec<(String, Canon)> = devices
        .iter()
        .map(|d| (d.name.clone(), Canon::of(&d.args)))
        .collect();
    let steps = plan::plan(&wanted, &running(), &managed, args.recreate);
    let argv_of = |name: &str| {
        devices
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.argv.clone())
            .unwrap_or_default()
    };
    let names: BTreeSet<String> = devices.iter().map(|d| d.name.clone()).collect();
    if !args.dry_run {
        // Before any change: a killed apply leaves a list that holds
        // every device it may have added.
        exec::remember(&managed.union(&names).cloned().collect())?;
    }
    let width = steps.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let mut done = Vec::new();
    for step in steps {
        let argv = argv_of(&step.name);
        let d = if args.dry_run {
            Done {
                step,
                argv,
                ok: None,
                status: None,
                error: None,
                now: None,
            }
        } else {
            execute(step, argv)
        };
        if !args.json {
            // Best effort: a reader that went away must not stop the
            // remaining steps half way (`apply | head -1`).
            crate::out::announce(&format!("{}\n", line(&d, width)));
        }
        done.push(d);
    }
    if !args.dry_run {
        let failed_deletes = done
            .iter()
            .filter(|d| d.step.action == Action::Delete && d.ok == Some(false))
            .map(|d| d.step.name.clone());
        exec::remember(&names.iter().cloned().chain(failed_deletes).collect())?;
    }
    if args.json {
        outln!("{}", report(args, &done));
    }
    outcome(args, &done)
}

/// The running devices that have a name, with their saved `add` arguments.
fn running() -> Vec<Running> {
    DeviceState::ids()
        .into_iter()
        .filter_map(|id| DeviceState::load(id).ok().flatten())
        .filter_map(|st| {
            Some(Running {
                name: st.name.clone()?,
                id: st.id,
                pid: st.pid,
                alive: st.daemon_alive(),
                canon: saved_canon(&st.args),
            })
        })
        .collect()
}

/// A device's saved `add` arguments, parsed as `add` parses them.
fn saved_canon(args: &[String]) -> Result<Canon, String> {
    let argv = std::iter::once("userblk".to_string()).chain(args.iter().cloned());
    match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: Command::Add(a),
            ..
        }) => Ok(Canon::of(&a)),
        Ok(_) => Err(format!("not an add command line: {}", args.join(" "))),
        Err(e) => Err(crate::cli::error_line(&e)),
    }
}

/// Run one step: `del`, `resize`, `add`, or `del` then `add`.
fn execute(step: Step, argv: Vec<String>) -> Done {
    let name = step.name.clone();
    let del = || {
        exec::userblk(
            &to_args(&["del", "--name", name.as_str()]),
            exec::DEL_DEADLINE,
        )
    };
    let add = || {
        let mut a = vec!["add".to_string()];
        a.extend(argv.iter().cloned());
        exec::userblk(&a, exec::ADD_DEADLINE)
    };
    let ran = match &step.action {
        Action::Keep | Action::Differs(_) => None,
        Action::Delete => Some(del()),
        Action::Grow { to, .. } => Some(exec::userblk(
            &to_args(&[
                "resize",
                "--name",
                name.as_str(),
                "--size",
                to.to_string().as_str(),
            ]),
            exec::RESIZE_DEADLINE,
        )),
        Action::Add => Some(add()),
        Action::Recreate(_) => {
            let gone = del();
            Some(if gone.ok { add() } else { gone })
        }
    };
    let now = match &step.action {
        Action::Add | Action::Recreate(_) if ran.as_ref().is_some_and(|r| r.ok) => {
            userblk::names::lookup(&name).map(|st| (st.id, st.block_device))
        }
        _ => None,
    };
    Done {
        argv,
        ok: Some(ran.as_ref().is_none_or(|r| r.ok)),
        status: ran.as_ref().and_then(|r| r.status),
        error: ran.filter(|r| !r.ok).map(|r| r.error),
        now,
        step,
    }
}

fn to_args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_string()).collect()
}

/// One line of the plan or its outcome: `ACTION NAME DETAIL`.
fn line(d: &Done, width: usize) -> String {
    let id = d.step.id.map(|id| format!("id {id}")).unwrap_or_default();
    let detail = match &d.step.action {
        Action::Add => d
            .argv
            .iter()
            .filter(|a| !a.starts_with("--name="))
            .cloned()
            .collect::<Vec<_>>()
            .join(" "),
        Action::Keep | Action::Delete => id,
        Action::Grow { from, to } => format!("{id}: {from} -> {to} bytes"),
        Action::Differs(diffs) | Action::Recreate(diffs) => {
            let list: Vec<String> = diffs
                .iter()
                .map(|x| format!("{}: {} -> {}", x.option, x.running, x.file))
                .collect();
            format!("{id}: {}", list.join("; "))
        }
    };
    let result = match (&d.error, &d.now) {
        (Some(e), _) => format!(": FAILED: {e}"),
        (None, Some((id, path))) => format!(": now id {id} at {path}"),
        (None, None) => String::new(),
    };
    format!(
        "{:<8} {:<width$} {detail}{result}",
        d.step.action.word(),
        d.step.name
    )
}

/// The plan and its outcome as JSON.
fn report(args: &ApplyArgs, done: &[Done]) -> serde_json::Value {
    let devices: Vec<serde_json::Value> = done
        .iter()
        .map(|d| {
            let (from, to) = match d.step.action {
                Action::Grow { from, to } => (Some(from), Some(to)),
                _ => (None, None),
            };
            let differences = match &d.step.action {
                Action::Differs(x) | Action::Recreate(x) => x.clone(),
                _ => Vec::new(),
            };
            let adds = matches!(d.step.action, Action::Add | Action::Recreate(_));
            json!({
                "name": d.step.name,
                "action": d.step.action.word(),
                "id": d.step.id,
                "argv": adds.then_some(&d.argv),
                "from": from,
                "to": to,
                "differences": differences,
                "ok": d.ok,
                "exit_status": d.status.filter(|_| d.ok == Some(false)),
                "error": d.error,
                "now": d.now.as_ref().map(|(id, path)| json!({"id": id, "block_device": path})),
            })
        })
        .collect();
    json!({
        "file": args.file,
        "dry_run": args.dry_run,
        "recreate": args.recreate,
        "converged": !args.dry_run && converged(done),
        "devices": devices,
    })
}

/// Whether every device now runs as the file says.
fn converged(done: &[Done]) -> bool {
    done.iter()
        .all(|d| d.ok == Some(true) && !matches!(d.step.action, Action::Differs(_)))
}

/// The exit: success when every device runs as the file says (or, with
/// `--dry-run`, when the file is good); 3 when only deletions of devices
/// in use failed; else 1.
fn outcome(args: &ApplyArgs, done: &[Done]) -> anyhow::Result<()> {
    if args.dry_run || converged(done) {
        return Ok(());
    }
    let failed: Vec<&Done> = done.iter().filter(|d| d.ok == Some(false)).collect();
    let differ: Vec<&str> = done
        .iter()
        .filter(|d| matches!(d.step.action, Action::Differs(_)))
        .map(|d| d.step.name.as_str())
        .collect();
    let mut msg = Vec::new();
    if !failed.is_empty() {
        let names: Vec<&str> = failed.iter().map(|d| d.step.name.as_str()).collect();
        msg.push(format!(
            "{} change(s) failed ({})",
            failed.len(),
            names.join(", ")
        ));
    }
    if !differ.is_empty() {
        msg.push(format!(
            "{} device(s) differ from the file ({}; --recreate replaces them)",
            differ.len(),
            differ.join(", ")
        ));
    }
    let in_use_only =
        differ.is_empty() && failed.iter().all(|d| d.status == Some(i32::from(IN_USE)));
    Err(anyhow::Error::new(Coded {
        status: if in_use_only { IN_USE } else { FAILURE },
        msg: format!("{}: {}", args.file.display(), msg.join("; ")),
    }))
}
