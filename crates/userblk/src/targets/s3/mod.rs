//! Groundwork of the s3 target: a volume kept as objects in an S3 bucket.
//!
//! # Layout
//!
//! A volume lives under a key prefix `{prefix}` of one bucket:
//!
//! ```text
//! {prefix}/manifest.json        format version, device size, chunk size,
//!                               checksum algorithm, creation time, volume id
//! {prefix}/lease.json           who serves the volume (host, pid, volume id,
//!                               time); created with If-None-Match so only
//!                               one holder at a time
//! {prefix}/chunks/{i:016x}      chunk i: device bytes [i*cs, (i+1)*cs),
//!                               a 40-byte header (magic, volume id, index,
//!                               length, crc32c) then the payload
//! ```
//!
//! The device is cut into fixed chunks (default 4 MiB, a power of two from
//! 64 KiB to 64 MiB). Chunk keys are fixed-width hex so a listing comes
//! back in offset order. An all-zero chunk is never stored: a missing
//! chunk reads as zeros, so a new volume costs one object.
//!
//! # Files
//!
//! - [`layout`]: keys, [`Geometry`], [`Manifest`], the chunk object format
//!   ([`encode_chunk`], [`decode_chunk`]), [`Lease`]. Pure, no I/O.
//! - [`store`]: [`S3Store`], a blocking S3 client (object_store on a private
//!   tokio runtime) with typed errors, timeouts and bounded retries.

pub mod layout;
pub mod store;

pub use layout::{
    chunk_key, decode_chunk, encode_chunk, is_all_zero, parse_chunk_key, ChunkProblem, Geometry,
    LayoutError, Lease, Manifest, VolumeId, DEFAULT_CHUNK_SIZE, LEASE_KEY, MANIFEST_KEY,
};
pub use store::{Credentials, RetryPolicy, S3Config, S3Store, StoreError};
