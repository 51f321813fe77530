//! The Linux ublk kernel ABI (`include/uapi/linux/ublk_cmd.h`), written by hand.
//!
//! Only `#[repr(C)]` plain-old-data structs, constants and command encodings
//! live here: no logic and no syscalls. Every struct has compile-time size
//! checks and tests of every field offset, so a layout mistake fails the
//! build rather than corrupting a kernel command. No bindgen is used, so no
//! libclang is needed to build.
//!
//! Values and layouts follow the mainline header; the kernel version that
//! introduced each item is noted where it matters for negotiation.

#![no_std]

#[cfg(not(target_os = "linux"))]
compile_error!("userblk-uapi describes a Linux kernel ABI and only builds for Linux");

mod cmd;
mod ctrl;
mod io;
pub mod loop_dev;
mod params;

pub use cmd::*;
pub use ctrl::*;
pub use io::*;
pub use loop_dev::*;
pub use params::*;
