//! io_uring plumbing shared by every frontend: page-aligned buffers, the ring
//! with its request context, and a small engine that drives one request at a
//! time (tests, simple frontends).

pub mod buf;
pub mod engine;
pub mod ring;

pub use buf::AlignedBuf;
pub use engine::Engine;
pub use ring::{Ctx, Ring};
