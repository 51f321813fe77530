//! gc of an s3 bucket against a real S3 server (s3s-fs on loopback, as in
//! s3_store.rs; skipped without it). The volumes are written object by
//! object from a model of the test's own (manifests, chunk objects and
//! tombstones at epochs, snapshot records, clones of snapshots and of
//! clones); what gc deletes must equal what the model says no view reads,
//! computed here by brute force, independently of gc's rule.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)] // the nbdkit half is for the conformance suite
#[path = "common/servers.rs"]
mod servers;
mod skip;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use servers::S3sFs as Server;
use userblk::targets::s3::gc::{self, GcOptions};
use userblk::targets::s3::layout::{
    chunk_key_at, encode_tombstone, snapshot_key, ParentRef, SnapshotRecord,
};
use userblk::targets::s3::{
    encode_chunk, Geometry, Manifest, S3Error, S3Store, VolumeId, LEASE_KEY, MANIFEST_KEY,
};

const BUCKET: &str = "vol";
const GRACE: Duration = Duration::from_secs(3600);

macro_rules! server_or_skip {
    () => {
        match Server::start(BUCKET) {
            Some(s) => s,
            None => return,
        }
    };
}

/// One volume as the test means it.
#[derive(Default, Clone)]
struct Vol {
    /// `None`: no manifest (a deleted volume's leftovers).
    head: Option<u64>,
    id: u8,
    /// (index, epoch) -> tombstone?
    objects: BTreeMap<(u64, u64), bool>,
    /// name -> (epoch, deleted long ago?)
    records: BTreeMap<String, (u64, bool)>,
    /// (prefix, epoch), nearest first.
    parents: Vec<(String, u64)>,
}

type Model = BTreeMap<String, Vol>;

fn id(n: u8) -> VolumeId {
    VolumeId([n; 16])
}

fn key(prefix: &str, k: &str) -> String {
    if prefix.is_empty() {
        k.to_owned()
    } else {
        format!("{prefix}/{k}")
    }
}

/// Writes the model into the bucket (plus a lease and a stray key each,
/// which gc must leave alone).
fn write(root: &S3Store, model: &Model) {
    for (p, v) in model {
        for (&(i, e), &tomb) in &v.objects {
            let obj = if tomb {
                encode_tombstone(id(v.id), i).unwrap()
            } else {
                encode_chunk(id(v.id), i, &[v.id, 1 + u8::try_from(e).unwrap()]).unwrap()
            };
            root.put(&key(p, &chunk_key_at(i, e)), Bytes::from(obj))
                .unwrap();
        }
        for (name, &(epoch, deleted)) in &v.records {
            let r = SnapshotRecord {
                name: name.clone(),
                volume_id: id(v.id),
                epoch,
                device_size: 64 << 20,
                created_unix: 1,
                deleted_unix: deleted.then_some(1),
            };
            root.put(
                &key(p, &snapshot_key(name)),
                Bytes::from(r.encode().unwrap()),
            )
            .unwrap();
        }
        root.put(&key(p, "notes.txt"), Bytes::from_static(b"mine"))
            .unwrap();
        let Some(head) = v.head else { continue };
        let mut m = Manifest::new(Geometry::new(64 << 20, 1 << 20).unwrap(), id(v.id), 1);
        m.epoch = head;
        m.parents = v
            .parents
            .iter()
            .map(|(pp, e)| ParentRef {
                prefix: pp.clone(),
                volume_id: id(model[pp].id),
                epoch: *e,
                snapshot: "s".into(),
            })
            .collect();
        root.put(&key(p, MANIFEST_KEY), Bytes::from(m.encode().unwrap()))
            .unwrap();
        root.put(&key(p, LEASE_KEY), Bytes::from_static(b"{}"))
            .unwrap();
    }
}

/// The objects no view of the model reads, by brute force: every view
/// (head, live records, every clone's parents) resolves every index to
/// its newest object at or below the view's epoch; what is never chosen
/// is unreferenced. A prefix without manifest that no clone names is all
/// unreferenced. `without`: a (prefix, record) taken as deleted.
fn unreferenced(model: &Model, without: Option<(&str, &str)>) -> BTreeMap<String, u64> {
    let mut views: BTreeSet<(String, u64)> = BTreeSet::new();
    for (p, v) in model {
        let Some(head) = v.head else { continue };
        views.insert((p.clone(), head));
        for (name, &(e, deleted)) in &v.records {
            if !deleted && without != Some((p.as_str(), name.as_str())) {
                views.insert((p.clone(), e));
            }
        }
        views.extend(v.parents.iter().cloned());
    }
    let mut read = BTreeSet::new();
    for (p, at) in &views {
        let Some(v) = model.get(p) else { continue };
        if v.head.is_none() {
            // A parent gone: everything of it stays.
            read.extend(v.objects.keys().map(|&(i, e)| (p.clone(), i, e)));
            continue;
        }
        let indices: BTreeSet<u64> = v.objects.keys().map(|&(i, _)| i).collect();
        for i in indices {
            if let Some((&(_, e), _)) = v.objects.range((i, 0)..=(i, *at)).next_back() {
                read.insert((p.clone(), i, e));
            }
        }
    }
    let mut out = BTreeMap::new();
    for (p, v) in model {
        for (&(i, e), &tomb) in &v.objects {
            if !read.contains(&(p.clone(), i, e)) {
                out.insert(key(p, &chunk_key_at(i, e)), size(tomb));
            }
        }
    }
    out
}

fn size(tomb: bool) -> u64 {
    if tomb {
        40
    } else {
        42
    }
}

/// A tiny deterministic generator, so the bucket is the same every run.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// The bucket: a golden volume with 5 snapshots (one deleted long
/// ago, so its data goes unless a clone reads it), 20 clones of its
/// snapshots (every fourth a clone of an earlier clone), each written a
/// little over 0 to 2 epochs, and a deleted volume's leftovers.
fn fleet() -> Model {
    let mut rng = Lcg(23);
    let mut m = Model::new();
    let mut golden = Vol {
        head: Some(6),
        id: 1,
        ..Vol::default()
    };
    for i in 0..12 {
        for e in 0..=6 {
            if rng.below(3) == 0 || e == 0 {
                golden.objects.insert((i, e), rng.below(8) == 0);
            }
        }
    }
    for (n, e) in [1u64, 2, 3, 4, 5].into_iter().enumerate() {
        // "s1" (epoch 2) deleted long ago; the others live.
        golden.records.insert(format!("s{n}"), (e, n == 1));
    }
    m.insert("golden".into(), golden);
    for c in 0..20u8 {
        let name = format!("clones/c{c:02}");
        let parents = if c % 4 == 3 {
            // Of the previous clone at its epoch 0, and its parents.
            let prev = &m[&format!("clones/c{:02}", c - 1)];
            let mut p = vec![(format!("clones/c{:02}", c - 1), 0)];
            p.extend(prev.parents.iter().cloned());
            p
        } else {
            // Of golden at one of its snapshots s0, s1, s3 (s1 included:
            // the clone was made before that snapshot was deleted).
            vec![("golden".into(), [1u64, 2, 4][usize::from(c % 3)])]
        };
        let head = rng.below(3);
        let mut v = Vol {
            head: Some(head),
            id: 10 + c,
            parents,
            ..Vol::default()
        };
        for i in 0..12 {
            for e in 0..=head {
                if rng.below(4) == 0 {
                    v.objects.insert((i, e), rng.below(6) == 0);
                }
            }
        }
        if head > 0 {
            // The snapshot every epoch bump comes with.
            v.records
                .insert("auto".into(), (head - 1, rng.below(2) == 0));
        }
        m.insert(name, v);
    }
    let mut gone = Vol {
        head: None,
        id: 99,
        ..Vol::default()
    };
    gone.objects.insert((0, 0), false);
    gone.objects.insert((3, 2), false);
    gone.records.insert("old".into(), (1, false));
    m.insert("deleted-volume".into(), gone);
    m
}

fn listing(root: &S3Store) -> BTreeMap<String, u64> {
    root.list("").unwrap().into_iter().collect()
}

fn removed_records(model: &Model) -> Vec<String> {
    let mut out: Vec<String> = model
        .iter()
        .flat_map(|(p, v)| {
            v.records
                .iter()
                .filter(|(_, &(_, deleted))| deleted)
                .map(|(n, _)| key(p, &snapshot_key(n)))
        })
        .collect();
    out.sort();
    out
}

/// gc (not a dry run) under `under`, with a grace of an hour.
fn run(root: &S3Store, under: &str) -> Result<gc::GcReport, S3Error> {
    gc::collect(
        root,
        under,
        &GcOptions {
            dry_run: false,
            grace: GRACE,
        },
    )
}

fn root(server: &Server) -> S3Store {
    S3Store::new(&servers::s3_config(&server.endpoint(), BUCKET, "")).unwrap()
}

/// The fleet written into the server's bucket: a store at its root, the
/// model and the bucket's listing.
fn fleet_in(server: &Server) -> (S3Store, Model, BTreeMap<String, u64>) {
    let root = root(server);
    let model = fleet();
    write(&root, &model);
    let before = listing(&root);
    (root, model, before)
}

#[test]
fn gc_of_20_clones_and_5_snapshots_removes_exactly_the_unreferenced_objects() {
    let server = server_or_skip!();
    let (root, model, before) = fleet_in(&server);
    let expected = unreferenced(&model, None);
    assert!(
        expected.len() >= 10,
        "the fleet has garbage: {}",
        expected.len()
    );
    let opts = GcOptions {
        dry_run: true,
        grace: GRACE,
    };

    let dry = gc::collect(&root, "", &opts).unwrap();
    assert_eq!(listing(&root), before, "a dry run deletes nothing");
    assert!(dry.dry_run);
    assert_eq!(dry.deleted, expected.keys().cloned().collect::<Vec<_>>());
    assert_eq!(dry.deleted_bytes, expected.values().sum::<u64>());
    assert_eq!(dry.removed_records, removed_records(&model));
    assert!(dry.missing_parents.is_empty());
    assert_eq!(dry.counts.volumes, 21);
    let objects: usize = model.values().map(|v| v.objects.len()).sum();
    assert_eq!(dry.counts.objects, u64::try_from(objects).unwrap());

    let real = run(&root, "").unwrap();
    assert_eq!(
        (&real.deleted, &real.removed_records),
        (&dry.deleted, &dry.removed_records)
    );
    let mut left = before.clone();
    for k in real.deleted.iter().chain(&real.removed_records) {
        left.remove(k).unwrap();
    }
    assert_eq!(listing(&root), left, "exactly those keys went");
    println!(
        "gc: {} objects, {} unreferenced, {} removed",
        objects,
        expected.len(),
        real.deleted.len()
    );

    let again = run(&root, "").unwrap();
    assert!(again.deleted.is_empty() && again.removed_records.is_empty());
    assert_eq!(listing(&root), left, "a second run deletes nothing");
}

#[test]
fn under_limits_gc_to_one_volume_and_exclusive_bytes_match_the_model() {
    let server = server_or_skip!();
    let (root, model, before) = fleet_in(&server);
    let in_c03 = |k: &String| k.starts_with("clones/c03/");
    let r = run(&root, "clones/c03").unwrap();
    let expected: Vec<String> = unreferenced(&model, None)
        .into_keys()
        .filter(in_c03)
        .collect();
    assert_eq!(r.deleted, expected);
    assert!(!expected.is_empty());
    assert_eq!(r.counts.volumes, 1);
    let after = listing(&root);
    let gone: BTreeSet<&String> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    assert!(gone.iter().all(|k| in_c03(k)), "{gone:?}");

    let ex = gc::exclusive_bytes(&root, "golden", GRACE).unwrap();
    assert_eq!(ex.len(), 5);
    let base = unreferenced(&model, None);
    for name in ["s0", "s2", "s3", "s4"] {
        let without = unreferenced(&model, Some(("golden", name)));
        let want: u64 = without
            .iter()
            .filter(|(k, _)| !base.contains_key(*k))
            .map(|(_, s)| s)
            .sum();
        assert_eq!(ex[name], want, "{name}");
    }
    assert_eq!(ex["s1"], 0, "deleted long ago: already not a view");
    assert!(ex["s2"] + ex["s4"] > 0, "{ex:?}");
    assert_eq!(
        ex["s0"] + ex["s1"] + ex["s3"],
        0,
        "clones read them: {ex:?}"
    );
}

#[test]
fn a_corrupt_manifest_stops_gc_before_it_deletes_anything() {
    let server = server_or_skip!();
    let root = root(&server);
    write(&root, &fleet());
    root.put(
        "clones/c07/manifest.json",
        Bytes::from_static(b"{\"format_version\": 2"),
    )
    .unwrap();
    let before = listing(&root);
    let e = run(&root, "").unwrap_err();
    assert!(
        matches!(&e, S3Error::BadObject { key, .. } if key == "clones/c07/manifest.json"),
        "{e}"
    );
    assert!(e.to_string().contains("clones/c07/manifest.json"), "{e}");
    // A corrupt record of a volume in scope, too.
    root.put(
        "clones/c07/manifest.json",
        Bytes::from(
            Manifest::new(Geometry::new(1 << 20, 1 << 20).unwrap(), id(17), 1)
                .encode()
                .unwrap(),
        ),
    )
    .unwrap();
    root.put("golden/snapshots/bad.json", Bytes::from_static(b"[]"))
        .unwrap();
    let e = run(&root, "golden").unwrap_err();
    assert!(e.to_string().contains("golden/snapshots/bad.json"), "{e}");
    let mut now = listing(&root);
    now.remove("golden/snapshots/bad.json");
    now.insert(
        "clones/c07/manifest.json".into(),
        before["clones/c07/manifest.json"],
    );
    assert_eq!(
        now.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
}

#[test]
fn a_fresh_head_keeps_the_epoch_below_it_until_its_record_or_the_grace_period() {
    let server = server_or_skip!();
    let root = root(&server);
    // Head 1 just written, no record of epoch 0 (yet): a snapshot in
    // progress, as far as gc can tell.
    let mut v = Vol {
        head: Some(1),
        id: 5,
        ..Vol::default()
    };
    v.objects.insert((0, 0), false);
    v.objects.insert((0, 1), false);
    write(&root, &Model::from([("v".to_owned(), v)]));
    let old = key("v", &chunk_key_at(0, 0));
    let r = run(&root, "").unwrap();
    assert!(r.deleted.is_empty(), "{:?}", r.deleted);
    assert!(listing(&root).contains_key(&old));
    // The server's clock is this host's: a zero grace takes the manifest
    // as old, so the epoch is garbage.
    let r = gc::collect(
        &root,
        "",
        &GcOptions {
            dry_run: false,
            grace: Duration::ZERO,
        },
    )
    .unwrap();
    assert_eq!(r.deleted, std::slice::from_ref(&old));
    assert!(!listing(&root).contains_key(&old));
}

#[test]
fn a_clone_whose_parent_was_deleted_keeps_the_parents_objects_and_is_reported() {
    let server = server_or_skip!();
    let root = root(&server);
    // The parent's manifest is gone (deleted without gc); the clone still
    // reads its epoch 1. A volume nobody names lost its manifest too.
    let mut parent = Vol {
        id: 7,
        ..Vol::default()
    };
    let mut leftover = Vol {
        id: 8,
        ..Vol::default()
    };
    for e in 0..3 {
        parent.objects.insert((0, e), false);
        leftover.objects.insert((0, e), false);
    }
    let clone = Vol {
        head: Some(0),
        id: 9,
        parents: vec![("base".into(), 1)],
        ..Vol::default()
    };
    let model = Model::from([
        ("base".to_owned(), parent),
        ("leftover".to_owned(), leftover),
        ("clone".to_owned(), clone),
    ]);
    write(&root, &model);
    let r = run(&root, "").unwrap();
    let expected: Vec<String> = unreferenced(&model, None).into_keys().collect();
    assert_eq!(expected.len(), 3, "{expected:?}");
    assert_eq!(r.deleted, expected, "the leftovers only");
    assert!(listing(&root).contains_key("base/chunks/0000000000000000"));
    assert_eq!(r.missing_parents.len(), 1);
    let m = &r.missing_parents[0];
    assert_eq!((m.parent.as_str(), m.clone.as_str()), ("base", "clone"));
    assert!(m.to_string().contains("has no manifest"), "{m}");
}
