//! Where zero-copy reads of zeroes get them: a sealed, sparse memfd.
//!
//! Not `/dev/zero`: a character device, whose read stops early when the
//! reading thread should yield (an io_uring read attempted without blocking
//! returns what it zeroed so far), and io_uring hands such a short read back
//! as it is. A memfd is a regular file, whose short reads io_uring finishes
//! itself, and its holes read as zeroes without using memory. The seals keep
//! anyone from writing data into it or shrinking it.

use std::os::fd::OwnedFd;

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::io::Errno;

/// Bytes a read may take from the source: more than any request, never
/// allocated (a hole).
pub const ZERO_SOURCE_BYTES: u64 = 1 << 30;

/// A new zero source: `ZERO_SOURCE_BYTES` of zeroes from offset 0.
pub fn zero_source() -> Result<OwnedFd, Errno> {
    let fd = rustix::fs::memfd_create(
        "userblk-zeroes",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    rustix::fs::ftruncate(&fd, ZERO_SOURCE_BYTES)?;
    rustix::fs::fcntl_add_seals(
        &fd,
        SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
    )?;
    Ok(fd)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_zeroes_and_cannot_be_written_or_resized() {
        let fd = zero_source().unwrap();
        let st = rustix::fs::fstat(&fd).unwrap();
        assert_eq!(
            rustix::fs::FileType::from_raw_mode(st.st_mode),
            rustix::fs::FileType::RegularFile
        );
        assert_eq!(st.st_size, ZERO_SOURCE_BYTES.cast_signed());
        // Nothing allocated: it is one hole.
        assert_eq!(st.st_blocks, 0);
        let mut buf = vec![7u8; 1 << 20];
        let n = rustix::io::pread(&fd, &mut buf, ZERO_SOURCE_BYTES - (1 << 20)).unwrap();
        assert_eq!(n, 1 << 20);
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(rustix::io::pwrite(&fd, &[1], 0), Err(Errno::PERM));
        assert!(rustix::fs::ftruncate(&fd, 0).is_err());
        assert!(rustix::fs::ftruncate(&fd, 2 * ZERO_SOURCE_BYTES).is_err());
    }
}
