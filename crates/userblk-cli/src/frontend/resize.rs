//! `resize` inside the daemon: what each frontend offers on the control
//! socket ([`userblk::control::Registry::on_resize`]). The target is
//! resized first ([`userblk::resize::apply`], which refuses bad sizes and
//! unallowed shrinks before anything changes), then the frontend tells its
//! kernel; if that fails, the target goes back to its old size. The saved
//! state follows, so `list` shows the new size and `recover` reopens it.

use std::sync::{Arc, Mutex, PoisonError};

use userblk::state::DeviceState;
use userblk::Target;

/// What a frontend registers on the control socket.
pub type Handler = Box<dyn Fn(u64, bool) -> Result<String, String> + Send + Sync>;

/// A frontend's half of a resize: tell its kernel about the new size.
pub type Update = Box<dyn Fn(u64) -> anyhow::Result<()> + Send + Sync>;

/// The control socket's resize for device `id`: `target`, then `update`.
pub fn handler(
    id: u32,
    target: Arc<dyn Target>,
    update: Update,
) -> impl Fn(u64, bool) -> Result<String, String> + Send + Sync + 'static {
    // One resize at a time, whoever asks.
    let busy = Mutex::new(());
    move |size, allow_shrink| {
        let _one = busy.lock().unwrap_or_else(PoisonError::into_inner);
        let old = target.size();
        let new =
            userblk::resize::apply(&*target, size, allow_shrink).map_err(|e| e.to_string())?;
        if let Err(e) = update(new) {
            let back = userblk::resize::apply(&*target, old, true).map_or_else(
                |b| format!("; the target stays at {new} bytes ({b})"),
                |_| String::new(),
            );
            return Err(format!("{e:#}{back}"));
        }
        save_size(id, &*target, new);
        tracing::info!("device {id} resized from {old} to {new} bytes");
        Ok(format!("device {id}: {old} -> {new} bytes"))
    }
}

/// A resize the frontend cannot do: refused with `why`, nothing changed.
pub fn refuse(why: String) -> impl Fn(u64, bool) -> Result<String, String> + Send + Sync + 'static {
    move |_, _| Err(why.clone())
}

/// The ublk frontend's resize for device `id`, negotiated with `flags`:
/// UPDATE_SIZE after the target, where the device has it; refused before
/// anything changes where it does not.
pub fn ublk(id: u32, flags: u64, target: Arc<dyn Target>) -> Handler {
    use userblk_uapi::UBLK_F_UPDATE_SIZE;
    if flags & UBLK_F_UPDATE_SIZE == 0 {
        let offered = userblk::ublk::Control::open()
            .and_then(|mut c| c.features())
            .is_ok_and(|f| f & UBLK_F_UPDATE_SIZE != 0);
        let why = if offered {
            format!("ublk device {id} was added without UBLK_F_UPDATE_SIZE (by an older userblk); delete and add it again to resize it")
        } else {
            let release = rustix::system::uname();
            format!(
                "resizing a ublk device needs Linux 6.16 or later (UBLK_F_UPDATE_SIZE); this kernel is {}",
                release.release().to_string_lossy()
            )
        };
        return Box::new(refuse(why));
    }
    let update: Update = Box::new(move |size| {
        userblk::ublk::Control::open()?.update_size(id, size / 512)?;
        Ok(())
    });
    Box::new(handler(id, target, update))
}

/// Record the new size in the device's saved state: the target's
/// description, the frontend's size, and the `add` arguments a `recover`
/// runs again (for targets whose size is an argument).
fn save_size(id: u32, target: &dyn Target, size: u64) {
    let mut st = match DeviceState::load(id) {
        Ok(Some(st)) => st,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!("saving the new size: {e}");
            return;
        }
    };
    st.target = target.describe();
    let kind = st.target.get("type").and_then(|t| t.as_str()).unwrap_or("");
    if matches!(kind, "mem" | "null" | "s3" | "early") {
        set_size_arg(&mut st.args, size);
    }
    if let Some(f) = st.fuse.as_mut() {
        f.size = size;
    }
    if let Some(n) = st.nbd.as_mut() {
        n.size = size;
    }
    if let Err(e) = st.save() {
        tracing::warn!("saving the new size: {e}");
    }
}

/// Make the `--size` of the `add` arguments `args` say `size` (added
/// when none is given: null's default).
pub fn set_size_arg(args: &mut Vec<String>, size: u64) {
    let value = size.to_string();
    let mut i = 0;
    let mut found = false;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "-s" || a == "--size" {
            if let Some(v) = args.get_mut(i + 1) {
                v.clone_from(&value);
                found = true;
            }
            i += 1;
        } else if a.starts_with("--size=") {
            args[i] = format!("--size={value}");
            found = true;
        } else if a.starts_with("-s") && a[2..].starts_with(|c: char| c.is_ascii_digit()) {
            args[i] = format!("-s{value}");
            found = true;
        }
        i += 1;
    }
    if !found {
        args.extend(["--size".to_string(), value]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_argument_is_rewritten_or_added() {
        let v = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        for (before, after) in [
            ("add mem -s 1G", "add mem -s 4096"),
            (
                "add mem --size 1G --filter stats",
                "add mem --size 4096 --filter stats",
            ),
            ("add mem --size=1G", "add mem --size=4096"),
            ("add mem -s1G", "add mem -s4096"),
            ("add null", "add null --size 4096"),
        ] {
            let mut a = v(before);
            set_size_arg(&mut a, 4096);
            assert_eq!(a, v(after), "{before}");
        }
    }
}
