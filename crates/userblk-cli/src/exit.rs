//! The exit statuses of `userblk`, for supervisors and scripts that must
//! tell a refusal worth retrying from one that is not. Documented in
//! docs/cli.md ("Exit status") and every man page.

/// A usage error: a bad option or value (clap's own status too).
pub const USAGE: u8 = 2;
/// The device is in use (mounted, or open by a process): `del` refused to
/// take it away, or an rbd image is locked by another client. Retry once it
/// is released, or use `--force` (`--break-lock`).
pub const IN_USE: u8 = 3;
/// This host lacks what the command needs: the ublk driver, access to
/// `/dev/ublk-control`, FUSE, fusermount3, loop devices or librbd. Retrying
/// cannot help until the host is set up.
pub const UNSUPPORTED: u8 = 4;
/// Any other failure.
pub const FAILURE: u8 = 1;

/// An error that carries its exit status: the device in use, or a daemon's
/// failure passed on by the `add` that waited for it.
#[derive(Debug)]
pub struct Coded {
    pub status: u8,
    pub msg: String,
}

impl std::fmt::Display for Coded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Coded {}

/// `msg`, exiting with [`IN_USE`].
pub fn in_use(msg: String) -> anyhow::Error {
    anyhow::Error::new(Coded {
        status: IN_USE,
        msg,
    })
}

/// `msg`, exiting with `status` where that is one of ours (else [`FAILURE`]).
pub fn with_status(status: Option<i32>, msg: String) -> anyhow::Error {
    let status = match status.and_then(|s| u8::try_from(s).ok()) {
        Some(s @ (IN_USE | UNSUPPORTED)) => s,
        _ => FAILURE,
    };
    anyhow::Error::new(Coded { status, msg })
}

/// The exit status for `e`: the first cause that decides one, else [`FAILURE`].
pub fn status_of(e: &anyhow::Error) -> u8 {
    use userblk::Error as E;
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<Coded>() {
            return c.status;
        }
        match cause.downcast_ref::<E>() {
            Some(E::Held { .. } | E::LoopBusy { .. }) => return IN_USE,
            Some(E::NoUblk | E::NoControlAccess | E::NoFuse | E::NoFusermount | E::NoLoop) => {
                return UNSUPPORTED
            }
            _ => {}
        }
        if let Some(userblk::spec::OpenError::Rbd { err }) = cause.downcast_ref() {
            match err {
                userblk_rbd::RbdError::Locked { .. } => return IN_USE,
                userblk_rbd::RbdError::NotInstalled { .. } => return UNSUPPORTED,
                _ => {}
            }
        }
    }
    FAILURE
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn causes_decide_the_status() {
        let plain = anyhow::anyhow!("no device with id 4");
        assert_eq!(status_of(&plain), FAILURE);
        let no_ublk: anyhow::Result<()> = Err(userblk::Error::NoUblk.into());
        let wrapped = no_ublk.context("adding a device").unwrap_err();
        assert_eq!(status_of(&wrapped), UNSUPPORTED);
        assert_eq!(status_of(&in_use("device 3: mounted".into())), IN_USE);
        let e = in_use("device 3: mounted".into());
        assert_eq!(e.to_string(), "device 3: mounted");
        // A daemon's status passes on only where it means something.
        assert_eq!(status_of(&with_status(Some(4), "x".into())), UNSUPPORTED);
        assert_eq!(status_of(&with_status(Some(101), "x".into())), FAILURE);
        assert_eq!(status_of(&with_status(None, "x".into())), FAILURE);
        // An rbd image locked by another client is in use; no librbd is unsupported.
        let rbd = |err| anyhow::Error::new(userblk::spec::OpenError::Rbd { err });
        let locked = userblk_rbd::RbdError::Locked {
            image: "p/i".into(),
            owners: "client.1".into(),
        };
        assert_eq!(status_of(&rbd(locked)), IN_USE);
        let missing = userblk_rbd::RbdError::NotInstalled {
            lib: "librbd.so.1",
            package: "librbd1",
            detail: "x".into(),
        };
        assert_eq!(status_of(&rbd(missing)), UNSUPPORTED);
        assert_eq!(
            status_of(&rbd(userblk_rbd::RbdError::NotFound("x".into()))),
            FAILURE
        );
    }
}
