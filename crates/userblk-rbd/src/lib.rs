//! Ceph RBD images for userblk, through librbd's C API.
//!
//! librados and librbd are loaded when first needed ([`api`]), not linked,
//! so a `userblk` binary starts on hosts without Ceph and only `add rbd`
//! there fails, saying which package to install. Every `unsafe` for Ceph is
//! in this crate: the declarations ([`ffi`], checked against the header by
//! `tests/header.rs`), the image handle ([`image`]) and its asynchronous
//! operations ([`aio`]).

pub mod aio;
pub mod ffi;
pub mod image;

use std::sync::OnceLock;

pub use image::{ConnectOptions, Image};

/// The library an [`Image`] is loaded from.
pub const LIBRBD: &str = "librbd.so.1";
/// librbd's own dependency, loaded first for its symbols.
pub const LIBRADOS: &str = "librados.so.2";

/// What went wrong, with the errno librbd or librados returned.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    /// The libraries are not installed (or lack a symbol we need).
    #[error("{lib} not found: install Debian's {package} ({detail})")]
    NotInstalled {
        /// The library file.
        lib: &'static str,
        /// The Debian package that ships it.
        package: &'static str,
        /// What the loader said.
        detail: String,
    },
    /// A call failed.
    #[error("{what}: {}", errno_text(*errno))]
    Call {
        /// What was being done.
        what: String,
        /// The positive errno.
        errno: i32,
    },
    /// The pool or the image does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An argument cannot be passed to C (an inner NUL).
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    /// The image is locked by another client.
    #[error("image {image} is locked by {owners}")]
    Locked {
        /// `POOL/IMAGE`.
        image: String,
        /// The lock's owners, as librbd names them.
        owners: String,
    },
    /// The image cannot give one writer.
    #[error("image {0} lacks the exclusive-lock feature, which userblk needs for one writer (enable it: rbd feature enable {0} exclusive-lock)")]
    NoExclusiveLock(String),
}

impl RbdError {
    /// The positive errno of a failed call, if it was one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RbdError::Call { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

/// A negative return code as an error of `what`.
pub(crate) fn check(ret: i32, what: impl FnOnce() -> String) -> Result<i32, RbdError> {
    if ret < 0 {
        Err(RbdError::Call {
            what: what(),
            errno: -ret,
        })
    } else {
        Ok(ret)
    }
}

/// The loaded libraries: kept for the life of the process (Ceph's libraries
/// do not support being unloaded).
struct Loaded {
    api: ffi::Api,
    write_zeroes: Option<ffi::AioWriteZeroes>,
    _rados: libloading::Library,
    _rbd: libloading::Library,
}

static LOADED: OnceLock<Result<Loaded, (&'static str, &'static str, String)>> = OnceLock::new();

fn load() -> Result<Loaded, (&'static str, &'static str, String)> {
    // SAFETY: loading runs the libraries' initialisers, which are Ceph's
    // own; nothing else of ours runs meanwhile.
    let rados = unsafe { libloading::Library::new(LIBRADOS) }
        .map_err(|e| (LIBRADOS, "librados2", e.to_string()))?;
    // SAFETY: as above.
    let rbd = unsafe { libloading::Library::new(LIBRBD) }
        .map_err(|e| (LIBRBD, "librbd1", e.to_string()))?;
    // SAFETY: these are librados and librbd, whose symbols have the types
    // declared in `ffi` (checked against the header by tests/header.rs).
    let api = unsafe { ffi::Api::resolve(&rados, &rbd) }
        .map_err(|e| (LIBRBD, "librbd1", e.to_string()))?;
    // SAFETY: as above; absent before Ceph 15, which is allowed.
    let write_zeroes = unsafe { rbd.get::<ffi::AioWriteZeroes>(b"rbd_aio_write_zeroes\0") }
        .ok()
        .map(|s| *s);
    Ok(Loaded {
        api,
        write_zeroes,
        _rados: rados,
        _rbd: rbd,
    })
}

fn loaded() -> Result<&'static Loaded, RbdError> {
    LOADED
        .get_or_init(load)
        .as_ref()
        .map_err(|(lib, package, detail)| RbdError::NotInstalled {
            lib,
            package,
            detail: detail.clone(),
        })
}

/// The loaded API (loading it on first use).
pub fn api() -> Result<&'static ffi::Api, RbdError> {
    loaded().map(|l| &l.api)
}

/// `rbd_aio_write_zeroes`, where this librbd has it.
pub(crate) fn write_zeroes_fn() -> Option<ffi::AioWriteZeroes> {
    loaded().ok().and_then(|l| l.write_zeroes)
}
