//! How the thread that serves a device waits for it to stop when that
//! thread has other work too. A daemon has one thread besides its queues':
//! it hands signals on, answers the control socket and waits for the
//! device's end, all in one wait. The frontend wakes it with a [`Waker`]
//! (after sending what happened on a channel the thread then reads),
//! instead of the thread blocking on that channel alone.

use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Ends a [`Waiter::wait`], from any thread.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// What a serving thread waits with.
pub trait Waiter {
    /// Block until woken through a [`Waiter::waker`] or until `timeout`
    /// (none: no limit). It may return early; callers look again at what
    /// they wait for.
    fn wait(&self, timeout: Option<Duration>);

    /// A handle that ends the wait.
    fn waker(&self) -> Waker;
}

/// A [`Waiter`] that only waits: for a caller with nothing else to do.
#[derive(Debug, Default, Clone)]
pub struct Park {
    woken: Arc<(Mutex<bool>, Condvar)>,
}

impl Waiter for Park {
    fn wait(&self, timeout: Option<Duration>) {
        let (flag, cv) = &*self.woken;
        let mut woken = flag.lock().unwrap_or_else(PoisonError::into_inner);
        if !*woken {
            woken = match timeout {
                Some(t) => {
                    cv.wait_timeout(woken, t)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => cv.wait(woken).unwrap_or_else(PoisonError::into_inner),
            };
        }
        *woken = false;
    }

    fn waker(&self) -> Waker {
        let woken = Arc::clone(&self.woken);
        Arc::new(move || {
            let (flag, cv) = &*woken;
            *flag.lock().unwrap_or_else(PoisonError::into_inner) = true;
            cv.notify_all();
        })
    }
}

/// `rx.recv()`, waiting with `waiter` between looks: for a channel whose
/// senders wake the waiter after sending.
pub fn recv<T>(rx: &mpsc::Receiver<T>, waiter: &dyn Waiter) -> Result<T, mpsc::RecvError> {
    loop {
        match rx.try_recv() {
            Ok(v) => return Ok(v),
            Err(mpsc::TryRecvError::Disconnected) => return Err(mpsc::RecvError),
            Err(mpsc::TryRecvError::Empty) => waiter.wait(None),
        }
    }
}

/// `rx.recv_timeout(timeout)`, waiting with `waiter` as [`recv`] does.
pub fn recv_timeout<T>(
    rx: &mpsc::Receiver<T>,
    waiter: &dyn Waiter,
    timeout: Duration,
) -> Result<T, mpsc::RecvTimeoutError> {
    let deadline = Instant::now() + timeout;
    loop {
        match rx.try_recv() {
            Ok(v) => return Ok(v),
            Err(mpsc::TryRecvError::Disconnected) => {
                return Err(mpsc::RecvTimeoutError::Disconnected)
            }
            Err(mpsc::TryRecvError::Empty) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(mpsc::RecvTimeoutError::Timeout);
                }
                waiter.wait(Some(left));
            }
        }
    }
}

/// Calls its waker when dropped: a thread that holds one wakes its waiter
/// as it ends, also when it panics.
pub struct WakeOnDrop(pub Waker);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        (self.0)();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_wake_before_the_wait_is_not_lost_and_a_timeout_ends_it() {
        let park = Park::default();
        (park.waker())();
        let t0 = Instant::now();
        park.wait(None);
        assert!(t0.elapsed() < Duration::from_secs(5));
        // The wake was used up: this one times out.
        let t0 = Instant::now();
        park.wait(Some(Duration::from_millis(50)));
        assert!(t0.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn a_thread_that_ends_wakes_the_waiter_even_on_a_panic() {
        let park = Park::default();
        let wake = park.waker();
        let t = std::thread::spawn(move || {
            let _w = WakeOnDrop(wake);
            panic!("a queue thread dies");
        });
        let t0 = Instant::now();
        park.wait(Some(Duration::from_secs(30)));
        assert!(t0.elapsed() < Duration::from_secs(20), "not woken");
        assert!(t.join().is_err());
    }

    #[test]
    fn a_channel_read_between_waits_sees_what_a_woken_sender_sent() {
        let park = Park::default();
        let (tx, rx) = mpsc::channel();
        let wake = park.waker();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(7).unwrap();
            wake();
        });
        assert_eq!(recv(&rx, &park), Ok(7));
        sender.join().unwrap();
        // Every sender gone: the channel says so instead of waiting.
        assert_eq!(recv(&rx, &park), Err(mpsc::RecvError));
        let (tx, rx) = mpsc::channel::<u8>();
        let t0 = Instant::now();
        assert_eq!(
            recv_timeout(&rx, &park, Duration::from_millis(50)),
            Err(mpsc::RecvTimeoutError::Timeout)
        );
        assert!(t0.elapsed() >= Duration::from_millis(50));
        drop(tx);
    }
}
