//! `--lease host`: one daemon per volume on this host, by an exclusive
//! flock on `/run/lock/userblk-s3-<hash>.lock`, the hash (FNV-1a, stable
//! across builds) of the volume's endpoint, bucket and prefix. The lock
//! lives as long as the daemon's target, and the file goes with it; the
//! kernel drops the lock when the process dies, however it dies, so
//! `recover` and a new `add` need nothing to undo (they find the file and
//! lock it again).

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

/// Attempts at taking the lock when its file keeps being replaced.
const TRIES: usize = 10;

/// The held lock; dropping it removes the file and releases the lock
/// (dying releases it too, and leaves the file for the next daemon).
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
        // A holder removes the file as it lets go: a lock taken on a file
        // that was removed meanwhile is on no path, so look again.
        for _ in 0..TRIES {
            let file = lock_file(&path)?;
            let held = rustix::fs::fstat(&file).map_err(|e| err(e.into()))?;
            if let Ok(now) = rustix::fs::stat(&path) {
                if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino) {
                    return Ok(Self { _file: file, path });
                }
            }
        }
        Err(err(std::io::Error::other(
            "the lock file kept being replaced",
        )))
    }

    /// The lock file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for HostLock {
    fn drop(&mut self) {
        // Removed while still locked: whoever opened it meanwhile finds it
        // gone once it has the lock, and makes a new one.
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!("s3: removing the host lock {}: {e}", self.path.display());
        }
    }
}

/// `path` opened (created if missing) and locked.
fn lock_file(path: &Path) -> Result<File, S3Error> {
    let err = |e: std::io::Error| S3Error::HostLock {
        path: path.to_owned(),
        err: e,
    };
    // Read-only is enough to flock, so a file another user created
    // (mode 0644 in the world-writable /run/lock) still works.
    let file = OpenOptions::new()
        .read(true)
        .open(path)
        .or_else(|_| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(path)
        })
        .map_err(err)?;
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(S3Error::HostLockHeld(path.to_owned())),
        Err(e) => Err(err(e.into())),
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
        assert!(!p.exists(), "the lock file stays after the lock is let go");
        // A daemon that died left its file, unlocked: the next one takes it.
        std::fs::write(&p, b"").unwrap();
        let b = HostLock::take_at(p.clone()).unwrap();
        assert_eq!(b.path(), p);
    }

    #[test]
    fn the_hash_is_fixed() {
        // The published FNV-1a test vectors: a new build must name the
        // same file as the daemon it replaces.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
