//! One open image with the cluster connection and pool context it came
//! through, closed together when dropped.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::PathBuf;
use std::time::Duration;

use crate::ffi::{self, Api, LockModeC, RadosIoctx, RadosT, RbdImage};
use crate::{check, RbdError};

/// Features of an image `open` creates: librbd's defaults, which include
/// the exclusive lock one writer needs.
pub const CREATE_FEATURES: u64 = ffi::RBD_FEATURE_LAYERING
    | ffi::RBD_FEATURE_EXCLUSIVE_LOCK
    | ffi::RBD_FEATURE_OBJECT_MAP
    | ffi::RBD_FEATURE_FAST_DIFF
    | ffi::RBD_FEATURE_DEEP_FLATTEN;

/// How to reach the cluster and which image to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// The pool.
    pub pool: String,
    /// The image.
    pub image: String,
    /// A ceph.conf; `None`: Ceph's own search (`$CEPH_CONF`, /etc/ceph/ceph.conf).
    pub conf: Option<PathBuf>,
    /// The client id (`admin` for `client.admin`); `None`: `admin`.
    pub id: Option<String>,
    /// Create the image at this size if it does not exist.
    pub create_size: Option<u64>,
    /// How long connecting to the monitors may take.
    pub connect_timeout: Duration,
    /// How long one monitor or OSD operation may take before it fails.
    pub op_timeout: Duration,
}

impl ConnectOptions {
    /// `POOL/IMAGE`, for messages.
    pub fn name(&self) -> String {
        format!("{}/{}", self.pool, self.image)
    }
}

/// An open image.
pub struct Image {
    pub(crate) api: &'static Api,
    cluster: RadosT,
    ioctx: RadosIoctx,
    pub(crate) image: RbdImage,
    name: String,
    created: bool,
}

// SAFETY: librados and librbd handles may be used from any thread, and
// librbd's image calls (aio among them) from several at once; the handles
// are only freed in `Drop`, which has `&mut self`.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

fn cstring(s: &str, what: &'static str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Nul(what))
}

/// The cluster handle until the image is open: shut down if opening fails.
struct Cluster {
    api: &'static Api,
    h: RadosT,
    ioctx: Option<RadosIoctx>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(io) = self.ioctx.take() {
            // SAFETY: a context made by rados_ioctx_create, destroyed once.
            unsafe { (self.api.rados_ioctx_destroy)(io) };
        }
        // SAFETY: the handle rados_create2 made; shut down once.
        unsafe { (self.api.rados_shutdown)(self.h) };
    }
}

impl Cluster {
    fn set(&self, key: &str, value: &str) -> Result<(), RbdError> {
        let k = cstring(key, "a configuration key")?;
        let v = cstring(value, "a configuration value")?;
        // SAFETY: a live handle and NUL-terminated strings.
        let r = unsafe { (self.api.rados_conf_set)(self.h, k.as_ptr(), v.as_ptr()) };
        check(r, || format!("setting {key}={value}")).map(drop)
    }
}

impl Image {
    /// Connect, open the pool and the image (creating it if asked).
    pub fn open(opts: &ConnectOptions) -> Result<Image, RbdError> {
        let api = crate::api()?;
        let name = opts.name();
        let client = format!("client.{}", opts.id.as_deref().unwrap_or("admin"));
        let client_c = cstring(&client, "the client id")?;
        let mut h = RadosT::null();
        // SAFETY: out-pointer to a handle; NUL-terminated strings.
        let r = unsafe { (api.rados_create2)(&mut h, c"ceph".as_ptr(), client_c.as_ptr(), 0) };
        check(r, || "creating a cluster handle".into())?;
        let mut cluster = Cluster {
            api,
            h,
            ioctx: None,
        };
        // Ceph's messages go to its log, not to our one-line errors.
        for (k, v) in [("log_to_stderr", "false"), ("err_to_stderr", "false")] {
            cluster.set(k, v)?;
        }
        match &opts.conf {
            Some(p) => {
                let c = cstring(&p.to_string_lossy(), "the configuration path")?;
                // SAFETY: a live handle and a NUL-terminated path.
                let r = unsafe { (api.rados_conf_read_file)(h, c.as_ptr()) };
                check(r, || format!("reading {}", p.display()))?;
            }
            None => {
                // SAFETY: NULL asks for Ceph's default search; none found is allowed.
                let _ = unsafe { (api.rados_conf_read_file)(h, std::ptr::null()) };
            }
        }
        // SAFETY: NULL: the CEPH_ARGS environment variable.
        let _ = unsafe { (api.rados_conf_parse_env)(h, std::ptr::null()) };
        // No admin socket: a daemon per image would fight over one path
        // (ceph.conf's `$name.asok`) with each other and the ceph tools.
        cluster.set("admin_socket", "")?;
        let connect = opts.connect_timeout.as_secs().max(1).to_string();
        let op = opts.op_timeout.as_secs().max(1).to_string();
        cluster.set("client_mount_timeout", &connect)?;
        cluster.set("rados_mon_op_timeout", &op)?;
        cluster.set("rados_osd_op_timeout", &op)?;
        // SAFETY: a configured handle.
        let r = unsafe { (api.rados_connect)(h) };
        check(r, || format!("connecting to the cluster as {client}"))?;
        let pool = cstring(&opts.pool, "the pool name")?;
        let mut io = RadosIoctx::null();
        // SAFETY: a connected handle, a NUL-terminated name, an out-pointer.
        let r = unsafe { (api.rados_ioctx_create)(h, pool.as_ptr(), &mut io) };
        if r == -ENOENT {
            return Err(RbdError::NotFound(format!(
                "pool {} does not exist",
                opts.pool
            )));
        }
        check(r, || format!("opening pool {}", opts.pool))?;
        cluster.ioctx = Some(io);
        let img = cstring(&opts.image, "the image name")?;
        let mut image = RbdImage::null();
        // SAFETY: a pool context, a NUL-terminated name, an out-pointer, no snapshot.
        let mut r = unsafe { (api.rbd_open)(io, img.as_ptr(), &mut image, std::ptr::null()) };
        let mut created = false;
        if r == -ENOENT {
            if let Some(size) = opts.create_size {
                let mut order: c_int = 0;
                // SAFETY: a pool context, a NUL-terminated name, an out-pointer.
                let c = unsafe {
                    (api.rbd_create2)(io, img.as_ptr(), size, CREATE_FEATURES, &mut order)
                };
                check(c, || format!("creating image {name}"))?;
                created = true;
                // SAFETY: as for the first open.
                r = unsafe { (api.rbd_open)(io, img.as_ptr(), &mut image, std::ptr::null()) };
            }
        }
        if r == -ENOENT {
            return Err(RbdError::NotFound(format!(
                "image {name} does not exist (--size creates it)"
            )));
        }
        check(r, || format!("opening image {name}"))?;
        // The image now owns the handles.
        cluster.ioctx = None;
        std::mem::forget(cluster);
        Ok(Image {
            api,
            cluster: h,
            ioctx: io,
            image,
            name,
            created,
        })
    }

    /// Whether `open` created the image.
    pub fn created(&self) -> bool {
        self.created
    }

    /// `POOL/IMAGE`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size(&self) -> Result<u64, RbdError> {
        let mut s = 0u64;
        // SAFETY: an open image and an out-pointer.
        let r = unsafe { (self.api.rbd_get_size)(self.image, &mut s) };
        check(r, || format!("size of {}", self.name))?;
        Ok(s)
    }

    /// Size, object size and the rest of `rbd_stat`.
    pub fn stat(&self) -> Result<ffi::RbdImageInfo, RbdError> {
        let mut info = ffi::RbdImageInfo::default();
        let len = std::mem::size_of::<ffi::RbdImageInfo>();
        // SAFETY: an open image and a struct of the size passed.
        let r = unsafe { (self.api.rbd_stat)(self.image, &mut info, len) };
        check(r, || format!("stat of {}", self.name))?;
        Ok(info)
    }

    /// The image's feature bits (`RBD_FEATURE_*`).
    pub fn features(&self) -> Result<u64, RbdError> {
        let mut f = 0u64;
        // SAFETY: an open image and an out-pointer.
        let r = unsafe { (self.api.rbd_get_features)(self.image, &mut f) };
        check(r, || format!("features of {}", self.name))?;
        Ok(f)
    }

    /// Change the size.
    pub fn resize(&self, size: u64) -> Result<(), RbdError> {
        // SAFETY: an open image.
        let r = unsafe { (self.api.rbd_resize)(self.image, size) };
        check(r, || format!("resizing {} to {size}", self.name)).map(drop)
    }

    /// This client's id in the cluster: the lock owner `client.ID` we are.
    pub fn client(&self) -> String {
        // SAFETY: a connected handle.
        let id = unsafe { (self.api.rados_get_instance_id)(self.cluster) };
        format!("client.{id}")
    }

    /// Take the exclusive lock: an error if another client keeps it.
    pub fn lock_exclusive(&self) -> Result<(), RbdError> {
        // SAFETY: an open image.
        let r = unsafe {
            (self.api.rbd_lock_acquire)(self.image, LockModeC(ffi::RBD_LOCK_MODE_EXCLUSIVE))
        };
        check(r, || format!("locking {}", self.name)).map(drop)
    }

    /// The exclusive lock's owners (empty when nobody holds it).
    pub fn lock_owners(&self) -> Result<Vec<String>, RbdError> {
        let mut max: usize = 4;
        loop {
            let mut mode = LockModeC(0);
            let mut owners: Vec<*mut c_char> = vec![std::ptr::null_mut(); max];
            let mut n = max;
            // SAFETY: an open image; an array of `n` pointers librbd fills
            // with strings we free with the cleanup call.
            let r = unsafe {
                (self.api.rbd_lock_get_owners)(self.image, &mut mode, owners.as_mut_ptr(), &mut n)
            };
            if r == -ENOENT {
                return Ok(Vec::new());
            }
            if r == -ERANGE && n > max {
                // `n` is how many there are.
                max = n;
                continue;
            }
            check(r, || format!("lock owners of {}", self.name))?;
            let out = owners[..n.min(max)]
                .iter()
                .filter(|p| !p.is_null())
                // SAFETY: librbd's NUL-terminated strings, alive until cleanup.
                .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
                .collect();
            // SAFETY: the strings the call above returned, freed once.
            unsafe { (self.api.rbd_lock_get_owners_cleanup)(owners.as_mut_ptr(), n.min(max)) };
            return Ok(out);
        }
    }

    /// Break `owner`'s exclusive lock (librbd blocklists that client first).
    pub fn break_lock(&self, owner: &str) -> Result<(), RbdError> {
        let o = cstring(owner, "the lock owner")?;
        // SAFETY: an open image and a NUL-terminated owner.
        let r = unsafe {
            (self.api.rbd_lock_break)(
                self.image,
                LockModeC(ffi::RBD_LOCK_MODE_EXCLUSIVE),
                o.as_ptr(),
            )
        };
        check(r, || format!("breaking {owner}'s lock of {}", self.name)).map(drop)
    }

    /// The image metadata `key`, or `None`.
    pub fn metadata(&self, key: &str) -> Result<Option<String>, RbdError> {
        let k = cstring(key, "a metadata key")?;
        let mut buf = vec![0u8; 256];
        loop {
            let mut len = buf.len();
            // SAFETY: an open image, a NUL-terminated key, a buffer of `len` bytes.
            let r = unsafe {
                (self.api.rbd_metadata_get)(
                    self.image,
                    k.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            if r == -ENOENT {
                return Ok(None);
            }
            if r == -ERANGE && len > buf.len() {
                buf.resize(len, 0);
                continue;
            }
            check(r, || format!("metadata {key} of {}", self.name))?;
            let s = CStr::from_bytes_until_nul(&buf)
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Ok(Some(s));
        }
    }

    /// Set the image metadata `key`.
    pub fn set_metadata(&self, key: &str, value: &str) -> Result<(), RbdError> {
        let k = cstring(key, "a metadata key")?;
        let v = cstring(value, "a metadata value")?;
        // SAFETY: an open image and NUL-terminated strings.
        let r = unsafe { (self.api.rbd_metadata_set)(self.image, k.as_ptr(), v.as_ptr()) };
        check(r, || format!("setting metadata {key} of {}", self.name)).map(drop)
    }
}

/// Where `allocated` collects the walk's ranges.
struct Walk {
    from: u64,
    end: u64,
    out: Vec<(u64, u64)>,
}

/// `rbd_diff_iterate2`'s callback: keep the allocated ranges, clipped.
unsafe extern "C" fn on_extent(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `Walk` `allocated` passed, alive for the call.
    let w = unsafe { &mut *arg.cast::<Walk>() };
    let start = off.max(w.from);
    let end = off.saturating_add(len as u64).min(w.end);
    if exists != 0 && end > start {
        w.out.push((start, end - start));
    }
    0
}

impl Image {
    /// The allocated ranges (offset, length) of `[off, off + len)`, in
    /// order, by whole objects (cheap with the object map; an object that
    /// exists counts as data throughout).
    pub fn allocated(&self, off: u64, len: u64) -> Result<Vec<(u64, u64)>, RbdError> {
        let mut w = Walk {
            from: off,
            end: off.saturating_add(len),
            out: Vec::new(),
        };
        // SAFETY: an open image; no snapshot (NULL: since the image's
        // creation); the callback gets `w`, which outlives the call.
        let r = unsafe {
            (self.api.rbd_diff_iterate2)(
                self.image,
                std::ptr::null(),
                off,
                len,
                1,
                1,
                on_extent,
                (&raw mut w).cast(),
            )
        };
        check(r, || format!("allocation of {}", self.name))?;
        w.out.sort_unstable();
        Ok(w.out)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: the handles `open` made, each freed once, image first.
        // rbd_close waits for the image's operations in flight.
        unsafe {
            let _ = (self.api.rbd_close)(self.image);
            (self.api.rados_ioctx_destroy)(self.ioctx);
            (self.api.rados_shutdown)(self.cluster);
        }
    }
}

/// Errnos librbd returns that we act on (the same on every Linux architecture).
const ENOENT: i32 = 2;
const ERANGE: i32 = 34;
