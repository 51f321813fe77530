//! userblk: Linux block devices served by a userspace process.
//!
//! Layers, lowest first; each only uses the ones above it in this list:
//! - [`userblk_uapi`]: the kernel ABI (structs and constants only).
//! - [`sys`], [`io`]: the few syscalls and the io_uring plumbing every frontend shares.
//! - [`waiter`]: how a device's one non-queue thread waits (woken by the frontend, with other work in the same wait).
//! - [`target`]: the [`Target`] trait, requests, capabilities, the request context. The centre of the design.
//! - [`metrics`]: always-on request counters in a shared file per device (`userblk metrics`).
//! - [`slots`]: the one slot state machine every frontend drives (validate, submit, complete, buffer reuse).
//! - [`targets`]: null, mem and file.
//! - [`control`]: named actions a running device offers (a filter's `powercut`) and the socket serving them.
//! - [`filters`]: targets that wrap a target (readonly, offset, delay, error, stats, ...), stacked.
//! - [`spec`]: one typed description of a target and its filters, and the one factory that opens it.
//! - [`state`]: saved per-device state, shared by the frontends.
//! - [`names`]: device names (`add --name`): the rule, the claim, the `/dev/userblk/NAME` links.
//! - [`copy`]: copying one target onto another, skipping holes (`userblk copy`).
//! - [`ublk`]: the ublk frontend (control device, the one queue loop, device lifecycle).
//! - [`fuse`], [`loopdev`]: the FUSE frontend (the target as one file) and loop devices on it.
//! - [`open_files`], [`holders`]: every process's open files in one walk (shared by `del -a`); who has a block device open or mounted (`del` refuses held devices).
//! - [`limits`]: the kernel's and the process's limits a new device must fit under.
//! - [`nbd`]: the NBD protocol: a server frontend, and the client the nbd target uses.
//!
//! A target is a few dozen lines; see [`targets::null`] for the smallest one.
#![deny(unsafe_code)]

pub mod control;
pub mod copy;
pub mod error;
pub mod filters;
pub mod fuse;
pub mod holders;
pub mod io;
pub mod limits;
pub mod loopdev;
pub mod metrics;
pub mod names;
pub mod nbd;
pub mod open_files;
pub mod resize;
pub mod size;
pub mod spec;
// Reporting tests that cannot run here (shared with the integration tests).
#[cfg(test)]
#[path = "../tests/skip/mod.rs"]
mod skip;
pub mod slots;
pub mod state;
pub mod sys;
pub mod target;
pub mod targets;
pub mod ublk;
pub mod waiter;

pub use error::{Error, Result};
pub use target::{Caps, Ctx, Extent, Flags, IoResult, Op, Request, Submit, Target};
