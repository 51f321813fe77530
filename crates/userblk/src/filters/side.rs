//! Side requests: a filter's own requests to its inner target (a `cow`
//! copy-up read, a `cache` write-back), run to completion on a private
//! [`Engine`] of the calling thread.
//!
//! A filter sees only the request it was given and that request's buffer;
//! reading a whole cluster to fill in around a partial write needs a
//! request of its own. These run synchronously: the queue thread waits for
//! them, and its other requests wait with it. That is the price of keeping
//! them simple, and the filters that use them say so in their docs.
//!
//! Rings are single-issuer, so each thread has its own engine per filter,
//! kept in a thread-local list and dropped there once the filter is gone.
//!
//! Also here: whole-buffer `pread`/`pwrite` for the filters' own files.

use std::cell::RefCell;
use std::sync::{Arc, Weak};

use rustix::io::Errno;

use crate::slots::Engine;
use crate::target::{Flags, Op, Request, Target};

thread_local! {
    /// This thread's engines, by the filter (its token) they serve.
    static ENGINES: RefCell<Vec<(Weak<()>, Engine)>> = const { RefCell::new(Vec::new()) };
}

/// Synchronous requests to one filter's inner target.
#[derive(Debug)]
pub(crate) struct SideIo {
    /// Identifies this filter's engines; they go when it does.
    token: Arc<()>,
    /// Largest request: the engine's buffer.
    chunk: u32,
}

impl SideIo {
    /// Side requests to `inner` of up to `max_len` bytes each (longer ones
    /// are split, as are ones over the inner target's own limit).
    pub(crate) fn new(inner: &dyn Target, max_len: u32) -> Self {
        let caps = inner.caps();
        let lbs = caps.logical_block_size.max(512);
        let limit = caps.max_request.unwrap_or(u32::MAX).min(max_len);
        SideIo {
            token: Arc::new(()),
            chunk: (limit / lbs * lbs).max(lbs),
        }
    }

    /// Read `buf.len()` bytes of `inner` at `offset` into `buf`.
    pub(crate) fn read(
        &self,
        inner: &dyn Target,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), Errno> {
        self.each_chunk(inner, Op::Read, Flags::NONE, offset, buf)
    }

    /// Write `data` to `inner` at `offset` (with `flags`, such as FUA).
    pub(crate) fn write(
        &self,
        inner: &dyn Target,
        offset: u64,
        flags: Flags,
        data: &mut [u8],
    ) -> Result<(), Errno> {
        self.each_chunk(inner, Op::Write, flags, offset, data)
    }

    /// Flush `inner`.
    pub(crate) fn flush(&self, inner: &dyn Target) -> Result<(), Errno> {
        self.with_engine(inner, |e| {
            e.run(inner, Request::new(Op::Flush, 0, 0), &mut [])
        })
        .map(drop)
    }

    fn each_chunk(
        &self,
        inner: &dyn Target,
        op: Op,
        flags: Flags,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), Errno> {
        self.with_engine(inner, |e| {
            let mut at = offset;
            for piece in buf.chunks_mut(self.chunk as usize) {
                let len = u32::try_from(piece.len()).map_err(|_| Errno::INVAL)?;
                let req = Request::new(op, at, len).with_flags(flags);
                let n = e.run(inner, req, piece)?;
                if n != len {
                    return Err(Errno::IO);
                }
                at += u64::from(len);
            }
            Ok(())
        })
    }

    /// Run `f` with this thread's engine for the filter, made on first use.
    fn with_engine<R>(
        &self,
        inner: &dyn Target,
        f: impl FnOnce(&mut Engine) -> Result<R, Errno>,
    ) -> Result<R, Errno> {
        // Taken out of the list while in use, so a side request that
        // somehow leads to another on this thread gets an engine of its own.
        let found = ENGINES.with(|list| {
            let mut list = list.borrow_mut();
            list.retain(|(w, _)| w.strong_count() > 0);
            let at = list
                .iter()
                .position(|(w, _)| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&self.token)))?;
            Some(list.swap_remove(at).1)
        });
        let mut engine = match found {
            Some(e) => e,
            None => Engine::new(inner, self.chunk as usize).map_err(|e| {
                tracing::error!("side requests: no engine: {e}");
                Errno::NOMEM
            })?,
        };
        let r = f(&mut engine);
        ENGINES.with(|list| {
            list.borrow_mut()
                .push((Arc::downgrade(&self.token), engine));
        });
        r
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::filters::testing::{pattern, ring_probe};

    #[test]
    fn requests_are_split_and_engines_go_with_their_filter() {
        let (inner, seen) = ring_probe(1 << 20);
        let side = SideIo::new(&*inner, 8192);
        let mut data = pattern(3, 20480);
        side.write(&*inner, 4096, Flags::FUA, &mut data).unwrap();
        let mut back = vec![0; 20480];
        side.read(&*inner, 4096, &mut back).unwrap();
        assert_eq!(back, data);
        side.flush(&*inner).unwrap();
        let reqs = seen.take();
        assert_eq!(
            reqs[..3],
            [
                Request::new(Op::Write, 4096, 8192).with_flags(Flags::FUA),
                Request::new(Op::Write, 12288, 8192).with_flags(Flags::FUA),
                Request::new(Op::Write, 20480, 4096).with_flags(Flags::FUA),
            ]
        );
        assert_eq!(reqs.len(), 7);
        let count = || ENGINES.with(|l| l.borrow().len());
        assert_eq!(count(), 1, "one engine, reused");
        drop(side);
        let other = SideIo::new(&*inner, 4096);
        other.read(&*inner, 0, &mut back[..4096]).unwrap();
        assert_eq!(count(), 1, "the dropped filter's engine went");
    }
}
