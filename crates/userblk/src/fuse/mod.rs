//! The FUSE frontend: a target exported as one regular file on a FUSE mount.
//!
//! For kernels without `ublk_drv`: every Linux has FUSE, and a loop device
//! ([`crate::loopdev`]) on the exported file makes it a real block device.
//! [`export`] maps file operations to block requests; [`disk`] mounts,
//! serves and unmounts; [`conn`] aborts a mount's connection (fusectl).

pub mod conn;
pub mod disk;
pub mod export;
pub mod fusermount;

pub use disk::{FuseDisk, FuseOptions, Unmounted, MAX_THREADS};
pub use export::{Counters, DiskFs, DISK_NAME};
