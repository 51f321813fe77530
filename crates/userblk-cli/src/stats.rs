//! `stats`: what a device's `stats` filter counted, read from the snapshot
//! its daemon writes to the state directory every second and at exit.

use std::path::PathBuf;

use anyhow::{bail, Context};
use userblk::filters::stats::Snapshot;
use userblk::state::{self, DeviceState};

use crate::cli::StatsArgs;

/// Where this daemon's outermost `stats` filter writes (the state directory is made if needed).
pub fn own_snapshot_path() -> anyhow::Result<PathBuf> {
    state::ensure_dir()?;
    Ok(state::stats_path(
        rustix::process::getpid().as_raw_nonzero().get(),
    ))
}

/// Remove snapshots of daemons that are gone and whose device is gone too
/// (a device waiting for recovery keeps its last one).
pub fn prune_stale() {
    let Ok(dir) = std::fs::read_dir(state::state_dir()) else {
        return;
    };
    let known: Vec<i32> = DeviceState::ids()
        .into_iter()
        .filter_map(|id| DeviceState::load(id).ok().flatten())
        .map(|st| st.pid)
        .collect();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| {
            n.strip_prefix("stats-")?
                .strip_suffix(".json")?
                .parse::<i32>()
                .ok()
        }) else {
            continue;
        };
        if !state::pid_is_userblk(pid) && !known.contains(&pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Remove the snapshot of a deleted device's daemon; missing is fine.
pub fn remove_snapshot(st: &DeviceState) {
    if let Err(e) = std::fs::remove_file(st.stats_path()) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", st.stats_path().display());
        }
    }
}

/// `userblk stats -n ID [--json]`.
pub fn run(args: &StatsArgs) -> anyhow::Result<()> {
    let id = args.device.id()?;
    let st = DeviceState::load(id)?
        .with_context(|| format!("no device with id {id} in {}", state::state_dir().display()))?;
    let path = st.stats_path();
    let body = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let filters = userblk::filters::described_filters(&st.target);
            if filters
                .iter()
                .any(|f| f == "stats" || f.starts_with("stats:"))
            {
                bail!(
                    "device {id}: no stats snapshot at {} (a stats filter with its own file= writes there instead)",
                    path.display()
                );
            }
            bail!("device {id} has no stats filter: add the device with --filter stats");
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let snap: Snapshot = serde_json::from_slice(&body)
        .with_context(|| format!("{}: not a stats snapshot", path.display()))?;
    let live = st.daemon_alive();
    if args.json {
        let mut v = serde_json::to_value(&snap)?;
        if let Some(m) = v.as_object_mut() {
            m.insert("id".into(), id.into());
            m.insert("live".into(), live.into());
        }
        crate::out::outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        crate::out::bytes(text(id, &snap, live).as_bytes());
    }
    Ok(())
}

/// The table `stats` prints.
fn text(id: u32, snap: &Snapshot, live: bool) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut s = format!(
        "dev id {id}: daemon pid {} {}, counting for {:.1}s, snapshot {:.1}s old\n",
        snap.pid,
        if live {
            "running"
        } else {
            "not running (last snapshot)"
        },
        snap.uptime_s,
        (now - snap.time).max(0.0)
    );
    s += &format!(
        "{:<13} {:>10} {:>12} {:>7} {:>10} {:>9} {:>9} {:>9}\n",
        "op", "count", "bytes", "errors", "mean_us", "p50_us", "p99_us", "max_us"
    );
    // In op order, then anything else the snapshot has.
    let order = ["read", "write", "flush", "discard", "write_zeroes"];
    let mut ops: Vec<_> = snap.ops.iter().collect();
    ops.sort_by_key(|(op, _)| order.iter().position(|o| o == op).unwrap_or(order.len()));
    for (op, o) in ops {
        let l = &o.latency_us;
        s += &format!(
            "{op:<13} {:>10} {:>12} {:>7} {:>10.1} {:>9} {:>9} {:>9}\n",
            o.count,
            userblk::size::format(o.bytes),
            o.errors,
            l.mean,
            l.p50,
            l.p99,
            l.max
        );
    }
    s
}
