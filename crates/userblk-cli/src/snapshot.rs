//! `snapshot create|list|delete` and `clone`: snapshots and clones of s3
//! volumes. A live volume's snapshot is taken by the daemon serving it,
//! through its control socket; a volume nobody serves is opened here, as
//! `add s3` would, long enough to take it.

use std::time::Duration;

use anyhow::{bail, Context};
use userblk::control::{self, Request};
use userblk::targets::s3::layout::SnapshotRecord;
use userblk::targets::s3::{lease, snapshots, S3Options, S3Store, S3Target};

use crate::cli::{CloneArgs, SnapshotAction, SnapshotArgs, SnapshotCreateArgs};
use crate::out::outln;
use crate::s3::S3Url;

/// Longest a live snapshot may take: its flush rides out the bucket's
/// retry budget (60 s by default) per chunk batch.
const LIVE_TIMEOUT: Duration = Duration::from_secs(600);

/// `userblk snapshot ...`.
pub fn run(args: &SnapshotArgs) -> anyhow::Result<()> {
    match &args.action {
        SnapshotAction::Create(a) => create(a),
        SnapshotAction::List(a) => {
            let store = open_store(&a.volume)?;
            let list = snapshots::list(&store).with_context(|| a.volume.to_string())?;
            let held = crate::gc::exclusive_bytes(&store, &list)?;
            if a.json {
                let v: Vec<serde_json::Value> = list
                    .iter()
                    .zip(&held)
                    .map(|(r, h)| {
                        let mut v = serde_json::json!(r);
                        v["exclusive_bytes"] = serde_json::json!(h);
                        v
                    })
                    .collect();
                outln!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            outln!(
                "{:<24} {:<20} {:>10} {:>10}",
                "NAME",
                "CREATED (UTC)",
                "SIZE",
                "EXCLUSIVE"
            );
            for (r, h) in list.iter().zip(&held) {
                outln!(
                    "{:<24} {:<20} {:>10} {:>10}",
                    r.name,
                    utc(r.created_unix),
                    userblk::size::format(r.device_size),
                    crate::copy::human(*h as f64)
                );
            }
            Ok(())
        }
        SnapshotAction::Delete(a) => {
            no_snapshot_in(&a.volume)?;
            let store = open_store(&a.volume)?;
            snapshots::delete(&store, &a.name).with_context(|| a.volume.to_string())?;
            outln!(
                "deleted snapshot {} of {}; `userblk gc` frees its data after the grace period",
                a.name,
                a.volume
            );
            Ok(())
        }
    }
}

/// `userblk clone s3://B/P@NAME s3://B/NEW`.
pub fn clone(args: &CloneArgs) -> anyhow::Result<()> {
    let Some(name) = &args.snapshot.snapshot else {
        bail!(
            "{}: name the snapshot to clone: {}@NAME (`userblk snapshot create` takes one)",
            args.snapshot,
            args.snapshot
        );
    };
    no_snapshot_in(&args.volume)?;
    if args.volume.bucket != args.snapshot.bucket {
        bail!(
            "{}: a clone lives in its parent's bucket ({}): no data is copied",
            args.volume,
            args.snapshot.bucket
        );
    }
    let src = open_store(&args.snapshot)?;
    let dst = src
        .at_prefix(&args.volume.prefix)
        .with_context(|| args.volume.to_string())?;
    let m = snapshots::clone_volume(&src, name, &dst)
        .with_context(|| format!("cloning {} to {}", args.snapshot, args.volume))?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        outln!(
            "cloned {} to {}: {}, {} ancestor{}",
            args.snapshot,
            args.volume,
            userblk::size::format(m.device_size),
            m.parents.len(),
            if m.parents.len() == 1 { "" } else { "s" }
        );
    }
    Ok(())
}

fn no_snapshot_in(url: &S3Url) -> anyhow::Result<()> {
    if url.snapshot.is_some() {
        bail!("{url}: name the volume, without @SNAPSHOT");
    }
    Ok(())
}

/// The store of `url`'s volume, checked (endpoint, credentials, bucket).
pub fn open_store(url: &S3Url) -> anyhow::Result<S3Store> {
    let store = S3Store::new(&url.config()).with_context(|| url.to_string())?;
    store.check().with_context(|| url.to_string())?;
    Ok(store)
}

fn create(a: &SnapshotCreateArgs) -> anyhow::Result<()> {
    no_snapshot_in(&a.volume)?;
    userblk::targets::s3::layout::check_snapshot_name(&a.name)?;
    let store = open_store(&a.volume)?;
    snapshots::manifest(&store).with_context(|| a.volume.to_string())?;
    let record = match lease::live_holder(&store).with_context(|| a.volume.to_string())? {
        Some(h) if lease::on_this_host(&h) => live(&a.volume, h.pid, &a.name)?,
        Some(h) => bail!(
            "{}: served by {} pid {}: take the snapshot there, where its daemon holds the \
             volume's unwritten data",
            a.volume,
            h.host,
            h.pid
        ),
        None => offline(a)?,
    };
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        outln!(
            "snapshot {} of {}: {}, epoch {}",
            record.name,
            a.volume,
            userblk::size::format(record.device_size),
            record.epoch
        );
    }
    Ok(())
}

/// Ask the daemon `pid` of this host, which serves the volume, to take it.
fn live(url: &S3Url, pid: u32, name: &str) -> anyhow::Result<SnapshotRecord> {
    let path = crate::ctl::socket_path(i32::try_from(pid).unwrap_or(i32::MAX));
    if !path.exists() {
        bail!(
            "{url}: pid {pid} of this host holds the volume but has no control socket at {} \
             (not a userblk daemon, or one with another USERBLK_STATE_DIR): stop it, or take \
             the snapshot where it can be asked",
            path.display()
        );
    }
    let req = Request::Run {
        action: "snapshot".into(),
        args: vec![name.to_owned()],
    };
    let reply = control::request(&path, &req, LIVE_TIMEOUT)
        .with_context(|| format!("{url}: asking its daemon (pid {pid})"))?;
    if !reply.ok {
        bail!(
            "{url}: its daemon (pid {pid}) did not take the snapshot: {}",
            reply.error.unwrap_or_else(|| "failed".into())
        );
    }
    let line = reply.output.first().map(String::as_str).unwrap_or_default();
    let json = line.split_once(": ").map_or(line, |(_, j)| j);
    serde_json::from_str(json).with_context(|| format!("{url}: its daemon answered {line:?}"))
}

/// No daemon serves the volume: open it here (its lease, its cache, as
/// `add s3` does) and take the snapshot.
fn offline(a: &SnapshotCreateArgs) -> anyhow::Result<SnapshotRecord> {
    let config = a.volume.config();
    let (cache, ephemeral) = match &a.cache_dir {
        Some(d) => (std::path::absolute(d).unwrap_or_else(|_| d.clone()), false),
        None => {
            let d = crate::s3::default_cache_dir(&config)?;
            if d.exists() {
                // A daemon served the volume from here: what it left
                // unuploaded goes up before the snapshot.
                (d, false)
            } else {
                // Nothing to pick up: a cache for this command only, not
                // one left behind for a volume this host may never serve.
                let tmp = std::env::var_os("TMPDIR")
                    .map_or_else(|| std::path::PathBuf::from("/var/tmp"), Into::into);
                let dir = tmp.join(format!("userblk-snapshot-s3-{}", std::process::id()));
                (dir, true)
            }
        }
    };
    let mut opts = S3Options::new(config, cache);
    opts.ephemeral_cache = ephemeral;
    opts.lease = a.volume.lease();
    let target = S3Target::open(opts).with_context(|| a.volume.to_string())?;
    let r = target
        .snapshot(&a.name)
        .with_context(|| a.volume.to_string())?;
    Ok(r)
}

/// `unix` as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn utc(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian), by
    // 400-year eras of 146,097 days.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_796_601_599), "2026-12-06 23:59:59");
        assert_eq!(utc(4_107_542_400), "2100-03-01 00:00:00");
    }
}
