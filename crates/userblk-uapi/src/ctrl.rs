//! Control-plane structs: the command payload and the device info.

/// The control command, placed in the SQE128 command area (`struct ublksrv_ctrl_cmd`, 32 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UblksrvCtrlCmd {
    /// Target device id; `UBLK_DEV_ID_AUTO` with ADD_DEV allocates one.
    pub dev_id: u32,
    /// Queue for per-queue commands, else `UBLK_QUEUE_ID_NONE`.
    pub queue_id: u16,
    /// Length of the buffer at `addr`.
    pub len: u16,
    /// User buffer, in or out depending on the command.
    pub addr: u64,
    /// Inline argument: pid, queue id, size, timeout.
    pub data: [u64; 1],
    /// Unprivileged devices and GET_DEV_INFO2: length of the path prefix, NUL included (6.3).
    pub dev_path_len: u16,
    /// Padding.
    pub pad: u16,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Device description exchanged by ADD_DEV and GET_DEV_INFO (`struct ublksrv_ctrl_dev_info`, 64 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UblksrvCtrlDevInfo {
    /// Hardware queues, 1..=4096; the kernel caps it at the CPU count.
    pub nr_hw_queues: u16,
    /// Tags per queue, 1..=4096.
    pub queue_depth: u16,
    /// `UBLK_S_DEV_*`.
    pub state: u16,
    /// Padding.
    pub pad0: u16,
    /// Largest request in bytes; the kernel rounds it down to the page size.
    pub max_io_buf_bytes: u32,
    /// Device id.
    pub dev_id: u32,
    /// Server pid from START_DEV or END_USER_RECOVERY; -1 once stopped.
    pub ublksrv_pid: i32,
    /// Padding.
    pub pad1: u32,
    /// `UBLK_F_*`: requested in, negotiated out.
    pub flags: u64,
    /// Opaque to the kernel, stored for the server.
    pub ublksrv_flags: u64,
    /// Owner uid, set by the kernel (6.3).
    pub owner_uid: u32,
    /// Owner gid, set by the kernel (6.3).
    pub owner_gid: u32,
    /// Reserved.
    pub reserved1: u64,
    /// Reserved.
    pub reserved2: u64,
}

layout! {
    UblksrvCtrlCmd: 32 bytes, test ctrl_cmd_layout {
        dev_id: 0,
        queue_id: 4,
        len: 6,
        addr: 8,
        data: 16,
        dev_path_len: 24,
        pad: 26,
        reserved: 28,
    }
}

layout! {
    UblksrvCtrlDevInfo: 64 bytes, test dev_info_layout {
        nr_hw_queues: 0,
        queue_depth: 2,
        state: 4,
        pad0: 6,
        max_io_buf_bytes: 8,
        dev_id: 12,
        ublksrv_pid: 16,
        pad1: 20,
        flags: 24,
        ublksrv_flags: 32,
        owner_uid: 40,
        owner_gid: 44,
        reserved1: 48,
        reserved2: 56,
    }
}
