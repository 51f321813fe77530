//! Fixtures and helpers for the target conformance suite.
//!
//! A [`Fixture`] owns one target together with whatever it lives on (a
//! tempdir, a backing file) and what the suite needs to know about it: the
//! size it should report, the contents it should start with, whether it
//! stores data at all, and how to measure the storage it occupies.

pub mod others;
#[allow(dead_code)] // s3_store.rs reads what conformance does not
pub mod servers;
#[path = "../skip/mod.rs"]
pub mod skip;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tempfile::TempDir;
use userblk::slots::Engine;
use userblk::target::Errno;
use userblk::targets::{FileOptions, FileTarget, MemTarget, NullTarget};
use userblk::{Flags, IoResult, Op, Request, Target};

// Not every includer uses them (nbd_client.rs, differential.rs).
#[allow(unused_imports)]
pub use others::*;

/// Size of every device in the suite: big enough for 1 MiB requests at several places.
pub const DEV_SIZE: u64 = 4 << 20;
/// Largest request the suite sends (the engine's buffer).
pub const MAX_IO: usize = 1 << 20;

/// `u64` to `usize`, for indexing models with device offsets.
pub fn us(x: u64) -> usize {
    usize::try_from(x).expect("offset fits in usize")
}

/// `usize` to `u32`, for request lengths.
pub fn len32(x: usize) -> u32 {
    u32::try_from(x).expect("length fits in u32")
}

/// Deterministic, non-repeating bytes (splitmix64) so misplaced data is caught.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A file backing a [`FileTarget`], with what it held around the device's window.
pub struct BackingFile {
    /// The options the target was opened with (to reopen it).
    pub opts: FileOptions,
    /// File bytes before `opts.offset`, as written before the target was opened.
    pub prefix: Vec<u8>,
    /// File bytes after the device's last byte, as written before the target was opened.
    pub trailer: Vec<u8>,
    _dir: TempDir,
}

impl BackingFile {
    /// The file's whole contents, read past the target.
    pub fn read_raw(&self) -> Vec<u8> {
        std::fs::read(&self.opts.path).expect("read backing file")
    }

    /// Bytes the file occupies on its filesystem.
    pub fn allocated(&self) -> u64 {
        std::fs::metadata(&self.opts.path)
            .expect("stat backing file")
            .blocks()
            * 512
    }
}

/// What the target is, concretely.
pub enum Backing {
    /// [`NullTarget`].
    Null(NullTarget),
    /// [`MemTarget`].
    Mem(MemTarget),
    /// [`FileTarget`] and its file.
    File(FileTarget, BackingFile),
    /// A filter stack over a [`MemTarget`] (kept to measure its memory),
    /// with the directory its log and stats files go to.
    Filtered {
        /// The stack, outermost filter first.
        stack: Arc<dyn Target>,
        /// The mem target at the bottom.
        mem: Arc<MemTarget>,
        /// Where the filters write.
        _dir: TempDir,
    },
    /// Any other target (qcow2, nbd, s3, filters over a file), with what
    /// it lives on (dropped after it: fields drop in order).
    Other {
        /// The target.
        target: Arc<dyn Target>,
        /// Whether it is a filter (describing its target, not itself).
        filter: bool,
        /// Temp dirs, servers, the target beneath.
        _keep: Box<dyn std::any::Any>,
    },
}

/// One target under test, with what the suite expects of it.
pub struct Fixture {
    /// The target and what it lives on.
    pub backing: Backing,
    /// The size `caps()` must report.
    pub size: u64,
    /// Whether the target must present a read-only device.
    pub read_only: bool,
    /// Whether writes are kept (false for null, which reads zeroes always).
    pub stores_data: bool,
    /// The device's contents before any request.
    pub initial: Vec<u8>,
    /// For file targets: whether O_DIRECT must be in use.
    pub direct: Option<bool>,
}

impl Fixture {
    /// The target, as every frontend sees it.
    pub fn target(&self) -> &dyn Target {
        match &self.backing {
            Backing::Null(t) => t,
            Backing::Mem(t) => t,
            Backing::File(t, _) => t,
            Backing::Filtered { stack, .. } => &**stack,
            Backing::Other { target, .. } => &**target,
        }
    }

    /// Storage the data occupies, for targets that have storage.
    pub fn allocated(&self) -> Option<u64> {
        match &self.backing {
            Backing::Null(_) => None,
            Backing::Mem(t) => Some(t.resident_bytes().expect("resident_bytes")),
            Backing::File(_, f) => Some(f.allocated()),
            Backing::Filtered { mem, .. } => Some(mem.resident_bytes().expect("resident_bytes")),
            Backing::Other { .. } => None,
        }
    }

    /// The backing file, for file targets.
    pub fn file(&self) -> Option<&BackingFile> {
        match &self.backing {
            Backing::File(_, f) => Some(f),
            _ => None,
        }
    }

    /// A model of the device in its initial state.
    pub fn model(&self) -> Model {
        Model {
            data: self.initial.clone(),
            stores: self.stores_data,
        }
    }
}

/// What the device must read as: the initial contents plus every modification.
pub struct Model {
    data: Vec<u8>,
    stores: bool,
}

impl Model {
    /// A write of `bytes` at `off` completed.
    pub fn write(&mut self, off: u64, bytes: &[u8]) {
        if self.stores {
            let off = us(off);
            self.data[off..off + bytes.len()].copy_from_slice(bytes);
        }
    }

    /// `len` bytes at `off` were zeroed (discard or write-zeroes).
    pub fn zero(&mut self, off: u64, len: u64) {
        let off = us(off);
        self.data[off..off + us(len)].fill(0);
    }

    /// What `len` bytes at `off` must read as.
    pub fn get(&self, off: u64, len: usize) -> &[u8] {
        let off = us(off);
        &self.data[off..off + len]
    }

    /// The whole device.
    pub fn all(&self) -> &[u8] {
        &self.data
    }
}

/// A target with an engine to send it requests.
pub struct Dev<'a> {
    t: &'a dyn Target,
    e: Engine,
}

impl<'a> Dev<'a> {
    /// An engine for `t` with a [`MAX_IO`] buffer.
    pub fn new(t: &'a dyn Target) -> Self {
        let e = Engine::new(t, MAX_IO).expect("engine for the target");
        Dev { t, e }
    }

    /// Run one request; `data` as for [`Engine::run`].
    pub fn run(&mut self, req: Request, data: &mut [u8]) -> IoResult {
        self.e.run(self.t, req, data)
    }

    /// Read `len` bytes at `off`.
    pub fn read(&mut self, off: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let mut buf = vec![0xA5; len];
        let n = self.run(Request::new(Op::Read, off, len32(len)), &mut buf)?;
        assert_eq!(n, len32(len), "short read at {off}+{len}");
        Ok(buf)
    }

    /// Write `data` at `off` with `flags`.
    pub fn write_flags(&mut self, off: u64, data: &[u8], flags: Flags) -> IoResult {
        let mut buf = data.to_vec();
        let req = Request::new(Op::Write, off, len32(data.len())).with_flags(flags);
        self.run(req, &mut buf)
    }

    /// Write `data` at `off`.
    pub fn write(&mut self, off: u64, data: &[u8]) -> IoResult {
        self.write_flags(off, data, Flags::NONE)
    }

    /// Discard `len` bytes at `off`.
    pub fn discard(&mut self, off: u64, len: u64) -> IoResult {
        let len = u32::try_from(len).expect("discard length fits in u32");
        self.run(Request::new(Op::Discard, off, len), &mut [])
    }

    /// Write zeroes to `len` bytes at `off`, keeping them allocated if `nounmap`.
    pub fn write_zeroes(&mut self, off: u64, len: u64, nounmap: bool) -> IoResult {
        let len = u32::try_from(len).expect("write-zeroes length fits in u32");
        let mut req = Request::new(Op::WriteZeroes, off, len);
        if nounmap {
            req = req.with_flags(Flags::NOUNMAP);
        }
        self.run(req, &mut [])
    }

    /// Flush.
    pub fn flush(&mut self) -> IoResult {
        self.run(Request::new(Op::Flush, 0, 0), &mut [])
    }

    /// The whole device, read in [`MAX_IO`] pieces.
    pub fn read_all(&mut self) -> Vec<u8> {
        let size = self.t.caps().size;
        let mut out = Vec::with_capacity(us(size));
        let mut off = 0;
        while off < size {
            let n = us((size - off).min(MAX_IO as u64));
            let chunk = self
                .read(off, n)
                .unwrap_or_else(|e| panic!("read at {off}+{n}: {e}"));
            out.extend_from_slice(&chunk);
            off += n as u64;
        }
        out
    }
}

/// Whether `dir`'s filesystem accepts O_DIRECT opens.
fn supports_direct(path: &Path) -> bool {
    use rustix::fs::{Mode, OFlags};
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECT | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .is_ok()
}

/// Where a file fixture lives and how it is laid out.
struct FileSpec {
    /// Directory to make the tempdir in.
    dir: PathBuf,
    /// Bytes before the device.
    offset: u64,
    /// Bytes after the device (not filling a block: must be ignored).
    trailer: usize,
    /// Fill the device's window with a pattern instead of leaving it sparse.
    filled: bool,
    buffered: bool,
    read_only: bool,
}

fn file_fixture(spec: FileSpec) -> Fixture {
    let dir = tempfile::tempdir_in(&spec.dir)
        .unwrap_or_else(|e| panic!("tempdir in {}: {e}", spec.dir.display()));
    let path = dir.path().join("backing.img");
    let prefix = pattern(0xEE, us(spec.offset));
    let trailer = pattern(0xDD, spec.trailer);
    let initial = if spec.filled {
        pattern(0x5EED, us(DEV_SIZE))
    } else {
        vec![0; us(DEV_SIZE)]
    };
    {
        let f = std::fs::File::create(&path).expect("create backing file");
        f.write_all_at(&prefix, 0).expect("write prefix");
        // Sparse unless filled: unwritten ranges are holes.
        f.set_len(spec.offset + DEV_SIZE)
            .expect("size backing file");
        if spec.filled {
            f.write_all_at(&initial, spec.offset).expect("fill");
        }
        f.write_all_at(&trailer, spec.offset + DEV_SIZE)
            .expect("write trailer");
        f.sync_all().expect("sync backing file");
    }
    let opts = FileOptions {
        path: path.clone(),
        offset: spec.offset,
        buffered: spec.buffered,
        read_only: spec.read_only,
    };
    let target =
        FileTarget::open(opts.clone()).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let direct = !spec.buffered && supports_direct(&path);
    Fixture {
        backing: Backing::File(
            target,
            BackingFile {
                opts,
                prefix,
                trailer,
                _dir: dir,
            },
        ),
        size: DEV_SIZE,
        read_only: spec.read_only,
        stores_data: true,
        initial,
        direct: Some(direct),
    }
}

fn tmp() -> PathBuf {
    std::env::temp_dir()
}

/// [`NullTarget`].
pub fn null() -> Fixture {
    Fixture {
        backing: Backing::Null(NullTarget::new(DEV_SIZE)),
        size: DEV_SIZE,
        read_only: false,
        stores_data: false,
        initial: vec![0; us(DEV_SIZE)],
        direct: None,
    }
}

/// [`MemTarget`].
pub fn mem() -> Fixture {
    Fixture {
        backing: Backing::Mem(MemTarget::new(DEV_SIZE).expect("mem target")),
        size: DEV_SIZE,
        read_only: false,
        stores_data: true,
        initial: vec![0; us(DEV_SIZE)],
        direct: None,
    }
}

/// [`FileTarget`] on a sparse file in the temp dir, O_DIRECT (where the filesystem allows).
pub fn file_direct() -> Fixture {
    file_fixture(FileSpec {
        dir: tmp(),
        offset: 0,
        trailer: 0,
        filled: false,
        buffered: false,
        read_only: false,
    })
}

/// [`FileTarget`] on a sparse file in the temp dir, through the page cache.
pub fn file_buffered() -> Fixture {
    file_fixture(FileSpec {
        dir: tmp(),
        offset: 0,
        trailer: 0,
        filled: false,
        buffered: true,
        read_only: false,
    })
}

/// [`FileTarget`] on tmpfs, which has no `FALLOC_FL_ZERO_RANGE`.
pub fn file_tmpfs() -> Fixture {
    let shm = PathBuf::from("/dev/shm");
    assert!(
        rustix::fs::statfs(&shm).is_ok_and(|s| s.f_type == 0x0102_1994),
        "/dev/shm must be a tmpfs for this fixture"
    );
    file_fixture(FileSpec {
        dir: shm,
        offset: 0,
        trailer: 0,
        filled: false,
        buffered: false,
        read_only: false,
    })
}

/// [`FileTarget`] starting part-way into its file, not on a filesystem
/// block boundary (where the logical block size allows), with trailing
/// bytes that do not fill a block.
pub fn file_offset() -> Fixture {
    // The offset must be a multiple of the logical block size the target
    // will pick (the O_DIRECT alignment); find it on a scratch file there.
    let lbs = {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("probe.img");
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(1 << 20))
            .expect("probe file");
        let t = FileTarget::open(FileOptions {
            path: p,
            ..FileOptions::default()
        })
        .expect("probe target");
        u64::from(t.caps().logical_block_size)
    };
    file_fixture(FileSpec {
        dir: tmp(),
        offset: 3 * 4096 + lbs,
        trailer: us(lbs / 2 + 1),
        filled: false,
        buffered: false,
        read_only: false,
    })
}

/// A read-only [`FileTarget`] over a file full of data.
pub fn file_read_only() -> Fixture {
    file_fixture(FileSpec {
        dir: tmp(),
        offset: 0,
        trailer: 0,
        filled: true,
        buffered: false,
        read_only: true,
    })
}

/// A stack of `specs` (`{dir}` replaced by a temporary directory) over a
/// [`MemTarget`] of `mem_size` bytes.
fn filtered(mem_size: u64, specs: &[&str], size: u64, read_only: bool) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = Arc::new(MemTarget::new(mem_size).expect("mem target"));
    let specs: Vec<userblk::filters::Spec> = specs
        .iter()
        .map(|s| {
            s.replace("{dir}", &dir.path().display().to_string())
                .parse()
                .expect("filter spec")
        })
        .collect();
    let env = userblk::filters::Env::default();
    let stack = userblk::filters::build(mem.clone(), &specs, &env).expect("filter stack");
    Fixture {
        backing: Backing::Filtered {
            stack,
            mem,
            _dir: dir,
        },
        size,
        read_only,
        stores_data: true,
        initial: vec![0; us(size)],
        direct: None,
    }
}

/// Every filter that passes data through unchanged, stacked over mem: a
/// target under them must behave exactly as without them.
pub fn mem_pass_through_stack() -> Fixture {
    filtered(
        DEV_SIZE,
        &[
            "stats:file={dir}/stats.json",
            "log:file={dir}/log.jsonl",
            "delay:all=20us",
            "error:rate=0",
            "rate:iops=10000000",
            "offset:offset=0",
            "truncate:size=4M",
        ],
        DEV_SIZE,
        false,
    )
}

/// The middle of a mem target twice the size, through `offset`.
pub fn mem_offset_window() -> Fixture {
    filtered(
        2 * DEV_SIZE,
        &[&format!("offset:offset={},size={DEV_SIZE}", DEV_SIZE / 2)],
        DEV_SIZE,
        false,
    )
}

/// mem behind `readonly`.
pub fn mem_read_only() -> Fixture {
    filtered(DEV_SIZE, &["readonly"], DEV_SIZE, true)
}

/// mem behind a write-through `cache` a quarter of its size (so it evicts).
pub fn mem_cache() -> Fixture {
    filtered(DEV_SIZE, &["cache:size=1M,block=16K"], DEV_SIZE, false)
}
