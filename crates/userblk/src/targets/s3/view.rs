//! Which object a chunk reads from: a volume's own objects of the epochs
//! its view sees, then its parents' (a clone's), nearest first. Pure code:
//! the listings come in, sources go out.
//!
//! Within one volume, chunk `i` reads the object of the newest epoch at or
//! below the view's epoch. A tombstone there ([`TOMBSTONE_LEN`] bytes)
//! means zeroes, and hides what is below it and in the parents. No object
//! in any layer means zeroes too.

use std::collections::BTreeMap;

use super::layout::{parse_chunk_key_at, TOMBSTONE_LEN};

/// One volume's chunk objects, from a listing of its `chunks/`: per index,
/// each version's (epoch, size), oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Versions(BTreeMap<u64, Vec<(u64, u64)>>);

impl Versions {
    /// From `S3Store::list(CHUNKS_DIR)`'s (key, size) pairs; other keys are ignored.
    #[must_use]
    pub fn from_listing(keys: &[(String, u64)]) -> Self {
        let mut m: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
        for (k, size) in keys {
            if let Some((i, e)) = parse_chunk_key_at(k) {
                m.entry(i).or_default().push((e, *size));
            }
        }
        for v in m.values_mut() {
            v.sort_unstable();
        }
        Self(m)
    }

    /// The newest version of chunk `i` of an epoch up to `epoch`.
    #[must_use]
    pub fn at(&self, i: u64, epoch: u64) -> Option<(u64, u64)> {
        self.0
            .get(&i)?
            .iter()
            .rev()
            .find(|&&(e, _)| e <= epoch)
            .copied()
    }

    /// Every index with at least one object, and its versions.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[(u64, u64)])> {
        self.0.iter().map(|(&i, v)| (i, v.as_slice()))
    }

    /// Number of objects.
    #[must_use]
    pub fn objects(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }
}

/// Where a chunk's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Zeroes: no object, or a tombstone.
    Zero,
    /// The object of `layer` (0: the volume itself, then its parents
    /// nearest first) written in `epoch`.
    Object {
        /// Index into the layers.
        layer: u16,
        /// Its epoch.
        epoch: u64,
    },
}

/// One layer of a view: a volume's objects, and the newest epoch it sees
/// (`None`: none of this volume's objects, only its parents').
#[derive(Debug, Clone, Copy)]
pub struct Layer<'a> {
    /// The volume's objects.
    pub versions: &'a Versions,
    /// The newest epoch seen.
    pub epoch: Option<u64>,
}

/// What chunk `i` reads as through `layers` (the volume first).
#[must_use]
pub fn resolve(layers: &[Layer<'_>], i: u64) -> Source {
    for (n, l) in layers.iter().enumerate() {
        let Some(view) = l.epoch else { continue };
        if let Some((epoch, size)) = l.versions.at(i, view) {
            if size == TOMBSTONE_LEN {
                return Source::Zero;
            }
            return Source::Object {
                layer: u16::try_from(n).unwrap_or(u16::MAX),
                epoch,
            };
        }
    }
    Source::Zero
}

/// Every index some layer has an object for (each once, in order).
#[must_use]
pub fn indices(layers: &[Layer<'_>]) -> Vec<u64> {
    let mut all: Vec<u64> = layers
        .iter()
        .flat_map(|l| l.versions.0.keys().copied())
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::targets::s3::layout::chunk_key_at;

    fn versions(objs: &[(u64, u64, u64)]) -> Versions {
        let keys: Vec<(String, u64)> = objs
            .iter()
            .map(|&(i, e, size)| (chunk_key_at(i, e), size))
            .chain([("chunks/junk".to_owned(), 9)])
            .collect();
        Versions::from_listing(&keys)
    }

    #[test]
    fn newest_at_or_below_the_view() {
        let v = versions(&[(1, 0, 100), (1, 3, 100), (1, 5, TOMBSTONE_LEN), (2, 4, 100)]);
        assert_eq!(v.objects(), 4);
        assert_eq!(v.at(1, 0), Some((0, 100)));
        assert_eq!(v.at(1, 2), Some((0, 100)));
        assert_eq!(v.at(1, 4), Some((3, 100)));
        assert_eq!(v.at(1, 9), Some((5, TOMBSTONE_LEN)));
        assert_eq!(v.at(2, 3), None);
        assert_eq!(v.at(7, 9), None);
        let own = |e| {
            [Layer {
                versions: &v,
                epoch: e,
            }]
        };
        assert_eq!(
            resolve(&own(Some(4)), 1),
            Source::Object { layer: 0, epoch: 3 }
        );
        // The tombstone of epoch 5 hides epoch 3.
        assert_eq!(resolve(&own(Some(5)), 1), Source::Zero);
        assert_eq!(resolve(&own(Some(3)), 2), Source::Zero);
        assert_eq!(resolve(&own(None), 1), Source::Zero);
    }

    #[test]
    fn clones_read_their_parents() {
        let golden = versions(&[(0, 0, 100), (1, 0, 100), (1, 2, 100), (2, 1, 100)]);
        let clone = versions(&[(1, 0, 100), (2, 0, TOMBSTONE_LEN)]);
        let layers = [
            Layer {
                versions: &clone,
                epoch: Some(0),
            },
            Layer {
                versions: &golden,
                epoch: Some(1),
            },
        ];
        assert_eq!(resolve(&layers, 0), Source::Object { layer: 1, epoch: 0 });
        assert_eq!(resolve(&layers, 1), Source::Object { layer: 0, epoch: 0 });
        // The clone's tombstone hides the parent's chunk 2.
        assert_eq!(resolve(&layers, 2), Source::Zero);
        assert_eq!(resolve(&layers, 3), Source::Zero);
        // The parent's epoch 2 came after the snapshot: not seen.
        let only_parent = [
            Layer {
                versions: &clone,
                epoch: None,
            },
            Layer {
                versions: &golden,
                epoch: Some(1),
            },
        ];
        assert_eq!(
            resolve(&only_parent, 1),
            Source::Object { layer: 1, epoch: 0 }
        );
        assert_eq!(indices(&layers), [0, 1, 2]);
    }
}
