//! `--lease host`: one daemon per volume on this host, by an exclusive
//! flock on `/run/lock/userblk-s3-<hash>.lock`, the hash (FNV-1a, stable
//! across builds) of the volume's endpoint, bucket and prefix. The lock
//! lives as long as the daemon's target; the kernel drops it when the
//! process dies, however it dies, so `recover` and a new `add` need
//! nothing to undo.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

use crate::targets::s3::{S3Error, S3Store};

/// Where the lock files go: the FHS place for lock files, else the
/// temporary directory.
fn lock_dir() -> PathBuf {
    let run = Path::new("/run/lock");
    if run.is_dir() {
        run.to_owned()
    } else {
        std::env::temp_dir()
    }
}

/// FNV-1a, 64 bits: the same name for the same volume from every build.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The lock file of the volume `store` names.
#[must_use]
pub fn path_for(store: &S3Store) -> PathBuf {
    let origin = format!(
        "{}|{}|{}",
        store.endpoint().trim_end_matches('/'),
        store.bucket(),
        store.prefix()
    );
    lock_dir().join(format!("userblk-s3-{:016x}.lock", fnv1a(origin.as_bytes())))
}

/// The held lock; dropping it (or dying) releases it.
#[derive(Debug)]
pub struct HostLock {
    _file: File,
    path: PathBuf,
}

impl HostLock {
    /// Take the lock of the volume `store` names, without waiting.
    ///
    /// # Errors
    /// [`S3Error::HostLockHeld`] when another process holds it,
    /// [`S3Error::HostLock`] when the file cannot be opened or locked.
    pub fn take(store: &S3Store) -> Result<Self, S3Error> {
        Self::take_at(path_for(store))
    }

    fn take_at(path: PathBuf) -> Result<Self, S3Error> {
        let err = |e: std::io::Error| S3Error::HostLock {
            path: path.clone(),
            err: e,
        };
        // Read-only is enough to flock, so a file another user created
        // (mode 0644 in the world-writable /run/lock) still works.
        let file = OpenOptions::new()
            .read(true)
            .write(false)
            .create(false)
            .open(&path)
            .or_else(|_| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o644)
                    .open(&path)
            })
            .map_err(err)?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Self { _file: file, path }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(S3Error::HostLockHeld(path)),
            Err(e) => Err(err(e.into())),
        }
    }

    /// The lock file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.lock");
        let a = HostLock::take_at(p.clone()).unwrap();
        assert!(matches!(
            HostLock::take_at(p.clone()),
            Err(S3Error::HostLockHeld(_))
        ));
        drop(a);
        assert!(HostLock::take_at(p).is_ok());
    }

    #[test]
    fn the_hash_is_fixed() {
        // The published FNV-1a test vectors: a new build must name the
        // same file as the daemon it replaces.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
