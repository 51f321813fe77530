//! The overlay file: its header, the cluster map, and how the map reaches
//! the disk.
//!
//! ```text
//! 0          header (4 KiB): magic, version, cluster size, base size and
//!            block size, layout, the base's identity, a checksum
//! 4096       the map: one bit per cluster (1 = in the overlay), 64-bit
//!            little-endian words, written in 4 KiB pages
//! data_off   cluster c at data_off + c * cluster (a sparse file: clusters
//!            never written take no space; zeroed ones are holes)
//! ```
//!
//! Bits are only ever set, and a bit reaches the file only after the data
//! it vouches for was made durable ([`Map::persist`]: `fdatasync`, map
//! pages, `fdatasync`). So any on-disk map, even one with pages torn by a
//! power cut, points only at clusters whose data is complete.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use rustix::io::Errno;

pub(super) use crate::io::fd::{read_exact, write_all};

const MAGIC: &[u8; 8] = b"UBLKCOW\0";
const VERSION: u32 = 1;
/// Header size, and where the map starts.
pub(super) const HEADER: u64 = 4096;
pub(super) const HEADER_BYTES: usize = 4096;
/// The map is written in pages of this many bytes.
const PAGE: u64 = 4096;
const PAGE_BYTES: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE_BYTES / 8;
/// Longest base identity kept in the header.
const MAX_IDENTITY: usize = 2048;
/// Most clusters an overlay may have (a 256 MiB map).
pub(super) const MAX_CLUSTERS: u64 = 1 << 31;

/// What an overlay is for, and where its parts are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Layout {
    /// Cluster size in bytes (a power of two).
    pub cluster: u32,
    /// The base's logical block size when the overlay was made.
    pub block: u32,
    /// The base's size in bytes.
    pub base_size: u64,
    /// Where cluster 0 starts in the file.
    pub data_off: u64,
    /// The base's description when the overlay was made (informational).
    pub identity: String,
}

impl Layout {
    /// The layout of a new overlay.
    pub(super) fn new(cluster: u32, block: u32, base_size: u64, identity: &str) -> Self {
        let mut identity = identity.to_string();
        if identity.len() > MAX_IDENTITY {
            let mut cut = MAX_IDENTITY;
            while !identity.is_char_boundary(cut) {
                cut -= 1;
            }
            identity.truncate(cut);
        }
        let mut l = Layout {
            cluster,
            block,
            base_size,
            data_off: 0,
            identity,
        };
        l.data_off = (HEADER + l.map_len()).next_multiple_of(u64::from(cluster).max(PAGE));
        l
    }

    /// Number of clusters (the last may be short).
    pub(super) fn clusters(&self) -> u64 {
        self.base_size.div_ceil(u64::from(self.cluster))
    }

    /// Bytes of map in the file: whole pages.
    pub(super) fn map_len(&self) -> u64 {
        self.clusters().div_ceil(8).next_multiple_of(PAGE)
    }

    /// The overlay file's size.
    pub(super) fn file_len(&self) -> u64 {
        self.data_off + self.base_size
    }

    /// The header block.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_BYTES];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.cluster.to_le_bytes());
        h[16..20].copy_from_slice(&self.block.to_le_bytes());
        h[24..32].copy_from_slice(&self.base_size.to_le_bytes());
        h[32..40].copy_from_slice(&HEADER.to_le_bytes());
        h[40..48].copy_from_slice(&self.map_len().to_le_bytes());
        h[48..56].copy_from_slice(&self.data_off.to_le_bytes());
        let id = self.identity.as_bytes();
        h[56..58].copy_from_slice(&u16::try_from(id.len()).unwrap_or(0).to_le_bytes());
        h[64..64 + id.len()].copy_from_slice(id);
        let sum = checksum(&h[..HEADER_BYTES - 8]);
        h[HEADER_BYTES - 8..].copy_from_slice(&sum.to_le_bytes());
        h
    }

    /// Read a header block back; `Err` says what is wrong with it.
    pub(super) fn decode(h: &[u8]) -> Result<Layout, String> {
        if h.len() < HEADER_BYTES || &h[0..8] != MAGIC {
            return Err("not a cow overlay (no overlay header)".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(format!(
                "overlay format version {version}, this program knows {VERSION}"
            ));
        }
        if u64_at(HEADER_BYTES - 8) != checksum(&h[..HEADER_BYTES - 8]) {
            return Err("the overlay header is damaged (checksum mismatch)".into());
        }
        let (cluster, block, base_size) = (u32_at(12), u32_at(16), u64_at(24));
        let id_len = usize::from(u16::from_le_bytes([h[56], h[57]])).min(MAX_IDENTITY);
        let identity = String::from_utf8_lossy(&h[64..64 + id_len]).into_owned();
        if !cluster.is_power_of_two() || cluster < 512 || base_size == 0 {
            return Err(format!(
                "the overlay header makes no sense (cluster {cluster}, base size {base_size})"
            ));
        }
        if base_size.div_ceil(u64::from(cluster)) > MAX_CLUSTERS {
            return Err(format!(
                "the overlay header makes no sense ({base_size} bytes in {cluster}-byte clusters)"
            ));
        }
        let l = Layout::new(cluster, block, base_size, &identity);
        if u64_at(32) != HEADER || u64_at(40) != l.map_len() || u64_at(48) != l.data_off {
            return Err("the overlay's layout is not this version's".into());
        }
        Ok(l)
    }
}

/// FNV-1a, 64 bits: enough to tell a header from a damaged one.
fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Which clusters are in the overlay: set bits in memory (lock-free), and
/// what has reached the file.
#[derive(Debug)]
pub(super) struct Map {
    words: Vec<AtomicU64>,
    /// One bit per map page holding a bit not yet written to the file.
    dirty: Vec<AtomicU64>,
    /// Bits set so far (counted when set).
    set: AtomicU64,
    /// `set` as of the last map write made durable.
    persisted: AtomicU64,
    /// Held while the map is written: one writer at a time, so an older
    /// snapshot of a page never lands after a newer one.
    writing: Mutex<()>,
}

impl Map {
    /// A map of `clusters` bits, all clear.
    pub(super) fn new(clusters: u64) -> Self {
        let words = usize::try_from(clusters.div_ceil(64)).unwrap_or(0);
        let pages = words.div_ceil(WORDS_PER_PAGE);
        Map {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            set: AtomicU64::new(0),
            persisted: AtomicU64::new(0),
            writing: Mutex::new(()),
        }
    }

    /// The map stored in `fd` for `layout`.
    pub(super) fn load(fd: BorrowedFd<'_>, layout: &Layout) -> Result<Self, Errno> {
        let map = Map::new(layout.clusters());
        let mut page = vec![0u8; PAGE_BYTES];
        for (p, words) in map.words.chunks(WORDS_PER_PAGE).enumerate() {
            read_exact(fd, &mut page, HEADER + p as u64 * PAGE)?;
            for (w, bytes) in words.iter().zip(page.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(bytes);
                w.store(u64::from_le_bytes(b), Ordering::Relaxed);
            }
        }
        // Bits past the last cluster mean nothing; clear them.
        let clusters = layout.clusters();
        if let Some(last) = map.words.last() {
            let used = clusters % 64;
            if used != 0 {
                last.fetch_and((1u64 << used) - 1, Ordering::Relaxed);
            }
        }
        Ok(map)
    }

    /// Whether cluster `c` is in the overlay.
    pub(super) fn contains(&self, c: u64) -> bool {
        let Some(w) = usize::try_from(c / 64).ok().and_then(|i| self.words.get(i)) else {
            return false;
        };
        w.load(Ordering::Acquire) & (1 << (c % 64)) != 0
    }

    /// Whether every cluster of `first..=last` is in the overlay.
    pub(super) fn contains_all(&self, first: u64, last: u64) -> bool {
        (first..=last).all(|c| self.contains(c))
    }

    /// The first cluster from `c` (up to `limit`) whose state is not
    /// `inside`: the end of the run of like clusters starting at `c`.
    pub(super) fn run_end(&self, mut c: u64, inside: bool, limit: u64) -> u64 {
        while c < limit {
            let Some(w) = usize::try_from(c / 64).ok().and_then(|i| self.words.get(i)) else {
                return limit;
            };
            let w = w.load(Ordering::Acquire);
            let like = if inside { w } else { !w };
            // Bits from c's position up, all alike: skip to the next word.
            let from = like >> (c % 64);
            if from == u64::MAX >> (c % 64) {
                c = (c / 64 + 1) * 64;
                continue;
            }
            return (c + u64::from(from.trailing_ones())).min(limit);
        }
        limit
    }

    /// Put cluster `c` in the overlay (its data must be in the file already).
    pub(super) fn insert(&self, c: u64) {
        let Some(i) = usize::try_from(c / 64)
            .ok()
            .filter(|&i| i < self.words.len())
        else {
            return;
        };
        let bit = 1 << (c % 64);
        if self.words[i].fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return;
        }
        let page = i / WORDS_PER_PAGE;
        self.dirty[page / 64].fetch_or(1 << (page % 64), Ordering::SeqCst);
        self.set.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether every bit set so far is in the file.
    pub(super) fn is_clean(&self) -> bool {
        self.persisted.load(Ordering::SeqCst) == self.set.load(Ordering::SeqCst)
    }

    /// Clusters in the overlay.
    pub(super) fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Make every bit set before this call durable in `fd`: first the
    /// data (every completed write), then the changed map pages, then
    /// those. Blocks for two `fdatasync`s when there is anything to write.
    pub(super) fn persist(&self, fd: BorrowedFd<'_>) -> Result<(), Errno> {
        let _one = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = self.set.load(Ordering::SeqCst);
        if self.persisted.load(Ordering::SeqCst) == seen {
            return Ok(());
        }
        // The snapshot comes before the data sync: a bit in it was set
        // after its data was written, so the sync covers that data.
        let mut pages = Vec::new();
        for (i, d) in self.dirty.iter().enumerate() {
            let mut bits = d.swap(0, Ordering::SeqCst);
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let p = i * 64 + b;
                let words = &self.words
                    [p * WORDS_PER_PAGE..((p + 1) * WORDS_PER_PAGE).min(self.words.len())];
                let mut bytes = vec![0u8; PAGE_BYTES];
                for (w, out) in words.iter().zip(bytes.chunks_exact_mut(8)) {
                    out.copy_from_slice(&w.load(Ordering::SeqCst).to_le_bytes());
                }
                pages.push((p, bytes));
            }
        }
        let result = (|| {
            rustix::fs::fdatasync(fd)?;
            for (p, bytes) in &pages {
                write_all(fd, bytes, HEADER + *p as u64 * PAGE)?;
            }
            rustix::fs::fdatasync(fd)
        })();
        match result {
            Ok(()) => {
                self.persisted.fetch_max(seen, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                // Written again next time.
                for (p, _) in pages {
                    self.dirty[p / 64].fetch_or(1 << (p % 64), Ordering::SeqCst);
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn headers_round_trip_and_damage_is_named() {
        let l = Layout::new(65536, 512, 10 << 30, r#"{"type":"file"}"#);
        assert_eq!(l.clusters(), 163_840);
        assert_eq!(l.map_len(), 20480);
        assert_eq!(l.data_off, 65536);
        let h = l.encode();
        assert_eq!(Layout::decode(&h), Ok(l.clone()));
        let mut bad = h.clone();
        bad[30] ^= 1;
        assert!(Layout::decode(&bad).unwrap_err().contains("checksum"));
        let mut other = h;
        other[0] = b'X';
        assert!(Layout::decode(&other)
            .unwrap_err()
            .contains("not a cow overlay"));
        assert!(Layout::decode(&[0; 100]).is_err());
    }

    #[test]
    fn bits_reach_the_file_only_through_persist() {
        let f = tempfile::tempfile().unwrap();
        let l = Layout::new(4096, 512, 1 << 28, "");
        f.set_len(l.file_len()).unwrap();
        let map = Map::new(l.clusters());
        assert!(map.is_clean());
        map.insert(3);
        map.insert(3);
        map.insert(40_000);
        assert!(map.contains(3) && map.contains(40_000) && !map.contains(4));
        assert!(!map.contains(u64::MAX));
        assert_eq!(map.count(), 2);
        assert!(!map.is_clean());
        assert_eq!(Map::load(f.as_fd(), &l).unwrap().count(), 0);
        map.persist(f.as_fd()).unwrap();
        assert!(map.is_clean());
        let back = Map::load(f.as_fd(), &l).unwrap();
        assert!(back.contains(3) && back.contains(40_000));
        assert_eq!(back.count(), 2);
        assert!(back.contains_all(3, 3) && !back.contains_all(3, 4));
    }
}
