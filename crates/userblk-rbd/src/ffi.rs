//! The C declarations we use, one table, loaded from `librados.so.2` and
//! `librbd.so.1` at run time.
//!
//! Each function's C prototype is not spelled by hand: it is generated from
//! the Rust argument types ([`CType`]), and `tests/header.rs` compiles it
//! against `<rbd/librbd.h>` with `__builtin_types_compatible_p`, so a Rust
//! declaration that does not match the header fails the test (no libclang,
//! no bindgen at build time).

use std::ffi::{c_char, c_int, c_void};

/// A C type's spelling, for the header check.
pub trait CType {
    /// How the header spells it.
    const C: &'static str;
}

macro_rules! handle {
    ($(#[$m:meta])* $name:ident = $c:literal) => {
        $(#[$m])*
        #[repr(transparent)]
        #[derive(Debug, Clone, Copy)]
        pub struct $name(pub *mut c_void);
        impl CType for $name {
            const C: &'static str = $c;
        }
        impl $name {
            /// The null handle, for out-parameters.
            pub const fn null() -> Self {
                $name(std::ptr::null_mut())
            }
        }
    };
}

handle!(/// `rados_t`: a cluster handle.
    RadosT = "rados_t");
handle!(/// `rados_ioctx_t`: a pool's I/O context.
    RadosIoctx = "rados_ioctx_t");
handle!(/// `rbd_image_t`: an open image.
    RbdImage = "rbd_image_t");
handle!(/// `rbd_completion_t`: an asynchronous operation's completion.
    RbdCompletion = "rbd_completion_t");

macro_rules! ctype {
    ($($t:ty = $c:literal),* $(,)?) => { $(impl CType for $t { const C: &'static str = $c; })* };
}
ctype!(
    c_int = "int",
    u64 = "uint64_t",
    i64 = "int64_t",
    usize = "size_t",
    isize = "ssize_t",
    () = "void",
    *const c_char = "const char *",
    *mut c_char = "char *",
    *mut *mut c_char = "char **",
    *mut u64 = "uint64_t *",
    *mut usize = "size_t *",
    *mut c_int = "int *",
    *mut c_void = "void *",
    *mut RadosT = "rados_t *",
    *mut RadosIoctx = "rados_ioctx_t *",
    *mut RbdImage = "rbd_image_t *",
    *mut RbdCompletion = "rbd_completion_t *",
    *mut RbdImageInfo = "rbd_image_info_t *",
    Callback = "rbd_callback_t",
    u8 = "uint8_t",
    DiffCallback = "int (*)(uint64_t, size_t, int, void *)",
);

/// `rbd_diff_iterate2`'s callback: an allocated (`exists`) or deallocated
/// range; a non-zero return stops the walk.
pub type DiffCallback = unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

/// `rbd_callback_t`: called on a librbd thread when an operation completes.
pub type Callback = unsafe extern "C" fn(RbdCompletion, *mut c_void);

/// `RBD_MAX_BLOCK_NAME_SIZE`.
pub const RBD_MAX_BLOCK_NAME_SIZE: usize = 24;
/// `RBD_MAX_IMAGE_NAME_SIZE`.
pub const RBD_MAX_IMAGE_NAME_SIZE: usize = 96;

/// `rbd_image_info_t` (`rbd_stat`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RbdImageInfo {
    /// Size in bytes.
    pub size: u64,
    /// Object size in bytes.
    pub obj_size: u64,
    /// Number of objects.
    pub num_objs: u64,
    /// log2 of the object size.
    pub order: c_int,
    /// Deprecated.
    pub block_name_prefix: [c_char; RBD_MAX_BLOCK_NAME_SIZE],
    /// Deprecated.
    pub parent_pool: i64,
    /// Deprecated.
    pub parent_name: [c_char; RBD_MAX_IMAGE_NAME_SIZE],
}

impl Default for RbdImageInfo {
    fn default() -> Self {
        RbdImageInfo {
            size: 0,
            obj_size: 0,
            num_objs: 0,
            order: 0,
            block_name_prefix: [0; RBD_MAX_BLOCK_NAME_SIZE],
            parent_pool: 0,
            parent_name: [0; RBD_MAX_IMAGE_NAME_SIZE],
        }
    }
}

/// `RBD_LOCK_MODE_EXCLUSIVE` (`rbd_lock_mode_t`, an enum: `int` sized).
pub const RBD_LOCK_MODE_EXCLUSIVE: c_int = 0;
/// `RBD_FEATURE_LAYERING`.
pub const RBD_FEATURE_LAYERING: u64 = 1 << 0;
/// `RBD_FEATURE_EXCLUSIVE_LOCK`.
pub const RBD_FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
/// `RBD_FEATURE_OBJECT_MAP`.
pub const RBD_FEATURE_OBJECT_MAP: u64 = 1 << 3;
/// `RBD_FEATURE_FAST_DIFF`.
pub const RBD_FEATURE_FAST_DIFF: u64 = 1 << 4;
/// `RBD_FEATURE_DEEP_FLATTEN`.
pub const RBD_FEATURE_DEEP_FLATTEN: u64 = 1 << 5;

/// Constants checked against the header: (C expression, our value).
pub const CONSTANTS: &[(&str, i128)] = &[
    ("RBD_LOCK_MODE_EXCLUSIVE", RBD_LOCK_MODE_EXCLUSIVE as i128),
    ("RBD_FEATURE_LAYERING", RBD_FEATURE_LAYERING as i128),
    (
        "RBD_FEATURE_EXCLUSIVE_LOCK",
        RBD_FEATURE_EXCLUSIVE_LOCK as i128,
    ),
    ("RBD_FEATURE_OBJECT_MAP", RBD_FEATURE_OBJECT_MAP as i128),
    ("RBD_FEATURE_FAST_DIFF", RBD_FEATURE_FAST_DIFF as i128),
    ("RBD_FEATURE_DEEP_FLATTEN", RBD_FEATURE_DEEP_FLATTEN as i128),
    ("RBD_MAX_BLOCK_NAME_SIZE", RBD_MAX_BLOCK_NAME_SIZE as i128),
    ("RBD_MAX_IMAGE_NAME_SIZE", RBD_MAX_IMAGE_NAME_SIZE as i128),
    (
        "sizeof(rbd_lock_mode_t)",
        std::mem::size_of::<c_int>() as i128,
    ),
    (
        "sizeof(rbd_image_info_t)",
        std::mem::size_of::<RbdImageInfo>() as i128,
    ),
    (
        "offsetof(rbd_image_info_t, obj_size)",
        std::mem::offset_of!(RbdImageInfo, obj_size) as i128,
    ),
    (
        "offsetof(rbd_image_info_t, order)",
        std::mem::offset_of!(RbdImageInfo, order) as i128,
    ),
    (
        "offsetof(rbd_image_info_t, parent_pool)",
        std::mem::offset_of!(RbdImageInfo, parent_pool) as i128,
    ),
];

/// `rbd_lock_mode_t` is an enum; we pass it as `int` (its size is checked).
pub type LockMode = c_int;

macro_rules! api {
    ($( $lib:ident $name:ident ( $($arg:ty),* ) -> $ret:ty ; )*) => {
        /// Every function we call, resolved from the loaded libraries.
        #[allow(missing_docs)]
        pub struct Api {
            $(pub $name: unsafe extern "C" fn($($arg),*) -> $ret,)*
        }

        /// Each function's name, and its C pointer type built from the Rust one.
        pub fn prototypes() -> Vec<(&'static str, String)> {
            vec![$((stringify!($name), {
                let args: &[&str] = &[$(<$arg as CType>::C),*];
                format!("{} (*)({})", <$ret as CType>::C, args.join(", "))
            })),*]
        }

        impl Api {
            /// Resolve every symbol.
            ///
            /// # Safety
            /// The libraries must be librados and librbd, whose symbols
            /// have the types above (what `tests/header.rs` checks).
            pub(crate) unsafe fn resolve(
                rados: &libloading::Library,
                rbd: &libloading::Library,
            ) -> Result<Api, libloading::Error> {
                Ok(Api {
                    $($name: {
                        let lib = if stringify!($lib) == "rados" { rados } else { rbd };
                        // SAFETY: the caller vouches for the symbol's type.
                        *unsafe { lib.get(concat!(stringify!($name), "\0").as_bytes())? }
                    },)*
                })
            }
        }
    };
}

// rbd_lock_mode_t is an enum (int-sized); the check spells it in C.
impl CType for LockModeC {
    const C: &'static str = "rbd_lock_mode_t";
}
/// `rbd_lock_mode_t` as an argument type of its own, for the header check.
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub struct LockModeC(pub LockMode);
ctype!(*mut LockModeC = "rbd_lock_mode_t *");

api! {
    rados rados_create2(*mut RadosT, *const c_char, *const c_char, u64) -> c_int;
    rados rados_conf_read_file(RadosT, *const c_char) -> c_int;
    rados rados_conf_set(RadosT, *const c_char, *const c_char) -> c_int;
    rados rados_conf_parse_env(RadosT, *const c_char) -> c_int;
    rados rados_connect(RadosT) -> c_int;
    rados rados_shutdown(RadosT) -> ();
    rados rados_get_instance_id(RadosT) -> u64;
    rados rados_ioctx_create(RadosT, *const c_char, *mut RadosIoctx) -> c_int;
    rados rados_ioctx_destroy(RadosIoctx) -> ();
    rbd rbd_open(RadosIoctx, *const c_char, *mut RbdImage, *const c_char) -> c_int;
    rbd rbd_create2(RadosIoctx, *const c_char, u64, u64, *mut c_int) -> c_int;
    rbd rbd_close(RbdImage) -> c_int;
    rbd rbd_get_size(RbdImage, *mut u64) -> c_int;
    rbd rbd_get_features(RbdImage, *mut u64) -> c_int;
    rbd rbd_stat(RbdImage, *mut RbdImageInfo, usize) -> c_int;
    rbd rbd_resize(RbdImage, u64) -> c_int;
    rbd rbd_lock_acquire(RbdImage, LockModeC) -> c_int;
    rbd rbd_lock_release(RbdImage) -> c_int;
    rbd rbd_lock_get_owners(RbdImage, *mut LockModeC, *mut *mut c_char, *mut usize) -> c_int;
    rbd rbd_lock_get_owners_cleanup(*mut *mut c_char, usize) -> ();
    rbd rbd_lock_break(RbdImage, LockModeC, *const c_char) -> c_int;
    rbd rbd_metadata_get(RbdImage, *const c_char, *mut c_char, *mut usize) -> c_int;
    rbd rbd_metadata_set(RbdImage, *const c_char, *const c_char) -> c_int;
    rbd rbd_aio_create_completion(*mut c_void, Callback, *mut RbdCompletion) -> c_int;
    rbd rbd_aio_get_return_value(RbdCompletion) -> isize;
    rbd rbd_aio_release(RbdCompletion) -> ();
    rbd rbd_aio_read(RbdImage, u64, usize, *mut c_char, RbdCompletion) -> c_int;
    rbd rbd_aio_write(RbdImage, u64, usize, *const c_char, RbdCompletion) -> c_int;
    rbd rbd_aio_flush(RbdImage, RbdCompletion) -> c_int;
    rbd rbd_aio_discard(RbdImage, u64, u64, RbdCompletion) -> c_int;
    rbd rbd_diff_iterate2(RbdImage, *const c_char, u64, u64, u8, u8, DiffCallback, *mut c_void) -> c_int;
}

/// `rbd_aio_write_zeroes` (librbd of Ceph 15 and later), looked up on its own.
pub type AioWriteZeroes =
    unsafe extern "C" fn(RbdImage, u64, usize, RbdCompletion, c_int, c_int) -> c_int;

/// The optional functions, with their C types, for the header check.
pub fn optional_prototypes() -> Vec<(&'static str, String)> {
    let args = [
        RbdImage::C,
        u64::C,
        usize::C,
        RbdCompletion::C,
        c_int::C,
        c_int::C,
    ];
    vec![(
        "rbd_aio_write_zeroes",
        format!("{} (*)({})", c_int::C, args.join(", ")),
    )]
}
