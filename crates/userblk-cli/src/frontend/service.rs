//! A daemon's service: SIGTERM, SIGINT and SIGHUP handed to the frontend's
//! stopper (`lifecycle::Stop`), and the control socket (`userblk ctl`,
//! `resize`) answered, both from inside the wait of the thread that waits
//! for the device to stop ([`Service::wait`], one `poll`). No thread of its
//! own: an idle device is its queues' threads and that one thread. It
//! sleeps until something happens (no tick), so hundreds of idle daemons
//! cost no CPU.
//!
//! The signals are caught from [`start`] on, before anything exists; one
//! that comes while the daemon is still setting up is handed on at its
//! first wait (each set-up step has a deadline of its own).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::SigId;
use userblk::control::Endpoint;
use userblk::waiter::{Waiter, Waker};

const SIGNALS: [i32; 3] = [SIGTERM, SIGINT, SIGHUP];

/// The signals caught, the control socket, and the pipe that wakes a wait.
pub struct Service {
    /// The pipe's read end, polled by [`Service::wait`].
    woken: UnixStream,
    /// Its write end: the signal handlers' and the wakers'.
    wake: Arc<UnixStream>,
    /// Which signal came.
    flags: Vec<(i32, Arc<AtomicBool>)>,
    ids: Mutex<Vec<SigId>>,
    stop: Mutex<Box<dyn Fn(i32) + Send>>,
    endpoint: Mutex<Option<Endpoint>>,
}

/// Catch the signals (from now on, before anything exists, so none can kill
/// the daemon half way); [`Service::wait`] hands them to `stop`.
pub fn start(stop: Box<dyn Fn(i32) + Send>) -> anyhow::Result<Service> {
    let (woken, wake) = UnixStream::pair().context("making the service's pipe")?;
    woken.set_nonblocking(true)?;
    wake.set_nonblocking(true)?;
    let flags: Vec<(i32, Arc<AtomicBool>)> = SIGNALS
        .iter()
        .map(|&s| (s, Arc::new(AtomicBool::new(false))))
        .collect();
    let mut ids = Vec::new();
    for (sig, flag) in &flags {
        // The flag says which signal came; the byte wakes the wait.
        ids.push(signal_hook::flag::register(*sig, Arc::clone(flag)).context("catching signals")?);
        // The registration owns its copy of the write end (closed when unregistered).
        let end = wake.try_clone().context("catching signals")?;
        ids.push(signal_hook::low_level::pipe::register(*sig, end).context("catching signals")?);
    }
    Ok(Service {
        woken,
        wake: Arc::new(wake),
        flags,
        ids: Mutex::new(ids),
        stop: Mutex::new(stop),
        endpoint: Mutex::new(None),
    })
}

impl Service {
    /// Answer the control socket from now on (none: nothing to answer).
    pub fn answer(&self, endpoint: Option<Endpoint>) {
        if let Some(e) = endpoint {
            *self.endpoint.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
        }
    }

    /// Stop handing signals on and close the control socket.
    pub fn close(&self) {
        for id in self
            .ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            signal_hook::low_level::unregister(id);
        }
        self.endpoint
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// One `poll` on the wake pipe and the control socket, up to `timeout`;
    /// then hand on the signals that came and answer a waiting connection
    /// (on a thread of its own, see `Endpoint::answer_ready`).
    fn wait_once(&self, timeout: Option<Duration>) {
        let endpoint = self.endpoint.lock().unwrap_or_else(PoisonError::into_inner);
        let control_ready = {
            let mut fds = vec![PollFd::new(&self.woken, PollFlags::IN)];
            if let Some(e) = endpoint.as_ref() {
                fds.push(PollFd::new(e, PollFlags::IN));
            }
            let ts = timeout.map(|t| {
                Timespec::try_from(t).unwrap_or(Timespec {
                    tv_sec: 3600,
                    tv_nsec: 0,
                })
            });
            match poll(&mut fds, ts.as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    // Not a busy loop: the caller waits again.
                    tracing::error!("service: poll: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            fds.get(1).is_some_and(|f| !f.revents().is_empty())
        };
        // Drain the wake-ups, then act on what they were for.
        let mut buf = [0u8; 64];
        while matches!((&self.woken).read(&mut buf), Ok(n) if n > 0) {}
        if control_ready {
            if let Some(e) = endpoint.as_ref() {
                e.answer_ready();
            }
        }
        drop(endpoint);
        for (sig, flag) in &self.flags {
            if flag.swap(false, Ordering::SeqCst) {
                (self.stop.lock().unwrap_or_else(PoisonError::into_inner))(*sig);
            }
        }
    }
}

impl Waiter for Service {
    /// Wait on the calling thread until a waker or a signal wakes it, a
    /// control connection comes (answered), or `timeout` passes.
    fn wait(&self, timeout: Option<Duration>) {
        self.wait_once(timeout);
    }

    fn waker(&self) -> Waker {
        let wake = Arc::clone(&self.wake);
        // A full pipe is awake already.
        Arc::new(move || {
            let _ = (&*wake).write(&[1]);
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::mpsc;
    use std::time::Instant;

    use userblk::control::{self, Registry, Request};

    use super::*;

    #[test]
    fn the_waiting_thread_hands_on_signals_and_answers_the_socket() {
        let (tx, signalled) = mpsc::channel();
        let service = start(Box::new(move |sig| {
            let _ = tx.send(sig);
        }))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let registry = Registry::new();
        let _ping = registry.register("ping", "test", "answer pong", |_| Ok("pong".into()));
        service.answer(Some(Endpoint::bind(registry, &path).unwrap()));
        let run = Request::Run {
            action: "ping".into(),
            args: Vec::new(),
        };
        // The client on a thread; this one waits, as a daemon's main thread does.
        let client = {
            let (path, run) = (path.clone(), run.clone());
            std::thread::spawn(move || control::request(&path, &run, Duration::from_secs(5)))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !client.is_finished() && Instant::now() < deadline {
            service.wait(Some(Duration::from_millis(100)));
        }
        let reply = client.join().unwrap().unwrap();
        assert_eq!(reply.output, ["test: pong"]);
        // SIGHUP: the test harness does not otherwise use it.
        signal_hook::low_level::raise(SIGHUP).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while signalled.try_recv().is_err() {
            assert!(Instant::now() < deadline, "the signal was not handed on");
            service.wait(Some(Duration::from_millis(100)));
        }
        // A waker from another thread ends a wait with no timeout.
        let wake = service.waker();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            wake();
        });
        let t0 = Instant::now();
        service.wait(Some(Duration::from_secs(30)));
        // Ended by the waker: not at once, not by the timeout.
        assert!(
            t0.elapsed() >= Duration::from_millis(30),
            "{:?}",
            t0.elapsed()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the waker did not end the wait"
        );
        waker.join().unwrap();
        service.close();
        assert!(!path.exists(), "the socket outlived the service");
    }
}
