//! Command opcodes, ioctl-style encodings and feature flags.

/// The ioctl "type" byte of every encoded ublk command.
pub const UBLK_IOC_TYPE: u8 = b'u';

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)` as the generic (x86, arm, riscv) Linux ioctl layout defines it.
pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    // Sizes of ublk structs are tiny constants; the cast cannot truncate.
    #[allow(clippy::cast_possible_truncation)]
    let size = size as u32;
    (dir << IOC_DIRSHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
        | (size << IOC_SIZESHIFT)
}

/// `_IOR('u', nr, T)`.
pub const fn ior(nr: u8, size: usize) -> u32 {
    ioc(IOC_READ, UBLK_IOC_TYPE, nr, size)
}

/// `_IOWR('u', nr, T)`.
pub const fn iowr(nr: u8, size: usize) -> u32 {
    ioc(IOC_READ | IOC_WRITE, UBLK_IOC_TYPE, nr, size)
}

const CTRL: usize = core::mem::size_of::<crate::UblksrvCtrlCmd>();
const IO: usize = core::mem::size_of::<crate::UblksrvIoCmd>();

// Control commands, sent to /dev/ublk-control with an SQE128 URING_CMD.
/// Read the CPUs mapped to a hardware queue (6.0).
pub const UBLK_U_CMD_GET_QUEUE_AFFINITY: u32 = ior(0x01, CTRL);
/// Read `ublksrv_ctrl_dev_info` (6.0).
pub const UBLK_U_CMD_GET_DEV_INFO: u32 = ior(0x02, CTRL);
/// Create a device; the kernel writes the negotiated info back (6.0).
pub const UBLK_U_CMD_ADD_DEV: u32 = iowr(0x04, CTRL);
/// Stop if needed, remove, and wait for the last reference (6.0).
pub const UBLK_U_CMD_DEL_DEV: u32 = iowr(0x05, CTRL);
/// Create `/dev/ublkbN` once every tag is fetched (6.0).
pub const UBLK_U_CMD_START_DEV: u32 = iowr(0x06, CTRL);
/// Remove `/dev/ublkbN` and abort the armed fetches (6.0).
pub const UBLK_U_CMD_STOP_DEV: u32 = iowr(0x07, CTRL);
/// Set `ublk_params`; only before START_DEV (6.0).
pub const UBLK_U_CMD_SET_PARAMS: u32 = iowr(0x08, CTRL);
/// Read `ublk_params` (6.0).
pub const UBLK_U_CMD_GET_PARAMS: u32 = ior(0x09, CTRL);
/// Begin replacing a dead server (6.1).
pub const UBLK_U_CMD_START_USER_RECOVERY: u32 = iowr(0x10, CTRL);
/// Finish replacing a dead server; waits until every queue is fetched (6.1).
pub const UBLK_U_CMD_END_USER_RECOVERY: u32 = iowr(0x11, CTRL);
/// GET_DEV_INFO with the char-device path prefix (6.3).
pub const UBLK_U_CMD_GET_DEV_INFO2: u32 = ior(0x12, CTRL);
/// Read the kernel's supported `UBLK_F_*` set; no device needed (6.5).
pub const UBLK_U_CMD_GET_FEATURES: u32 = ior(0x13, CTRL);
/// DEL_DEV without waiting for the last reference (6.9). `_IOR`, as in the kernel header.
pub const UBLK_U_CMD_DEL_DEV_ASYNC: u32 = ior(0x14, CTRL);
/// Change the capacity of a live device (6.16).
pub const UBLK_U_CMD_UPDATE_SIZE: u32 = iowr(0x15, CTRL);
/// Quiesce for a planned server hand-off (6.16).
pub const UBLK_U_CMD_QUIESCE_DEV: u32 = iowr(0x16, CTRL);
/// STOP_DEV only if nobody has `/dev/ublkbN` open, else `EBUSY`; later opens
/// fail while it stops (7.0, `UBLK_F_SAFE_STOP_DEV`).
pub const UBLK_U_CMD_TRY_STOP_DEV: u32 = iowr(0x17, CTRL);

// I/O commands, sent to /dev/ublkcN with a 64-byte-SQE URING_CMD.
/// Arm a tag for its first request.
pub const UBLK_U_IO_FETCH_REQ: u32 = iowr(0x20, IO);
/// Complete a tag's request and re-arm it.
pub const UBLK_U_IO_COMMIT_AND_FETCH_REQ: u32 = iowr(0x21, IO);
/// Supply the buffer for a WRITE in NEED_GET_DATA mode.
pub const UBLK_U_IO_NEED_GET_DATA: u32 = iowr(0x22, IO);

/// `cqe.res` of a fetch: a request is ready in the tag's descriptor.
pub const UBLK_IO_RES_OK: i32 = 0;
/// `cqe.res` in NEED_GET_DATA mode: a WRITE arrived without its data.
pub const UBLK_IO_RES_NEED_GET_DATA: i32 = 1;
/// `cqe.res` of a cancelled fetch (stop, teardown): do not re-arm the tag. It is `-ENODEV`.
pub const UBLK_IO_RES_ABORT: i32 = -19;

// Feature flags (`ublksrv_ctrl_dev_info.flags`, GET_FEATURES).
/// Zero copy (works from 6.15; masked off before).
pub const UBLK_F_SUPPORT_ZERO_COPY: u64 = 1 << 0;
/// Legacy; forced on by the kernel.
pub const UBLK_F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
/// WRITE data is fetched with a separate NEED_GET_DATA command.
pub const UBLK_F_NEED_GET_DATA: u64 = 1 << 2;
/// The device survives its server; a new server may recover it (6.1).
pub const UBLK_F_USER_RECOVERY: u64 = 1 << 3;
/// With recovery, requests in flight to a dead server are reissued (6.1).
pub const UBLK_F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
/// A device created by a user without CAP_SYS_ADMIN (6.3).
pub const UBLK_F_UNPRIVILEGED_DEV: u64 = 1 << 5;
/// Commands are ioctl-encoded; forced on by the kernel (6.4).
pub const UBLK_F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
/// The server copies data with pread/pwrite on /dev/ublkcN (6.5).
pub const UBLK_F_USER_COPY: u64 = 1 << 7;
/// Zoned block device (6.6).
pub const UBLK_F_ZONED: u64 = 1 << 8;
/// Recovery that fails new I/O while no server runs (6.13).
pub const UBLK_F_USER_RECOVERY_FAIL_IO: u64 = 1 << 9;
/// UPDATE_SIZE is allowed (6.16).
pub const UBLK_F_UPDATE_SIZE: u64 = 1 << 10;
/// Automatic zero-copy buffer registration (6.16).
pub const UBLK_F_AUTO_BUF_REG: u64 = 1 << 11;
/// QUIESCE_DEV is allowed (6.16).
pub const UBLK_F_QUIESCE: u64 = 1 << 12;
/// Each tag may be served by its own task (6.16).
pub const UBLK_F_PER_IO_DAEMON: u64 = 1 << 13;
/// Zero-copy buffer registration from any task (6.17).
pub const UBLK_F_BUF_REG_OFF_DAEMON: u64 = 1 << 14;
/// Batched fetch and commit commands (7.0).
pub const UBLK_F_BATCH_IO: u64 = 1 << 15;
/// Integrity metadata (7.0).
pub const UBLK_F_INTEGRITY: u64 = 1 << 16;
/// TRY_STOP_DEV is allowed (7.0).
pub const UBLK_F_SAFE_STOP_DEV: u64 = 1 << 17;
/// No partition scan at START_DEV (7.0).
pub const UBLK_F_NO_AUTO_PART_SCAN: u64 = 1 << 18;
/// Zero copy through shared memory the server registers (7.1).
pub const UBLK_F_SHMEM_ZC: u64 = 1 << 19;

/// Every feature flag this crate knows, with its name, in bit order.
pub const UBLK_F_NAMES: &[(u64, &str)] = &[
    (UBLK_F_SUPPORT_ZERO_COPY, "ZERO_COPY"),
    (UBLK_F_URING_CMD_COMP_IN_TASK, "COMP_IN_TASK"),
    (UBLK_F_NEED_GET_DATA, "NEED_GET_DATA"),
    (UBLK_F_USER_RECOVERY, "USER_RECOVERY"),
    (UBLK_F_USER_RECOVERY_REISSUE, "USER_RECOVERY_REISSUE"),
    (UBLK_F_UNPRIVILEGED_DEV, "UNPRIVILEGED_DEV"),
    (UBLK_F_CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE"),
    (UBLK_F_USER_COPY, "USER_COPY"),
    (UBLK_F_ZONED, "ZONED"),
    (UBLK_F_USER_RECOVERY_FAIL_IO, "USER_RECOVERY_FAIL_IO"),
    (UBLK_F_UPDATE_SIZE, "UPDATE_SIZE"),
    (UBLK_F_AUTO_BUF_REG, "AUTO_BUF_REG"),
    (UBLK_F_QUIESCE, "QUIESCE"),
    (UBLK_F_PER_IO_DAEMON, "PER_IO_DAEMON"),
    (UBLK_F_BUF_REG_OFF_DAEMON, "BUF_REG_OFF_DAEMON"),
    (UBLK_F_BATCH_IO, "BATCH_IO"),
    (UBLK_F_INTEGRITY, "INTEGRITY"),
    (UBLK_F_SAFE_STOP_DEV, "SAFE_STOP_DEV"),
    (UBLK_F_NO_AUTO_PART_SCAN, "NO_AUTO_PART_SCAN"),
    (UBLK_F_SHMEM_ZC, "SHMEM_ZC"),
];

// Device states (`ublksrv_ctrl_dev_info.state`).
/// Not started, or stopped.
pub const UBLK_S_DEV_DEAD: u16 = 0;
/// Started and serving.
pub const UBLK_S_DEV_LIVE: u16 = 1;
/// Server gone with recovery enabled; I/O is queued (6.1).
pub const UBLK_S_DEV_QUIESCED: u16 = 2;
/// Server gone with FAIL_IO recovery; new I/O fails (6.13).
pub const UBLK_S_DEV_FAIL_IO: u16 = 3;

/// Largest queue depth the kernel accepts.
pub const UBLK_MAX_QUEUE_DEPTH: u16 = 4096;
/// Largest number of hardware queues the kernel accepts.
pub const UBLK_MAX_NR_QUEUES: u16 = 4096;
/// `dev_id` value asking ADD_DEV to allocate an id.
pub const UBLK_DEV_ID_AUTO: u32 = u32::MAX;
/// `queue_id` of control commands that are not per-queue.
pub const UBLK_QUEUE_ID_NONE: u16 = u16::MAX;

/// mmap offset of queue 0's descriptor array on `/dev/ublkcN`.
pub const UBLKSRV_CMD_BUF_OFFSET: u64 = 0;
/// USER_COPY: base file offset of request buffers on `/dev/ublkcN`.
pub const UBLKSRV_IO_BUF_OFFSET: u64 = 0x8000_0000;
/// USER_COPY: bits of byte offset within one request's buffer.
pub const UBLK_IO_BUF_BITS: u32 = 25;
/// USER_COPY: bits of tag.
pub const UBLK_TAG_BITS: u32 = 16;
/// USER_COPY: shift of the tag in the file offset.
pub const UBLK_TAG_OFF: u32 = UBLK_IO_BUF_BITS;
/// USER_COPY: shift of the queue id in the file offset.
pub const UBLK_QID_OFF: u32 = UBLK_TAG_OFF + UBLK_TAG_BITS;

/// Byte offset of queue `q`'s descriptor array in the mmap of `/dev/ublkcN`.
///
/// The stride is sized for the maximum depth, not the device's depth, so a
/// server that used its own depth would read queue 0's descriptors for every
/// queue.
///
/// ```
/// assert_eq!(userblk_uapi::desc_mmap_offset(1, 4096), 98304);
/// ```
pub const fn desc_mmap_offset(q: u16, page_size: usize) -> u64 {
    let per_queue = UBLK_MAX_QUEUE_DEPTH as usize * core::mem::size_of::<crate::UblksrvIoDesc>();
    let stride = per_queue.div_ceil(page_size) * page_size;
    UBLKSRV_CMD_BUF_OFFSET + q as u64 * stride as u64
}

/// Length of the descriptor mmap for one queue of depth `depth`.
///
/// ```
/// assert_eq!(userblk_uapi::desc_mmap_len(128, 4096), 4096);
/// ```
pub const fn desc_mmap_len(depth: u16, page_size: usize) -> usize {
    let bytes = depth as usize * core::mem::size_of::<crate::UblksrvIoDesc>();
    bytes.div_ceil(page_size) * page_size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_match_the_kernel_header() {
        assert_eq!(UBLK_U_CMD_GET_QUEUE_AFFINITY, 0x8020_7501);
        assert_eq!(UBLK_U_CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(UBLK_U_CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(UBLK_U_CMD_DEL_DEV, 0xc020_7505);
        assert_eq!(UBLK_U_CMD_START_DEV, 0xc020_7506);
        assert_eq!(UBLK_U_CMD_STOP_DEV, 0xc020_7507);
        assert_eq!(UBLK_U_CMD_SET_PARAMS, 0xc020_7508);
        assert_eq!(UBLK_U_CMD_GET_PARAMS, 0x8020_7509);
        assert_eq!(UBLK_U_CMD_START_USER_RECOVERY, 0xc020_7510);
        assert_eq!(UBLK_U_CMD_END_USER_RECOVERY, 0xc020_7511);
        assert_eq!(UBLK_U_CMD_GET_DEV_INFO2, 0x8020_7512);
        assert_eq!(UBLK_U_CMD_GET_FEATURES, 0x8020_7513);
        assert_eq!(UBLK_U_CMD_DEL_DEV_ASYNC, 0x8020_7514);
        assert_eq!(UBLK_U_CMD_UPDATE_SIZE, 0xc020_7515);
        assert_eq!(UBLK_U_CMD_QUIESCE_DEV, 0xc020_7516);
        assert_eq!(UBLK_U_CMD_TRY_STOP_DEV, 0xc020_7517);
        assert_eq!(UBLK_U_IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
        assert_eq!(UBLK_U_IO_NEED_GET_DATA, 0xc010_7522);
    }

    #[test]
    fn descriptor_mmap_geometry() {
        assert_eq!(desc_mmap_offset(0, 4096), 0);
        assert_eq!(desc_mmap_offset(2, 4096), 2 * 98304);
        assert_eq!(desc_mmap_offset(1, 65536), 131072);
        assert_eq!(desc_mmap_len(1, 4096), 4096);
        assert_eq!(desc_mmap_len(171, 4096), 8192);
        assert_eq!(desc_mmap_len(4096, 4096), 98304);
    }

    #[test]
    fn feature_names_are_single_bits_in_order() {
        for (i, (bit, _)) in UBLK_F_NAMES.iter().enumerate() {
            assert_eq!(*bit, 1u64 << i);
        }
    }
}
