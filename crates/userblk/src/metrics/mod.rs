//! Always-on request counters of a device, in a small shared file its
//! daemon writes and `userblk metrics` reads.
//!
//! [`layout`] fixes the file's words; [`Counters`] maps it (one
//! cache-line-aligned [`Block`] per serving thread, relaxed atomic adds) and
//! [`Snapshot`] reads it from any process; a [`Meter`] is what the slot
//! state machine counts with. A daemon serves one device, so it
//! [`install`]s that device's file once and every set of slots made
//! afterwards (ublk queues, FUSE threads, NBD connections) counts into it
//! without its frontend knowing.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

mod counters;
pub mod layout;
mod meter;

pub use counters::{Block, Counters, OpTotals, Snapshot};
pub use meter::Meter;

/// The counter file requests are counted into, if any.
static INSTALLED: Mutex<Option<Arc<Counters>>> = Mutex::new(None);

fn installed() -> Option<Arc<Counters>> {
    INSTALLED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// Count the requests of slots made from now on into `counters`, until
/// the returned guard is dropped.
pub fn install(counters: Arc<Counters>) -> Installed {
    *INSTALLED.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&counters));
    Installed(counters)
}

/// Open the counter file at `path` for a daemon (a new one, or with
/// `take_over` the one of the daemon it takes over from) and install it.
/// Best effort: a device whose counters cannot be kept still serves, so a
/// failure is logged and `None` returned.
pub fn install_file(path: &Path, take_over: bool) -> Option<Installed> {
    let opened = if take_over {
        Counters::take_over(path)
    } else {
        Counters::create(path)
    };
    match opened {
        Ok(c) => Some(install(c)),
        Err(e) => {
            tracing::warn!("request counters: {e}; the device is served without them");
            None
        }
    }
}

/// Requests are counted into a file while this lives.
#[derive(Debug)]
pub struct Installed(Arc<Counters>);

impl Drop for Installed {
    fn drop(&mut self) {
        let mut cur = INSTALLED.lock().unwrap_or_else(PoisonError::into_inner);
        if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, &self.0)) {
            *cur = None;
        }
    }
}

#[cfg(test)]
mod tests;
