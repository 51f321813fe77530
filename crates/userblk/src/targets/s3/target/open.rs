//! Opening a volume: its manifest (created on first use), the lease, the
//! cache directory, and the worker threads.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;

use super::{lock, zc, Core, Counters, Job, Layer, S3Options, S3Target, State, REQUEST_WORKERS};
use crate::io::Deferred;
use crate::target::Request;
use crate::targets::s3::cache::{CacheDir, Opened};
use crate::targets::s3::chunks::{Below, Stored, Table};
use crate::targets::s3::layout::{
    unix_now, Geometry, Lease, Manifest, ParentRef, VolumeId, CHUNKS_DIR, MANIFEST_KEY,
    TOMBSTONE_LEN,
};
use crate::targets::s3::snapshots;
use crate::targets::s3::view::{self, Source, Versions};
use crate::targets::s3::{lease, S3Error, S3Store};

/// What an open gathered, for [`S3Target::assemble`].
struct Parts {
    store: S3Store,
    manifest: Manifest,
    geometry: Geometry,
    stored: BTreeMap<u64, Stored>,
    parents: Vec<Layer>,
    cache: CacheDir,
    states: Vec<u8>,
    read_only: bool,
    /// The snapshot's epoch (read-only), else the manifest's head.
    epoch: Option<u64>,
}

/// Say what the cache directory held.
fn report_cache(opts: &S3Options, how: &Opened) {
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
}

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

/// What the bucket has per chunk, seen from the head epoch (`head`) or
/// from a snapshot of it (`None`; `view` is then the snapshot's epoch), and
/// the stores of the clone's parents.
fn list_layers(
    store: &S3Store,
    m: &Manifest,
    head: Option<u64>,
    view: Option<u64>,
) -> Result<(BTreeMap<u64, Stored>, Vec<Layer>), S3Error> {
    let own = Versions::from_listing(&store.list(CHUNKS_DIR)?);
    let mut parents = Vec::with_capacity(m.parents.len());
    let mut listed = Vec::with_capacity(m.parents.len());
    for p in &m.parents {
        let (layer, versions) = open_parent(store, p)?;
        parents.push(layer);
        listed.push((versions, p.epoch));
    }
    let layers: Vec<view::Layer<'_>> = std::iter::once(view::Layer {
        versions: &own,
        epoch: view,
    })
    .chain(listed.iter().map(|(v, e)| view::Layer {
        versions: v,
        epoch: Some(*e),
    }))
    .collect();
    let mut stored = BTreeMap::new();
    for i in view::indices(&layers) {
        let s = Stored {
            head: head
                .and_then(|h| own.at(i, h).filter(|&(e, _)| e == h))
                .map(|(_, size)| size == TOMBSTONE_LEN),
            below: match view::resolve(&layers, i) {
                Source::Zero => None,
                Source::Object { layer, epoch } => Some(Below { layer, epoch }),
            },
        };
        if s != Stored::default() {
            stored.insert(i, s);
        }
    }
    Ok((stored, parents))
}

/// A clone's parent `p`: its store and its objects, once its manifest
/// shows it is still the volume the clone was made from.
fn open_parent(store: &S3Store, p: &ParentRef) -> Result<(Layer, Versions), S3Error> {
    let gone = |what: String| S3Error::ParentGone {
        prefix: p.prefix.clone(),
        what,
    };
    let ps = store.at_prefix(&p.prefix)?;
    let pm = match ps.get(MANIFEST_KEY)? {
        None => return Err(gone("has no manifest (deleted?)".into())),
        Some(b) => Manifest::decode(&b).map_err(|e| gone(format!("has a bad manifest ({e})")))?,
    };
    if pm.volume_id != p.volume_id {
        return Err(gone(format!(
            "holds another volume ({}, not {})",
            pm.volume_id, p.volume_id
        )));
    }
    let versions = Versions::from_listing(&ps.list(CHUNKS_DIR)?);
    Ok((
        Layer {
            store: ps,
            volume: p.volume_id,
        },
        versions,
    ))
}

impl S3Target {
    /// Open (or create, with `opts.size`) the volume, take its lease, open
    /// the cache, and start the workers. With `opts.snapshot`, open that
    /// snapshot read-only instead: no lease, nothing created.
    pub fn open(opts: S3Options) -> Result<Self, S3Error> {
        if opts.cache_size == 0 || opts.upload_jobs == 0 {
            return Err(S3Error::Invalid(
                "the cache size and the upload jobs must be at least 1".into(),
            ));
        }
        let store = S3Store::new(&opts.store)?;
        store.check()?;
        if let Some(name) = opts.snapshot.clone() {
            return Self::open_snapshot(store, opts, &name);
        }
        let guard = lease::guard(&store, opts.lease)?;
        let (m, created) = manifest(&store, &opts)?;
        let geometry = m.geometry()?;
        let lease = lease::acquire(&store, m.volume_id, opts.break_lease, &guard)?;
        let opened = (|| {
            let (stored, parents) = list_layers(&store, &m, Some(m.epoch), m.epoch.checked_sub(1))?;
            let origin = format!("{}|{}|{}", store.endpoint(), store.bucket(), store.prefix());
            let (cache, states, how) =
                CacheDir::open(&opts.cache_dir, &origin, m.volume_id, geometry)?;
            Ok::<_, S3Error>((stored, parents, cache, states, how))
        })();
        let (stored, parents, cache, states, how) = match opened {
            Ok(x) => x,
            Err(e) => {
                lease::release(&store, &lease);
                return Err(e);
            }
        };
        report_cache(&opts, &how);
        let parts = Parts {
            store,
            manifest: m,
            geometry,
            stored,
            parents,
            cache,
            states,
            read_only: false,
            epoch: None,
        };
        let mut target = Self::assemble(parts, &opts, Some(lease), Some(guard), created);
        target.start(opts.upload_jobs)?;
        Ok(target)
    }

    /// Open snapshot `name` of the volume read-only.
    fn open_snapshot(store: S3Store, opts: S3Options, name: &str) -> Result<Self, S3Error> {
        let m = snapshots::manifest(&store)?;
        let r = snapshots::record(&store, &m, name)?;
        let geometry = Geometry::new(r.device_size, m.chunk_size)?;
        let (stored, parents) = list_layers(&store, &m, None, Some(r.epoch))?;
        // A cache of its own: the head's would hold newer bytes.
        let origin = format!(
            "{}|{}|{}@{name}",
            store.endpoint(),
            store.bucket(),
            store.prefix()
        );
        let (cache, states, how) = CacheDir::open(&opts.cache_dir, &origin, m.volume_id, geometry)?;
        report_cache(&opts, &how);
        let parts = Parts {
            store,
            manifest: m,
            geometry,
            stored,
            parents,
            cache,
            states,
            read_only: true,
            epoch: Some(r.epoch),
        };
        let mut target = Self::assemble(parts, &opts, None, None, false);
        target.start(opts.upload_jobs)?;
        Ok(target)
    }

    fn assemble(
        p: Parts,
        opts: &S3Options,
        lease: Option<Lease>,
        guard: Option<lease::Guard>,
        created: bool,
    ) -> Self {
        let Parts {
            store,
            manifest: m,
            geometry,
            mut stored,
            parents,
            cache,
            states,
            read_only,
            epoch,
        } = p;
        let table = Table::new(&states, &stored);
        let strays = stored.split_off(&geometry.chunk_count());
        let core = Arc::new(Core {
            store,
            geometry: RwLock::new(geometry),
            volume: m.volume_id,
            manifest: Mutex::new(m.clone()),
            parents,
            read_only,
            snapshot: opts.snapshot.clone().filter(|_| read_only),
            cache,
            state: Mutex::new(State {
                table,
                queue: VecDeque::new(),
                queued: BTreeSet::new(),
                last_read: None,
                streak: 0,
                strays,
                epoch: epoch.unwrap_or(m.epoch),
                frozen: false,
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
        S3Target {
            core,
            lease,
            _guard: guard,
            created,
            ephemeral_cache: opts.ephemeral_cache,
            actions: Mutex::new(Vec::new()),
            resizing: Arc::new(Mutex::new(())),
            jobs: None,
            threads: Vec::new(),
            zc_id: zc::next_id(),
        }
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
