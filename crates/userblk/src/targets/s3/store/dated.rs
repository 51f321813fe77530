//! Reads that also return when the object was last written (the server's
//! `Last-Modified`), for gc: a manifest written moments ago may belong to
//! a snapshot whose record is not written yet.

use bytes::Bytes;
use object_store::ObjectStoreExt;

use super::{S3Store, StoreError};

impl S3Store {
    /// Fetches an object and when it was last written (seconds since the
    /// Unix epoch, server time; `None` if before 1970); `None` if the
    /// object does not exist.
    ///
    /// # Errors
    /// See [`StoreError`].
    pub fn get_dated(&self, key: &str) -> Result<Option<(Bytes, Option<u64>)>, StoreError> {
        let path = self.object_path(key)?;
        let s3 = &self.s3;
        let r = self.run(async move {
            let res = s3.get(&path).await?;
            let written = u64::try_from(res.meta.last_modified.timestamp()).ok();
            Ok::<_, object_store::Error>((res.bytes().await?, written))
        })?;
        self.not_found_is_none("get", key, r)
    }
}
