//! From a target's command-line arguments to the library's [`TargetSpec`],
//! opened through its one factory ([`userblk::spec::open`]) with
//! the daemon's surroundings: the stats file and the `userblk ctl` socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use userblk::filters::{self, Spec};
use userblk::spec::{self, MemData, TargetSpec};
use userblk::state::DeviceState;
use userblk::targets::nbd::NbdOptions;
use userblk::targets::rbd::RbdOptions;
use userblk::targets::s3::{LeaseMode, RetryPolicy, S3Config, S3Options};
use userblk::targets::FileOptions;
use userblk::Target;

use crate::cli::{RbdArgs, S3Args, TargetArgs};

/// An opened target, and the tmpfs file its data lives in if it must outlive the daemon.
pub struct Opened {
    /// The target.
    pub target: Arc<dyn Target>,
    /// A `mem` device's data file, for recovery; removed when the device is deleted.
    pub shared: Option<PathBuf>,
    /// The control socket serving the filters' actions (`userblk ctl`),
    /// answered in the daemon's wait for its device; removed when dropped.
    pub control: Option<userblk::control::Endpoint>,
    /// What the control socket serves: the frontend adds its own actions here
    /// (ublk's `handover`, every frontend's resize).
    pub registry: userblk::control::Registry,
}

/// Where a recoverable mem device keeps its data (tmpfs, so still RAM).
pub fn new_shared_path() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    PathBuf::from(format!(
        "/dev/shm/userblk-mem-{}-{nanos}",
        std::process::id()
    ))
}

/// The data file a saved mem device used.
pub fn shared_path(state: &DeviceState) -> Option<PathBuf> {
    state
        .target
        .get("path")
        .and_then(|p| p.as_str())
        .map(PathBuf::from)
        .filter(|_| state.target.get("type").and_then(|t| t.as_str()) == Some("mem"))
}

/// The target the arguments describe; a mem target keeps its data as `mem` says.
pub fn spec(args: &TargetArgs, mem: MemData) -> anyhow::Result<TargetSpec> {
    Ok(match args {
        TargetArgs::Null(a) => TargetSpec::Null {
            size: a.size,
            zero_fill: !a.no_zero_fill,
        },
        TargetArgs::Early(a) => TargetSpec::Early { size: a.size },
        TargetArgs::Mem(a) => TargetSpec::Mem {
            size: a.size,
            data: mem,
        },
        TargetArgs::File(a) => TargetSpec::File(FileOptions {
            path: a.path.clone(),
            offset: a.offset,
            buffered: a.buffered,
            read_only: a.read_only,
        }),
        TargetArgs::Qcow2(a) => TargetSpec::Qcow2 {
            path: a.path.clone(),
            read_only: a.read_only,
            l2_cache: a.l2_cache,
        },
        TargetArgs::S3(a) => TargetSpec::S3(Box::new(s3_options(a)?)),
        TargetArgs::Nbd(a) => TargetSpec::Nbd(NbdOptions {
            reconnect_timeout: Duration::from_secs(a.reconnect_timeout),
            ..NbdOptions::new(a.uri.clone())
        }),
        TargetArgs::Rbd(a) => TargetSpec::Rbd(Box::new(rbd_options(a))),
    })
}

/// `add rbd`'s options.
fn rbd_options(a: &RbdArgs) -> RbdOptions {
    let mut o = RbdOptions::new(&a.pool, &a.image);
    let c = &mut o.connect;
    c.conf = a
        .conf
        .as_ref()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()));
    c.id.clone_from(&a.ceph_id);
    c.create_size = a.size;
    c.op_timeout = Duration::from_secs(a.op_timeout.max(1));
    c.connect_timeout = c.op_timeout;
    o.break_lock = a.break_lock;
    o
}

/// `add s3`'s options.
fn s3_options(a: &S3Args) -> anyhow::Result<S3Options> {
    if !(a.writeback_delay.is_finite() && a.writeback_delay >= 0.0) {
        bail!("--writeback-delay must be a number of seconds, 0 or more");
    }
    let mut store = S3Config::new(a.bucket.clone(), a.prefix.clone());
    store.endpoint.clone_from(&a.endpoint);
    store.region.clone_from(&a.region);
    store.retry = RetryPolicy {
        budget: Duration::from_secs(a.retry_budget),
        ..RetryPolicy::default()
    };
    let cache_dir = match &a.cache_dir {
        Some(d) => std::path::absolute(d).unwrap_or_else(|_| d.clone()),
        None => {
            // A snapshot's cache is its own: the head's holds newer bytes.
            let mut named = store.clone();
            if let Some(n) = &a.snapshot {
                named.prefix = format!("{}@{n}", store.prefix.trim_matches('/'));
            }
            crate::s3::default_cache_dir(&named)?
        }
    };
    let mut opts = S3Options::new(store, cache_dir);
    opts.snapshot.clone_from(&a.snapshot);
    opts.size = a.size;
    opts.chunk_size = a.chunk_size;
    opts.cache_size = a.cache_size;
    opts.upload_jobs = a.upload_jobs;
    opts.writeback_delay = Duration::from_secs_f64(a.writeback_delay);
    opts.break_lease = a.break_lease;
    opts.lease = match a.lease {
        crate::cli::LeaseArg::Auto => LeaseMode::Auto,
        crate::cli::LeaseArg::Host => LeaseMode::Host,
    };
    Ok(opts)
}

/// Open the target the arguments describe under the filter stack `specs`
/// (outermost first), and serve its control actions; a mem target keeps
/// its data as `mem` says.
pub fn open(args: &TargetArgs, specs: &[Spec], mem: MemData) -> anyhow::Result<Opened> {
    let shared = match &mem {
        MemData::NewFile(p) | MemData::Reopen(p) => Some(p.clone()),
        MemData::Private => None,
    };
    let spec = spec(args, mem)?;
    // Targets and filters offer their `userblk ctl` actions here.
    let control = userblk::control::Registry::new();
    let stats_file = if specs.is_empty() {
        None
    } else {
        if specs.iter().any(|s| s.name() == "stats") {
            crate::stats::prune_stale();
        }
        Some(crate::stats::own_snapshot_path()?)
    };
    let env = filters::Env {
        stats_file,
        control: control.clone(),
    };
    let opened = spec::open(spec, specs, &env)?;
    // A device without its control socket still works: `ctl` says why not.
    let registry = control.clone();
    let control = crate::ctl::serve(control)
        .inspect_err(|e| tracing::warn!("no control socket for `userblk ctl`: {e:#}"))
        .ok();
    Ok(Opened {
        target: opened.target,
        shared: shared.filter(|_| matches!(args, TargetArgs::Mem(_))),
        control,
        registry,
    })
}

/// Remove a mem device's data file; missing is fine.
pub fn remove_shared(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn target(args: &[&str]) -> TargetArgs {
        let argv = ["userblk", "add"].iter().chain(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Add(a) => a.target,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn arguments_become_specs_with_the_library_defaults() {
        let s = spec(&target(&["file", "-f", "rel.img"]), MemData::Private).unwrap();
        match s {
            TargetSpec::File(o) => {
                assert_eq!((o.offset, o.buffered, o.read_only), (0, false, false));
            }
            other => panic!("{other:?}"),
        }
        let s = spec(&target(&["qcow2", "-f", "a.qcow2"]), MemData::Private).unwrap();
        assert!(matches!(
            s,
            TargetSpec::Qcow2 { l2_cache, .. } if l2_cache == userblk::targets::qcow2::DEFAULT_L2_CACHE
        ));
        let s = spec(
            &target(&["nbd", "--uri", "nbd://127.0.0.1/x"]),
            MemData::Private,
        )
        .unwrap();
        assert!(matches!(s, TargetSpec::Nbd(o) if o.reconnect_timeout == Duration::from_secs(60)));
        let keep = MemData::NewFile("/dev/shm/x".into());
        let s = spec(&target(&["mem", "-s", "1M"]), keep.clone()).unwrap();
        assert!(matches!(s, TargetSpec::Mem { size: 1048576, data } if data == keep));
    }
}
