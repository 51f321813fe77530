//! io_uring plumbing shared by every frontend: page-aligned buffers, the
//! ring (with the mailbox other threads complete deferred work through),
//! shared mappings, whole-buffer positioned reads and writes
//! ([`fd`]), and opening a file of the type expected without blocking ([`open`]). Knows nothing of block requests: those are the
//! [`target`](crate::target) layer's, and the request slots that drive
//! targets over a ring are [`slots`](crate::slots).

pub mod buf;
pub mod fd;
pub mod mapping;
pub mod open;
pub mod provided;
pub mod ring;

pub use buf::AlignedBuf;
pub use mapping::SharedMapping;
pub use ring::{Deferred, Ring};
