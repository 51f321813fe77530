//! The built-in targets. Each file is one target; filters (later) wrap them.

pub mod file;
pub mod mem;
pub mod null;

pub use file::{FileOptions, FileTarget};
pub use mem::MemTarget;
pub use null::NullTarget;
