//! The loop device ABI (`include/uapi/linux/loop.h`): the 64-bit status struct,
//! `LOOP_CONFIGURE`'s config, the flags and the (legacy, un-encoded) ioctl numbers.

/// Length of `lo_file_name` and `lo_crypt_name`, NUL included.
pub const LO_NAME_SIZE: usize = 64;
/// Length of `lo_encrypt_key` (obsolete; always zero for us).
pub const LO_KEY_SIZE: usize = 32;

/// Loop flag: the device is read-only (set by the kernel when the backing file or the
/// device was opened without write access; settable only through `LOOP_CONFIGURE`).
pub const LO_FLAGS_READ_ONLY: u32 = 1;
/// Loop flag: detach automatically when the last opener closes the device.
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// Loop flag: scan the device for partitions.
pub const LO_FLAGS_PARTSCAN: u32 = 8;
/// Loop flag: use direct I/O on the backing file (4.4); settable through `LOOP_CONFIGURE`
/// or `LOOP_SET_DIRECT_IO`. The kernel clears it when the backing file cannot do direct I/O.
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64` (232 bytes): read by `LOOP_GET_STATUS64`, written by
/// `LOOP_SET_STATUS64`, and embedded in [`LoopConfig`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopInfo64 {
    /// Device number of the backing file's filesystem (read-only).
    pub lo_device: u64,
    /// Inode number of the backing file (read-only).
    pub lo_inode: u64,
    /// Device number of the backing file if it is a device node (read-only).
    pub lo_rdevice: u64,
    /// Byte offset of the device's start in the backing file.
    pub lo_offset: u64,
    /// Size limit in bytes; 0 means up to the end of the backing file.
    pub lo_sizelimit: u64,
    /// The device number N of `/dev/loopN` (read-only).
    pub lo_number: u32,
    /// Obsolete; must be 0 (`LO_CRYPT_NONE`).
    pub lo_encrypt_type: u32,
    /// Obsolete; must be 0.
    pub lo_encrypt_key_size: u32,
    /// `LO_FLAGS_*`.
    pub lo_flags: u32,
    /// NUL-terminated name of the backing file, for display only (the kernel does not open it).
    pub lo_file_name: [u8; LO_NAME_SIZE],
    /// Obsolete crypt name.
    pub lo_crypt_name: [u8; LO_NAME_SIZE],
    /// Obsolete key.
    pub lo_encrypt_key: [u8; LO_KEY_SIZE],
    /// Obsolete; ignored.
    pub lo_init: [u64; 2],
}

// Arrays longer than 32 have no `Default`, so this cannot be derived.
impl Default for LoopInfo64 {
    fn default() -> Self {
        Self {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }
}

/// `struct loop_config` (304 bytes): the argument of `LOOP_CONFIGURE` (5.8), which binds
/// the backing file and sets every parameter in one step.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LoopConfig {
    /// Descriptor of the backing file.
    pub fd: u32,
    /// Logical block size in bytes; 0 keeps the kernel's default.
    pub block_size: u32,
    /// Offset, size limit, flags and name; the kernel's read-only fields are ignored.
    pub info: LoopInfo64,
    /// Reserved, zero.
    pub reserved: [u64; 8],
}

/// Bind the file descriptor given as the argument to the device (kernel defaults for the rest).
pub const LOOP_SET_FD: u32 = 0x4C00;
/// Unbind the backing file; on current kernels the unbinding completes at the last close.
pub const LOOP_CLR_FD: u32 = 0x4C01;
/// Re-read the backing file's size (after it changed).
pub const LOOP_SET_CAPACITY: u32 = 0x4C07;
/// Set offset, size limit, name and the AUTOCLEAR/PARTSCAN flags from a [`LoopInfo64`].
pub const LOOP_SET_STATUS64: u32 = 0x4C04;
/// Read a bound device's [`LoopInfo64`]; `ENXIO` when unbound.
pub const LOOP_GET_STATUS64: u32 = 0x4C05;
/// Turn direct I/O on (argument 1) or off (0) (4.4); `EINVAL` if the backing file cannot do it.
pub const LOOP_SET_DIRECT_IO: u32 = 0x4C08;
/// Set the logical block size given as the argument (4.14).
pub const LOOP_SET_BLOCK_SIZE: u32 = 0x4C09;
/// Bind and configure from a [`LoopConfig`] in one step (5.8).
pub const LOOP_CONFIGURE: u32 = 0x4C0A;
/// On `/dev/loop-control`: return the number of a free device, creating one if needed.
pub const LOOP_CTL_GET_FREE: u32 = 0x4C82;

layout! {
    LoopInfo64: 232 bytes, test info64_layout {
        lo_device: 0,
        lo_inode: 8,
        lo_rdevice: 16,
        lo_offset: 24,
        lo_sizelimit: 32,
        lo_number: 40,
        lo_encrypt_type: 44,
        lo_encrypt_key_size: 48,
        lo_flags: 52,
        lo_file_name: 56,
        lo_crypt_name: 120,
        lo_encrypt_key: 184,
        lo_init: 216,
    }
}

layout! {
    LoopConfig: 304 bytes, test config_layout {
        fd: 0,
        block_size: 4,
        info: 8,
        reserved: 240,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::align_of;

    #[test]
    fn info64_alignment() {
        assert_eq!(align_of::<LoopInfo64>(), 8);
    }

    #[test]
    fn default_is_all_zero() {
        let c = LoopConfig::default();
        assert_eq!((c.fd, c.block_size, c.reserved), (0, 0, [0; 8]));
        assert_eq!(c.info.lo_file_name, [0; LO_NAME_SIZE]);
        assert_eq!(c.info.lo_flags, 0);
    }

    #[test]
    fn flags_and_numbers_match_the_header() {
        // LOOP_CONFIGURE_SETTABLE_FLAGS in loop.h is exactly these four.
        assert_eq!(
            LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN | LO_FLAGS_DIRECT_IO,
            0x1d
        );
        // The loop ioctls predate _IOC encoding: plain 0x4C ('L') << 8 | nr.
        for (op, nr) in [
            (LOOP_SET_FD, 0x00),
            (LOOP_CLR_FD, 0x01),
            (LOOP_SET_STATUS64, 0x04),
            (LOOP_GET_STATUS64, 0x05),
            (LOOP_SET_DIRECT_IO, 0x08),
            (LOOP_SET_BLOCK_SIZE, 0x09),
            (LOOP_CONFIGURE, 0x0A),
            (LOOP_CTL_GET_FREE, 0x82),
        ] {
            assert_eq!(op, (u32::from(b'L') << 8) | nr);
        }
    }
}
