//! One writer at a time: the lease object.
//!
//! A daemon takes `{prefix}/lease.json` with a conditional create
//! (`If-None-Match: *`) and reads it back (some servers, s3s-fs among them,
//! do not make the condition atomic under races, so the read-back decides).
//! A lease held by another process is honoured, except:
//! - its holder is a process of this host that no longer runs (the daemon
//!   that `userblk recover` replaces, or one killed): taken over;
//! - the user asked to break it (`--break-lease`): overwritten, with a warning.
//!
//! The lease is deleted when the target closes, if it is still ours.

use bytes::Bytes;

use super::layout::{Lease, VolumeId, LEASE_KEY};
use super::{S3Error, S3Store};

/// Whether process `pid` of this host still runs (a zombie, killed but not
/// yet reaped, holds no lease).
fn alive(pid: u32) -> bool {
    i32::try_from(pid).is_ok_and(crate::sys::process_runs)
}

fn same_holder(a: &Lease, b: &Lease) -> bool {
    a.host == b.host && a.pid == b.pid && a.acquired_unix == b.acquired_unix
}

/// Take the lease of `volume` for this process.
pub fn acquire(store: &S3Store, volume: VolumeId, break_lease: bool) -> Result<Lease, S3Error> {
    let ours = Lease::for_this_process(volume);
    let body = Bytes::from(ours.encode()?);
    if !store.put_if_absent(LEASE_KEY, body.clone())? {
        let held = match store.get(LEASE_KEY)? {
            Some(b) => Lease::decode(&b).ok(),
            // Released meanwhile.
            None => None,
        };
        match held {
            Some(h) if !break_lease && (h.host != ours.host || alive(h.pid)) => {
                return Err(S3Error::LeaseHeld {
                    host: h.host,
                    pid: h.pid,
                    since_unix: h.acquired_unix,
                });
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
        store.put(LEASE_KEY, body)?;
    }
    // The read-back decides who won a race.
    let now = store.get(LEASE_KEY)?.map(|b| Lease::decode(&b));
    match now {
        Some(Ok(l)) if same_holder(&l, &ours) => Ok(ours),
        Some(Ok(l)) => Err(S3Error::LeaseHeld {
            host: l.host,
            pid: l.pid,
            since_unix: l.acquired_unix,
        }),
        _ => Err(S3Error::Invalid(
            "the volume's lease vanished while it was taken: another daemon is starting".into(),
        )),
    }
}

/// Whether the lease is still `ours`: a change of the volume itself (a
/// resize) is made only by its holder, and refused once another daemon
/// took the lease over (`--break-lease` on another host).
pub fn check(store: &S3Store, ours: &Lease) -> Result<(), S3Error> {
    match store.get(LEASE_KEY)?.map(|b| Lease::decode(&b)) {
        Some(Ok(l)) if same_holder(&l, ours) => Ok(()),
        Some(Ok(l)) => Err(S3Error::LeaseHeld {
            host: l.host,
            pid: l.pid,
            since_unix: l.acquired_unix,
        }),
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
