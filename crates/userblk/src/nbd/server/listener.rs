//! Listening sockets: binding, accepting, the connection limit, and one
//! thread per accepted connection.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;

use super::connection::serve_connection;
use super::{Listen, Shared};
use crate::state::SocketId;
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

/// Bind `l`: the listener, the address (a TCP port 0 replaced by the real
/// one) and, for a Unix socket, the socket file's identity.
pub(super) fn bind(l: &Listen) -> Result<(Listener, Listen, Option<SocketId>)> {
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
            let id = SocketId::of(path).map_err(|e| Error::path(path, e))?;
            Ok((Listener::Unix(lst), l.clone(), Some(id)))
        }
        Listen::Tcp(addr) => {
            let lst = TcpListener::bind(addr.as_str())
                .map_err(|e| Error::io(format!("listening on tcp:{addr}"), e))?;
            let real = lst
                .local_addr()
                .map_or_else(|_| addr.clone(), |a| a.to_string());
            Ok((Listener::Tcp(lst), Listen::Tcp(real), None))
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
            let serving = shared.transmitting.load(Ordering::Relaxed);
            if serving >= shared.opts.max_connections {
                tracing::warn!(
                    "nbd: refusing a connection: {serving} served, at most {}",
                    shared.opts.max_connections
                );
                continue;
            }
            next_id += 1;
            admit_handshake(shared, next_id);
            if !spawn_connection(shared, next_id, sock) {
                leave_handshake(shared, next_id);
            }
        }
    }
}

/// Count connection `id` as in its handshake. When `max_handshakes` are
/// already, the oldest of them is hung up on: a flood of idle sockets then
/// costs each of them its place after `max_handshakes` newer connections,
/// while a real client, which finishes in a few round trips, gets through.
/// (Making new connections wait instead would let the flood hold every place
/// for the whole handshake timeout.)
fn admit_handshake(shared: &Shared, id: u64) {
    let mut pending = lock(&shared.pending);
    while pending.len() >= shared.opts.max_handshakes {
        let Some(oldest) = pending.pop_front() else {
            break;
        };
        // Under the lock, so that the connection cannot finish its
        // handshake between being chosen and being hung up on.
        if let Some((sock, _)) = lock(&shared.conns).get(&oldest) {
            let _ = rustix::net::shutdown(sock, rustix::net::Shutdown::Both);
        }
        tracing::info!("nbd: connection {oldest}: handshake pushed out by a newer connection");
    }
    pending.push_back(id);
}

/// Connection `id` finished its handshake (or failed it); false if it had
/// been pushed out already.
pub(super) fn leave_handshake(shared: &Shared, id: u64) -> bool {
    let mut pending = lock(&shared.pending);
    match pending.iter().position(|&p| p == id) {
        Some(i) => {
            pending.remove(i);
            true
        }
        None => false,
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Forget connections whose threads have ended.
fn reap_finished(shared: &Shared) {
    lock(&shared.conns).retain(|_, (_, t)| !t.is_finished());
}

/// Start connection `id`'s thread; false if it could not be started.
fn spawn_connection(shared: &Arc<Shared>, id: u64, sock: OwnedFd) -> bool {
    let dup = match rustix::io::fcntl_dupfd_cloexec(&sock, 0) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("nbd: connection {id}: {e}");
            return false;
        }
    };
    let counters = shared.counters.clone();
    counters.connections.fetch_add(1, Ordering::Relaxed);
    counters.open.fetch_add(1, Ordering::Relaxed);
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            match serve_connection(&s, id, &sock) {
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
            lock(&shared.conns).insert(id, (dup, t));
            true
        }
        Err(e) => {
            counters.open.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!("nbd: connection {id}: cannot start its thread: {e}");
            false
        }
    }
}
