//! `gc`: deletes the chunk objects of a bucket that no volume head, no
//! snapshot and no clone reads, and the snapshot records deleted longer
//! ago than the grace period. [`plan`] decides; this file reads the bucket
//! in the order that makes the decision safe against volumes served
//! meanwhile, and deletes.
//!
//! The order: (a) one listing of the whole bucket finds the volume
//! prefixes; (b) every manifest is read, with when it was written; (c)
//! then, for each prefix in scope, its snapshot records and its chunk
//! objects are listed afresh. Records listed after the manifest include
//! every snapshot of an epoch below the head read, except one being taken
//! right now, which the plan covers with the manifest's time. Manifests
//! are read bucket-wide, whatever the scope: a clone elsewhere may read a
//! volume in scope.

pub mod plan;
#[cfg(test)]
mod plan_tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use self::plan::{bucket_key, Bucket, Counts, MissingParent, Rules, Volume};
use super::layout::{
    parse_snapshot_key, unix_now, Manifest, SnapshotRecord, CHUNKS_DIR, MANIFEST_KEY, SNAPSHOTS_DIR,
};
use super::view::Versions;
use super::{S3Error, S3Store, StoreError};

/// Default grace period: how long a deleted snapshot record still counts
/// (a clone may be being made from it) and how long after a manifest write
/// the epoch before its head counts as a snapshot being taken.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

/// Deletes in flight at once.
const DELETE_WORKERS: usize = 8;

/// How `gc` runs.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Only report what would be deleted.
    pub dry_run: bool,
    /// See [`DEFAULT_GRACE`]. Zero is for quiet buckets only (tests): a
    /// snapshot taken during gc could then lose the chunks of its epoch.
    pub grace: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            grace: DEFAULT_GRACE,
        }
    }
}

/// What `gc` did (or, in a dry run, would do). Keys are relative to the
/// bucket's root.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Nothing was deleted.
    pub dry_run: bool,
    /// What was looked at (in scope).
    pub counts: Counts,
    /// The chunk objects deleted, in key order.
    pub deleted: Vec<String>,
    /// Their bytes.
    pub deleted_bytes: u64,
    /// The snapshot records removed (deleted longer ago than the grace).
    pub removed_records: Vec<String>,
    /// Clones whose parent volume is gone; its objects are kept.
    pub missing_parents: Vec<MissingParent>,
    /// Prefixes that had no manifest when read but had one again just
    /// before their objects were to be deleted: left alone.
    pub spared: Vec<String>,
}

/// Collects the garbage of the volumes under `under` (`""`: the whole
/// bucket). `root` is a store at the bucket's root (keys are relative to
/// its prefix).
///
/// # Errors
/// Any failure to list or read, and any manifest or snapshot record that
/// does not decode ([`S3Error::BadObject`], naming the key), stop gc before
/// it deletes anything; a failed delete stops it where it was (what was
/// deleted was garbage: run it again).
pub fn collect(root: &S3Store, under: &str, opts: &GcOptions) -> Result<GcReport, S3Error> {
    let rules = Rules {
        now_unix: unix_now(),
        grace_secs: opts.grace.as_secs(),
        under: under.trim_matches('/').to_owned(),
    };
    let bucket = read(root, &|p| rules.in_scope(p))?;
    let plan = plan::plan(&bucket, &rules);
    for m in &plan.missing_parents {
        tracing::warn!("gc: {m}");
    }
    let mut report = GcReport {
        dry_run: opts.dry_run,
        counts: plan.counts,
        missing_parents: plan.missing_parents,
        ..GcReport::default()
    };
    let mut garbage = plan.garbage;
    if !opts.dry_run {
        report.spared = spare_revived(root, &bucket, &mut garbage)?;
    }
    report.deleted_bytes = garbage.iter().map(|(_, s)| s).sum();
    report.deleted = garbage.into_iter().map(|(k, _)| k).collect();
    report.removed_records = plan.records_to_remove;
    if !opts.dry_run {
        delete_all(root, &report.deleted)?;
        delete_all(root, &report.removed_records)?;
    }
    Ok(report)
}

/// Bytes each snapshot of volume `prefix` alone holds (what gc would free
/// if it were deleted), by name.
///
/// # Errors
/// As [`collect`]'s reading.
pub fn exclusive_bytes(
    root: &S3Store,
    prefix: &str,
    grace: Duration,
) -> Result<BTreeMap<String, u64>, S3Error> {
    let prefix = prefix.trim_matches('/');
    let rules = Rules {
        now_unix: unix_now(),
        grace_secs: grace.as_secs(),
        under: prefix.to_owned(),
    };
    let bucket = read(root, &|p| p == prefix)?;
    let names = bucket.get(prefix).map(|v| v.snapshots.keys());
    Ok(names
        .into_iter()
        .flatten()
        .map(|n| (n.clone(), plan::exclusive_bytes(&bucket, &rules, prefix, n)))
        .collect())
}

/// Reads what the plan needs: every manifest of the bucket, and the
/// records and chunk listings of the prefixes `wanted` says (see the
/// module's note for the order).
fn read(root: &S3Store, wanted: &dyn Fn(&str) -> bool) -> Result<Bucket, S3Error> {
    let mut prefixes = BTreeSet::new();
    for (key, _) in root.list("")? {
        if let Some(p) = plan::volume_of(&key) {
            if wanted(p) || key == bucket_key(p, MANIFEST_KEY) {
                prefixes.insert(p.to_owned());
            }
        }
    }
    let mut bucket = Bucket::new();
    for p in prefixes {
        let key = bucket_key(&p, MANIFEST_KEY);
        let mut vol = Volume::default();
        if let Some((bytes, written)) = root.get_dated(&key)? {
            vol.manifest = Some(decode(&key, &bytes, Manifest::decode)?);
            vol.manifest_written_unix = written;
        }
        bucket.insert(p, vol);
    }
    for (p, vol) in bucket.iter_mut().filter(|(p, _)| wanted(p)) {
        let store = root.at_prefix(&bucket_key(root.prefix(), p))?;
        for (key, _) in store.list(SNAPSHOTS_DIR)? {
            let Some(name) = parse_snapshot_key(&key) else {
                continue;
            };
            // Gone since the listing: removed by another gc.
            let Some(bytes) = store.get(&key)? else {
                continue;
            };
            let rec = decode(&bucket_key(p, &key), &bytes, SnapshotRecord::decode)?;
            vol.snapshots.insert(name.to_owned(), rec);
        }
        vol.versions = Versions::from_listing(&store.list(CHUNKS_DIR)?);
    }
    Ok(bucket)
}

fn decode<T>(
    key: &str,
    bytes: &[u8],
    f: impl Fn(&[u8]) -> Result<T, super::LayoutError>,
) -> Result<T, S3Error> {
    f(bytes).map_err(|source| S3Error::BadObject {
        key: key.to_owned(),
        source,
    })
}

/// Drops from `garbage` the objects of prefixes that had no manifest when
/// read but have one now (a volume created over leftover objects): its
/// writer may have overwritten them. Returns those prefixes.
fn spare_revived(
    root: &S3Store,
    bucket: &Bucket,
    garbage: &mut Vec<(String, u64)>,
) -> Result<Vec<String>, S3Error> {
    let mut spared = Vec::new();
    for (p, _) in bucket.iter().filter(|(_, v)| v.manifest.is_none()) {
        let dir = bucket_key(p, CHUNKS_DIR);
        let ours = |k: &str| {
            k.strip_prefix(dir.as_str())
                .is_some_and(|r| r.starts_with('/'))
        };
        if garbage.iter().any(|(k, _)| ours(k)) && root.get(&bucket_key(p, MANIFEST_KEY))?.is_some()
        {
            tracing::warn!("gc: volume {p:?} has a manifest again: its objects are left alone");
            garbage.retain(|(k, _)| !ours(k));
            spared.push(p.clone());
        }
    }
    Ok(spared)
}

/// Deletes `keys` with a few requests in flight; stops at the first error.
fn delete_all(root: &S3Store, keys: &[String]) -> Result<(), StoreError> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..DELETE_WORKERS.min(keys.len()) {
            s.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let Some(key) = keys.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    if let Err(e) = root.delete(key) {
                        failed.store(true, Ordering::Relaxed);
                        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
                        slot.get_or_insert(e);
                    }
                }
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
