//! `gc`: delete the chunk objects of an s3 bucket nothing reads any more,
//! and the bytes each snapshot alone holds (for `snapshot list`).

use anyhow::bail;
use userblk::targets::s3::layout::SnapshotRecord;
use userblk::targets::s3::S3Store;

use crate::cli::GcArgs;

/// `userblk gc s3://BUCKET[/PREFIX]`.
pub fn run(args: &GcArgs) -> anyhow::Result<()> {
    bail!("{}: gc is not built yet", args.bucket)
}

/// Per snapshot of `list`, the bytes only it holds (`None`: not known).
pub fn exclusive_bytes(
    _store: &S3Store,
    list: &[SnapshotRecord],
) -> anyhow::Result<Vec<Option<u64>>> {
    Ok(vec![None; list.len()])
}
