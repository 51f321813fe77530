//! Loop devices: attach a file (in practice one exported on a FUSE mount) as a kernel
//! block device `/dev/loopN`, inspect loop devices, and detach them again.
//!
//! Devices are attached with `LO_FLAGS_AUTOCLEAR`, so the kernel unbinds one at the
//! last close: dropping a [`LoopDevice`] (or the process dying) detaches it as soon as
//! no mount or other opener holds it. [`LoopDevice::detach`] and [`detach_path`] refuse
//! while the device is claimed exclusively (a mount, `O_EXCL`), and say where it is mounted.
#![allow(unsafe_code)]

use std::ffi::{c_void, OsStr, OsString};
use std::fs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::{ioctl, IntegerSetter, Ioctl, IoctlOutput, NoArg, Opcode, Setter};
use userblk_uapi::loop_dev::{
    LoopConfig, LoopInfo64, LOOP_CLR_FD, LOOP_CONFIGURE, LOOP_CTL_GET_FREE, LOOP_SET_BLOCK_SIZE,
    LOOP_SET_CAPACITY, LOOP_SET_DIRECT_IO, LOOP_SET_FD, LOOP_SET_STATUS64, LO_FLAGS_AUTOCLEAR,
    LO_FLAGS_DIRECT_IO, LO_FLAGS_READ_ONLY, LO_NAME_SIZE,
};

use crate::{Error, Result};

const LOOP_CONTROL: &str = "/dev/loop-control";
/// The block major of every whole loop device (`LOOP_MAJOR`).
const LOOP_MAJOR: u32 = 7;
/// How many free devices to try when others keep taking the one offered. Every `EBUSY`
/// means another attach won, so this bounds the number of concurrent attachers we outlast.
const ATTACH_TRIES: u32 = 32;
/// How long a detach waits for other (non-exclusive) openers, such as udev's blkid, to close.
const UNBIND_WAIT: Duration = Duration::from_secs(2);

/// How to attach.
#[derive(Debug, Clone, Copy)]
pub struct LoopOptions {
    /// Logical block size in bytes: a power of two from 512 (the kernel also caps it,
    /// at the page size on older kernels); 0 keeps the kernel's default of 512.
    pub block_size: u32,
    /// Ask for direct I/O on the backing file, bypassing its page cache. The kernel
    /// silently declines when the file cannot do it; see [`LoopDevice::direct_io`].
    pub direct_io: bool,
    /// Open the backing file read-only and make the device read-only.
    pub read_only: bool,
}

/// An attached loop device; the open fd is held for as long as this lives.
///
/// Attached with `LO_FLAGS_AUTOCLEAR`, so if the process dies (or this is dropped) the
/// kernel detaches it as soon as nobody else (a mount) holds it.
#[derive(Debug)]
pub struct LoopDevice {
    fd: OwnedFd,
    number: u32,
}

/// A refused or failed [`LoopDevice::detach`]: why, and the device, still attached.
///
/// Converting it into an [`Error`] (as `?` does) drops the device; thanks to autoclear
/// the kernel then detaches it once its holder lets go.
#[derive(Debug)]
pub struct DetachError {
    /// Why the device was not detached, typically [`Error::LoopBusy`].
    pub error: Error,
    /// The device, still attached, for a later retry.
    pub device: LoopDevice,
}

impl std::fmt::Display for DetachError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for DetachError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

impl From<DetachError> for Error {
    fn from(e: DetachError) -> Self {
        e.error
    }
}

impl LoopDevice {
    /// Attach `file` to a free loop device.
    ///
    /// `file` is opened here `O_RDWR` (`O_RDONLY` if `read_only`) and bound with
    /// `LOOP_CONFIGURE` (5.8): the block size, `LO_FLAGS_AUTOCLEAR`, direct I/O and
    /// read-only in one step. When another process takes the free device first
    /// (`EBUSY`), a new one is asked for, up to 32 times. Kernels before 5.8 get
    /// `LOOP_SET_FD` + `LOOP_SET_STATUS64` + `LOOP_SET_BLOCK_SIZE` + `LOOP_SET_DIRECT_IO`,
    /// which leaves a short window in which the device is bound without autoclear.
    pub fn attach(file: &Path, opts: &LoopOptions) -> Result<LoopDevice> {
        Self::attach_with(file, opts, false)
    }

    /// [`attach`](Self::attach), starting with the pre-5.8 ioctls if `legacy` (for tests).
    fn attach_with(file: &Path, opts: &LoopOptions, mut legacy: bool) -> Result<LoopDevice> {
        check_block_size(opts.block_size)?;
        let access = if opts.read_only {
            OFlags::RDONLY
        } else {
            OFlags::RDWR
        };
        let backing = rustix::fs::open(file, access | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| Error::path(file, e))?;
        let kind = FileType::from_raw_mode(
            rustix::fs::fstat(&backing)
                .map_err(|e| Error::path(file, e))?
                .st_mode,
        );
        if !matches!(kind, FileType::RegularFile | FileType::BlockDevice) {
            return Err(Error::invalid(format!(
                "{}: a loop device needs a regular file",
                file.display()
            )));
        }
        let config = LoopConfig {
            fd: u32::try_from(backing.as_raw_fd()).map_err(|_| Error::path(file, Errno::BADF))?,
            block_size: opts.block_size,
            info: LoopInfo64 {
                lo_flags: lo_flags(opts),
                lo_file_name: name_field(file),
                ..LoopInfo64::default()
            },
            ..LoopConfig::default()
        };

        let ctl = open_control()?;
        for attempt in 1..=ATTACH_TRIES {
            let number = get_free(&ctl)?;
            let fd = open_loop(number)?;
            let bound = if legacy {
                set_fd(&fd, &backing)
            } else {
                configure(&fd, &config)
            };
            match bound {
                Ok(()) => {
                    let device = LoopDevice { fd, number };
                    if legacy {
                        device.finish_legacy(&config, opts.direct_io)?;
                    }
                    tracing::debug!(
                        "attached {} to /dev/loop{number} (dio {})",
                        file.display(),
                        device.direct_io()
                    );
                    return Ok(device);
                }
                // Someone bound or claimed it between GET_FREE and now: ask again.
                Err(Errno::BUSY) => {
                    std::thread::sleep(Duration::from_millis(u64::from(attempt.min(10))));
                }
                Err(e) if !legacy && configure_unsupported(e) => legacy = true,
                Err(e) => {
                    let op = if legacy {
                        "LOOP_SET_FD"
                    } else {
                        "LOOP_CONFIGURE"
                    };
                    return Err(Error::io(
                        format!("{op} of {} on /dev/loop{number}", file.display()),
                        e,
                    ));
                }
            }
        }
        Err(Error::io(
            format!(
                "attaching {}: each free loop device offered was taken by another attach first ({ATTACH_TRIES} tries)",
                file.display()
            ),
            Errno::BUSY,
        ))
    }

    /// Pre-5.8 path after `LOOP_SET_FD`: name, autoclear, block size, direct I/O.
    /// On failure the device is unbound again.
    fn finish_legacy(&self, config: &LoopConfig, direct_io: bool) -> Result<()> {
        let result = (|| {
            // SET_STATUS64 can only set AUTOCLEAR and PARTSCAN; read-only comes from the
            // backing file's open mode, direct I/O from its own ioctl.
            let mut info = config.info;
            info.lo_flags &= LO_FLAGS_AUTOCLEAR;
            set_status(&self.fd, info).map_err(|e| ("LOOP_SET_STATUS64", e))?;
            if config.block_size != 0 {
                set_block_size(&self.fd, config.block_size)
                    .map_err(|e| ("LOOP_SET_BLOCK_SIZE", e))?;
            }
            match set_direct_io(&self.fd, direct_io) {
                // Like LOOP_CONFIGURE, fall back to buffered I/O when the file cannot do it.
                Ok(()) | Err(Errno::INVAL) => Ok(()),
                Err(e) => Err(("LOOP_SET_DIRECT_IO", e)),
            }
        })();
        result.map_err(|(op, e)| {
            // Best effort: the error being returned is the one that matters.
            let _ = clr_fd(&self.fd);
            Error::io(format!("{op} on {}", self.path().display()), e)
        })
    }

    /// Take over loop device `number`, attached (with autoclear) by another process
    /// that still holds it: open `/dev/loopN` and check `file` is behind it. Once the
    /// attacher closes its fd, this one keeps the device bound.
    pub fn adopt(number: u32, file: &Path) -> Result<LoopDevice> {
        let fd = open_loop(number)?;
        if backing_file(number).as_deref() != Some(file) {
            return Err(Error::invalid(format!(
                "/dev/loop{number} is not bound to {}",
                file.display()
            )));
        }
        Ok(LoopDevice { fd, number })
    }

    /// The N of `/dev/loopN`.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> PathBuf {
        dev_path(self.number)
    }

    /// Whether the kernel actually uses direct I/O on the backing file
    /// (`/sys/block/loopN/loop/dio`; false if unreadable).
    pub fn direct_io(&self) -> bool {
        fs::read(format!("/sys/block/loop{}/loop/dio", self.number))
            .is_ok_and(|v| v.trim_ascii() == b"1")
    }

    /// Detach: refuse with [`Error::LoopBusy`] if the device is claimed by anyone else
    /// (see [`in_use`]), else `LOOP_CLR_FD` and close.
    ///
    /// The check and the detach are one step: the device is held `O_EXCL` meanwhile, so
    /// nothing can mount it in between. If a process still has it open non-exclusively
    /// (udev's blkid, say), the kernel unbinds it when that process closes it; this waits
    /// up to two seconds for that.
    pub fn detach(self) -> std::result::Result<(), DetachError> {
        let path = self.path();
        let excl = match open_exclusive(&path) {
            Ok(Some(excl)) => excl,
            Ok(None) => {
                return Err(DetachError {
                    error: busy(&path),
                    device: self,
                })
            }
            Err(error) => {
                return Err(DetachError {
                    error,
                    device: self,
                })
            }
        };
        match clr_fd(&excl) {
            // ENXIO: already unbound.
            Ok(()) | Err(Errno::NXIO) => {}
            Err(e) => {
                return Err(DetachError {
                    error: Error::io(format!("LOOP_CLR_FD on {}", path.display()), e),
                    device: self,
                })
            }
        }
        drop(excl);
        let LoopDevice { fd, number } = self;
        drop(fd);
        wait_unbound(number);
        Ok(())
    }
}

/// Whether a block device is claimed by someone: a mount, a device mapper or an
/// `O_EXCL` opener. Found by trying `open(O_RDONLY|O_EXCL)`: `EBUSY` means in use.
/// Plain (non-exclusive) openers do not count.
pub fn in_use(path: &Path) -> Result<bool> {
    Ok(open_exclusive(path)?.is_none())
}

/// Where the block device is mounted, if it is: the mount points whose device is the
/// node's major:minor in `/proc/self/mountinfo`, or, if none are there, in
/// `/proc/1/mountinfo` (the host's namespace, for a caller in another one;
/// readable by root only). Empty if not mounted or unreadable. Used to make
/// "in use" errors say where to unmount.
pub fn mount_points(dev_path: &Path) -> Vec<PathBuf> {
    let Ok(stat) = rustix::fs::stat(dev_path) else {
        return Vec::new();
    };
    if FileType::from_raw_mode(stat.st_mode) != FileType::BlockDevice {
        return Vec::new();
    }
    let (major, minor) = (
        rustix::fs::major(stat.st_rdev),
        rustix::fs::minor(stat.st_rdev),
    );
    ["/proc/self/mountinfo", "/proc/1/mountinfo"]
        .iter()
        .filter_map(|table| fs::read_to_string(table).ok())
        .map(|text| parse_mount_points(&text, major, minor))
        .find(|found| !found.is_empty())
        .unwrap_or_default()
}

/// Backing file of loop device N (`/sys/block/loopN/loop/backing_file`), None if it is
/// unbound or does not exist. The kernel appends ` (deleted)` if the file was unlinked.
pub fn backing_file(number: u32) -> Option<PathBuf> {
    let raw = fs::read(format!("/sys/block/loop{number}/loop/backing_file")).ok()?;
    let name = raw.strip_suffix(b"\n").unwrap_or(&raw);
    (!name.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(name)))
}

/// Detach a loop device by path (for cleaning up after a dead daemon): the same busy
/// refusal and wait as [`LoopDevice::detach`]; Ok if it is already unbound.
pub fn detach_path(path: &Path) -> Result<()> {
    let Some(excl) = open_exclusive(path)? else {
        return Err(busy(path));
    };
    let rdev = rustix::fs::fstat(&excl)
        .map_err(|e| Error::path(path, e))?
        .st_rdev;
    if rustix::fs::major(rdev) != LOOP_MAJOR {
        return Err(Error::invalid(format!(
            "{} is not a loop device",
            path.display()
        )));
    }
    match clr_fd(&excl) {
        Ok(()) | Err(Errno::NXIO) => {}
        Err(e) => return Err(Error::io(format!("LOOP_CLR_FD on {}", path.display()), e)),
    }
    drop(excl);
    if let Some(number) = number_of(rdev) {
        wait_unbound(number);
    }
    Ok(())
}

fn dev_path(number: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{number}"))
}

fn busy(path: &Path) -> Error {
    Error::LoopBusy {
        path: path.to_path_buf(),
        mounts: mount_points(path),
    }
}

/// Open a block device `O_EXCL`; `None` if someone else has claimed it.
fn open_exclusive(path: &Path) -> Result<Option<OwnedFd>> {
    let flags = OFlags::RDONLY | OFlags::EXCL | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::BUSY) => return Ok(None),
        Err(e) => return Err(Error::path(path, e)),
    };
    let stat = rustix::fs::fstat(&fd).map_err(|e| Error::path(path, e))?;
    // O_EXCL without O_CREAT means nothing for other files, so the answer would be wrong.
    if FileType::from_raw_mode(stat.st_mode) != FileType::BlockDevice {
        return Err(Error::invalid(format!(
            "{} is not a block device",
            path.display()
        )));
    }
    Ok(Some(fd))
}

/// Wait until loop device N is unbound, or [`UNBIND_WAIT`] has passed.
fn wait_unbound(number: u32) {
    let start = Instant::now();
    while backing_file(number).is_some() {
        if start.elapsed() > UNBIND_WAIT {
            tracing::warn!(
                "/dev/loop{number} is still open elsewhere; the kernel will detach it at its last close"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// N for a whole loop device's device number, via `/sys/dev/block/MAJ:MIN -> .../loopN`
/// (the minor alone depends on the `max_part` module parameter).
fn number_of(rdev: u64) -> Option<u32> {
    let link = fs::read_link(format!(
        "/sys/dev/block/{}:{}",
        rustix::fs::major(rdev),
        rustix::fs::minor(rdev)
    ))
    .ok()?;
    link.file_name()?
        .to_str()?
        .strip_prefix("loop")?
        .parse()
        .ok()
}

fn open_control() -> Result<OwnedFd> {
    let open = || rustix::fs::open(LOOP_CONTROL, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty());
    let opened = match open() {
        Err(Errno::NOENT) if crate::sys::modprobe("loop") => open(),
        other => other,
    };
    opened.map_err(|e| match e {
        Errno::NOENT | Errno::NODEV | Errno::NXIO => Error::NoLoop,
        Errno::ACCESS | Errno::PERM => Error::LoopAccess {
            path: LOOP_CONTROL.into(),
        },
        e => Error::path(LOOP_CONTROL, e),
    })
}

fn open_loop(number: u32) -> Result<OwnedFd> {
    let path = dev_path(number);
    rustix::fs::open(&path, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty()).map_err(|e| match e {
        Errno::ACCESS | Errno::PERM => Error::LoopAccess { path },
        e => Error::path(path, e),
    })
}

fn check_block_size(size: u32) -> Result<()> {
    if size == 0 || (size.is_power_of_two() && (512..=65536).contains(&size)) {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "loop block size {size} is not a power of two from 512 to 65536"
    )))
}

fn lo_flags(opts: &LoopOptions) -> u32 {
    let mut flags = LO_FLAGS_AUTOCLEAR;
    if opts.direct_io {
        flags |= LO_FLAGS_DIRECT_IO;
    }
    if opts.read_only {
        flags |= LO_FLAGS_READ_ONLY;
    }
    flags
}

/// `lo_file_name`: the path, NUL-terminated, cut to fit without splitting a UTF-8 character.
/// The kernel only displays it; `backing_file` in sysfs is the real path.
fn name_field(path: &Path) -> [u8; LO_NAME_SIZE] {
    let bytes = path.as_os_str().as_bytes();
    let mut len = bytes.len().min(LO_NAME_SIZE - 1);
    if let Ok(text) = std::str::from_utf8(bytes) {
        while !text.is_char_boundary(len) {
            len -= 1;
        }
    }
    let mut field = [0; LO_NAME_SIZE];
    field[..len].copy_from_slice(&bytes[..len]);
    field
}

/// Whether a `LOOP_CONFIGURE` error means the kernel does not know the ioctl: `ENOTTY`,
/// or `EINVAL`, which kernels before 5.8 return for unknown loop ioctls (and 5.8+ for bad
/// arguments, so it only counts on an older kernel).
fn configure_unsupported(e: Errno) -> bool {
    e == Errno::NOTTY
        || (e == Errno::INVAL
            && kernel_before(&rustix::system::uname().release().to_string_lossy(), (5, 8)))
}

/// Whether a `uname -r` string is older than `major.minor`; false if it cannot be parsed.
fn kernel_before(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    match (
        parts.next().map(str::parse::<u32>),
        parts.next().map(str::parse::<u32>),
    ) {
        (Some(Ok(a)), Some(Ok(b))) => (a, b) < (major, minor),
        _ => false,
    }
}

/// The mount points of `major:minor` in a `/proc/*/mountinfo` text (field 3 is the device,
/// field 5 the mount point, with space, tab, newline and backslash escaped as `\ooo`).
pub(crate) fn parse_mount_points(mountinfo: &str, major: u32, minor: u32) -> Vec<PathBuf> {
    let device = format!("{major}:{minor}");
    mountinfo
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let dev = fields.nth(2)?;
            let mount_point = fields.nth(1)?;
            (dev == device).then(|| PathBuf::from(unescape_octal(mount_point)))
        })
        .collect()
}

fn unescape_octal(field: &str) -> OsString {
    let mut out = Vec::with_capacity(field.len());
    let mut rest = field.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if let (b'\\', [a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7', more @ ..]) =
            (first, tail)
        {
            out.push((a - b'0') * 64 + (b - b'0') * 8 + (c - b'0'));
            rest = more;
        } else {
            out.push(first);
            rest = tail;
        }
    }
    OsString::from_vec(out)
}

/// `LOOP_CTL_GET_FREE`, the one loop ioctl whose answer is its return value.
struct GetFree;

// SAFETY: LOOP_CTL_GET_FREE takes no argument and touches no user memory (so not
// mutating); it returns a device number, which `output_from_ptr` passes on.
unsafe impl Ioctl for GetFree {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = false;

    fn opcode(&self) -> Opcode {
        LOOP_CTL_GET_FREE as Opcode
    }

    fn as_ptr(&mut self) -> *mut c_void {
        std::ptr::null_mut()
    }

    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

fn get_free(ctl: &OwnedFd) -> Result<u32> {
    // SAFETY: `ctl` is /dev/loop-control and GetFree describes LOOP_CTL_GET_FREE exactly.
    let number = unsafe { ioctl(ctl, GetFree) }
        .map_err(|e| Error::io("LOOP_CTL_GET_FREE on /dev/loop-control", e))?;
    // The kernel returns a device index (>= 0) or an error.
    u32::try_from(number).map_err(|_| Error::io("LOOP_CTL_GET_FREE", Errno::RANGE))
}

fn configure(dev: &OwnedFd, config: &LoopConfig) -> rustix::io::Result<()> {
    // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, whose layout `LoopConfig`
    // reproduces (sizes and offsets tested in userblk-uapi); the kernel writes nothing back.
    unsafe {
        ioctl(
            dev,
            Setter::<{ LOOP_CONFIGURE as Opcode }, LoopConfig>::new(*config),
        )
    }
}

fn set_fd(dev: &OwnedFd, backing: &OwnedFd) -> rustix::io::Result<()> {
    let fd = usize::try_from(backing.as_fd().as_raw_fd()).map_err(|_| Errno::BADF)?;
    // SAFETY: LOOP_SET_FD takes a file descriptor by value, and `backing` is open.
    unsafe {
        ioctl(
            dev,
            IntegerSetter::<{ LOOP_SET_FD as Opcode }>::new_usize(fd),
        )
    }
}

fn set_status(dev: &OwnedFd, info: LoopInfo64) -> rustix::io::Result<()> {
    // SAFETY: LOOP_SET_STATUS64 reads a `struct loop_info64`, whose layout `LoopInfo64`
    // reproduces (tested in userblk-uapi); the kernel writes nothing back.
    unsafe {
        ioctl(
            dev,
            Setter::<{ LOOP_SET_STATUS64 as Opcode }, LoopInfo64>::new(info),
        )
    }
}

fn set_block_size(dev: &OwnedFd, size: u32) -> rustix::io::Result<()> {
    let size = usize::try_from(size).map_err(|_| Errno::INVAL)?;
    // SAFETY: LOOP_SET_BLOCK_SIZE takes the size by value and touches no user memory.
    unsafe {
        ioctl(
            dev,
            IntegerSetter::<{ LOOP_SET_BLOCK_SIZE as Opcode }>::new_usize(size),
        )
    }
}

fn set_direct_io(dev: &OwnedFd, on: bool) -> rustix::io::Result<()> {
    // SAFETY: LOOP_SET_DIRECT_IO takes 0 or 1 by value and touches no user memory.
    unsafe {
        ioctl(
            dev,
            IntegerSetter::<{ LOOP_SET_DIRECT_IO as Opcode }>::new_usize(usize::from(on)),
        )
    }
}

/// Make loop device `path` take its backing file's size now (after the
/// file grew or shrank): `LOOP_SET_CAPACITY`. Returns the device's size.
pub fn refresh_capacity(path: &Path) -> Result<u64> {
    let dev = rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| Error::path(path, e))?;
    let st = rustix::fs::fstat(&dev).map_err(|e| Error::path(path, e))?;
    if rustix::fs::major(st.st_rdev) != LOOP_MAJOR {
        return Err(Error::invalid(format!(
            "{} is not a loop device",
            path.display()
        )));
    }
    // SAFETY: LOOP_SET_CAPACITY takes no argument and touches no user memory.
    unsafe { ioctl(&dev, NoArg::<{ LOOP_SET_CAPACITY as Opcode }>::new()) }
        .map_err(|e| Error::io(format!("LOOP_SET_CAPACITY on {}", path.display()), e))?;
    rustix::fs::seek(&dev, rustix::fs::SeekFrom::End(0)).map_err(|e| Error::path(path, e))
}

fn clr_fd(dev: &OwnedFd) -> rustix::io::Result<()> {
    // SAFETY: LOOP_CLR_FD takes no argument and touches no user memory.
    unsafe { ioctl(dev, NoArg::<{ LOOP_CLR_FD as Opcode }>::new()) }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests;
