//! Write the seed corpus: `cargo run --example gen_seeds -- DIR` creates
//! `DIR/<target>/<seed>` for every target (scripts/fuzz.sh runs it when a
//! target's seed directory is missing).

use std::path::PathBuf;

use userblk_fuzz::seeds;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));
    let targets = [
        ("nbd_handshake", seeds::handshake()),
        ("nbd_request", seeds::request()),
        ("nbd_server", seeds::server()),
        ("nbd_client", seeds::client()),
    ];
    for (target, list) in targets {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        for (name, bytes) in list {
            std::fs::write(d.join(name), bytes)?;
        }
        println!("{}: seeds written", d.display());
    }
    Ok(())
}
