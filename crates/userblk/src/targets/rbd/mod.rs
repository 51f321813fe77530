//! `rbd`: a Ceph RBD image, through librbd's asynchronous API.
//!
//! [`RbdTarget::open`] connects to the cluster, opens (or creates) the
//! image and takes its exclusive lock ([`lock`]), so a second writer is
//! refused with the holder's name. librbd is loaded at run time (see
//! `userblk_rbd`): without Ceph installed only opening fails.
//!
//! Requests never block the frontend thread: `submit` lends the request to
//! librbd with [`Ctx::defer`] and starts the matching `rbd_aio_*` call; its
//! callback, on a librbd thread, completes the `Deferred` through the ring's
//! mailbox ([`io`]). Flush is `rbd_aio_flush`, discard `rbd_aio_discard`,
//! write-zeroes `rbd_aio_write_zeroes` (advertised only where librbd has
//! it), FUA a write then a flush. librbd retries while the cluster is away;
//! `rados_osd_op_timeout` ([`RbdOptions::op_timeout`]) bounds each
//! operation, which then fails with EIO.

mod io;
pub mod lock;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use userblk_rbd::{ConnectOptions, Image, RbdError};

use rustix::io::Errno;

use crate::target::{Caps, Ctx, Extent, RangeOpCaps, Submit, Target};

/// How long connecting to the monitors may take, by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one operation may wait for the cluster before it fails, by default.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(30);

/// What to open and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdOptions {
    /// Cluster, pool, image, client id and timeouts.
    pub connect: ConnectOptions,
    /// Take the image even though another client holds its lock.
    pub break_lock: bool,
}

impl RbdOptions {
    /// `pool/image` with Ceph's default configuration and our timeouts.
    pub fn new(pool: &str, image: &str) -> Self {
        RbdOptions {
            connect: ConnectOptions {
                pool: pool.to_string(),
                image: image.to_string(),
                conf: None,
                id: None,
                create_size: None,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                op_timeout: DEFAULT_OP_TIMEOUT,
            },
            break_lock: false,
        }
    }
}

/// The rbd target.
pub struct RbdTarget {
    image: Image,
    opts: RbdOptions,
    caps: Caps,
    size: AtomicU64,
    owner: String,
    created: bool,
}

impl RbdTarget {
    /// Connect, open the image (creating it if `create_size` is set and it
    /// is missing) and take its exclusive lock.
    pub fn open(opts: RbdOptions) -> Result<Self, RbdError> {
        let image = Image::open(&opts.connect)?;
        let owner = lock::take(&image, opts.break_lock)?;
        let info = image.stat()?;
        let size = info.size / 512 * 512;
        let mut caps = Caps::new(size);
        caps.volatile_cache = true;
        caps.fua = true;
        // Objects are the unit RBD deallocates; smaller discards may be
        // skipped (rbd_skip_partial_discard), which a discard allows.
        let object = u32::try_from(info.obj_size)
            .ok()
            .filter(|o| o.is_power_of_two() && *o >= 512)
            .unwrap_or(4 << 20);
        caps.discard = Some(RangeOpCaps::with_granularity(object));
        if image.has_write_zeroes() {
            caps.write_zeroes = Some(RangeOpCaps::with_granularity(512));
        }
        caps.check().map_err(|e| RbdError::Call {
            what: format!("image {}: {e}", image.name()),
            errno: rustix::io::Errno::INVAL.raw_os_error(),
        })?;
        tracing::info!(
            "rbd: {} open, {size} bytes, exclusive lock held as {owner}",
            image.name()
        );
        let created = image.created();
        Ok(RbdTarget {
            image,
            opts,
            caps,
            size: AtomicU64::new(size),
            owner,
            created,
        })
    }

    /// Whether `open` created the image.
    pub fn created(&self) -> bool {
        self.created
    }
}

impl Target for RbdTarget {
    fn caps(&self) -> Caps {
        Caps {
            size: self.size(),
            ..self.caps
        }
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn resize(&self, new_size: u64) -> crate::Result<u64> {
        self.image.resize(new_size).map_err(|e| {
            crate::Error::cannot_resize(format!("rbd image {}", self.image.name()), e.to_string())
        })?;
        self.size.store(new_size, Ordering::Release);
        Ok(new_size)
    }

    fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        io::submit(&self.image, ctx)
    }

    fn complete(&self, ctx: &mut Ctx<'_>, step: u16, res: i32) -> Submit {
        io::complete(&self.image, ctx, step, res)
    }

    /// From the object map (`rbd_diff_iterate2` by whole objects): objects
    /// never written are holes; one that exists is data throughout.
    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), Errno> {
        let Ok(ranges) = self.image.allocated(offset, len) else {
            out.push(Extent::data(len));
            return Ok(());
        };
        let first = out.len();
        let mut pos = offset;
        for (off, n) in ranges {
            if off + n <= pos {
                continue;
            }
            if off > pos {
                Extent::hole(off - pos).push_merged(out, first);
            }
            let start = off.max(pos);
            Extent::data(off + n - start).push_merged(out, first);
            pos = pos.max(off + n);
        }
        let end = offset + len;
        if end > pos {
            Extent::hole(end - pos).push_merged(out, first);
        }
        Ok(())
    }

    /// A cluster round trip is too dear for the read path.
    fn reads_zeroes(&self, _offset: u64, _len: u64) -> Result<bool, Errno> {
        Ok(false)
    }

    fn describe(&self) -> serde_json::Value {
        let c = &self.opts.connect;
        json!({
            "type": "rbd",
            "pool": c.pool,
            "image": c.image,
            "size": self.size(),
            "conf": c.conf.as_ref().map(|p| p.display().to_string()),
            "id": c.id,
            "lock_owner": self.owner,
            "op_timeout": c.op_timeout.as_secs_f64(),
        })
    }
}
