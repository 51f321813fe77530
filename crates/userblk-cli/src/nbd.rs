//! The NBD frontend in the CLI: serve a target as an NBD export until
//! stopped, and clean up such a device for `del`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context};
use userblk::nbd::server::{Listen, Server, ServerOptions};
use userblk::state::{DeviceState, NbdState};

use crate::add::saved_args;
use crate::cli::AddArgs;

/// Slot buffers start at least this large, so 1 MiB requests need no regrowth.
const MIN_BUF_BYTES: u32 = 1 << 20;

/// The URI a client uses for `l` and `export` (names and paths
/// percent-encoded, as the NBD URI specification requires).
pub fn uri(l: &Listen, export: &str) -> String {
    let name = percent_encode(export.as_bytes(), false);
    match l {
        Listen::Unix(p) => {
            use std::os::unix::ffi::OsStrExt;
            let sock = percent_encode(p.as_os_str().as_bytes(), true);
            format!("nbd+unix:///{name}?socket={sock}")
        }
        Listen::Tcp(a) => format!("nbd://{a}/{name}"),
    }
}

/// Percent-encode all but unreserved characters (and `/` if `keep_slash`).
fn percent_encode(b: &[u8], keep_slash: bool) -> String {
    let mut s = String::with_capacity(b.len());
    for &c in b {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) || (keep_slash && c == b'/') {
            s.push(char::from(c));
        } else {
            s.push_str(&format!("%{c:02X}"));
        }
    }
    s
}

/// Serve `args.target` over NBD until a signal.
pub fn serve(args: AddArgs, daemon: bool) -> anyhow::Result<()> {
    let listen = args
        .dev
        .listen
        .iter()
        .map(|l| l.parse::<Listen>())
        .collect::<Result<Vec<_>, _>>()?;
    let opened = crate::targets::open(&args.target, &args.filters(), false, None)?;
    let target = opened.target;
    let caps = target.caps();
    caps.check().context("target")?;

    let kernel_ids = userblk::ublk::ctrl::device_ids();
    let mut st = DeviceState::claim(args.dev.id, &kernel_ids, "nbd", |_| false)?;
    let id = st.id;
    let guard = RemoveState(id);

    let (tx, events) = std::sync::mpsc::channel();
    let handle = crate::daemon::watch_signals(tx, |sig| sig)?;

    let mut opts = ServerOptions::new(listen);
    opts.export_name = args.dev.export_name.clone();
    opts.description = format!("userblk device {id}");
    opts.depth = args.dev.depth;
    opts.buf_bytes = args.dev.io_buf_size.max(MIN_BUF_BYTES) as usize;
    opts.max_connections = args.dev.max_connections as usize;
    let server = Server::start(target.clone(), opts.clone()).context("starting the NBD server")?;

    let uris: Vec<String> = server
        .addresses()
        .iter()
        .map(|l| uri(l, &opts.export_name))
        .collect();
    st.block_device = uris.first().cloned().unwrap_or_default();
    st.target = target.describe();
    st.args = saved_args();
    st.log = daemon.then(|| userblk::state::state_dir().join(format!("{id}.log")));
    let limits = userblk::nbd::transmission::Limits::new(caps);
    st.nbd = Some(NbdState {
        listen: server.addresses().iter().map(ToString::to_string).collect(),
        uris,
        export_name: opts.export_name.clone(),
        size: caps.size,
        block_size: caps.logical_block_size,
        depth: opts.depth,
        max_payload: limits.max_payload,
        sockets: server.unix_sockets().to_vec(),
    });
    st.save()?;
    crate::daemon::announce(&st, daemon);
    tracing::info!("device {id} serving NBD at {}", st.block_device);

    if let Ok(sig) = events.recv() {
        tracing::info!("signal {sig}: stopping");
    }
    handle.close();
    let counters = server.counters();
    server.stop();
    let n = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
    tracing::info!(
        "served {} connections: {} reads, {} writes, {} flushes, {} trims/zeroings, {} errors",
        n(&counters.connections),
        n(&counters.reads),
        n(&counters.writes),
        n(&counters.flushes),
        n(&counters.zeroes),
        n(&counters.errors)
    );
    drop(guard);
    Ok(())
}

/// Removes the saved state on every way out of `serve`.
struct RemoveState(u32);

impl Drop for RemoveState {
    fn drop(&mut self) {
        DeviceState::remove(self.0);
    }
}

/// `del` of an NBD device: stop its daemon, or clean up after a dead one.
pub fn delete(st: &DeviceState, timeout: Duration) -> anyhow::Result<()> {
    let id = st.id;
    let Some(nbd) = &st.nbd else {
        bail!("device {id}: saved state has no NBD details");
    };
    if st.daemon_alive() {
        crate::daemon::stop(st, timeout)?;
    } else {
        // A dead daemon's Unix sockets are left behind; one that another
        // server has replaced since is that server's now.
        for s in &nbd.sockets {
            s.remove_if_ours();
        }
    }
    DeviceState::remove(id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_percent_encoded() {
        let u = Listen::Unix("/tmp/a b.sock".into());
        assert_eq!(
            uri(&u, "my disk?x=1"),
            "nbd+unix:///my%20disk%3Fx%3D1?socket=/tmp/a%20b.sock"
        );
        assert_eq!(uri(&u, ""), "nbd+unix:///?socket=/tmp/a%20b.sock");
        let t = Listen::Tcp("127.0.0.1:10809".into());
        assert_eq!(uri(&t, "disk"), "nbd://127.0.0.1:10809/disk");
    }
}
