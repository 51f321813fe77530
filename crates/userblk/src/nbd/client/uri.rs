//! NBD URIs: `nbd://host[:port]/export` and `nbd+unix:///export?socket=PATH`.

use std::path::PathBuf;

use crate::nbd::proto;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// A URI that could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("invalid NBD URI {uri:?}: {reason}")]
pub struct UriError {
    /// The URI as given.
    pub uri: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// TCP: a host name or address, and a port.
    Tcp {
        /// Host name, IPv4 or IPv6 address (without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix domain socket.
    Unix(UnixPath),
}

/// A Unix socket's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnixPath {
    /// A socket file.
    File(PathBuf),
    /// A Linux abstract socket (the URI's `socket=` began with `%00`).
    Abstract(Vec<u8>),
}

/// A parsed NBD URI (the format of the NBD project's `doc/uri.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    text: String,
    /// Where the server listens.
    pub addr: Addr,
    /// The export name (may be empty: the server's default export).
    pub export: String,
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for NbdUri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, UriError> {
        NbdUri::parse(s)
    }
}

impl NbdUri {
    /// Parse `nbd://host[:port][/export]` or `nbd+unix:///[export]?socket=PATH`.
    ///
    /// ```
    /// use userblk::nbd::client::{Addr, NbdUri};
    /// let u = NbdUri::parse("nbd://[::1]:10810/disk%201").unwrap();
    /// assert_eq!(u.addr, Addr::Tcp { host: "::1".into(), port: 10810 });
    /// assert_eq!(u.export, "disk 1");
    /// ```
    pub fn parse(text: &str) -> Result<Self, UriError> {
        let bad = |reason: String| UriError {
            uri: text.to_string(),
            reason,
        };
        let (scheme, rest) = text.split_once("://").ok_or_else(|| {
            bad("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH".into())
        })?;
        let unix = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+unix" | "nbds+vsock" => {
                return Err(bad(format!("{scheme}: TLS is not supported")))
            }
            "nbd+vsock" => return Err(bad("nbd+vsock: vsock is not supported".into())),
            _ => {
                return Err(bad(format!(
                    "unknown scheme {scheme:?} (expected nbd or nbd+unix)"
                )))
            }
        };
        if rest.contains('#') {
            return Err(bad("a URI fragment (#...) has no meaning here".into()));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = String::from_utf8(percent_decode(path).map_err(&bad)?)
            .map_err(|_| bad("the export name is not UTF-8".into()))?;
        if export.len() > proto::MAX_STRING {
            return Err(bad(format!(
                "the export name is {} bytes long (at most {})",
                export.len(),
                proto::MAX_STRING
            )));
        }
        if export.contains('\0') {
            return Err(bad("the export name contains a NUL byte".into()));
        }
        let mut socket = None;
        for param in query.into_iter().flat_map(|q| q.split('&')) {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            match key {
                "socket" if unix => socket = Some(percent_decode(value).map_err(&bad)?),
                "" => {}
                k if k.starts_with("tls") => return Err(bad(format!("{k}: TLS is not supported"))),
                k => return Err(bad(format!("unknown query parameter {k:?}"))),
            }
        }
        let addr = if unix {
            if !authority.is_empty() {
                return Err(bad(format!(
                    "nbd+unix URIs take no host ({authority:?}); write nbd+unix:///EXPORT?socket=PATH"
                )));
            }
            let socket = socket.ok_or_else(|| bad("nbd+unix needs ?socket=PATH".into()))?;
            Addr::Unix(match socket.split_first() {
                None => return Err(bad("the socket path is empty".into())),
                Some((0, name)) => UnixPath::Abstract(name.to_vec()),
                Some(_) => {
                    use std::os::unix::ffi::OsStringExt;
                    UnixPath::File(PathBuf::from(std::ffi::OsString::from_vec(socket)))
                }
            })
        } else {
            let (host, port) = parse_authority(authority).map_err(bad)?;
            Addr::Tcp { host, port }
        };
        Ok(NbdUri {
            text: text.to_string(),
            addr,
            export,
        })
    }
}

/// `host[:port]` or `[v6]:port` of an `nbd://` URI.
fn parse_authority(authority: &str) -> std::result::Result<(String, u16), String> {
    if authority.contains('@') {
        return Err("user names are only for TLS, which is not supported".into());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or("an IPv6 address needs a closing ]")?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').ok_or("expected :PORT after ]")?),
            ),
        }
    } else {
        match authority.split_once(':') {
            Some((_, p)) if p.contains(':') => {
                return Err("an IPv6 address must be in brackets: nbd://[::1]/".into())
            }
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("no host (nbd://HOST[:PORT]/EXPORT)".into());
    }
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("bad port {p:?}")),
        },
    };
    Ok((host.to_string(), port))
}

fn percent_decode(s: &str) -> std::result::Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}
