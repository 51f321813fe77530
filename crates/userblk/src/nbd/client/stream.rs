//! The socket to a server, TCP or Unix.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::{SocketAddr as UnixAddr, UnixStream};
use std::time::Duration;

use super::{Addr, ClientError, UnixPath};

/// A connected socket, TCP or Unix.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain.
    Unix(UnixStream),
}

impl Stream {
    /// A second handle on the same socket (for a reader and a writer thread).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Shut both directions down: blocked reads and writes on every handle return.
    pub fn shutdown(&self) {
        // Fails only on a socket that is already disconnected.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Read and write timeouts (`None`: block forever).
    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Open a socket to `addr`, giving up after `timeout` (TCP; a Unix
/// connect does not wait).
pub fn connect_socket(addr: &Addr, timeout: Duration) -> std::result::Result<Stream, ClientError> {
    match addr {
        Addr::Unix(UnixPath::File(p)) => UnixStream::connect(p)
            .map(Stream::Unix)
            .map_err(ClientError::Connect),
        Addr::Unix(UnixPath::Abstract(name)) => {
            use std::os::linux::net::SocketAddrExt;
            let a = UnixAddr::from_abstract_name(name).map_err(ClientError::Connect)?;
            UnixStream::connect_addr(&a)
                .map(Stream::Unix)
                .map_err(ClientError::Connect)
        }
        Addr::Tcp { host, port } => {
            let addrs = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(ClientError::Connect)?;
            let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
            for a in addrs {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        // Small requests go out at once; replies are matched by cookie anyway.
                        let _ = s.set_nodelay(true);
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(ClientError::Connect(last))
        }
    }
}
