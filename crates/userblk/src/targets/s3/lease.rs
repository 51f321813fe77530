//! One writer at a time: the lease object, and what makes it hold.
//!
//! Before the volume is touched, [`guard`] decides what keeps a second
//! writer out ([`LeaseMode`]):
//! - `auto`: the server's conditional writes, if [`probe`] finds them
//!   atomic (AWS, MinIO, RADOS Gateway...); a server that is not (s3s-fs)
//!   is refused with the reason, since the lease could let two writers in;
//! - `host`: an exclusive lock of this host ([`host_lock`]), for such
//!   servers: two daemons of this host never serve one volume; daemons of
//!   other hosts are kept out only as well as the server's writes allow.
//!
//! Then a daemon takes `{prefix}/lease.json` with a conditional create
//! (`If-None-Match: *`) and reads it back. A lease held by another process
//! is honoured, except:
//! - its holder is a process of this host that no longer runs (the daemon
//!   that `userblk recover` replaces, or one killed): taken over;
//! - the user asked to break it (`--break-lease`): overwritten, with a warning.
//!
//! A takeover overwrites the lease only if it is still the one read
//! (`If-Match` with its ETag), so of two daemons taking over one stale lease
//! one wins; under `--lease host` it is a plain overwrite (the host lock
//! already keeps this host's daemons apart).
//!
//! The lease is deleted when the target closes, if it is still ours: read,
//! compared, then deleted, since RADOS Gateway 16.2 ignores `If-Match` on
//! DELETE. In between, a daemon of another host that breaks the lease
//! (`--break-lease`) can lose its new lease to that delete.

pub mod host_lock;
pub mod probe;

use bytes::Bytes;

use self::host_lock::HostLock;
use self::probe::{EtagForm, Verdict};
use super::layout::{Lease, VolumeId, LEASE_KEY};
use super::{S3Error, S3Store};

/// What keeps a second writer out (`add s3 --lease`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LeaseMode {
    /// The server's atomic conditional writes; refused where the probe
    /// finds them not atomic.
    #[default]
    Auto,
    /// A lock of this host, whatever the server does.
    Host,
}

/// What keeps a second writer out, once [`guard`] chose; held for as long
/// as the volume is open.
#[derive(Debug)]
pub enum Guard {
    /// The server's conditional writes, atomic; `If-Match` takes this form.
    Atomic(EtagForm),
    /// This host's lock.
    Host(HostLock),
}

/// Decide what keeps a second writer out of the volume of `store`, before
/// anything of it is read or written (a volume created at the same time by
/// two daemons is one of the races).
///
/// # Errors
/// [`S3Error::NotAtomic`] under `auto` on a server that is not atomic, the
/// host lock's errors under `host`, the probe's requests' errors.
pub fn guard(store: &S3Store, mode: LeaseMode) -> Result<Guard, S3Error> {
    match mode {
        LeaseMode::Host => {
            let lock = HostLock::take(store)?;
            tracing::info!(
                "s3: --lease host: this host's daemons are kept apart by {}; other hosts' only \
                 as far as the server's conditional writes go",
                lock.path().display()
            );
            Ok(Guard::Host(lock))
        }
        LeaseMode::Auto => {
            let p = probe::run(store)?;
            match p.verdict {
                Verdict::Atomic(form) => {
                    tracing::info!(
                        "s3: {} makes conditional writes atomic (probed in {} ms)",
                        store.endpoint(),
                        p.took.as_millis()
                    );
                    Ok(Guard::Atomic(form))
                }
                Verdict::Not(reason) => Err(S3Error::NotAtomic {
                    endpoint: store.endpoint().to_owned(),
                    reason,
                }),
            }
        }
    }
}

/// Whether process `pid` of this host still runs (a zombie, killed but not
/// yet reaped, holds no lease).
fn alive(pid: u32) -> bool {
    i32::try_from(pid).is_ok_and(crate::sys::process_runs)
}

fn same_holder(a: &Lease, b: &Lease) -> bool {
    a.host == b.host && a.pid == b.pid && a.acquired_unix == b.acquired_unix
}

fn held(l: &Lease) -> S3Error {
    S3Error::LeaseHeld {
        host: l.host.clone(),
        pid: l.pid,
        since_unix: l.acquired_unix,
    }
}

/// Rounds of create, read and take over before giving up: each one that
/// fails means another daemon changed the lease meanwhile.
const ROUNDS: usize = 3;

/// Take the lease of `volume` for this process, under `guard`.
pub fn acquire(
    store: &S3Store,
    volume: VolumeId,
    break_lease: bool,
    guard: &Guard,
) -> Result<Lease, S3Error> {
    let ours = Lease::for_this_process(volume);
    let body = Bytes::from(ours.encode()?);
    for _ in 0..ROUNDS {
        if store.put_if_absent(LEASE_KEY, body.clone())? {
            return confirm(store, &ours);
        }
        let Some((bytes, etag)) = store.get_with_etag(LEASE_KEY)? else {
            // Released meanwhile: create it again.
            continue;
        };
        match Lease::decode(&bytes).ok() {
            // Our own create, retried after the server had applied it.
            Some(h) if same_holder(&h, &ours) => return confirm(store, &ours),
            Some(h) if !break_lease && (h.host != ours.host || alive(h.pid)) => {
                return Err(held(&h));
            }
            Some(h) if break_lease => tracing::warn!(
                "s3: breaking the lease of {} pid {} (taken at unix time {}) as asked",
                h.host,
                h.pid,
                h.acquired_unix
            ),
            Some(h) => tracing::warn!(
                "s3: taking over the lease of pid {} of this host, which no longer runs",
                h.pid
            ),
            None => tracing::warn!("s3: the volume's lease is unreadable; replacing it"),
        }
        match guard {
            Guard::Atomic(form) => {
                if store
                    .put_if_match(LEASE_KEY, body.clone(), &form.apply(&etag))?
                    .is_none()
                {
                    // Another daemon changed it first: look again.
                    continue;
                }
            }
            Guard::Host(_) => store.put(LEASE_KEY, body.clone())?,
        }
        return confirm(store, &ours);
    }
    Err(S3Error::Invalid(format!(
        "the volume's lease changed {ROUNDS} times while this daemon took it: \
         other daemons are starting on it"
    )))
}

/// The read-back: on a server whose writes are atomic it only finds a
/// lease broken on purpose meanwhile; under `--lease host` it also decides
/// races with other hosts as well as it can.
fn confirm(store: &S3Store, ours: &Lease) -> Result<Lease, S3Error> {
    match store.get(LEASE_KEY)?.map(|b| Lease::decode(&b)) {
        Some(Ok(l)) if same_holder(&l, ours) => Ok(ours.clone()),
        Some(Ok(l)) => Err(held(&l)),
        _ => Err(S3Error::Invalid(
            "the volume's lease vanished while it was taken: another daemon is starting".into(),
        )),
    }
}

/// Who holds the volume's lease now: `None` when nobody does, or only a
/// process of this host that no longer runs.
///
/// # Errors
/// The bucket's errors; an unreadable lease.
pub fn live_holder(store: &S3Store) -> Result<Option<Lease>, S3Error> {
    let Some(b) = store.get(LEASE_KEY)? else {
        return Ok(None);
    };
    let l = Lease::decode(&b)?;
    if on_this_host(&l) && !alive(l.pid) {
        return Ok(None);
    }
    Ok(Some(l))
}

/// Whether lease `l` was taken on this host.
#[must_use]
pub fn on_this_host(l: &Lease) -> bool {
    l.host == rustix::system::uname().nodename().to_string_lossy()
}

/// Whether the lease is still `ours`: a change of the volume itself (a
/// resize) is made only by its holder, and refused once another daemon
/// took the lease over (`--break-lease` on another host).
pub fn check(store: &S3Store, ours: &Lease) -> Result<(), S3Error> {
    match store.get(LEASE_KEY)?.map(|b| Lease::decode(&b)) {
        Some(Ok(l)) if same_holder(&l, ours) => Ok(()),
        Some(Ok(l)) => Err(held(&l)),
        _ => Err(S3Error::Invalid(
            "the volume's lease is gone or unreadable: this daemon no longer owns the volume"
                .into(),
        )),
    }
}

/// Give the lease back, if it is still ours.
pub fn release(store: &S3Store, ours: &Lease) {
    match store.get(LEASE_KEY) {
        Ok(Some(b)) if Lease::decode(&b).is_ok_and(|l| same_holder(&l, ours)) => {
            if let Err(e) = store.delete(LEASE_KEY) {
                tracing::warn!("s3: releasing the lease: {e}");
            }
        }
        Ok(_) => tracing::warn!("s3: the lease was no longer ours at close; left as it is"),
        Err(e) => tracing::warn!("s3: reading the lease at close: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        assert!(alive(std::process::id()));
        let child = std::process::Command::new("true").spawn();
        if let Ok(mut c) = child {
            let pid = c.id();
            let _ = c.wait();
            assert!(!alive(pid));
        }
        assert!(!alive(u32::MAX));
    }
}
