//! `ctl`: run a control action in a device's daemon (`flakey`'s
//! `powercut`), through the socket every daemon serves in the state
//! directory.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use userblk::control::{self, ControlError, Endpoint, Registry, Request};
use userblk::state::{self, DeviceState};

use crate::cli::CtlArgs;
use crate::out::outln;

/// How long `ctl` waits for the daemon's answer once it has acknowledged
/// the request (a `writeback` may write a lot).
const TIMEOUT: Duration = Duration::from_secs(180);

/// Where daemon `pid` serves its control actions.
pub fn socket_path(pid: i32) -> PathBuf {
    state::state_dir().join(format!("ctl-{pid}.sock"))
}

/// This daemon's socket for `registry` (the state directory is made if
/// needed), answered in the wait of the daemon's main thread (`frontend::service`).
pub fn serve(registry: Registry) -> anyhow::Result<Endpoint> {
    state::ensure_dir()?;
    prune_stale();
    let path = socket_path(rustix::process::getpid().as_raw_nonzero().get());
    Ok(Endpoint::bind(registry, &path)?)
}

/// Remove sockets of daemons that are gone (killed before they could).
fn prune_stale() {
    let Ok(dir) = std::fs::read_dir(state::state_dir()) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| {
            n.strip_prefix("ctl-")?
                .strip_suffix(".sock")?
                .parse::<i32>()
                .ok()
        });
        if pid.is_some_and(|p| !state::pid_is_userblk(p)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Remove a deleted device's socket if its daemon left it behind; missing is fine.
pub fn remove_socket(st: &DeviceState) {
    if !st.daemon_alive() {
        let _ = std::fs::remove_file(socket_path(st.pid));
    }
}

/// `userblk ctl -n ID [ACTION [ARGS...]]`.
pub fn run(args: &CtlArgs) -> anyhow::Result<()> {
    let id = args.device.id()?;
    let st = DeviceState::load(id)?
        .with_context(|| format!("no device with id {id} in {}", state::state_dir().display()))?;
    if !st.daemon_alive() {
        bail!("device {id}: its daemon (pid {}) is not running", st.pid);
    }
    let path = socket_path(st.pid);
    if !path.exists() {
        bail!(
            "device {id}: its daemon has no control socket at {} (started by an older userblk?)",
            path.display()
        );
    }
    let req = match &args.action {
        None => Request::List,
        Some(a) => Request::Run {
            action: a.clone(),
            args: Vec::new(),
        },
    };
    let reply = match control::request(&path, &req, TIMEOUT) {
        Ok(reply) => reply,
        // Not even acknowledged: the daemon is stuck or stopped.
        Err(e @ ControlError::NoAnswer { acked: false, .. }) => {
            bail!("device {id}: {e}; `userblk del -n {id} --force` stops it")
        }
        Err(e) => return Err(e).with_context(|| format!("device {id}: asking its daemon")),
    };
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&reply)?);
    }
    if !reply.ok {
        let msg = reply.error.unwrap_or_else(|| "failed".into());
        match (&args.action, reply.known) {
            (Some(a), Some(known)) if known.is_empty() => bail!(
                "device {id}: no control action '{a}': none of its filters offers actions (powercut and powerup come with --filter flakey)"
            ),
            (Some(a), Some(known)) => bail!(
                "device {id}: no control action '{a}' (it offers: {})",
                known.join(", ")
            ),
            _ => bail!("device {id}: {msg}"),
        }
    }
    if args.json {
        return Ok(());
    }
    if args.action.is_none() {
        if reply.actions.is_empty() {
            outln!("device {id} offers no control actions");
        }
        for a in reply.actions {
            outln!("{:<10} {:<8} {}", a.name, a.owner, a.help);
        }
    }
    for line in reply.output {
        outln!("{line}");
    }
    Ok(())
}
