//! The one daemon lifecycle every frontend goes through.
//!
//! Outside the daemon: `add` re-runs itself as a detached daemon
//! ([`spawn`]) and waits, up to [`READY_DEADLINE`], on the daemon's stdout:
//! the daemon prints the device's details and [`READY_MARKER`] once the
//! device is live, then moves its output to its log file. If the daemon
//! dies first, the pipe closes and `add` reports the daemon's own error as
//! one line. `del` stops a daemon with SIGTERM ([`stop`]).
//!
//! Inside the daemon ([`serve`]), in this order: leave the caller's
//! session; catch signals (from before anything exists, so none can kill
//! the daemon half-way and leave a stray device); open the target; claim
//! the device id; lock memory and become an IO_FLUSHER where the daemon
//! serves this host's kernel; leave the caller's working directory; serve
//! until stopped, announcing the device once live ([`Host::announce`]).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use userblk::spec::MemData;
use userblk::state::{self, DeviceState};
use userblk::waiter::{Park, Waiter, Waker};

use crate::cli::AddArgs;
use crate::targets::Opened;

/// Set in the daemon's environment by the `add` that spawned it.
pub const DAEMON_ENV: &str = "USERBLK_DAEMON";
/// Printed by the daemon after the device details, once the device is live.
const READY_MARKER: &str = "--userblk-device-live--";
/// How long `add` waits for the device to go live. Opening a target may
/// wait on a network (an s3 bucket's retries, an NBD server's handshake);
/// a daemon not live after this is stuck.
const READY_DEADLINE: Duration = Duration::from_secs(300);
/// How long a stuck daemon has to stop on SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// What the lifecycle calls on a signal: ask the serving thread to stop.
/// Runs in the frontend's wait for its device ([`Host`] is its `Waiter`);
/// a signal that came earlier is handed on at the first wait.
pub type Stop = Box<dyn Fn(i32) + Send>;

/// A frontend: how a device is claimed, served and stopped. The lifecycle
/// ([`serve`]) calls these in order; `del` goes through the frontend's own
/// `delete`, from the device's saved state. Verbs to come (upgrade,
/// resize) become methods here, with a default for frontends without them.
pub trait Frontend {
    /// How a `mem` target keeps its data (in a file only where a new daemon
    /// may take the device over).
    fn mem_data(&self) -> MemData {
        MemData::Private
    }

    /// Whether this host's kernel sends its own I/O through the daemon
    /// (ublk, FUSE): then its memory is locked, as root, and its threads are
    /// IO_FLUSHERs, so reclaim never waits on the device it is cleaning.
    fn serves_this_kernel(&self) -> bool;

    /// The action on SIGTERM, SIGINT and SIGHUP.
    fn stopper(&self) -> Stop;

    /// Claim the device's id before serving (and undo the claim when dropped).
    fn claim(&mut self) -> anyhow::Result<()>;

    /// Serve `target` until stopped, calling [`Host::announce`] once live.
    fn serve(&mut self, target: Opened, host: &Host) -> anyhow::Result<()>;
}

/// A [`Stop`] that sends `wrap(signal)` to the serving thread's channel.
pub fn send_to<T: Send + 'static>(tx: &mpsc::Sender<T>, wrap: fn(i32) -> T) -> Stop {
    let tx = tx.clone();
    Box::new(move |sig| {
        let _ = tx.send(wrap(sig));
    })
}

/// Claim an id for a device of `frontend` that has no kernel object (its
/// state file holds the claim): `wanted`, or the lowest free one where
/// `busy` says no. Ids are shared with ublk devices, so `list` and
/// `del -n` mean one device.
pub fn claim_id(
    wanted: Option<u32>,
    frontend: &str,
    busy: impl Fn(u32) -> bool,
) -> anyhow::Result<DeviceState> {
    let kernel_ids = userblk::ublk::ctrl::device_ids();
    Ok(DeviceState::claim(wanted, &kernel_ids, frontend, busy)?)
}

/// Why `--frontend auto` chose FUSE, and how the device is served.
pub struct Fallback {
    /// What is missing, and what would fix it.
    pub why: &'static str,
    /// "FUSE" or "FUSE + loop".
    pub how: &'static str,
}

/// What the lifecycle offers a serving frontend.
pub struct Host {
    daemon: bool,
    /// `--show`: announce only the device's path.
    show: bool,
    fallback: Option<Fallback>,
    /// `--name`: claimed in [`serve`] before anything else is made.
    name: std::sync::OnceLock<crate::names::DaemonName>,
    /// Signals and the control socket, served in the frontend's wait.
    service: std::sync::OnceLock<super::service::Service>,
    /// The wait where there is no service.
    park: Park,
}

impl Host {
    /// For a daemon (else the foreground); `show` and `fallback` shape the announcement.
    pub fn new(daemon: bool, show: bool, fallback: Option<Fallback>) -> Host {
        Host {
            daemon,
            show,
            fallback,
            name: std::sync::OnceLock::new(),
            service: std::sync::OnceLock::new(),
            park: Park::default(),
        }
    }

    /// The device's name (`--name`), for its saved state.
    pub fn name(&self) -> Option<String> {
        self.name.get().map(|n| n.name().to_string())
    }

    /// The kernel gave the device id `id` (before it is live): for udev,
    /// which asks for a new device's name as soon as it appears.
    pub fn device_id(&self, id: u32) {
        if let Some(n) = self.name.get() {
            n.set_id(id);
        }
    }

    /// Where the daemon of device `id` logs; none in the foreground.
    pub fn log(&self, id: u32) -> Option<PathBuf> {
        self.daemon
            .then(|| state::state_dir().join(format!("{id}.log")))
    }

    /// The arguments of this `add`, as saved for `list` and `recover`.
    pub fn args(&self) -> Vec<String> {
        std::env::args()
            .skip(1)
            .filter(|a| a != "--foreground")
            .collect()
    }

    /// Device `id` is live at `path` (a device node, file or NBD URI):
    /// print its `details` (with `--show`, only `path`) and, in a daemon,
    /// the ready marker for the waiting `add`, then move our output to the
    /// log. A fallback to FUSE is said in one line on stderr, which the
    /// waiting `add` passes on. Best effort: a closed pipe must not take
    /// the device down.
    pub fn announce(&self, id: u32, path: &str, details: &str) {
        // Linked before `add` returns: its caller may use the link at once.
        if let Some(n) = self.name.get() {
            n.live(path);
        }
        if let Some(f) = &self.fallback {
            eprintln!("userblk: {}; serving {path} through {}", f.why, f.how);
        }
        if self.show {
            crate::out::announce(&format!("{path}\n"));
        } else {
            crate::out::announce(details);
        }
        // Before the marker: the waiting `add` exits on it, and a service
        // manager must hear of the new main process before that exit.
        self.notify_ready(id, path);
        if let Some(log) = self.log(id) {
            crate::out::announce(&format!("{READY_MARKER}\n"));
            redirect_output(&log);
        }
    }
}

impl Host {
    /// Tell a service manager (`$NOTIFY_SOCKET`) that device `id` is live at
    /// `path`; a daemon `add` spawned names itself the main process.
    fn notify_ready(&self, id: u32, path: &str) {
        let target = DeviceState::load(id)
            .ok()
            .flatten()
            .map(|st| st.target)
            .unwrap_or_default();
        crate::notify::ready(&crate::notify::serving(path, &target), self.daemon);
    }
}

/// The frontend's wait for its device to stop is the daemon's one thread
/// besides the serving ones: signals are handed on, and the control socket
/// answered, inside it.
impl Waiter for Host {
    fn wait(&self, timeout: Option<Duration>) {
        match self.service.get() {
            Some(s) => s.wait(timeout),
            None => self.park.wait(timeout),
        }
    }

    fn waker(&self) -> Waker {
        match self.service.get() {
            Some(s) => s.waker(),
            None => self.park.waker(),
        }
    }
}

/// Serve a device with `fe` in this process, through the whole lifecycle.
pub fn serve(mut fe: Box<dyn Frontend>, args: &AddArgs, host: &Host) -> anyhow::Result<()> {
    let daemon = host.daemon;
    if daemon {
        // Leave the caller's session so its terminal's signals do not reach us.
        let _ = rustix::process::setsid();
    }
    // Signals go to the frontend's stopper, and `ctl` is answered, in the
    // frontend's wait (no thread of their own).
    let started = super::service::start(fe.stopper())?;
    let service = host.service.get_or_init(|| started);
    let result = (|| {
        if let Some(name) = &args.dev.name {
            // A recovering daemon takes its device's name over with it.
            let takeover = args
                .dev
                .recover_id
                .or(args.dev.id.filter(|_| args.dev.adopt));
            let _ = host
                .name
                .set(crate::names::DaemonName::claim(name, takeover)?);
        }
        let mut target = crate::targets::open(&args.target, &args.filters(), fe.mem_data())?;
        service.answer(target.control.take());
        target.target.caps().check().context("target")?;
        fe.claim()?;
        settle(daemon, fe.serves_this_kernel());
        fe.serve(target, host)
    })();
    if let Some(n) = host.name.get() {
        n.finish();
    }
    service.close();
    result
}

/// Lock memory and mark the threads to come as IO_FLUSHERs where the
/// daemon serves this kernel; leave the caller's working directory.
fn settle(daemon: bool, serves_this_kernel: bool) {
    if serves_this_kernel {
        // A user has no mlockall: with MCL_FUTURE under RLIMIT_MEMLOCK the
        // target's and the queues' allocations would fail instead.
        if rustix::process::geteuid().is_root() {
            if let Err(e) = userblk::sys::lock_memory() {
                tracing::warn!("{e}; memory is not locked");
            }
        }
        // The serving threads inherit it: reclaim must not wait on our own device.
        if let Err(e) = userblk::sys::set_io_flusher() {
            tracing::debug!("{e}");
        }
    }
    // The daemon stays in the caller's mount namespace. A private one would
    // copy every mount that exists now and keep those file systems alive
    // after the user unmounts them: for `recover`, the one on this very
    // device, which then never gets a clean unmount. It only must not pin
    // the caller's working directory (every path it uses is absolute by now).
    if daemon {
        let _ = std::env::set_current_dir("/");
    }
}

fn redirect_output(log: &Path) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log);
    match file {
        Ok(f) => {
            let _ = rustix::stdio::dup2_stdout(&f);
            let _ = rustix::stdio::dup2_stderr(&f);
        }
        Err(e) => {
            tracing::warn!("{}: {e}; logging to /dev/null", log.display());
            if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
                let _ = rustix::stdio::dup2_stdout(&null);
                let _ = rustix::stdio::dup2_stderr(&null);
            }
        }
    }
}

/// Run `userblk ARGV` as a detached daemon and wait until it reports the
/// device live (passing on its details), or report its error after undoing
/// with `clean` what the dead daemon left.
pub fn spawn(argv: Vec<OsString>, clean: fn(&DeviceState)) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the userblk executable")?;
    spawn_exe(&exe, argv, clean)
}

/// As [`spawn`], running the userblk binary at `exe` (`upgrade --binary`).
pub fn spawn_exe(exe: &Path, argv: Vec<OsString>, clean: fn(&DeviceState)) -> anyhow::Result<()> {
    // The daemon gets none of our caller's descriptors beyond 0, 1 and 2.
    userblk::sys::close_inherited_on_exec();
    let mut child = Command::new(exe)
        .args(argv)
        .env(DAEMON_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the daemon")?;
    // What the daemon says on stderr before it is live (its errors, or
    // warnings such as a feature the kernel refused): the pipe ends when
    // the daemon moves its output to its log file, right after going live.
    let said = read_all(child.stderr.take());
    // Its stdout, a line at a time, so the wait can have a deadline.
    let stdout = child.stdout.take().context("daemon stdout")?;
    let (line_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + READY_DEADLINE;
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let line = line.context("reading from the daemon")?;
                if line == READY_MARKER {
                    pass_on_warnings(&said);
                    return Ok(());
                }
                // Best effort: a reader that went (`add ... | head -1`)
                // must not stop us reading until the daemon is ready.
                crate::out::announce(&format!("{line}\n"));
            }
            // The pipe closed without the marker: the daemon is gone.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let how = stop_child(&mut child);
                bail!(
                    "the daemon (pid {}) did not report the device live within {}s; {how}",
                    child.id(),
                    READY_DEADLINE.as_secs()
                );
            }
        }
    }
    let status = child.wait().context("waiting for the daemon")?;
    clean_after(child.id(), clean);
    let text = said.recv().unwrap_or_default();
    let mut lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines.pop().unwrap_or("");
    // A failed add says one line: the daemon's error. What it logged on the
    // way (a filter's INFO line as it opened) only with -v.
    if tracing::enabled!(tracing::Level::DEBUG) {
        for l in lines {
            eprintln!("{l}");
        }
    }
    // The daemon's exit status is the add's, where it tells cases apart.
    let msg = match last.strip_prefix("userblk: ") {
        Some(msg) => msg.to_owned(),
        None if !last.is_empty() => {
            format!("the daemon exited ({status}) before the device was live: {last}")
        }
        None => format!("the daemon exited ({status}) before the device was live"),
    };
    Err(crate::exit::with_status(status.code(), msg))
}

/// Everything a child writes to `pipe`, sent once it closes.
pub fn read_all(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (tx, said) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_string(&mut s);
        }
        let _ = tx.send(s);
    });
    said
}

/// What a daemon that died before going live left behind (its state, a
/// dead mount): undone with `clean`, so a failed `add` leaves nothing.
fn clean_after(pid: u32, clean: fn(&DeviceState)) {
    let Ok(pid) = i32::try_from(pid) else {
        return;
    };
    for id in DeviceState::ids() {
        if let Ok(Some(st)) = DeviceState::load(id) {
            if st.pid == pid && !st.daemon_alive() {
                clean(&st);
            }
        }
    }
}

/// The daemon's warnings and notes (`userblk: ...`) matter to whoever ran
/// `add`; its info lines are in the log.
fn pass_on_warnings(said: &mpsc::Receiver<String>) {
    if let Ok(text) = said.recv_timeout(Duration::from_millis(500)) {
        let loud =
            |l: &&str| l.contains(" WARN ") || l.contains(" ERROR ") || l.starts_with("userblk: ");
        for l in text.lines().filter(loud) {
            eprintln!("{l}");
        }
    }
}

/// Stop a daemon that never went live: SIGTERM (it undoes what it made),
/// then SIGKILL after [`STOP_GRACE`]. Says what happened.
fn stop_child(child: &mut Child) -> &'static str {
    let pid = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return "stopped it";
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    "killed it"
}

/// Send the daemon of a saved device SIGTERM and wait up to `timeout` for it to exit.
pub fn stop(st: &DeviceState, timeout: Duration) -> anyhow::Result<()> {
    let id = st.id;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(st.pid).context("bad pid in saved state")?,
        rustix::process::Signal::TERM,
    )
    .with_context(|| format!("device {id}: signalling daemon {}", st.pid))?;
    let deadline = Instant::now() + timeout;
    if !userblk::sys::wait_while(st.pid, deadline, || st.daemon_alive()) {
        bail!(
            "device {id}: daemon {} did not stop within {}s; see {}",
            st.pid,
            timeout.as_secs(),
            st.log
                .as_deref()
                .map_or("its log".into(), |l| l.display().to_string())
        );
    }
    Ok(())
}
