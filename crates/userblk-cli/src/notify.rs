//! Telling a service manager how the daemon is doing, over systemd's
//! notification protocol (sd_notify(3)): one datagram of `KEY=VALUE` lines
//! sent to the Unix socket `$NOTIFY_SOCKET` names, a path or, when it
//! starts with `@`, an abstract name. Without `$NOTIFY_SOCKET` (not run by
//! a `Type=notify` unit) every call here does nothing.
//!
//! What the daemon says: `READY=1` with a `STATUS=` line once its device
//! is live (and `MAINPID=` when `add` spawned it, so that the unit follows
//! the daemon rather than the `add` that exits), `STATUS=` while it
//! recovers a device, `STOPPING=1` when a signal stops it. Nothing here
//! may take a device down: a failed send is a warning.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The variable naming the service manager's socket.
pub const SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// Send `state` (newline-separated `KEY=VALUE` lines) to `socket`: a path,
/// or an abstract name after `@`. `Ok(false)` when there is no socket.
pub fn send_to(socket: Option<&OsStr>, state: &str) -> io::Result<bool> {
    let Some(socket) = socket.filter(|s| !s.is_empty()) else {
        return Ok(false);
    };
    let bytes = socket.as_bytes();
    let addr = match bytes.split_first() {
        Some((b'@', name)) => SocketAddr::from_abstract_name(name)?,
        Some((b'/', _)) => SocketAddr::from_pathname(socket)?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{SOCKET_ENV}={}: neither a path nor an abstract name (@NAME)",
                    socket.to_string_lossy()
                ),
            ))
        }
    };
    let sock = UnixDatagram::unbound()?;
    let mut msg = state.to_owned();
    if !msg.ends_with('\n') {
        msg.push('\n');
    }
    sock.send_to_addr(msg.as_bytes(), &addr)?;
    Ok(true)
}

/// Send `state` to `$NOTIFY_SOCKET`, if set; a failure is logged, never fatal.
pub fn send(state: &str) {
    let socket = std::env::var_os(SOCKET_ENV);
    if let Err(e) = send_to(socket.as_deref(), state) {
        let first = state.lines().next().unwrap_or_default();
        tracing::warn!("telling the service manager {first}: {e}");
    }
}

/// The device is live: `READY=1` and `status`, with `MAINPID=` this
/// process when it is not the one the service manager started (`main_pid`).
pub fn ready(status: &str, main_pid: bool) {
    let mut msg = format!("READY=1\nSTATUS={}", one_line(status));
    if main_pid {
        msg += &format!("\nMAINPID={}", rustix::process::getpid().as_raw_nonzero());
    }
    send(&msg);
}

/// What the daemon is doing now (`STATUS=`), shown by `systemctl status`.
pub fn status(text: &str) {
    send(&format!("STATUS={}", one_line(text)));
}

/// The daemon is taking its device down.
pub fn stopping() {
    send("STOPPING=1\nSTATUS=stopping");
}

/// The service's main process is now `pid` (`upgrade` hands it over).
pub fn main_pid(pid: i32) {
    send(&format!("MAINPID={pid}"));
}

/// A value must not break the message into more lines.
fn one_line(text: &str) -> String {
    text.replace('\n', " ")
}

/// `serving PATH: TYPE SIZE`, from a target's description (`describe()`).
#[allow(clippy::cast_precision_loss)] // a size shown to one decimal
pub fn serving(path: &str, target: &serde_json::Value) -> String {
    let kind = target["type"].as_str();
    let size = target["size"].as_u64();
    match (kind, size) {
        (Some(k), Some(s)) => format!("serving {path}: {k} {}", crate::copy::human(s as f64)),
        (Some(k), None) => format!("serving {path}: {k}"),
        _ => format!("serving {path}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn path_socket_gets_one_datagram_ending_in_a_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        assert!(send_to(Some(path.as_os_str()), "READY=1\nSTATUS=up").unwrap());
        assert_eq!(recv(&sock), "READY=1\nSTATUS=up\n");
    }

    #[test]
    fn abstract_socket_is_named_after_the_at() {
        let name = format!("userblk-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        let env = format!("@{name}");
        assert!(send_to(Some(OsStr::new(&env)), "STOPPING=1\n").unwrap());
        assert_eq!(recv(&sock), "STOPPING=1\n");
    }

    #[test]
    fn no_socket_is_a_no_op_and_a_bad_one_an_error() {
        assert!(!send_to(None, "READY=1").unwrap());
        assert!(!send_to(Some(OsStr::new("")), "READY=1").unwrap());
        let e = send_to(Some(OsStr::new("relative/path")), "READY=1").unwrap_err();
        assert!(e.to_string().contains("NOTIFY_SOCKET=relative/path"), "{e}");
        // A socket nobody listens on: the error, for `send` to log.
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        assert!(send_to(Some(gone.as_os_str()), "READY=1").is_err());
    }

    #[test]
    fn status_is_one_line_naming_the_target() {
        let t = serde_json::json!({"type": "mem", "size": 16u64 << 20});
        assert_eq!(serving("/dev/loop3", &t), "serving /dev/loop3: mem 16 MiB");
        assert_eq!(
            serving("/dev/ublkb0", &serde_json::Value::Null),
            "serving /dev/ublkb0"
        );
        assert_eq!(one_line("a\nb"), "a b");
    }
}
