//! `list`: the kernel's view of each device, with the target from saved state.
//!
//! The first two lines of each device keep the layout existing ublk tooling
//! parses: the pid is the 7th word and the state the 11th of the second line.

use anyhow::Context;
use serde_json::json;
use userblk::ublk::ctrl::{device_ids, state_name};
use userblk::ublk::device::{block_path, char_path};
use userblk::ublk::{Control, DevInfo, DeviceState, Features};
use userblk_uapi::UblkParams;

use crate::cli::ListArgs;

/// One device as `list` shows it.
pub struct Entry {
    info: DevInfo,
    params: Option<UblkParams>,
    state: Option<DeviceState>,
}

/// Gather what the kernel and the state directory know about device `id`.
pub fn entry(ctrl: &mut Control, id: u32) -> userblk::Result<Entry> {
    let info = ctrl.dev_info(id)?;
    let params = ctrl.params(id).ok();
    let state = DeviceState::load(id).unwrap_or_else(|e| {
        tracing::warn!("{e}");
        None
    });
    Ok(Entry {
        info,
        params,
        state,
    })
}

impl Entry {
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
            s += &format!("\ttarget {}\n", st.target);
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
            "state": state_name(i.state),
            "pid": i.ublksrv_pid,
            "nr_hw_queues": i.nr_hw_queues,
            "queue_depth": i.queue_depth,
            "max_io_buf_bytes": i.max_io_buf_bytes,
            "flags": i.flags,
            "flag_names": Features(i.flags).names(),
            "block_size": self.block_size(),
            "dev_sectors": self.sectors(),
            "size": self.sectors() * 512,
            "char_device": char_path(i.dev_id),
            "block_device": block_path(i.dev_id),
            "owner_uid": i.owner_uid,
            "owner_gid": i.owner_gid,
            "frontend": self.state.as_ref().map_or("ublk", |s| s.frontend.as_str()),
            "target": self.state.as_ref().map(|s| s.target.clone()),
            "queue_tids": self.state.as_ref().map(|s| s.queue_tids.clone()),
            "log": self.state.as_ref().and_then(|s| s.log.clone()),
        })
    }
}

/// `userblk list`.
pub fn run(args: &ListArgs) -> anyhow::Result<()> {
    let mut ctrl = Control::open()?;
    let ids = match args.id {
        Some(id) => vec![id],
        None => device_ids(),
    };
    let mut entries = Vec::new();
    let mut hidden = 0;
    for id in ids {
        match entry(&mut ctrl, id) {
            Ok(e) => entries.push(e),
            // A device deleted between listing and asking is simply gone.
            Err(userblk::Error::NoSuchDevice(_)) if args.id.is_none() => {}
            // Someone else's device: not ours to show.
            Err(userblk::Error::DeviceAccess { .. }) if args.id.is_none() => hidden += 1,
            Err(e @ userblk::Error::DeviceAccess { .. }) => return Err(e.into()),
            Err(e) => return Err(e).with_context(|| format!("device {id}")),
        }
    }
    if hidden > 0 {
        eprintln!("userblk: {hidden} device(s) of other users not shown");
    }
    if args.json {
        let all: Vec<_> = entries.iter().map(Entry::json).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        for e in &entries {
            print!("{}", e.text());
        }
    }
    Ok(())
}
