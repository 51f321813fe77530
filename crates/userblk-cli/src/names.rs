//! Device names in the CLI: `--name NAME` for `-n ID` (one resolver for
//! every command), a daemon's hold on its name from claim to exit
//! ([`DaemonName`]), and `udev-name` for the udev rule. The rule, the
//! claim and the links are the library's (`userblk::names`).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use anyhow::bail;
use userblk::names::{self, link, Claim};
use userblk::state::{self, DeviceState};

use crate::cli::{DeviceRef, UdevNameArgs};

impl DeviceRef {
    /// The device's id: `-n ID` as given, or the id of the device `--name` names.
    pub fn id(&self) -> anyhow::Result<u32> {
        match resolve(self.id, self.name.as_deref())? {
            Some(id) => Ok(id),
            None => bail!("which device? give -n ID or --name NAME"),
        }
    }
}

/// `-n ID` or `--name NAME` (or neither: `None`) to a device id; an unknown
/// name is an error.
pub fn resolve(id: Option<u32>, name: Option<&str>) -> anyhow::Result<Option<u32>> {
    match (id, name) {
        (Some(id), _) => Ok(Some(id)),
        (None, Some(name)) => match names::lookup(name) {
            Some(st) => Ok(Some(st.id)),
            None => bail!(
                "no device named {name} (in {})",
                state::state_dir().display()
            ),
        },
        (None, None) => Ok(None),
    }
}

/// After `del`: remove the link of a deleted device's name, if it still
/// leads to the device's node (its daemon removes it when it can; a dead
/// daemon's is left for `del`).
pub fn forget(st: &DeviceState) {
    let Some(name) = st.name.as_deref() else {
        return;
    };
    if let Err(e) = names::release_link(name, Path::new(&st.block_device)) {
        eprintln!("userblk: device {}: removing its link: {e}", st.id);
    }
}

/// `userblk udev-name ID`: print device ID's name; fails (quietly for
/// udev, whose PROGRAM then does not match) when it has none.
pub fn udev_name(args: &UdevNameArgs) -> anyhow::Result<()> {
    match names::name_of(args.id).filter(|n| names::validate(n).is_ok()) {
        Some(name) => {
            crate::out::outln!("{name}");
            Ok(())
        }
        None => bail!("device {} has no name", args.id),
    }
}

/// A daemon's name: claimed before it has a device, carried in its saved
/// state, linked once the device is live, unlinked when the device goes.
pub struct DaemonName {
    name: String,
    /// Held until the saved state carries the name.
    claim: Mutex<Option<Claim>>,
    /// The node the link leads to, once made.
    node: Mutex<Option<PathBuf>>,
}

impl DaemonName {
    /// Claim `name`; `takeover` is the device a recovering daemon serves.
    pub fn claim(name: &str, takeover: Option<u32>) -> anyhow::Result<Self> {
        let claim = Claim::take(name, takeover)?;
        Ok(DaemonName {
            name: name.to_string(),
            claim: Mutex::new(Some(claim)),
            node: Mutex::new(None),
        })
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The kernel gave our device id `id` (udev may ask for its name now).
    pub fn set_id(&self, id: u32) {
        let claim = self.claim.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(Err(e)) = claim.as_ref().map(|c| c.set_id(id)) {
            tracing::warn!("{e}");
        }
    }

    /// The device is live at `path`, its state saved with the name: link
    /// the name to it (a device node or file; an NBD URI has none) and
    /// drop the claim.
    pub fn live(&self, path: &str) {
        if path.starts_with('/') {
            let node = PathBuf::from(path);
            match link::create(&link::dir(), &self.name, &node) {
                Ok(()) => {
                    tracing::info!("{} -> {path}", link::path(&self.name).display());
                    *self.node.lock().unwrap_or_else(PoisonError::into_inner) = Some(node);
                }
                Err(e) => tracing::warn!("linking {}: {e}", link::path(&self.name).display()),
            }
        }
        self.claim
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Serving ended: drop the claim, and the link unless the device lives
    /// on under its name (saved state kept: waiting for recovery, or handed
    /// to a new daemon).
    pub fn finish(&self) {
        self.claim
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let node = self
            .node
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(node) = node {
            match names::release_link(&self.name, &node) {
                Ok(true) => tracing::info!("removed {}", link::path(&self.name).display()),
                Ok(false) => {}
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }
}
