//! `gc`: delete the chunk objects of an s3 bucket that nothing reads any
//! more ([`userblk::targets::s3::gc`] decides and deletes), and the bytes
//! each snapshot alone holds (for `snapshot list`).

use std::time::Duration;

use anyhow::Context;
use userblk::targets::s3::gc::{self, GcOptions};
use userblk::targets::s3::layout::SnapshotRecord;
use userblk::targets::s3::S3Store;

use crate::cli::GcArgs;
use crate::out::outln;

/// `userblk gc s3://BUCKET[/PREFIX]`.
pub fn run(args: &GcArgs) -> anyhow::Result<()> {
    let url = &args.bucket;
    if url.snapshot.is_some() {
        anyhow::bail!("{url}: gc takes a bucket or a prefix, without @SNAPSHOT");
    }
    let root = crate::snapshot::open_store(url)?
        .at_prefix("")
        .with_context(|| url.to_string())?;
    let opts = GcOptions {
        dry_run: args.dry_run,
        grace: Duration::from_secs(args.grace),
    };
    let report = gc::collect(&root, &url.prefix, &opts).with_context(|| format!("gc {url}"))?;
    for m in &report.missing_parents {
        eprintln!("userblk: gc: {m}");
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if args.dry_run {
        for k in report.deleted.iter().chain(&report.removed_records) {
            outln!("{k}");
        }
    }
    let c = &report.counts;
    outln!(
        "gc {url}: {} volumes, {} snapshots, {} objects ({}); {} {} objects ({}) and {} deleted snapshot records",
        c.volumes,
        c.snapshots,
        c.objects,
        crate::copy::human(c.bytes as f64),
        if args.dry_run { "would delete" } else { "deleted" },
        report.deleted.len(),
        crate::copy::human(report.deleted_bytes as f64),
        report.removed_records.len()
    );
    Ok(())
}

/// Per snapshot of `list` (of the volume at `store`), the bytes only it
/// holds: what deleting it would let `gc` free.
pub fn exclusive_bytes(store: &S3Store, list: &[SnapshotRecord]) -> anyhow::Result<Vec<u64>> {
    let root = store.at_prefix("")?;
    let held = gc::exclusive_bytes(&root, store.prefix(), gc::DEFAULT_GRACE)?;
    Ok(list
        .iter()
        .map(|r| held.get(&r.name).copied().unwrap_or(0))
        .collect())
}
