//! `resize`: change a live device's size through its daemon's control
//! socket (the daemon resizes the target, then its frontend's kernel
//! side; see frontend/resize.rs), then refresh a loop device on a FUSE
//! file, which only a process other than the daemon may safely do (it
//! makes the kernel ask the daemon for the file's size).

use std::time::Duration;

use anyhow::{bail, Context};
use userblk::control::{self, Request};
use userblk::state::{self, DeviceState};

use crate::cli::ResizeArgs;
use crate::out::outln;

/// How long the daemon may take: a qcow2 image flushes and moves its L1
/// table, an s3 volume writes its manifest.
const TIMEOUT: Duration = Duration::from_secs(120);

/// `userblk resize -n ID --size SIZE [--allow-shrink]`.
pub fn run(args: &ResizeArgs) -> anyhow::Result<()> {
    let id = args.device.id()?;
    if args.size == 0 {
        bail!("the new size must be greater than 0");
    }
    let st = DeviceState::load(id)?
        .with_context(|| format!("no device with id {id} in {}", state::state_dir().display()))?;
    if !st.daemon_alive() {
        bail!(
            "device {id}: its daemon (pid {}) is not running (`userblk recover -n {id}` first)",
            st.pid
        );
    }
    let path = crate::ctl::socket_path(st.pid);
    if !path.exists() {
        bail!(
            "device {id}: its daemon has no control socket at {} (started by an older userblk?)",
            path.display()
        );
    }
    let req = Request::Resize {
        size: args.size,
        allow_shrink: args.allow_shrink,
    };
    let reply = control::request(&path, &req, TIMEOUT)
        .with_context(|| format!("device {id}: asking its daemon"))?;
    if !reply.ok {
        bail!(
            "device {id}: {}",
            reply.error.as_deref().unwrap_or("resize failed")
        );
    }
    if let Some(fuse) = &st.fuse {
        if let Some(lo) = &fuse.loop_device {
            // The daemon made the kernel forget the file's size; a stat
            // asks for the new one, which the loop device then takes.
            std::fs::metadata(&fuse.file).with_context(|| {
                format!("device {id}: reading the size of {}", fuse.file.display())
            })?;
            let now = userblk::loopdev::refresh_capacity(lo)
                .with_context(|| format!("device {id}: the file was resized"))?;
            if now != args.size {
                bail!(
                    "device {id}: {} has {now} bytes after LOOP_SET_CAPACITY, not {}",
                    lo.display(),
                    args.size
                );
            }
        }
    }
    for line in reply.output {
        outln!("{line}");
    }
    Ok(())
}
