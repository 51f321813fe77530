//! Losing the connection and getting it back: requests wait for the next
//! connection (failed once they wait longer than the reconnect timeout), and
//! a new connection is accepted only if the export still matches what the
//! device advertised.

use std::sync::{Arc, PoisonError};
use std::time::Instant;

use rustix::io::Errno;

use super::{errno_res, lock, Lent, Link, Shared, State, BACKOFF_FIRST, BACKOFF_MAX};
use crate::nbd::client::{self, ClientError, ExportInfo, Stream};
use crate::nbd::proto;

impl Shared {
    /// The connection is gone: everything unanswered waits for the next one.
    /// False on shutdown.
    pub(super) fn lose(&self, why: &ClientError) -> bool {
        let mut st = lock(&self.state);
        if st.shutdown {
            return false;
        }
        let now = Instant::now();
        for e in st.entries.values_mut() {
            e.sent_on = None;
            e.waiting_since = now;
        }
        st.queue.clear();
        st.link = Link::Down;
        if let Some(s) = st.sock.take() {
            // Stops the sender if it is in the middle of a write.
            s.shutdown();
        }
        let waiting = st.entries.len();
        drop(st);
        tracing::warn!(
            "nbd {}: connection lost: {why}; reconnecting ({waiting} requests waiting)",
            self.uri()
        );
        true
    }

    /// Connect again, with backoff, until it works (`None`: shutdown).
    /// Requests that wait too long are failed meanwhile.
    pub(super) fn reconnect(&self) -> Option<Stream> {
        let lost = Instant::now();
        let mut backoff = BACKOFF_FIRST;
        let mut next_try = lost;
        let mut attempts = 0u32;
        let mut last_error = String::new();
        loop {
            let expired = {
                let mut st = lock(&self.state);
                loop {
                    if st.shutdown {
                        return None;
                    }
                    let (expired, next_expiry) = self.expire(&mut st);
                    let now = Instant::now();
                    if !expired.is_empty() || now >= next_try {
                        break expired;
                    }
                    let mut wait = next_try - now;
                    if let Some(t) = next_expiry {
                        wait = wait.min(t.saturating_duration_since(now));
                    }
                    st = self
                        .link_cv
                        .wait_timeout(st, wait)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            };
            if !expired.is_empty() {
                tracing::warn!(
                    "nbd {}: failing {} requests with EIO: no connection for {:?}",
                    self.uri(),
                    expired.len(),
                    self.opts.reconnect_timeout
                );
                for lent in expired {
                    if let Some(d) = lock(&lent).take() {
                        d.complete(errno_res(Errno::IO));
                    }
                }
                continue;
            }
            attempts += 1;
            match self.try_connect() {
                Ok(s) => {
                    tracing::info!(
                        "nbd {}: reconnected after {:.1?} ({attempts} attempts)",
                        self.uri(),
                        lost.elapsed()
                    );
                    return Some(s);
                }
                Err(_) if lock(&self.state).shutdown => return None,
                Err(e) => {
                    let msg = e.to_string();
                    if msg != last_error {
                        tracing::warn!("nbd {}: reconnecting: {msg}; will keep trying", self.uri());
                        last_error = msg;
                    } else {
                        tracing::debug!("nbd {}: reconnect attempt {attempts}: {msg}", self.uri());
                    }
                }
            }
            next_try = Instant::now() + backoff;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Take out the requests that have waited past the reconnect timeout;
    /// also say when the next one will have.
    pub(super) fn expire(&self, st: &mut State) -> (Vec<Lent>, Option<Instant>) {
        let limit = self.opts.reconnect_timeout;
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut next = None::<Instant>;
        st.entries.retain(|_, e| {
            let deadline = e.waiting_since.checked_add(limit);
            match deadline {
                Some(d) if d > now => {
                    next = Some(next.map_or(d, |n| n.min(d)));
                    true
                }
                // Overflow: a timeout too long to ever expire.
                None => true,
                Some(_) => {
                    expired.push(Arc::clone(&e.deferred));
                    false
                }
            }
        });
        (expired, next)
    }

    /// One connection attempt, checked against the export first negotiated.
    pub(super) fn try_connect(&self) -> std::result::Result<Stream, ClientError> {
        let timeout = self.opts.connect_timeout;
        let mut s = client::connect_socket(&self.opts.uri.addr, timeout)?;
        {
            let mut st = lock(&self.state);
            if st.shutdown {
                return Err(ClientError::Closed {
                    during: "shutting down",
                });
            }
            st.sock = s.try_clone().ok();
        }
        let result = client::handshake(&mut s, &self.opts.uri.export, timeout)
            .and_then(|info| self.compatible(&info));
        if result.is_err() {
            lock(&self.state).sock = None;
        }
        result.map(|()| s)
    }

    /// Whether a new connection's export can stand in for the first one.
    pub(super) fn compatible(&self, now: &ExportInfo) -> std::result::Result<(), ClientError> {
        let was = &self.export;
        if now.size != was.size {
            return Err(ClientError::SizeChanged {
                was: was.size,
                now: now.size,
            });
        }
        let c = &self.caps;
        let lost = [
            (
                !c.read_only && now.has(proto::FLAG_READ_ONLY),
                "writes (it is read-only now)",
            ),
            (
                c.volatile_cache && !now.has(proto::FLAG_SEND_FLUSH),
                "flush",
            ),
            (c.fua && !now.has(proto::FLAG_SEND_FUA), "FUA"),
            (
                c.discard.is_some() && !now.has(proto::FLAG_SEND_TRIM),
                "trim",
            ),
            (
                c.write_zeroes.is_some() && !now.has(proto::FLAG_SEND_WRITE_ZEROES),
                "write-zeroes",
            ),
        ];
        if let Some((_, what)) = lost.iter().find(|(l, _)| *l) {
            return Err(ClientError::LostFeature(what));
        }
        if let Some(b) = now.block_sizes {
            if b.min > c.logical_block_size {
                return Err(ClientError::LostFeature("the device's block size"));
            }
            if c.max_request.is_some_and(|m| b.max < m) {
                return Err(ClientError::LostFeature(
                    "requests as large as the device's",
                ));
            }
        }
        Ok(())
    }
}
