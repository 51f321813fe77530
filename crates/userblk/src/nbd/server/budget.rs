//! One memory budget for request payloads, shared by every connection of a
//! server: a request whose data does not fit its slot's own buffer must get
//! its bytes here before the buffer is allocated, so clients that send large
//! write headers and then stall cannot make the server allocate without bound.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Bytes handed out and bytes left, with waiters for bytes to come back.
#[derive(Debug)]
pub(super) struct Budget {
    /// Bytes left, and whether the server is stopping (waiters give up).
    left: Mutex<(usize, bool)>,
    returned: Condvar,
    total: usize,
    /// Bytes handed out now (also in the server's counters).
    taken: AtomicU64,
    /// The most ever handed out at once.
    peak: AtomicU64,
}

impl Budget {
    pub(super) fn new(total: usize) -> Self {
        Budget {
            left: Mutex::new((total, false)),
            returned: Condvar::new(),
            total,
            taken: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (usize, bool)> {
        self.left.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Take `n` bytes if they are there now.
    pub(super) fn try_take(&self, n: usize) -> bool {
        let mut left = self.lock();
        self.take_locked(&mut left.0, n)
    }

    /// Take `n` bytes, waiting for them until `deadline`; false if they did
    /// not come back in time (or `n` is more than the whole budget).
    pub(super) fn take_until(&self, n: usize, deadline: Instant) -> bool {
        if n > self.total {
            return false;
        }
        let mut left = self.lock();
        loop {
            if self.take_locked(&mut left.0, n) {
                return true;
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            if wait.is_zero() || left.1 {
                return false;
            }
            left = match self.returned.wait_timeout(left, wait) {
                Ok((l, _)) => l,
                Err(p) => p.into_inner().0,
            };
        }
    }

    fn take_locked(&self, left: &mut usize, n: usize) -> bool {
        if *left < n {
            return false;
        }
        *left -= n;
        let now = (self.total - *left) as u64;
        self.taken.store(now, Ordering::Relaxed);
        self.peak.fetch_max(now, Ordering::Relaxed);
        true
    }

    /// Give back `n` bytes taken before.
    pub(super) fn give(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut left = self.lock();
        left.0 = (left.0 + n).min(self.total);
        self.taken
            .store((self.total - left.0) as u64, Ordering::Relaxed);
        drop(left);
        self.returned.notify_all();
    }

    /// The server is stopping: every waiter gives up now, and later ones at once.
    pub(super) fn close(&self) {
        self.lock().1 = true;
        self.returned.notify_all();
    }

    /// Bytes handed out now.
    pub(super) fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// The most bytes ever handed out at once.
    pub(super) fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn takes_what_is_left_and_waits_for_returns() {
        let b = Arc::new(Budget::new(100));
        assert!(b.try_take(60));
        assert!(!b.try_take(50));
        assert!(!b.take_until(101, Instant::now() + Duration::from_secs(5)));
        let t = Instant::now();
        assert!(!b.take_until(50, Instant::now() + Duration::from_millis(50)));
        assert!(t.elapsed() >= Duration::from_millis(50));
        let giver = {
            let b = b.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                b.give(60);
            })
        };
        assert!(b.take_until(50, Instant::now() + Duration::from_secs(10)));
        giver.join().unwrap();
        assert_eq!(b.taken(), 50);
        assert_eq!(b.peak(), 60);
        // Closing wakes a waiter at once.
        let closer = {
            let b = b.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                b.close();
            })
        };
        let t = Instant::now();
        assert!(!b.take_until(60, Instant::now() + Duration::from_secs(10)));
        assert!(t.elapsed() < Duration::from_secs(5));
        closer.join().unwrap();
    }
}
