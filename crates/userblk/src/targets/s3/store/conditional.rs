//! The conditional operations the lease and its probe use: reads that
//! return the object's ETag, an overwrite only if the ETag still matches
//! (`If-Match`), and the same conditional write sent by several clients at
//! once (the probe of `lease/probe.rs`).

use bytes::Bytes;
use futures_util::future::join_all;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use super::{S3Store, StoreError};

impl S3Store {
    /// Fetches an object and its ETag (as the server sent it, quotes
    /// included); `None` if it does not exist.
    ///
    /// # Errors
    /// See [`StoreError`].
    pub fn get_with_etag(&self, key: &str) -> Result<Option<(Bytes, String)>, StoreError> {
        let path = self.object_path(key)?;
        let s3 = &self.s3;
        let r = self.run(async move {
            let res = s3.get(&path).await?;
            let etag = res.meta.e_tag.clone().unwrap_or_default();
            Ok::<_, object_store::Error>((res.bytes().await?, etag))
        })?;
        match r {
            Ok(x) => Ok(Some(x)),
            Err(e) => match self.classify("get", key, e) {
                StoreError::Other {
                    status: Some(404), ..
                } => Ok(None),
                other => Err(other),
            },
        }
    }

    /// Replaces an object only if its ETag is still `etag` (sent as given:
    /// `If-Match: etag`). `Some(new ETag)` when stored, `None` when the
    /// server refused (412: the object changed or is gone).
    ///
    /// # Errors
    /// See [`StoreError`].
    pub fn put_if_match(
        &self,
        key: &str,
        bytes: Bytes,
        etag: &str,
    ) -> Result<Option<String>, StoreError> {
        let path = self.object_path(key)?;
        let s3 = &self.s3;
        let mode = if_match(etag);
        let r = self.run(async move {
            s3.put_opts(&path, PutPayload::from(bytes), mode.into())
                .await
        })?;
        match r {
            Ok(res) => Ok(Some(res.e_tag.unwrap_or_default())),
            Err(object_store::Error::Precondition { .. }) => Ok(None),
            Err(e) => Err(self.classify("put_if_match", key, e)),
        }
    }

    /// Sends `n` conditional creates (`If-None-Match: *`) of `key` at once,
    /// each with its own body, and counts those the server accepted.
    ///
    /// # Errors
    /// An answer other than success or "precondition failed".
    pub fn race_creates(&self, key: &str, n: usize) -> Result<usize, StoreError> {
        self.race(key, n, &PutMode::Create, "create")
    }

    /// Sends `n` overwrites of `key` with `If-Match: etag` at once and
    /// counts those the server accepted.
    ///
    /// # Errors
    /// As [`S3Store::race_creates`].
    pub fn race_if_match(&self, key: &str, etag: &str, n: usize) -> Result<usize, StoreError> {
        self.race(key, n, &if_match(etag), "overwrite")
    }

    /// The racers' bodies differ from each other and from those of a race
    /// of another `kind`: an ETag is the body's MD5, and a body seen
    /// before would bring back an ETag an `If-Match` racer may still hold
    /// (one retried after a 500, say), which would then match again.
    fn race(&self, key: &str, n: usize, mode: &PutMode, kind: &str) -> Result<usize, StoreError> {
        let path = self.object_path(key)?;
        let s3 = &self.race;
        let results = self.run(async move {
            // Polled together: each request goes out on its own connection
            // as soon as it is made, none waits for another's answer.
            join_all((0..n).map(|i| {
                let (path, opts) = (path.clone(), PutOptions::from(mode.clone()));
                let body = PutPayload::from(format!("{kind} racer {i}").into_bytes());
                async move { s3.put_opts(&path, body, opts).await }
            }))
            .await
        })?;
        let mut won = 0;
        for r in results {
            match r {
                Ok(_) => won += 1,
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => {}
                Err(e) => return Err(self.classify("race", key, e)),
            }
        }
        Ok(won)
    }
}

fn if_match(etag: &str) -> PutMode {
    PutMode::Update(UpdateVersion {
        e_tag: Some(etag.to_owned()),
        version: None,
    })
}
