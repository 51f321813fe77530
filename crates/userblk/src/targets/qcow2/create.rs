//! `userblk create qcow2`: a new, empty version 3 image.

use std::fs::OpenOptions as FsOpen;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::header::{Header, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, V3_HEADER_LEN};
use super::image::{Image, OpenOptions};
use super::meta::{refcount_set, CacheSizes};
use super::Qcow2Error;

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// The new image (must not exist).
    pub path: PathBuf,
    /// Virtual size in bytes; 0 takes the backing file's.
    pub size: u64,
    /// Cluster size, a power of two from 512 B to 2 MiB.
    pub cluster_size: u64,
    /// Backing file name as stored in the image (relative names are
    /// relative to the image's directory).
    pub backing: Option<String>,
    /// The backing file's format (`qcow2` or `raw`); probed if `None`.
    pub backing_format: Option<String>,
}

impl CreateOptions {
    /// An image of `size` bytes with 64 KiB clusters and no backing file.
    pub fn new(path: impl Into<PathBuf>, size: u64) -> Self {
        CreateOptions {
            path: path.into(),
            size,
            cluster_size: 65536,
            backing: None,
            backing_format: None,
        }
    }
}

/// Create the image `opts` describes: header, refcount table and blocks,
/// and an empty L1 table, each cluster refcounted.
pub fn create(opts: &CreateOptions) -> Result<(), Qcow2Error> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two()
        || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cs.trailing_zeros())
    {
        return Err(Qcow2Error::Invalid(format!(
            "cluster size {cs} must be a power of two from 512 to 2M"
        )));
    }
    let bits = cs.trailing_zeros();
    let (size, backing_format) = match &opts.backing {
        None => (opts.size, None),
        Some(name) => {
            if name.len() > MAX_BACKING_NAME as usize || name.contains('\0') || name.is_empty() {
                return Err(Qcow2Error::Invalid(format!(
                    "backing file name {name:?} is empty, holds a NUL or is longer than {MAX_BACKING_NAME} bytes"
                )));
            }
            let resolved = super::image::backing_path(&opts.path, name);
            // Open the chain now: a missing or broken backing file is an
            // error at create, not at first read.
            let (bsize, fmt) = probe_backing(&resolved, opts.backing_format.as_deref())?;
            (if opts.size == 0 { bsize } else { opts.size }, Some(fmt))
        }
    };
    if size == 0 {
        return Err(Qcow2Error::Invalid("the image needs a size".into()));
    }
    // A device serves whole sectors (a partial last one is left out): an
    // image below one would not open.
    if size < 512 {
        return Err(Qcow2Error::Invalid(format!(
            "size {size} is below one sector (512 bytes)"
        )));
    }
    if size > super::header::MAX_HOST_OFFSET {
        return Err(Qcow2Error::Invalid(format!("size {size} is too large")));
    }
    let l1_size = Header::l1_entries_for(size, bits);
    if l1_size * 8 > super::header::MAX_L1_BYTES {
        return Err(Qcow2Error::Invalid(format!(
            "size {size} needs an L1 table over 32 MiB with {cs}-byte clusters; use larger clusters"
        )));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    let rb_entries = cs * 8 / 16;
    // Header, refcount table, refcount blocks, L1: the blocks must count
    // themselves, so iterate to a fixed point.
    let (mut rt_clusters, mut rb_count) = (1u64, 1u64);
    loop {
        let total = 1 + rt_clusters + rb_count + l1_clusters;
        let rb = total.div_ceil(rb_entries);
        let rt = (rb * 8).div_ceil(cs);
        if (rb, rt) == (rb_count, rt_clusters) {
            break;
        }
        (rb_count, rt_clusters) = (rb, rt);
    }
    let rt_off = cs;
    let rb_off = rt_off + rt_clusters * cs;
    let l1_off = rb_off + rb_count * cs;
    let total = 1 + rt_clusters + rb_count + l1_clusters;
    let h = Header {
        version: 3,
        cluster_bits: bits,
        size,
        l1_size: u32::try_from(l1_size).map_err(|_| Qcow2Error::Invalid("L1 too large".into()))?,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: u32::try_from(rt_clusters)
            .map_err(|_| Qcow2Error::Invalid("refcount table too large".into()))?,
        nb_snapshots: 0,
        incompatible: 0,
        compatible: 0,
        autoclear: 0,
        refcount_order: 4,
        header_length: V3_HEADER_LEN,
        backing_file: opts.backing.clone(),
        backing_format,
    };
    let head = h.encode();
    if head.len() as u64 > cs {
        return Err(Qcow2Error::Invalid(format!(
            "the header and backing file name do not fit in a {cs}-byte cluster"
        )));
    }
    let path = &opts.path;
    // The caller names the image in its errors.
    let err = |e| Qcow2Error::Io(String::new(), e);
    let file = FsOpen::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(err)?;
    let write = |data: &[u8], off: u64| file.write_all_at(data, off).map_err(err);
    let result = (|| {
        write(&head, 0)?;
        let mut rt = vec![0u8; usize::try_from(rt_clusters * cs).unwrap_or(0)];
        for i in 0..rb_count {
            let at = usize::try_from(i * 8).unwrap_or(0);
            rt[at..at + 8].copy_from_slice(&(rb_off + i * cs).to_be_bytes());
        }
        write(&rt, rt_off)?;
        let cs_usize = usize::try_from(cs).unwrap_or(0);
        for i in 0..rb_count {
            let mut block = vec![0u8; cs_usize];
            for c in i * rb_entries..((i + 1) * rb_entries).min(total) {
                refcount_set(&mut block, c - i * rb_entries, 16, 1);
            }
            write(&block, rb_off + i * cs)?;
        }
        // The L1 table, zero (the file's end makes it read as zeroes too,
        // but qemu-img check wants the clusters present).
        write(
            &vec![0u8; usize::try_from(l1_clusters * cs).unwrap_or(0)],
            l1_off,
        )?;
        file.sync_all().map_err(err)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// The size and format of a backing file, opening a qcow2 one (and its chain).
fn probe_backing(path: &Path, format: Option<&str>) -> Result<(u64, String), Qcow2Error> {
    let bad = |e: std::io::Error| Qcow2Error::Backing(format!("{}: {e}", path.display()));
    let fmt = match format {
        Some(f) => f.to_string(),
        None => {
            let file = crate::targets::file::open_data(path, true, false).map_err(bad)?;
            super::image::probe_format(&std::fs::File::from(file))?.to_string()
        }
    };
    match fmt.as_str() {
        "qcow2" => {
            let img = Image::open(
                path,
                &OpenOptions {
                    read_only: true,
                    caches: CacheSizes {
                        l2: 2,
                        refblocks: 2,
                    },
                },
            )
            .map_err(|e| Qcow2Error::Backing(format!("{}: {e}", path.display())))?;
            Ok((img.size(), fmt))
        }
        "raw" => Ok((std::fs::metadata(path).map_err(bad)?.len(), fmt)),
        other => Err(Qcow2Error::Invalid(format!(
            "backing format {other:?}: qcow2 and raw are supported"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bad_sizes_are_refused_before_a_file_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.qcow2");
        for size in [0, 1, 511, u64::MAX] {
            let e = create(&CreateOptions::new(&path, size)).unwrap_err();
            assert!(matches!(e, Qcow2Error::Invalid(_)), "{size}: {e:?}");
            assert!(!path.exists(), "size {size} left {} behind", path.display());
        }
        create(&CreateOptions::new(&path, 512)).unwrap();
        assert!(path.exists());
    }

    #[test]
    fn an_existing_file_is_neither_overwritten_nor_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.qcow2");
        std::fs::write(&path, b"mine").unwrap();
        let e = create(&CreateOptions::new(&path, 1 << 20)).unwrap_err();
        // The caller names the path: the error does not repeat it.
        assert_eq!(e.to_string(), "File exists (os error 17)");
        assert_eq!(std::fs::read(&path).unwrap(), b"mine");
    }
}
