//! io_uring plumbing shared by every frontend: page-aligned buffers, the ring
//! with its request context, request slots for frontends with many requests
//! in flight, and a small engine that drives one request at a time (tests,
//! simple frontends).

pub mod buf;
pub mod engine;
pub mod mapping;
pub mod ring;
pub mod slots;

pub use buf::AlignedBuf;
pub use engine::Engine;
pub use mapping::SharedMapping;
pub use ring::{Ctx, Deferred, Ring};
pub use slots::Slots;
