//! The Linux ublk kernel ABI (`include/uapi/linux/ublk_cmd.h`), written by hand.
//!
//! Only `#[repr(C)]` plain-old-data structs, constants and command encodings
//! live here: no logic and no syscalls. Every struct is pinned by one
//! `layout!` declaration: a compile-time size check and a test of every
//! field offset, so a layout mistake fails the build rather than
//! corrupting a kernel command. No bindgen is used, so no libclang is
//! needed to build.
//!
//! Values and layouts follow the mainline header; the kernel version that
//! introduced each item is noted where it matters for negotiation.

#![no_std]

#[cfg(not(target_os = "linux"))]
compile_error!("userblk-uapi describes a Linux kernel ABI and only builds for Linux");

/// Pins `$t` to the kernel header's layout in one place: its size is
/// checked when the crate builds (a mistake fails the build rather than
/// corrupting a kernel command), and the test `$test` checks the size and
/// the offset of every field listed.
macro_rules! layout {
    ($t:ident: $size:literal bytes, test $test:ident { $($field:ident: $off:literal),+ $(,)? }) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);

        #[cfg(test)]
        #[test]
        fn $test() {
            assert_eq!(core::mem::size_of::<$t>(), $size);
            $(
                assert_eq!(
                    core::mem::offset_of!($t, $field),
                    $off,
                    concat!(stringify!($t), ".", stringify!($field))
                );
            )+
        }
    };
}

mod batch;
mod cmd;
mod ctrl;
mod io;
pub mod loop_dev;
mod params;

pub use batch::*;
pub use cmd::*;
pub use ctrl::*;
pub use io::*;
pub use loop_dev::*;
pub use params::*;
