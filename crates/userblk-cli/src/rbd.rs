//! The `rbd://` endpoint of `userblk copy`.

use std::fmt;
use std::path::PathBuf;

use userblk::targets::rbd::RbdOptions;

/// `rbd://POOL/IMAGE[?conf=FILE&id=NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdUri {
    /// The pool.
    pub pool: String,
    /// The image.
    pub image: String,
    /// `conf=`: the cluster's ceph.conf.
    pub conf: Option<PathBuf>,
    /// `id=`: the Ceph client id.
    pub id: Option<String>,
}

impl RbdUri {
    /// Parse the URI (the `rbd://` scheme included).
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("rbd://")
            .ok_or_else(|| format!("'{s}': not an rbd:// URI"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (pool, image) = path.split_once('/').unwrap_or((path, ""));
        if pool.is_empty() || image.is_empty() || image.contains('/') {
            return Err(format!("'{s}': use rbd://POOL/IMAGE[?conf=FILE&id=NAME]"));
        }
        let mut uri = RbdUri {
            pool: pool.into(),
            image: image.into(),
            conf: None,
            id: None,
        };
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            match kv.split_once('=') {
                Some(("conf", v)) if !v.is_empty() => uri.conf = Some(PathBuf::from(v)),
                Some(("id", v)) if !v.is_empty() => uri.id = Some(v.into()),
                _ => {
                    return Err(format!(
                        "'{s}': unknown option '{kv}'; rbd:// takes conf=FILE and id=NAME"
                    ))
                }
            }
        }
        Ok(uri)
    }

    /// The target's options; a destination is created with `create_size` if missing.
    pub fn options(&self, create_size: Option<u64>) -> RbdOptions {
        let mut o = RbdOptions::new(&self.pool, &self.image);
        o.connect.conf.clone_from(&self.conf);
        o.connect.id.clone_from(&self.id);
        o.connect.create_size = create_size;
        o
    }
}

impl fmt::Display for RbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rbd://{}/{}", self.pool, self.image)?;
        let mut sep = '?';
        if let Some(c) = &self.conf {
            write!(f, "{sep}conf={}", c.display())?;
            sep = '&';
        }
        if let Some(id) = &self.id {
            write!(f, "{sep}id={id}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_print_back() {
        let u = RbdUri::parse("rbd://rbd/disk?conf=/tmp/c.conf&id=admin").unwrap();
        assert_eq!((u.pool.as_str(), u.image.as_str()), ("rbd", "disk"));
        assert_eq!(u.conf.as_deref(), Some(std::path::Path::new("/tmp/c.conf")));
        assert_eq!(u.to_string(), "rbd://rbd/disk?conf=/tmp/c.conf&id=admin");
        assert_eq!(RbdUri::parse("rbd://p/i").unwrap().to_string(), "rbd://p/i");
        for bad in [
            "rbd://",
            "rbd://pool",
            "rbd://pool/",
            "rbd:///img",
            "rbd://p/i/j",
            "rbd://p/i?x=1",
        ] {
            assert!(RbdUri::parse(bad).is_err(), "{bad}");
        }
        let o = RbdUri::parse("rbd://p/i").unwrap().options(Some(1 << 20));
        assert_eq!(o.connect.create_size, Some(1 << 20));
    }
}
