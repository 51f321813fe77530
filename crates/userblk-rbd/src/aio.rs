//! librbd's asynchronous operations, safely: the caller hands over an owner
//! of the data buffer ([`AioBuffer`]), which is kept boxed, untouched, until
//! librbd's callback (on a librbd thread) gives it back with the result.

use std::ffi::c_void;

use crate::ffi::{Api, RbdCompletion};
use crate::{Image, RbdError};

/// An operation on the image. A read or write moves the whole buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AioOp {
    /// Read into the buffer from this byte offset.
    Read(u64),
    /// Write the buffer at this byte offset.
    Write(u64),
    /// Make every completed write durable.
    Flush,
    /// Deallocate `len` bytes at `off`.
    Discard {
        /// Byte offset.
        off: u64,
        /// Bytes.
        len: u64,
    },
    /// Make `len` bytes at `off` read as zeroes ([`Image::has_write_zeroes`]).
    WriteZeroes {
        /// Byte offset.
        off: u64,
        /// Bytes.
        len: u64,
    },
}

/// Something that owns (or borrows for as long as it lives) the bytes an
/// operation reads into or writes from.
pub trait AioBuffer: Send + 'static {
    /// The bytes. Asked once per operation, after the owner is boxed, and
    /// the slice must stay where it is while the owner is not touched.
    fn bytes(&mut self) -> &mut [u8];
}

impl AioBuffer for Vec<u8> {
    fn bytes(&mut self) -> &mut [u8] {
        self
    }
}

struct Pending<B, F> {
    api: &'static Api,
    owner: B,
    done: F,
}

/// librbd's callback: free the completion, then give the owner back.
unsafe extern "C" fn on_complete<B, F: FnOnce(B, isize)>(c: RbdCompletion, arg: *mut c_void) {
    // SAFETY: `arg` is the `Pending` box `aio` leaked for this completion,
    // which librbd calls back exactly once.
    let p = unsafe { Box::from_raw(arg.cast::<Pending<B, F>>()) };
    // SAFETY: the completion is ours until released here, once.
    let ret = unsafe {
        let r = (p.api.rbd_aio_get_return_value)(c);
        (p.api.rbd_aio_release)(c);
        r
    };
    let Pending { owner, done, .. } = *p;
    done(owner, ret);
}

/// EOPNOTSUPP, for write-zeroes on a librbd without it.
const EOPNOTSUPP: i32 = 95;

impl Image {
    /// Whether this librbd has `rbd_aio_write_zeroes` (Ceph 15 and later).
    pub fn has_write_zeroes(&self) -> bool {
        crate::write_zeroes_fn().is_some()
    }

    /// Start `op` on `owner`'s buffer (ignored but for reads and writes);
    /// `done` gets the owner back on a librbd thread with the return value
    /// (bytes read for a read, 0 otherwise, or `-errno`). Never waits for
    /// the cluster. If librbd refuses the operation, the error is returned,
    /// `done` is never called and the owner is dropped.
    pub fn aio<B, F>(&self, op: AioOp, owner: B, done: F) -> Result<(), RbdError>
    where
        B: AioBuffer,
        F: FnOnce(B, isize) + Send + 'static,
    {
        let api = self.api;
        let arg = Box::into_raw(Box::new(Pending { api, owner, done }));
        // The buffer is taken once the owner has its final place in the box.
        let (buf, len) = {
            // SAFETY: `arg` is a live box, ours until handed to librbd.
            let b = unsafe { (*arg).owner.bytes() };
            (b.as_mut_ptr(), b.len())
        };
        let mut c = RbdCompletion::null();
        // SAFETY: `arg` lives until the callback or the failure paths below
        // take it back; `c` is an out-pointer.
        let r = unsafe { (api.rbd_aio_create_completion)(arg.cast(), on_complete::<B, F>, &mut c) };
        if r < 0 {
            // SAFETY: never handed to librbd: ours again.
            drop(unsafe { Box::from_raw(arg) });
            return crate::check(r, || "rbd_aio_create_completion".into()).map(drop);
        }
        let img = self.image;
        // SAFETY: an open image and a fresh completion; the buffer belongs
        // to the boxed owner, which nothing touches until the callback.
        let r = unsafe {
            match op {
                AioOp::Read(off) => (api.rbd_aio_read)(img, off, len, buf.cast(), c),
                AioOp::Write(off) => (api.rbd_aio_write)(img, off, len, buf.cast_const().cast(), c),
                AioOp::Flush => (api.rbd_aio_flush)(img, c),
                AioOp::Discard { off, len } => (api.rbd_aio_discard)(img, off, len, c),
                AioOp::WriteZeroes { off, len } => {
                    match (crate::write_zeroes_fn(), usize::try_from(len)) {
                        (Some(f), Ok(len)) => f(img, off, len, c, 0, 0),
                        _ => -EOPNOTSUPP,
                    }
                }
            }
        };
        if r < 0 {
            // librbd did not take the operation, so it never calls back.
            // SAFETY: the completion and the box are still ours, freed once.
            unsafe {
                (api.rbd_aio_release)(c);
                drop(Box::from_raw(arg));
            }
            return crate::check(r, || format!("starting rbd {op:?}")).map(drop);
        }
        Ok(())
    }
}
