//! The control device, `/dev/ublk-control`: one command at a time on an SQE128 ring.
//!
//! Unprivileged devices (`UBLK_F_UNPRIVILEGED_DEV`) need every command after
//! ADD_DEV to carry the path of their char device, `/dev/ublkcN\0`, in front
//! of the payload; the kernel checks the caller's access to that node. So
//! does GET_DEV_INFO2 for every device. [`Control`] decides per device: a
//! caller that is not root always sends the prefix (it can only manage
//! unprivileged devices), root sends it only for devices it knows to be
//! unprivileged (learnt from ADD_DEV or GET_DEV_INFO2).
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use userblk_uapi::*;

use crate::ublk::deadline;
use crate::{Error, Result};

/// Path of the control device.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// Device info as the kernel reports it.
pub type DevInfo = UblksrvCtrlDevInfo;

/// Name of a `UBLK_S_DEV_*` state.
pub fn state_name(state: u16) -> &'static str {
    match state {
        UBLK_S_DEV_DEAD => "DEAD",
        UBLK_S_DEV_LIVE => "LIVE",
        UBLK_S_DEV_QUIESCED => "QUIESCED",
        UBLK_S_DEV_FAIL_IO => "FAIL_IO",
        _ => "UNKNOWN",
    }
}

/// An open control device with its own ring.
pub struct Control {
    fd: OwnedFd,
    ring: IoUring<squeue::Entry128, io_uring::cqueue::Entry>,
    /// The caller is not root: every per-device command carries the path prefix.
    unprivileged_caller: bool,
    /// What we know per device: whether it is unprivileged (needs the prefix).
    prefixed: HashMap<u32, bool>,
    /// The `user_data` of the last command: a late completion of one given
    /// up earlier is never taken for the current one's.
    seq: u64,
}

/// `user_data` bit of a cancel: the tag of the command it cancels, with this.
const CANCEL_BIT: u64 = 1 << 63;

/// Whether a command's result says it was interrupted (by our cancel).
fn interrupted(res: i32) -> bool {
    // 512..=514: the kernel's internal restart codes, should one leak out.
    res == -Errno::INTR.raw_os_error()
        || res == -Errno::CANCELED.raw_os_error()
        || (-514..=-512).contains(&res)
}

/// Whether this process runs as root. Without root (strictly: CAP_SYS_ADMIN)
/// only unprivileged devices can be created and managed.
pub fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A kernel ABI struct that is plain integers: every byte pattern is a valid
/// value, and it has no padding the kernel could not write.
///
/// # Safety
/// Implement only for `#[repr(C)]` structs (or arrays) made of integer fields.
unsafe trait Pod: Sized {}
// SAFETY: `ublksrv_ctrl_dev_info` is repr(C), integer fields only, no padding (tested in userblk-uapi).
unsafe impl Pod for DevInfo {}
// SAFETY: `ublk_params` is repr(C) with integer and integer-array fields only.
unsafe impl Pod for UblkParams {}
// SAFETY: an array of integers.
unsafe impl Pod for [u64; 64] {}
// SAFETY: an integer.
unsafe impl Pod for u64 {}

/// The bytes of a command payload, for the kernel to read or write.
fn bytes_of<T: Pod>(v: &mut T) -> &mut [u8] {
    // SAFETY: `v` is a valid, exclusively borrowed `T` of `size_of::<T>()`
    // bytes; `T: Pod` makes any bytes written through the slice a valid `T`,
    // and the slice borrows `v` for as long as it lives.
    unsafe {
        std::slice::from_raw_parts_mut(std::ptr::from_mut(v).cast::<u8>(), std::mem::size_of::<T>())
    }
}

/// The command buffer for device `dev_id` with the char-device path in
/// front: `/dev/ublkcN\0` then `payload`. Returns it and the prefix length.
fn prefixed_buffer(dev_id: u32, payload: &[u8]) -> (Vec<u8>, usize) {
    let mut buf = format!("/dev/ublkc{dev_id}").into_bytes();
    buf.push(0);
    let path_len = buf.len();
    buf.extend_from_slice(payload);
    (buf, path_len)
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("fd", &self.fd.as_raw_fd())
            .finish()
    }
}

fn encode(c: &UblksrvCtrlCmd) -> [u8; 80] {
    let mut out = [0u8; 80];
    out[0..4].copy_from_slice(&c.dev_id.to_ne_bytes());
    out[4..6].copy_from_slice(&c.queue_id.to_ne_bytes());
    out[6..8].copy_from_slice(&c.len.to_ne_bytes());
    out[8..16].copy_from_slice(&c.addr.to_ne_bytes());
    out[16..24].copy_from_slice(&c.data[0].to_ne_bytes());
    out[24..26].copy_from_slice(&c.dev_path_len.to_ne_bytes());
    out[26..28].copy_from_slice(&c.pad.to_ne_bytes());
    out[28..32].copy_from_slice(&c.reserved.to_ne_bytes());
    out
}

impl Control {
    /// Open the control device, loading `ublk_drv` first if it is missing.
    pub fn open() -> Result<Self> {
        let path = Path::new(CONTROL_PATH);
        if !path.exists() {
            if !crate::sys::modprobe("ublk_drv") {
                return Err(Error::NoUblk);
            }
            // devtmpfs or udev creates the node shortly after the module loads.
            let deadline = Instant::now() + Duration::from_secs(2);
            while !path.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if !path.exists() {
                return Err(Error::NoUblk);
            }
        }
        let fd =
            rustix::fs::open(path, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty()).map_err(|e| {
                match e {
                    Errno::ACCESS | Errno::PERM => Error::NoControlAccess,
                    e => Error::path(path, e),
                }
            })?;
        let ring = IoUring::builder()
            .build(4)
            .map_err(|e| Error::io("io_uring_setup (control ring)", e))?;
        Ok(Control {
            fd,
            ring,
            unprivileged_caller: !running_as_root(),
            prefixed: HashMap::new(),
            seq: 0,
        })
    }

    /// Whether commands on device `dev_id` must carry the char-device path:
    /// always for a caller that is not root, otherwise when the device is
    /// unprivileged (asked of the kernel once, then remembered).
    pub fn needs_path_prefix(&mut self, dev_id: u32) -> Result<bool> {
        if self.unprivileged_caller {
            return Ok(true);
        }
        if let Some(&p) = self.prefixed.get(&dev_id) {
            return Ok(p);
        }
        let info = self.dev_info(dev_id)?;
        Ok(info.flags & UBLK_F_UNPRIVILEGED_DEV != 0)
    }

    /// Send one command with `payload` (may be empty; the kernel's answer
    /// in it is copied back) and wait for its result (`cqe.res`, or the
    /// errno), at most `wait`: then it is cancelled and the result is `ETIME`.
    fn cmd(
        &mut self,
        cmd_op: u32,
        mut c: UblksrvCtrlCmd,
        payload: &mut [u8],
        wait: Duration,
    ) -> std::result::Result<i32, Errno> {
        // The kernel reads and writes a buffer of our own: one it may still
        // write after we gave up on it is leaked, never a caller's memory.
        let mut buf = payload.to_vec();
        if !buf.is_empty() {
            c.addr = buf.as_mut_ptr() as u64;
            c.len = u16::try_from(buf.len()).map_err(|_| Errno::OVERFLOW)?;
        }
        self.seq = self.seq.wrapping_add(1) & !CANCEL_BIT;
        let tag = self.seq;
        let entry = opcode::UringCmd80::new(types::Fd(self.fd.as_raw_fd()), cmd_op)
            .cmd(encode(&c))
            .build()
            // Always run by an io-wq worker (the driver would punt it there
            // anyway): this thread never blocks in the kernel, so it can give up.
            .flags(squeue::Flags::ASYNC)
            .user_data(tag);
        // SAFETY: `buf`, the only memory the command points at, is freed only
        // once the command's completion has been reaped; otherwise it is leaked.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| Errno::BUSY)?;
        let res = match self.reap(tag, Instant::now() + wait) {
            Ok(Some(res)) => res,
            Ok(None) => match self.cancel(tag) {
                Some(res) if interrupted(res) => -Errno::TIME.raw_os_error(),
                // It ended on its own meanwhile.
                Some(res) => res,
                None => {
                    self.abandon(buf);
                    return Err(Errno::TIME);
                }
            },
            Err(errno) => {
                self.abandon(buf);
                return Err(errno);
            }
        };
        if res < 0 {
            return Err(Errno::from_raw_os_error(-res));
        }
        payload.copy_from_slice(&buf);
        Ok(res)
    }

    /// The result of the completion tagged `tag`; `None` if `deadline`
    /// passes first. Other completions (a cancel's, a late one of a command
    /// given up earlier) are dropped. Submits what is queued.
    fn reap(&mut self, tag: u64, deadline: Instant) -> std::result::Result<Option<i32>, Errno> {
        loop {
            while let Some(cqe) = self.ring.completion().next() {
                if cqe.user_data() == tag {
                    return Ok(Some(cqe.result()));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let ts = types::Timespec::from(left);
            let args = types::SubmitArgs::new().timespec(&ts);
            if let Err(e) = self.ring.submitter().submit_with_args(1, &args) {
                match Errno::from_io_error(&e) {
                    Some(Errno::INTR | Errno::TIME | Errno::BUSY) => {}
                    other => return Err(other.unwrap_or(Errno::IO)),
                }
            }
        }
    }

    /// Cancel the command tagged `tag` (an io-wq worker's interruptible wait
    /// is interrupted) and give it [`deadline::CANCEL_GRACE`] to end: its
    /// result if it did.
    fn cancel(&mut self, tag: u64) -> Option<i32> {
        let entry = squeue::Entry128::from(
            opcode::AsyncCancel::new(tag)
                .build()
                .user_data(tag | CANCEL_BIT),
        );
        // SAFETY: a cancel points at no memory.
        unsafe { self.ring.submission().push(&entry) }.ok()?;
        self.reap(tag, Instant::now() + deadline::CANCEL_GRACE)
            .ok()
            .flatten()
    }

    /// Give up on a command that may still be in the kernel: its buffer is
    /// leaked (a few bytes, on a rare path) and the ring replaced, so that
    /// closing the old one cancels it once the kernel lets it go.
    fn abandon(&mut self, buf: Vec<u8>) {
        std::mem::forget(buf);
        match IoUring::builder().build(4) {
            Ok(ring) => self.ring = ring,
            // The tags keep its late completion apart on this ring.
            Err(e) => tracing::warn!("replacing the control ring: {e}"),
        }
    }

    /// A command on device `dev_id` with `payload` (may be empty), with or
    /// without the char-device path prefix; the payload is copied back
    /// after the command, for commands the kernel answers in it.
    #[allow(clippy::too_many_arguments)]
    fn raw_dev_cmd(
        &mut self,
        name: &'static str,
        cmd_op: u32,
        dev_id: u32,
        payload: &mut [u8],
        data: u64,
        prefix: bool,
        timeout: Option<Duration>,
    ) -> Result<i32> {
        let too_long = || Error::invalid(format!("{name}: command buffer too long"));
        let wait = timeout.unwrap_or_else(|| deadline::of(name));
        let fail = |errno| match errno {
            Errno::TIME => deadline::no_answer(name, dev_id.to_string(), wait),
            errno => control_error(name, dev_id, errno),
        };
        let mut c = UblksrvCtrlCmd {
            dev_id,
            queue_id: UBLK_QUEUE_ID_NONE,
            data: [data],
            ..Default::default()
        };
        if !prefix {
            if u16::try_from(payload.len()).is_err() {
                return Err(too_long());
            }
            return self.cmd(cmd_op, c, payload, wait).map_err(fail);
        }
        let (mut buf, path_len) = prefixed_buffer(dev_id, payload);
        if u16::try_from(buf.len()).is_err() {
            return Err(too_long());
        }
        c.dev_path_len = u16::try_from(path_len).map_err(|_| too_long())?;
        let res = self.cmd(cmd_op, c, &mut buf, wait).map_err(fail)?;
        if let Some(answer) = buf.get(path_len..) {
            payload.copy_from_slice(answer);
        }
        Ok(res)
    }

    /// A command on device `dev_id`, with the path prefix if the device needs it.
    fn dev_cmd(
        &mut self,
        name: &'static str,
        cmd_op: u32,
        dev_id: u32,
        payload: &mut [u8],
        data: u64,
    ) -> Result<i32> {
        let prefix = self.needs_path_prefix(dev_id)?;
        self.raw_dev_cmd(name, cmd_op, dev_id, payload, data, prefix, None)
    }

    /// The `UBLK_F_*` flags this kernel supports (GET_FEATURES, 6.5+; 0 before).
    pub fn features(&mut self) -> Result<u64> {
        let mut f: u64 = 0;
        let c = UblksrvCtrlCmd {
            dev_id: UBLK_DEV_ID_AUTO,
            queue_id: UBLK_QUEUE_ID_NONE,
            ..Default::default()
        };
        let wait = deadline::of("GET_FEATURES");
        match self.cmd(UBLK_U_CMD_GET_FEATURES, c, bytes_of(&mut f), wait) {
            Ok(_) => Ok(f),
            // Kernels before 6.5 do not know the command.
            Err(Errno::OPNOTSUPP | Errno::INVAL) => Ok(0),
            Err(Errno::TIME) => Err(deadline::no_answer("GET_FEATURES", "-".into(), wait)),
            Err(errno) => Err(control_error("GET_FEATURES", UBLK_DEV_ID_AUTO, errno)),
        }
    }

    /// ADD_DEV. `info` goes in with the request and comes back negotiated.
    pub fn add(&mut self, info: &mut DevInfo) -> Result<()> {
        let id = info.dev_id;
        let c = UblksrvCtrlCmd {
            dev_id: id,
            queue_id: UBLK_QUEUE_ID_NONE,
            ..Default::default()
        };
        let wait = deadline::of("ADD_DEV");
        let asked = if id == UBLK_DEV_ID_AUTO {
            "-".to_string()
        } else {
            id.to_string()
        };
        match self.cmd(UBLK_U_CMD_ADD_DEV, c, bytes_of(info), wait) {
            Ok(_) => {
                // The negotiated flags say it: root asking for an unprivileged
                // device gets a privileged one.
                self.prefixed
                    .insert(info.dev_id, info.flags & UBLK_F_UNPRIVILEGED_DEV != 0);
                Ok(())
            }
            Err(Errno::EXIST) => Err(Error::IdInUse(id)),
            Err(Errno::TIME) => Err(deadline::no_answer("ADD_DEV", asked, wait)),
            Err(errno) => Err(control_error("ADD_DEV", id, errno)),
        }
    }

    /// SET_PARAMS (only before START_DEV).
    pub fn set_params(&mut self, dev_id: u32, params: &UblkParams) -> Result<()> {
        let mut p = *params;
        self.dev_cmd(
            "SET_PARAMS",
            UBLK_U_CMD_SET_PARAMS,
            dev_id,
            bytes_of(&mut p),
            0,
        )
        .map(drop)
    }

    /// GET_PARAMS.
    pub fn params(&mut self, dev_id: u32) -> Result<UblkParams> {
        let mut p = UblkParams {
            len: u32::try_from(std::mem::size_of::<UblkParams>()).unwrap_or(0),
            ..Default::default()
        };
        self.dev_cmd(
            "GET_PARAMS",
            UBLK_U_CMD_GET_PARAMS,
            dev_id,
            bytes_of(&mut p),
            0,
        )?;
        Ok(p)
    }

    /// The device's info: GET_DEV_INFO2, which works for every device the
    /// caller may read (and is the only one that works for unprivileged
    /// devices); root falls back to GET_DEV_INFO (kernels before 6.3, or no
    /// `/dev/ublkcN` node in this mount namespace).
    pub fn dev_info(&mut self, dev_id: u32) -> Result<DevInfo> {
        let mut info = DevInfo::default();
        let first = self.raw_dev_cmd(
            "GET_DEV_INFO2",
            UBLK_U_CMD_GET_DEV_INFO2,
            dev_id,
            bytes_of(&mut info),
            0,
            true,
            None,
        );
        match first {
            Ok(_) => {}
            Err(e) if self.unprivileged_caller || matches!(e, Error::NoSuchDevice(_)) => {
                return Err(e)
            }
            Err(e) => {
                let mut plain = DevInfo::default();
                match self.raw_dev_cmd(
                    "GET_DEV_INFO",
                    UBLK_U_CMD_GET_DEV_INFO,
                    dev_id,
                    bytes_of(&mut plain),
                    0,
                    false,
                    None,
                ) {
                    Ok(_) => info = plain,
                    Err(Error::NoSuchDevice(id)) => return Err(Error::NoSuchDevice(id)),
                    // An unprivileged device refuses the plain form: the first error says why.
                    Err(_) => return Err(e),
                }
            }
        }
        self.prefixed
            .insert(dev_id, info.flags & UBLK_F_UNPRIVILEGED_DEV != 0);
        Ok(info)
    }

    /// START_DEV; blocks until every tag of every queue has been fetched.
    pub fn start(&mut self, dev_id: u32, pid: i32) -> Result<()> {
        let pid = u64::try_from(pid).unwrap_or(0);
        self.dev_cmd("START_DEV", UBLK_U_CMD_START_DEV, dev_id, &mut [], pid)
            .map(drop)
    }

    /// STOP_DEV; waits for in-flight I/O, so the server must keep serving meanwhile.
    pub fn stop(&mut self, dev_id: u32) -> Result<()> {
        self.dev_cmd("STOP_DEV", UBLK_U_CMD_STOP_DEV, dev_id, &mut [], 0)
            .map(drop)
    }

    /// TRY_STOP_DEV (7.0, `UBLK_F_SAFE_STOP_DEV`): STOP_DEV only if nobody has
    /// `/dev/ublkbN` open, checked and done under the disk's open lock;
    /// `Error::Control` with `EBUSY` if someone has.
    pub fn try_stop(&mut self, dev_id: u32) -> Result<()> {
        self.dev_cmd("TRY_STOP_DEV", UBLK_U_CMD_TRY_STOP_DEV, dev_id, &mut [], 0)
            .map(drop)
    }

    /// DEL_DEV; waits until every reference to `/dev/ublkcN` is gone, at most `timeout`.
    pub fn del(&mut self, dev_id: u32, timeout: Duration) -> Result<()> {
        let prefix = self.needs_path_prefix(dev_id)?;
        self.raw_dev_cmd(
            "DEL_DEV",
            UBLK_U_CMD_DEL_DEV,
            dev_id,
            &mut [],
            0,
            prefix,
            Some(timeout),
        )?;
        self.prefixed.remove(&dev_id);
        Ok(())
    }

    /// DEL_DEV_ASYNC (6.9): stop and remove the device without waiting for
    /// its last reference (a file system still mounted on it keeps the
    /// kernel's device until unmounted; the id is free only then).
    pub fn del_async(&mut self, dev_id: u32) -> Result<()> {
        let prefix = self.needs_path_prefix(dev_id)?;
        self.raw_dev_cmd(
            "DEL_DEV_ASYNC",
            UBLK_U_CMD_DEL_DEV_ASYNC,
            dev_id,
            &mut [],
            0,
            prefix,
            None,
        )?;
        self.prefixed.remove(&dev_id);
        Ok(())
    }

    /// GET_QUEUE_AFFINITY: the CPUs the kernel maps to queue `q`.
    pub fn queue_affinity(&mut self, dev_id: u32, q: u16) -> Result<Vec<usize>> {
        let mut mask = [0u64; 64]; // 4096 CPUs
        self.dev_cmd(
            "GET_QUEUE_AFFINITY",
            UBLK_U_CMD_GET_QUEUE_AFFINITY,
            dev_id,
            bytes_of(&mut mask),
            u64::from(q),
        )?;
        Ok((0..mask.len() * 64)
            .filter(|&cpu| mask[cpu / 64] & (1 << (cpu % 64)) != 0)
            .collect())
    }

    /// UPDATE_SIZE (6.16+, devices added with `UBLK_F_UPDATE_SIZE`): the
    /// live device's capacity becomes `sectors` 512-byte sectors.
    pub fn update_size(&mut self, dev_id: u32, sectors: u64) -> Result<()> {
        self.dev_cmd(
            "UPDATE_SIZE",
            UBLK_U_CMD_UPDATE_SIZE,
            dev_id,
            &mut [],
            sectors,
        )
        .map(drop)
    }

    /// START_USER_RECOVERY.
    pub fn start_recovery(&mut self, dev_id: u32) -> Result<()> {
        self.dev_cmd(
            "START_USER_RECOVERY",
            UBLK_U_CMD_START_USER_RECOVERY,
            dev_id,
            &mut [],
            0,
        )
        .map(drop)
    }

    /// END_USER_RECOVERY; blocks until every queue is fetched again.
    pub fn end_recovery(&mut self, dev_id: u32, pid: i32) -> Result<()> {
        let pid = u64::try_from(pid).unwrap_or(0);
        self.dev_cmd(
            "END_USER_RECOVERY",
            UBLK_U_CMD_END_USER_RECOVERY,
            dev_id,
            &mut [],
            pid,
        )
        .map(drop)
    }
}

impl Control {
    /// QUIESCE_DEV (Linux 6.16+, devices added with `UBLK_F_QUIESCE`): new
    /// requests wait in the kernel and the idle fetches are aborted, once
    /// every queue has one idle tag or after `timeout` (then `EBUSY`; the
    /// queues stay quiesced either way). The server then finishes what it
    /// holds and exits, leaving the device for a new one to recover.
    pub fn quiesce(&mut self, dev_id: u32, timeout: Duration) -> Result<()> {
        let ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let prefix = self.needs_path_prefix(dev_id)?;
        // The kernel's own wait is `timeout`; ours is a little longer.
        let wait = Some(timeout + Duration::from_secs(5));
        self.raw_dev_cmd(
            "QUIESCE_DEV",
            UBLK_U_CMD_QUIESCE_DEV,
            dev_id,
            &mut [],
            ms,
            prefix,
            wait,
        )
        .map(drop)
    }
}

fn control_error(cmd: &'static str, dev_id: u32, errno: Errno) -> Error {
    if errno == Errno::NODEV && dev_id != UBLK_DEV_ID_AUTO && cmd != "ADD_DEV" {
        return Error::NoSuchDevice(dev_id);
    }
    if matches!(errno, Errno::PERM | Errno::ACCESS)
        && dev_id != UBLK_DEV_ID_AUTO
        && cmd != "ADD_DEV"
    {
        // The kernel refused access to someone else's device (a privileged
        // one, or an unprivileged device of another user); its char node
        // is owned by that user once udev has run.
        let owner = rustix::fs::stat(char_path(dev_id))
            .ok()
            .map(|st| st.st_uid)
            .filter(|&uid| uid != rustix::process::geteuid().as_raw());
        return Error::DeviceAccess { id: dev_id, owner };
    }
    let hint = match errno {
        Errno::PERM | Errno::ACCESS if cmd == "ADD_DEV" => {
            " (not root: only unprivileged devices can be added, see docs/unprivileged.md)"
        }
        Errno::PERM | Errno::ACCESS => " (needs root, or an unprivileged device)",
        Errno::TIME => " (timed out: is something still holding the device open?)",
        _ => "",
    };
    let dev = if dev_id == UBLK_DEV_ID_AUTO {
        "-".to_string()
    } else {
        dev_id.to_string()
    };
    Error::Control {
        cmd,
        dev,
        errno,
        hint,
    }
}

/// Ids of every ublk device present, from sysfs.
pub fn device_ids() -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir("/sys/class/ublk-char")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("ublkc"))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids
}

/// `/dev/ublkcN`.
pub fn char_path(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkc{id}"))
}

/// `/dev/ublkbN`.
pub fn block_path(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{id}"))
}

/// Sets the block layer's I/O scheduler of `/dev/ublkbN` (its sysfs
/// `queue/scheduler`, which names what this kernel offers).
pub fn set_scheduler(id: u32, name: &str) -> Result<()> {
    let path = PathBuf::from(format!("/sys/block/ublkb{id}/queue/scheduler"));
    std::fs::write(&path, name).map_err(|e| Error::path(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_command_area() {
        let c = UblksrvCtrlCmd {
            dev_id: 0x0102_0304,
            queue_id: 0xffff,
            len: 64,
            addr: 0x1122_3344_5566_7788,
            data: [42],
            dev_path_len: 11,
            ..Default::default()
        };
        let b = encode(&c);
        assert_eq!(&b[0..4], &0x0102_0304u32.to_ne_bytes());
        assert_eq!(&b[4..6], &[0xff, 0xff]);
        assert_eq!(&b[6..8], &64u16.to_ne_bytes());
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_ne_bytes());
        assert_eq!(&b[16..24], &42u64.to_ne_bytes());
        assert_eq!(&b[24..26], &11u16.to_ne_bytes());
        assert!(b[26..].iter().all(|&x| x == 0));
    }

    #[test]
    fn state_names() {
        assert_eq!(state_name(UBLK_S_DEV_LIVE), "LIVE");
        assert_eq!(state_name(UBLK_S_DEV_QUIESCED), "QUIESCED");
        assert_eq!(state_name(9), "UNKNOWN");
    }

    #[test]
    fn path_prefix_comes_before_the_payload() {
        let (buf, path_len) = prefixed_buffer(3, &[1, 2]);
        assert_eq!(path_len, 12);
        assert_eq!(buf, b"/dev/ublkc3\0\x01\x02");
        let (buf, path_len) = prefixed_buffer(1_048_575, &[]);
        assert_eq!(path_len, buf.len());
        assert_eq!(&buf[..], b"/dev/ublkc1048575\0");
    }

    #[test]
    fn payload_bytes_cover_the_struct() {
        let mut info = DevInfo::default();
        assert_eq!(bytes_of(&mut info).len(), 64);
        bytes_of(&mut info)[40..44].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(info.owner_uid, 1000);
        let mut p = UblkParams::default();
        assert_eq!(bytes_of(&mut p).len(), std::mem::size_of::<UblkParams>());
    }

    #[test]
    fn refused_devices_say_whose_they_are() {
        let e = Error::DeviceAccess {
            id: 4,
            owner: Some(0),
        };
        assert_eq!(
            e.to_string(),
            "device 4 belongs to uid 0: permission denied"
        );
        let e = Error::DeviceAccess { id: 4, owner: None };
        assert_eq!(e.to_string(), "permission denied on device 4");
        // ADD_DEV has no device yet: a plain control error with a hint.
        let e = control_error("ADD_DEV", UBLK_DEV_ID_AUTO, Errno::PERM);
        assert!(e.to_string().contains("docs/unprivileged.md"), "{e}");
        assert!(Error::NoControlAccess
            .to_string()
            .contains("docs/unprivileged.md"));
    }

    #[test]
    fn missing_device_is_reported_by_id() {
        assert!(matches!(
            control_error("GET_DEV_INFO", 7, Errno::NODEV),
            Error::NoSuchDevice(7)
        ));
        assert!(matches!(
            control_error("ADD_DEV", 7, Errno::NODEV),
            Error::Control { .. }
        ));
    }
}
