//! A log filter for one harmless error of the FUSE library.
//!
//! The kernel sends FUSE_INTERRUPT when a process waiting on a request
//! gets a signal (bash's SIGCHLD, dd's SIGUSR1). `fuser` answers every
//! interrupt with ENOSYS, but our threads each read their own `/dev/fuse`
//! clone: the interrupt is usually read by a thread whose clone does not
//! hold the interrupted request, or after that request was answered, and
//! the kernel refuses the answer with ENOENT, which `fuser` logs as
//! `ERROR Failed to send FUSE reply: No such file or directory`. A reply
//! after an unmount aborted the connection fails the same way. Either way
//! the kernel no longer waits for that reply and the request it belongs to
//! was answered (or given up) normally, so it is not an error of ours.
//! Other errors from sending replies still show.

use tracing::field::{Field, Visit};
use tracing::{Event, Metadata};
use tracing_subscriber::layer::{Context, Filter};

/// Drops `fuser`'s "Failed to send FUSE reply" for ENOENT, unless `keep`
/// (-v), where it is shown as it comes.
pub struct StaleReplies {
    pub keep: bool,
}

impl<S> Filter<S> for StaleReplies {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        if self.keep || *event.metadata().level() != tracing::Level::ERROR {
            return true;
        }
        let mut seen = Seen::default();
        event.record(&mut seen);
        !(seen.from_fuser && is_stale_reply(&seen.message))
    }
}

/// Whether a message is `fuser`'s failed reply for ENOENT (os error 2).
fn is_stale_reply(message: &str) -> bool {
    message.starts_with("Failed to send FUSE reply:") && message.ends_with("(os error 2)")
}

/// The fields of an event that matter here. `fuser` logs through the `log`
/// crate, whose records arrive with their target in `log.target`.
#[derive(Default)]
struct Seen {
    message: String,
    from_fuser: bool,
}

impl Visit for Seen {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "log.target" {
            self.from_fuser = value.starts_with("fuser");
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_enoent_is_stale() {
        assert!(is_stale_reply(
            "Failed to send FUSE reply: No such file or directory (os error 2)"
        ));
        assert!(!is_stale_reply(
            "Failed to send FUSE reply: Invalid argument (os error 22)"
        ));
        assert!(!is_stale_reply(
            "Failed to send FUSE reply: ... (os error 20)"
        ));
        assert!(!is_stale_reply("something else (os error 2)"));
    }
}
