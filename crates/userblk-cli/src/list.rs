//! `list`: every device of the caller, whichever frontend serves it. ublk
//! devices come from the kernel, with the target from saved state; devices
//! of other frontends come from their saved state alone.
//!
//! The first two lines of each device keep the layout existing ublk tooling
//! parses: the pid is the 7th word and the state the 11th of the second line.

use anyhow::Context;
use serde_json::json;
use userblk::state::DeviceState;
use userblk::ublk::ctrl::{block_path, char_path};
use userblk::ublk::ctrl::{device_ids, state_name};
use userblk::ublk::io_mode::IoMode;
use userblk::ublk::{Control, DevInfo, Features};
use userblk_uapi::{UblkParams, UBLK_F_AUTO_BUF_REG, UBLK_F_USER_COPY};

use crate::cli::ListArgs;

/// One device as `list` shows it.
pub enum Entry {
    /// A ublk device, as the kernel sees it.
    Ublk(Box<UblkEntry>),
    /// A device of another frontend (FUSE, NBD), from its saved state.
    Saved(Box<DeviceState>),
}

/// What the kernel and the state directory know of a ublk device.
pub struct UblkEntry {
    info: DevInfo,
    params: Option<UblkParams>,
    state: Option<DeviceState>,
}

/// Gather what the kernel and the state directory know about ublk device `id`.
pub fn entry(ctrl: &mut Control, id: u32) -> userblk::Result<Entry> {
    let info = ctrl.dev_info(id)?;
    let params = ctrl.params(id).ok();
    let state = DeviceState::load(id).unwrap_or_else(|e| {
        tracing::warn!("{e}");
        None
    });
    Ok(Entry::Ublk(Box::new(UblkEntry {
        info,
        params,
        state,
    })))
}

impl Entry {
    /// The text form.
    pub fn text(&self) -> String {
        match self {
            Entry::Ublk(e) => e.text(),
            Entry::Saved(st) => saved_text(st),
        }
    }

    /// The JSON form.
    pub fn json(&self) -> serde_json::Value {
        match self {
            Entry::Ublk(e) => e.json(),
            Entry::Saved(st) => saved_json(st),
        }
    }
}

/// The `target` and `filters` lines of a device's text form: the target's
/// description without its filter list, then the filters outermost first.
fn target_lines(target: &serde_json::Value) -> String {
    let filters = userblk::filters::described_filters(target);
    let mut bare = target.clone();
    if let Some(m) = bare.as_object_mut() {
        m.remove("filters");
    }
    let mut s = format!("\ttarget {bare}\n");
    if !filters.is_empty() {
        s += &format!("\tfilters {}\n", filters.join(" "));
    }
    s
}

/// The `name` line of a named device (and its link), else nothing.
fn name_line(st: &DeviceState) -> String {
    match &st.name {
        Some(n) if st.frontend == "nbd" => format!("\tname {n}\n"),
        Some(n) => format!(
            "\tname {n} link {}\n",
            userblk::names::link::path(n).display()
        ),
        None => String::new(),
    }
}

/// LIVE while the daemon runs; DEAD once it is gone (`del` cleans up).
fn saved_state_name(st: &DeviceState) -> &'static str {
    if !st.daemon_alive() {
        "DEAD"
    } else if st.block_device.is_empty() {
        "STARTING"
    } else {
        "LIVE"
    }
}

/// Geometry of a saved device: (threads or depth, size, block size, largest request).
fn saved_geometry(st: &DeviceState) -> (u16, u64, u32, u32) {
    match (&st.fuse, &st.nbd) {
        (Some(f), _) => (f.threads, f.size, f.block_size, f.max_io_buf_bytes),
        (None, Some(n)) => (n.depth, n.size, n.block_size, n.max_payload),
        (None, None) => (0, 0, 512, 0),
    }
}

fn saved_text(st: &DeviceState) -> String {
    let (threads, size, bs, max_rq) = saved_geometry(st);
    let what = if st.nbd.is_some() { "depth" } else { "threads" };
    let mut s = format!(
        "dev id {}: frontend {} {what} {threads} block size {bs} dev_capacity {}\n",
        st.id,
        st.frontend,
        size / 512
    );
    s += &format!(
        "\tmax rq size {max_rq} daemon pid {} flags 0x0 state {}\n",
        st.pid,
        saved_state_name(st)
    );
    s += &target_lines(&st.target);
    s += &name_line(st);
    s += &format!("\tfrontend {} block {}", st.frontend, st.block_device);
    if let Some(f) = &st.fuse {
        if f.loop_device.is_some() {
            s += &format!(" file {}", f.file.display());
        }
    }
    s += "\n";
    if let Some(n) = &st.nbd {
        for (l, u) in n.listen.iter().zip(&n.uris) {
            s += &format!("\tlisten {l} uri {u}\n");
        }
    }
    s
}

fn saved_json(st: &DeviceState) -> serde_json::Value {
    let f = st.fuse.as_ref();
    let (threads, size, bs, max_rq) = saved_geometry(st);
    json!({
        "id": st.id,
        "name": st.name,
        "state": saved_state_name(st),
        "pid": st.pid,
        "frontend": st.frontend,
        "block_device": st.block_device,
        "file": f.map(|f| &f.file),
        "mountpoint": f.map(|f| &f.mountpoint),
        "loop_device": f.and_then(|f| f.loop_device.as_ref()),
        "threads": f.map(|_| threads),
        "queue_depth": st.nbd.as_ref().map(|_| threads),
        "listen": st.nbd.as_ref().map(|n| &n.listen),
        "uris": st.nbd.as_ref().map(|n| &n.uris),
        "export_name": st.nbd.as_ref().map(|n| &n.export_name),
        "block_size": bs,
        "size": size,
        "dev_sectors": size / 512,
        "max_io_buf_bytes": max_rq,
        "target": st.target,
        "filters": userblk::filters::described_filters(&st.target),
        "log": st.log,
    })
}

/// How a ublk device with `flags` (as the kernel granted them) moves
/// request data: in the kernel's own pages, or copied.
fn data_mode(flags: u64) -> &'static str {
    if flags & UBLK_F_AUTO_BUF_REG != 0 {
        "zero copy"
    } else if flags & UBLK_F_USER_COPY != 0 {
        "user copy"
    } else {
        "copied"
    }
}

impl UblkEntry {
    fn block_size(&self) -> u32 {
        self.params
            .map_or(512, |p| 1u32 << p.basic.logical_bs_shift)
    }

    fn sectors(&self) -> u64 {
        self.params.map_or(0, |p| p.basic.dev_sectors)
    }

    /// The text form.
    pub fn text(&self) -> String {
        let i = &self.info;
        let mut s = format!(
            "dev id {}: nr_hw_queues {} queue_depth {} block size {} dev_capacity {}\n",
            i.dev_id,
            i.nr_hw_queues,
            i.queue_depth,
            self.block_size(),
            self.sectors()
        );
        s += &format!(
            "\tmax rq size {} daemon pid {} flags {:#x} state {}\n",
            i.max_io_buf_bytes,
            i.ublksrv_pid,
            i.flags,
            state_name(i.state)
        );
        s += &format!("\tdata {}\n", data_mode(i.flags));
        s += &format!("\tio mode {}\n", IoMode::of(i.flags).name());
        if let Some(st) = &self.state {
            for (q, tid) in st.queue_tids.iter().enumerate() {
                let cpus = st
                    .queue_cpus
                    .get(q)
                    .map(|c| c.iter().map(|c| format!("{c} ")).collect::<String>());
                s += &format!(
                    "\tqueue {q}: tid {tid} affinity({})\n",
                    cpus.unwrap_or_default()
                );
            }
            s += &target_lines(&st.target);
            s += &name_line(st);
            s += &format!("\tfrontend {} block {}\n", st.frontend, st.block_device);
        } else {
            s += &format!("\tblock {}\n", block_path(i.dev_id).display());
        }
        s
    }

    /// The JSON form.
    pub fn json(&self) -> serde_json::Value {
        let i = &self.info;
        json!({
            "id": i.dev_id,
            "name": self.state.as_ref().and_then(|s| s.name.clone()),
            "state": state_name(i.state),
            "pid": i.ublksrv_pid,
            "nr_hw_queues": i.nr_hw_queues,
            "queue_depth": i.queue_depth,
            "max_io_buf_bytes": i.max_io_buf_bytes,
            "flags": i.flags,
            "flag_names": Features(i.flags).names(),
            "data": data_mode(i.flags),
            "zero_copy": i.flags & UBLK_F_AUTO_BUF_REG != 0,
            "io_mode": IoMode::of(i.flags).name(),
            "block_size": self.block_size(),
            "dev_sectors": self.sectors(),
            "size": self.sectors() * 512,
            "char_device": char_path(i.dev_id),
            "block_device": block_path(i.dev_id),
            "owner_uid": i.owner_uid,
            "owner_gid": i.owner_gid,
            "frontend": self.state.as_ref().map_or("ublk", |s| s.frontend.as_str()),
            "target": self.state.as_ref().map(|s| s.target.clone()),
            "filters": self.state.as_ref().map(|s| userblk::filters::described_filters(&s.target)),
            "queue_tids": self.state.as_ref().map(|s| s.queue_tids.clone()),
            "log": self.state.as_ref().and_then(|s| s.log.clone()),
        })
    }
}

/// The caller's devices: ublk ones from the kernel (when it has ublk and
/// lets us ask), and every one with saved state (FUSE devices have no other record).
pub struct Devices {
    /// The control device, if ublk is usable.
    pub ctrl: Option<Control>,
    /// Ids the kernel knows as ublk devices.
    pub kernel_ids: Vec<u32>,
    /// Those and the ids with saved state, sorted, once each.
    pub ids: Vec<u32>,
}

impl Devices {
    /// Look both up.
    pub fn find() -> anyhow::Result<Self> {
        // Without ublk (or access to it) there may still be FUSE devices.
        let ctrl = match Control::open() {
            Ok(c) => Some(c),
            Err(userblk::Error::NoUblk | userblk::Error::NoControlAccess) => None,
            Err(e) => return Err(e.into()),
        };
        let kernel_ids = if ctrl.is_some() {
            device_ids()
        } else {
            Vec::new()
        };
        let mut ids = kernel_ids.clone();
        ids.extend(DeviceState::ids());
        ids.sort_unstable();
        ids.dedup();
        Ok(Devices {
            ctrl,
            kernel_ids,
            ids,
        })
    }
}

/// `userblk list`.
pub fn run(args: &ListArgs) -> anyhow::Result<()> {
    let Devices {
        mut ctrl,
        kernel_ids,
        mut ids,
    } = Devices::find()?;
    let only = crate::names::resolve(args.id, args.name.as_deref())?;
    if let Some(id) = only {
        ids.retain(|&i| i == id);
        if ids.is_empty() {
            anyhow::bail!("no device with id {id}");
        }
    }
    let mut entries = Vec::new();
    let mut hidden = 0;
    for id in ids {
        if !kernel_ids.contains(&id) {
            match DeviceState::load(id) {
                // A ublk device's state outlives it only while it waits for recovery.
                Ok(Some(st)) if st.frontend != "ublk" => entries.push(Entry::Saved(Box::new(st))),
                Ok(_) => {}
                Err(e) => tracing::warn!("{e}"),
            }
            continue;
        }
        let Some(ctrl) = ctrl.as_mut() else { continue };
        match entry(ctrl, id) {
            Ok(e) => entries.push(e),
            // A device deleted between listing and asking is simply gone.
            Err(userblk::Error::NoSuchDevice(_)) if only.is_none() => {}
            // Someone else's device: not ours to show.
            Err(userblk::Error::DeviceAccess { .. }) if only.is_none() => hidden += 1,
            Err(e @ userblk::Error::DeviceAccess { .. }) => return Err(e.into()),
            Err(e) => return Err(e).with_context(|| format!("device {id}")),
        }
    }
    if hidden > 0 {
        eprintln!("userblk: {hidden} device(s) of other users not shown");
    }
    if args.json {
        let all: Vec<_> = entries.iter().map(Entry::json).collect();
        crate::out::outln!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        for e in &entries {
            crate::out::fmt(format_args!("{}", e.text()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_mode_follows_the_granted_flags() {
        assert_eq!(data_mode(0), "copied");
        assert_eq!(data_mode(UBLK_F_USER_COPY), "user copy");
        assert_eq!(data_mode(UBLK_F_AUTO_BUF_REG | 1), "zero copy");
    }
}
