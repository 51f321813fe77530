//! The qcow2 header and its extensions: parsing with every check an image
//! from an untrusted source needs, and encoding for `create`.
//!
//! Layout and field meanings follow QEMU's `docs/interop/qcow2.txt`. All
//! numbers are big-endian.

use super::Qcow2Error;

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Version 2 headers are exactly this long.
pub const V2_HEADER_LEN: u32 = 72;
/// Version 3 headers are at least this long.
pub const V3_HEADER_LEN: u32 = 104;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// The image may be corrupt: it must not be written.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// A compression type other than zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// 128-bit L2 entries with subclusters.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Compatible: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Byte offsets of the header fields this crate rewrites in place.
pub const OFF_REFCOUNT_TABLE: u64 = 48;
/// `incompatible_features`.
pub const OFF_INCOMPATIBLE: u64 = 72;
/// `autoclear_features`.
pub const OFF_AUTOCLEAR: u64 = 88;

/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;

/// Smallest and largest cluster sizes accepted (512 B to 2 MiB, as QEMU).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table accepted, in bytes (QEMU's limit): bounds what opening
/// a hostile image can make us allocate.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table accepted, in bytes (QEMU's is 8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 32 << 20;
/// Longest backing file name (the specification's limit).
pub const MAX_BACKING_NAME: u32 = 1023;
/// Host offsets are 56 bits at most.
pub const MAX_HOST_OFFSET: u64 = (1 << 56) - 1;

/// A parsed qcow2 header with the extensions we act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Where the active L1 table starts.
    pub l1_table_offset: u64,
    /// Where the refcount table starts.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Internal snapshots (their clusters have refcounts above one).
    pub nb_snapshots: u32,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Auto-clear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits (4 for version 2).
    pub refcount_order: u32,
    /// Header length in bytes (72 for version 2).
    pub header_length: u32,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
    /// The backing file's format (`qcow2`, `raw`), if the image says.
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    if let Some(s) = at.checked_add(4).and_then(|end| b.get(at..end)) {
        x.copy_from_slice(s);
    }
    u32::from_be_bytes(x)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    if let Some(s) = at.checked_add(8).and_then(|end| b.get(at..end)) {
        x.copy_from_slice(s);
    }
    u64::from_be_bytes(x)
}

fn bad(msg: impl Into<String>) -> Qcow2Error {
    Qcow2Error::Corrupt(msg.into())
}

impl Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
        let l2_entries = 1u64 << (cluster_bits - 3);
        size.div_ceil(1 << cluster_bits).div_ceil(l2_entries)
    }

    /// The cluster_bits of an image whose first bytes are `first`, read
    /// before the whole first cluster is, or an error if it is not qcow2.
    pub fn peek_cluster_bits(first: &[u8]) -> Result<u32, Qcow2Error> {
        if first.len() < V2_HEADER_LEN as usize || be32(first, 0) != MAGIC {
            return Err(Qcow2Error::NotQcow2);
        }
        let bits = be32(first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(bad(format!(
                "cluster_bits {bits} is outside 9..=21 (512 B to 2 MiB clusters)"
            )));
        }
        Ok(bits)
    }

    /// Parse the header from the image's first cluster (`first`, which may
    /// be shorter when the file is) of a file `file_len` bytes long.
    pub fn parse(first: &[u8], file_len: u64) -> Result<Header, Qcow2Error> {
        let cluster_bits = Self::peek_cluster_bits(first)?;
        let version = be32(first, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::Unsupported(format!(
                "qcow2 version {version} (only 2 and 3 exist)"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(first, 24),
            l1_size: be32(first, 36),
            l1_table_offset: be64(first, 40),
            refcount_table_offset: be64(first, 48),
            refcount_table_clusters: be32(first, 56),
            nb_snapshots: be32(first, 60),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            backing_file: None,
            backing_format: None,
        };
        if version == 3 {
            h.incompatible = be64(first, 72);
            h.compatible = be64(first, 80);
            h.autoclear = be64(first, 88);
            h.refcount_order = be32(first, 96);
            h.header_length = be32(first, 100);
            if h.header_length < V3_HEADER_LEN || !h.header_length.is_multiple_of(8) {
                return Err(bad(format!(
                    "header_length {} must be a multiple of 8 and at least 104",
                    h.header_length
                )));
            }
        }
        if u64::from(h.header_length) > cluster_size || first.len() < h.header_length as usize {
            return Err(bad("the header does not fit in the first cluster"));
        }
        match be32(first, 32) {
            0 => {}
            m => {
                return Err(Qcow2Error::Unsupported(format!(
                    "encrypted images (crypt_method {m})"
                )))
            }
        }
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        if h.incompatible & !known != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "unknown incompatible features {:#x}",
                h.incompatible & !known
            )));
        }
        if h.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Qcow2Error::Unsupported("external data files".into()));
        }
        if h.incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(Qcow2Error::Unsupported(
                "extended L2 entries (subclusters)".into(),
            ));
        }
        if h.incompatible & INCOMPAT_COMPRESSION != 0 {
            // The field is present only when header_length covers it.
            let kind = if h.header_length > V3_HEADER_LEN {
                first.get(104).copied().unwrap_or(0)
            } else {
                0
            };
            if kind != 0 {
                return Err(Qcow2Error::Unsupported(format!(
                    "compression type {kind} (only zlib is supported)"
                )));
            }
        }
        if h.refcount_order > 6 {
            return Err(bad(format!(
                "refcount_order {} is above 6",
                h.refcount_order
            )));
        }
        if h.size > MAX_HOST_OFFSET {
            return Err(bad(format!("virtual size {} is too large", h.size)));
        }
        // The L1 table: in the file, aligned, big enough for the size, bounded.
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(bad(format!(
                "L1 table of {} entries is larger than {} MiB",
                h.l1_size,
                MAX_L1_BYTES >> 20
            )));
        }
        if u64::from(h.l1_size) < Self::l1_entries_for(h.size, cluster_bits) {
            return Err(bad(format!(
                "L1 table of {} entries cannot map the virtual size {}",
                h.l1_size, h.size
            )));
        }
        check_table(
            "L1 table",
            h.l1_table_offset,
            l1_bytes,
            cluster_size,
            file_len,
        )?;
        let rt_bytes = u64::from(h.refcount_table_clusters) * cluster_size;
        if h.refcount_table_clusters == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return Err(bad(format!(
                "refcount table of {} clusters is empty or larger than {} MiB",
                h.refcount_table_clusters,
                MAX_REFTABLE_BYTES >> 20
            )));
        }
        check_table(
            "refcount table",
            h.refcount_table_offset,
            rt_bytes,
            cluster_size,
            file_len,
        )?;
        if overlap(
            (h.l1_table_offset, l1_bytes),
            (h.refcount_table_offset, rt_bytes),
        ) {
            return Err(bad("the L1 table and the refcount table overlap"));
        }
        h.parse_extensions(first)?;
        let backing_offset = be64(first, 8);
        let backing_len = be32(first, 16);
        if backing_offset != 0 {
            if backing_len > MAX_BACKING_NAME {
                return Err(bad(format!(
                    "backing file name of {backing_len} bytes (at most {MAX_BACKING_NAME})"
                )));
            }
            // The offset is the file's word: checked, so a hostile one near
            // u64::MAX is an error, not an overflow.
            let name = usize::try_from(backing_offset)
                .ok()
                .and_then(|o| Some(o..o.checked_add(backing_len as usize)?))
                .and_then(|r| first.get(r))
                .ok_or_else(|| bad("the backing file name is outside the first cluster"))?;
            let name =
                std::str::from_utf8(name).map_err(|_| bad("the backing file name is not UTF-8"))?;
            if name.is_empty() || name.contains('\0') {
                return Err(bad("the backing file name is empty or holds a NUL"));
            }
            h.backing_file = Some(name.to_string());
        }
        Ok(h)
    }

    /// Walk the header extensions after the header, keeping the backing format.
    fn parse_extensions(&mut self, first: &[u8]) -> Result<(), Qcow2Error> {
        let mut at = self.header_length as usize;
        loop {
            if first.len().saturating_sub(at) < 8 {
                // Version 2 images may end the list with the cluster.
                return Ok(());
            }
            let kind = be32(first, at);
            let len = be32(first, at + 4) as usize;
            if kind == EXT_END {
                return Ok(());
            }
            // `len` is the file's word (up to 4 GiB): every sum is checked.
            let past = || {
                bad(format!(
                    "header extension {kind:#x} runs past the first cluster"
                ))
            };
            let start = at + 8;
            let end = start.checked_add(len).ok_or_else(past)?;
            let data = first.get(start..end).ok_or_else(past)?;
            match kind {
                EXT_BACKING_FORMAT => {
                    let f = std::str::from_utf8(data)
                        .map_err(|_| bad("the backing format is not UTF-8"))?;
                    self.backing_format = Some(f.trim_end_matches('\0').to_string());
                }
                EXT_FEATURE_NAMES => {}
                _ => {}
            }
            // Inside `first` (just checked), so rounding up cannot overflow.
            at = start + len.next_multiple_of(8);
        }
    }

    /// Encode a new version 3 header (refcount_order 4) with its extensions
    /// and the backing name, as the start of the first cluster.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; V3_HEADER_LEN as usize];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[72..80].copy_from_slice(&self.incompatible.to_be_bytes());
        b[80..88].copy_from_slice(&self.compatible.to_be_bytes());
        b[88..96].copy_from_slice(&self.autoclear.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&V3_HEADER_LEN.to_be_bytes());
        if let Some(f) = &self.backing_format {
            push_ext(&mut b, EXT_BACKING_FORMAT, f.as_bytes());
        }
        // The end of the extensions.
        b.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            let at = b.len() as u64;
            b[8..16].copy_from_slice(&at.to_be_bytes());
            let len = u32::try_from(name.len()).unwrap_or(u32::MAX);
            b[16..20].copy_from_slice(&len.to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        b
    }
}

fn push_ext(b: &mut Vec<u8>, kind: u32, data: &[u8]) {
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&u32::try_from(data.len()).unwrap_or(0).to_be_bytes());
    b.extend_from_slice(data);
    b.resize(b.len().next_multiple_of(8), 0);
}

/// Whether two byte ranges `(start, len)` overlap.
pub fn overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.1 > 0 && b.1 > 0 && a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

/// A table at `offset` of `bytes`: cluster-aligned, not over the header,
/// and inside the file.
fn check_table(
    what: &str,
    offset: u64,
    bytes: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), Qcow2Error> {
    if bytes == 0 {
        return Ok(());
    }
    if offset == 0 || !offset.is_multiple_of(cluster_size) {
        return Err(bad(format!(
            "{what} offset {offset:#x} is not a cluster boundary past the header"
        )));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(bad(format!(
            "{what} at {offset:#x} ({bytes} bytes) runs past the end of the file ({file_len} bytes)"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn fresh(size: u64, bits: u32) -> (Header, Vec<u8>) {
        let cs = 1u64 << bits;
        let h = Header {
            version: 3,
            cluster_bits: bits,
            size,
            l1_size: u32::try_from(Header::l1_entries_for(size, bits).max(1)).unwrap(),
            l1_table_offset: 3 * cs,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
        };
        let mut b = h.encode();
        b.resize(cs as usize, 0);
        (h, b)
    }

    #[test]
    fn encode_then_parse() {
        let (h, b) = fresh(1 << 30, 16);
        let back = Header::parse(&b, 1 << 20).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.cluster_size(), 65536);
    }

    #[test]
    fn hostile_headers_are_refused() {
        let (_, good) = fresh(1 << 30, 16);
        type Edit = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("not qcow2", Box::new(|b| b[0] = b'X')),
            (
                "version",
                Box::new(|b| b[4..8].copy_from_slice(&4u32.to_be_bytes())),
            ),
            (
                "cluster_bits",
                Box::new(|b| b[20..24].copy_from_slice(&30u32.to_be_bytes())),
            ),
            (
                "encrypted",
                Box::new(|b| b[32..36].copy_from_slice(&1u32.to_be_bytes())),
            ),
            (
                "huge L1",
                Box::new(|b| b[36..40].copy_from_slice(&u32::MAX.to_be_bytes())),
            ),
            (
                "small L1",
                Box::new(|b| b[36..40].copy_from_slice(&0u32.to_be_bytes())),
            ),
            (
                "L1 unaligned",
                Box::new(|b| b[40..48].copy_from_slice(&4097u64.to_be_bytes())),
            ),
            (
                "L1 past the end",
                Box::new(|b| b[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes())),
            ),
            (
                "reftable at 0",
                Box::new(|b| b[48..56].copy_from_slice(&0u64.to_be_bytes())),
            ),
            (
                "reftable huge",
                Box::new(|b| b[56..60].copy_from_slice(&100_000u32.to_be_bytes())),
            ),
            (
                "overlap",
                Box::new(|b| b[48..56].copy_from_slice(&(3u64 << 16).to_be_bytes())),
            ),
            (
                "unknown feature",
                Box::new(|b| b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes())),
            ),
            (
                "data file",
                Box::new(|b| b[72..80].copy_from_slice(&INCOMPAT_DATA_FILE.to_be_bytes())),
            ),
            (
                "refcount order",
                Box::new(|b| b[96..100].copy_from_slice(&7u32.to_be_bytes())),
            ),
            (
                "header length",
                Box::new(|b| b[100..104].copy_from_slice(&100u32.to_be_bytes())),
            ),
            (
                "backing name length",
                Box::new(|b| b[16..20].copy_from_slice(&5000u32.to_be_bytes())),
            ),
            (
                "extension past the cluster",
                Box::new(|b| b[108..112].copy_from_slice(&u32::MAX.to_be_bytes())),
            ),
        ];
        for (what, edit) in cases {
            let mut b = good.clone();
            edit(&mut b);
            assert!(Header::parse(&b, 1 << 20).is_err(), "{what} was accepted");
        }
        // Offsets and lengths whose sums overflow: errors, not panics.
        for (what, at, v) in [
            ("backing offset u64::MAX", 8, u64::MAX),
            ("backing offset u64::MAX - 3", 8, u64::MAX - 3),
            ("backing offset 2^63", 8, 1 << 63),
        ] {
            let mut b = good.clone();
            b[at..at + 8].copy_from_slice(&v.to_be_bytes());
            let e = Header::parse(&b, 1 << 20).unwrap_err().to_string();
            assert!(e.contains("backing file name"), "{what}: {e}");
        }
        assert!(Header::parse(&good[..50], 1 << 20).is_err());
        // The same image is fine when the file holds its tables.
        assert!(Header::parse(&good, 1 << 20).is_ok());
    }
}
