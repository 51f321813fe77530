//! S3 volumes in the CLI: `s3://` URLs, where `add s3` keeps a volume's
//! cache, and the options of an `s3://` copy endpoint.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use userblk::targets::s3::{S3Config, S3Options};

/// `/`-free, `%`-escaped, so every prefix gets its own directory name.
fn escape(s: &str) -> String {
    let s = s.trim_matches('/');
    if s.is_empty() {
        return "%".into();
    }
    s.replace('%', "%25").replace('/', "%2F")
}

/// The endpoint's `host[:port]`, for the cache path.
fn endpoint_host(endpoint: Option<&str>, region: &str) -> String {
    match endpoint {
        Some(e) => {
            let rest = e.split_once("://").map_or(e, |(_, r)| r);
            escape(rest.split('/').next().unwrap_or(rest))
        }
        None => format!("s3.{region}.amazonaws.com"),
    }
}

/// Where the cache of the volume `store` names goes when `--cache-dir` is not given.
pub fn default_cache_dir(store: &S3Config) -> anyhow::Result<PathBuf> {
    let base = if rustix::process::geteuid().is_root() {
        PathBuf::from("/var/cache/userblk")
    } else if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        PathBuf::from(x).join("userblk")
    } else if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        PathBuf::from(h).join(".cache/userblk")
    } else {
        bail!("no HOME for the s3 cache: give --cache-dir");
    };
    Ok(base
        .join("s3")
        .join(endpoint_host(store.endpoint.as_deref(), &store.region))
        .join(escape(&store.bucket))
        .join(escape(&store.prefix)))
}

/// An `s3://BUCKET[/PREFIX][@SNAPSHOT][?KEY=VALUE&...]` argument: a volume,
/// or one of its snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    /// The bucket.
    pub bucket: String,
    /// The volume's prefix (may be empty).
    pub prefix: String,
    /// The snapshot after `@`.
    pub snapshot: Option<String>,
    /// The options after `?`, checked, in the order given.
    pub options: Vec<(String, String)>,
}

impl std::str::FromStr for S3Url {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| format!("'{s}': not an s3:// URL; use s3://BUCKET/PREFIX"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (rest, snapshot) = match rest.rsplit_once('@') {
            Some((r, name)) => {
                userblk::targets::s3::layout::check_snapshot_name(name)
                    .map_err(|e| format!("'{s}': {e}"))?;
                (r, Some(name.to_owned()))
            }
            None => (rest, None),
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("'{s}': no bucket; use s3://BUCKET/PREFIX"));
        }
        Ok(S3Url {
            bucket: bucket.into(),
            prefix: prefix.trim_matches('/').into(),
            snapshot,
            options: copy_options(query).map_err(|e| format!("'{s}': {e}"))?,
        })
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)?;
        if let Some(n) = &self.snapshot {
            write!(f, "@{n}")?;
        }
        for (i, (k, v)) in self.options.iter().enumerate() {
            write!(f, "{}{k}={v}", if i == 0 { '?' } else { '&' })?;
        }
        Ok(())
    }
}

impl S3Url {
    /// An option's value.
    pub fn get(&self, key: &str) -> Option<String> {
        self.options
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    /// The store: endpoint and region from the options, else
    /// `$AWS_ENDPOINT_URL` and `$AWS_REGION`.
    pub fn config(&self) -> S3Config {
        let mut store = S3Config::new(self.bucket.clone(), self.prefix.clone());
        store.endpoint = self
            .get("endpoint")
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        if let Some(r) = self
            .get("region")
            .or_else(|| std::env::var("AWS_REGION").ok())
        {
            store.region = r;
        }
        store
    }

    /// `lease=`: what keeps a second writer out.
    pub fn lease(&self) -> userblk::targets::s3::LeaseMode {
        if self.get("lease").as_deref() == Some("host") {
            userblk::targets::s3::LeaseMode::Host
        } else {
            userblk::targets::s3::LeaseMode::Auto
        }
    }
}

/// Options an `s3://` copy endpoint takes after `?`.
const COPY_OPTIONS: &[&str] = &["endpoint", "region", "chunk-size", "cache-size", "lease"];

/// Check the `key=value&...` options of an `s3://` copy endpoint.
pub fn copy_options(query: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("option '{kv}' has no value (KEY=VALUE)"))?;
        if !COPY_OPTIONS.contains(&k) {
            return Err(format!(
                "unknown option '{k}'; s3:// takes {}",
                COPY_OPTIONS.join(", ")
            ));
        }
        if k == "lease" && !matches!(v, "auto" | "host") {
            return Err(format!("lease={v}: auto or host"));
        }
        if k.ends_with("-size") {
            let n = userblk::size::parse(v).map_err(|e| format!("{k}={v}: {e}"))?;
            if k == "chunk-size" {
                userblk::targets::s3::layout::check_chunk_size(n)
                    .map_err(|e| format!("{k}={v}: {e}"))?;
            }
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    Ok(out)
}

/// The options of an `s3://` end of `userblk copy`: a cache of its own
/// that goes when the copy is done. A destination (`size`) is created with
/// that size when the prefix holds no volume; an existing one keeps its size.
pub fn copy_options_for(url: &S3Url, size: Option<u64>) -> anyhow::Result<S3Options> {
    let parse_size = |k: &str| -> anyhow::Result<Option<u64>> {
        url.get(k)
            .map(|v| userblk::size::parse(&v).with_context(|| format!("{k}={v}")))
            .transpose()
    };
    if url.snapshot.is_some() && size.is_some() {
        bail!("{url}: a snapshot is read-only; copy to its volume (without @) or a new prefix");
    }
    let store = url.config();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = std::env::var_os("TMPDIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let cache = tmp.join(format!("userblk-copy-s3-{}-{nanos}", std::process::id()));
    let mut opts = S3Options::new(store, cache);
    opts.size = size;
    opts.size_for_new_only = true;
    opts.chunk_size = parse_size("chunk-size")?;
    opts.cache_size = parse_size("cache-size")?.unwrap_or(256 << 20);
    // Upload as soon as a chunk is written whole: a copy never comes back.
    opts.writeback_delay = Duration::ZERO;
    opts.ephemeral_cache = true;
    opts.lease = url.lease();
    opts.snapshot.clone_from(&url.snapshot);
    Ok(opts)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u: S3Url = "s3://b/images/vm1@base?lease=host".parse().unwrap();
        assert_eq!(
            (u.bucket.as_str(), u.prefix.as_str(), u.snapshot.as_deref()),
            ("b", "images/vm1", Some("base"))
        );
        assert_eq!(u.to_string(), "s3://b/images/vm1@base?lease=host");
        let u: S3Url = "s3://b".parse().unwrap();
        assert_eq!((u.prefix.as_str(), u.snapshot), ("", None));
        for (bad, why) in [
            ("s3:///p", "no bucket"),
            ("s3://b/p@", "snapshot name"),
            ("s3://b/p@a/b", "snapshot name"),
            ("b/p", "not an s3:// URL"),
            ("s3://b/p?x=1", "unknown option"),
        ] {
            let e = bad.parse::<S3Url>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn cache_names_keep_prefixes_apart() {
        assert_eq!(escape("a/b"), "a%2Fb");
        assert_eq!(escape("a%2Fb"), "a%252Fb");
        assert_eq!(escape("/"), "%");
        assert_eq!(
            endpoint_host(Some("http://127.0.0.1:9000/x"), "r"),
            "127.0.0.1:9000"
        );
        assert_eq!(
            endpoint_host(None, "eu-west-1"),
            "s3.eu-west-1.amazonaws.com"
        );
    }
}
