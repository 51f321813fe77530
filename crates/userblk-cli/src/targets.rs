//! Building a target from its command-line arguments, with the filter
//! stack `--filter` asked for on top.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use userblk::filters::{self, Spec};
use userblk::targets::nbd::{NbdOptions, NbdTarget};
use userblk::targets::{FileOptions, FileTarget, MemTarget, NullTarget};
use userblk::ublk::DeviceState;
use userblk::Target;

use crate::cli::TargetArgs;

/// An opened target, and the tmpfs file its data lives in if it must outlive the daemon.
pub struct Opened {
    /// The target.
    pub target: Arc<dyn Target>,
    /// A `mem` device's data file, for recovery; removed when the device is deleted.
    pub shared: Option<PathBuf>,
    /// The control socket serving the filters' actions (`userblk ctl`):
    /// kept for as long as the daemon holds this, and removed when dropped.
    #[allow(dead_code)]
    pub control: Option<userblk::control::Server>,
}

/// Where a recoverable mem device keeps its data (tmpfs, so still RAM).
fn new_shared_path() -> PathBuf {
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

/// Open the target the arguments describe, under the filter stack `specs`
/// (outermost first). With `recoverable`, a mem target keeps its data in a
/// tmpfs file; with `previous` (recovery), the data of the dead daemon is
/// reopened.
pub fn open(
    args: &TargetArgs,
    specs: &[Spec],
    recoverable: bool,
    previous: Option<&DeviceState>,
) -> anyhow::Result<Opened> {
    // Targets and filters offer their `userblk ctl` actions here.
    let control = userblk::control::Registry::new();
    let (target, shared): (Arc<dyn Target>, Option<PathBuf>) = match args {
        TargetArgs::Null(a) => (Arc::new(NullTarget::new(a.size)), None),
        TargetArgs::Mem(a) => match (previous.and_then(shared_path), recoverable) {
            (Some(path), _) => {
                let t = MemTarget::open_shared(&path, a.size)
                    .context("reopening the mem device's data")?;
                (Arc::new(t), Some(path))
            }
            (None, true) => {
                let path = new_shared_path();
                (
                    Arc::new(MemTarget::create_shared(a.size, &path).context("mem target")?),
                    Some(path),
                )
            }
            (None, false) => (
                Arc::new(MemTarget::new(a.size).context("mem target")?),
                None,
            ),
        },
        TargetArgs::File(a) => (
            Arc::new(
                FileTarget::open(FileOptions {
                    path: std::path::absolute(&a.path).unwrap_or_else(|_| a.path.clone()),
                    offset: a.offset,
                    buffered: a.buffered,
                    read_only: a.read_only,
                })
                .context("file target")?,
            ),
            None,
        ),
        TargetArgs::Qcow2(a) => {
            let path = std::path::absolute(&a.path).unwrap_or_else(|_| a.path.clone());
            let opts = userblk::targets::qcow2::OpenOptions {
                read_only: a.read_only,
                caches: userblk::targets::qcow2::CacheSizes {
                    l2: a.l2_cache.max(2),
                    refblocks: 64,
                },
            };
            (
                Arc::new(
                    userblk::targets::qcow2::Qcow2Target::open_with(&path, &opts)
                        .context("qcow2 target")?,
                ),
                None,
            )
        }
        TargetArgs::S3(a) => {
            let t = crate::s3::open(a)?;
            t.register_actions(&control);
            (Arc::new(t), None)
        }
        TargetArgs::Nbd(a) => {
            let mut opts = NbdOptions::new(a.uri.clone());
            opts.reconnect_timeout = std::time::Duration::from_secs(a.reconnect_timeout);
            (
                Arc::new(NbdTarget::connect(opts).context("nbd target")?),
                None,
            )
        }
    };
    let built = (|| -> anyhow::Result<_> {
        let target = if specs.is_empty() {
            target
        } else {
            if specs.iter().any(|s| s.name() == "stats") {
                crate::stats::prune_stale();
            }
            let env = filters::Env {
                stats_file: Some(crate::stats::own_snapshot_path()?),
                control: control.clone(),
            };
            filters::build(target, specs, &env)?
        };
        // A device without its control socket still works: `ctl` says why not.
        let server = crate::ctl::serve(control)
            .inspect_err(|e| tracing::warn!("no control socket for `userblk ctl`: {e:#}"))
            .ok();
        Ok((target, server))
    })();
    match built {
        Ok((target, control)) => Ok(Opened {
            target,
            shared,
            control,
        }),
        Err(e) => {
            // A mem device's data file made just now goes with the failure.
            if let (Some(path), None) = (&shared, previous) {
                remove_shared(path);
            }
            Err(e)
        }
    }
}

/// Remove a mem device's data file; missing is fine.
pub fn remove_shared(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", path.display());
        }
    }
}
