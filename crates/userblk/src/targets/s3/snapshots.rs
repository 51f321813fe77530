//! Snapshots and clones of s3 volumes, seen from outside a daemon: read,
//! list and delete snapshot records, and make a clone. Taking a snapshot
//! is the serving target's job ([`super::S3Target::snapshot`]): only the
//! lease's holder may move the head epoch.
//!
//! A clone is one manifest: its own volume id, epoch 0, and its parents
//! (the snapshot's volume and epoch, then that volume's own parents). No
//! chunk is copied, so it takes the same time whatever the volume's size.

use bytes::Bytes;

use super::layout::{
    check_snapshot_name, parse_snapshot_key, snapshot_key, unix_now, Manifest, ParentRef,
    SnapshotRecord, VolumeId, MANIFEST_KEY, MAX_PARENTS, SNAPSHOTS_DIR,
};
use super::{S3Error, S3Store};

/// The manifest of the volume at `store`'s prefix.
///
/// # Errors
/// [`S3Error::NoVolume`] when there is none; the manifest's and the bucket's errors.
pub fn manifest(store: &S3Store) -> Result<Manifest, S3Error> {
    match store.get(MANIFEST_KEY)? {
        Some(b) => Ok(Manifest::decode(&b)?),
        None => Err(S3Error::NoVolume {
            bucket: store.bucket().to_owned(),
            prefix: store.prefix().to_owned(),
        }),
    }
}

/// Snapshot `name` of volume `m` at `store`, unless it is missing or deleted.
///
/// # Errors
/// [`S3Error::NoSnapshot`], a bad name or record, the bucket's errors.
pub fn record(store: &S3Store, m: &Manifest, name: &str) -> Result<SnapshotRecord, S3Error> {
    check_snapshot_name(name)?;
    let none = || S3Error::NoSnapshot {
        name: name.to_owned(),
        bucket: store.bucket().to_owned(),
        prefix: store.prefix().to_owned(),
    };
    let r = SnapshotRecord::decode(&store.get(&snapshot_key(name))?.ok_or_else(none)?)?;
    if r.deleted_unix.is_some() || r.volume_id != m.volume_id {
        return Err(none());
    }
    Ok(r)
}

/// The volume's snapshots (deleted ones left out), oldest first.
///
/// # Errors
/// [`S3Error::NoVolume`], a bad record, the bucket's errors.
pub fn list(store: &S3Store) -> Result<Vec<SnapshotRecord>, S3Error> {
    let m = manifest(store)?;
    let mut out = Vec::new();
    for (key, _) in store.list(SNAPSHOTS_DIR)? {
        if parse_snapshot_key(&key).is_none() {
            continue;
        }
        // Gone between the listing and the read: deleted meanwhile.
        let Some(b) = store.get(&key)? else { continue };
        let r = SnapshotRecord::decode(&b)?;
        if r.deleted_unix.is_none() && r.volume_id == m.volume_id {
            out.push(r);
        }
    }
    out.sort_by_key(|r| (r.epoch, r.created_unix));
    Ok(out)
}

/// Delete snapshot `name`: its record is marked deleted now, and `gc`
/// frees its data (and the record) once its grace period has passed.
///
/// # Errors
/// [`S3Error::NoSnapshot`], the bucket's errors.
pub fn delete(store: &S3Store, name: &str) -> Result<SnapshotRecord, S3Error> {
    let m = manifest(store)?;
    let mut r = record(store, &m, name)?;
    r.deleted_unix = Some(unix_now());
    store.put(&snapshot_key(name), Bytes::from(r.encode()?))?;
    Ok(r)
}

/// Make `dst` (a prefix of the same bucket with no volume) a clone of
/// snapshot `name` of the volume at `src`; its manifest.
///
/// # Errors
/// No such volume or snapshot, a volume at `dst` already, another bucket,
/// too many ancestors, the bucket's errors.
pub fn clone_volume(src: &S3Store, name: &str, dst: &S3Store) -> Result<Manifest, S3Error> {
    if src.bucket() != dst.bucket() || src.endpoint() != dst.endpoint() {
        return Err(S3Error::Invalid(
            "a clone is made in its parent's bucket: no data is copied".into(),
        ));
    }
    if src.prefix() == dst.prefix() {
        return Err(S3Error::Invalid(
            "the clone needs a prefix of its own".into(),
        ));
    }
    let m = manifest(src)?;
    let r = record(src, &m, name)?;
    if m.parents.len() >= MAX_PARENTS {
        return Err(S3Error::Invalid(format!(
            "the volume has {} ancestors already: a clone of it may have at most {MAX_PARENTS}",
            m.parents.len()
        )));
    }
    let mut parents = vec![ParentRef {
        prefix: src.prefix().to_owned(),
        volume_id: m.volume_id,
        epoch: r.epoch,
        snapshot: name.to_owned(),
    }];
    parents.extend(m.parents.iter().cloned());
    let volume = VolumeId::random().map_err(|e| S3Error::Invalid(format!("random id: {e}")))?;
    let geometry = super::Geometry::new(r.device_size, m.chunk_size)?;
    let mut clone = Manifest::new(geometry, volume, unix_now());
    clone.parents = parents;
    if !dst.put_if_absent(MANIFEST_KEY, Bytes::from(clone.encode()?))? {
        return Err(S3Error::Invalid(format!(
            "bucket {:?} prefix {:?} holds a volume already",
            dst.bucket(),
            dst.prefix()
        )));
    }
    Ok(clone)
}
