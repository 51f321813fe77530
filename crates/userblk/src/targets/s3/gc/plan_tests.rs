//! The gc plan: views, tombstones, clones of clones, missing parents,
//! deleted records in and out of grace, snapshots in progress, exclusive
//! bytes, scope; and against a brute-force reachability on random buckets.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::plan::{
    bucket_key, exclusive_bytes, plan, volume_of, Bucket, ParentProblem, Rules, Volume,
};
use crate::targets::s3::layout::{
    chunk_key_at, snapshot_key, Geometry, Manifest, ParentRef, SnapshotRecord, VolumeId,
    TOMBSTONE_LEN,
};
use crate::targets::s3::view::Versions;

const NOW: u64 = 1_000_000;
const GRACE: u64 = 3600;
/// Long before the grace period.
const OLD: u64 = NOW - 10 * GRACE;

fn rules(under: &str) -> Rules {
    Rules {
        now_unix: NOW,
        grace_secs: GRACE,
        under: under.into(),
    }
}

fn id(n: u8) -> VolumeId {
    VolumeId([n; 16])
}

/// A volume `n` with head epoch `head`, written long ago, and objects
/// (index, epoch, size).
fn volume(n: u8, head: u64, objs: &[(u64, u64, u64)]) -> Volume {
    let mut m = Manifest::new(Geometry::new(1 << 30, 1 << 20).unwrap(), id(n), 1);
    m.epoch = head;
    let keys: Vec<(String, u64)> = objs
        .iter()
        .map(|&(i, e, s)| (chunk_key_at(i, e), s))
        .collect();
    Volume {
        manifest: Some(m),
        manifest_written_unix: Some(OLD),
        versions: Versions::from_listing(&keys),
        snapshots: Default::default(),
    }
}

fn with_snapshot(mut v: Volume, name: &str, epoch: u64, deleted: Option<u64>) -> Volume {
    let volume_id = v.manifest.as_ref().map_or(id(0), |m| m.volume_id);
    v.snapshots.insert(
        name.into(),
        SnapshotRecord {
            name: name.into(),
            volume_id,
            epoch,
            device_size: 1 << 30,
            created_unix: 1,
            deleted_unix: deleted,
        },
    );
    v
}

fn clone_of(mut v: Volume, parents: &[(&str, u8, u64)]) -> Volume {
    if let Some(m) = v.manifest.as_mut() {
        m.parents = parents
            .iter()
            .map(|&(prefix, n, epoch)| ParentRef {
                prefix: prefix.into(),
                volume_id: id(n),
                epoch,
                snapshot: "s".into(),
            })
            .collect();
    }
    v
}

fn key(prefix: &str, i: u64, e: u64) -> String {
    bucket_key(prefix, &chunk_key_at(i, e))
}

fn garbage_keys(b: &Bucket, under: &str) -> Vec<String> {
    plan(b, &rules(under))
        .garbage
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

#[test]
fn the_head_keeps_each_chunks_newest_object_only() {
    let b = Bucket::from([(
        "v".into(),
        volume(
            1,
            3,
            &[(0, 0, 100), (0, 1, 100), (0, 3, 100), (1, 2, 50), (2, 0, 7)],
        ),
    )]);
    let p = plan(&b, &rules(""));
    assert_eq!(
        p.garbage,
        [(key("v", 0, 0), 100), (key("v", 0, 1), 100)],
        "(0,3) hides 0 and 1; chunks 1 and 2 have one object each"
    );
    assert_eq!(p.counts.objects, 5);
    assert_eq!(p.counts.bytes, 357);
    assert_eq!(p.counts.volumes, 1);
    assert_eq!(p.counts.views, 1);
    assert!(p.records_to_remove.is_empty() && p.missing_parents.is_empty());
}

#[test]
fn objects_newer_than_the_head_read_are_never_garbage_nor_hide_anything() {
    // A snapshot moved the head to 3 after gc read epoch 2: (0,3) is a
    // writer's, and (0,2) is what the snapshot of epoch 2 reads.
    let b = Bucket::from([(
        "v".into(),
        volume(1, 2, &[(0, 1, 100), (0, 2, 100), (0, 3, 100), (1, 4, 100)]),
    )]);
    assert_eq!(garbage_keys(&b, ""), [key("v", 0, 1)]);
}

#[test]
fn a_snapshot_keeps_the_object_it_reads() {
    let v = volume(
        1,
        4,
        &[(0, 0, 10), (0, 2, 10), (0, 4, 10), (1, 1, 10), (1, 3, 10)],
    );
    // Snapshot at 1: reads (0,0) and (1,1); (0,2) is hidden by (0,4) and
    // no view in [2, 4) but the snapshot at 3.
    let v = with_snapshot(with_snapshot(v, "one", 1, None), "three", 3, None);
    let b = Bucket::from([("v".into(), v)]);
    let p = plan(&b, &rules(""));
    assert_eq!(p.garbage, []);
    assert_eq!(p.counts.snapshots, 2);
    assert_eq!(p.counts.views, 3);
    // Without the snapshot at 3, (0,2) goes; (1,1) is still read at 1.
    let v = with_snapshot(
        volume(
            1,
            4,
            &[(0, 0, 10), (0, 2, 10), (0, 4, 10), (1, 1, 10), (1, 3, 10)],
        ),
        "one",
        1,
        None,
    );
    let v = with_snapshot(v, "three", 3, Some(OLD));
    let b = Bucket::from([("v".into(), v)]);
    let p = plan(&b, &rules(""));
    assert_eq!(p.garbage, [(key("v", 0, 2), 10)]);
    assert_eq!(
        p.records_to_remove,
        [bucket_key("v", &snapshot_key("three"))]
    );
}

#[test]
fn tombstones_are_objects_like_any_other() {
    let t = TOMBSTONE_LEN;
    let b = Bucket::from([(
        "v".into(),
        volume(
            1,
            2,
            &[(0, 0, 100), (0, 1, t), (0, 2, 100), (1, 0, 100), (1, 2, t)],
        ),
    )]);
    // The newest tombstone stays (it hides a parent's chunk, or older
    // epochs a snapshot might name); the superseded one goes.
    assert_eq!(
        garbage_keys(&b, ""),
        [key("v", 0, 0), key("v", 0, 1), key("v", 1, 0)]
    );
    let v = with_snapshot(
        volume(1, 2, &[(0, 0, 100), (0, 1, t), (0, 2, 100)]),
        "s",
        1,
        None,
    );
    // At 1 the chunk reads as the tombstone: it stays, (0,0) goes.
    assert_eq!(
        garbage_keys(&Bucket::from([("v".into(), v)]), ""),
        [key("v", 0, 0)]
    );
}

#[test]
fn deleted_records_count_within_the_grace_period_and_go_after_it() {
    let objs = [(0, 0, 10), (0, 1, 10)];
    let at = |deleted| {
        let b = Bucket::from([(
            "v".into(),
            with_snapshot(volume(1, 1, &objs), "s", 0, deleted),
        )]);
        plan(&b, &rules(""))
    };
    for kept in [None, Some(NOW - GRACE + 1), Some(NOW), Some(NOW + 50)] {
        let p = at(kept);
        assert_eq!(p.garbage, [], "{kept:?}");
        assert_eq!(p.records_to_remove, Vec::<String>::new(), "{kept:?}");
        assert_eq!(p.counts.snapshots, 1);
    }
    for gone in [Some(NOW - GRACE), Some(OLD), Some(0)] {
        let p = at(gone);
        assert_eq!(p.garbage, [(key("v", 0, 0), 10)], "{gone:?}");
        assert_eq!(p.records_to_remove, ["v/snapshots/s.json"], "{gone:?}");
        assert_eq!(p.counts.snapshots, 0);
    }
    // Grace 0: any deleted record goes, at once.
    let b = Bucket::from([(
        "v".into(),
        with_snapshot(volume(1, 1, &objs), "s", 0, Some(NOW)),
    )]);
    let p = plan(
        &b,
        &Rules {
            grace_secs: 0,
            ..rules("")
        },
    );
    assert_eq!(p.records_to_remove, ["v/snapshots/s.json"]);
}

#[test]
fn a_snapshot_in_progress_keeps_the_epoch_it_froze() {
    // Head 2, no record of epoch 1 yet: the snapshot of 1 may be between
    // its manifest write and its record write.
    let objs = [(0, 0, 10), (0, 1, 10), (0, 2, 10)];
    let at = |written: Option<u64>, record: Option<Option<u64>>| {
        let mut v = volume(1, 2, &objs);
        v.manifest_written_unix = written;
        if let Some(deleted) = record {
            v = with_snapshot(v, "s", 1, deleted);
        }
        garbage_keys(&Bucket::from([("v".into(), v)]), "")
    };
    let only_0 = [key("v", 0, 0)];
    assert_eq!(at(Some(NOW - 5), None), only_0);
    assert_eq!(at(None, None), only_0, "unknown time: assume recent");
    assert_eq!(at(Some(NOW + 100), None), only_0, "server clock ahead");
    // Long ago: a snapshot that failed between its two writes.
    assert_eq!(at(Some(OLD), None), [key("v", 0, 0), key("v", 0, 1)]);
    // The record exists: it decides, whatever the manifest's time.
    assert_eq!(
        at(Some(NOW), Some(Some(OLD))),
        [key("v", 0, 0), key("v", 0, 1)]
    );
    assert_eq!(at(Some(NOW), Some(None)), only_0);
    // Head 0: nothing was ever frozen.
    let mut v = volume(1, 0, &[(0, 0, 10)]);
    v.manifest_written_unix = None;
    assert!(garbage_keys(&Bucket::from([("v".into(), v)]), "").is_empty());
}

#[test]
fn clones_and_clones_of_clones_keep_what_they_read() {
    // golden: snapshot "base" of epoch 1 is deleted long ago, yet clone c
    // reads golden at 1. c has moved on to 2; d is a clone of c at 0.
    let golden = with_snapshot(
        volume(1, 3, &[(0, 0, 10), (0, 1, 10), (0, 2, 10), (0, 3, 10)]),
        "base",
        1,
        Some(OLD),
    );
    let c = clone_of(
        volume(
            2,
            2,
            &[(0, 0, 20), (0, 2, 20), (1, 0, 20), (1, 1, 20), (1, 2, 20)],
        ),
        &[("golden", 1, 1)],
    );
    let d = clone_of(volume(3, 0, &[]), &[("c", 2, 0), ("golden", 1, 1)]);
    let b = Bucket::from([("golden".into(), golden), ("c".into(), c), ("d".into(), d)]);
    let p = plan(&b, &rules(""));
    assert_eq!(
        p.garbage,
        [
            // [1, 2) has no view of golden's: (0,2) is hidden by (0,3).
            (key("c", 1, 1), 20),
            (key("golden", 0, 0), 10),
            (key("golden", 0, 2), 10),
        ],
        "c's (0,0) and (1,0) are d's; golden's (0,1) is c's and d's"
    );
    assert_eq!(p.records_to_remove, ["golden/snapshots/base.json"]);
    assert!(p.missing_parents.is_empty());
    assert_eq!(p.counts.views, 2 + 2 + 1);
}

#[test]
fn a_parent_without_manifest_keeps_everything_and_is_reported() {
    let mut gone = volume(1, 2, &[(0, 0, 10), (0, 1, 10), (0, 2, 10)]);
    gone.manifest = None;
    let mut orphan = volume(4, 0, &[(5, 0, 30), (5, 7, 30)]);
    orphan.manifest = None;
    let c = clone_of(volume(2, 0, &[]), &[("gone", 1, 1)]);
    let b = Bucket::from([
        ("gone".into(), gone),
        ("c".into(), c),
        ("orphan".into(), orphan),
    ]);
    let p = plan(&b, &rules(""));
    // The orphan's objects go, all of them; the parent's stay.
    assert_eq!(
        p.garbage,
        [(key("orphan", 5, 0), 30), (key("orphan", 5, 7), 30)]
    );
    assert_eq!(p.missing_parents.len(), 1);
    let m = &p.missing_parents[0];
    assert_eq!((m.parent.as_str(), m.clone.as_str()), ("gone", "c"));
    assert_eq!(m.problem, ParentProblem::NoManifest);
    assert!(m.to_string().contains("parent volume \"gone\""), "{m}");
    assert_eq!(p.counts.volumes, 1);
    // Out of scope on both sides: not reported.
    assert!(plan(&b, &rules("orphan")).missing_parents.is_empty());
    assert_eq!(plan(&b, &rules("c")).missing_parents.len(), 1);
}

#[test]
fn a_parent_prefix_holding_another_volume_is_reported() {
    let c = clone_of(volume(2, 0, &[]), &[("p", 9, 0)]);
    let b = Bucket::from([
        ("p".into(), volume(1, 1, &[(0, 0, 10), (0, 1, 10)])),
        ("c".into(), c),
    ]);
    let p = plan(&b, &rules(""));
    assert_eq!(p.missing_parents.len(), 1);
    assert_eq!(p.missing_parents[0].problem, ParentProblem::OtherVolume);
    // Its epoch is still kept as a view of the prefix: (0,0) stays.
    assert_eq!(p.garbage, []);
}

#[test]
fn exclusive_bytes_is_what_one_snapshot_alone_holds() {
    // s1 at 1 alone reads (0,1) and (1,1); s2 at 2 reads (0,2) and (1,1);
    // the head (4) reads (0,4) and (1,1).
    let v = volume(
        1,
        4,
        &[
            (0, 0, 1),
            (0, 1, 10),
            (0, 2, 100),
            (0, 4, 1000),
            (1, 1, 10_000),
        ],
    );
    let v = with_snapshot(with_snapshot(v, "s1", 1, None), "s2", 2, None);
    let v = with_snapshot(v, "old", 0, Some(OLD));
    let b = Bucket::from([("v".into(), v), ("w".into(), volume(2, 0, &[(0, 0, 5)]))]);
    let r = rules("");
    assert_eq!(exclusive_bytes(&b, &r, "v", "s1"), 10);
    assert_eq!(exclusive_bytes(&b, &r, "v", "s2"), 100);
    assert_eq!(exclusive_bytes(&b, &r, "v", "old"), 0, "already not a view");
    assert_eq!(exclusive_bytes(&b, &r, "v", "nope"), 0);
    assert_eq!(exclusive_bytes(&b, &r, "w", "s1"), 0);
    // A clone made from s1 reads epoch 1 through its parents: deleting s1
    // frees nothing.
    let mut b = b;
    b.insert("c".into(), clone_of(volume(3, 0, &[]), &[("v", 1, 1)]));
    assert_eq!(exclusive_bytes(&b, &r, "v", "s1"), 0);
    assert_eq!(exclusive_bytes(&b, &r, "v", "s2"), 100);
}

#[test]
fn under_limits_what_is_deleted_to_whole_components() {
    let objs = [(0, 0, 10), (0, 1, 10)];
    let rec = |v| with_snapshot(v, "s", 0, Some(OLD));
    let b = Bucket::from([
        ("a".into(), rec(volume(1, 1, &objs))),
        ("a/x".into(), rec(volume(2, 1, &objs))),
        ("ab".into(), rec(volume(3, 1, &objs))),
        (String::new(), rec(volume(4, 1, &objs))),
    ]);
    assert_eq!(garbage_keys(&b, "a"), [key("a", 0, 0), key("a/x", 0, 0)]);
    assert_eq!(garbage_keys(&b, "/a/x/"), [key("a/x", 0, 0)]);
    assert_eq!(garbage_keys(&b, "ab"), [key("ab", 0, 0)]);
    assert_eq!(garbage_keys(&b, "b"), Vec::<String>::new());
    let all = plan(&b, &rules(""));
    assert_eq!(all.garbage.len(), 4);
    assert!(all
        .garbage
        .iter()
        .any(|(k, _)| k == "chunks/0000000000000000"));
    assert_eq!(
        all.records_to_remove,
        [
            "a/snapshots/s.json",
            "a/x/snapshots/s.json",
            "ab/snapshots/s.json",
            "snapshots/s.json"
        ]
    );
    assert_eq!(
        plan(&b, &rules("a/x")).records_to_remove,
        ["a/x/snapshots/s.json"]
    );
}

#[test]
fn keys_name_their_volume() {
    assert_eq!(volume_of("manifest.json"), Some(""));
    assert_eq!(volume_of("a/b/manifest.json"), Some("a/b"));
    assert_eq!(volume_of("chunks/0000000000000000"), Some(""));
    assert_eq!(volume_of("a/chunks/junk"), Some("a"));
    assert_eq!(volume_of("a/b/snapshots/s.json"), Some("a/b"));
    for other in [
        "a/lease.json",
        "lease.json",
        "a/.lease-probe-1",
        "a/chunks/x/y",
        "x",
    ] {
        assert_eq!(volume_of(other), None, "{other}");
    }
}

/// Every object some view reads (or hides a parent's with), by brute
/// force: the object each view resolves to, per index.
fn reachable(b: &Bucket, r: &Rules) -> BTreeSet<String> {
    let mut views: Vec<(String, u64)> = Vec::new();
    for (p, v) in b {
        let Some(m) = &v.manifest else { continue };
        views.push((p.clone(), m.epoch));
        for rec in v.snapshots.values() {
            if rec
                .deleted_unix
                .is_none_or(|d| r.now_unix - d < r.grace_secs)
            {
                views.push((p.clone(), rec.epoch));
            }
        }
        for parent in &m.parents {
            views.push((parent.prefix.clone(), parent.epoch));
        }
    }
    let mut out = BTreeSet::new();
    for (p, epoch) in views {
        let Some(v) = b.get(&p) else { continue };
        for (i, _) in v.versions.iter() {
            if let Some((e, _)) = v.versions.at(i, epoch) {
                out.insert(key(&p, i, e));
            }
        }
    }
    out
}

/// A quiet bucket: a golden volume, clones of its snapshots (some of
/// clones), objects at epochs up to each head, records some deleted.
fn quiet_bucket() -> impl Strategy<Value = Bucket> {
    let vol = (
        1u64..5,
        prop::collection::vec((0u64..6, 0u64..5, prop::bool::weighted(0.2)), 0..24),
        prop::collection::vec((0u64..5, prop::option::of(0u64..3)), 0..4),
        prop::option::of(0usize..4),
    );
    prop::collection::vec(vol, 1..5).prop_map(|vols| {
        let mut b = Bucket::new();
        for (n, (head, objs, recs, parent)) in vols.into_iter().enumerate() {
            // One object per key, as in a listing.
            let objs: std::collections::BTreeMap<(u64, u64), u64> = objs
                .into_iter()
                .map(|(i, e, t)| ((i, e.min(head)), if t { TOMBSTONE_LEN } else { 100 + i }))
                .collect();
            let objs: Vec<(u64, u64, u64)> =
                objs.into_iter().map(|((i, e), s)| (i, e, s)).collect();
            let n8 = u8::try_from(n).unwrap();
            let mut v = volume(n8, head, &objs);
            for (k, (e, deleted)) in recs.into_iter().enumerate() {
                let deleted = deleted.map(|d| [NOW, OLD, NOW - GRACE][usize::try_from(d).unwrap()]);
                // Records of epochs below the head, as snapshots make them.
                v = with_snapshot(v, &format!("s{k}"), e.min(head - 1), deleted);
            }
            // A clone of an earlier volume at one of its epochs, and of
            // that one's parents.
            if let Some(pn) = parent.filter(|&pn| pn < n) {
                let pm = b[&format!("v{pn}")].manifest.clone().unwrap();
                let mut parents = vec![(format!("v{pn}"), pm.volume_id, pm.epoch / 2)];
                parents.extend(
                    pm.parents
                        .iter()
                        .map(|r| (r.prefix.clone(), r.volume_id, r.epoch)),
                );
                if let Some(m) = v.manifest.as_mut() {
                    m.parents = parents
                        .into_iter()
                        .map(|(prefix, volume_id, epoch)| ParentRef {
                            prefix,
                            volume_id,
                            epoch,
                            snapshot: "s".into(),
                        })
                        .collect();
                }
            }
            b.insert(format!("v{n}"), v);
        }
        b
    })
}

proptest! {
    #[test]
    fn on_a_quiet_bucket_garbage_is_exactly_what_no_view_reads(b in quiet_bucket()) {
        let r = rules("");
        let p = plan(&b, &r);
        let live = reachable(&b, &r);
        let mut all = BTreeSet::new();
        for (pfx, v) in &b {
            for (i, vs) in v.versions.iter() {
                for &(e, _) in vs {
                    all.insert(key(pfx, i, e));
                }
            }
        }
        let garbage: BTreeSet<String> = p.garbage.iter().map(|(k, _)| k.clone()).collect();
        let expected: BTreeSet<String> = all.difference(&live).cloned().collect();
        prop_assert_eq!(garbage, expected);
    }
}
