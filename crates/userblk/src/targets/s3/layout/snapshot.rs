//! Snapshot records: `{prefix}/snapshots/{NAME}.json`, one per snapshot of
//! a volume, naming the epoch it froze. Pure code, no I/O.

use serde::{Deserialize, Serialize};

use super::{LayoutError, VolumeId, SNAPSHOTS_DIR};

/// Longest snapshot name.
pub const MAX_SNAPSHOT_NAME: usize = 128;

/// A snapshot: the volume as it was at the end of epoch `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Its name, unique in the volume.
    pub name: String,
    /// The volume it is of.
    pub volume_id: VolumeId,
    /// The frozen epoch: the snapshot reads each chunk's newest object of
    /// an epoch up to this one.
    pub epoch: u64,
    /// The device size then.
    pub device_size: u64,
    /// When it was taken, seconds since the Unix epoch.
    pub created_unix: u64,
    /// When `snapshot delete` removed it. The record stays for gc's grace
    /// period, so a clone being made from it meanwhile is still seen by gc.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_unix: Option<u64>,
}

impl SnapshotRecord {
    /// Serialized form (pretty JSON).
    ///
    /// # Errors
    /// Never in practice; serde_json's error is passed on.
    pub fn encode(&self) -> Result<Vec<u8>, LayoutError> {
        let mut v = serde_json::to_vec_pretty(self)
            .map_err(|e| LayoutError::SnapshotMalformed(e.to_string()))?;
        v.push(b'\n');
        Ok(v)
    }

    /// Parses a record.
    ///
    /// # Errors
    /// [`LayoutError::SnapshotMalformed`].
    pub fn decode(bytes: &[u8]) -> Result<Self, LayoutError> {
        let r: Self = serde_json::from_slice(bytes)
            .map_err(|e| LayoutError::SnapshotMalformed(e.to_string()))?;
        check_snapshot_name(&r.name)?;
        Ok(r)
    }
}

/// Whether `name` can name a snapshot: 1 to 128 of `A-Z a-z 0-9 . _ -`,
/// not starting with `.` or `-` (it becomes part of an object key and of
/// `s3://B/P@NAME`).
///
/// # Errors
/// [`LayoutError::BadSnapshotName`].
pub fn check_snapshot_name(name: &str) -> Result<(), LayoutError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SNAPSHOT_NAME
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(LayoutError::BadSnapshotName(name.to_owned()))
    }
}

/// Key of snapshot `name`'s record, relative to the volume prefix.
#[must_use]
pub fn snapshot_key(name: &str) -> String {
    format!("{SNAPSHOTS_DIR}/{name}.json")
}

/// The snapshot name of a key made by [`snapshot_key`]; `None` for anything else.
#[must_use]
pub fn parse_snapshot_key(key: &str) -> Option<&str> {
    let name = key
        .strip_prefix(SNAPSHOTS_DIR)?
        .strip_prefix('/')?
        .strip_suffix(".json")?;
    check_snapshot_name(name).ok().map(|()| name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "base", "v1.2", "2026-12-07_daily", &"x".repeat(128)] {
            assert!(check_snapshot_name(good).is_ok(), "{good}");
            assert_eq!(parse_snapshot_key(&snapshot_key(good)), Some(good));
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "a b",
            "a@b",
            "é",
            &"x".repeat(129),
        ] {
            assert_eq!(
                check_snapshot_name(bad),
                Err(LayoutError::BadSnapshotName(bad.to_owned()))
            );
        }
        assert_eq!(parse_snapshot_key("snapshots/a.txt"), None);
        assert_eq!(parse_snapshot_key("chunks/a.json"), None);
    }

    #[test]
    fn record_roundtrip() {
        let mut r = SnapshotRecord {
            name: "base".into(),
            volume_id: VolumeId([3; 16]),
            epoch: 4,
            device_size: 1 << 30,
            created_unix: 5,
            deleted_unix: None,
        };
        let text = String::from_utf8(r.encode().unwrap()).unwrap();
        assert!(!text.contains("deleted"));
        assert_eq!(SnapshotRecord::decode(text.as_bytes()).unwrap(), r);
        r.deleted_unix = Some(6);
        assert_eq!(SnapshotRecord::decode(&r.encode().unwrap()).unwrap(), r);
        r.name = "a/b".into();
        assert!(SnapshotRecord::decode(&r.encode().unwrap()).is_err());
        assert!(matches!(
            SnapshotRecord::decode(b"{}"),
            Err(LayoutError::SnapshotMalformed(_))
        ));
    }
}
