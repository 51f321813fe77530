//! Opening a volume: its manifest (created on first use), the lease, the
//! cache directory, and the worker threads.

use std::collections::{BTreeSet, VecDeque};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;

use super::{lock, zc, Core, Counters, Job, S3Options, S3Target, State, REQUEST_WORKERS};
use crate::io::Deferred;
use crate::target::Request;
use crate::targets::s3::cache::{CacheDir, Opened};
use crate::targets::s3::chunks::Table;
use crate::targets::s3::layout::{
    parse_chunk_key, unix_now, Geometry, Manifest, VolumeId, CHUNKS_DIR, MANIFEST_KEY,
};
use crate::targets::s3::{lease, S3Error, S3Store};

/// The volume's manifest: read and checked, or created (then `true`).
fn manifest(store: &S3Store, opts: &S3Options) -> Result<(Manifest, bool), S3Error> {
    let check = |m: Manifest| -> Result<Manifest, S3Error> {
        let size = opts.size.filter(|_| !opts.size_for_new_only);
        m.check_matches(size, opts.chunk_size)?;
        Ok(m)
    };
    if let Some(b) = store.get(MANIFEST_KEY)? {
        return Ok((check(Manifest::decode(&b)?)?, false));
    }
    let Some(size) = opts.size else {
        return Err(S3Error::NoVolume {
            bucket: store.bucket().to_owned(),
            prefix: store.prefix().to_owned(),
        });
    };
    let chunk_size = opts
        .chunk_size
        .unwrap_or(crate::targets::s3::DEFAULT_CHUNK_SIZE);
    let geometry = Geometry::new(size, chunk_size)?;
    let volume = VolumeId::random().map_err(|e| S3Error::Invalid(format!("random id: {e}")))?;
    let m = Manifest::new(geometry, volume, unix_now());
    let created = store.put_if_absent(MANIFEST_KEY, Bytes::from(m.encode()?))?;
    if created {
        tracing::info!(
            "s3: created volume {} ({size} bytes in chunks of {chunk_size}) at {}/{}",
            m.volume_id,
            store.bucket(),
            store.prefix()
        );
    }
    // Whoever won a race, the bucket's manifest is the volume.
    match store.get(MANIFEST_KEY)? {
        Some(b) => Ok((check(Manifest::decode(&b)?)?, created)),
        None => Err(S3Error::Invalid(
            "the manifest vanished just after it was written".into(),
        )),
    }
}

impl S3Target {
    /// Open (or create, with `opts.size`) the volume, take its lease, open
    /// the cache, and start the workers.
    pub fn open(opts: S3Options) -> Result<Self, S3Error> {
        if opts.cache_size == 0 || opts.upload_jobs == 0 {
            return Err(S3Error::Invalid(
                "the cache size and the upload jobs must be at least 1".into(),
            ));
        }
        let store = S3Store::new(&opts.store)?;
        store.check()?;
        let guard = lease::guard(&store, opts.lease)?;
        let (m, created) = manifest(&store, &opts)?;
        let geometry = m.geometry()?;
        let lease = lease::acquire(&store, m.volume_id, opts.break_lease, &guard)?;
        let opened = (|| {
            let in_bucket: BTreeSet<u64> = store
                .list(CHUNKS_DIR)?
                .iter()
                .filter_map(|(k, _)| parse_chunk_key(k))
                .collect();
            let origin = format!("{}|{}|{}", store.endpoint(), store.bucket(), store.prefix());
            let (cache, states, how) =
                CacheDir::open(&opts.cache_dir, &origin, m.volume_id, geometry)?;
            Ok::<_, S3Error>((in_bucket, cache, states, how))
        })();
        let (mut in_bucket, cache, states, how) = match opened {
            Ok(x) => x,
            Err(e) => {
                lease::release(&store, &lease);
                return Err(e);
            }
        };
        match how {
            Opened::Empty => {}
            Opened::Kept { dirty: 0, clean } => tracing::info!(
                "s3: cache {} kept: {clean} clean chunks",
                opts.cache_dir.display()
            ),
            Opened::Kept { dirty, clean } => tracing::warn!(
                "s3: cache {} kept: {clean} clean chunks, {dirty} dirty ones to upload \
                 (the last daemon stopped before uploading them)",
                opts.cache_dir.display()
            ),
            Opened::DroppedAfterReboot { dirty } => tracing::warn!(
                "s3: cache {} dropped: the machine restarted after the daemon stopped uncleanly; \
                 {dirty} chunks written but never flushed are lost, as after a power cut",
                opts.cache_dir.display()
            ),
        }
        let table = Table::new(&states, &in_bucket);
        let strays = in_bucket.split_off(&geometry.chunk_count());
        let core = Arc::new(Core {
            store,
            geometry: RwLock::new(geometry),
            manifest: Mutex::new(m.clone()),
            volume: m.volume_id,
            cache,
            state: Mutex::new(State {
                table,
                queue: VecDeque::new(),
                queued: BTreeSet::new(),
                last_read: None,
                streak: 0,
                strays,
            }),
            cv: Condvar::new(),
            work: Condvar::new(),
            tick: Condvar::new(),
            cache_size: opts.cache_size,
            dirty_max: (opts.cache_size / geometry.chunk_size()).max(2 * opts.upload_jobs as u64),
            writeback_delay: opts.writeback_delay,
            start: Instant::now(),
            counters: Counters::default(),
        });
        let mut target = S3Target {
            core,
            lease,
            _guard: guard,
            created,
            ephemeral_cache: opts.ephemeral_cache,
            actions: Mutex::new(Vec::new()),
            resizing: Mutex::new(()),
            jobs: None,
            threads: Vec::new(),
            zc_id: zc::next_id(),
        };
        target.start(opts.upload_jobs)?;
        Ok(target)
    }

    fn start(&mut self, upload_jobs: usize) -> Result<(), S3Error> {
        let (tx, rx) = mpsc::channel::<(Deferred, Request, Job)>();
        let rx = Arc::new(Mutex::new(rx));
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(S3Error::Thread)
        };
        for i in 0..REQUEST_WORKERS {
            let (core, rx) = (Arc::clone(&self.core), Arc::clone(&rx));
            self.threads.push(spawn(
                format!("s3-request-{i}"),
                Box::new(move || loop {
                    let job = lock(&rx).recv();
                    let Ok((mut d, req, job)) = job else { break };
                    let res = core.work(job, req, &mut d);
                    d.complete(match res {
                        Ok(n) => i32::try_from(n).unwrap_or(i32::MAX),
                        Err(e) => -e.raw_os_error(),
                    });
                }),
            )?);
        }
        for i in 0..upload_jobs {
            let core = Arc::clone(&self.core);
            self.threads.push(spawn(
                format!("s3-transfer-{i}"),
                Box::new(move || core.transfers()),
            )?);
        }
        let core = Arc::clone(&self.core);
        self.threads.push(spawn(
            "s3-writeback".into(),
            Box::new(move || core.writeback()),
        )?);
        self.jobs = Some(tx);
        Ok(())
    }
}
