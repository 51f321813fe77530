//! Loop device tests; those that attach devices need root and /dev/loop-control.

use super::*;
use std::os::unix::fs::FileExt;
use userblk_uapi::loop_dev::LOOP_GET_STATUS64;

const MIB: u64 = 1 << 20;

/// Why the kernel-facing tests cannot run here, if they cannot.
fn skip_reason() -> Option<&'static str> {
    if !rustix::process::geteuid().is_root() {
        return Some("loop device tests need root");
    }
    if !Path::new(LOOP_CONTROL).exists() {
        return Some("no /dev/loop-control (modprobe loop)");
    }
    None
}

macro_rules! require_loop {
    () => {
        // CI runs as root on a kernel with the loop driver.
        let reason = skip_reason();
        let ci = crate::skip::Prereq::CiInstalls;
        if !crate::skip::require(reason.is_none(), ci, reason.unwrap_or_default()) {
            return;
        }
    };
}

/// A backing file on a real file system (tmpfs cannot do direct I/O).
fn backing(len: u64) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new()
        .prefix("userblk-loop-")
        .tempfile_in("/var/tmp")
        .expect("tempfile in /var/tmp");
    file.as_file().set_len(len).expect("set_len");
    file
}

fn sysfs(number: u32, attr: &str) -> String {
    let path = format!("/sys/block/loop{number}/{attr}");
    fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .to_owned()
}

fn status(dev: &LoopDevice) -> LoopInfo64 {
    // SAFETY: LOOP_GET_STATUS64 fills a `struct loop_info64`, which `LoopInfo64` reproduces.
    unsafe {
        ioctl(
            &dev.fd,
            rustix::ioctl::Getter::<{ LOOP_GET_STATUS64 as Opcode }, LoopInfo64>::new(),
        )
    }
    .expect("LOOP_GET_STATUS64")
}

/// A 4096-byte block at 4096-byte alignment, for O_DIRECT.
#[repr(C, align(4096))]
struct Block([u8; 4096]);

fn is_dio_capable_fs(path: &Path) -> bool {
    const EXT4: i128 = 0xEF53;
    const XFS: i128 = 0x5846_5342;
    const BTRFS: i128 = 0x9123_683E;
    let st = rustix::fs::statfs(path).expect("statfs");
    matches!(i128::from(st.f_type), EXT4 | XFS | BTRFS)
}

#[test]
fn attach_sets_size_block_size_dio_and_carries_data() {
    require_loop!();
    let file = backing(4 * MIB);
    let opts = LoopOptions {
        block_size: 4096,
        direct_io: true,
        read_only: false,
    };
    let dev = LoopDevice::attach(file.path(), &opts).expect("attach");
    let n = dev.number();
    assert_eq!(dev.path(), PathBuf::from(format!("/dev/loop{n}")));

    let real = fs::canonicalize(file.path()).expect("canonicalize");
    assert_eq!(backing_file(n), Some(real));
    let sectors: u64 = sysfs(n, "size").parse().expect("size");
    assert_eq!(sectors * 512, 4 * MIB);
    assert_eq!(sysfs(n, "queue/logical_block_size"), "4096");
    assert_eq!(sysfs(n, "ro"), "0");

    // What the kernel holds, read back through LOOP_GET_STATUS64 (checks LoopInfo64 too).
    let info = status(&dev);
    assert_eq!(info.lo_number, n);
    assert_ne!(info.lo_flags & LO_FLAGS_AUTOCLEAR, 0, "autoclear not set");
    assert_eq!(info.lo_flags & LO_FLAGS_READ_ONLY, 0);
    let meta = file.as_file().metadata().expect("metadata");
    assert_eq!(info.lo_inode, std::os::unix::fs::MetadataExt::ino(&meta));
    assert_eq!(info.lo_file_name, name_field(file.path()));

    let dio = dev.direct_io();
    assert_eq!(dio, info.lo_flags & LO_FLAGS_DIRECT_IO != 0);
    if is_dio_capable_fs(file.path()) {
        assert!(dio, "direct I/O refused on a file system that supports it");
    } else if !dio {
        eprintln!("note: direct I/O declined by the kernel for this backing file system");
    }

    // Device -> file, with O_DIRECT on the device.
    let direct = rustix::fs::open(
        dev.path(),
        OFlags::RDWR | OFlags::DIRECT | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .expect("open O_DIRECT");
    let mut block = Box::new(Block([0; 4096]));
    for (i, b) in block.0.iter_mut().enumerate() {
        *b = u8::try_from(i % 251).unwrap_or_default();
    }
    assert_eq!(rustix::io::pwrite(&direct, &block.0, 8192), Ok(4096));
    rustix::fs::fsync(&direct).expect("fsync");
    let mut from_file = vec![0; 4096];
    file.as_file()
        .read_exact_at(&mut from_file, 8192)
        .expect("read file");
    assert!(
        from_file == block.0,
        "data written to the device is not in the file"
    );

    // File -> device.
    file.as_file()
        .write_all_at(&[0xA5; 4096], 3 * MIB)
        .expect("write file");
    file.as_file().sync_all().expect("sync file");
    assert_eq!(rustix::io::pread(&direct, &mut block.0, 3 * MIB), Ok(4096));
    assert!(
        block.0 == [0xA5; 4096],
        "data written to the file is not on the device"
    );
    drop(direct);

    // Busy while someone holds it exclusively; detaching then is refused.
    assert!(!in_use(&dev.path()).expect("in_use"));
    let holder = rustix::fs::open(
        dev.path(),
        OFlags::RDONLY | OFlags::EXCL | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .expect("O_EXCL open");
    assert!(in_use(&dev.path()).expect("in_use"));
    let refused = dev.detach().expect_err("detach of a busy device");
    match &refused.error {
        Error::LoopBusy { path, mounts } => {
            assert_eq!(path, &PathBuf::from(format!("/dev/loop{n}")));
            assert!(mounts.is_empty(), "{mounts:?}");
        }
        other => panic!("expected LoopBusy, got {other}"),
    }
    assert!(refused.to_string().contains("is in use"), "{refused}");
    let dev = refused.device;
    assert!(
        backing_file(n).is_some(),
        "a refused detach unbound the device"
    );

    drop(holder);
    assert!(!in_use(&dev.path()).expect("in_use"));
    dev.detach().expect("detach");
    assert_eq!(backing_file(n), None);
}

#[test]
fn read_only_attach_refuses_writes() {
    require_loop!();
    let file = backing(MIB);
    file.as_file()
        .write_all_at(b"userblk", 0)
        .expect("write file");
    let opts = LoopOptions {
        block_size: 512,
        direct_io: false,
        read_only: true,
    };
    let dev = LoopDevice::attach(file.path(), &opts).expect("attach");
    let n = dev.number();
    assert_eq!(sysfs(n, "ro"), "1");
    assert_ne!(status(&dev).lo_flags & LO_FLAGS_READ_ONLY, 0);
    assert_eq!(sysfs(n, "queue/logical_block_size"), "512");

    let mut head = [0; 7];
    let reader = fs::File::open(dev.path()).expect("open for reading");
    reader.read_exact_at(&mut head, 0).expect("read");
    assert_eq!(&head, b"userblk");

    // Either the open for writing or the write itself must fail.
    let refused =
        match rustix::fs::open(dev.path(), OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty()) {
            Err(e) => e,
            Ok(w) => {
                rustix::io::pwrite(&w, &[0; 512], 0).expect_err("write to a read-only loop device")
            }
        };
    assert!(
        matches!(refused, Errno::PERM | Errno::ROFS | Errno::ACCESS),
        "unexpected error {refused}"
    );
    drop(reader);
    dev.detach().expect("detach");
    assert_eq!(backing_file(n), None);
}

#[test]
fn mounted_device_is_busy_and_names_its_mount_point() {
    require_loop!();
    let mkfs = Path::new("/usr/sbin/mkfs.ext4").exists() || Path::new("/sbin/mkfs.ext4").exists();
    let ci = crate::skip::Prereq::CiInstalls;
    if !crate::skip::require(mkfs, ci, "mkfs.ext4 not found (e2fsprogs)") {
        return;
    }
    let file = backing(16 * MIB);
    let opts = LoopOptions {
        block_size: 4096,
        direct_io: true,
        read_only: false,
    };
    let dev = LoopDevice::attach(file.path(), &opts).expect("attach");
    let made = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(dev.path())
        .status()
        .expect("run mkfs.ext4");
    assert!(made.success(), "mkfs.ext4 failed");

    /// Unmounts even if an assertion fails, so no mount is left behind.
    struct Mounted(PathBuf);
    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    rustix::mount::mount(
        dev.path(),
        dir.path(),
        "ext4",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .expect("mount");
    let mounted = Mounted(dir.path().to_path_buf());

    assert!(in_use(&dev.path()).expect("in_use"));
    assert_eq!(mount_points(&dev.path()), vec![dir.path().to_path_buf()]);
    let err = detach_path(&dev.path()).expect_err("detach_path of a mounted device");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("mounted at {}", dir.path().display())) && msg.contains("unmount"),
        "{msg}"
    );
    let refused = dev.detach().expect_err("detach of a mounted device");
    assert!(matches!(&refused.error, Error::LoopBusy { mounts, .. } if mounts.len() == 1));
    let dev = refused.device;

    drop(mounted);
    assert!(mount_points(&dev.path()).is_empty());
    let n = dev.number();
    dev.detach().expect("detach after unmount");
    assert_eq!(backing_file(n), None);
}

#[test]
fn pre_5_8_ioctls_configure_the_same_device() {
    require_loop!();
    let file = backing(4 * MIB);
    let opts = LoopOptions {
        block_size: 4096,
        direct_io: true,
        read_only: false,
    };
    let dev = LoopDevice::attach_with(file.path(), &opts, true).expect("legacy attach");
    let n = dev.number();
    let sectors: u64 = sysfs(n, "size").parse().expect("size");
    assert_eq!(sectors * 512, 4 * MIB);
    assert_eq!(sysfs(n, "queue/logical_block_size"), "4096");
    let info = status(&dev);
    assert_ne!(info.lo_flags & LO_FLAGS_AUTOCLEAR, 0, "autoclear not set");
    assert_eq!(info.lo_file_name, name_field(file.path()));
    if is_dio_capable_fs(file.path()) {
        assert!(dev.direct_io(), "LOOP_SET_DIRECT_IO did not take");
    }
    dev.detach().expect("detach");
    assert_eq!(backing_file(n), None);
}

#[test]
fn concurrent_attaches_get_distinct_devices() {
    require_loop!();
    const THREADS: usize = 8;
    let files: Vec<_> = (0..THREADS).map(|_| backing(MIB)).collect();
    let start = std::sync::Barrier::new(THREADS);
    let opts = LoopOptions {
        block_size: 512,
        direct_io: false,
        read_only: false,
    };
    let devices: Vec<LoopDevice> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .map(|f| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    LoopDevice::attach(f.path(), &opts)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread").expect("attach under contention"))
            .collect()
    });
    let mut numbers: Vec<u32> = devices.iter().map(LoopDevice::number).collect();
    for (dev, file) in devices.iter().zip(&files) {
        let real = fs::canonicalize(file.path()).expect("canonicalize");
        assert_eq!(backing_file(dev.number()), Some(real));
    }
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(numbers.len(), THREADS);
    for dev in devices {
        dev.detach().expect("detach");
    }
}

#[test]
fn dropping_detaches_through_autoclear_and_detach_path_accepts_unbound() {
    require_loop!();
    let file = backing(MIB);
    let opts = LoopOptions {
        block_size: 0,
        direct_io: false,
        read_only: false,
    };
    let dev = LoopDevice::attach(file.path(), &opts).expect("attach");
    let (n, path) = (dev.number(), dev.path());
    assert_eq!(sysfs(n, "queue/logical_block_size"), "512");
    drop(dev);
    wait_unbound(n);
    assert_eq!(
        backing_file(n),
        None,
        "autoclear did not detach at the last close"
    );
    detach_path(&path).expect("detach_path of an unbound device");
}

#[test]
fn detach_path_rejects_what_is_not_a_loop_device() {
    require_loop!();
    let file = backing(MIB);
    let err = detach_path(file.path()).expect_err("a regular file");
    assert!(err.to_string().contains("not a block device"), "{err}");
    let missing = detach_path(Path::new("/dev/loop-does-not-exist")).expect_err("missing");
    assert!(matches!(missing, Error::Path { .. }), "{missing}");
}

#[test]
fn attach_rejects_bad_block_sizes_and_non_files() {
    for bad in [1, 256, 1000, 3072, 1 << 17] {
        assert!(check_block_size(bad).is_err(), "{bad}");
    }
    for good in [0, 512, 1024, 4096, 65536] {
        assert!(check_block_size(good).is_ok(), "{good}");
    }
    let opts = LoopOptions {
        block_size: 1000,
        direct_io: false,
        read_only: false,
    };
    let err = LoopDevice::attach(Path::new("/nonexistent"), &opts).expect_err("bad size");
    assert!(err.to_string().contains("block size 1000"), "{err}");
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = LoopOptions {
        block_size: 512,
        read_only: true,
        ..opts
    };
    let err = LoopDevice::attach(dir.path(), &opts).expect_err("a directory");
    assert!(err.to_string().contains("regular file"), "{err}");
}

#[test]
fn flags_follow_options() {
    let mut opts = LoopOptions {
        block_size: 4096,
        direct_io: false,
        read_only: false,
    };
    assert_eq!(lo_flags(&opts), LO_FLAGS_AUTOCLEAR);
    opts.direct_io = true;
    assert_eq!(lo_flags(&opts), LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO);
    opts.read_only = true;
    assert_eq!(
        lo_flags(&opts),
        LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO | LO_FLAGS_READ_ONLY
    );
}

#[test]
fn file_name_is_cut_to_63_bytes_on_a_character_boundary() {
    let short = name_field(Path::new("/mnt/fuse/disk.img"));
    assert_eq!(&short[..18], b"/mnt/fuse/disk.img");
    assert!(short[18..].iter().all(|&b| b == 0));

    let long = format!("/{}", "a".repeat(100));
    let field = name_field(Path::new(&long));
    assert_eq!(&field[..63], &long.as_bytes()[..63]);
    assert_eq!(field[63], 0);

    // 'é' is two bytes; one starting at byte 62 must not be split.
    let accented = format!("/{}é", "b".repeat(61));
    let field = name_field(Path::new(&accented));
    assert_eq!(&field[..62], &accented.as_bytes()[..62]);
    assert!(field[62..].iter().all(|&b| b == 0));

    // Not UTF-8: plain byte truncation.
    let raw = OsStr::from_bytes(&[0xFF; 80]);
    let field = name_field(Path::new(raw));
    assert!(field[..63].iter().all(|&b| b == 0xFF));
    assert_eq!(field[63], 0);
}

#[test]
fn mountinfo_is_parsed_and_unescaped() {
    let text = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
36 22 7:3 / /mnt/with\\040space rw,relatime shared:2 - ext4 /dev/loop3 rw
37 22 7:3 /sub /srv/back\\134slash rw - ext4 /dev/loop3 rw
38 22 7:30 / /mnt/other rw - ext4 /dev/loop30 rw
39 22 7:3 / /mnt/bad\\9escape rw - ext4 /dev/loop3 rw
";
    assert_eq!(
        parse_mount_points(text, 7, 3),
        vec![
            PathBuf::from("/mnt/with space"),
            PathBuf::from("/srv/back\\slash"),
            PathBuf::from("/mnt/bad\\9escape"),
        ]
    );
    assert!(parse_mount_points(text, 7, 4).is_empty());
    assert!(parse_mount_points("garbage\n\n1 2\n", 7, 3).is_empty());
    assert_eq!(unescape_octal("a\\011b\\012c"), OsString::from("a\tb\nc"));
    assert_eq!(unescape_octal("end\\04"), OsString::from("end\\04"));
}

#[test]
fn old_kernels_are_recognised() {
    assert!(kernel_before("5.4.0-150-generic", (5, 8)));
    assert!(kernel_before("4.19.0", (5, 8)));
    assert!(!kernel_before("5.8.0", (5, 8)));
    assert!(!kernel_before("6.18.44-fc-v669", (5, 8)));
    assert!(!kernel_before("10.0", (5, 8)));
    assert!(!kernel_before("weird", (5, 8)));
    assert!(!configure_unsupported(Errno::BUSY));
    assert!(configure_unsupported(Errno::NOTTY));
}

#[test]
fn busy_messages_say_what_to_do() {
    let unmounted = busy_message(&[]);
    assert!(
        unmounted.starts_with("/dev/loop3 is in use (held open exclusively"),
        "{unmounted}"
    );
    let mounted = busy_message(&[PathBuf::from("/mnt/x"), PathBuf::from("/mnt/y")]);
    assert_eq!(
        mounted,
        "/dev/loop3 is in use (mounted at /mnt/x, /mnt/y); unmount it first"
    );
    assert!(!mounted.contains('\n') && !unmounted.contains('\n'));
}

fn busy_message(mounts: &[PathBuf]) -> String {
    Error::LoopBusy {
        path: PathBuf::from("/dev/loop3"),
        mounts: mounts.to_vec(),
    }
    .to_string()
}
