//! Taking a snapshot of the volume a target serves: hold new writes,
//! upload everything dirty, move the manifest's head epoch on, record the
//! snapshot, let writes go.
//!
//! The order is what makes it crash-safe. The manifest's new epoch goes up
//! first: from then on nothing writes the old epoch's keys, so the objects
//! the snapshot reads never change. The record is written after; a crash
//! between leaves a moved epoch and no snapshot, which costs nothing (gc
//! frees what nothing sees). A version 1 manifest becomes version 2 in the
//! same write: that is the volume's one-time upgrade.

use bytes::Bytes;

use super::{lock, Core};
use crate::targets::s3::chunks::Below;
use crate::targets::s3::layout::{
    check_snapshot_name, snapshot_key, unix_now, Lease, SnapshotRecord, FORMAT_VERSION,
    MANIFEST_KEY,
};
use crate::targets::s3::{lease, S3Error};

impl Core {
    /// Snapshot `name` as the holder of lease `ours`. Writes wait meanwhile;
    /// reads go on.
    pub(super) fn snapshot(&self, ours: &Lease, name: &str) -> Result<SnapshotRecord, S3Error> {
        check_snapshot_name(name)?;
        if self.store.get(&snapshot_key(name))?.is_some() {
            return Err(S3Error::SnapshotExists(name.to_owned()));
        }
        {
            let mut st = lock(&self.state);
            if st.frozen {
                return Err(S3Error::Invalid(
                    "another snapshot of this volume is being taken".into(),
                ));
            }
            st.frozen = true;
        }
        let r = self.freeze_point(ours);
        {
            let mut st = lock(&self.state);
            st.frozen = false;
        }
        self.cv.notify_all();
        let (epoch, size) = r?;
        let record = SnapshotRecord {
            name: name.to_owned(),
            volume_id: self.volume,
            epoch,
            device_size: size,
            created_unix: unix_now(),
            deleted_unix: None,
        };
        self.store
            .put(&snapshot_key(name), Bytes::from(record.encode()?))
            .map_err(|e| {
                S3Error::Invalid(format!(
                    "the volume moved to epoch {} but the snapshot's record could not be \
                     written ({e}): no snapshot {name} was taken",
                    epoch + 1
                ))
            })?;
        tracing::info!(
            "s3: snapshot {name} of {}/{}: epoch {epoch}, {size} bytes",
            self.store.bucket(),
            self.store.prefix()
        );
        Ok(record)
    }

    /// With writes held: upload everything, then move the head epoch on.
    /// The epoch frozen and the device size then.
    fn freeze_point(&self, ours: &Lease) -> Result<(u64, u64), S3Error> {
        self.flush(None).map_err(|_| {
            S3Error::Invalid(
                "uploading the dirty chunks failed (see the daemon's log): no snapshot taken"
                    .into(),
            )
        })?;
        lease::check(&self.store, ours)?;
        let st = lock(&self.state);
        // Frozen since before the flush: nothing is dirty or uploading, so
        // no object of the old epoch is written after this.
        let busy = st.table.chunks.iter().any(|c| c.uploading || c.dirty());
        if busy {
            return Err(S3Error::Invalid(
                "chunks were still dirty after the flush: no snapshot taken".into(),
            ));
        }
        let old = st.epoch;
        // Frozen, and resizes wait for the snapshot: nothing dirties a chunk
        // until the table agrees with the manifest, so the lock can go
        // while the manifest is written (reads go on meanwhile).
        drop(st);
        let mut m = lock(&self.manifest).clone();
        m.format_version = FORMAT_VERSION;
        m.epoch = old + 1;
        self.store.put(MANIFEST_KEY, Bytes::from(m.encode()?))?;
        let size = m.device_size;
        *lock(&self.manifest) = m;
        let mut st = lock(&self.state);
        st.epoch = old + 1;
        st.table.next_epoch(old);
        // Stray objects past the end moved below too.
        for s in st.strays.values_mut() {
            if let Some(tomb) = s.head.take() {
                s.below = (!tomb).then_some(Below {
                    layer: 0,
                    epoch: old,
                });
            }
        }
        drop(st);
        Ok((old, size))
    }
}
