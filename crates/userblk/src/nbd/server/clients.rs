//! Who is connected to an NBD server: for `del`, which refuses to stop a
//! device that clients are using (as it refuses a mounted ublk device),
//! naming them.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use super::Shared;

/// The clients of a running [`super::Server`], readable from another
/// thread (a control action) while the server runs.
#[derive(Clone)]
pub struct Clients(pub(super) Arc<Shared>);

impl Clients {
    /// One line per connection past its handshake (a client that is using
    /// the export): `tcp 192.0.2.1:51234`, or for a Unix socket the peer's
    /// process, `pid 4242 (nbd-client)`. Connections still in their
    /// handshake or already closing are not counted.
    pub fn describe(&self) -> Vec<String> {
        let pending = super::listener::lock(&self.0.pending).clone();
        let conns = super::listener::lock(&self.0.conns);
        let mut ids: Vec<u64> = conns
            .iter()
            .filter(|(id, (_, t))| !t.is_finished() && !pending.contains(id))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids.iter()
            .filter_map(|id| conns.get(id))
            .map(|(sock, _)| peer(sock.as_fd()))
            .collect()
    }
}

/// A connection's peer, as a person would name it.
fn peer(sock: BorrowedFd<'_>) -> String {
    match rustix::net::getpeername(sock) {
        // An unnamed peer (`None`) is a Unix-socket client's usual case.
        Ok(addr) => match addr.map(std::net::SocketAddr::try_from) {
            Some(Ok(ip)) => format!("tcp {ip}"),
            _ => unix_peer(sock),
        },
        Err(e) => format!("a client whose address is unknown ({e})"),
    }
}

/// A Unix-socket peer: its process, which the kernel recorded at connect.
fn unix_peer(sock: BorrowedFd<'_>) -> String {
    match rustix::net::sockopt::socket_peercred(sock) {
        Ok(cred) => {
            let pid = cred.pid.as_raw_nonzero().get();
            match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
                Ok(comm) => format!("pid {pid} ({})", comm.trim()),
                Err(_) => format!("pid {pid}"),
            }
        }
        Err(_) => "a client on the Unix socket".into(),
    }
}
