//! Listening sockets: binding, accepting, the connection limit, and one
//! thread per accepted connection.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;

use super::connection::serve_connection;
use super::{Listen, Shared};
use crate::{Error, Result};

pub(super) enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Unix(l) => l.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        }
    }
}

impl Listener {
    fn accept(&self) -> io::Result<OwnedFd> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| s.into()),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                // Replies are sent whole; do not let Nagle hold the last one back.
                let _ = s.set_nodelay(true);
                Ok(s.into())
            }
        }
    }
}

pub(super) fn bind(l: &Listen) -> Result<(Listener, Listen)> {
    match l {
        Listen::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if !meta.file_type().is_socket() {
                    return Err(Error::invalid(format!(
                        "{}: exists and is not a socket",
                        path.display()
                    )));
                }
                // A socket nobody answers on is left over from a dead server.
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(Error::invalid(format!(
                        "{}: another server is listening there",
                        path.display()
                    )));
                }
                let _ = std::fs::remove_file(path);
            }
            let lst = UnixListener::bind(path).map_err(|e| Error::path(path, e))?;
            Ok((Listener::Unix(lst), l.clone()))
        }
        Listen::Tcp(addr) => {
            let lst = TcpListener::bind(addr.as_str())
                .map_err(|e| Error::io(format!("listening on tcp:{addr}"), e))?;
            let real = lst
                .local_addr()
                .map_or_else(|_| addr.clone(), |a| a.to_string());
            Ok((Listener::Tcp(lst), Listen::Tcp(real)))
        }
    }
}

pub(super) fn accept_loop(shared: &Arc<Shared>, listeners: &[Listener], wake: &OwnedFd) {
    let mut next_id = 0u64;
    loop {
        let mut fds: Vec<PollFd<'_>> = listeners
            .iter()
            .map(|l| PollFd::new(l, PollFlags::IN))
            .collect();
        fds.push(PollFd::new(wake, PollFlags::IN));
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => {
                tracing::error!("nbd: poll on listening sockets: {e}");
                return;
            }
        }
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        for (l, _) in listeners.iter().zip(ready).filter(|(_, r)| *r) {
            let sock = match l.accept() {
                Ok(s) => s,
                Err(e) => {
                    // ECONNABORTED, EMFILE...: keep serving the others.
                    tracing::warn!("nbd: accept: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            reap_finished(shared);
            let open = shared.counters.open.load(Ordering::Relaxed);
            if open >= shared.opts.max_connections as u64 {
                tracing::warn!(
                    "nbd: refusing a connection: {open} open, at most {}",
                    shared.opts.max_connections
                );
                continue;
            }
            next_id += 1;
            spawn_connection(shared, next_id, sock);
        }
    }
}

/// Forget connections whose threads have ended.
fn reap_finished(shared: &Shared) {
    let mut conns = match shared.conns.lock() {
        Ok(c) => c,
        Err(p) => p.into_inner(),
    };
    conns.retain(|_, (_, t)| !t.is_finished());
}

fn spawn_connection(shared: &Arc<Shared>, id: u64, sock: OwnedFd) {
    let dup = match rustix::io::fcntl_dupfd_cloexec(&sock, 0) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("nbd: connection {id}: {e}");
            return;
        }
    };
    let counters = shared.counters.clone();
    counters.connections.fetch_add(1, Ordering::Relaxed);
    counters.open.fetch_add(1, Ordering::Relaxed);
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            match serve_connection(&s, &sock) {
                Ok(()) => tracing::debug!("nbd: connection {id} closed"),
                Err(e) => tracing::info!("nbd: connection {id}: {e}"),
            }
            // Count the connection closed before the client can see it
            // closed, so it may connect again at once under max_connections.
            s.counters.open.fetch_sub(1, Ordering::Relaxed);
            // The stop list holds a duplicate: hang up for both.
            let _ = rustix::net::shutdown(&sock, rustix::net::Shutdown::Both);
        });
    match spawned {
        Ok(t) => {
            let mut conns = match shared.conns.lock() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            conns.insert(id, (dup, t));
        }
        Err(e) => {
            counters.open.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!("nbd: connection {id}: cannot start its thread: {e}");
        }
    }
}
