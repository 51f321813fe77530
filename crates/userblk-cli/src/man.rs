//! `userblk man`: manual pages (roff, section 8), one for `userblk` and one
//! for each command (`userblk-add.8`, `userblk-add-file.8`, ...), from the
//! clap definitions plus the sections clap knows nothing of: EXAMPLES,
//! EXIT STATUS, FILES and SEE ALSO.

use anyhow::{bail, Context};
use clap::CommandFactory;

use crate::cli::{Cli, ManArgs};
use crate::out::outln;

const SECTION: &str = "8";

/// `userblk man [PAGE]` prints one page; `userblk man --dir DIR` writes them all.
pub fn run(args: &ManArgs) -> anyhow::Result<()> {
    let pages = pages();
    if let Some(dir) = &args.dir {
        if !dir.is_dir() {
            bail!("{}: not a directory", dir.display());
        }
        for (name, cmd) in &pages {
            let file = dir.join(format!("{name}.{SECTION}"));
            std::fs::write(&file, render(name, cmd)?)
                .with_context(|| format!("writing {}", file.display()))?;
            outln!("{}", file.display());
        }
        return Ok(());
    }
    // `add`, `userblk-add` and `add-file` all name a page.
    let wanted = match args.page.as_deref() {
        None => "userblk".to_owned(),
        Some(p) if p.starts_with("userblk") => p.to_owned(),
        Some(p) => format!("userblk-{}", p.replace(' ', "-")),
    };
    match pages.iter().find(|(name, _)| *name == wanted) {
        Some((name, cmd)) => crate::out::bytes(&render(name, cmd)?),
        None => bail!(
            "no manual page '{wanted}'; there are: {}",
            pages
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
    Ok(())
}

/// Every page's name and command: `userblk`, then each visible command, depth first.
fn pages() -> Vec<(String, clap::Command)> {
    fn walk(cmd: &clap::Command, name: &str, out: &mut Vec<(String, clap::Command)>) {
        out.push((name.to_owned(), cmd.clone()));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, &format!("{name}-{}", sub.get_name()), out);
        }
    }
    let mut cmd = Cli::command().disable_help_subcommand(true);
    // Builds the subcommands too, with their usage as `userblk add ...`.
    cmd.build();
    let mut out = Vec::new();
    walk(&cmd, "userblk", &mut out);
    out
}

fn render(name: &str, cmd: &clap::Command) -> anyhow::Result<Vec<u8>> {
    let man = clap_mangen::Man::new(cmd.clone())
        .title(name)
        .section(SECTION)
        .source(concat!("userblk ", env!("CARGO_PKG_VERSION")))
        .manual("userblk");
    let mut buf = Vec::new();
    man.render(&mut buf)?;
    buf.extend_from_slice(extra(name).as_bytes());
    Ok(buf)
}

/// The sections clap does not write, in roff.
fn extra(name: &str) -> String {
    let mut s = String::new();
    let examples = examples(name);
    if !examples.is_empty() {
        s += ".SH EXAMPLES\n";
        for (what, cmd) in examples {
            s += &format!(".TP\n{}\n.nf\n{}\n.fi\n", escape(what), escape(cmd));
        }
    }
    s += ".SH \"EXIT STATUS\"\n\
         .TP\n0\nSuccess (for \\fBadd\\fR: the device is live).\n\
         .TP\n1\nFailure, said in one line on standard error.\n\
         .TP\n2\nA usage error: a bad option or value.\n\
         .TP\n3\nThe device is in use (mounted, or open by a process): \\fBdel\\fR refused it.\n\
         .TP\n4\nThis host lacks what the command needs: the ublk driver, access to \
         /dev/ublk\\-control, FUSE, fusermount3 or loop devices.\n";
    s += ".SH FILES\n\
         .TP\n/run/userblk/ID.json\nA device's saved state: its daemon, target and arguments \
         (a user's devices: $XDG_RUNTIME_DIR/userblk/ or /tmp/userblk\\-UID/; \
         USERBLK_STATE_DIR overrides).\n\
         .TP\n/run/userblk/pool.managed\nThe names of the devices \\fBuserblk apply\\fR manages.\n\
         .TP\n/run/userblk/ID.log\nThe log of a device's daemon.\n\
         .TP\n/run/userblk/ID.metrics\nA device's request counters, kept by its daemon \
         (read by \\fBuserblk metrics\\fR).\n\
         .TP\n/run/userblk/fuse\\-ID/disk\nA FUSE device's file, on its default mount point.\n\
         .TP\n/dev/ublk\\-control\nThe ublk driver's control device (modprobe ublk_drv).\n\
         .TP\n/dev/ublkbID, /dev/ublkcID\nA ublk device's block device and the daemon's character device.\n";
    let see = if name == "userblk" {
        "losetup(8), nbd\\-client(8), fusermount3(1)".to_owned()
    } else {
        "userblk(8)".to_owned()
    };
    s += &format!(".SH \"SEE ALSO\"\n{see}\n");
    s
}

/// Examples of page `name`: what each does, and the command.
fn examples(name: &str) -> &'static [(&'static str, &'static str)] {
    match name {
        "userblk" | "userblk-add" => &[
            (
                "A 1 GiB RAM disk; its path alone, for a script",
                "dev=$(sudo userblk add --show mem --size 1G)",
            ),
            (
                "A file as a device, with a stats filter",
                "sudo userblk add file -f /var/tmp/disk.img --filter stats",
            ),
            (
                "A qcow2 image through FUSE and a loop device",
                "sudo userblk add --frontend fuse --loop qcow2 -f disk.qcow2",
            ),
            (
                "A RAM disk as an NBD export",
                "userblk add --listen unix:/tmp/ub.sock mem --size 1G",
            ),
            (
                "Show and delete devices",
                "userblk list\nsudo userblk del -n 0",
            ),
        ],
        "userblk-del" => &[
            ("Delete device 0", "sudo userblk del -n 0"),
            ("Delete every device", "sudo userblk del -a"),
            (
                "Stop device 0 even though it is mounted or open (plain del refuses and names the holder)",
                "sudo userblk del -n 0 --force",
            ),
        ],
        "userblk-features" => &[(
            "What this kernel's ublk flags let userblk do",
            "sudo userblk features",
        )],
        "userblk-list" => &[("Device 0, as JSON", "userblk list -n 0 --json")],
        "userblk-resize" => &[
            (
                "Grow device 0 to 20 GiB, then its mounted ext4",
                "sudo userblk resize -n 0 --size 20G\nsudo resize2fs /dev/ublkb0",
            ),
            (
                "Shrink a RAM disk (the data past 1 GiB is lost)",
                "sudo userblk resize -n 0 --size 1G --allow-shrink",
            ),
        ],
        "userblk-recover" => &[
            (
                "A new daemon for device 0, added with -r, whose daemon died",
                "sudo userblk recover -n 0",
            ),
            (
                "A device whose I/O fails at once while no daemon runs (Linux 6.13+)",
                "sudo userblk add --fail-io mem --size 1G",
            ),
        ],
        "userblk-upgrade" => &[
            (
                "A new daemon for device 0 (added with -r), of this binary",
                "sudo userblk upgrade -n 0",
            ),
            (
                "A new daemon of a newly installed binary",
                "sudo userblk upgrade -n 0 --binary /usr/local/bin/userblk",
            ),
        ],
        "userblk-create" | "userblk-create-qcow2" => &[(
            "A 10 GiB qcow2 image",
            "userblk create qcow2 -f disk.qcow2 --size 10G",
        )],
        "userblk-copy" => &[(
            "A raw image into a qcow2 one, skipping holes",
            "userblk copy disk.raw disk.qcow2",
        )],
        "userblk-snapshot" | "userblk-snapshot-create" => &[(
            "Snapshot a volume, also while a daemon serves it",
            "userblk snapshot create s3://disks/golden base",
        )],
        "userblk-snapshot-list" => &[("A volume's snapshots", "userblk snapshot list s3://disks/golden")],
        "userblk-snapshot-delete" => &[(
            "Delete a snapshot (gc frees its data later)",
            "userblk snapshot delete s3://disks/golden base",
        )],
        "userblk-clone" => &[(
            "A writable volume of a snapshot, no data copied",
            "userblk clone s3://disks/golden@base s3://disks/vm7\nsudo -E userblk add s3 --bucket disks --prefix vm7",
        )],
        "userblk-gc" => &[
            (
                "What gc would delete",
                "userblk gc s3://disks --dry-run",
            ),
            ("Delete it", "userblk gc s3://disks"),
        ],
        "userblk-metrics" => &[
            (
                "Every device's counters, once (node_exporter's textfile collector)",
                "userblk metrics --once > /var/lib/node_exporter/userblk.prom",
            ),
            (
                "Serve them to Prometheus",
                "userblk metrics --listen tcp:127.0.0.1:9477\ncurl -s http://127.0.0.1:9477/metrics",
            ),
        ],
        "userblk-apply" => &[
            (
                "Make the running devices match a pool file (docs/pool.md)",
                "sudo userblk apply /etc/userblk/pool.toml",
            ),
            (
                "What it would do, changing nothing",
                "sudo userblk apply --dry-run /etc/userblk/pool.toml",
            ),
        ],
        "userblk-man" => &[(
            "Install every page",
            "sudo userblk man --dir /usr/local/share/man/man8",
        )],
        _ => &[],
    }
}

/// Text as roff shows it: backslashes and hyphens escaped, no line starting with a control character.
fn escape(text: &str) -> String {
    text.lines()
        .map(|l| {
            let l = l.replace('\\', "\\e").replace('-', "\\-");
            if l.starts_with('.') || l.starts_with('\'') {
                format!("\\&{l}")
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}
