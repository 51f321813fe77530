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

/// How often [`wait_while`] asks again without a pidfd to wake it.
const EXIT_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Wait while `runs()` says process `pid` still runs, until `deadline`;
/// whether it stopped running in time. The wait sleeps on the process's
/// pidfd (Linux 5.3+), which wakes it the moment the process exits, so
/// `del` does not lose half a polling interval per device; `runs` is still
/// asked at least every 20 ms, and only that where there is no pidfd.
pub fn wait_while(pid: i32, deadline: std::time::Instant, runs: impl Fn() -> bool) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut pidfd = rustix::process::Pid::from_raw(pid)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    loop {
        if !runs() {
            return true;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        let nap = left.min(EXIT_POLL);
        let exited = match &pidfd {
            Some(fd) => {
                let ts = Timespec::try_from(nap).unwrap_or(Timespec {
                    tv_sec: 0,
                    tv_nsec: 20_000_000,
                });
                let mut fds = [PollFd::new(fd, PollFlags::IN)];
                matches!(poll(&mut fds, Some(&ts)), Ok(n) if n > 0)
            }
            None => {
                std::thread::sleep(nap);
                false
            }
        };
        // Readable once the process has exited; should `runs` still say
        // yes, sleep from then on rather than wake at once again.
        if exited {
            pidfd = None;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn wait_while_wakes_when_the_process_exits_and_keeps_its_deadline() {
        let mut quick = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let pid = i32::try_from(quick.id()).unwrap();
        let start = Instant::now();
        assert!(wait_while(pid, start + Duration::from_secs(10), || {
            process_runs(pid)
        }));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        quick.wait().unwrap();

        let mut slow = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = i32::try_from(slow.id()).unwrap();
        let start = Instant::now();
        assert!(!wait_while(pid, start + Duration::from_millis(100), || {
            process_runs(pid)
        }));
        assert!(start.elapsed() >= Duration::from_millis(100));
        slow.kill().unwrap();
        slow.wait().unwrap();
    }
}
