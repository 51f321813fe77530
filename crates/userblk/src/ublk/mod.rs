//! The ublk frontend: the kernel's `ublk_drv` driving our queue threads.
//!
//! - `add_flags`: ADD_DEV flags of newer kernels and their fallbacks.
//! - [`ctrl`]: `/dev/ublk-control` commands.
//! - [`deadline`]: how long each control command may take.
//! - [`desc`]: the mmap'd request descriptors of a queue.
//! - [`queue`]: the per-tag queue driver (and what both drivers share).
//! - [`batch`]: the batch queue driver (`UBLK_F_BATCH_IO`).
//! - [`device`]: lifecycle (add, serve, stop, delete).
//! - [`handover`]: quiescing a device for a new daemon (`userblk upgrade`).
//! - [`stop`]: `del` that refuses a device someone holds.
//! - [`capabilities`]: what each kernel flag lets userblk do (`userblk features`).
//! - [`params`], [`features`]: what is advertised and what the kernel offers.
//! - [`io_mode`]: which of the two queue drivers a device uses.
//! - `no_fetch`: a test fail point under which START_DEV never completes.

pub(crate) mod add_flags;
pub(crate) mod batch;
pub mod capabilities;
pub mod ctrl;
pub mod deadline;
pub mod desc;
pub mod device;
pub mod features;
pub mod handover;
pub mod io_mode;
pub(crate) mod no_fetch;
pub mod params;
pub(crate) mod queue;
pub mod stop;

pub use ctrl::{Control, DevInfo};
pub use device::{Device, DeviceConfig, Live, Stopper};
pub use features::Features;
