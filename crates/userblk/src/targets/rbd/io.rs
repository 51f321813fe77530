//! The request path: each request becomes one librbd asynchronous call
//! (two for a FUA write: the write, then a flush), completed on a librbd
//! thread through the request's [`Deferred`].

use rustix::io::Errno;
use userblk_rbd::aio::{AioBuffer, AioOp};
use userblk_rbd::Image;

use crate::io::Deferred;
use crate::target::{ring_result, Ctx, Flags, IoResult, Op, Submit};

/// The request's own operation.
const STEP_OP: u16 = 0;
/// The flush after a FUA write.
const STEP_FUA_FLUSH: u16 = 1;

/// The Deferred lends librbd the request's buffer until it completes.
struct Lent(Deferred);

impl AioBuffer for Lent {
    fn bytes(&mut self) -> &mut [u8] {
        self.0.data_mut()
    }
}

/// A librbd return value as a ring completion value: a read must have read
/// all it asked for (librbd fills holes and reads past nothing inside the
/// image, so a short read is an error, not data).
fn ring_value(ret: isize, want: Option<usize>) -> i32 {
    let eio = -Errno::IO.raw_os_error();
    match (ret, want) {
        (r, _) if r < 0 => i32::try_from(r).unwrap_or(eio),
        (r, Some(n)) if r.unsigned_abs() != n => eio,
        (r, _) => i32::try_from(r).unwrap_or(eio),
    }
}

/// Start `op` for `ctx`'s request, completing at `step`.
fn start(image: &Image, ctx: &mut Ctx<'_>, op: AioOp, step: u16) -> Submit {
    let d = match ctx.defer(step) {
        Ok(d) => d,
        Err(e) => return Submit::Done(Err(e)),
    };
    let want = matches!(op, AioOp::Read(_)).then(|| d.data().len());
    let done = move |lent: Lent, ret: isize| lent.0.complete(ring_value(ret, want));
    match image.aio(op, Lent(d), done) {
        Ok(()) => Submit::Pending,
        Err(e) => {
            // The Deferred was dropped with the refused operation, which
            // completes it with EIO: the request ends through `complete`.
            tracing::warn!("rbd: {e}");
            Submit::Pending
        }
    }
}

pub(super) fn submit(image: &Image, ctx: &mut Ctx<'_>) -> Submit {
    let req = *ctx.req();
    if req.op.has_data() && ctx.data().len() != req.len as usize {
        return Submit::Done(Err(Errno::INVAL));
    }
    let op = match req.op {
        Op::Read => AioOp::Read(req.offset),
        Op::Write => AioOp::Write(req.offset),
        Op::Flush => AioOp::Flush,
        Op::Discard => AioOp::Discard {
            off: req.offset,
            len: u64::from(req.len),
        },
        Op::WriteZeroes => AioOp::WriteZeroes {
            off: req.offset,
            len: u64::from(req.len),
        },
    };
    start(image, ctx, op, STEP_OP)
}

pub(super) fn complete(image: &Image, ctx: &mut Ctx<'_>, step: u16, res: i32) -> Submit {
    let req = *ctx.req();
    let result: IoResult = ring_result(res);
    match (step, result) {
        (STEP_OP, Ok(_)) if req.op == Op::Write && req.flags.contains(Flags::FUA) => {
            start(image, ctx, AioOp::Flush, STEP_FUA_FLUSH)
        }
        (STEP_OP | STEP_FUA_FLUSH, Ok(_)) => Submit::Done(Ok(ctx.done_bytes())),
        (_, Err(e)) => Submit::Done(Err(errno_for_block(e))),
        _ => Submit::Done(Err(Errno::IO)),
    }
}

/// What a block device may answer: librbd's timeouts and lost connections
/// (ETIMEDOUT, ESHUTDOWN, EBLOCKLISTED...) become EIO; the errnos the
/// block layer knows pass.
fn errno_for_block(e: Errno) -> Errno {
    match e {
        Errno::NOSPC | Errno::OPNOTSUPP | Errno::INVAL | Errno::NOMEM | Errno::ROFS => e,
        _ => Errno::IO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_reads_and_errors_become_eio() {
        assert_eq!(ring_value(4096, Some(4096)), 4096);
        assert_eq!(ring_value(512, Some(4096)), -Errno::IO.raw_os_error());
        assert_eq!(ring_value(0, None), 0);
        assert_eq!(ring_value(-110, None), -110);
        assert_eq!(errno_for_block(Errno::TIMEDOUT), Errno::IO);
        assert_eq!(errno_for_block(Errno::NOSPC), Errno::NOSPC);
    }
}
