//! Building a target from its command-line arguments.

use std::sync::Arc;

use anyhow::Context;
use userblk::targets::{FileOptions, FileTarget, MemTarget, NullTarget};
use userblk::Target;

use crate::cli::TargetArgs;

/// Open the target the arguments describe.
pub fn open(args: &TargetArgs) -> anyhow::Result<Arc<dyn Target>> {
    Ok(match args {
        TargetArgs::Null(a) => Arc::new(NullTarget::new(a.size)),
        TargetArgs::Mem(a) => Arc::new(MemTarget::new(a.size).context("mem target")?),
        TargetArgs::File(a) => Arc::new(
            FileTarget::open(FileOptions {
                path: std::path::absolute(&a.path).unwrap_or_else(|_| a.path.clone()),
                offset: a.offset,
                buffered: a.buffered,
                read_only: a.read_only,
            })
            .context("file target")?,
        ),
    })
}
