//! A small blocking S3 client over `object_store`'s `AmazonS3`.
//!
//! `object_store` is async; the store owns a private tokio runtime and
//! `block_on`s each call, so callers are plain threads (the target's I/O
//! workers). Calling it from inside another tokio runtime is refused with
//! [`StoreError::InsideRuntime`] rather than panicking.
//!
//! All keys are relative to the configured prefix. Errors are classified
//! into what a user can act on: endpoint unreachable, credentials rejected,
//! bucket missing, or other (see [`StoreError`]).

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutPayload, RetryConfig,
};

mod conditional;
mod dated;

/// Region used when none is configured (any region works for most
/// S3-compatible servers; AWS needs the bucket's real one).
pub const DEFAULT_REGION: &str = "us-east-1";

/// Errors of [`S3Store`]. Every variant names the operation and key or
/// endpoint it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The configuration is unusable (bad endpoint URL, bucket or prefix).
    #[error("invalid s3 configuration: {0}")]
    Config(String),
    /// No credentials in the environment or the credentials file.
    #[error(
        "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
         or add profile [{profile}] to {}",
        path.display()
    )]
    NoCredentials {
        /// Profile that was looked for.
        profile: String,
        /// Credentials file that was looked in.
        path: PathBuf,
    },
    /// The credentials file exists but could not be read.
    #[error("reading S3 credentials file {}: {source}", path.display())]
    CredentialsFile {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: io::Error,
    },
    /// The private runtime could not be started.
    #[error("starting the S3 client runtime: {0}")]
    Runtime(#[source] io::Error),
    /// Called from a thread that is already running an async runtime.
    #[error("the blocking S3 store was called from inside an async runtime")]
    InsideRuntime,
    /// A key that S3 (or `object_store`) cannot represent.
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The endpoint could not be reached: connection refused, DNS failure or
    /// timeout, after retries.
    #[error("S3 endpoint {endpoint} unreachable ({op} {key:?}): {detail}")]
    Unreachable {
        /// The endpoint URL.
        endpoint: String,
        /// Operation that failed.
        op: &'static str,
        /// Key (relative to the prefix) it was for.
        key: String,
        /// True when the request timed out rather than failed to connect.
        timed_out: bool,
        /// The underlying error chain.
        detail: String,
    },
    /// The server rejected the credentials (HTTP 401/403: invalid access
    /// key, signature mismatch, access denied, expired token).
    #[error("S3 credentials rejected by {endpoint} for bucket {bucket:?} ({op} {key:?}): HTTP {status}, {code}")]
    BadCredentials {
        /// The endpoint URL.
        endpoint: String,
        /// The bucket.
        bucket: String,
        /// Operation that failed.
        op: &'static str,
        /// Key (relative to the prefix) it was for.
        key: String,
        /// HTTP status (401 or 403).
        status: u16,
        /// S3 error code, e.g. `SignatureDoesNotMatch`, or "unknown".
        code: String,
    },
    /// The bucket does not exist.
    #[error("S3 bucket {bucket:?} does not exist at {endpoint}")]
    NoSuchBucket {
        /// The endpoint URL.
        endpoint: String,
        /// The bucket.
        bucket: String,
    },
    /// Anything else: server errors after retries, unexpected statuses.
    #[error("S3 {op} {key:?} failed{}: {source}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Other {
        /// Operation that failed.
        op: &'static str,
        /// Key (relative to the prefix) it was for.
        key: String,
        /// HTTP status, when the server answered.
        status: Option<u16>,
        /// The `object_store` error.
        source: object_store::Error,
    },
}

impl StoreError {
    /// The HTTP status the server answered with, if this error came from one.
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::BadCredentials { status, .. } => Some(*status),
            Self::Other { status, .. } => *status,
            _ => None,
        }
    }
}

/// Static S3 credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Session token, for temporary credentials.
    pub session_token: Option<String>,
}

impl fmt::Debug for Credentials {
    // The secret and token never reach logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Credentials {
    /// Credentials from the standard places, in the AWS CLI's order:
    /// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`,
    /// then the profile `AWS_PROFILE` (default `default`) of the credentials
    /// file `AWS_SHARED_CREDENTIALS_FILE` (default `~/.aws/credentials`).
    ///
    /// # Errors
    /// [`StoreError::NoCredentials`] or [`StoreError::CredentialsFile`].
    pub fn from_environment() -> Result<Self, StoreError> {
        Self::resolve(&|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// [`Credentials::from_environment`] with the environment given as a
    /// lookup function (for tests).
    ///
    /// # Errors
    /// As [`Credentials::from_environment`].
    pub fn resolve(env: &dyn Fn(&str) -> Option<String>) -> Result<Self, StoreError> {
        if let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            return Ok(Self {
                access_key_id: id,
                secret_access_key: secret,
                session_token: env("AWS_SESSION_TOKEN"),
            });
        }
        let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".to_owned());
        let path = env("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| FsPath::new(&h).join(".aws/credentials")))
            .unwrap_or_else(|| PathBuf::from(".aws/credentials"));
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NoCredentials { profile, path })
            }
            Err(source) => return Err(StoreError::CredentialsFile { path, source }),
        };
        parse_credentials_file(&text, &profile).ok_or(StoreError::NoCredentials { profile, path })
    }
}

/// Reads one profile's keys from an AWS credentials file (INI: `[profile]`
/// sections, `key = value` lines, `#`/`;` comments). `None` when the
/// profile is missing or lacks the key id or secret.
#[must_use]
pub fn parse_credentials_file(text: &str, profile: &str) -> Option<Credentials> {
    let mut in_section = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            // The config file spells sections `[profile x]`; accept both.
            let name = name.strip_prefix("profile ").map_or(name, str::trim);
            in_section = name == profile;
            continue;
        }
        if !in_section {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().to_owned();
        match k.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => id = Some(v),
            "aws_secret_access_key" => secret = Some(v),
            "aws_session_token" => token = Some(v),
            _ => {}
        }
    }
    Some(Credentials {
        access_key_id: id.filter(|s| !s.is_empty())?,
        secret_access_key: secret.filter(|s| !s.is_empty())?,
        session_token: token.filter(|s| !s.is_empty()),
    })
}

/// How transient failures are retried: 5xx, 429/503 SlowDown, 408,
/// connection failures, and timeouts of idempotent requests. Other 4xx are
/// permanent and never retried. Backoff is exponential (factor 2) with
/// random jitter, capped at `max_backoff`; retrying stops after
/// `max_retries` or once `budget` has passed since the first attempt.
///
/// Worst case for one call: about `budget + request_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0: never retry).
    pub max_retries: usize,
    /// First backoff.
    pub initial_backoff: Duration,
    /// Longest single backoff.
    pub max_backoff: Duration,
    /// No retry starts later than this after the first attempt.
    pub budget: Duration,
}

impl Default for RetryPolicy {
    /// Rides out a minute of throttling or a server restart: a block device
    /// that errors too early makes the filesystem above it go read-only.
    fn default() -> Self {
        Self {
            max_retries: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            budget: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    #[must_use]
    pub fn none() -> Self {
        Self {
            max_retries: 0,
            ..Self::default()
        }
    }

    /// The short policy of [`S3Store::check`]: a startup probe should
    /// report a dead endpoint in seconds, not ride it out.
    #[must_use]
    pub fn probe() -> Self {
        Self {
            max_retries: 2,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            budget: Duration::from_secs(2),
        }
    }

    /// The policy of the lease probe's racing writes: a server that lost
    /// the race for some of them may answer 500 (RADOS Gateway does), and
    /// those are retried soon, not after backoffs of seconds.
    #[must_use]
    pub fn race() -> Self {
        Self {
            max_retries: 10,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
            budget: Duration::from_secs(10),
        }
    }

    /// The equivalent `object_store` retry configuration.
    #[must_use]
    pub fn to_retry_config(&self) -> RetryConfig {
        let backoff = BackoffConfig {
            init_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            base: 2.0,
        };
        RetryConfig {
            backoff,
            max_retries: self.max_retries,
            retry_timeout: self.budget,
        }
    }
}

/// Where the volume lives and how to talk to it.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// Endpoint URL (`http://127.0.0.1:9000`, `https://minio.example`);
    /// `None` for AWS itself. Custom endpoints use path-style requests;
    /// `http://` is allowed for them.
    pub endpoint: Option<String>,
    /// Bucket name.
    pub bucket: String,
    /// Key prefix of the volume inside the bucket (no leading or trailing
    /// `/` needed); may be empty.
    pub prefix: String,
    /// Region used for signing.
    pub region: String,
    /// Credentials; `None` reads them with [`Credentials::from_environment`].
    pub credentials: Option<Credentials>,
    /// Retry policy of ordinary operations.
    pub retry: RetryPolicy,
    /// Longest wait for a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Longest time for one request, start to end of the body.
    pub request_timeout: Duration,
}

impl S3Config {
    /// A configuration with defaults: AWS endpoint, region `us-east-1`,
    /// credentials from the environment, default retries, 5 s connect and
    /// 30 s request timeouts (a 4 MiB chunk at a slow 150 KB/s).
    #[must_use]
    pub fn new(bucket: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            endpoint: None,
            bucket: bucket.into(),
            prefix: prefix.into(),
            region: DEFAULT_REGION.to_owned(),
            credentials: None,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// A blocking S3 client scoped to one bucket and prefix. `Sync`: share one
/// per volume (each owns a 2-thread runtime and a connection pool) between
/// worker threads, e.g. in an `Arc`.
#[derive(Debug)]
pub struct S3Store {
    /// Shared with the stores [`S3Store::at_prefix`] makes.
    rt: std::sync::Arc<tokio::runtime::Runtime>,
    s3: AmazonS3,
    /// Same as `s3` but with [`RetryPolicy::probe`], for [`S3Store::check`].
    probe: AmazonS3,
    /// Same as `s3` but with [`RetryPolicy::race`], for the lease probe.
    race: AmazonS3,
    prefix: String,
    bucket: String,
    endpoint: String,
}

impl S3Store {
    /// Builds the client. Makes no request; see [`S3Store::check`].
    ///
    /// # Errors
    /// [`StoreError::Config`], credential errors, [`StoreError::Runtime`].
    pub fn new(config: &S3Config) -> Result<Self, StoreError> {
        let prefix = config.prefix.trim_matches('/').to_owned();
        if !prefix.is_empty() {
            Path::parse(&prefix)
                .map_err(|e| StoreError::Config(format!("prefix {:?}: {e}", config.prefix)))?;
        }
        if config.bucket.is_empty() || config.bucket.contains('/') {
            return Err(StoreError::Config(format!(
                "bucket name {:?} is invalid",
                config.bucket
            )));
        }
        if let Some(ep) = &config.endpoint {
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                return Err(StoreError::Config(format!(
                    "endpoint {ep:?} must start with http:// or https://"
                )));
            }
        }
        let credentials = match &config.credentials {
            Some(c) => c.clone(),
            None => Credentials::from_environment()?,
        };
        // reqwest is built without a bundled TLS crypto provider (to keep
        // aws-lc's C build out); install ring's. Fails harmlessly if the
        // process already installed one. rustls deprecates ring's provider
        // only for lacking post-quantum key exchange.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();

        let s3 = build_client(config, &credentials, config.retry)?;
        let probe = build_client(config, &credentials, RetryPolicy::probe())?;
        let race = build_client(config, &credentials, RetryPolicy::race())?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("userblk-s3")
            .enable_all()
            .build()
            .map_err(StoreError::Runtime)?;
        let rt = std::sync::Arc::new(rt);
        let endpoint = config
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", config.region));
        Ok(Self {
            rt,
            s3,
            probe,
            race,
            prefix,
            bucket: config.bucket.clone(),
            endpoint,
        })
    }

    /// A store of the same bucket and client under another prefix (a
    /// clone's parent, or the bucket's root for `gc`): no new connection
    /// pool or runtime.
    ///
    /// # Errors
    /// [`StoreError::Config`] for a prefix that is not a valid key.
    pub fn at_prefix(&self, prefix: &str) -> Result<Self, StoreError> {
        let prefix = prefix.trim_matches('/').to_owned();
        if !prefix.is_empty() {
            Path::parse(&prefix)
                .map_err(|e| StoreError::Config(format!("prefix {prefix:?}: {e}")))?;
        }
        Ok(Self {
            rt: std::sync::Arc::clone(&self.rt),
            s3: self.s3.clone(),
            probe: self.probe.clone(),
            race: self.race.clone(),
            prefix,
            bucket: self.bucket.clone(),
            endpoint: self.endpoint.clone(),
        })
    }

    /// The bucket.
    #[must_use]
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key prefix, without surrounding `/`.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The endpoint URL (the AWS one when none was configured).
    #[must_use]
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Verifies that the endpoint answers, the credentials are accepted and
    /// the bucket exists, with one list request under the prefix and a short
    /// retry policy.
    ///
    /// # Errors
    /// [`StoreError::Unreachable`], [`StoreError::BadCredentials`],
    /// [`StoreError::NoSuchBucket`], or [`StoreError::Other`].
    pub fn check(&self) -> Result<(), StoreError> {
        // Listing "under" the manifest object matches nothing, so the answer
        // is tiny whatever the volume holds, yet it needs the bucket and a
        // valid signature. Only the first page is requested: the stream
        // paginates lazily.
        let path = self.path(super::layout::MANIFEST_KEY)?;
        let probe = &self.probe;
        let first = self.run(async move {
            let mut stream = probe.list(path.as_ref());
            stream.next().await
        })?;
        match first {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(e)) => match self.classify("check", "", e) {
                // A 404 on a bucket-level request can only be the bucket.
                StoreError::Other {
                    status: Some(404), ..
                } => Err(self.no_such_bucket()),
                other => Err(other),
            },
        }
    }

    /// Fetches an object; `None` if it does not exist.
    ///
    /// # Errors
    /// See [`StoreError`]; a missing bucket is [`StoreError::NoSuchBucket`],
    /// not `None`.
    pub fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let path = self.object_path(key)?;
        let s3 = &self.s3;
        let r = self.run(async move {
            match s3.get(&path).await {
                Ok(res) => res.bytes().await,
                Err(e) => Err(e),
            }
        })?;
        self.not_found_is_none("get", key, r)
    }

    /// Fetches bytes `range` of an object; `None` if it does not exist.
    ///
    /// # Errors
    /// See [`StoreError`]; a range past the end is [`StoreError::Other`].
    pub fn get_range(&self, key: &str, range: Range<u64>) -> Result<Option<Bytes>, StoreError> {
        if range.start >= range.end {
            return Err(StoreError::InvalidKey {
                key: key.to_owned(),
                reason: format!("empty range {range:?}"),
            });
        }
        let path = self.object_path(key)?;
        let s3 = &self.s3;
        let r = self.run(async move { s3.get_range(&path, range).await })?;
        self.not_found_is_none("get_range", key, r)
    }

    /// Stores an object, replacing any existing one.
    ///
    /// # Errors
    /// See [`StoreError`].
    pub fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        let path = self.object_path(key)?;
        let s3 = &self.s3;
        let r = self.run(async move { s3.put(&path, PutPayload::from(bytes)).await })?;
        r.map(drop).map_err(|e| self.classify("put", key, e))
    }

    /// Stores an object only if none exists under `key` (`If-None-Match: *`);
    /// `Ok(false)` if one does.
    ///
    /// A request that failed on the wire after the server applied it and was
    /// retried reports `false` for the object this call itself created, so a
    /// lease taker reads the object back and compares holders.
    ///
    /// Atomic on AWS S3 (and MinIO, R2). s3s-fs, the test server, checks
    /// then writes: concurrent creators can all get `true` there (sequential
    /// ones are refused correctly).
    ///
    /// # Errors
    /// See [`StoreError`].
    pub fn put_if_absent(&self, key: &str, bytes: Bytes) -> Result<bool, StoreError> {
        let path = self.object_path(key)?;
        let s3 = &self.s3;
        let r = self.run(async move {
            s3.put_opts(&path, PutPayload::from(bytes), PutMode::Create.into())
                .await
        })?;
        match r {
            Ok(_) => Ok(true),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(false),
            Err(e) => Err(self.classify("put_if_absent", key, e)),
        }
    }

    /// Deletes an object; deleting a missing one is not an error.
    ///
    /// # Errors
    /// See [`StoreError`].
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.object_path(key)?;
        let s3 = &self.s3;
        let r = self.run(async move { s3.delete(&path).await })?;
        match self.not_found_is_none("delete", key, r.map(|()| Bytes::new())) {
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Lists the objects under `prefix` (relative to the store's prefix,
    /// treated as a directory: `"chunks"` lists `chunks/...`; `""` lists
    /// everything), as (key relative to the store's prefix, size), sorted by
    /// key.
    ///
    /// # Errors
    /// See [`StoreError`].
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let path = self.path(prefix)?;
        let s3 = &self.s3;
        let r = self.run(async move {
            let mut stream = s3.list(path.as_ref());
            let mut out = Vec::new();
            while let Some(meta) = stream.next().await {
                out.push(meta?);
            }
            Ok::<_, object_store::Error>(out)
        })?;
        let metas = r.map_err(|e| self.classify("list", prefix, e))?;
        let mut out: Vec<(String, u64)> = metas
            .into_iter()
            .map(|m| (self.relative(m.location.as_ref()), m.size))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Runs a future on the private runtime.
    fn run<F: Future>(&self, f: F) -> Result<F::Output, StoreError> {
        // block_on inside a runtime would panic; refuse instead.
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(StoreError::InsideRuntime);
        }
        Ok(self.rt.block_on(f))
    }

    /// The full path of a relative key or directory; `None` for the bucket
    /// root (empty prefix and key).
    fn path(&self, key: &str) -> Result<Option<Path>, StoreError> {
        let key = key.trim_matches('/');
        let full = match (self.prefix.is_empty(), key.is_empty()) {
            (true, true) => return Ok(None),
            (true, false) => key.to_owned(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{key}", self.prefix),
        };
        Path::parse(&full)
            .map(Some)
            .map_err(|e| StoreError::InvalidKey {
                key: key.to_owned(),
                reason: e.to_string(),
            })
    }

    /// The full path of an object key (which must be non-empty and not end
    /// in `/`).
    fn object_path(&self, key: &str) -> Result<Path, StoreError> {
        let invalid = |reason: &str| StoreError::InvalidKey {
            key: key.to_owned(),
            reason: reason.to_owned(),
        };
        if key.is_empty() || key.starts_with('/') || key.ends_with('/') {
            return Err(invalid("must be non-empty and not start or end with '/'"));
        }
        self.path(key)?.ok_or_else(|| invalid("empty"))
    }

    fn relative(&self, full: &str) -> String {
        if self.prefix.is_empty() {
            return full.to_owned();
        }
        full.strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .unwrap_or(full)
            .to_owned()
    }

    fn not_found_is_none<T>(
        &self,
        op: &'static str,
        key: &str,
        r: Result<T, object_store::Error>,
    ) -> Result<Option<T>, StoreError> {
        match r {
            Ok(b) => Ok(Some(b)),
            Err(e) => match self.classify(op, key, e) {
                StoreError::Other {
                    status: Some(404), ..
                } => Ok(None),
                StoreError::Other {
                    source: object_store::Error::NotFound { .. },
                    ..
                } => Ok(None),
                other => Err(other),
            },
        }
    }

    fn no_such_bucket(&self) -> StoreError {
        StoreError::NoSuchBucket {
            endpoint: self.endpoint.clone(),
            bucket: self.bucket.clone(),
        }
    }

    /// Sorts an `object_store` error into the variant a user can act on.
    fn classify(&self, op: &'static str, key: &str, err: object_store::Error) -> StoreError {
        let c = Classified::of(&err);
        if c.code.as_deref() == Some("NoSuchBucket") {
            return self.no_such_bucket();
        }
        let credential_code = matches!(
            c.code.as_deref(),
            Some(
                "InvalidAccessKeyId"
                    | "SignatureDoesNotMatch"
                    | "AccessDenied"
                    | "ExpiredToken"
                    | "InvalidToken"
                    | "InvalidSecurity"
            )
        );
        if matches!(c.status, Some(401 | 403)) || credential_code {
            return StoreError::BadCredentials {
                endpoint: self.endpoint.clone(),
                bucket: self.bucket.clone(),
                op,
                key: key.to_owned(),
                status: c.status.unwrap_or(403),
                code: c.code.unwrap_or_else(|| "unknown".to_owned()),
            };
        }
        if c.status.is_none() {
            if let Some(kind @ (HttpErrorKind::Connect | HttpErrorKind::Timeout)) = c.transport {
                return StoreError::Unreachable {
                    endpoint: self.endpoint.clone(),
                    op,
                    key: key.to_owned(),
                    timed_out: matches!(kind, HttpErrorKind::Timeout),
                    detail: c.text,
                };
            }
        }
        StoreError::Other {
            op,
            key: key.to_owned(),
            status: c.status,
            source: err,
        }
    }
}

/// What could be learned from an `object_store` error. Its inner error
/// types (with the status) are private, so the status and the S3 error code
/// are read from the rendered chain, which always carries them
/// ("status code: 403 Forbidden: <Error><Code>...").
#[derive(Debug)]
struct Classified {
    status: Option<u16>,
    code: Option<String>,
    transport: Option<HttpErrorKind>,
    text: String,
}

impl Classified {
    fn of(err: &object_store::Error) -> Self {
        let mut text = err.to_string();
        let mut transport = None;
        let mut cur: Option<&(dyn StdError + 'static)> = err.source();
        while let Some(e) = cur {
            if transport.is_none() {
                if let Some(h) = e.downcast_ref::<HttpError>() {
                    transport = Some(h.kind());
                }
            }
            let s = e.to_string();
            // Sources often repeat their parent's text; skip repeats.
            if !text.contains(&s) {
                text.push_str(": ");
                text.push_str(&s);
            }
            cur = e.source();
        }
        let status = match err {
            object_store::Error::NotFound { .. } => Some(404),
            object_store::Error::PermissionDenied { .. } => Some(403),
            object_store::Error::Unauthenticated { .. } => Some(401),
            object_store::Error::Precondition { .. } => Some(412),
            _ => parse_status(&text),
        };
        let code = parse_code(&text);
        Self {
            status,
            code,
            transport,
            text,
        }
    }
}

/// The status in object_store's "status code: 404 Not Found" text.
fn parse_status(text: &str) -> Option<u16> {
    let rest = &text[text.find("status code: ")? + "status code: ".len()..];
    let digits = rest.get(..3)?;
    digits.parse().ok().filter(|s| (100..600).contains(s))
}

/// The S3 error code in an XML error body (`<Code>NoSuchBucket</Code>`).
fn parse_code(text: &str) -> Option<String> {
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    let code = text[start..start + len].trim();
    (!code.is_empty()).then(|| code.to_owned())
}

fn build_client(
    config: &S3Config,
    credentials: &Credentials,
    retry: RetryPolicy,
) -> Result<AmazonS3, StoreError> {
    let allow_http = config
        .endpoint
        .as_deref()
        .is_some_and(|e| e.starts_with("http://"));
    let options = ClientOptions::new()
        .with_connect_timeout(config.connect_timeout)
        .with_timeout(config.request_timeout)
        .with_allow_http(allow_http);
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(&config.bucket)
        .with_region(&config.region)
        .with_access_key_id(&credentials.access_key_id)
        .with_secret_access_key(&credentials.secret_access_key)
        .with_retry(retry.to_retry_config())
        .with_client_options(options)
        // If-None-Match / If-Match: AWS (since 2024), MinIO, R2 and
        // s3s-fs all honour them.
        .with_conditional_put(S3ConditionalPut::ETagMatch);
    if let Some(token) = &credentials.session_token {
        b = b.with_token(token);
    }
    if let Some(endpoint) = &config.endpoint {
        // Custom endpoints rarely have wildcard DNS for bucket subdomains.
        b = b
            .with_endpoint(endpoint)
            .with_virtual_hosted_style_request(false)
            .with_allow_http(allow_http);
    }
    b.build()
        .map_err(|e| StoreError::Config(format!("building the S3 client: {e}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn credentials_from_env_vars() {
        let c = Credentials::resolve(&env(&[
            ("AWS_ACCESS_KEY_ID", "AK"),
            ("AWS_SECRET_ACCESS_KEY", "SK"),
            ("AWS_SESSION_TOKEN", "TOK"),
            ("HOME", "/nonexistent"),
        ]))
        .unwrap();
        assert_eq!(c.access_key_id, "AK");
        assert_eq!(c.secret_access_key, "SK");
        assert_eq!(c.session_token.as_deref(), Some("TOK"));
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("SK") && !dbg.contains("TOK"), "{dbg}");
    }

    const FILE: &str = "\
# comment
[default]
aws_access_key_id = DEFKEY
aws_secret_access_key=DEFSECRET

; other
[profile work]
AWS_ACCESS_KEY_ID = WORKKEY
aws_secret_access_key = WORK=SECRET
aws_session_token = WORKTOKEN
region = eu-west-1

[broken]
aws_access_key_id = ONLYKEY
";

    #[test]
    fn credentials_file_parsing() {
        let d = parse_credentials_file(FILE, "default").unwrap();
        assert_eq!(
            (d.access_key_id.as_str(), d.secret_access_key.as_str()),
            ("DEFKEY", "DEFSECRET")
        );
        assert_eq!(d.session_token, None);
        let w = parse_credentials_file(FILE, "work").unwrap();
        assert_eq!(w.access_key_id, "WORKKEY");
        // Only the first '=' splits: secrets may contain '='.
        assert_eq!(w.secret_access_key, "WORK=SECRET");
        assert_eq!(w.session_token.as_deref(), Some("WORKTOKEN"));
        assert!(parse_credentials_file(FILE, "broken").is_none());
        assert!(parse_credentials_file(FILE, "missing").is_none());
    }

    #[test]
    fn credentials_from_file_and_profile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds");
        std::fs::write(&path, FILE).unwrap();
        let p = path.to_str().unwrap();
        let c = Credentials::resolve(&env(&[
            ("AWS_SHARED_CREDENTIALS_FILE", p),
            ("AWS_PROFILE", "work"),
        ]))
        .unwrap();
        assert_eq!(c.access_key_id, "WORKKEY");
        // Env vars win over the file; a lone key id does not count.
        let c = Credentials::resolve(&env(&[
            ("AWS_SHARED_CREDENTIALS_FILE", p),
            ("AWS_ACCESS_KEY_ID", "X"),
        ]))
        .unwrap();
        assert_eq!(c.access_key_id, "DEFKEY");
        // HOME/.aws/credentials is the default location.
        std::fs::create_dir(dir.path().join(".aws")).unwrap();
        std::fs::write(dir.path().join(".aws/credentials"), FILE).unwrap();
        let home = dir.path().to_str().unwrap();
        let c = Credentials::resolve(&env(&[("HOME", home)])).unwrap();
        assert_eq!(c.access_key_id, "DEFKEY");
        match Credentials::resolve(&env(&[("HOME", home), ("AWS_PROFILE", "nope")])) {
            Err(StoreError::NoCredentials { profile, .. }) => assert_eq!(profile, "nope"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Credentials::resolve(&env(&[("HOME", "/nonexistent")])),
            Err(StoreError::NoCredentials { .. })
        ));
    }

    #[test]
    fn status_and_code_parsing() {
        let t = "Error performing GET http://x/b?list-type=2 in 1ms - Server returned non-2xx status code: 404 Not Found: <?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>m</Message></Error>";
        assert_eq!(parse_status(t), Some(404));
        assert_eq!(parse_code(t).as_deref(), Some("NoSuchBucket"));
        assert_eq!(parse_status("no status here"), None);
        assert_eq!(parse_status("status code: 4"), None);
        assert_eq!(parse_code("<Code></Code>"), None);
        assert_eq!(parse_code("<Code>x"), None);
    }

    #[test]
    fn retry_policy_maps_to_object_store() {
        let p = RetryPolicy {
            max_retries: 3,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(50),
            budget: Duration::from_secs(1),
        };
        let c = p.to_retry_config();
        assert_eq!(c.max_retries, 3);
        assert_eq!(c.retry_timeout, Duration::from_secs(1));
        assert_eq!(c.backoff.init_backoff, Duration::from_millis(5));
        assert_eq!(c.backoff.max_backoff, Duration::from_millis(50));
        assert_eq!(RetryPolicy::none().max_retries, 0);
        assert!(RetryPolicy::probe().budget <= Duration::from_secs(5));
    }

    fn store(prefix: &str) -> S3Store {
        let mut cfg = S3Config::new("bucket", prefix);
        cfg.endpoint = Some("http://127.0.0.1:9".to_owned());
        cfg.credentials = Some(Credentials {
            access_key_id: "a".into(),
            secret_access_key: "b".into(),
            session_token: None,
        });
        S3Store::new(&cfg).unwrap()
    }

    #[test]
    fn keys_and_prefixes() {
        let s = store("/vols/one/");
        assert_eq!(s.prefix(), "vols/one");
        assert_eq!(
            s.object_path("chunks/00").unwrap().as_ref(),
            "vols/one/chunks/00"
        );
        assert_eq!(s.path("").unwrap().unwrap().as_ref(), "vols/one");
        assert_eq!(s.relative("vols/one/manifest.json"), "manifest.json");
        for bad in ["", "/x", "x/", "a//b", "a/../b"] {
            assert!(
                matches!(s.object_path(bad), Err(StoreError::InvalidKey { .. })),
                "{bad}"
            );
        }
        let root = store("");
        assert!(root.path("").unwrap().is_none());
        assert_eq!(root.object_path("k").unwrap().as_ref(), "k");
        assert_eq!(root.relative("k/x"), "k/x");

        let mut cfg = S3Config::new("bucket", "p");
        cfg.endpoint = Some("ftp://x".into());
        cfg.credentials = s_creds();
        assert!(matches!(S3Store::new(&cfg), Err(StoreError::Config(_))));
        let mut cfg = S3Config::new("", "p");
        cfg.credentials = s_creds();
        assert!(matches!(S3Store::new(&cfg), Err(StoreError::Config(_))));
    }

    fn s_creds() -> Option<Credentials> {
        Some(Credentials {
            access_key_id: "a".into(),
            secret_access_key: "b".into(),
            session_token: None,
        })
    }

    #[test]
    fn store_is_shareable() {
        fn shareable<T: Send + Sync>() {}
        shareable::<S3Store>();
    }

    #[test]
    fn refuses_inside_runtime() {
        let s = store("p");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let r = rt.block_on(async { s.get("k") });
        assert!(matches!(r, Err(StoreError::InsideRuntime)));
    }
}
