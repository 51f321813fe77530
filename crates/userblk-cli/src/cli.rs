//! Command-line syntax (clap derive). Compatible with what ublk tools script against:
//! `add <target> [-n ID] [-q N] [-d N]`, `del -n ID | -a`, `list [-n ID]`, `features`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::endpoint::Endpoint;

/// Parse a size such as `4096`, `512K`, `1G`.
fn size(s: &str) -> Result<u64, String> {
    userblk::size::parse(s).map_err(|e| e.to_string())
}

/// Parse and check a `--filter` spec (its options too; nothing is opened yet).
fn filter_spec(s: &str) -> Result<userblk::filters::Spec, String> {
    let spec: userblk::filters::Spec = s
        .parse()
        .map_err(|e: userblk::filters::FilterError| e.to_string())?;
    userblk::filters::Config::parse(&spec).map_err(|e| e.to_string())?;
    Ok(spec)
}

/// A snapshot's name, refused here rather than after connecting.
fn snapshot_name(s: &str) -> Result<String, String> {
    userblk::targets::s3::layout::check_snapshot_name(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

/// An S3 volume's chunk size, refused here rather than after connecting.
fn chunk_size(s: &str) -> Result<u64, String> {
    let v = size(s)?;
    userblk::targets::s3::layout::check_chunk_size(v).map_err(|e| e.to_string())?;
    Ok(v)
}

fn size_u32(s: &str) -> Result<u32, String> {
    let v = size(s)?;
    u32::try_from(v).map_err(|_| format!("{s} is too large"))
}

/// An I/O scheduler's name as sysfs spells them, or `kernel`.
fn scheduler_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not an I/O scheduler name (none, mq-deadline, bfq, kyber, or kernel)"
        ))
    }
}

/// A device name (`add --name`), checked against the library's rule.
fn device_name(s: &str) -> Result<String, String> {
    userblk::names::validate(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// Which device a command is about: `-n ID` or `--name NAME`, one of them.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct DeviceRef {
    /// Device id.
    #[arg(short = 'n', long = "number", value_name = "ID")]
    pub id: Option<u32>,
    /// Device name (given to `add --name`).
    #[arg(long, value_name = "NAME", value_parser = device_name)]
    pub name: Option<String>,
}

/// `udev-name` (internal, for the udev rule in contrib/udev).
#[derive(Debug, Args)]
pub struct UdevNameArgs {
    /// The ublk device id (udev's %n of ublkbN).
    #[arg(value_name = "ID")]
    pub id: u32,
}

/// userblk: Linux block devices served by a userspace process.
#[derive(Debug, Parser)]
#[command(name = "userblk", version, about, propagate_version = true)]
pub struct Cli {
    /// Log more (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a device served by a new daemon; returns once it is live.
    Add(Box<AddArgs>),
    /// Stop and delete devices.
    Del(DelArgs),
    /// Show devices.
    List(ListArgs),
    /// Start a new daemon for a device whose daemon died (added with -r).
    Recover(RecoverArgs),
    /// Hand a live ublk device to a new daemon (a newer userblk) without an I/O error.
    ///
    /// Linux 6.16+: the device must have been added with -r; older kernels:
    /// with --reissue. The new daemon serves the same target, filters and options.
    Upgrade(UpgradeArgs),
    /// Show what a device's `stats` filter counted (added with --filter stats).
    Stats(StatsArgs),
    /// Run a control action in a device's daemon: `powercut`, `powerup`
    /// (--filter flakey); with no action, list what the device offers.
    Ctl(CtlArgs),
    /// Change a live device's size: its target's, then the device's
    /// (`userblk resize -n 0 --size 20G`); shrinking needs --allow-shrink.
    Resize(ResizeArgs),
    /// Make the running devices match a pool file (`userblk apply pool.toml`):
    /// add what is missing, delete what it no longer lists, grow sizes.
    ///
    /// One [[device]] table per device, with `name`, `target` and `add`'s
    /// options by their long names. Devices are matched by name; only
    /// devices an earlier apply added are deleted. See docs/pool.md.
    Apply(ApplyArgs),
    /// Create an image file (`userblk create qcow2 -f IMAGE --size 10G`).
    Create(CreateArgs),
    /// Copy any target to any target, skipping holes (`userblk copy disk.raw disk.qcow2`).
    Copy(CopyArgs),
    /// Snapshots of an s3 volume: create (also of a live one), list, delete.
    ///
    /// A snapshot is a crash-consistent point of the volume that never
    /// changes; `clone` makes writable volumes of it, `copy s3://B/P@NAME`
    /// exports it. See docs/snapshots.md.
    Snapshot(SnapshotArgs),
    /// Make a writable s3 volume of a snapshot, copying no data
    /// (`userblk clone s3://B/golden@base s3://B/vm7`).
    Clone(CloneArgs),
    /// Delete the chunk objects of an s3 bucket that no volume and no
    /// snapshot can read any more, safely while volumes are served.
    Gc(GcArgs),
    /// Show the ublk features this kernel supports, and what each lets userblk do.
    Features(JsonArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
    /// Every device's request counters as Prometheus metrics: served over
    /// HTTP (`--listen tcp:127.0.0.1:9477`) or printed once (`--once`).
    Metrics(MetricsArgs),
    /// Print a manual page (roff), or write them all with --dir.
    ///
    /// `userblk man` is userblk(8); `userblk man add` is userblk-add(8), and
    /// so on for every command (`add-file`, `create-qcow2`).
    Man(ManArgs),
    /// Print device ID's name, for udev's /dev/userblk/NAME link (contrib/udev).
    #[command(hide = true)]
    UdevName(UdevNameArgs),
}

/// `man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// The command whose page to print (`add`, `add-file`, ...; default: userblk(8)).
    #[arg(value_name = "COMMAND", conflicts_with = "dir")]
    pub page: Option<String>,
    /// Write every page (userblk.8, userblk-add.8, ...) into this directory,
    /// e.g. /usr/local/share/man/man8, and list the files written.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// `metrics`.
#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// Serve the text at http://ADDR/metrics until stopped: tcp:HOST:PORT or unix:PATH.
    #[arg(long, value_name = "ADDR", required_unless_present = "once")]
    pub listen: Option<userblk::nbd::server::Listen>,
    /// Print the text once and exit (for node_exporter's textfile collector, or a look).
    #[arg(long, conflicts_with = "listen")]
    pub once: bool,
}

/// `completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The device.
    #[command(flatten)]
    pub device: DeviceRef,
    /// Machine-readable output (the snapshot as the daemon wrote it, with `id` and `live`).
    #[arg(long)]
    pub json: bool,
}

/// `ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The device.
    #[command(flatten)]
    pub device: DeviceRef,
    /// Machine-readable output (the daemon's answer as it sent it).
    #[arg(long)]
    pub json: bool,
    /// The action (`powercut`, `powerup`, `writeback`, `status`, ...); none lists them.
    /// No action takes arguments, so anything after it is a usage error
    /// rather than silently dropped.
    pub action: Option<String>,
}

/// `resize`.
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// The device.
    #[command(flatten)]
    pub device: DeviceRef,
    /// The new size (`20G`, `512M`, bytes): a multiple of the device's block size.
    #[arg(short = 's', long, value_name = "SIZE", value_parser = size)]
    pub size: u64,
    /// Allow a size below the current one: the data past the new end is lost.
    #[arg(long)]
    pub allow_shrink: bool,
}

/// `apply`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The pool file (TOML).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Print the plan, one line per device (add, keep, grow, differs,
    /// recreate, delete), and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the plan and its outcome as one JSON document.
    #[arg(long)]
    pub json: bool,
    /// Delete and add again each device that differs from the file other
    /// than by a larger size (its data goes, unless its target keeps it).
    #[arg(long)]
    pub recreate: bool,
}

/// `recover`.
#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// The device.
    #[command(flatten)]
    pub device: DeviceRef,
}

/// `upgrade`.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// The device.
    #[command(flatten)]
    pub device: DeviceRef,
    /// The userblk binary the new daemon runs (default: this one). It must
    /// be named userblk and answer --version.
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
}

/// `add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// Device options, accepted before or after the target name.
    #[command(flatten)]
    pub dev: DevArgs,
    /// Filters given before the target name.
    #[command(flatten)]
    pub filters: FilterArgs,
    /// The target that serves the device.
    #[command(subcommand)]
    pub target: TargetArgs,
}

impl AddArgs {
    /// Every `--filter`, in command-line order: those before the target name, then those after.
    pub fn filters(&self) -> Vec<userblk::filters::Spec> {
        let after = match &self.target {
            TargetArgs::Null(a) => &a.filters,
            TargetArgs::Early(a) => &a.filters,
            TargetArgs::Mem(a) => &a.filters,
            TargetArgs::File(a) => &a.filters,
            TargetArgs::Nbd(a) => &a.filters,
            TargetArgs::Qcow2(a) => &a.filters,
            TargetArgs::S3(a) => &a.filters,
            TargetArgs::Rbd(a) => &a.filters,
        };
        [&self.filters.filters[..], &after.filters[..]].concat()
    }
}

/// `--filter`, accepted before and after the target name. (Not a global
/// option like the device options: clap keeps only one side's values of a
/// repeated global option, and the order of filters matters.)
#[derive(Debug, Clone, Default, Args)]
pub struct FilterArgs {
    // The help comes from the library's table of filters, so it lists every one.
    #[arg(
        long = "filter",
        value_name = "SPEC",
        help_heading = "Filters",
        value_parser = filter_spec,
        help = userblk::filters::short_help(),
        long_help = userblk::filters::help()
    )]
    pub filters: Vec<userblk::filters::Spec>,
}

/// Options of the device itself, whatever the target, grouped in `--help`
/// by what they apply to. `-h` shows each one's first paragraph.
#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Device id (default: the lowest id no device uses).
    ///
    /// ublk: the device is /dev/ublkbID. FUSE and NBD devices take ids from
    /// the same range, so that `list` and `del -n` mean one device.
    #[arg(
        short = 'n',
        long = "number",
        global = true,
        value_name = "ID",
        help_heading = "Device"
    )]
    pub id: Option<u32>,
    /// A name for the device, unique on this host: other commands take
    /// `--name NAME` for `-n ID`, and /dev/userblk/NAME links to its node.
    ///
    /// 1 to 64 characters of A-Z a-z 0-9 . _ -, not starting with . or -.
    /// The link leads to /dev/ublkbN, /dev/loopN or the FUSE file (NBD
    /// devices have no node, so no link); a user's links are under the
    /// state directory's dev/ (docs/names.md).
    #[arg(long, global = true, value_name = "NAME", value_parser = device_name,
          help_heading = "Device")]
    pub name: Option<String>,
    /// Which interface serves the device.
    ///
    /// ublk, FUSE (a file, plus a loop device with --loop) or NBD (a network
    /// export, with --listen); auto picks NBD with --listen, else ublk when
    /// the kernel has it, else FUSE.
    #[arg(long, global = true, value_enum, default_value_t = Frontend::Auto, help_heading = "Device")]
    pub frontend: Frontend,
    /// Print only the device's path on stdout, for scripts.
    ///
    /// /dev/ublkbN, /dev/loopN, the FUSE file or the NBD URI, as `losetup --show`.
    #[arg(long, global = true, help_heading = "Device")]
    pub show: bool,
    /// Serve in the foreground instead of detaching a daemon.
    #[arg(long, global = true, help_heading = "Device")]
    pub foreground: bool,
    /// Serving queues [default: 1 for ublk, 4 for FUSE].
    ///
    /// ublk: hardware queues, one serving thread each (the kernel caps it at
    /// the CPU count); FUSE: the serving threads.
    #[arg(short = 'q', long = "queues", global = true, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=4096), help_heading = "Device")]
    pub queues: Option<u16>,
    /// Requests in flight per queue (NBD: per connection).
    #[arg(short = 'd', long = "depth", global = true, default_value_t = 128, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=4096), help_heading = "Device")]
    pub depth: u16,
    /// Largest request (bytes, or with K/M suffix); a multiple of the page size.
    #[arg(long = "io-buf-size", global = true, default_value = "512K", value_parser = size_u32,
          value_name = "SIZE", help_heading = "Device")]
    pub io_buf_size: u32,
    /// Keep the device if the daemon dies: I/O waits until `userblk recover -n ID`.
    #[arg(short = 'r', long = "recovery", global = true, help_heading = "ublk")]
    pub recovery: bool,
    /// With recovery, re-issue requests in flight at the daemon's death (implies -r).
    ///
    /// They go to the new daemon instead of failing.
    #[arg(long, global = true, help_heading = "ublk")]
    pub reissue: bool,
    /// With recovery, fail I/O at once while no daemon runs (implies -r; Linux 6.13+).
    ///
    /// Instead of waiting for `userblk recover`, requests fail (EREMOTEIO)
    /// until a new daemon serves the device again.
    #[arg(long, global = true, conflicts_with = "reissue", help_heading = "ublk")]
    pub fail_io: bool,
    /// Do not scan the device for partitions when it starts (Linux 7.0+).
    ///
    /// A partition table on the target then makes no /dev/ublkbNpM; older
    /// kernels scan as usual, with a warning.
    #[arg(long, global = true, help_heading = "ublk")]
    pub no_partitions: bool,
    /// Recover device -n ID if it waits for a daemon, else add it.
    ///
    /// If device -n ID already exists and waits for a daemon (QUIESCED),
    /// recover it instead of failing; otherwise add it. For service managers
    /// that restart a crashed daemon with the same command.
    #[arg(long, global = true, help_heading = "ublk")]
    pub adopt: bool,
    /// Move request data with pread/pwrite on /dev/ublkcN (Linux 6.5+).
    ///
    /// The kernel's user copy, instead of the kernel copying request data
    /// into the daemon's buffers; falls back, with a warning, where refused.
    #[arg(
        long,
        global = true,
        conflicts_with = "zero_copy",
        help_heading = "ublk"
    )]
    pub user_copy: bool,
    /// Zero copy (Linux 6.16+; default where offered; says why where it cannot).
    ///
    /// The kernel registers each request's own pages in the queue's io_uring
    /// (automatic buffer registration) and the target reads and writes them
    /// in place: no copy, no request buffers. For `null`, `mem`, `file`,
    /// `qcow2` and `s3`, alone or under filters that never touch data (such as stats),
    /// which use it by default where the kernel offers it; with this flag, a
    /// warning says why where it cannot (nbd copies).
    #[arg(long, global = true, help_heading = "ublk")]
    pub zero_copy: bool,
    /// Never zero copy; request data goes through the daemon's buffers.
    #[arg(
        long,
        global = true,
        conflicts_with = "zero_copy",
        help_heading = "ublk"
    )]
    pub no_zero_copy: bool,
    /// The block layer's I/O scheduler for the device [default: none].
    ///
    /// `none` hands requests to the daemon as they come, as loop and
    /// multi-queue devices get by default; the kernel would otherwise give a
    /// one-queue ublk device mq-deadline, which on Linux 7.x dispatches
    /// through a kernel worker and costs 4k random reads about two thirds of
    /// their rate (docs/perf/ublk-7x.md). `kernel` keeps the kernel's
    /// choice; any other name (mq-deadline, bfq, kyber) is set as given.
    #[arg(long, global = true, value_name = "NAME", value_parser = scheduler_name,
          help_heading = "ublk")]
    pub scheduler: Option<String>,
    /// How the queues take requests from the kernel.
    ///
    /// `batch` (Linux 7.0+) fetches and commits many requests per command;
    /// `per-tag` uses a command per request; `auto` serves per-tag for now
    /// (batch devices cannot be upgraded with QUIESCE yet; see
    /// docs/frontends/ublk.md).
    /// `batch` on an older kernel warns once and serves per-tag. A
    /// recovered device keeps the mode it was added with.
    #[arg(long = "io-mode", global = true, value_enum, default_value_t = IoModeArg::Auto,
          value_name = "MODE", help_heading = "ublk")]
    pub io_mode: IoModeArg,
    /// An unprivileged device, owned by the calling user (implied when not root).
    ///
    /// For root the kernel makes it privileged anyway. Needs the udev rule
    /// from contrib/udev; see docs/unprivileged.md.
    #[arg(long, global = true, help_heading = "ublk")]
    pub unprivileged: bool,
    /// The directory to mount on [default: a new one under the state directory].
    ///
    /// The device is the file `disk` in it.
    #[arg(long, global = true, value_name = "DIR", help_heading = "FUSE")]
    pub mountpoint: Option<PathBuf>,
    /// Attach a loop device to the file (root only).
    ///
    /// Implied when `auto` falls back to FUSE as root.
    #[arg(long = "loop", global = true, help_heading = "FUSE")]
    pub loop_dev: bool,
    /// No loop device, even when `auto` falls back to FUSE as root.
    #[arg(
        long = "no-loop",
        global = true,
        conflicts_with = "loop_dev",
        help_heading = "FUSE"
    )]
    pub no_loop: bool,
    /// Let other users open the file (users need `user_allow_other` in /etc/fuse.conf).
    #[arg(long, global = true, help_heading = "FUSE")]
    pub allow_other: bool,
    /// Serve an NBD export on `unix:PATH` or `tcp:HOST:PORT` (repeatable).
    ///
    /// Implies --frontend nbd.
    #[arg(long, global = true, value_name = "ADDR", help_heading = "NBD")]
    pub listen: Vec<String>,
    /// The export's name (clients asking for the default, empty name get it too).
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        default_value = "",
        help_heading = "NBD"
    )]
    pub export_name: String,
    /// Connections served at once.
    #[arg(long, global = true, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=4096), help_heading = "NBD")]
    pub max_connections: u32,
    /// Internal: serve device ID as its recovering daemon (used by `recover`).
    #[arg(long, global = true, hide = true, value_name = "ID")]
    pub recover_id: Option<u32>,
}

/// How ublk queues take requests from the kernel (`--io-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoModeArg {
    /// Whichever is faster where the kernel offers both.
    Auto,
    /// Batch commands (UBLK_F_BATCH_IO, Linux 7.0+).
    Batch,
    /// One command per request.
    PerTag,
}

/// The kernel interface that serves a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Frontend {
    /// ublk when `/dev/ublk-control` is usable (after `modprobe ublk_drv`), else FUSE.
    Auto,
    /// The kernel's ublk driver: `/dev/ublkbN`.
    Ublk,
    /// A file on a FUSE mount, optionally with a loop device on it.
    Fuse,
    /// An NBD server (`--listen`): for clients over the network, qemu, libnbd tools and the kernel's nbd.
    Nbd,
}

/// The targets.
#[derive(Debug, Clone, Subcommand)]
pub enum TargetArgs {
    /// Stores nothing: reads return zeroes, writes are dropped.
    Null(NullArgs),
    /// A sparse RAM disk.
    Mem(MemArgs),
    /// A regular file or block device (also accepted as `loop`).
    #[command(alias = "loop")]
    File(FileArgs),
    /// An export of a remote NBD server (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH).
    Nbd(NbdArgs),
    /// A qcow2 image (versions 2 and 3, backing chains, compressed clusters).
    Qcow2(Qcow2Args),
    /// A volume in an S3 bucket (AWS, MinIO, Ceph RGW, Garage, R2...), through a local cache.
    S3(S3Args),
    /// A Ceph RBD image, through librbd (Debian: librbd1), with its exclusive lock.
    Rbd(RbdArgs),
    /// A test target, not for data: a RAM disk that answers each write before a
    /// worker stores it, to check that frontends hold answers until then
    /// (docs/testing.md).
    #[command(hide = true)]
    Early(EarlyArgs),
}

/// What keeps a second writer out of an s3 volume (`--lease`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LeaseArg {
    /// The server's conditional writes, once a probe found them atomic.
    Auto,
    /// A lock of this host (daemons of other hosts are not kept out).
    Host,
}

/// `add s3`.
#[derive(Debug, Clone, Args)]
pub struct S3Args {
    /// The bucket.
    #[arg(long)]
    pub bucket: String,
    /// Key prefix of the volume in the bucket (one volume per prefix).
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Device size: creates the volume when the prefix holds none, and must
    /// match the volume's otherwise.
    #[arg(short = 's', long, value_parser = size)]
    pub size: Option<u64>,
    /// Chunk size of a new volume (one object per chunk; a power of two
    /// from 64K to 64M); must match an existing volume's.
    #[arg(long, value_parser = chunk_size, value_name = "SIZE")]
    pub chunk_size: Option<u64>,
    /// S3 endpoint URL (default: AWS's for the region).
    #[arg(long, env = "AWS_ENDPOINT_URL", value_name = "URL")]
    pub endpoint: Option<String>,
    /// Region.
    #[arg(long, env = "AWS_REGION", default_value = userblk::targets::s3::store::DEFAULT_REGION)]
    pub region: String,
    /// The local cache directory (default: /var/cache/userblk/s3/HOST/BUCKET/PREFIX for
    /// root, ~/.cache/userblk/s3/... for users).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Most bytes of clean chunks kept in the cache.
    #[arg(long, value_parser = size, default_value = "1G", value_name = "SIZE")]
    pub cache_size: u64,
    /// Uploads and read-aheads at once.
    #[arg(long, default_value_t = userblk::targets::s3::target::DEFAULT_UPLOAD_JOBS, value_name = "N")]
    pub upload_jobs: usize,
    /// Seconds a dirty chunk stays unwritten before it is uploaded (a flush uploads at once).
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    pub writeback_delay: f64,
    /// Seconds a failing bucket request is retried before the request (or flush) fails with EIO.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub retry_budget: u64,
    /// Take the volume even though another daemon holds its lease.
    #[arg(long)]
    pub break_lease: bool,
    /// What keeps a second writer out: auto (the server's conditional writes,
    /// refused on a server that does not make them atomic) or host (a lock of
    /// this host, for such servers).
    #[arg(long, value_enum, default_value = "auto", value_name = "HOW")]
    pub lease: LeaseArg,
    /// Serve snapshot NAME of the volume, read-only (no lease: a snapshot
    /// never changes), with a cache of its own.
    #[arg(long, value_name = "NAME", value_parser = snapshot_name,
          conflicts_with_all = ["size", "chunk_size", "break_lease"])]
    pub snapshot: Option<String>,
    /// Filters given after the target name.
    #[command(flatten)]
    pub filters: FilterArgs,
}

/// `add qcow2`.
#[derive(Debug, Clone, Args)]
pub struct Qcow2Args {
    /// The image.
    #[arg(short = 'f', long = "file", value_name = "IMAGE")]
    pub path: PathBuf,
    /// Read-only device (the image is opened read-only).
    #[arg(short = 'o', long = "read-only")]
    pub read_only: bool,
    /// L2 tables kept in memory (each maps 512 MiB with 64 KiB clusters).
    #[arg(long, default_value_t = userblk::targets::qcow2::DEFAULT_L2_CACHE, value_name = "TABLES")]
    pub l2_cache: usize,
    /// Filters given after the target name.
    #[command(flatten)]
    pub filters: FilterArgs,
}

/// `snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: SnapshotAction,
}

/// What `snapshot` does.
#[derive(Debug, Subcommand)]
pub enum SnapshotAction {
    /// Take snapshot NAME of the volume now. A daemon of this host serving
    /// it holds writes, uploads what is dirty and freezes the point;
    /// with no daemon, this command takes the volume's lease and does it.
    Create(SnapshotCreateArgs),
    /// The volume's snapshots: name, time, size, and the bytes only each
    /// one holds (what deleting it and `gc` would free).
    List(SnapshotListArgs),
    /// Delete snapshot NAME (its clones keep what they read; `gc` frees
    /// the rest once --grace has passed).
    Delete(SnapshotDeleteArgs),
}

/// `snapshot create`.
#[derive(Debug, Args)]
pub struct SnapshotCreateArgs {
    /// The volume: s3://BUCKET/PREFIX[?endpoint=URL&region=R&lease=host].
    #[arg(value_name = "VOLUME")]
    pub volume: crate::s3::S3Url,
    /// The snapshot's name (A-Z a-z 0-9 . _ -).
    #[arg(value_name = "NAME")]
    pub name: String,
    /// The cache directory, when no daemon serves the volume (as `add s3
    /// --cache-dir`: dirty data a dead daemon left there goes up first).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Print the snapshot's record as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `snapshot list`.
#[derive(Debug, Args)]
pub struct SnapshotListArgs {
    /// The volume: s3://BUCKET/PREFIX.
    #[arg(value_name = "VOLUME")]
    pub volume: crate::s3::S3Url,
    /// As JSON.
    #[arg(long)]
    pub json: bool,
}

/// `snapshot delete`.
#[derive(Debug, Args)]
pub struct SnapshotDeleteArgs {
    /// The volume: s3://BUCKET/PREFIX.
    #[arg(value_name = "VOLUME")]
    pub volume: crate::s3::S3Url,
    /// The snapshot.
    #[arg(value_name = "NAME")]
    pub name: String,
}

/// `clone`.
#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The snapshot to clone: s3://BUCKET/PREFIX@NAME.
    #[arg(value_name = "SNAPSHOT")]
    pub snapshot: crate::s3::S3Url,
    /// The new volume, in the same bucket: s3://BUCKET/NEWPREFIX.
    #[arg(value_name = "VOLUME")]
    pub volume: crate::s3::S3Url,
    /// Print the new volume's manifest as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// The bucket, or the part of it to collect: s3://BUCKET[/PREFIX]
    /// (every volume of the bucket is read either way: a clone elsewhere
    /// may read a volume under PREFIX).
    #[arg(value_name = "BUCKET")]
    pub bucket: crate::s3::S3Url,
    /// List what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Seconds a deleted snapshot's data stays (a clone being made of it
    /// meanwhile still sees it), and a volume's newest epoch counts as a
    /// snapshot being taken. 0 only on a bucket nothing else uses.
    #[arg(long, default_value_t = userblk::targets::s3::gc::DEFAULT_GRACE.as_secs(), value_name = "SECONDS")]
    pub grace: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The format.
    #[command(subcommand)]
    pub format: CreateFormat,
}

/// Formats `create` makes.
#[derive(Debug, Subcommand)]
pub enum CreateFormat {
    /// A qcow2 version 3 image.
    Qcow2(CreateQcow2Args),
}

/// `copy`.
#[derive(Debug, Args)]
pub struct CopyArgs {
    /// What to copy: raw:PATH, file:PATH, qcow2:PATH, PATH (qcow2 or raw, by
    /// its first bytes), nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH
    /// or null:SIZE (zeroes).
    #[arg(value_name = "SRC")]
    pub src: Endpoint,
    /// Where to: the same forms. A file that does not exist is created with
    /// the source's size (qcow2 for qcow2:PATH or a name ending in .qcow2,
    /// else a sparse raw file); an existing one must be at least as large.
    #[arg(value_name = "DST")]
    pub dst: Endpoint,
    /// Worker threads, each with a read and a write in flight.
    #[arg(short = 'j', long, default_value_t = 4, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    /// Show the progress bar even when stderr is not a terminal (then as a line a second).
    #[arg(long, conflicts_with_all = ["no_progress", "quiet"])]
    pub progress: bool,
    /// No progress bar (the default when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// No progress bar and no summary (errors are still reported; --json still prints).
    #[arg(long)]
    pub quiet: bool,
    /// Print the summary as JSON: bytes_total, bytes_data, bytes_skipped,
    /// bytes_zeroed, bytes_resumed, seconds, complete.
    #[arg(long)]
    pub json: bool,
    /// Keep a checkpoint file (DST.userblk-copy, or in the state directory)
    /// every 256 MiB and when stopped, and start from the one an earlier
    /// run left. The source must not have changed in between.
    #[arg(long)]
    pub resume: bool,
    /// Where --resume keeps its checkpoint.
    #[arg(long, value_name = "FILE", requires = "resume")]
    pub checkpoint: Option<PathBuf>,
}

/// `create qcow2`.
#[derive(Debug, Args)]
pub struct CreateQcow2Args {
    /// The new image (must not exist).
    #[arg(short = 'f', long = "file", value_name = "IMAGE")]
    pub path: PathBuf,
    /// Virtual size (default with --backing: the backing file's).
    #[arg(short = 's', long, value_parser = size)]
    pub size: Option<u64>,
    /// Backing file, as stored in the image (relative to the image's directory).
    #[arg(short = 'b', long, value_name = "FILE")]
    pub backing: Option<String>,
    /// The backing file's format: qcow2 or raw (default: probed).
    #[arg(short = 'F', long, value_name = "FORMAT")]
    pub backing_format: Option<String>,
    /// Cluster size, a power of two from 512 to 2M.
    #[arg(short = 'c', long, default_value = "64K", value_parser = size)]
    pub cluster_size: u64,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `add null`.
#[derive(Debug, Clone, Args)]
pub struct NullArgs {
    /// Device size.
    #[arg(short = 's', long, default_value = "250G", value_parser = size)]
    pub size: u64,
    /// Reads leave the data as they find it instead of zeroing it, as
    /// null_blk does: for benchmarks only.
    ///
    /// A read then returns whatever its buffer held: an earlier request's
    /// data, or under zero copy the old contents of the reader's own page
    /// (freed kernel memory, possibly anyone's). Only readers of the device
    /// see it. See docs/targets/null.md.
    #[arg(long)]
    pub no_zero_fill: bool,
    /// Filters given after the target name.
    #[command(flatten)]
    pub filters: FilterArgs,
}

/// `add early` (a test target).
#[derive(Debug, Clone, Args)]
pub struct EarlyArgs {
    /// Device size.
    #[arg(short = 's', long, default_value = "250G", value_parser = size)]
    pub size: u64,
    /// Filters given after the target name.
    #[command(flatten)]
    pub filters: FilterArgs,
}

/// `add mem`.
#[derive(Debug, Clone, Args)]
pub struct MemArgs {
    /// Device size (memory is used only as data is written).
    #[arg(short = 's', long, value_parser = size)]
    pub size: u64,
    /// Filters given after the target name.
    #[command(flatten)]
    pub filters: FilterArgs,
}

/// `add file` / `add loop`.
#[derive(Debug, Clone, Args)]
pub struct FileArgs {
    /// Backing regular file or block device.
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    pub path: PathBuf,
    /// Byte offset in the file where the device starts.
    #[arg(long, default_value = "0", value_parser = size)]
    pub offset: u64,
    /// Use the page cache (default: O_DIRECT).
    #[arg(long)]
    pub buffered: bool,
    /// Read-only device.
    #[arg(short = 'o', long = "read-only")]
    pub read_only: bool,
    /// Filters given after the target name.
    #[command(flatten)]
    pub filters: FilterArgs,
}

/// `del`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "name", "all"])))]
pub struct DelArgs {
    /// Device id.
    #[arg(short = 'n', long = "number", value_name = "ID")]
    pub id: Option<u32>,
    /// Device name (given to `add --name`).
    #[arg(long, value_name = "NAME", value_parser = device_name)]
    pub name: Option<String>,
    /// Every device.
    #[arg(short = 'a', long)]
    pub all: bool,
    /// Stop the device even if it is mounted or open, or for an NBD export
    /// has clients connected (by default `del` refuses and names the holder
    /// or the clients); for a FUSE device whose daemon is
    /// stopped or stuck: abort its FUSE connection, kill the daemon, then
    /// detach and unmount. File systems mounted on its loop device are
    /// unmounted lazily first.
    #[arg(long)]
    pub force: bool,
}

/// `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this device.
    #[arg(short = 'n', long = "number", value_name = "ID")]
    pub id: Option<u32>,
    /// Only the device with this name.
    #[arg(long, value_name = "NAME", value_parser = device_name, conflicts_with = "id")]
    pub name: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Commands whose only option is `--json`.
#[derive(Debug, Args)]
pub struct JsonArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `add rbd`.
#[derive(Debug, Clone, Args)]
pub struct RbdArgs {
    /// The pool.
    #[arg(long)]
    pub pool: String,
    /// The image.
    #[arg(long)]
    pub image: String,
    /// Create the image with this size if it does not exist.
    #[arg(short = 's', long, value_parser = size)]
    pub size: Option<u64>,
    /// The cluster's ceph.conf (default: $CEPH_CONF, then /etc/ceph/ceph.conf).
    #[arg(long, value_name = "FILE")]
    pub conf: Option<PathBuf>,
    /// The Ceph client id: `admin` for client.admin (its key from the keyring ceph.conf names).
    // (`id` is the device id's argument: this one is `ceph_id` inside clap.)
    #[arg(long = "id", id = "ceph_id", value_name = "NAME")]
    pub ceph_id: Option<String>,
    /// Seconds one request may wait for the cluster before it fails with EIO
    /// (also the limit on connecting).
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub op_timeout: u64,
    /// Take the image even though another client holds its exclusive lock
    /// (librbd blocklists that client).
    #[arg(long)]
    pub break_lock: bool,
    /// Filters given after the target name.
    #[command(flatten)]
    pub filters: FilterArgs,
}

/// `add nbd`.
#[derive(Debug, Clone, Args)]
pub struct NbdArgs {
    /// The server and export: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH.
    #[arg(long, value_name = "URI")]
    pub uri: userblk::nbd::client::NbdUri,
    /// How long requests wait for a lost connection to come back before failing with EIO.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub reconnect_timeout: u64,
    /// Filters given after the target name.
    #[command(flatten)]
    pub filters: FilterArgs,
}

/// clap's error as one line: the message is what comes before the first
/// blank line (the usage and tips follow it); lists of missing arguments
/// go on one line.
pub fn error_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let lines: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let msg = lines.join(" ");
    msg.strip_prefix("error: ").unwrap_or(&msg).to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;

    use super::*;

    fn add(args: &[&str]) -> Result<AddArgs, clap::Error> {
        let argv = ["userblk", "add"].iter().chain(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Add(a) => Ok(*a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn filters_go_anywhere_and_keep_their_order() {
        let a = add(&[
            "--filter",
            "stats",
            "mem",
            "-s",
            "1M",
            "--filter",
            "delay:read=5ms",
            "--frontend",
            "fuse",
        ])
        .unwrap();
        let names: Vec<String> = a.filters().iter().map(ToString::to_string).collect();
        assert_eq!(names, ["stats", "delay:read=5ms"]);
        let a = add(&["--filter", "a", "--filter", "b", "null"]);
        let e = a.err().unwrap().to_string();
        assert!(e.contains("unknown filter 'a'"), "{e}");
        let a = add(&[
            "file", "-f", "x", "--filter", "readonly", "--filter", "stats",
        ])
        .unwrap();
        assert_eq!(a.filters().len(), 2);
        assert!(add(&["null"]).unwrap().filters().is_empty());
    }

    #[test]
    fn ctl_takes_an_optional_action_and_nothing_after_it() {
        let ctl = |args: &[&str]| match Cli::try_parse_from(["userblk", "ctl"].iter().chain(args)) {
            Ok(Cli {
                command: Command::Ctl(c),
                ..
            }) => Ok(c),
            Ok(other) => panic!("parsed as {other:?}"),
            Err(e) => Err(e),
        };
        let c = ctl(&["-n", "3"]).unwrap();
        assert_eq!((c.device.id, c.action), (Some(3), None));
        let c = ctl(&["-n", "3", "powercut"]).unwrap();
        assert_eq!(c.action.as_deref(), Some("powercut"));
        let e = ctl(&["-n", "3", "powercut", "junk"]).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        assert!(ctl(&["powercut"]).is_err(), "no device id");
    }

    #[test]
    fn a_device_is_named_by_id_or_name_not_both() {
        let parse = |args: &[&str]| Cli::try_parse_from(["userblk"].iter().chain(args));
        match parse(&["resize", "--name", "db", "--size", "1G"]).map(|c| c.command) {
            Ok(Command::Resize(r)) => {
                assert_eq!((r.device.id, r.device.name.as_deref()), (None, Some("db")));
            }
            other => panic!("parsed as {other:?}"),
        }
        for bad in [
            &["stats", "-n", "1", "--name", "db"][..],
            &["recover"],
            &["upgrade", "--name", ".x"],
            &["ctl", "--name", "a/b"],
            &["del", "-n", "1", "--name", "x"],
            &["list", "-n", "1", "--name", "x"],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}: {e}");
        }
        assert!(parse(&["del", "--name", "x"]).is_ok());
        assert!(parse(&["list", "--name", "x"]).is_ok());
        // Before or after the target name, as every device option.
        assert_eq!(
            add(&["--name", "db", "null"]).unwrap().dev.name.as_deref(),
            Some("db")
        );
        assert_eq!(
            add(&["null", "--name", "db"]).unwrap().dev.name.as_deref(),
            Some("db")
        );
        let e = add(&["--name=-x", "null"]).unwrap_err().to_string();
        assert!(e.contains("not a valid device name"), "{e}");
    }

    #[test]
    fn bad_filters_are_argument_errors() {
        for (bad, why) in [
            ("nope", "unknown filter 'nope'"),
            ("delay:read=5", "'5' has no unit"),
            ("error:rate=7", "not between 0 and 1"),
            ("readonly:yes=1", "unknown option 'yes'"),
            ("stats:", "nothing after ':'"),
        ] {
            let e = add(&["null", "--filter", bad]).err().unwrap();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad}");
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }
}
