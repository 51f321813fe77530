//! Open a file only if it is of a type the caller takes, without ever
//! blocking in `open()`: a FIFO there would wait for a peer, and a device
//! node may act on being opened.
//!
//! The type is checked by name first, for the clear message, and again on
//! the descriptor, which is opened non-blocking so that a file swapped in
//! between cannot block either. Errors name no path: the caller's do.

use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;

/// The types of file an open accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kinds {
    /// A regular file: a filter's own file (overlay, cache, log).
    Regular,
    /// A regular file or a block device: a device's data.
    Data,
}

impl Kinds {
    fn check(self, t: FileType) -> std::io::Result<()> {
        let ok = match self {
            Kinds::Regular => t == FileType::RegularFile,
            Kinds::Data => matches!(t, FileType::RegularFile | FileType::BlockDevice),
        };
        if ok {
            return Ok(());
        }
        let what = match t {
            FileType::Fifo => "a FIFO",
            FileType::Directory => "a directory",
            FileType::CharacterDevice => "a character device",
            FileType::BlockDevice => "a block device",
            FileType::Socket => "a socket",
            _ => "of another type",
        };
        let want = match self {
            Kinds::Regular => "a regular file",
            Kinds::Data => "a regular file or block device",
        };
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not {want}: it is {what}"),
        ))
    }
}

/// Open `path` with `flags` (and `mode` if `flags` creates it) if it is
/// of one of `kinds`. A path that does not exist is created when `flags`
/// has `CREATE`; the descriptor returned blocks as usual.
pub fn open_checked(
    path: &Path,
    flags: OFlags,
    mode: Mode,
    kinds: Kinds,
) -> std::io::Result<OwnedFd> {
    match rustix::fs::stat(path) {
        Ok(st) => kinds.check(FileType::from_raw_mode(st.st_mode))?,
        Err(Errno::NOENT) if flags.contains(OFlags::CREATE) => {}
        Err(e) => return Err(e.into()),
    }
    let fd = rustix::fs::open(path, flags | OFlags::CLOEXEC | OFlags::NONBLOCK, mode)?;
    kinds.check(FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode))?;
    // Blocking again: the ring and the page cache expect ordinary I/O.
    rustix::fs::fcntl_setfl(&fd, rustix::fs::fcntl_getfl(&fd)? - OFlags::NONBLOCK)?;
    Ok(fd)
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    fn err(path: &Path, flags: OFlags, kinds: Kinds) -> String {
        open_checked(path, flags, Mode::RUSR | Mode::WUSR, kinds)
            .expect_err("opened")
            .to_string()
    }

    #[test]
    fn wrong_types_are_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            FileType::Fifo,
            Mode::RUSR | Mode::WUSR,
            0,
        )
        .expect("mkfifo");
        let create = OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE;
        assert_eq!(
            err(&fifo, create, Kinds::Regular),
            "not a regular file: it is a FIFO"
        );
        assert_eq!(
            err(&fifo, OFlags::RDWR, Kinds::Data),
            "not a regular file or block device: it is a FIFO"
        );
        assert_eq!(
            err(dir.path(), OFlags::RDWR | OFlags::CREATE, Kinds::Regular),
            "not a regular file: it is a directory"
        );
        assert_eq!(
            err(Path::new("/dev/null"), OFlags::RDWR, Kinds::Regular),
            "not a regular file: it is a character device"
        );
    }

    #[test]
    fn creates_and_opens_regular_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("new");
        let flags = OFlags::RDWR | OFlags::CREATE;
        let fd =
            open_checked(&path, flags, Mode::RUSR | Mode::WUSR, Kinds::Regular).expect("created");
        assert!(!rustix::fs::fcntl_getfl(&fd)
            .expect("getfl")
            .contains(OFlags::NONBLOCK));
        drop(fd);
        open_checked(&path, OFlags::RDONLY, Mode::empty(), Kinds::Data).expect("reopened");
        let missing = dir.path().join("missing");
        assert!(open_checked(&missing, OFlags::RDWR, Mode::empty(), Kinds::Regular).is_err());
    }
}
