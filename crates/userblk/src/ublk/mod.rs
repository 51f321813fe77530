//! The ublk frontend: the kernel's `ublk_drv` driving our queue threads.
//!
//! - [`ctrl`]: `/dev/ublk-control` commands.
//! - [`desc`]: the mmap'd request descriptors of a queue.
//! - [`queue`]: the one per-queue loop.
//! - [`device`]: lifecycle (add, serve, stop, delete).
//! - [`handover`]: quiescing a device for a new daemon (`userblk upgrade`).
//! - [`params`], [`features`]: what is advertised and what the kernel offers.

pub mod ctrl;
pub mod desc;
pub mod device;
pub mod features;
pub mod handover;
pub mod params;
pub(crate) mod queue;

pub use ctrl::{Control, DevInfo};
pub use device::{Device, DeviceConfig, Live, Stopper};
pub use features::Features;
