//! `qcow2`: QEMU's copy-on-write image format, read and written.
//!
//! Versions 2 and 3; L1/L2 tables with a bounded L2 cache; refcounts of
//! any width (growing the refcount table when full); zero clusters (v3);
//! discard; compressed clusters (zlib; read, and rewritten uncompressed
//! when written to); backing chains of qcow2 and raw images. Written from
//! QEMU's `docs/interop/qcow2.txt`.
//!
//! Metadata updates reach the disk in an order that leaves the image
//! consistent after a crash at any point (leaked clusters at worst, as in
//! QEMU): see [`meta`]. Lazy refcounts are never used.
//!
//! Under ublk zero copy, reads of allocated and zero clusters and writes
//! to allocated ones are ring operations on the request's own pages; the
//! rest passes through memory as before (`zc.rs`, [`map`]).
//!
//! Not supported: encryption, external data files, extended L2 entries
//! (subclusters), zstd compression (refused at open with a clear error);
//! writing to images with internal snapshots, or marked dirty or corrupt
//! (they open read-only).
//!
//! ```
//! use userblk::targets::qcow2::{create, CreateOptions, Qcow2Target};
//! use userblk::{slots::Engine, Op, Request, Target};
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("disk.qcow2");
//! create(&CreateOptions::new(&path, 1 << 20)).unwrap();
//! let t = Qcow2Target::open(&path, false).unwrap();
//! let mut e = Engine::new(&t, 4096).unwrap();
//! e.run(&t, Request::new(Op::Write, 8192, 4096), &mut [7u8; 4096]).unwrap();
//! let mut back = [0u8; 4096];
//! e.run(&t, Request::new(Op::Read, 8192, 4096), &mut back).unwrap();
//! assert_eq!(back, [7u8; 4096]);
//! ```

mod compress;
mod create;
mod grow;
pub mod header;
mod image;
pub mod map;
pub mod meta;
#[cfg(test)]
mod tests;
mod zc;
#[cfg(test)]
mod zc_tests;

use std::path::Path;

use rustix::io::Errno;

pub use create::{create, CreateOptions};
pub use image::{Backing, Image, OpenOptions};
pub use meta::CacheSizes;

use crate::target::{Caps, Ctx, Extent, Op, RangeOpCaps, Submit, Target};

/// Why an image cannot be opened or created.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// No qcow2 magic.
    #[error("not a qcow2 image (no QFI\\xfb magic)")]
    NotQcow2,
    /// The image contradicts itself or the specification.
    #[error("corrupt image: {0}")]
    Corrupt(String),
    /// A valid image using something not implemented.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The backing chain cannot be opened.
    #[error("backing file {0}")]
    Backing(String),
    /// Another process writes the image.
    #[error("{0}")]
    Busy(String),
    /// Bad options.
    #[error("{0}")]
    Invalid(String),
    /// A system call failed: what was being done (empty where the caller
    /// names the file already), and the error.
    #[error("{}", io_message(.0, .1))]
    Io(String, std::io::Error),
}

fn io_message(what: &str, e: &std::io::Error) -> String {
    if what.is_empty() {
        e.to_string()
    } else {
        format!("{what}: {e}")
    }
}

/// Default L2 cache: 256 tables, which map 128 GiB with 64 KiB clusters.
pub const DEFAULT_L2_CACHE: usize = 256;

/// The qcow2 target.
#[derive(Debug)]
pub struct Qcow2Target {
    image: Image,
    caps: Caps,
    zc: zc::ZeroCopy,
}

impl Qcow2Target {
    /// Open the image at `path` (and its backing chain).
    pub fn open(path: &Path, read_only: bool) -> crate::Result<Self> {
        Self::open_with(
            path,
            &OpenOptions {
                read_only,
                caches: CacheSizes {
                    l2: DEFAULT_L2_CACHE,
                    refblocks: 64,
                },
            },
        )
    }

    /// Open with explicit options.
    pub fn open_with(path: &Path, opts: &OpenOptions) -> crate::Result<Self> {
        let image = Image::open(path, opts)
            .map_err(|e| crate::Error::invalid(format!("{}: {e}", path.display())))?;
        // The device ends at the last whole sector.
        let size = image.size() / 512 * 512;
        if size == 0 {
            return Err(crate::Error::invalid(format!(
                "{}: the image's virtual size is below one sector",
                path.display()
            )));
        }
        let cluster = u32::try_from(image.header().cluster_size()).unwrap_or(u32::MAX);
        let writable = !opts.read_only;
        let caps = Caps {
            read_only: opts.read_only,
            volatile_cache: writable,
            fua: writable,
            physical_block_size: cluster.clamp(512, 4096),
            discard: writable.then(|| RangeOpCaps::with_granularity(cluster)),
            write_zeroes: writable.then(|| RangeOpCaps::with_granularity(512)),
            ..Caps::new(size)
        };
        Ok(Qcow2Target {
            image,
            caps,
            zc: zc::ZeroCopy::new(),
        })
    }

    /// The open image.
    pub fn image(&self) -> &Image {
        &self.image
    }
}

impl Target for Qcow2Target {
    fn caps(&self) -> Caps {
        Caps {
            size: self.size(),
            ..self.caps
        }
    }

    fn size(&self) -> u64 {
        self.image.size() / 512 * 512
    }

    /// Grows the virtual size (a larger L1 table where needed); shrinking
    /// is refused, as `qemu-img resize` refuses it without `--shrink`.
    fn resize(&self, new_size: u64) -> crate::Result<u64> {
        let path = self.image.path().display();
        if new_size < self.size() {
            return Err(crate::Error::cannot_resize(
                format!("the qcow2 image {path}"),
                "a qcow2 image only grows (shrink it offline with `qemu-img resize --shrink`)",
            ));
        }
        self.image.grow(new_size).map_err(|e| {
            crate::Error::io(format!("{path}: growing the virtual size to {new_size}"), e)
        })?;
        Ok(self.size())
    }

    fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        let req = *ctx.req();
        if req.op.has_data() && !ctx.has_data_buffer() {
            return self.zc.submit(&self.image, ctx);
        }
        let r = match req.op {
            Op::Read => self.image.read(req.offset, ctx.data_mut()),
            Op::Write => {
                let w = self.image.write(req.offset, ctx.data());
                if w.is_ok() && req.flags.contains(crate::Flags::FUA) {
                    self.image.flush()
                } else {
                    w
                }
            }
            Op::Flush => self.image.flush(),
            Op::Discard => self.image.discard(req.offset, u64::from(req.len)),
            Op::WriteZeroes => self.image.write_zeroes(
                req.offset,
                u64::from(req.len),
                req.flags.contains(crate::Flags::NOUNMAP),
            ),
        };
        Submit::Done(r.map(|()| ctx.done_bytes()))
    }

    fn complete(&self, ctx: &mut Ctx<'_>, _step: u16, res: i32) -> Submit {
        self.zc.complete(&self.image, ctx, res)
    }

    /// Zero copy: see `zc.rs` (compressed and backing reads, and writes
    /// that allocate, copy on the way).
    fn data_on_ring_only(&self) -> bool {
        true
    }

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), Errno> {
        self.image.extents(offset, len, out)
    }

    fn describe(&self) -> serde_json::Value {
        let mut d = self.image.describe();
        d["type"] = "qcow2".into();
        d["read_only"] = self.caps.read_only.into();
        d["size"] = self.size().into();
        d
    }
}
