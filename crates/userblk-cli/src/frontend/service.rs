//! A daemon's one service thread: it hands SIGTERM, SIGINT and SIGHUP to
//! the frontend's stopper (`lifecycle::Stop`) and answers the control socket (`userblk ctl`,
//! `resize`), waiting on both in one `poll`. One thread for both, where
//! there were two, keeps an idle device at its queues' threads and one
//! more; and it sleeps until something happens (no tick), so hundreds of
//! idle daemons cost no CPU.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use anyhow::Context;
use rustix::event::{poll, PollFd, PollFlags};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::SigId;
use userblk::control::Endpoint;

const SIGNALS: [i32; 3] = [SIGTERM, SIGINT, SIGHUP];

/// What the owner tells the thread (with a byte on the pipe to wake it).
enum Order {
    /// Answer this control socket from now on.
    Answer(Endpoint),
    /// End: the daemon is done.
    Close,
}

/// The running service thread; [`Service::close`] ends it.
pub struct Service {
    orders: mpsc::Sender<Order>,
    /// The pipe's write end: the signal handlers' and ours, to wake the thread.
    wake: UnixStream,
    ids: Vec<SigId>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Catch the signals (from now on, before anything exists, so none can kill
/// the daemon half way) and start the thread that hands them to `stop`.
pub fn start(stop: Box<dyn Fn(i32) + Send>) -> anyhow::Result<Service> {
    let (woken, wake) = UnixStream::pair().context("making the service thread's pipe")?;
    woken.set_nonblocking(true)?;
    wake.set_nonblocking(true)?;
    let flags: Vec<(i32, Arc<AtomicBool>)> = SIGNALS
        .iter()
        .map(|&s| (s, Arc::new(AtomicBool::new(false))))
        .collect();
    let mut ids = Vec::new();
    for (sig, flag) in &flags {
        // The flag says which signal came; the byte wakes the thread.
        ids.push(signal_hook::flag::register(*sig, Arc::clone(flag)).context("catching signals")?);
        // The registration owns its copy of the write end (closed when unregistered).
        let end = wake.try_clone().context("catching signals")?;
        ids.push(signal_hook::low_level::pipe::register(*sig, end).context("catching signals")?);
    }
    let (orders, inbox) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("service".into())
        // It waits and dispatches: little stack.
        .stack_size(512 << 10)
        .spawn(move || run(&woken, &inbox, &flags, &*stop))
        .context("starting the service thread")?;
    Ok(Service {
        orders,
        wake,
        ids,
        thread: Some(thread),
    })
}

impl Service {
    /// Answer the control socket from now on (none: nothing to answer).
    pub fn answer(&self, endpoint: Option<Endpoint>) {
        if let Some(e) = endpoint {
            self.order(Order::Answer(e));
        }
    }

    /// End the thread and close the control socket; signals are no longer handed on.
    pub fn close(mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
        self.order(Order::Close);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn order(&self, order: Order) {
        let _ = self.orders.send(order);
        // A full pipe is awake already.
        let _ = (&self.wake).write(&[1]);
    }
}

/// Wait for a signal, a control connection or an order, until told to close
/// (the control socket goes with the thread's endpoint).
fn run(
    woken: &UnixStream,
    inbox: &mpsc::Receiver<Order>,
    flags: &[(i32, Arc<AtomicBool>)],
    stop: &dyn Fn(i32),
) {
    let mut endpoint: Option<Endpoint> = None;
    loop {
        let control_ready = {
            let mut fds = vec![PollFd::new(woken, PollFlags::IN)];
            if let Some(e) = &endpoint {
                fds.push(PollFd::new(e, PollFlags::IN));
            }
            match poll(&mut fds, None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    tracing::error!("service thread: poll: {e}");
                    return;
                }
            }
            fds.get(1).is_some_and(|f| !f.revents().is_empty())
        };
        // Drain the wake-ups, then act on what they were for.
        let mut buf = [0u8; 64];
        while matches!((&*woken).read(&mut buf), Ok(n) if n > 0) {}
        for (sig, flag) in flags {
            if flag.swap(false, Ordering::SeqCst) {
                stop(*sig);
            }
        }
        while let Ok(order) = inbox.try_recv() {
            match order {
                Order::Answer(e) => endpoint = Some(e),
                Order::Close => return,
            }
        }
        if control_ready {
            if let Some(e) = &endpoint {
                e.answer_ready();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use userblk::control::{self, Registry, Request};

    use super::*;

    #[test]
    fn one_thread_hands_on_signals_and_answers_the_socket() {
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
        let reply = control::request(&path, &run, Duration::from_secs(5)).unwrap();
        assert_eq!(reply.output, ["test: pong"]);
        // SIGHUP: the test harness does not otherwise use it.
        signal_hook::low_level::raise(SIGHUP).unwrap();
        assert_eq!(signalled.recv_timeout(Duration::from_secs(5)), Ok(SIGHUP));
        // Still answering after a signal.
        let reply = control::request(&path, &run, Duration::from_secs(5)).unwrap();
        assert!(reply.ok);
        service.close();
        assert!(!path.exists(), "the socket outlived the service");
    }
}
