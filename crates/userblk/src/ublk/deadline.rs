//! How long each control command may take before it is given up.
//!
//! A command the kernel never answers must not hang `add`, `del` or a
//! daemon: [`Control`](super::Control) issues every command to an io-wq
//! worker (`IOSQE_ASYNC`), waits for it at most its deadline, then cancels
//! it (`IORING_OP_ASYNC_CANCEL`, which interrupts the worker's
//! interruptible waits: START_DEV's, END_USER_RECOVERY's and DEL_DEV's)
//! and reports [`Error::NoAnswer`] naming the step, the device and the
//! kernel. The values are far above what a healthy kernel needs, even the
//! test VM's emulated one (~50x slower than hardware): reaching one means
//! something is stuck, not slow.

use std::time::Duration;

use crate::Error;

/// Commands answered at once from the device's state (ADD_DEV,
/// SET_PARAMS, GET_*, START_USER_RECOVERY, UPDATE_SIZE, DEL_DEV_ASYNC).
/// Some take the device's lock, which a STOP_DEV in progress may hold for
/// a while; under a second even in the test VM with hundreds of devices.
pub const ANSWER: Duration = Duration::from_secs(15);

/// START_DEV and END_USER_RECOVERY: sent once every queue has fetched its
/// tags, they add the disk and read its partition table through our own
/// queues (a few requests). Reported by users of other servers as never
/// completing after many add/del cycles on some 6.17-7.0 kernels.
pub const START: Duration = Duration::from_secs(30);

/// STOP_DEV and TRY_STOP_DEV: the kernel first writes the disk's dirty
/// pages back through the target and waits for requests in flight, which
/// a slow remote target (s3, nbd) with a full page cache needs time for.
/// Its waits cannot be interrupted, so this bounds only our wait.
pub const STOP: Duration = Duration::from_secs(120);

/// How long a cancelled command has to end after the cancel. Without its
/// completion its buffer is leaked (the kernel may still write it).
pub const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// The deadline of control command `cmd` (its name, e.g. `START_DEV`),
/// where its caller does not give one (DEL_DEV and QUIESCE_DEV do).
pub fn of(cmd: &str) -> Duration {
    match cmd {
        "START_DEV" | "END_USER_RECOVERY" => START,
        "STOP_DEV" | "TRY_STOP_DEV" => STOP,
        _ => ANSWER,
    }
}

/// The running kernel's release (`uname -r`), for error messages.
pub fn kernel_release() -> String {
    rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned()
}

/// The error for `cmd` on device `dev` (`-` for none yet) that had no
/// answer within `waited` and was cancelled.
pub fn no_answer(cmd: &'static str, dev: String, waited: Duration) -> Error {
    let hint = match cmd {
        "DEL_DEV" => " (is something still holding its /dev/ublkcN open?)",
        _ => "",
    };
    Error::NoAnswer {
        cmd,
        dev,
        kernel: kernel_release(),
        waited,
        hint,
    }
}

/// The text of [`Error::NoAnswer`]: `device 3: START_DEV: no answer from
/// the kernel (6.12.107) within 30s`.
pub(crate) fn message(cmd: &str, dev: &str, kernel: &str, waited: Duration, hint: &str) -> String {
    let device = if dev == "-" {
        String::new()
    } else {
        format!("device {dev}: ")
    };
    format!(
        "{device}{cmd}: no answer from the kernel ({kernel}) within {}s{hint}",
        waited.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_has_a_deadline() {
        assert_eq!(of("START_DEV"), START);
        assert_eq!(of("END_USER_RECOVERY"), START);
        assert_eq!(of("STOP_DEV"), STOP);
        assert_eq!(of("GET_DEV_INFO2"), ANSWER);
        assert_eq!(of("ADD_DEV"), ANSWER);
        assert!(CANCEL_GRACE < ANSWER && ANSWER < START && START < STOP);
    }

    #[test]
    fn the_error_names_the_step_the_device_and_the_kernel() {
        let e = Error::NoAnswer {
            cmd: "START_DEV",
            dev: "3".into(),
            kernel: "7.3.4".into(),
            waited: Duration::from_secs(30),
            hint: "",
        };
        assert_eq!(
            e.to_string(),
            "device 3: START_DEV: no answer from the kernel (7.3.4) within 30s"
        );
        let e = no_answer("ADD_DEV", "-".into(), ANSWER);
        let text = e.to_string();
        assert!(
            text.starts_with("ADD_DEV: no answer from the kernel ("),
            "{text}"
        );
        assert!(text.contains(&kernel_release()), "{text}");
        let e = no_answer("DEL_DEV", "5".into(), Duration::from_secs(30));
        assert!(
            e.to_string().ends_with("holding its /dev/ublkcN open?)"),
            "{e}"
        );
    }
}
