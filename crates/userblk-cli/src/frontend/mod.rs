//! The frontends (ublk, FUSE, NBD) and the verbs that go through them:
//! `add` (choose a frontend, then run the one [`lifecycle`]), `recover`
//! and `del`.
//!
//! Each frontend implements [`lifecycle::Frontend`] (claim an id, serve
//! until stopped, what a signal does) and has a `delete` for `del`, from
//! the device's saved state. This module picks one; the lifecycle runs it
//! and knows none of them.

mod del_all;
mod fuse;
mod lifecycle;
mod limits;
mod nbd;
mod resize;
mod service;
mod ublk;
mod upgrade;
mod upgrade_lock;

pub use upgrade::run as upgrade;

use std::ffi::OsString;
use std::time::Duration;

use anyhow::bail;
use userblk::state::DeviceState;
use userblk::ublk::ctrl::running_as_root;
use userblk::ublk::Control;

use crate::cli::{AddArgs, DelArgs, DevArgs, RecoverArgs};
use lifecycle::Frontend;

/// How long `del` waits for a device's daemon to stop.
const DEL_TIMEOUT: Duration = Duration::from_secs(10);

/// `userblk add`.
pub fn add(args: AddArgs) -> anyhow::Result<()> {
    if !running_as_root() && (args.dev.recovery || args.dev.reissue || args.dev.fail_io) {
        bail!(
            "-r/--recovery, --reissue and --fail-io need root: the kernel clears user recovery for unprivileged devices (see docs/unprivileged.md)"
        );
    }
    if let Some(spec) = std::env::var_os(fuse::ATTACH_ENV) {
        return fuse::run_attacher(&spec.to_string_lossy());
    }
    let daemon = std::env::var_os(lifecycle::DAEMON_ENV).is_some();
    if args.dev.foreground || daemon {
        let (kind, fallback) = Kind::choose(&args.dev)?;
        // A daemon's `add` checked them before starting it.
        if !daemon {
            kind.check_limits(&args.dev)?;
        }
        let fe: Box<dyn Frontend> = match kind {
            Kind::Ublk => Box::new(ublk::Ublk::new(&args.dev)?),
            Kind::Fuse { with_loop } => Box::new(fuse::Fuse::new(&args.dev, with_loop)?),
            Kind::Nbd => Box::new(nbd::Nbd::new(&args.dev)?),
        };
        let host = lifecycle::Host::new(daemon, args.dev.show, fallback);
        lifecycle::serve(fe, &args, &host)
    } else {
        // Limits first: a device that cannot fit is refused before a daemon exists.
        Kind::choose(&args.dev)?.0.check_limits(&args.dev)?;
        let mut argv: Vec<OsString> = std::env::args_os().skip(1).collect();
        argv.push("--foreground".into());
        lifecycle::spawn(argv, clean_up_after)
    }
}

/// Undo what a daemon that died before its device was live left behind:
/// a FUSE daemon's mount and state (ublk and NBD leave nothing of their own).
fn clean_up_after(st: &DeviceState) {
    if st.frontend != "fuse" {
        return;
    }
    // Its loop attacher may hold the file open for a moment yet.
    let deadline = std::time::Instant::now() + DEL_TIMEOUT;
    while let Err(e) = fuse::delete(st, DEL_TIMEOUT, false) {
        if std::time::Instant::now() >= deadline {
            eprintln!("userblk: cleaning up: {e:#}");
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    crate::stats::remove_snapshot(st);
    crate::ctl::remove_socket(st);
}

/// `userblk recover -n ID`: check the device can be recovered, then start a
/// daemon with the arguments saved when it was added.
pub fn recover(args: &RecoverArgs) -> anyhow::Result<()> {
    lifecycle::spawn(ublk::recover_argv(args.device.id()?)?, clean_up_after)
}

/// Which frontend serves the device, after `auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ublk,
    Fuse { with_loop: bool },
    Nbd,
}

impl Kind {
    /// Refuse a device that would go past a limit (`ublks_max`, open files, ...).
    fn check_limits(self, dev: &DevArgs) -> anyhow::Result<()> {
        let new = dev.recover_id.is_none() && !dev.adopt;
        let (needs, queues) = match self {
            Kind::Ublk => (
                // The kernel makes root's devices privileged, even with --unprivileged.
                limits::Needs::Ublk {
                    new_unprivileged: new.then_some(!running_as_root()),
                },
                dev.queues.unwrap_or(1),
            ),
            Kind::Fuse { with_loop } => (
                limits::Needs::Fuse { with_loop },
                dev.queues.unwrap_or(fuse::DEFAULT_THREADS),
            ),
            Kind::Nbd => (limits::Needs::Nbd, 1),
        };
        limits::check(needs, queues)
    }

    /// Resolve `--frontend` and check the options fit the frontend. With
    /// the kind, why `auto` fell back to FUSE and how it serves, for the
    /// user to be told once the device is live.
    fn choose(dev: &DevArgs) -> anyhow::Result<(Kind, Option<lifecycle::Fallback>)> {
        let mut fallback = None;
        use crate::cli::Frontend as Asked;
        // --no-partitions is what the FUSE loop device (no LO_FLAGS_PARTSCAN) always does.
        let needs_ublk =
            dev.recovery || dev.reissue || dev.fail_io || dev.adopt || dev.recover_id.is_some();
        let fuse_only = dev.mountpoint.is_some() || dev.loop_dev || dev.no_loop || dev.allow_other;
        let nbd_only = !dev.listen.is_empty();
        let chosen = match dev.frontend {
            Asked::Ublk => Kind::Ublk,
            Asked::Fuse => Kind::Fuse {
                with_loop: dev.loop_dev,
            },
            Asked::Nbd => Kind::Nbd,
            Asked::Auto if nbd_only => Kind::Nbd,
            Asked::Auto if needs_ublk => Kind::Ublk,
            Asked::Auto => match Control::open() {
                Ok(_) if !fuse_only => Kind::Ublk,
                Ok(_) => Kind::Fuse {
                    with_loop: dev.loop_dev,
                },
                Err(e @ (userblk::Error::NoUblk | userblk::Error::NoControlAccess)) => {
                    let root = running_as_root();
                    let with_loop = dev.loop_dev || (root && !dev.no_loop);
                    tracing::debug!("ublk is not usable: {e}");
                    fallback = Some(lifecycle::Fallback {
                        why: match e {
                            userblk::Error::NoUblk => "no ublk driver (modprobe ublk_drv)",
                            _ => "no access to /dev/ublk-control (see docs/unprivileged.md)",
                        },
                        how: if with_loop { "FUSE + loop" } else { "FUSE" },
                    });
                    Kind::Fuse { with_loop }
                }
                Err(e) => return Err(e.into()),
            },
        };
        match chosen {
            Kind::Nbd if dev.listen.is_empty() => bail!(
                "the NBD frontend needs an address: add --listen unix:PATH or --listen tcp:HOST:PORT"
            ),
            Kind::Nbd if needs_ublk => bail!(
                "recovery (-r, --reissue, --fail-io, --adopt) needs the ublk frontend: NBD clients reconnect to a restarted server instead"
            ),
            Kind::Nbd if fuse_only => bail!(
                "--mountpoint, --loop, --no-loop and --allow-other are FUSE options, not NBD ones"
            ),
            Kind::Nbd if dev.unprivileged => {
                bail!("--unprivileged is a ublk option: an NBD server runs as whoever starts it")
            }
            Kind::Ublk | Kind::Fuse { .. } if nbd_only => {
                bail!("--listen is an NBD option: use --frontend nbd")
            }
            Kind::Fuse { .. } if needs_ublk => bail!(
                "recovery (-r, --reissue, --fail-io, --adopt) needs the ublk frontend: the FUSE frontend cannot keep a device across a daemon's death"
            ),
            Kind::Fuse { .. } if dev.unprivileged => {
                bail!("--unprivileged is a ublk option: a FUSE device always belongs to the user who adds it")
            }
            Kind::Fuse { .. } if dev.queues.is_some() => {
                userblk::fuse::disk::check_threads(dev.queues.map_or(0, usize::from))?;
                Ok((chosen, fallback))
            }
            Kind::Ublk if fuse_only => bail!(
                "--mountpoint, --loop, --no-loop and --allow-other are FUSE options: add --frontend fuse"
            ),
            c => Ok((c, fallback)),
        }
    }
}

/// `userblk del`.
pub fn del(args: &DelArgs) -> anyhow::Result<()> {
    let crate::list::Devices {
        mut ctrl,
        kernel_ids,
        ids: all,
    } = crate::list::Devices::find()?;
    let one = crate::names::resolve(args.id, args.name.as_deref())?;
    if let (Some(id), false) = (one, args.all) {
        return del_one(ctrl.as_mut(), &kernel_ids, id, args.force);
    }
    let ids = one.map_or(all, |id| vec![id]);
    let ublk = ctrl.is_some();
    drop(ctrl);
    // One walk of /proc serves the holder checks of many devices (one
    // each made `del -a` quadratic); a walk a second keeps them fresh.
    let _walks = userblk::open_files::share(std::time::Duration::from_secs(1));
    let results = del_all::run(
        &ids,
        del_all::WORKERS,
        std::time::Instant::now() + del_all::DEADLINE,
        // A control device per worker: each has its own ring.
        || ublk.then(|| Control::open().ok()).flatten(),
        |ctrl, id| del_one(ctrl.as_mut(), &kernel_ids, id, args.force),
        |id| {
            anyhow::anyhow!(
                "device {id}: not stopped: `del -a` gives up starting stops after {}s",
                del_all::DEADLINE.as_secs()
            )
        },
    );
    let mut failed = 0;
    for (_, result) in results {
        match result {
            Ok(()) => {}
            // `del -a` as a user: other users' devices are not ours to delete.
            Err(e)
                if matches!(
                    e.downcast_ref::<userblk::Error>(),
                    Some(userblk::Error::DeviceAccess { .. })
                ) => {}
            Err(e) => {
                eprintln!("userblk: {e:#}");
                failed += 1;
            }
        }
    }
    anyhow::ensure!(failed == 0, "{failed} device(s) could not be deleted");
    Ok(())
}

/// Delete device `id`, whichever frontend serves it.
fn del_one(
    ctrl: Option<&mut Control>,
    kernel_ids: &[u32],
    id: u32,
    force: bool,
) -> anyhow::Result<()> {
    // Read before deleting: the daemon removes its state as it exits.
    let saved = DeviceState::load(id).ok().flatten();
    let result = match (&saved, ctrl) {
        (Some(st), _) if st.frontend == "nbd" && !kernel_ids.contains(&id) => {
            nbd::delete(st, DEL_TIMEOUT, force)
        }
        (Some(st), _) if st.frontend != "ublk" && !kernel_ids.contains(&id) => {
            fuse::delete(st, DEL_TIMEOUT, force)
        }
        (_, Some(ctrl)) => ublk::delete(ctrl, id, saved.as_ref(), DEL_TIMEOUT, force),
        (_, None) => Err(Control::open().err().map_or_else(
            || anyhow::anyhow!("no device with id {id}"),
            |e| anyhow::anyhow!("no FUSE device with id {id}, and {e}"),
        )),
    };
    if result.is_ok() {
        if let Some(st) = &saved {
            crate::stats::remove_snapshot(st);
            crate::ctl::remove_socket(st);
            crate::names::forget(st);
        }
    }
    result
}
