//! Whole-buffer positioned reads and writes on a file descriptor, for
//! the files targets and filters keep (memfds, caches, overlays).

use std::os::fd::BorrowedFd;

use rustix::io::Errno;

/// `pread` all of `buf` (holes read as zeroes; the end of the file is `EIO`).
pub fn read_exact(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(fd, &mut buf[done..], offset + done as u64) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `pwrite` all of `data` (`ENOSPC` when nothing more fits).
pub fn write_all(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> Result<(), Errno> {
    let mut done = 0;
    while done < data.len() {
        match rustix::io::pwrite(fd, &data[done..], offset + done as u64) {
            Ok(0) => return Err(Errno::NOSPC),
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
