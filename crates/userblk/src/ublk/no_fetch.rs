//! The test fail point `USERBLK_FAILPOINT=no-fetch`: every queue says it
//! is ready without fetching a tag, so START_DEV waits for fetches that
//! never come, as under a kernel that does not answer. The VM suite
//! `churn` checks with it that `add` then fails within START_DEV's
//! deadline ([`super::deadline::START`]), naming the step, and leaves no
//! device behind.

use std::sync::mpsc::Sender;
use std::time::Duration;

use crate::ublk::queue::{self, QueueEvent, QueueSetup, FAILPOINT_ENV};

/// Whether the environment asks for it.
pub(crate) fn asked() -> bool {
    std::env::var(FAILPOINT_ENV).as_deref() == Ok("no-fetch")
}

/// A queue thread that fetches nothing: ready at once, gone on shutdown.
pub(crate) fn run(setup: QueueSetup, events: &Sender<QueueEvent>) {
    tracing::warn!(
        "queue {}: {FAILPOINT_ENV}=no-fetch: not fetching any tag (a test)",
        setup.q
    );
    queue::ready(setup.q, events);
    while !setup.shutdown.requested() {
        std::thread::sleep(Duration::from_millis(20));
    }
    queue::exited(setup.q, Ok(()), events);
}
