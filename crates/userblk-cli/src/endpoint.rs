//! The two ends of `userblk copy`: parsed from `raw:PATH`, `qcow2:PATH`, a
//! plain path, an NBD URI or `null:SIZE`, then opened as a target (a
//! missing destination file is created first).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{bail, Context};
use userblk::filters::Env;
use userblk::nbd::client::NbdUri;
use userblk::spec::{self, TargetSpec};
use userblk::targets::nbd::NbdOptions;
use userblk::targets::qcow2;
use userblk::targets::FileOptions;
use userblk::Target;

/// The forms an endpoint may take, for error messages and help.
pub const FORMS: &str = "raw:PATH, file:PATH, qcow2:PATH, PATH, nbd://HOST[:PORT]/EXPORT, \
                         nbd+unix:///EXPORT?socket=PATH, rbd://POOL/IMAGE or null:SIZE";

/// What a qcow2 image starts with.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// One end of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A raw image: a regular file or a block device (`raw:PATH`, `file:PATH`).
    Raw(PathBuf),
    /// A qcow2 image (`qcow2:PATH`).
    Qcow2(PathBuf),
    /// A path without a format: qcow2 if the file starts with the qcow2
    /// magic, else raw; a file that does not exist yet is raw unless its
    /// name ends in `.qcow2`.
    Path(PathBuf),
    /// An export of an NBD server (the nbd target).
    Nbd(NbdUri),
    /// SIZE bytes that read as zeroes; writes are dropped (the null target).
    Null(u64),
    /// A volume of the s3 target, or one of its snapshots (read-only):
    /// `s3://BUCKET/PREFIX[@SNAPSHOT][?endpoint=URL&region=R
    /// &chunk-size=SIZE&cache-size=SIZE&lease=auto|host]` (endpoint and region default to
    /// `$AWS_ENDPOINT_URL` and `$AWS_REGION`; chunk-size is for a new volume).
    S3(crate::s3::S3Url),
    /// An image of a Ceph cluster (the rbd target):
    /// `rbd://POOL/IMAGE[?conf=FILE&id=NAME]`.
    Rbd(crate::rbd::RbdUri),
}

/// Which end is being opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Read from: opened read-only, must exist.
    Source,
    /// Written to: created with this size if it is a file that does not exist.
    Destination {
        /// The source's size.
        size: u64,
    },
}

/// An opened endpoint.
pub struct Opened {
    /// The target serving it.
    pub target: Arc<dyn Target>,
    /// Created just now, so it reads as zeroes everywhere.
    pub created: bool,
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let path = |p: &str| {
            if p.is_empty() {
                Err(format!("'{s}': no path after the ':'"))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        if s.is_empty() {
            return Err(format!("an empty endpoint; use {FORMS}"));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return match scheme {
                "nbd" | "nbd+unix" | "nbds" | "nbds+unix" => NbdUri::parse(s)
                    .map(Endpoint::Nbd)
                    .map_err(|e| e.to_string()),
                "rbd" => crate::rbd::RbdUri::parse(s).map(Endpoint::Rbd),
                "s3" => s.parse().map(Endpoint::S3),
                _ => Err(format!("'{s}': unknown scheme '{scheme}'; use {FORMS}")),
            };
        }
        match s.split_once(':') {
            Some(("raw" | "file", p)) => path(p).map(Endpoint::Raw),
            Some(("qcow2", p)) => path(p).map(Endpoint::Qcow2),
            Some(("null", size)) => null_size(size).map(Endpoint::Null),
            // `foo:bar` that is not a file is a typo of a scheme more often
            // than a new file's name (which can be written `./foo:bar`).
            Some((scheme, _))
                if scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '+')
                    && !Path::new(s).exists() =>
            {
                Err(format!(
                    "'{s}': unknown scheme '{scheme}:'; use {FORMS} (./{s} for a file of that name)"
                ))
            }
            _ => Ok(Endpoint::Path(PathBuf::from(s))),
        }
    }
}

fn null_size(s: &str) -> Result<u64, String> {
    let size = userblk::size::parse(s).map_err(|e| format!("null:{s}: {e}"))?;
    if size == 0 || size % 512 != 0 {
        return Err(format!(
            "null:{s}: the size must be a positive multiple of 512"
        ));
    }
    Ok(size)
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Raw(p) => write!(f, "raw:{}", p.display()),
            Endpoint::Qcow2(p) => write!(f, "qcow2:{}", p.display()),
            Endpoint::Path(p) => write!(f, "{}", p.display()),
            Endpoint::Nbd(u) => write!(f, "{u}"),
            Endpoint::Rbd(u) => write!(f, "{u}"),
            Endpoint::Null(size) => write!(f, "null:{}", userblk::size::format(*size)),
            Endpoint::S3(u) => write!(f, "{u}"),
        }
    }
}

impl Endpoint {
    /// The file behind the endpoint, if it is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Endpoint::Raw(p) | Endpoint::Qcow2(p) | Endpoint::Path(p) => Some(p),
            Endpoint::Nbd(_) | Endpoint::Null(_) | Endpoint::S3(_) | Endpoint::Rbd(_) => None,
        }
    }

    /// The same endpoint with an absolute path (for checkpoints, which
    /// must not depend on the directory a copy was started from).
    pub fn absolute(&self) -> Endpoint {
        let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
        match self {
            Endpoint::Raw(p) => Endpoint::Raw(abs(p)),
            Endpoint::Qcow2(p) => Endpoint::Qcow2(abs(p)),
            Endpoint::Path(p) => Endpoint::Path(abs(p)),
            other => other.clone(),
        }
    }
}

/// Open `ep` for `role`. A destination file that does not exist is
/// created with the source's size (a sparse raw file, or an empty qcow2
/// image), and reported as `created`.
pub fn open(ep: &Endpoint, role: Role) -> anyhow::Result<Opened> {
    let spec = match ep {
        Endpoint::Raw(p) => return open_file(p, Format::Raw, role),
        Endpoint::Qcow2(p) => return open_file(p, Format::Qcow2, role),
        Endpoint::Path(p) => {
            let format = Format::probe(p, role)?;
            return open_file(p, format, role);
        }
        Endpoint::Nbd(uri) => TargetSpec::Nbd(NbdOptions::new(uri.clone())),
        Endpoint::Rbd(uri) => {
            let size = match role {
                Role::Source => None,
                Role::Destination { size } => Some(size),
            };
            TargetSpec::Rbd(Box::new(uri.options(size)))
        }
        Endpoint::Null(size) => TargetSpec::Null {
            size: *size,
            zero_fill: true,
        },
        Endpoint::S3(url) => {
            let size = match role {
                Role::Source => None,
                Role::Destination { size } => Some(size),
            };
            TargetSpec::S3(Box::new(crate::s3::copy_options_for(url, size)?))
        }
    };
    let o = spec::open(spec, &[], &Env::default())?;
    Ok(Opened {
        target: o.target,
        created: o.created,
    })
}

/// How a file holds the device's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Raw,
    Qcow2,
}

impl Format {
    /// A plain path's format: from the file's first bytes, or for a
    /// destination not made yet, from its name.
    fn probe(path: &Path, role: Role) -> anyhow::Result<Format> {
        use std::io::Read;
        // Through the targets' own open: a FIFO is refused, not waited on.
        let mut f =
            match userblk::targets::file::open_data(path, true, false).map(std::fs::File::from) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && role != Role::Source => {
                    let qcow2 = path.extension().is_some_and(|e| e == "qcow2");
                    return Ok(if qcow2 { Format::Qcow2 } else { Format::Raw });
                }
                other => other?,
            };
        let mut magic = [0u8; 4];
        let got = f.read(&mut magic)?;
        Ok(if got == 4 && &magic == QCOW2_MAGIC {
            Format::Qcow2
        } else {
            Format::Raw
        })
    }
}

fn open_file(path: &Path, format: Format, role: Role) -> anyhow::Result<Opened> {
    let (read_only, size) = match role {
        Role::Source => (true, None),
        Role::Destination { size } => (false, Some(size)),
    };
    let meta = match (std::fs::metadata(path), size) {
        (Ok(m), _) => Some(m),
        (Err(e), Some(_)) if e.kind() == std::io::ErrorKind::NotFound => None,
        (Err(e), _) => return Err(e.into()),
    };
    let created = match (meta, size) {
        (None, Some(size)) => {
            create(path, format, size)?;
            true
        }
        (Some(m), Some(size)) if m.is_file() && format == Format::Raw && m.len() < size => {
            // The file target refuses an empty file with a message of its own.
            return Err(userblk::copy::CopyError::TooSmall {
                src: size,
                dst: m.len(),
            }
            .into());
        }
        (Some(m), None) if m.is_file() && format == Format::Raw && m.len() % 512 != 0 => {
            // The file target would leave the partial sector out, silently.
            bail!(
                "its size {} is not a multiple of 512: copies move whole 512-byte sectors \
                 (`truncate -s %512` rounds it up)",
                m.len()
            );
        }
        _ => false,
    };
    let spec = match format {
        Format::Raw => TargetSpec::File(FileOptions {
            // The page cache: any size and alignment, and the copy's
            // flush at the end makes it durable.
            buffered: true,
            read_only,
            path: path.to_path_buf(),
            offset: 0,
        }),
        Format::Qcow2 => TargetSpec::qcow2(path).read_only(read_only),
    };
    match spec::open(spec, &[], &Env::default()) {
        Ok(o) => Ok(Opened {
            target: o.target,
            created,
        }),
        Err(e) => {
            if created {
                let _ = std::fs::remove_file(path);
            }
            Err(e.into())
        }
    }
}

/// A new file of `size` bytes: sparse raw, or an empty qcow2 image.
fn create(path: &Path, format: Format, size: u64) -> anyhow::Result<()> {
    // The caller names the endpoint.
    let what = || "creating the file";
    match format {
        Format::Raw => {
            let f = std::fs::File::create_new(path).with_context(what)?;
            if let Err(e) = f.set_len(size) {
                let _ = std::fs::remove_file(path);
                return Err(e).with_context(what);
            }
        }
        Format::Qcow2 => {
            qcow2::create(&qcow2::CreateOptions::new(path, size)).with_context(what)?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Endpoint, String> {
        s.parse()
    }

    #[test]
    fn forms_parse() {
        assert_eq!(parse("raw:/x/y"), Ok(Endpoint::Raw("/x/y".into())));
        assert_eq!(parse("file:y"), Ok(Endpoint::Raw("y".into())));
        assert_eq!(parse("qcow2:a.img"), Ok(Endpoint::Qcow2("a.img".into())));
        assert_eq!(parse("disk.img"), Ok(Endpoint::Path("disk.img".into())));
        assert_eq!(parse("./odd:name"), Ok(Endpoint::Path("./odd:name".into())));
        assert_eq!(parse("null:1G"), Ok(Endpoint::Null(1 << 30)));
        let nbd = parse("nbd+unix:///disk?socket=/tmp/s.sock").unwrap();
        assert!(
            matches!(&nbd, Endpoint::Nbd(u) if u.export == "disk"),
            "{nbd:?}"
        );
        assert_eq!(nbd.to_string(), "nbd+unix:///disk?socket=/tmp/s.sock");
        assert!(matches!(
            parse("nbd://localhost:10809/e"),
            Ok(Endpoint::Nbd(_))
        ));
        assert_eq!(
            parse("s3://bucket/images/vm1"),
            Ok(Endpoint::S3(crate::s3::S3Url {
                bucket: "bucket".into(),
                prefix: "images/vm1".into(),
                snapshot: None,
                options: Vec::new(),
            }))
        );
        let with = "s3://b/p?endpoint=http://127.0.0.1:9000&chunk-size=1M";
        assert_eq!(parse(with).unwrap().to_string(), with);
        assert_eq!(parse("null:1M").unwrap().to_string(), "null:1M");
    }

    #[test]
    fn bad_forms_say_what_is_accepted() {
        for (bad, why) in [
            ("", "empty"),
            ("http://x/y", "unknown scheme 'http'"),
            ("ftp:thing", "unknown scheme 'ftp:'"),
            ("raw:", "no path"),
            ("null:1000", "multiple of 512"),
            ("null:abc", "invalid size"),
            ("s3:///x", "no bucket"),
            ("nbd://", "invalid NBD URI"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = parse("ftp:thing").unwrap_err();
        assert!(e.contains("nbd+unix:///EXPORT?socket=PATH"), "{e}");
    }

    #[test]
    fn plain_paths_are_probed() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("a.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let q = dir.path().join("b.img");
        qcow2::create(&qcow2::CreateOptions::new(&q, 1 << 20)).unwrap();
        let src = Role::Source;
        assert_eq!(Format::probe(&raw, src).unwrap(), Format::Raw);
        assert_eq!(Format::probe(&q, src).unwrap(), Format::Qcow2);
        let dst = Role::Destination { size: 4096 };
        let new = dir.path().join("new.qcow2");
        assert_eq!(Format::probe(&new, dst).unwrap(), Format::Qcow2);
        assert_eq!(
            Format::probe(&dir.path().join("n.raw"), dst).unwrap(),
            Format::Raw
        );
        assert!(Format::probe(&new, src).is_err(), "a missing source");
        // A destination is created with the source's size; a source is never created.
        let o = open(
            &Endpoint::Path(new.clone()),
            Role::Destination { size: 1 << 20 },
        )
        .unwrap();
        assert!(o.created);
        assert_eq!(o.target.caps().size, 1 << 20);
        assert_eq!(Format::probe(&new, src).unwrap(), Format::Qcow2);
        drop(o); // A qcow2 image has one writer at a time.
        let o = open(&Endpoint::Path(new), Role::Destination { size: 1 << 20 }).unwrap();
        assert!(!o.created);
        assert!(open(&Endpoint::Raw(dir.path().join("nope")), Role::Source).is_err());
        assert!(!dir.path().join("nope").exists());
        let e = open(&Endpoint::Raw(raw), Role::Destination { size: 1 << 20 })
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").contains("smaller than the source"),
            "{e:#}"
        );
        let odd = dir.path().join("odd.raw");
        std::fs::write(&odd, vec![1u8; 1000]).unwrap();
        let e = open(&Endpoint::Raw(odd), Role::Source).err().unwrap();
        assert!(e.to_string().contains("not a multiple of 512"), "{e}");
        let e = parse("s3://b/p?colour=red").unwrap_err();
        assert!(e.contains("unknown option 'colour'"), "{e}");
    }
}
