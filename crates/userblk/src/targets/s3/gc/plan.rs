//! What gc deletes, decided from what it read: the bucket's manifests,
//! the snapshot records and chunk listings of the volumes in scope, the
//! time and the grace period. Pure code, no I/O.
//!
//! A view is a (volume, epoch) someone may read: the head, each snapshot
//! record (a deleted one too, for the grace period), each epoch a clone
//! names in its `parents`, and the epoch a snapshot is being taken of
//! right now. Object (i, e) of volume P is garbage iff P has a newer
//! object (i, e2) with e2 <= P's head epoch and no view of P has an epoch
//! in [e, e2): every view below e reads older objects, every view at or
//! above e2 reads (i, e2) or newer. docs/targets/s3.md "Garbage
//! collection" argues why that is safe against live writers, snapshots and
//! clones.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use crate::targets::s3::layout::{
    chunk_key_at, snapshot_key, Manifest, SnapshotRecord, VolumeId, CHUNKS_DIR, MANIFEST_KEY,
    SNAPSHOTS_DIR,
};
use crate::targets::s3::view::Versions;

/// What gc read of one volume prefix.
#[derive(Debug, Clone, Default)]
pub struct Volume {
    /// Its manifest; `None` if there is none (a deleted volume, or a
    /// prefix that only has leftover objects).
    pub manifest: Option<Manifest>,
    /// When the manifest read was written (server time, seconds since the
    /// Unix epoch); `None` if unknown.
    pub manifest_written_unix: Option<u64>,
    /// Its chunk objects (empty for volumes out of scope: not listed).
    pub versions: Versions,
    /// Its snapshot records by the name in their key (empty out of scope).
    pub snapshots: BTreeMap<String, SnapshotRecord>,
}

/// Every volume prefix gc knows of (`""`: a volume at the bucket's root).
pub type Bucket = BTreeMap<String, Volume>;

/// What the plan depends on besides the bucket.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Now, seconds since the Unix epoch.
    pub now_unix: u64,
    /// Seconds a deleted snapshot record stays a view, and a manifest
    /// write may still be a snapshot in progress.
    pub grace_secs: u64,
    /// Only objects and records under this prefix are deleted (`""`: the
    /// whole bucket). Whole path components: `a` holds `a/x`, not `ab`.
    pub under: String,
}

impl Rules {
    /// Whether volume `prefix` is in scope.
    #[must_use]
    pub fn in_scope(&self, prefix: &str) -> bool {
        let under = self.under.trim_matches('/');
        under.is_empty()
            || prefix == under
            || prefix
                .strip_prefix(under)
                .is_some_and(|rest| rest.starts_with('/'))
    }

    /// Whether something that happened at `when_unix` is older than the grace
    /// period (a time in the future is not).
    fn past_grace(&self, when_unix: u64) -> bool {
        when_unix <= self.now_unix && self.now_unix - when_unix >= self.grace_secs
    }
}

/// Why a clone's parent is not there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParentProblem {
    /// No manifest at the parent's prefix.
    NoManifest,
    /// The prefix holds another volume now.
    OtherVolume,
}

/// A clone whose parent volume is gone: gc keeps every object of that
/// prefix, and says so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MissingParent {
    /// The parent's prefix.
    pub parent: String,
    /// The parent's volume id, as the clone names it.
    pub volume_id: VolumeId,
    /// The clone that names it.
    pub clone: String,
    /// What is wrong.
    pub problem: ParentProblem,
}

impl fmt::Display for MissingParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.problem {
            ParentProblem::NoManifest => "has no manifest",
            ParentProblem::OtherVolume => "holds another volume now",
        };
        write!(
            f,
            "parent volume {:?} (id {}) of clone {:?} {what}: its objects are kept, \
             and the clone cannot read the chunks it shares with it",
            self.parent, self.volume_id, self.clone
        )
    }
}

/// What the plan looked at (volumes and objects in scope).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Volumes with a manifest.
    pub volumes: u64,
    /// Snapshot records that are views (not deleted, or within grace).
    pub snapshots: u64,
    /// Distinct (volume, epoch) views.
    pub views: u64,
    /// Chunk objects.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// What gc deletes. Keys are relative to the bucket's root.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Chunk objects no view reads, with their sizes, in key order.
    pub garbage: Vec<(String, u64)>,
    /// Snapshot records deleted longer ago than the grace period.
    pub records_to_remove: Vec<String>,
    /// Clones whose parent is gone.
    pub missing_parents: Vec<MissingParent>,
    /// What was looked at.
    pub counts: Counts,
}

impl Plan {
    /// Bytes of the garbage.
    #[must_use]
    pub fn garbage_bytes(&self) -> u64 {
        self.garbage.iter().map(|(_, s)| s).sum()
    }
}

/// `key` of volume `prefix`, relative to the bucket's root.
#[must_use]
pub fn bucket_key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}/{key}")
    }
}

/// The volume prefix of a bucket key, if the key is one gc reads: a
/// manifest, a chunk object or a snapshot record (anything else: `None`).
#[must_use]
pub fn volume_of(key: &str) -> Option<&str> {
    let (dir, name) = match key.rsplit_once('/') {
        Some((dir, name)) => (dir, name),
        None => ("", key),
    };
    if name == MANIFEST_KEY {
        return Some(dir);
    }
    let (prefix, last) = match dir.rsplit_once('/') {
        Some((p, last)) => (p, last),
        None => ("", dir),
    };
    match last {
        CHUNKS_DIR | SNAPSHOTS_DIR => Some(prefix),
        _ => None,
    }
}

/// The plan for `bucket` under `rules`.
#[must_use]
pub fn plan(bucket: &Bucket, rules: &Rules) -> Plan {
    plan_without(bucket, rules, None)
}

/// Bytes that would become garbage if snapshot `name` of volume `prefix`
/// were gone (what it alone holds): the plan without it minus the plan.
/// 0 for an unknown snapshot, or one a clone still reads through its
/// `parents`.
#[must_use]
pub fn exclusive_bytes(bucket: &Bucket, rules: &Rules, prefix: &str, name: &str) -> u64 {
    let rules = Rules {
        under: prefix.to_owned(),
        ..rules.clone()
    };
    let with = plan_without(bucket, &rules, None).garbage_bytes();
    let without = plan_without(bucket, &rules, Some((prefix, name))).garbage_bytes();
    without.saturating_sub(with)
}

/// The plan, as if snapshot record `ignore` (prefix, name) were deleted
/// long ago.
fn plan_without(bucket: &Bucket, rules: &Rules, ignore: Option<(&str, &str)>) -> Plan {
    let mut out = Plan::default();
    let parent_views = parent_views(bucket, rules, &mut out.missing_parents);
    for (prefix, vol) in bucket.iter().filter(|(p, _)| rules.in_scope(p)) {
        let mut views = BTreeSet::new();
        for (name, rec) in &vol.snapshots {
            let ignored = ignore == Some((prefix.as_str(), name.as_str()));
            match rec.deleted_unix {
                Some(d) if rules.past_grace(d) => out
                    .records_to_remove
                    .push(bucket_key(prefix, &snapshot_key(name))),
                _ if ignored => {}
                _ => {
                    views.insert(rec.epoch);
                    out.counts.snapshots += 1;
                }
            }
        }
        let named = parent_views.get(prefix.as_str());
        views.extend(named.into_iter().flatten());
        out.counts.objects += u64::try_from(vol.versions.objects()).unwrap_or(u64::MAX);
        out.counts.bytes += vol
            .versions
            .iter()
            .flat_map(|(_, v)| v)
            .map(|(_, s)| s)
            .sum::<u64>();
        let Some(m) = &vol.manifest else {
            // No manifest: nothing reads these objects, unless a clone
            // still names the prefix (reported; then everything stays).
            if named.is_none() {
                garbage_where(prefix, &vol.versions, &mut out.garbage, |_, _| true);
            }
            continue;
        };
        out.counts.volumes += 1;
        views.insert(m.epoch);
        if snapshot_in_progress(vol, m, rules) {
            views.insert(m.epoch - 1);
        }
        out.counts.views += u64::try_from(views.len()).unwrap_or(u64::MAX);
        garbage_where(prefix, &vol.versions, &mut out.garbage, |e, e2| {
            e2.is_some_and(|e2| e2 <= m.epoch && views.range(e..e2).next().is_none())
        });
    }
    out.garbage.sort();
    out.records_to_remove.sort();
    out
}

/// Whether a snapshot of epoch `H - 1` may be in progress: a snapshot
/// writes the manifest with epoch H first and its record after, so for a
/// moment the epoch it froze has no record. Recent manifest writes (or of
/// unknown time) keep that epoch as a view; an old one without a record is
/// a snapshot that failed between the two writes.
fn snapshot_in_progress(vol: &Volume, m: &Manifest, rules: &Rules) -> bool {
    let Some(frozen) = m.epoch.checked_sub(1) else {
        return false;
    };
    let recorded = vol.snapshots.values().any(|r| r.epoch == frozen);
    !recorded
        && !vol
            .manifest_written_unix
            .is_some_and(|t| rules.past_grace(t))
}

/// Pushes every object (i, e) of `versions` for which `is_garbage(e, the
/// next newer epoch of i)` holds.
fn garbage_where(
    prefix: &str,
    versions: &Versions,
    out: &mut Vec<(String, u64)>,
    is_garbage: impl Fn(u64, Option<u64>) -> bool,
) {
    for (i, v) in versions.iter() {
        for (n, &(e, size)) in v.iter().enumerate() {
            let next = v.get(n + 1).map(|&(e2, _)| e2);
            if is_garbage(e, next) {
                out.push((bucket_key(prefix, &chunk_key_at(i, e)), size));
            }
        }
    }
}

/// The epochs each prefix is read at by clones (every manifest's
/// `parents`), and the clones whose parent is gone (when the parent or the
/// clone is in scope).
fn parent_views<'a>(
    bucket: &'a Bucket,
    rules: &Rules,
    missing: &mut Vec<MissingParent>,
) -> BTreeMap<&'a str, BTreeSet<u64>> {
    let mut views: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for (clone, vol) in bucket {
        for p in vol.manifest.iter().flat_map(|m| &m.parents) {
            views.entry(&p.prefix).or_default().insert(p.epoch);
            let problem = match bucket.get(&p.prefix).and_then(|v| v.manifest.as_ref()) {
                None => ParentProblem::NoManifest,
                Some(m) if m.volume_id != p.volume_id => ParentProblem::OtherVolume,
                Some(_) => continue,
            };
            if rules.in_scope(&p.prefix) || rules.in_scope(clone) {
                missing.push(MissingParent {
                    parent: p.prefix.clone(),
                    volume_id: p.volume_id,
                    clone: clone.clone(),
                    problem,
                });
            }
        }
    }
    views
}
