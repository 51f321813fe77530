//! Where a request's bytes are in a qcow2 image, piece by piece: what
//! zero copy (`zc.rs`) needs to move them with ring operations, straight
//! between the image file and the request's pages where it can.

use std::sync::atomic::Ordering;

use rustix::io::Errno;

use super::image::Image;
use super::meta::{Mapping, COPIED};

/// Where one piece of a request's data comes from (reads) or goes (writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The image file from this byte offset: allocated data clusters.
    Host(u64),
    /// Zeroes: zero clusters, or unallocated ones without a backing file.
    Zeroes,
    /// Unallocated clusters over a backing file: its data.
    Backing,
    /// Compressed clusters.
    Compressed,
}

/// A run of a request's bytes with one [`Source`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Where the piece starts in the request (and in its data buffer).
    pub at: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Where its data is.
    pub source: Source,
}

/// Append `p` to `out`, merged into the last piece when it continues it.
fn push(out: &mut Vec<Piece>, p: Piece) {
    if let Some(last) = out.last_mut() {
        let continues = match (last.source, p.source) {
            (Source::Host(a), Source::Host(b)) => a + last.len == b,
            (a, b) => a == b,
        };
        if continues {
            last.len += p.len;
            return;
        }
    }
    out.push(p);
}

impl Image {
    /// The pieces a read of guest bytes `[off, off + len)` is made of, in
    /// order, covering it; neighbouring pieces of one kind are merged (data
    /// only where contiguous in the file).
    pub fn map_read(&self, off: u64, len: u64) -> Result<Vec<Piece>, Errno> {
        let cs = self.header().cluster_size();
        let backing = self.has_backing();
        let mut out = Vec::new();
        let mut meta = self.meta();
        let mut done = 0;
        while done < len {
            let pos = off + done;
            let within = pos % cs;
            let left = len - done;
            let (m, run) = meta.mapping_run(pos / cs, (within + left).div_ceil(cs))?;
            let n = (run * cs - within).min(left);
            let source = match m {
                Mapping::Data { host, .. } => Source::Host(host + within),
                Mapping::Zero { .. } => Source::Zeroes,
                Mapping::Unallocated if backing => Source::Backing,
                Mapping::Unallocated => Source::Zeroes,
                Mapping::Compressed { .. } => Source::Compressed,
            };
            push(
                &mut out,
                Piece {
                    at: done,
                    len: n,
                    source,
                },
            );
            done += n;
        }
        Ok(out)
    }

    /// Where a write of guest bytes `[off, off + len)` lands when every
    /// cluster it touches is allocated to this image alone, so the data
    /// can go straight there (pieces of [`Source::Host`]); `None` when some
    /// cluster needs allocating or copying first (that write takes
    /// [`Image::write`]).
    ///
    /// `Some` counts a write in place as in flight: the caller calls
    /// [`Image::in_place_done`] once, after every byte of it has landed or
    /// failed, and until then no flush lets a released cluster be reused.
    pub(super) fn map_in_place(&self, off: u64, len: u64) -> Result<Option<Vec<Piece>>, Errno> {
        let cs = self.header().cluster_size();
        let mut meta = self.meta();
        if let Some(why) = meta.corrupt() {
            tracing::debug!("qcow2: write refused: {why}");
            return Err(Errno::IO);
        }
        let mut found = Vec::new();
        let mut done = 0;
        while done < len {
            let pos = off + done;
            let within = pos % cs;
            let n = (cs - within).min(len - done);
            let gc = pos / cs;
            let Mapping::Data { host, copied } = meta.mapping(gc)? else {
                return Ok(None);
            };
            // As `Image::write`: a clear flag on a cluster only we use is set, not copied.
            if !copied && meta.refcount(host / cs)? != 1 {
                return Ok(None);
            }
            found.push((gc, host, copied, within, n));
            done += n;
        }
        let mut out = Vec::new();
        let mut at = 0;
        for (gc, host, copied, within, n) in found {
            if !copied {
                meta.set_entry(gc, host | COPIED)?;
            }
            push(
                &mut out,
                Piece {
                    at,
                    len: n,
                    source: Source::Host(host + within),
                },
            );
            at += n;
        }
        self.in_place.fetch_add(1, Ordering::AcqRel);
        Ok(Some(out))
    }

    /// A write that [`map_in_place`](Self::map_in_place) counted is over.
    pub(super) fn in_place_done(&self) {
        // Under the metadata lock, where flushes read the count.
        let _meta = self.meta();
        let before = self.in_place.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "in_place_done without map_in_place");
    }
}
