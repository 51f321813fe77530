//! One `upgrade` of a device at a time.
//!
//! Two upgrades of one device would each ask the daemon to hand over and
//! each start a new daemon; the second would then find the device without
//! the daemon it planned for, half-way through. A non-blocking `flock` on
//! `STATE_DIR/ID.upgrade` serialises them: the second fails at once,
//! naming the first, and the kernel drops the lock with its holder, so a
//! killed upgrade leaves nothing to clean up.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};

use anyhow::{bail, Context};
use rustix::fs::{flock, FlockOperation};
use rustix::io::Errno;

/// Held for as long as the upgrade runs.
pub struct UpgradeLock(#[allow(dead_code)] File);

impl UpgradeLock {
    /// Take device `id`'s upgrade lock, or fail saying who holds it.
    pub fn take(id: u32) -> anyhow::Result<Self> {
        let dir = userblk::state::ensure_dir()?;
        let path = dir.join(format!("{id}.upgrade"));
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match flock(&f, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => {
                let mut holder = String::new();
                // Best effort: the holder writes its pid once it has the lock.
                let _ = f.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                };
                bail!("device {id}: another `userblk upgrade` of it is in progress{who}: not starting a second one");
            }
            Err(e) => {
                return Err(std::io::Error::from(e))
                    .with_context(|| format!("locking {}", path.display()))
            }
        }
        // The pid is only for the message above; a failure to write it
        // does not weaken the lock.
        let _ = f
            .set_len(0)
            .and_then(|()| f.seek(SeekFrom::Start(0)))
            .and_then(|_| write!(f, "{}", std::process::id()));
        Ok(UpgradeLock(f))
    }
}
