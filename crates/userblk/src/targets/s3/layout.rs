//! The on-bucket layout of an s3 volume: object keys, the manifest, the
//! chunk object format and the lease. Pure code, no I/O.
//!
//! Keys here are relative to the volume's prefix; [`super::S3Store`]
//! prepends it, so chunk `i` lands at `{prefix}/chunks/{i:016x}`.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

mod snapshot;

pub use snapshot::{
    check_snapshot_name, parse_snapshot_key, snapshot_key, SnapshotRecord, MAX_SNAPSHOT_NAME,
};

/// Key of the manifest object, relative to the volume prefix.
pub const MANIFEST_KEY: &str = "manifest.json";
/// Key of the lease object, relative to the volume prefix.
pub const LEASE_KEY: &str = "lease.json";
/// Directory (key prefix) that holds the chunk objects.
pub const CHUNKS_DIR: &str = "chunks";

/// The manifest format this code writes. Version 1 (no epochs, no
/// parents) is read too, and stays version 1 until a snapshot bumps its
/// epoch; a newer version is refused.
pub const FORMAT_VERSION: u32 = 2;
/// The first format: chunk keys without an epoch, no snapshots or parents.
pub const FORMAT_V1: u32 = 1;
/// Directory (key prefix) of the snapshot records.
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// Most ancestors a clone may have (clones of clones): each costs a listing
/// at open and a lookup per missed chunk.
pub const MAX_PARENTS: usize = 32;
/// Chunk size used when the user names none.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// Smallest chunk size: below this, per-request cost dominates.
pub const MIN_CHUNK_SIZE: u64 = 64 << 10;
/// Largest chunk size: a chunk is read and written whole, in memory.
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// Device sizes are whole sectors.
pub const SECTOR_SIZE: u64 = 512;

/// Checksum algorithm named in the manifest (informational; the chunk
/// header's magic is what decoding relies on).
pub const CHECKSUM_ALGORITHM: &str = "crc32c";

/// Problems with the layout: bad geometry, a bad manifest or lease, or a
/// chunk object that fails verification.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// Chunk size not a power of two in `MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE`.
    #[error("chunk size {0} is invalid: must be a power of two from 64 KiB to 64 MiB")]
    BadChunkSize(u64),
    /// Device size zero or not a multiple of the sector size.
    #[error("device size {0} is invalid: must be a positive multiple of 512")]
    BadDeviceSize(u64),
    /// Device too large to index chunks.
    #[error("device size {size} with chunk size {chunk_size} overflows")]
    TooLarge {
        /// Requested device size.
        size: u64,
        /// Requested chunk size.
        chunk_size: u64,
    },
    /// The manifest is not valid JSON of the expected shape.
    #[error("manifest is malformed: {0}")]
    ManifestMalformed(String),
    /// The manifest was written by a newer (or unknown) format.
    #[error("manifest format version {found} is not supported (this build reads versions {FORMAT_V1} to {FORMAT_VERSION}): use a newer userblk")]
    UnknownVersion {
        /// Version in the manifest.
        found: u64,
    },
    /// The manifest's size differs from what the user asked for.
    #[error("volume size mismatch: bucket has {found} bytes, {requested} requested")]
    SizeMismatch {
        /// Size stored in the manifest.
        found: u64,
        /// Size the user asked for.
        requested: u64,
    },
    /// The manifest's chunk size differs from what the user asked for.
    #[error("chunk size mismatch: bucket has {found}, {requested} requested")]
    ChunkSizeMismatch {
        /// Chunk size stored in the manifest.
        found: u64,
        /// Chunk size the user asked for.
        requested: u64,
    },
    /// A snapshot record is not valid.
    #[error("snapshot record is malformed: {0}")]
    SnapshotMalformed(String),
    /// Not a snapshot name.
    #[error(
        "snapshot name {0:?} is invalid: 1 to 128 of A-Z a-z 0-9 . _ -, not starting with . or -"
    )]
    BadSnapshotName(String),
    /// The lease object is not valid.
    #[error("lease is malformed: {0}")]
    LeaseMalformed(String),
    /// A chunk object failed verification.
    #[error("chunk {index}: {problem}")]
    Chunk {
        /// Chunk index that was being decoded.
        index: u64,
        /// What was wrong with it.
        problem: ChunkProblem,
    },
}

/// Why a chunk object was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkProblem {
    /// Shorter than the header, or payload shorter/longer than the header says.
    Truncated {
        /// Bytes the object should have.
        expected: usize,
        /// Bytes it has.
        found: usize,
    },
    /// Not a chunk object of this format.
    BadMagic,
    /// The checksum does not match: the object was damaged.
    ChecksumMismatch {
        /// Checksum stored in the header.
        stored: u32,
        /// Checksum computed over the object.
        computed: u32,
    },
    /// A valid chunk, but of another volume (stale data under a reused prefix).
    WrongVolume,
    /// A valid chunk, but stored under another index's key.
    WrongIndex {
        /// Index recorded in the header.
        found: u64,
    },
    /// Payload length differs from the chunk's length in this geometry.
    WrongLength {
        /// Length the geometry gives.
        expected: u64,
        /// Length recorded in the header.
        found: u64,
    },
}

impl fmt::Display for ChunkProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { expected, found } => {
                write!(f, "truncated object: {found} bytes, expected {expected}")
            }
            Self::BadMagic => f.write_str("not a userblk chunk object (bad magic)"),
            Self::ChecksumMismatch { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:08x}, computed {computed:08x}): object is corrupt"
            ),
            Self::WrongVolume => f.write_str("belongs to another volume (stale object)"),
            Self::WrongIndex { found } => write!(f, "object holds chunk {found} (misplaced)"),
            Self::WrongLength { expected, found } => {
                write!(f, "payload length {found}, expected {expected}")
            }
        }
    }
}

/// How a device maps onto chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    size: u64,
    chunk_size: u64,
}

/// Whether `chunk_size` can be a volume's: checkable before anything
/// connects (`--chunk-size` is refused as it is parsed).
///
/// # Errors
/// [`LayoutError::BadChunkSize`].
pub fn check_chunk_size(chunk_size: u64) -> Result<(), LayoutError> {
    if chunk_size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        Ok(())
    } else {
        Err(LayoutError::BadChunkSize(chunk_size))
    }
}

impl Geometry {
    /// Validates and builds a geometry.
    ///
    /// # Errors
    /// [`LayoutError::BadChunkSize`] / [`LayoutError::BadDeviceSize`].
    pub fn new(size: u64, chunk_size: u64) -> Result<Self, LayoutError> {
        check_chunk_size(chunk_size)?;
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(LayoutError::BadDeviceSize(size));
        }
        // Chunk count must fit the 16-hex-digit key and usize for callers' maps.
        if size.checked_add(chunk_size).is_none() {
            return Err(LayoutError::TooLarge { size, chunk_size });
        }
        Ok(Self { size, chunk_size })
    }

    /// Device size in bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size in bytes.
    #[must_use]
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Number of chunks; the last may be short.
    #[must_use]
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    /// The chunk holding device byte `offset`, and the offset inside it.
    #[must_use]
    pub fn locate(&self, offset: u64) -> (u64, u64) {
        (offset / self.chunk_size, offset % self.chunk_size)
    }

    /// Length of chunk `index` (the last one is cut at the device end);
    /// 0 past the end.
    #[must_use]
    pub fn chunk_len(&self, index: u64) -> u64 {
        let start = index.saturating_mul(self.chunk_size);
        self.size.saturating_sub(start).min(self.chunk_size)
    }
}

/// Key of chunk `index`: fixed-width hex so a listing sorts by offset.
#[must_use]
pub fn chunk_key(index: u64) -> String {
    format!("{CHUNKS_DIR}/{index:016x}")
}

/// Key of chunk `index` as written in epoch `epoch`: epoch 0 is the plain
/// [`chunk_key`] (every object of a version 1 volume), a later one adds
/// `.{epoch:016x}`, so one index's versions list together, oldest first.
#[must_use]
pub fn chunk_key_at(index: u64, epoch: u64) -> String {
    if epoch == 0 {
        chunk_key(index)
    } else {
        format!("{CHUNKS_DIR}/{index:016x}.{epoch:016x}")
    }
}

fn hex16(s: &str) -> Option<u64> {
    if s.len() != 16 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// The chunk index of a key made by [`chunk_key`] (relative to the prefix);
/// `None` for anything else.
#[must_use]
pub fn parse_chunk_key(key: &str) -> Option<u64> {
    hex16(key.strip_prefix(CHUNKS_DIR)?.strip_prefix('/')?)
}

/// The (index, epoch) of a key made by [`chunk_key_at`] (relative to the
/// prefix); `None` for anything else.
#[must_use]
pub fn parse_chunk_key_at(key: &str) -> Option<(u64, u64)> {
    let name = key.strip_prefix(CHUNKS_DIR)?.strip_prefix('/')?;
    match name.split_once('.') {
        None => Some((hex16(name)?, 0)),
        // Epoch 0 has only the plain form: one key per version.
        Some((i, e)) => Some((hex16(i)?, hex16(e).filter(|&e| e > 0)?)),
    }
}

/// A volume's random identity, written in the manifest, every chunk header
/// and the lease, so objects of a different volume under the same prefix
/// are never mistaken for ours.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VolumeId(pub [u8; 16]);

impl VolumeId {
    /// A fresh random id from the OS generator.
    ///
    /// # Errors
    /// The OS random source failed.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b)?;
        Ok(Self(b))
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeId({self})")
    }
}

impl std::str::FromStr for VolumeId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bytes = s.as_bytes();
        if bytes.len() != 32 {
            return Err(format!("volume id {s:?} is not 32 hex digits"));
        }
        let mut out = [0u8; 16];
        for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let hi = hex_val(pair[0]);
            let lo = hex_val(pair[1]);
            match (hi, lo) {
                (Some(h), Some(l)) => *o = (h << 4) | l,
                _ => return Err(format!("volume id {s:?} is not 32 hex digits")),
            }
        }
        Ok(Self(out))
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl Serialize for VolumeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VolumeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
#[must_use]
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The manifest object: what the volume is. Written at creation; a resize
/// rewrites its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout format version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Device size in bytes.
    pub device_size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Checksum algorithm of the chunk objects ([`CHECKSUM_ALGORITHM`]).
    pub checksum: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// The volume's random id.
    pub volume_id: VolumeId,
    /// The head epoch: chunks are written under [`chunk_key_at`] with it.
    /// A snapshot freezes the epoch it names and moves the head to the next
    /// one, so no object a snapshot reads is ever written again. 0 in
    /// version 1.
    #[serde(default)]
    pub epoch: u64,
    /// A clone's ancestors, nearest first: a chunk with no object of this
    /// volume reads as the first of them that has one (version 2 only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<ParentRef>,
}

/// One ancestor of a clone: a volume of the same bucket, as it was at one
/// snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// The ancestor's key prefix in the bucket.
    pub prefix: String,
    /// The ancestor's id (its chunk headers carry it).
    pub volume_id: VolumeId,
    /// The ancestor's epoch the clone sees: objects up to it.
    pub epoch: u64,
    /// The snapshot the clone was made from (for people; the epoch is what counts).
    pub snapshot: String,
}

/// Only the version, read first so a future format with other fields
/// reports "unknown version" rather than a confusing parse error.
#[derive(Deserialize)]
struct VersionProbe {
    format_version: u64,
}

impl Manifest {
    /// A manifest for a new volume with this geometry.
    #[must_use]
    pub fn new(geometry: Geometry, volume_id: VolumeId, created_unix: u64) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            device_size: geometry.size(),
            chunk_size: geometry.chunk_size(),
            checksum: CHECKSUM_ALGORITHM.to_owned(),
            created_unix,
            volume_id,
            epoch: 0,
            parents: Vec::new(),
        }
    }

    /// Serialized form (pretty JSON, so the object is readable in a console).
    ///
    /// # Errors
    /// Never in practice; serde_json's error is passed on.
    pub fn encode(&self) -> Result<Vec<u8>, LayoutError> {
        let mut v = serde_json::to_vec_pretty(self)
            .map_err(|e| LayoutError::ManifestMalformed(e.to_string()))?;
        v.push(b'\n');
        Ok(v)
    }

    /// Parses and validates a manifest.
    ///
    /// # Errors
    /// [`LayoutError::UnknownVersion`], [`LayoutError::ManifestMalformed`], or
    /// a geometry error when the stored sizes are invalid.
    pub fn decode(bytes: &[u8]) -> Result<Self, LayoutError> {
        let probe: VersionProbe = serde_json::from_slice(bytes)
            .map_err(|e| LayoutError::ManifestMalformed(e.to_string()))?;
        if !(u64::from(FORMAT_V1)..=u64::from(FORMAT_VERSION)).contains(&probe.format_version) {
            return Err(LayoutError::UnknownVersion {
                found: probe.format_version,
            });
        }
        let m: Self = serde_json::from_slice(bytes)
            .map_err(|e| LayoutError::ManifestMalformed(e.to_string()))?;
        if m.format_version == FORMAT_V1 && (m.epoch != 0 || !m.parents.is_empty()) {
            return Err(LayoutError::ManifestMalformed(
                "a version 1 manifest with an epoch or parents".into(),
            ));
        }
        if m.parents.len() > MAX_PARENTS {
            return Err(LayoutError::ManifestMalformed(format!(
                "{} ancestors, more than {MAX_PARENTS}",
                m.parents.len()
            )));
        }
        if m.checksum != CHECKSUM_ALGORITHM {
            return Err(LayoutError::ManifestMalformed(format!(
                "unknown checksum algorithm {:?}",
                m.checksum
            )));
        }
        m.geometry()?;
        Ok(m)
    }

    /// The geometry the manifest describes.
    ///
    /// # Errors
    /// The stored sizes are invalid.
    pub fn geometry(&self) -> Result<Geometry, LayoutError> {
        Geometry::new(self.device_size, self.chunk_size)
    }

    /// Checks the manifest against what the user asked for; `None` means
    /// "whatever the bucket has".
    ///
    /// # Errors
    /// [`LayoutError::SizeMismatch`] / [`LayoutError::ChunkSizeMismatch`].
    pub fn check_matches(
        &self,
        size: Option<u64>,
        chunk_size: Option<u64>,
    ) -> Result<(), LayoutError> {
        if let Some(requested) = size.filter(|&s| s != self.device_size) {
            return Err(LayoutError::SizeMismatch {
                found: self.device_size,
                requested,
            });
        }
        if let Some(requested) = chunk_size.filter(|&c| c != self.chunk_size) {
            return Err(LayoutError::ChunkSizeMismatch {
                found: self.chunk_size,
                requested,
            });
        }
        Ok(())
    }
}

// Chunk object format:
//
//   offset size
//   0      8    magic "UBLKCHK1" (format version in the last byte)
//   8      16   volume id
//   24     8    chunk index, little endian
//   32     4    payload length, little endian
//   36     4    crc32c of bytes 0..36 followed by the payload, little endian
//   40     n    payload (the chunk's bytes, `Geometry::chunk_len(index)`,
//                or fewer: zeroes follow)
//
// A header (not a trailer) so a truncated or foreign object is rejected
// from its first bytes and the payload can be handed out as a zero-copy
// slice. crc32c rather than sha256: the threat is accidental damage
// (truncated uploads, bit rot, misplaced objects), not an attacker (who could
// rewrite any unkeyed hash too), and crc32c runs at memory speed with
// SSE4.2/PMULL while sha256 would cost more CPU than the network transfer.
// The header fields are covered too, so a flipped index or id is caught.

/// Magic at the start of every chunk object.
pub const CHUNK_MAGIC: [u8; 8] = *b"UBLKCHK1";
/// Bytes of header before a chunk's payload.
pub const CHUNK_HEADER_LEN: usize = 40;

fn crc32c(parts: &[&[u8]]) -> u32 {
    let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    for p in parts {
        d.update(p);
    }
    // crc32c is 32 bits wide; the library returns it in a u64.
    u32::try_from(d.finalize()).unwrap_or(u32::MAX)
}

/// Encodes chunk `index` of `volume` as an object body (header + payload).
///
/// # Errors
/// [`LayoutError::Chunk`] when the payload exceeds a `u32` length (never for
/// a valid geometry).
pub fn encode_chunk(volume: VolumeId, index: u64, payload: &[u8]) -> Result<Vec<u8>, LayoutError> {
    let len = u32::try_from(payload.len()).map_err(|_| LayoutError::Chunk {
        index,
        problem: ChunkProblem::WrongLength {
            expected: MAX_CHUNK_SIZE,
            found: payload.len() as u64,
        },
    })?;
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + payload.len());
    out.extend_from_slice(&CHUNK_MAGIC);
    out.extend_from_slice(&volume.0);
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    let crc = crc32c(&[&out, payload]);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

/// Verifies a chunk object fetched for chunk `index` of `volume` and returns
/// its payload (a slice of `object`, no copy). `expected_len` is
/// `Geometry::chunk_len(index)`, the most the payload may hold: a shorter
/// payload (uploaded when the chunk was the short last one of a smaller
/// volume) is the chunk's start, and the rest of the chunk is zeroes.
///
/// # Errors
/// [`LayoutError::Chunk`] naming what is wrong: truncated, foreign, corrupt,
/// of another volume or index, or of the wrong length.
pub fn decode_chunk(
    object: &Bytes,
    volume: VolumeId,
    index: u64,
    expected_len: u64,
) -> Result<Bytes, LayoutError> {
    let fail = |problem| LayoutError::Chunk { index, problem };
    if object.len() < CHUNK_HEADER_LEN {
        return Err(fail(ChunkProblem::Truncated {
            expected: CHUNK_HEADER_LEN,
            found: object.len(),
        }));
    }
    let (head, payload) = object.split_at(CHUNK_HEADER_LEN);
    if head[0..8] != CHUNK_MAGIC {
        return Err(fail(ChunkProblem::BadMagic));
    }
    let len = le_u32(&head[32..36]);
    let stored = le_u32(&head[36..40]);
    // Length before checksum: a truncated object is reported as such, not
    // as corrupt.
    let want = usize::try_from(len).unwrap_or(usize::MAX);
    if payload.len() != want {
        return Err(fail(ChunkProblem::Truncated {
            expected: CHUNK_HEADER_LEN.saturating_add(want),
            found: object.len(),
        }));
    }
    let computed = crc32c(&[&head[..36], payload]);
    if computed != stored {
        return Err(fail(ChunkProblem::ChecksumMismatch { stored, computed }));
    }
    // The checksum holds, so these fields are as written: compare them.
    if head[8..24] != volume.0 {
        return Err(fail(ChunkProblem::WrongVolume));
    }
    let found = le_u64(&head[24..32]);
    if found != index {
        return Err(fail(ChunkProblem::WrongIndex { found }));
    }
    // Shorter is a chunk uploaded while it was the short tail of a smaller
    // volume: the bytes past its payload read as zeroes.
    if u64::from(len) > expected_len {
        return Err(fail(ChunkProblem::WrongLength {
            expected: expected_len,
            found: u64::from(len),
        }));
    }
    Ok(object.slice(CHUNK_HEADER_LEN..))
}

/// Whether `buf` is all zero bytes. All-zero chunks are never stored (a
/// missing chunk reads as zeros), so writers call this on every chunk.
#[must_use]
pub fn is_all_zero(buf: &[u8]) -> bool {
    // OR-folding fixed blocks vectorizes well and exits early on data.
    let mut blocks = buf.chunks_exact(256);
    for b in &mut blocks {
        if b.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

/// Size of a tombstone: a chunk object with no payload. It hides what an
/// older epoch or a parent has for its chunk, which then reads as zeroes
/// (a data chunk is never empty: all-zero chunks are not stored).
pub const TOMBSTONE_LEN: u64 = CHUNK_HEADER_LEN as u64;

/// The tombstone of chunk `index` of `volume`.
///
/// # Errors
/// Never in practice ([`encode_chunk`]'s).
pub fn encode_tombstone(volume: VolumeId, index: u64) -> Result<Vec<u8>, LayoutError> {
    encode_chunk(volume, index, &[])
}

/// The lease object: who has the volume open. Taken with a conditional
/// create so two hosts never serve one volume at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Volume the lease is for.
    pub volume_id: VolumeId,
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder.
    pub pid: u32,
    /// When it was taken, seconds since the Unix epoch.
    pub acquired_unix: u64,
}

impl Lease {
    /// A lease held by this process, now.
    #[must_use]
    pub fn for_this_process(volume_id: VolumeId) -> Self {
        let uname = rustix::system::uname();
        Self {
            volume_id,
            host: uname.nodename().to_string_lossy().into_owned(),
            pid: std::process::id(),
            acquired_unix: unix_now(),
        }
    }

    /// Serialized form (JSON).
    ///
    /// # Errors
    /// Never in practice; serde_json's error is passed on.
    pub fn encode(&self) -> Result<Vec<u8>, LayoutError> {
        serde_json::to_vec(self).map_err(|e| LayoutError::LeaseMalformed(e.to_string()))
    }

    /// Parses a lease.
    ///
    /// # Errors
    /// [`LayoutError::LeaseMalformed`].
    pub fn decode(bytes: &[u8]) -> Result<Self, LayoutError> {
        serde_json::from_slice(bytes).map_err(|e| LayoutError::LeaseMalformed(e.to_string()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    const VOL: VolumeId = VolumeId([7; 16]);

    #[test]
    fn geometry_validation() {
        assert!(Geometry::new(1 << 30, DEFAULT_CHUNK_SIZE).is_ok());
        assert!(Geometry::new(1 << 30, MIN_CHUNK_SIZE).is_ok());
        assert!(Geometry::new(1 << 30, MAX_CHUNK_SIZE).is_ok());
        for bad in [0, 1, 32 << 10, 3 << 20, 128 << 20] {
            assert_eq!(
                Geometry::new(1 << 30, bad),
                Err(LayoutError::BadChunkSize(bad))
            );
        }
        assert_eq!(
            Geometry::new(0, DEFAULT_CHUNK_SIZE),
            Err(LayoutError::BadDeviceSize(0))
        );
        assert_eq!(
            Geometry::new(1000, DEFAULT_CHUNK_SIZE),
            Err(LayoutError::BadDeviceSize(1000))
        );
        assert!(matches!(
            Geometry::new(u64::MAX - 511, DEFAULT_CHUNK_SIZE),
            Err(LayoutError::TooLarge { .. })
        ));
    }

    #[test]
    fn geometry_math() {
        let g = Geometry::new(10 * MIN_CHUNK_SIZE + 512, MIN_CHUNK_SIZE).unwrap();
        assert_eq!(g.chunk_count(), 11);
        assert_eq!(g.chunk_len(0), MIN_CHUNK_SIZE);
        assert_eq!(g.chunk_len(10), 512);
        assert_eq!(g.chunk_len(11), 0);
        assert_eq!(g.chunk_len(u64::MAX), 0);
        assert_eq!(g.locate(MIN_CHUNK_SIZE + 5), (1, 5));
        let exact = Geometry::new(4 * DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE).unwrap();
        assert_eq!(exact.chunk_count(), 4);
        assert_eq!(exact.chunk_len(3), DEFAULT_CHUNK_SIZE);
    }

    #[test]
    fn chunk_keys_sort_by_offset() {
        assert_eq!(chunk_key(0), "chunks/0000000000000000");
        assert_eq!(chunk_key(0xabc), "chunks/0000000000000abc");
        let mut keys: Vec<String> = [300u64, 2, 17, 0xffff_ffff, 1 << 40]
            .iter()
            .map(|&i| chunk_key(i))
            .collect();
        keys.sort();
        let back: Vec<u64> = keys.iter().map(|k| parse_chunk_key(k).unwrap()).collect();
        assert_eq!(back, [2, 17, 300, 0xffff_ffff, 1 << 40]);
        assert_eq!(parse_chunk_key(&chunk_key(u64::MAX)), Some(u64::MAX));
        for bad in [
            "chunks/123",
            "chunks/000000000000000G",
            "chunks/000000000000000A",
            "chunk/0000000000000000",
            "manifest.json",
            "chunks/0000000000000000/x",
        ] {
            assert_eq!(parse_chunk_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn chunk_keys_with_epochs() {
        assert_eq!(chunk_key_at(5, 0), chunk_key(5));
        assert_eq!(
            chunk_key_at(5, 2),
            "chunks/0000000000000005.0000000000000002"
        );
        for (i, e) in [(0, 0), (5, 1), (u64::MAX, u64::MAX), (7, 0x1_0000_0000)] {
            assert_eq!(parse_chunk_key_at(&chunk_key_at(i, e)), Some((i, e)));
        }
        // One index's versions list together, oldest first, before the next index.
        let mut keys = [
            chunk_key_at(2, 0),
            chunk_key_at(1, 10),
            chunk_key_at(1, 2),
            chunk_key_at(1, 0),
        ];
        keys.sort();
        let back: Vec<_> = keys.iter().filter_map(|k| parse_chunk_key_at(k)).collect();
        assert_eq!(back, [(1, 0), (1, 2), (1, 10), (2, 0)]);
        for bad in [
            "chunks/0000000000000001.0000000000000000",
            "chunks/0000000000000001.",
            "chunks/0000000000000001.2",
            "chunks/0000000000000001.000000000000000G",
            "snapshots/a.json",
        ] {
            assert_eq!(parse_chunk_key_at(bad), None, "{bad}");
        }
    }

    #[test]
    fn manifest_versions() {
        let g = Geometry::new(1 << 20, MIN_CHUNK_SIZE).unwrap();
        // A version 1 manifest as the first format wrote it.
        let v1 = serde_json::json!({
            "format_version": 1, "device_size": 1 << 20, "chunk_size": MIN_CHUNK_SIZE,
            "checksum": "crc32c", "created_unix": 1, "volume_id": VOL.to_string(),
        });
        let m = Manifest::decode(&serde_json::to_vec(&v1).unwrap()).unwrap();
        assert_eq!((m.format_version, m.epoch), (FORMAT_V1, 0));
        assert!(m.parents.is_empty());
        // Rewritten (a resize), it stays version 1 and has no new fields.
        let again: serde_json::Value = serde_json::from_slice(&m.encode().unwrap()).unwrap();
        assert!(again.get("parents").is_none());
        // A clone's manifest round-trips its parents.
        let mut c = Manifest::new(g, VolumeId([9; 16]), 2);
        c.epoch = 3;
        c.parents.push(ParentRef {
            prefix: "golden".into(),
            volume_id: VOL,
            epoch: 1,
            snapshot: "base".into(),
        });
        assert_eq!(c.format_version, FORMAT_VERSION);
        assert_eq!(Manifest::decode(&c.encode().unwrap()).unwrap(), c);
        c.parents = vec![c.parents[0].clone(); MAX_PARENTS + 1];
        assert!(matches!(
            Manifest::decode(&c.encode().unwrap()),
            Err(LayoutError::ManifestMalformed(_))
        ));
    }

    #[test]
    fn volume_id_roundtrip() {
        let id = VolumeId::random().unwrap();
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<VolumeId>().unwrap(), id);
        assert_ne!(VolumeId::random().unwrap(), id);
        assert!("xyz".parse::<VolumeId>().is_err());
        assert!("zz".repeat(16).parse::<VolumeId>().is_err());
    }

    #[test]
    fn manifest_roundtrip_and_checks() {
        let g = Geometry::new(1 << 30, DEFAULT_CHUNK_SIZE).unwrap();
        let m = Manifest::new(g, VOL, 1_700_000_000);
        let bytes = m.encode().unwrap();
        let back = Manifest::decode(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.geometry().unwrap(), g);
        assert!(back.check_matches(None, None).is_ok());
        assert!(back
            .check_matches(Some(1 << 30), Some(DEFAULT_CHUNK_SIZE))
            .is_ok());
        assert_eq!(
            back.check_matches(Some(2 << 30), None),
            Err(LayoutError::SizeMismatch {
                found: 1 << 30,
                requested: 2 << 30
            })
        );
        assert_eq!(
            back.check_matches(None, Some(MIN_CHUNK_SIZE)),
            Err(LayoutError::ChunkSizeMismatch {
                found: DEFAULT_CHUNK_SIZE,
                requested: MIN_CHUNK_SIZE
            })
        );
    }

    #[test]
    fn manifest_rejects_bad_input() {
        let g = Geometry::new(1 << 20, MIN_CHUNK_SIZE).unwrap();
        let mut v: serde_json::Value =
            serde_json::from_slice(&Manifest::new(g, VOL, 1).encode().unwrap()).unwrap();
        v["format_version"] = 3.into();
        // A future version with unknown fields still says "unknown version".
        v["new_field"] = "x".into();
        let err = Manifest::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(err, LayoutError::UnknownVersion { found: 3 });
        assert!(err.to_string().contains("version 3"), "{err}");

        // Version 1 has no epoch and no parents.
        v["format_version"] = 1.into();
        v["epoch"] = 4.into();
        assert!(matches!(
            Manifest::decode(&serde_json::to_vec(&v).unwrap()),
            Err(LayoutError::ManifestMalformed(_))
        ));
        v["epoch"] = 0.into();
        v["chunk_size"] = 1000.into();
        assert_eq!(
            Manifest::decode(&serde_json::to_vec(&v).unwrap()),
            Err(LayoutError::BadChunkSize(1000))
        );
        v["chunk_size"] = MIN_CHUNK_SIZE.into();
        v["volume_id"] = "nothex".into();
        assert!(matches!(
            Manifest::decode(&serde_json::to_vec(&v).unwrap()),
            Err(LayoutError::ManifestMalformed(_))
        ));
        assert!(matches!(
            Manifest::decode(b"{\"format_version\": 1}"),
            Err(LayoutError::ManifestMalformed(_))
        ));
        assert!(matches!(
            Manifest::decode(b"not json"),
            Err(LayoutError::ManifestMalformed(_))
        ));
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn chunk_roundtrip() {
        let data = payload(4096);
        let obj = Bytes::from(encode_chunk(VOL, 5, &data).unwrap());
        assert_eq!(obj.len(), CHUNK_HEADER_LEN + data.len());
        let back = decode_chunk(&obj, VOL, 5, 4096).unwrap();
        assert_eq!(&back[..], &data[..]);
        // Empty payload is representable (not used: zero chunks are absent).
        let empty = Bytes::from(encode_chunk(VOL, 0, &[]).unwrap());
        assert!(decode_chunk(&empty, VOL, 0, 0).unwrap().is_empty());
    }

    #[test]
    fn chunk_rejects_damage() {
        let data = payload(4096);
        let good = encode_chunk(VOL, 5, &data).unwrap();
        let problem =
            |obj: Vec<u8>, vol, idx, len| match decode_chunk(&Bytes::from(obj), vol, idx, len) {
                Err(LayoutError::Chunk { index, problem }) => {
                    assert_eq!(index, idx);
                    problem
                }
                other => panic!("expected chunk error, got {other:?}"),
            };
        // Every single bit flip is caught, whether in header or payload.
        for pos in [0, 9, 25, 33, 37, 40, 41, 2000, good.len() - 1] {
            let mut bad = good.clone();
            bad[pos] ^= 0x10;
            let p = problem(bad, VOL, 5, 4096);
            assert!(
                matches!(
                    p,
                    ChunkProblem::BadMagic
                        | ChunkProblem::ChecksumMismatch { .. }
                        | ChunkProblem::Truncated { .. }
                ),
                "flip at {pos}: {p:?}"
            );
        }
        // Truncation, at any point.
        for cut in [
            0,
            10,
            CHUNK_HEADER_LEN,
            CHUNK_HEADER_LEN + 100,
            good.len() - 1,
        ] {
            let p = problem(good[..cut].to_vec(), VOL, 5, 4096);
            assert!(
                matches!(p, ChunkProblem::Truncated { .. }),
                "cut {cut}: {p:?}"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            problem(long, VOL, 5, 4096),
            ChunkProblem::Truncated { .. }
        ));
        // Intact objects that are not the one asked for.
        assert_eq!(
            problem(good.clone(), VolumeId([8; 16]), 5, 4096),
            ChunkProblem::WrongVolume
        );
        assert_eq!(
            problem(good.clone(), VOL, 6, 4096),
            ChunkProblem::WrongIndex { found: 5 }
        );
        assert_eq!(
            problem(good.clone(), VOL, 5, 2048),
            ChunkProblem::WrongLength {
                expected: 2048,
                found: 4096
            }
        );
        // The volume grew past a chunk that was its short tail.
        assert!(decode_chunk(&Bytes::from(good), VOL, 5, 8192).is_ok());
        assert!(LayoutError::Chunk {
            index: 1,
            problem: ChunkProblem::ChecksumMismatch {
                stored: 1,
                computed: 2
            }
        }
        .to_string()
        .contains("corrupt"));
    }

    #[test]
    fn crc32c_known_value() {
        // RFC 3720 B.4 test vector: 32 zero bytes.
        assert_eq!(crc32c(&[&[0u8; 32]]), 0x8a91_36aa);
        // Split input gives the same checksum as whole.
        assert_eq!(crc32c(&[b"1234", b"56789"]), crc32c(&[b"123456789"]));
        assert_eq!(crc32c(&[b"123456789"]), 0xe306_9283);
    }

    #[test]
    fn all_zero() {
        assert!(is_all_zero(&[]));
        assert!(is_all_zero(&[0; 1]));
        assert!(is_all_zero(&vec![0; 4 << 20]));
        for len in [1usize, 255, 256, 257, 1000, 4096] {
            for pos in [0, len / 2, len - 1] {
                let mut v = vec![0u8; len];
                v[pos] = 1;
                assert!(!is_all_zero(&v), "len {len} pos {pos}");
            }
        }
    }

    #[test]
    fn lease_roundtrip() {
        let l = Lease::for_this_process(VOL);
        assert_eq!(l.pid, std::process::id());
        assert!(!l.host.is_empty());
        assert_eq!(Lease::decode(&l.encode().unwrap()).unwrap(), l);
        assert!(matches!(
            Lease::decode(b"{}"),
            Err(LayoutError::LeaseMalformed(_))
        ));
    }
}
