//! One writer: RBD's exclusive lock.
//!
//! After opening, the daemon takes the image's exclusive lock
//! (`rbd_lock_acquire`; an image without the exclusive-lock feature is
//! refused). librbd 16.2 answers a lock another live client keeps with
//! `EROFS` (that client refuses to hand it over). Then:
//! - if the holder is a userblk daemon of this host that no longer runs
//!   (killed, or the one `userblk recover` replaces), its lock is broken
//!   and taken: each daemon records `OWNER HOST PID` in the image
//!   metadata key [`HOLDER_KEY`] once it holds the lock, and only the
//!   owner named there is broken. Without this the new daemon would wait
//!   for the dead client's watch to time out (about 30 s);
//! - with `--break-lock` any holder is broken, with a warning;
//! - else opening fails, naming the holder.
//!
//! The record stays when the daemon ends (clearing it would be one more
//! wait on a cluster that may be gone): it names an owner address no later
//! client has, so it never matches another lock.
//!
//! Breaking a lock makes librbd blocklist the old client first (while
//! `rbd_blocklist_on_break_lock` is on, the default), so a holder that was
//! only slow cannot write again.

use userblk_rbd::{Image, RbdError};

/// The image metadata key naming the userblk daemon that holds the lock.
pub const HOLDER_KEY: &str = "userblk.holder";

/// EROFS (the holder refused) and EBUSY: the lock is another client's.
const HELD: [i32; 2] = [30, 16];

/// One daemon's record: `OWNER HOST PID` (OWNER is librbd's name for the
/// lock's owner: the client's address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The lock owner, as librbd names it.
    pub owner: String,
    /// The host's name.
    pub host: String,
    /// The daemon's pid there.
    pub pid: i32,
}

impl Holder {
    fn parse(s: &str) -> Option<Holder> {
        let mut it = s.split_whitespace();
        let h = Holder {
            owner: it.next()?.to_string(),
            host: it.next()?.to_string(),
            pid: it.next()?.parse().ok()?,
        };
        it.next().is_none().then_some(h)
    }

    fn render(&self) -> String {
        format!("{} {} {}", self.owner, self.host, self.pid)
    }

    /// A daemon of this host that no longer runs.
    fn is_dead_here(&self, host: &str) -> bool {
        self.host == host && !crate::sys::process_runs(self.pid)
    }
}

fn this_host() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// Take the exclusive lock of `image`; returns our owner name.
pub fn take(image: &Image, break_lock: bool) -> Result<String, RbdError> {
    if image.features()? & userblk_rbd::ffi::RBD_FEATURE_EXCLUSIVE_LOCK == 0 {
        return Err(RbdError::NoExclusiveLock(image.name().to_string()));
    }
    let host = this_host();
    // Break a lock we may break before asking for it: librbd would first
    // ask the holder, and a dead holder answers only when its watch times
    // out (about 30 s).
    let owners = image.lock_owners()?;
    let recorded = image
        .metadata(HOLDER_KEY)?
        .as_deref()
        .and_then(Holder::parse);
    if !owners.is_empty() {
        let dead = recorded
            .as_ref()
            .filter(|h| h.is_dead_here(&host) && owners.contains(&h.owner));
        if break_lock {
            for o in &owners {
                tracing::warn!(
                    "rbd: breaking {o}'s lock of {} (--break-lock)",
                    image.name()
                );
                image.break_lock(o)?;
            }
        } else if let Some(h) = dead {
            tracing::info!(
                "rbd: {} was locked by {}, a daemon of this host (pid {}) that is gone: breaking its lock",
                image.name(),
                h.owner,
                h.pid
            );
            image.break_lock(&h.owner)?;
        }
    }
    match image.lock_exclusive() {
        Ok(()) => {}
        Err(e) if e.errno().is_some_and(|n| HELD.contains(&n)) => {
            let owners = image.lock_owners()?;
            return Err(RbdError::Locked {
                image: image.name().to_string(),
                owners: describe_owners(&owners, recorded.as_ref()),
            });
        }
        Err(e) => return Err(e),
    }
    // librbd names owners by their address; ours is the one it lists now.
    let owner = image
        .lock_owners()?
        .into_iter()
        .next()
        .unwrap_or_else(|| image.client());
    let me = Holder {
        owner: owner.clone(),
        host,
        pid: rustix::process::getpid().as_raw_nonzero().get(),
    };
    image.set_metadata(HOLDER_KEY, &me.render())?;
    Ok(owner)
}

/// The holders for a refusal: librbd's names, and the userblk daemon's
/// host and pid where the record is about the same client.
fn describe_owners(owners: &[String], recorded: Option<&Holder>) -> String {
    if owners.is_empty() {
        return "another client (it released the lock while we looked)".into();
    }
    owners
        .iter()
        .map(|o| match recorded {
            Some(h) if &h.owner == o => format!("{o} (userblk daemon pid {} on {})", h.pid, h.host),
            _ => o.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_records_round_trip_and_junk_is_none() {
        let h = Holder {
            owner: "client.4242".into(),
            host: "box".into(),
            pid: 77,
        };
        assert_eq!(Holder::parse(&h.render()), Some(h.clone()));
        assert_eq!(Holder::parse(""), None);
        assert_eq!(Holder::parse("client.1 box"), None);
        assert_eq!(Holder::parse("client.1 box x"), None);
        assert_eq!(Holder::parse("client.1 box 1 2"), None);
        assert_eq!(
            describe_owners(&["client.4242".into()], Some(&h)),
            "client.4242 (userblk daemon pid 77 on box)"
        );
        assert_eq!(describe_owners(&["client.9".into()], Some(&h)), "client.9");
    }
}
