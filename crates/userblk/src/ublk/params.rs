//! Turning a target's [`Caps`] into the ublk device parameters the kernel applies.

use userblk_uapi::*;

use crate::target::Caps;

/// Parameters for a device with `caps` and requests of at most `max_io_bytes`.
///
/// The kernel sends FLUSH only with VOLATILE_CACHE and FUA only with both
/// attributes, and discard or write-zeroes only with non-zero limits, so the
/// device advertises exactly what the target declared.
pub fn from_caps(caps: &Caps, max_io_bytes: u32) -> UblkParams {
    let max_req = caps
        .max_request
        .map_or(max_io_bytes, |m| m.min(max_io_bytes));
    let mut attrs = 0;
    if caps.read_only {
        attrs |= UBLK_ATTR_READ_ONLY;
    }
    if caps.rotational {
        attrs |= UBLK_ATTR_ROTATIONAL;
    }
    if caps.volatile_cache {
        attrs |= UBLK_ATTR_VOLATILE_CACHE;
        if caps.fua {
            attrs |= UBLK_ATTR_FUA;
        }
    }
    let shift = |v: u32| u8::try_from(v.trailing_zeros()).unwrap_or(9);
    let mut p = UblkParams {
        len: u32::try_from(std::mem::size_of::<UblkParams>()).unwrap_or(0),
        types: UBLK_PARAM_TYPE_BASIC,
        basic: UblkParamBasic {
            attrs,
            logical_bs_shift: shift(caps.logical_block_size),
            physical_bs_shift: shift(caps.physical_block_size),
            io_min_shift: shift(caps.logical_block_size),
            io_opt_shift: shift(caps.physical_block_size),
            max_sectors: max_req >> 9,
            chunk_sectors: 0,
            dev_sectors: caps.size >> 9,
            virt_boundary_mask: 0,
        },
        ..Default::default()
    };
    let sectors = |bytes: u64| {
        u32::try_from(bytes >> 9)
            .unwrap_or(u32::MAX >> 9)
            .min(u32::MAX >> 9)
    };
    let lbs_sectors = caps.logical_block_size >> 9;
    let round = |s: u32| s - s % lbs_sectors.max(1);
    if !caps.read_only && (caps.discard.is_some() || caps.write_zeroes.is_some()) {
        p.types |= UBLK_PARAM_TYPE_DISCARD;
        let granularity = caps
            .discard
            .map_or(caps.logical_block_size, |d| d.granularity);
        p.discard = UblkParamDiscard {
            discard_alignment: 0,
            discard_granularity: granularity,
            max_discard_sectors: caps.discard.map_or(0, |d| round(sectors(d.max_bytes))),
            max_write_zeroes_sectors: caps.write_zeroes.map_or(0, |z| round(sectors(z.max_bytes))),
            max_discard_segments: u16::from(caps.discard.is_some()),
            reserved0: 0,
        };
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::{RangeOpCaps, MAX_RANGE_OP_BYTES};

    #[test]
    fn basic_geometry() {
        let mut c = Caps::new(1 << 30);
        c.logical_block_size = 4096;
        let p = from_caps(&c, 512 << 10);
        assert_eq!(p.types, UBLK_PARAM_TYPE_BASIC);
        assert_eq!(p.basic.logical_bs_shift, 12);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.max_sectors, 1024);
        assert_eq!(p.basic.dev_sectors, 2 << 20);
        assert_eq!(p.basic.attrs, 0);
    }

    #[test]
    fn cache_and_fua_only_together() {
        let mut c = Caps::new(1 << 20);
        c.fua = true;
        assert_eq!(from_caps(&c, 1 << 20).basic.attrs, 0);
        c.volatile_cache = true;
        assert_eq!(
            from_caps(&c, 1 << 20).basic.attrs,
            UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA
        );
        c.read_only = true;
        assert_eq!(
            from_caps(&c, 1 << 20).basic.attrs & UBLK_ATTR_READ_ONLY,
            UBLK_ATTR_READ_ONLY
        );
    }

    #[test]
    fn discard_limits() {
        let mut c = Caps::new(1 << 30);
        let r = RangeOpCaps {
            granularity: 4096,
            max_bytes: MAX_RANGE_OP_BYTES,
        };
        c.write_zeroes = Some(r);
        let p = from_caps(&c, 1 << 20);
        assert_eq!(p.types, UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD);
        assert_eq!(p.discard.max_discard_sectors, 0);
        assert_eq!(p.discard.max_discard_segments, 0);
        assert_eq!(p.discard.max_write_zeroes_sectors, u32::MAX >> 9);
        assert_ne!(p.discard.discard_granularity, 0);
        c.discard = Some(r);
        c.logical_block_size = 4096;
        let p = from_caps(&c, 1 << 20);
        assert_eq!(p.discard.max_discard_segments, 1);
        assert_eq!(p.discard.max_discard_sectors % 8, 0);
        c.read_only = true;
        assert_eq!(from_caps(&c, 1 << 20).types, UBLK_PARAM_TYPE_BASIC);
    }

    #[test]
    fn target_limit_caps_request_size() {
        let mut c = Caps::new(1 << 30);
        c.max_request = Some(64 << 10);
        assert_eq!(from_caps(&c, 1 << 20).basic.max_sectors, 128);
    }
}
