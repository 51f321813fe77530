//! Process-level system calls the daemon needs for its own safety.

use rustix::mm::MlockAllFlags;

use crate::{Error, Result};

/// Lock the daemon's memory so serving a request never waits for swap-in,
/// which could need the very device being served. Pages are locked as they
/// are touched, so sparse buffers stay sparse.
pub fn lock_memory() -> Result<()> {
    rustix::mm::mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT)
        .map_err(|e| Error::io("mlockall", e))
}

/// Give every allocation of `bytes` or more a mapping of its own, for good.
///
/// glibc's default threshold moves up to the size of the largest such
/// block freed; from then on blocks of that size come from the heap, and
/// `calloc` zeroes reused heap memory by writing it. The FUSE library's
/// 16 MiB receive buffer per thread (freed once after the handshake) thus
/// made idle threads cost ~3 MB each once they outnumber glibc's arenas.
/// In a mapping of its own a buffer costs only the pages written to.
/// Other C libraries map large blocks anyway: nothing to do there.
pub fn map_large_allocations(bytes: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a tunable of the allocator; any value is valid.
        #[allow(unsafe_code)]
        let _ = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) };
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
}

/// Mark the calling thread as an I/O flusher: memory reclaim will not
/// recurse into filesystem I/O from it (which could wait on our own device).
pub fn set_io_flusher() -> Result<()> {
    rustix::process::configure_io_flusher_behavior(true)
        .map_err(|e| Error::io("prctl(PR_SET_IO_FLUSHER)", e))
}

/// Keep the descriptors this process inherited, beyond stdin, stdout and
/// stderr, out of the programs it starts: a daemon started by `add` would
/// otherwise hold its caller's pipes and sockets for its whole life (a
/// caller reading through such a pipe would never see it end).
pub fn close_inherited_on_exec() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    // Listed first, so the directory's own descriptor is closed by now.
    let fds: Vec<std::os::fd::RawFd> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for raw in fds {
        // SAFETY: only the descriptor's flags are read and set, for the
        // duration of this call; one closed meanwhile makes fcntl fail
        // with EBADF, which is ignored.
        #[allow(unsafe_code)]
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
        if let Ok(flags) = rustix::io::fcntl_getfd(fd) {
            let _ = rustix::io::fcntl_setfd(fd, flags | rustix::io::FdFlags::CLOEXEC);
        }
    }
}

/// Try to load a kernel module with `modprobe`, quietly. Returns whether modprobe succeeded.
pub fn modprobe(module: &str) -> bool {
    std::process::Command::new("modprobe")
        .arg("-q")
        .arg(module)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The command name and state letter of `pid`, from `/proc/PID/stat`.
pub fn proc_stat(pid: i32) -> Option<(String, char)> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// `PID (COMM) S ...`: the name may hold spaces and parentheses, so it
/// ends at the last `)`.
pub(crate) fn parse_stat(stat: &str) -> Option<(String, char)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    let state = stat.get(close + 1..)?.trim_start().chars().next()?;
    Some((comm.to_string(), state))
}

/// Whether process `pid` runs: it exists and is not a zombie (a process
/// that has exited but whose parent has not reaped it yet holds nothing).
pub fn process_runs(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|(_, state)| !matches!(state, 'Z' | 'X'))
}
