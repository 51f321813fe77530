//! A custom target in a few dozen lines, served as a real ublk device.
//!
//! Every byte of the device reads as its offset's low byte; writes are kept
//! nowhere. Run as root on a kernel with `ublk_drv`:
//!
//! ```text
//! cargo run --example pattern -p userblk
//! # in another shell: hexdump -C -n 32 /dev/ublkb0 ; press Enter here to stop
//! ```
use std::sync::Arc;

use userblk::ublk::{Device, DeviceConfig};
use userblk::{Caps, Ctx, Op, Submit, Target};

struct Pattern {
    size: u64,
}

impl Target for Pattern {
    fn caps(&self) -> Caps {
        Caps::new(self.size)
    }

    fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        let req = *ctx.req();
        if req.op == Op::Read {
            for (i, b) in ctx.data_mut().iter_mut().enumerate() {
                *b = (req.offset + i as u64).to_le_bytes()[0];
            }
        }
        Submit::Done(Ok(ctx.done_bytes()))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let target = Arc::new(Pattern { size: 64 << 20 });
    let dev = Device::add(&DeviceConfig::default(), &target.caps())?;
    let stopper = dev.stopper();
    // Stop (and delete the device) when Enter is pressed, from a thread of its own.
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = stopper.stop();
    });
    dev.serve(target, |live| {
        println!(
            "serving /dev/ublkb{}; press Enter to stop",
            live.info.dev_id
        );
    })?;
    Ok(())
}
