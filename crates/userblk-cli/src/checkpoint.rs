//! `userblk copy --resume`: a small JSON file recording how far a copy
//! got (everything below `offset` copied and flushed), next to a file
//! destination, or in the state directory for others.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::endpoint::Endpoint;

/// What a checkpoint file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    /// The source, with an absolute path.
    source: String,
    /// The destination, with an absolute path.
    destination: String,
    /// The source's size.
    size: u64,
    /// Everything below this offset is copied and flushed.
    offset: u64,
}

/// The checkpoint of one copy.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    source: String,
    destination: String,
    size: u64,
}

impl Checkpoint {
    /// The checkpoint of copying `src` (`size` bytes) to `dst`, at `path`
    /// or the default place: `DST.userblk-copy` for a destination that is
    /// (or will be) a regular file, else `copy-<DST>.json` in the state directory.
    pub fn new(src: &Endpoint, dst: &Endpoint, size: u64, path: Option<PathBuf>) -> Self {
        let dst = dst.absolute();
        let path = path.unwrap_or_else(|| default_path(&dst));
        Checkpoint {
            path,
            source: src.absolute().to_string(),
            destination: dst.to_string(),
            size,
        }
    }

    /// Where it is kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The offset an earlier run of this copy recorded, if any. A
    /// checkpoint of another copy is an error, not something to ignore.
    pub fn load(&self) -> anyhow::Result<Option<u64>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("{}", self.path.display())),
        };
        let r: Record = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a copy checkpoint", self.path.display()))?;
        let mine = (&self.source, &self.destination, self.size);
        if (&r.source, &r.destination, r.size) != mine {
            bail!(
                "{}: the checkpoint is of another copy ({} to {}, {} bytes); remove it, or copy without --resume",
                self.path.display(),
                r.source,
                r.destination,
                r.size
            );
        }
        if r.offset > self.size {
            bail!(
                "{}: offset {} is past the end",
                self.path.display(),
                r.offset
            );
        }
        Ok(Some(r.offset))
    }

    /// Refuse a checkpoint that could not be saved, before the copy starts
    /// rather than when it is stopped.
    pub fn check_writable(&self) -> anyhow::Result<()> {
        let dir = match self.path.parent() {
            Some(d) if d.as_os_str().is_empty() => Path::new("."),
            Some(d) => d,
            None => Path::new("/"),
        };
        // The state directory is made when first needed.
        if dir == userblk::state::state_dir() {
            return Ok(());
        }
        use rustix::fs::Access;
        rustix::fs::access(dir, Access::WRITE_OK | Access::EXEC_OK).with_context(|| {
            format!(
                "checkpoint {}: its directory cannot be written",
                self.path.display()
            )
        })
    }

    /// Record `offset` (a new file renamed over the old one, so a crash
    /// leaves one or the other).
    pub fn save(&self, offset: u64) -> std::io::Result<()> {
        let r = Record {
            source: self.source.clone(),
            destination: self.destination.clone(),
            size: self.size,
            offset,
        };
        if self.path.parent() == Some(userblk::state::state_dir().as_path()) {
            userblk::state::ensure_dir().map_err(std::io::Error::other)?;
        }
        let mut name = self.path.as_os_str().to_owned();
        name.push(".tmp");
        let tmp = PathBuf::from(name);
        let mut f = std::fs::File::create(&tmp)?;
        serde_json::to_writer(&mut f, &r)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Forget it (a complete copy); missing is fine.
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", self.path.display());
            }
        }
    }
}

fn default_path(dst: &Endpoint) -> PathBuf {
    let file = dst
        .path()
        .filter(|p| std::fs::metadata(p).map_or(true, |m| m.is_file()));
    if let Some(p) = file {
        let mut name = p.as_os_str().to_owned();
        name.push(".userblk-copy");
        return PathBuf::from(name);
    }
    let safe: String = dst
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    userblk::state::state_dir().join(format!("copy-{safe}.json"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn saves_loads_and_refuses_another_copy() {
        let dir = tempfile::tempdir().unwrap();
        let dst = Endpoint::Path(dir.path().join("d.img"));
        let src: Endpoint = "null:1M".parse().unwrap();
        let c = Checkpoint::new(&src, &dst, 1 << 20, None);
        assert_eq!(c.path(), dir.path().join("d.img.userblk-copy"));
        assert_eq!(c.load().unwrap(), None);
        c.save(4096).unwrap();
        assert_eq!(c.load().unwrap(), Some(4096));
        let other = Checkpoint::new(&"null:2M".parse().unwrap(), &dst, 2 << 20, None);
        let e = other.load().unwrap_err().to_string();
        assert!(e.contains("another copy"), "{e}");
        c.remove();
        assert_eq!(c.load().unwrap(), None);
        c.check_writable().unwrap();
        let nowhere = Checkpoint::new(&src, &dst, 1 << 20, Some("/nonexistent-dir/x".into()));
        let e = format!("{:#}", nowhere.check_writable().unwrap_err());
        assert_eq!(
            e,
            "checkpoint /nonexistent-dir/x: its directory cannot be written: No such file or directory (os error 2)"
        );
        let nbd: Endpoint = "nbd+unix:///x?socket=/tmp/s".parse().unwrap();
        let c = Checkpoint::new(&src, &nbd, 1 << 20, None);
        assert!(
            c.path().starts_with(userblk::state::state_dir()),
            "{:?}",
            c.path()
        );
    }
}
