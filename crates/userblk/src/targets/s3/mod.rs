//! `s3`: a volume kept as objects in an S3 bucket, served through a
//! crash-safe local cache ([`S3Target`]).
//!
//! # Layout
//!
//! A volume lives under a key prefix `{prefix}` of one bucket:
//!
//! ```text
//! {prefix}/manifest.json        format version, device size, chunk size,
//!                               checksum algorithm, creation time, volume id,
//!                               head epoch, a clone's parents
//! {prefix}/lease.json           who serves the volume (host, pid, volume id,
//!                               time); created with If-None-Match so only
//!                               one holder at a time ([`lease`])
//! {prefix}/.lease-probe-{id}   for a moment while a daemon opens the volume:
//!                               the probe of the server's conditional writes
//! {prefix}/chunks/{i:016x}      chunk i written in epoch 0: device bytes
//!                               [i*cs, (i+1)*cs), a 40-byte header (magic,
//!                               volume id, index, length, crc32c) then the payload
//! {prefix}/chunks/{i:016x}.{e:016x}   chunk i written in epoch e > 0
//! {prefix}/snapshots/{name}.json      a snapshot: the epoch it froze
//! ```
//!
//! The device is cut into fixed chunks (default 4 MiB, a power of two from
//! 64 KiB to 64 MiB). Chunk keys are fixed-width hex so a listing comes
//! back in offset order. An all-zero chunk is never stored: a missing
//! chunk reads as zeros, so a new volume costs one object; where an older
//! epoch or a parent has data, an empty chunk object (a tombstone) hides it.
//!
//! Writes go to the head epoch's keys; a snapshot moves the head on, so a
//! snapshot's objects never change. A clone is a manifest naming its
//! parents' (prefix, epoch): it reads their objects until it writes its
//! own ([`view`]).
//!
//! # Files
//!
//! - [`layout`]: keys, [`Geometry`], [`Manifest`], the chunk object format
//!   ([`encode_chunk`], [`decode_chunk`]), [`Lease`]. Pure, no I/O.
//! - [`store`]: [`S3Store`], a blocking S3 client (object_store on a private
//!   tokio runtime) with typed errors, timeouts and bounded retries.
//! - [`cache`]: the local cache directory and when it can be trusted.
//! - [`chunks`]: the in-memory table of chunks (cached, dirty, in use).
//! - [`lease`]: one daemon per volume: the lease object, the probe of the
//!   server's conditional writes, the host lock of `--lease host`.
//! - [`target`]: [`S3Target`], the request path, uploads, read-ahead,
//!   write-back, eviction, and snapshots of the served volume.
//! - [`view`]: which object (epoch, parent) a chunk reads. Pure.
//! - [`snapshots`]: snapshot records (list, delete) and clones.
//! - [`gc`]: deletes the chunk objects no head, snapshot or clone reads
//!   (`gc/plan.rs` decides, without I/O).

pub mod cache;
pub mod chunks;
pub mod gc;
pub mod layout;
pub mod lease;
pub mod snapshots;
pub mod store;
pub mod target;
pub mod view;

use std::path::PathBuf;

pub use layout::{
    chunk_key, decode_chunk, encode_chunk, is_all_zero, parse_chunk_key, ChunkProblem, Geometry,
    LayoutError, Lease, Manifest, VolumeId, DEFAULT_CHUNK_SIZE, LEASE_KEY, MANIFEST_KEY,
};
pub use lease::LeaseMode;
pub use store::{Credentials, RetryPolicy, S3Config, S3Store, StoreError};
pub use target::{S3Options, S3Target};

/// Why an s3 volume could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// The bucket could not be used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The manifest, a chunk or the lease is wrong, or the options do not
    /// match the volume.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// An object of the bucket (a manifest, a snapshot record) is not
    /// what its key says.
    #[error("s3 object {key:?}: {source}")]
    BadObject {
        /// Its key, from the bucket's root.
        key: String,
        /// What is wrong with it.
        source: LayoutError,
    },
    /// The cache directory failed.
    #[error("s3 cache: {what} {}: {err}", path.display())]
    Cache {
        /// What was being done.
        what: String,
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        err: std::io::Error,
    },
    /// Another daemon of this host uses the cache directory.
    #[error("s3 cache {} is in use by another daemon (one cache directory per volume and daemon)", .0.display())]
    CacheInUse(PathBuf),
    /// Another daemon holds the volume's lease.
    #[error(
        "the volume is in use: {host} pid {pid} holds its lease (since unix time {since_unix}); \
         if that daemon is gone for good, add --break-lease"
    )]
    LeaseHeld {
        /// The holder's host name.
        host: String,
        /// The holder's process id.
        pid: u32,
        /// When it took the lease.
        since_unix: u64,
    },
    /// `--lease auto` on a server whose conditional writes the lease
    /// cannot rely on.
    #[error(
        "{endpoint} {reason}: there the lease cannot keep a second writer out; \
         add --lease host to lock the volume on this host only"
    )]
    NotAtomic {
        /// The endpoint URL.
        endpoint: String,
        /// What the probe found.
        reason: String,
    },
    /// Another daemon of this host holds the volume's host lock.
    #[error("the volume is in use: another daemon of this host holds its lock {} (--lease host)", .0.display())]
    HostLockHeld(PathBuf),
    /// The host lock could not be taken.
    #[error("s3 host lock {}: {err}", path.display())]
    HostLock {
        /// The lock file.
        path: PathBuf,
        /// What the OS said.
        err: std::io::Error,
    },
    /// No manifest under the prefix and no size to create a volume with.
    #[error("no volume at bucket {bucket:?} prefix {prefix:?}: give --size to create one")]
    NoVolume {
        /// The bucket.
        bucket: String,
        /// The prefix.
        prefix: String,
    },
    /// A snapshot of that name exists already.
    #[error("the volume has a snapshot named {0:?} already")]
    SnapshotExists(String),
    /// No snapshot of that name (or it was deleted).
    #[error("no snapshot {name:?} of the volume at bucket {bucket:?} prefix {prefix:?}")]
    NoSnapshot {
        /// The snapshot asked for.
        name: String,
        /// The bucket.
        bucket: String,
        /// The volume's prefix.
        prefix: String,
    },
    /// A clone's parent volume is gone or is another volume now.
    #[error(
        "the volume's parent at prefix {prefix:?} {what}: its data is gone, so this clone \
         cannot be read (parents must stay until their clones are deleted)"
    )]
    ParentGone {
        /// The parent's prefix.
        prefix: String,
        /// What is wrong with it.
        what: String,
    },
    /// Bad options.
    #[error("{0}")]
    Invalid(String),
    /// A worker thread could not be started.
    #[error("starting an s3 worker thread: {0}")]
    Thread(#[source] std::io::Error),
}
