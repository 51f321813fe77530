//! The checks every live resize goes through, whatever the frontend:
//! a size that is not 0 and a whole number of blocks, a writable device,
//! and shrinking only when the caller allowed it.
//!
//! ```
//! use userblk::{resize, targets::MemTarget, Target};
//! let t = MemTarget::new(1 << 20).unwrap();
//! assert!(resize::check(&t, 1000, false).is_err()); // not whole blocks
//! assert!(resize::check(&t, 512 << 10, false).is_err()); // a shrink, not allowed
//! assert_eq!(resize::apply(&t, 2 << 20, false).unwrap(), 2 << 20);
//! assert_eq!(t.caps().size, 2 << 20);
//! ```

use crate::target::Target;
use crate::{Error, Result};

/// Whether `target` may be resized to `new_size` bytes (shrinking only with
/// `allow_shrink`). Checks what can be known without trying, so that a
/// refusal changes nothing.
pub fn check(target: &dyn Target, new_size: u64, allow_shrink: bool) -> Result<()> {
    let caps = target.caps();
    let lbs = u64::from(caps.logical_block_size);
    if new_size == 0 {
        return Err(Error::invalid("the new size must be greater than 0"));
    }
    if new_size > crate::size::MAX {
        return Err(Error::invalid(format!(
            "the new size {new_size} is larger than the largest device, 8E less a byte"
        )));
    }
    if !new_size.is_multiple_of(lbs) {
        return Err(Error::invalid(format!(
            "the new size {new_size} is not a multiple of the device's block size {lbs}"
        )));
    }
    if caps.read_only {
        return Err(Error::cannot_resize("the device", "it is read-only"));
    }
    let now = target.size();
    if new_size < now && !allow_shrink {
        return Err(Error::invalid(format!(
            "{new_size} bytes is smaller than the device's {now}: shrinking drops the data past the new end; add --allow-shrink to do it anyway"
        )));
    }
    Ok(())
}

/// [`check`], then resize `target` to `new_size` (nothing to do when it has
/// that size already). Returns the size now.
pub fn apply(target: &dyn Target, new_size: u64, allow_shrink: bool) -> Result<u64> {
    check(target, new_size, allow_shrink)?;
    if new_size == target.size() {
        return Ok(new_size);
    }
    target.resize(new_size)
}
