//! One typed description of a target ([`TargetSpec`]) and one function that
//! opens it under its filter stack ([`open`]), so every program that opens
//! targets (the CLI's `add` and `copy`) gets the same defaults.
//!
//! It sits above `targets/` and `filters/` (neither imports it) and only
//! wraps what they offer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::filters::{self, Env, FilterError, Spec};
use crate::targets::early::EarlyTarget;
use crate::targets::nbd::{NbdOptions, NbdTarget};
use crate::targets::qcow2::{self, Qcow2Target};
use crate::targets::rbd::{RbdOptions, RbdTarget};
use crate::targets::s3::{S3Error, S3Options, S3Target};
use crate::targets::{FileOptions, FileTarget, MemTarget, NullTarget};
use crate::Target;

/// Metadata blocks of refcounts the qcow2 target caches.
const QCOW2_REFBLOCK_CACHE: usize = 64;

/// Where a `mem` target keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemData {
    /// In this process's memory: gone with it.
    Private,
    /// In a new file at this path (tmpfs, so still RAM), which outlives the
    /// process: for a device that a new daemon may take over.
    NewFile(PathBuf),
    /// In the file an earlier process made with [`MemData::NewFile`].
    Reopen(PathBuf),
}

/// A target, described: what to open, with every option it takes.
#[derive(Debug, Clone)]
pub enum TargetSpec {
    /// [`NullTarget`] of this size.
    Null {
        /// Device size in bytes.
        size: u64,
        /// Reads return zeroes (false: null_blk's way, reads leave the data
        /// as they find it; for benchmarks).
        zero_fill: bool,
    },
    /// [`EarlyTarget`]: answers writes before storing them (for testing frontends).
    Early {
        /// Device size in bytes.
        size: u64,
    },
    /// [`MemTarget`].
    Mem {
        /// Device size in bytes.
        size: u64,
        /// Where the data lives.
        data: MemData,
    },
    /// [`FileTarget`].
    File(FileOptions),
    /// [`Qcow2Target`].
    Qcow2 {
        /// The image.
        path: PathBuf,
        /// Open (and serve) read-only.
        read_only: bool,
        /// L2 tables kept in memory (at least 2 are).
        l2_cache: usize,
    },
    /// [`NbdTarget`].
    Nbd(NbdOptions),
    /// [`S3Target`].
    S3(Box<S3Options>),
    /// [`RbdTarget`].
    Rbd(Box<RbdOptions>),
}

impl TargetSpec {
    /// A file or block device at `path`, read-write, through O_DIRECT.
    pub fn file(path: &Path) -> Self {
        TargetSpec::File(FileOptions {
            path: absolute(path),
            ..FileOptions::default()
        })
    }

    /// A qcow2 image at `path`, read-write, with the default caches.
    pub fn qcow2(path: &Path) -> Self {
        TargetSpec::Qcow2 {
            path: absolute(path),
            read_only: false,
            l2_cache: qcow2::DEFAULT_L2_CACHE,
        }
    }

    /// The same file or qcow2 target, read-only or not (other targets have
    /// no such option and stay as they are).
    #[must_use]
    pub fn read_only(mut self, ro: bool) -> Self {
        match &mut self {
            TargetSpec::File(o) => o.read_only = ro,
            TargetSpec::Qcow2 { read_only, .. } => *read_only = ro,
            _ => {}
        }
        self
    }

    /// The target's type, as its `describe()` names it.
    pub fn kind(&self) -> &'static str {
        match self {
            TargetSpec::Null { .. } => "null",
            TargetSpec::Early { .. } => "early",
            TargetSpec::Mem { .. } => "mem",
            TargetSpec::File(_) => "file",
            TargetSpec::Qcow2 { .. } => "qcow2",
            TargetSpec::Nbd(_) => "nbd",
            TargetSpec::S3(_) => "s3",
            TargetSpec::Rbd(_) => "rbd",
        }
    }
}

/// A path made absolute, so the target does not depend on the directory it
/// was opened from (a daemon leaves it for `/`).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Why [`open`] failed. The inner error is part of the message (not a
/// separate `source`), so a chain printer says it once.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The target itself could not be opened.
    #[error("{what}: {err}")]
    Target {
        /// What was being opened (`file target`, ...).
        what: String,
        /// What went wrong.
        err: crate::Error,
    },
    /// An s3 volume could not be opened.
    #[error("{what}: {err}")]
    S3 {
        /// Which volume.
        what: String,
        /// What went wrong (boxed: it is large).
        err: Box<S3Error>,
    },
    /// An rbd image could not be opened.
    #[error("rbd: {err}")]
    Rbd {
        /// What went wrong.
        err: userblk_rbd::RbdError,
    },
    /// A filter could not be built.
    #[error(transparent)]
    Filter(#[from] FilterError),
}

/// An opened target.
pub struct Opened {
    /// The target under its filters.
    pub target: Arc<dyn Target>,
    /// Opening made a new volume, which reads as zeroes everywhere (an s3
    /// volume created at the size asked for).
    pub created: bool,
}

/// Open `spec` and wrap it in `filters` (outermost first) through
/// [`filters::build`], with `env`'s defaults; targets with control
/// actions (s3) offer them in `env.control`. A `mem` data file made here
/// is removed again if a filter then fails.
pub fn open(spec: TargetSpec, filters: &[Spec], env: &Env) -> Result<Opened, OpenError> {
    let made = match &spec {
        TargetSpec::Mem {
            data: MemData::NewFile(p),
            ..
        } => Some(p.clone()),
        _ => None,
    };
    let (target, created) = open_bare(spec, env)?;
    let target = if filters.is_empty() {
        target
    } else {
        filters::build(target, filters, env).inspect_err(|_| {
            if let Some(p) = &made {
                let _ = std::fs::remove_file(p);
            }
        })?
    };
    Ok(Opened { target, created })
}

/// The target alone, and whether it was created just now.
fn open_bare(spec: TargetSpec, env: &Env) -> Result<(Arc<dyn Target>, bool), OpenError> {
    let what = format!("{} target", spec.kind());
    let wrap = |err| OpenError::Target {
        what: what.clone(),
        err,
    };
    let target: Arc<dyn Target> =
        match spec {
            TargetSpec::Null {
                size,
                zero_fill: true,
            } => Arc::new(NullTarget::new(size)),
            TargetSpec::Null {
                size,
                zero_fill: false,
            } => Arc::new(NullTarget::without_zero_fill(size)),
            TargetSpec::Early { size } => Arc::new(EarlyTarget::new(size).map_err(wrap)?),
            TargetSpec::Mem { size, data } => match data {
                MemData::Private => Arc::new(MemTarget::new(size).map_err(wrap)?),
                MemData::NewFile(p) => Arc::new(MemTarget::create_shared(size, &p).map_err(wrap)?),
                MemData::Reopen(p) => Arc::new(MemTarget::open_shared(&p, size).map_err(
                    |err| OpenError::Target {
                        what: "reopening the mem device's data".into(),
                        err,
                    },
                )?),
            },
            TargetSpec::File(mut opts) => {
                opts.path = absolute(&opts.path);
                Arc::new(FileTarget::open(opts).map_err(wrap)?)
            }
            TargetSpec::Qcow2 {
                path,
                read_only,
                l2_cache,
            } => {
                let opts = qcow2::OpenOptions {
                    read_only,
                    caches: qcow2::CacheSizes {
                        l2: l2_cache.max(2),
                        refblocks: QCOW2_REFBLOCK_CACHE,
                    },
                };
                Arc::new(Qcow2Target::open_with(&absolute(&path), &opts).map_err(wrap)?)
            }
            TargetSpec::Nbd(opts) => Arc::new(NbdTarget::connect(opts).map_err(wrap)?),
            TargetSpec::S3(opts) => {
                let what = format!("s3 target (bucket {:?})", opts.store.bucket);
                let t = S3Target::open(*opts).map_err(|err| OpenError::S3 {
                    what,
                    err: Box::new(err),
                })?;
                t.register_actions(&env.control);
                let created = t.created();
                return Ok((Arc::new(t), created));
            }
            TargetSpec::Rbd(opts) => {
                let t = RbdTarget::open(*opts).map_err(|err| OpenError::Rbd { err })?;
                let created = t.created();
                return Ok((Arc::new(t), created));
            }
        };
    Ok((target, false))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn filters_go_on_top_and_a_new_mem_file_goes_with_a_failure() {
        let specs: Vec<Spec> = ["readonly"].iter().map(|s| s.parse().unwrap()).collect();
        let o = open(
            TargetSpec::Null {
                size: 1 << 20,
                zero_fill: true,
            },
            &specs,
            &Env::default(),
        )
        .unwrap();
        assert!(o.target.caps().read_only);
        assert!(!o.created);
        assert_eq!(o.target.describe()["type"], "null");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let spec = TargetSpec::Mem {
            size: 1 << 20,
            data: MemData::NewFile(path.clone()),
        };
        // Larger than the device: the stack refuses it.
        let bad: Vec<Spec> = ["offset:offset=2M"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(open(spec, &bad, &Env::default()).is_err());
        assert!(!path.exists(), "the new data file is removed again");
    }

    #[test]
    fn errors_say_which_target() {
        let e = open(
            TargetSpec::file(Path::new("/nonexistent/x")),
            &[],
            &Env::default(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().starts_with("file target: "), "{e}");
        assert!(
            matches!(TargetSpec::qcow2(Path::new("a")), TargetSpec::Qcow2 { path, .. } if path.is_absolute())
        );
    }
}
