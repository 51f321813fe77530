//! Device parameters (`struct ublk_params` and its parts).

/// Parameter type bit: `ublk_param_basic` (required).
pub const UBLK_PARAM_TYPE_BASIC: u32 = 1 << 0;
/// Parameter type bit: `ublk_param_discard`.
pub const UBLK_PARAM_TYPE_DISCARD: u32 = 1 << 1;
/// Parameter type bit: `ublk_param_devt` (read-only; never set it).
pub const UBLK_PARAM_TYPE_DEVT: u32 = 1 << 2;
/// Parameter type bit: `ublk_param_zoned` (6.6).
pub const UBLK_PARAM_TYPE_ZONED: u32 = 1 << 3;
/// Parameter type bit: `ublk_param_dma_align` (6.15).
pub const UBLK_PARAM_TYPE_DMA_ALIGN: u32 = 1 << 4;
/// Parameter type bit: `ublk_param_segment` (6.15).
pub const UBLK_PARAM_TYPE_SEGMENT: u32 = 1 << 5;
/// Parameter type bit: `ublk_param_integrity` (7.0).
pub const UBLK_PARAM_TYPE_INTEGRITY: u32 = 1 << 6;

/// Basic attribute: read-only device.
pub const UBLK_ATTR_READ_ONLY: u32 = 1 << 0;
/// Basic attribute: rotational device.
pub const UBLK_ATTR_ROTATIONAL: u32 = 1 << 1;
/// Basic attribute: the device has a volatile write cache, so the kernel sends FLUSH.
pub const UBLK_ATTR_VOLATILE_CACHE: u32 = 1 << 2;
/// Basic attribute: the device honours FUA (needs VOLATILE_CACHE).
pub const UBLK_ATTR_FUA: u32 = 1 << 3;

/// `struct ublk_param_basic` (32 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UblkParamBasic {
    /// `UBLK_ATTR_*`.
    pub attrs: u32,
    /// log2 of the logical block size, 9..=PAGE_SHIFT.
    pub logical_bs_shift: u8,
    /// log2 of the physical block size.
    pub physical_bs_shift: u8,
    /// log2 of the optimal I/O size.
    pub io_opt_shift: u8,
    /// log2 of the minimum I/O size.
    pub io_min_shift: u8,
    /// Largest request in sectors; at most `max_io_buf_bytes >> 9`.
    pub max_sectors: u32,
    /// Chunk (zone) size in sectors.
    pub chunk_sectors: u32,
    /// Capacity in 512-byte sectors.
    pub dev_sectors: u64,
    /// Virtual boundary mask.
    pub virt_boundary_mask: u64,
}

/// `struct ublk_param_discard` (20 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UblkParamDiscard {
    /// Discard alignment in bytes.
    pub discard_alignment: u32,
    /// Discard granularity in bytes; must be non-zero.
    pub discard_granularity: u32,
    /// Largest discard in sectors; 0 disables discard.
    pub max_discard_sectors: u32,
    /// Largest write-zeroes in sectors; 0 disables write-zeroes.
    pub max_write_zeroes_sectors: u32,
    /// Must be exactly 1 when discard is enabled.
    pub max_discard_segments: u16,
    /// Reserved.
    pub reserved0: u16,
}

/// `struct ublk_param_devt` (16 bytes), filled by the kernel on GET_PARAMS.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UblkParamDevt {
    /// Major of `/dev/ublkcN`.
    pub char_major: u32,
    /// Minor of `/dev/ublkcN`.
    pub char_minor: u32,
    /// Major of `/dev/ublkbN`, 0 before START_DEV.
    pub disk_major: u32,
    /// Minor of `/dev/ublkbN`, 0 before START_DEV.
    pub disk_minor: u32,
}

/// `struct ublk_param_zoned` (32 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UblkParamZoned {
    /// Max open zones.
    pub max_open_zones: u32,
    /// Max active zones.
    pub max_active_zones: u32,
    /// Max zone-append size in sectors.
    pub max_zone_append_sectors: u32,
    /// Reserved.
    pub reserved: [u8; 20],
}

/// `struct ublk_param_dma_align` (8 bytes, 6.15).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UblkParamDmaAlign {
    /// DMA alignment mask.
    pub alignment: u32,
    /// Padding.
    pub pad: [u8; 4],
}

/// `struct ublk_param_segment` (16 bytes, 6.15).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UblkParamSegment {
    /// Segment boundary mask.
    pub seg_boundary_mask: u64,
    /// Max segment size, at least 4096.
    pub max_segment_size: u32,
    /// Max segments.
    pub max_segments: u16,
    /// Padding.
    pub pad: [u8; 2],
}

/// `struct ublk_param_integrity` (16 bytes, 7.0).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UblkParamIntegrity {
    /// Flags.
    pub flags: u32,
    /// Max integrity segments.
    pub max_integrity_segments: u16,
    /// log2 of the protection interval.
    pub interval_exp: u8,
    /// Metadata bytes per interval.
    pub metadata_size: u8,
    /// Offset of the protection information.
    pub pi_offset: u8,
    /// Checksum type.
    pub csum_type: u8,
    /// Tag size.
    pub tag_size: u8,
    /// Padding.
    pub pad: [u8; 5],
}

/// `struct ublk_params` in the newest layout (152 bytes).
///
/// Older kernels copy only the prefix they know (112 bytes on 6.12) and drop
/// unknown type bits, so this one layout serves every kernel.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UblkParams {
    /// Size of this struct as the server sees it.
    pub len: u32,
    /// `UBLK_PARAM_TYPE_*` bits of the parts that are valid.
    pub types: u32,
    /// Basic limits.
    pub basic: UblkParamBasic,
    /// Discard and write-zeroes limits.
    pub discard: UblkParamDiscard,
    /// Device numbers (read-only).
    pub devt: UblkParamDevt,
    /// Zoned limits.
    pub zoned: UblkParamZoned,
    /// DMA alignment.
    pub dma: UblkParamDmaAlign,
    /// Segment limits.
    pub seg: UblkParamSegment,
    /// Integrity.
    pub integrity: UblkParamIntegrity,
}

layout! {
    UblkParams: 152 bytes, test params_layout {
        len: 0,
        types: 4,
        basic: 8,
        discard: 40,
        devt: 60,
        zoned: 76,
        dma: 108,
        seg: 120,
        integrity: 136,
    }
}

layout! {
    UblkParamBasic: 32 bytes, test basic_layout {
        attrs: 0,
        logical_bs_shift: 4,
        physical_bs_shift: 5,
        io_opt_shift: 6,
        io_min_shift: 7,
        max_sectors: 8,
        chunk_sectors: 12,
        dev_sectors: 16,
        virt_boundary_mask: 24,
    }
}

layout! {
    UblkParamDiscard: 20 bytes, test discard_layout {
        discard_alignment: 0,
        discard_granularity: 4,
        max_discard_sectors: 8,
        max_write_zeroes_sectors: 12,
        max_discard_segments: 16,
        reserved0: 18,
    }
}

layout! {
    UblkParamDevt: 16 bytes, test devt_layout {
        char_major: 0,
        char_minor: 4,
        disk_major: 8,
        disk_minor: 12,
    }
}

layout! {
    UblkParamZoned: 32 bytes, test zoned_layout {
        max_open_zones: 0,
        max_active_zones: 4,
        max_zone_append_sectors: 8,
        reserved: 12,
    }
}

layout! {
    UblkParamDmaAlign: 8 bytes, test dma_align_layout {
        alignment: 0,
    }
}

layout! {
    UblkParamSegment: 16 bytes, test segment_layout {
        seg_boundary_mask: 0,
        max_segment_size: 8,
        max_segments: 12,
    }
}

layout! {
    UblkParamIntegrity: 16 bytes, test integrity_layout {
        flags: 0,
        max_integrity_segments: 4,
        interval_exp: 6,
        metadata_size: 7,
        pi_offset: 8,
        csum_type: 9,
        tag_size: 10,
        pad: 11,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn the_612_prefix_is_112_bytes() {
        // 6.12 copies header + basic + discard + devt + zoned, padded to 8.
        let prefix = offset_of!(UblkParams, zoned) + size_of::<UblkParamZoned>();
        assert_eq!(prefix.div_ceil(8) * 8, 112);
    }
}
