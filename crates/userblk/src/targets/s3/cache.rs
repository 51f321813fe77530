//! The s3 target's local cache directory: the chunks' bytes, which of them
//! are dirty, and whether the directory can be trusted after a restart.
//!
//! ```text
//! DIR/lock        flock'd by the daemon using the cache: one at a time
//! DIR/meta.json   volume id, endpoint/bucket/prefix, geometry, boot id, clean
//! DIR/data        a sparse file of the device's size: chunk i's bytes at i*cs
//! DIR/state       one byte per chunk: 0 absent, 1 clean, 2 dirty
//! ```
//!
//! A write marks its chunks dirty in `state` *before* its bytes go into
//! `data`, both with plain `pwrite`: what the daemon wrote is in the page
//! cache the moment it returns, so a daemon killed with `kill -9` leaves a
//! directory that says exactly which chunks still need uploading. Nothing
//! here is fsync'd while serving: durability against a power cut comes
//! from the bucket (a flush uploads). So the directory is trusted after a
//! restart only when the machine has not rebooted since it was last used
//! (`/proc/sys/kernel/random/boot_id`), or when it was closed cleanly (then
//! `data` and `state` were fsync'd first). After a reboot following an
//! unclean stop it is emptied: what was not flushed is lost, as the block
//! layer allows, and everything flushed is in the bucket.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FallocateFlags, FlockOperation};
use serde::{Deserialize, Serialize};

use super::layout::{Geometry, VolumeId};
use super::S3Error;

/// Byte in `state` of a chunk that is not in the cache.
pub const ABSENT: u8 = 0;
/// Byte in `state` of a chunk whose cached bytes match the bucket.
pub const CLEAN: u8 = 1;
/// Byte in `state` of a chunk whose cached bytes are newer than the bucket.
pub const DIRTY: u8 = 2;

/// What `meta.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    volume_id: VolumeId,
    /// `endpoint|bucket|prefix`: a directory is never reused for another volume.
    origin: String,
    device_size: u64,
    chunk_size: u64,
    boot_id: String,
    /// Closed cleanly: `data` and `state` were fsync'd, then this was set.
    clean: bool,
}

/// What [`CacheDir::open`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// A new or emptied directory.
    Empty,
    /// The previous contents were kept.
    Kept {
        /// Chunks that were dirty (they still need uploading).
        dirty: u64,
        /// Chunks that were clean.
        clean: u64,
    },
    /// The previous contents were dropped: the machine rebooted after an
    /// unclean stop, so they cannot be trusted.
    DroppedAfterReboot {
        /// Dirty chunks that were lost with them.
        dirty: u64,
    },
}

/// An open cache directory.
#[derive(Debug)]
pub struct CacheDir {
    dir: PathBuf,
    /// Holds the flock for as long as the directory is in use.
    _lock: File,
    data: File,
    state: File,
    /// What `meta.json` says while in use (a resize changes the size).
    meta: std::sync::Mutex<Meta>,
}

fn cache_err(what: &str, path: &Path, err: std::io::Error) -> S3Error {
    S3Error::Cache {
        what: what.to_owned(),
        path: path.to_owned(),
        err,
    }
}

/// This boot's id, or "" where the kernel does not say (then a cache is
/// trusted only after a clean close).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl CacheDir {
    /// Open (creating if needed) the cache directory `dir` for the volume
    /// `volume` at `origin`, and lock it. Returns the states of every chunk
    /// as the directory has them (all absent when it was new or emptied).
    pub fn open(
        dir: &Path,
        origin: &str,
        volume: VolumeId,
        geometry: Geometry,
    ) -> Result<(Self, Vec<u8>, Opened), S3Error> {
        std::fs::create_dir_all(dir).map_err(|e| cache_err("creating", dir, e))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| cache_err("opening", &lock_path, e))?;
        match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(S3Error::CacheInUse(dir.to_owned()));
            }
            Err(e) => return Err(cache_err("locking", &lock_path, e.into())),
        }
        let meta_path = dir.join("meta.json");
        let old: Option<Meta> = match std::fs::read(&meta_path) {
            Ok(b) => serde_json::from_slice(&b).ok(),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(cache_err("reading", &meta_path, e)),
        };
        let boot = boot_id();
        let n = usize::try_from(geometry.chunk_count())
            .map_err(|_| S3Error::Invalid("too many chunks for this machine".into()))?;
        let data_path = dir.join("data");
        let state_path = dir.join("state");
        let open_rw = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| cache_err("opening", p, e))
        };
        let data = open_rw(&data_path)?;
        let state = open_rw(&state_path)?;
        // The device size may differ (a resize the daemon did not live to
        // record here): the files are cut or extended to the manifest's.
        let same_volume = old.as_ref().is_some_and(|m| {
            m.volume_id == volume && m.origin == origin && m.chunk_size == geometry.chunk_size()
        });
        let trusted = old
            .as_ref()
            .is_some_and(|m| m.clean || (!boot.is_empty() && m.boot_id == boot));
        let mut states = vec![ABSENT; n];
        let opened = if same_volume {
            let got = state
                .read_at(&mut states, 0)
                .map_err(|e| cache_err("reading", &state_path, e))?;
            // A short state file: the chunks past its end were never cached.
            states[got..].fill(ABSENT);
            let dirty = states.iter().filter(|&&s| s == DIRTY).count() as u64;
            let clean = states.iter().filter(|&&s| s == CLEAN).count() as u64;
            if trusted {
                Opened::Kept { dirty, clean }
            } else {
                states.fill(ABSENT);
                Opened::DroppedAfterReboot { dirty }
            }
        } else {
            Opened::Empty
        };
        if !matches!(opened, Opened::Kept { .. }) {
            // Start over: no bytes, no states.
            for (f, p) in [(&data, &data_path), (&state, &state_path)] {
                f.set_len(0).map_err(|e| cache_err("emptying", p, e))?;
            }
        }
        data.set_len(geometry.size())
            .map_err(|e| cache_err("sizing", &data_path, e))?;
        state
            .set_len(n as u64)
            .map_err(|e| cache_err("sizing", &state_path, e))?;
        let meta = Meta {
            volume_id: volume,
            origin: origin.to_owned(),
            device_size: geometry.size(),
            chunk_size: geometry.chunk_size(),
            boot_id: boot,
            clean: false,
        };
        let cache = CacheDir {
            dir: dir.to_owned(),
            _lock: lock,
            data,
            state,
            meta: std::sync::Mutex::new(meta.clone()),
        };
        // From here on the directory is in use: not clean until closed.
        cache.write_meta(&meta)?;
        Ok((cache, states, opened))
    }

    fn write_meta(&self, meta: &Meta) -> Result<(), S3Error> {
        let path = self.dir.join("meta.json");
        let tmp = self.dir.join("meta.json.tmp");
        let bytes = serde_json::to_vec_pretty(meta)
            .map_err(|e| S3Error::Invalid(format!("encoding the cache's meta.json: {e}")))?;
        std::fs::write(&tmp, bytes).map_err(|e| cache_err("writing", &tmp, e))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| cache_err("syncing", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| cache_err("renaming", &tmp, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| cache_err("syncing", &self.dir, e))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Record chunk `index`'s state byte.
    pub fn set_state(&self, index: u64, state: u8) -> std::io::Result<()> {
        self.state.write_all_at(&[state], index)
    }

    /// Read cached bytes at device offset `offset`.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.data.read_exact_at(out, offset)
    }

    /// Write bytes at device offset `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.data.write_all_at(data, offset)
    }

    /// The data file, for ring operations at device offsets (zero copy).
    pub fn data_fd(&self) -> BorrowedFd<'_> {
        self.data.as_fd()
    }

    /// Make `[offset, offset + len)` read as zeroes, giving the space back.
    pub fn zero(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        rustix::fs::fallocate(
            &self.data,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .map_err(std::io::Error::from)
    }

    /// Bytes the data file takes on disk.
    pub fn allocated_bytes(&self) -> u64 {
        self.data
            .metadata()
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap_or(0)
    }

    /// Close cleanly: make `data` and `state` durable, then say so, so the
    /// directory is trusted even after a reboot.
    pub fn close_clean(&self) -> Result<(), S3Error> {
        self.data
            .sync_all()
            .map_err(|e| cache_err("syncing", &self.dir.join("data"), e))?;
        self.state
            .sync_all()
            .map_err(|e| cache_err("syncing", &self.dir.join("state"), e))?;
        let meta = Meta {
            clean: true,
            ..self.meta_now()
        };
        self.write_meta(&meta)
    }

    fn meta_now(&self) -> Meta {
        self.meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Follow a resize of the volume to `geometry`: `data` cut or extended
    /// (what is past the old end reads as zeroes), one state byte per
    /// chunk (new chunks absent), and the size on record.
    pub fn resize(&self, geometry: Geometry) -> Result<(), S3Error> {
        let n = geometry.chunk_count();
        self.data
            .set_len(geometry.size())
            .map_err(|e| cache_err("sizing", &self.dir.join("data"), e))?;
        self.state
            .set_len(n)
            .map_err(|e| cache_err("sizing", &self.dir.join("state"), e))?;
        let meta = {
            let mut m = self
                .meta
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            m.device_size = geometry.size();
            m.clone()
        };
        self.write_meta(&meta)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn geometry() -> Geometry {
        Geometry::new(4 << 20, 1 << 20).unwrap()
    }

    /// The cache in `dir` of the volume most tests use.
    fn open(dir: &Path) -> Result<(CacheDir, Vec<u8>, Opened), S3Error> {
        CacheDir::open(dir, "o", VolumeId([7; 16]), geometry())
    }

    /// Make the meta file at `meta` look written on another boot,
    /// `boot_id`; what it held before.
    fn as_if_from_boot(meta: &Path, boot_id: &str) -> Meta {
        let text = std::fs::read_to_string(meta).unwrap();
        let m: Meta = serde_json::from_str(&text).unwrap();
        let other = Meta {
            boot_id: boot_id.into(),
            ..m.clone()
        };
        std::fs::write(meta, serde_json::to_vec(&other).unwrap()).unwrap();
        m
    }

    #[test]
    fn new_directory_is_empty_and_locked() {
        let dir = tempfile::tempdir().unwrap();
        let (c, states, opened) = open(dir.path()).unwrap();
        assert_eq!(opened, Opened::Empty);
        assert_eq!(states, vec![ABSENT; 4]);
        let again = open(dir.path());
        assert!(matches!(again, Err(S3Error::CacheInUse(_))), "{again:?}");
        drop(c);
    }

    #[test]
    fn states_and_bytes_survive_an_unclean_stop_on_the_same_boot() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (c, _, _) = open(dir.path()).unwrap();
            c.set_state(1, DIRTY).unwrap();
            c.set_state(2, CLEAN).unwrap();
            c.write(1 << 20, b"hello").unwrap();
            // Dropped without close_clean: as after kill -9.
        }
        let (c, states, opened) = open(dir.path()).unwrap();
        assert_eq!(opened, Opened::Kept { dirty: 1, clean: 1 });
        assert_eq!(states, vec![ABSENT, DIRTY, CLEAN, ABSENT]);
        let mut b = [0u8; 5];
        c.read(1 << 20, &mut b).unwrap();
        assert_eq!(&b, b"hello");
    }

    #[test]
    fn a_reboot_after_an_unclean_stop_empties_it_a_clean_close_does_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (c, _, _) = open(dir.path()).unwrap();
            c.set_state(3, DIRTY).unwrap();
        }
        // Pretend the machine rebooted.
        let meta = dir.path().join("meta.json");
        as_if_from_boot(&meta, "another-boot");
        {
            let (c, states, opened) = open(dir.path()).unwrap();
            assert_eq!(opened, Opened::DroppedAfterReboot { dirty: 1 });
            assert_eq!(states, vec![ABSENT; 4]);
            c.set_state(0, DIRTY).unwrap();
            c.close_clean().unwrap();
        }
        assert!(as_if_from_boot(&meta, "yet-another-boot").clean);
        let (_, states, opened) = open(dir.path()).unwrap();
        assert_eq!(opened, Opened::Kept { dirty: 1, clean: 0 });
        assert_eq!(states[0], DIRTY);
    }

    #[test]
    fn another_device_size_keeps_the_chunks_that_remain() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (c, _, _) = open(dir.path()).unwrap();
            c.set_state(0, DIRTY).unwrap();
            c.set_state(3, CLEAN).unwrap();
            c.write(10, b"kept").unwrap();
            c.write((3 << 20) + 5, b"cut").unwrap();
        }
        // The volume shrank to 3 chunks and grew to 5 since.
        let small = Geometry::new(3 << 20, 1 << 20).unwrap();
        drop(CacheDir::open(dir.path(), "o", VolumeId([7; 16]), small).unwrap());
        let big = Geometry::new(5 << 20, 1 << 20).unwrap();
        let (c, states, opened) = CacheDir::open(dir.path(), "o", VolumeId([7; 16]), big).unwrap();
        assert_eq!(opened, Opened::Kept { dirty: 1, clean: 0 });
        assert_eq!(states, vec![DIRTY, ABSENT, ABSENT, ABSENT, ABSENT]);
        let mut b = [0u8; 4];
        c.read(10, &mut b).unwrap();
        assert_eq!(&b, b"kept");
        c.read((3 << 20) + 5, &mut b).unwrap();
        assert_eq!(b, [0; 4], "bytes cut by the shrink never come back");
        // And a live resize records its size for the next open.
        c.resize(small).unwrap();
        drop(c);
        let meta = std::fs::read_to_string(dir.path().join("meta.json")).unwrap();
        assert!(meta.contains(&format!("{}", 3 << 20)), "{meta}");
    }

    #[test]
    fn another_volume_or_geometry_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (c, _, _) = CacheDir::open(dir.path(), "o", VolumeId([1; 16]), geometry()).unwrap();
            c.set_state(0, DIRTY).unwrap();
        }
        let (_, states, opened) =
            CacheDir::open(dir.path(), "o", VolumeId([2; 16]), geometry()).unwrap();
        assert_eq!(opened, Opened::Empty);
        assert_eq!(states, vec![ABSENT; 4]);
    }
}
