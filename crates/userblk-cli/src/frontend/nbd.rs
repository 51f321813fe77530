//! The NBD frontend in the CLI: serve a target as an NBD export until
//! stopped, and clean up such a device for `del`.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};
use userblk::nbd::server::{Listen, Server, ServerOptions};
use userblk::state::{DeviceState, NbdState};

use super::lifecycle::{self, Frontend, Host, Stop};
use crate::cli::DevArgs;
use crate::targets::Opened;

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

/// An NBD export being served.
pub struct Nbd {
    dev: DevArgs,
    /// The addresses, Unix socket paths made absolute (the daemon leaves for `/`).
    listen: Vec<Listen>,
    tx: mpsc::Sender<i32>,
    signals: mpsc::Receiver<i32>,
    /// The claimed id's state; its file goes when this does.
    claimed: Option<(DeviceState, RemoveState)>,
}

impl Nbd {
    /// Check the addresses `dev` asks to listen on.
    pub fn new(dev: &DevArgs) -> anyhow::Result<Self> {
        let listen = dev
            .listen
            .iter()
            .map(|l| match l.parse::<Listen>()? {
                Listen::Unix(p) => Ok(Listen::Unix(std::path::absolute(&p).unwrap_or(p))),
                tcp => Ok(tcp),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (tx, signals) = mpsc::channel();
        Ok(Nbd {
            dev: dev.clone(),
            listen,
            tx,
            signals,
            claimed: None,
        })
    }
}

impl Frontend for Nbd {
    /// Its clients are elsewhere, and its buffers grow with every
    /// connection: locking them all could take the host's memory.
    fn serves_this_kernel(&self) -> bool {
        false
    }

    fn stopper(&self) -> Stop {
        lifecycle::send_to(&self.tx, |sig| sig)
    }

    fn claim(&mut self) -> anyhow::Result<()> {
        let st = lifecycle::claim_id(self.dev.id, "nbd", |_| false)?;
        let guard = RemoveState(st.id);
        self.claimed = Some((st, guard));
        Ok(())
    }

    fn serve(&mut self, opened: Opened, host: &Host) -> anyhow::Result<()> {
        let (mut st, _guard) = self.claimed.take().context("no device id claimed")?;
        st.name = host.name();
        let target = opened.target;
        let caps = target.caps();
        let id = st.id;
        let _metrics = userblk::state::count_requests(id, false);
        let mut opts = ServerOptions::new(self.listen.clone());
        opts.export_name = self.dev.export_name.clone();
        opts.description = format!("userblk device {id}");
        opts.depth = self.dev.depth;
        opts.buf_bytes = self.dev.io_buf_size.max(MIN_BUF_BYTES) as usize;
        opts.max_connections = self.dev.max_connections as usize;
        let server =
            Server::start(target.clone(), opts.clone()).context("starting the NBD server")?;
        let clients = server.clients();
        let _clients = opened.registry.register(
            CLIENTS_ACTION,
            "nbd",
            "the clients connected to the export",
            move |_| Ok(clients_line(&clients.describe())),
        );
        let _resize = opened.registry.on_resize(super::resize::refuse(format!(
            "device {id} is served over NBD, which cannot resize it: NBD has no way to tell a connected client of a new size (delete the device, resize its image, add it again)"
        )));

        let uris: Vec<String> = server
            .addresses()
            .iter()
            .map(|l| uri(l, &opts.export_name))
            .collect();
        st.block_device = uris.first().cloned().unwrap_or_default();
        st.target = target.describe();
        st.args = host.args();
        st.log = host.log(id);
        let limits = userblk::nbd::server::transmission::Limits::new(caps);
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
        host.announce(
            id,
            &st.block_device,
            &crate::list::Entry::Saved(Box::new(st.clone())).text(),
        );
        tracing::info!("device {id} serving NBD at {}", st.block_device);

        // Signals come through `host`'s wait, which also answers `ctl`.
        if let Ok(sig) = userblk::waiter::recv(&self.signals, host) {
            tracing::info!("signal {sig}: stopping");
        }
        crate::notify::stopping();
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
        Ok(())
    }
}

/// Removes the saved state on every way out of `serve`.
struct RemoveState(u32);

impl Drop for RemoveState {
    fn drop(&mut self) {
        DeviceState::remove(self.0);
    }
}

/// The control action that names an NBD device's clients (for `del`).
const CLIENTS_ACTION: &str = "clients";
/// How long `del` asks a daemon for its clients before going on without.
const CLIENTS_TIMEOUT: Duration = Duration::from_secs(10);

/// The `clients` action's answer: `N connected[: who, who]`.
fn clients_line(who: &[String]) -> String {
    if who.is_empty() {
        "0 connected".into()
    } else {
        format!("{} connected: {}", who.len(), who.join(", "))
    }
}

/// Who is connected to the NBD device of `st`, as its daemon says
/// (`clients_line` without the count), or `None` when it cannot say (an
/// older daemon, or one that does not answer: `del` then stops it as it
/// always did).
fn connected(st: &DeviceState) -> Option<String> {
    use userblk::control::{request, Request};
    let req = Request::Run {
        action: CLIENTS_ACTION.into(),
        args: Vec::new(),
    };
    let reply = request(&crate::ctl::socket_path(st.pid), &req, CLIENTS_TIMEOUT).ok()?;
    let line = reply.output.first()?.strip_prefix("nbd: ")?;
    let (count, rest) = line.split_once(" connected")?;
    match count.parse::<usize>().ok()? {
        0 => Some(String::new()),
        _ => Some(rest.trim_start_matches(": ").to_string()),
    }
}

/// How long `del` gives clients that are leaving (a kernel client just
/// detached, say: its connection ends a moment later) before it refuses.
const CLIENTS_LEAVING: Duration = Duration::from_secs(2);

/// The clients still connected after [`CLIENTS_LEAVING`], if any.
fn still_connected(st: &DeviceState) -> Option<String> {
    let deadline = std::time::Instant::now() + CLIENTS_LEAVING;
    loop {
        let who = connected(st).filter(|w| !w.is_empty())?;
        if std::time::Instant::now() >= deadline {
            return Some(who);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `del` of an NBD device: stop its daemon, or clean up after a dead one.
/// A device whose clients are connected is refused, naming them, unless
/// `force` (the clients then see their connection closed).
pub fn delete(st: &DeviceState, timeout: Duration, force: bool) -> anyhow::Result<()> {
    let id = st.id;
    let Some(nbd) = &st.nbd else {
        bail!("device {id}: saved state has no NBD details");
    };
    if st.daemon_alive() {
        if !force {
            if let Some(who) = still_connected(st) {
                return Err(crate::exit::in_use(format!(
                    "device {id} is in use: NBD clients are connected ({who}); disconnect them, or `userblk del -n {id} --force` stops it anyway"
                )));
            }
        }
        lifecycle::stop(st, timeout)?;
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
