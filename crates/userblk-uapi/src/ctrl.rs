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

const _: () = assert!(core::mem::size_of::<UblksrvCtrlCmd>() == 32);
const _: () = assert!(core::mem::size_of::<UblksrvCtrlDevInfo>() == 64);

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn ctrl_cmd_layout() {
        assert_eq!(core::mem::size_of::<UblksrvCtrlCmd>(), 32);
        assert_eq!(offset_of!(UblksrvCtrlCmd, dev_id), 0);
        assert_eq!(offset_of!(UblksrvCtrlCmd, queue_id), 4);
        assert_eq!(offset_of!(UblksrvCtrlCmd, len), 6);
        assert_eq!(offset_of!(UblksrvCtrlCmd, addr), 8);
        assert_eq!(offset_of!(UblksrvCtrlCmd, data), 16);
        assert_eq!(offset_of!(UblksrvCtrlCmd, dev_path_len), 24);
        assert_eq!(offset_of!(UblksrvCtrlCmd, pad), 26);
        assert_eq!(offset_of!(UblksrvCtrlCmd, reserved), 28);
    }

    #[test]
    fn dev_info_layout() {
        assert_eq!(core::mem::size_of::<UblksrvCtrlDevInfo>(), 64);
        assert_eq!(offset_of!(UblksrvCtrlDevInfo, nr_hw_queues), 0);
        assert_eq!(offset_of!(UblksrvCtrlDevInfo, queue_depth), 2);
        assert_eq!(offset_of!(UblksrvCtrlDevInfo, state), 4);
        assert_eq!(offset_of!(UblksrvCtrlDevInfo, pad0), 6);
        assert_eq!(offset_of!(UblksrvCtrlDevInfo, max_io_buf_bytes), 8);
        assert_eq!(offset_of!(UblksrvCtrlDevInfo, dev_id), 12);
        assert_eq!(offset_of!(UblksrvCtrlDevInfo, ublksrv_pid), 16);
        assert_eq!(offset_of!(UblksrvCtrlDevInfo, pad1), 20);
        assert_eq!(offset_of!(UblksrvCtrlDevInfo, flags), 24);
        assert_eq!(offset_of!(UblksrvCtrlDevInfo, ublksrv_flags), 32);
        assert_eq!(offset_of!(UblksrvCtrlDevInfo, owner_uid), 40);
        assert_eq!(offset_of!(UblksrvCtrlDevInfo, owner_gid), 44);
        assert_eq!(offset_of!(UblksrvCtrlDevInfo, reserved1), 48);
        assert_eq!(offset_of!(UblksrvCtrlDevInfo, reserved2), 56);
    }
}
