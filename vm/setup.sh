#!/usr/bin/env bash
# Prepare the host for vm/run.sh: install qemu and guest tools, fetch and
# unpack the Debian kernel, build the busybox initramfs.  Idempotent: on a
# warm machine it installs, downloads and rebuilds nothing.
# Needs root (apt-get, mknod for /dev/console in the initramfs).
set -euo pipefail

CACHE=${USERBLK_VM_CACHE:-/var/cache/userblk-vm}
# The kernel: pinned, unless USERBLK_VM_KVER names another.  Debian's
# security archive keeps only the newest 6.12 build, so once the pin is gone
# from apt the newest linux-image-6.12.*+deb12-amd64 is used instead (with a
# warning); that choice is remembered in $CACHE/kver, which run.sh reads.
PINNED_KVER=6.12.107+deb12-amd64
KVER=${USERBLK_VM_KVER:-$PINNED_KVER}
# USERBLK_VM_KSUITE: fetch the kernel from another Debian suite instead
# (trixie-backports: 7.x, for what 6.12 lacks, e.g. zero copy), the newest
# linux-image-*-amd64 there unless USERBLK_VM_KVER names one.  Give such a
# kernel its own USERBLK_VM_CACHE: the initramfs and kver are per cache.
KSUITE=${USERBLK_VM_KSUITE:-}
if [[ -z ${USERBLK_VM_KVER:-} && ! -s $CACHE/linux-image-$KVER.deb && -s $CACHE/kver ]]; then
    prev=$(<"$CACHE/kver")
    [[ -s $CACHE/linux-image-$prev.deb ]] && KVER=$prev
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "vm/setup.sh: error: $*" >&2; exit 1; }
# Any unexpected failure ends with one line naming the failing command.
trap 'die "line $LINENO: command failed: $BASH_COMMAND"' ERR

# The system's own Debian archive: the first URI of an apt source (one-line
# or deb822) that serves this release's own suite, so that the private apt
# configuration below goes through whatever mirror the machine uses.
# `vm/setup.sh --mirror` prints it and does nothing else.
debian_mirror() {
    local codename f
    # shellcheck source=/dev/null
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    [[ -n $codename ]] || return 1
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        # deb [options] URI SUITE COMPONENTS...
        sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" \
            | awk -v s="$codename" '$1 == "deb" && $3 == s { print $2; exit }'
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        # Stanzas of Field: value lines, separated by blank lines.
        awk -v s="$codename" '
            function done_stanza() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " s " ") && enabled != "no" && uris != "") {
                    split(uris, u, " "); print u[1]; found = 1; exit
                }
                types = uris = suites = enabled = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { done_stanza(); next }
            { key = tolower($1); sub(/^[^:]*:[ \t]*/, ""); v = $0 }
            key == "types:" { types = v } key == "uris:" { uris = v }
            key == "suites:" { suites = v } key == "enabled:" { enabled = tolower(v) }
            END { if (!found) done_stanza() }' "$f"
    done | head -n1 | grep .
}
if [[ ${1:-} == --mirror ]]; then
    debian_mirror || die "no apt source serves this release's own suite"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root"
export DEBIAN_FRONTEND=noninteractive

# Host packages.  Guest userspace IS the host root (shared over 9p), so the
# tools the guest test scripts use are installed here.
PKGS=(qemu-system-x86 busybox-static cpio kmod xz-utils gzip coreutils
      util-linux mount fio e2fsprogs xfsprogs procps psmisc python3 fuse3
      libnbd-bin python3-libnbd nbdkit nbd-client qemu-utils
      python3-prometheus-client)

installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]; }
# (output captured first: grep -q closing the pipe early trips pipefail)
has_candidate() { local p; p=$(apt-cache policy "$1" 2>/dev/null); [[ $p =~ Candidate:\ [^\(] ]]; }

missing=()
for p in "${PKGS[@]}"; do installed "$p" || missing+=("$p"); done

# qemu: machines of this project ship qemu-utils 10 from bookworm-backports,
# and Debian 12's qemu-system-x86 7.2 makes apt remove it.  So qemu comes
# from the suite of an installed qemu-utils, fetched through a private apt
# configuration (system sources + backports; /etc/apt is left alone).
# apt is never allowed to remove anything (--no-remove).
qemu_bpo=0
if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]] && installed qemu-utils \
        && [[ $(dpkg-query -W -f='${Version}' qemu-utils) == *bpo* ]]; then
    qemu_bpo=1
    missing=("${missing[@]/qemu-system-x86}")
    read -r -a missing <<<"${missing[*]}"
fi

# Refresh package lists only when something we need is not known to apt:
# the kernel (unless already cached) or a package still to install.
need_update=0
if [[ -z $KSUITE && ! -s $CACHE/linux-image-$KVER.deb ]]; then
    has_candidate "linux-image-$KVER" || need_update=1
fi
for p in "${missing[@]}"; do has_candidate "$p" || need_update=1; done
if (( need_update )); then
    echo "vm/setup.sh: apt-get update"
    apt-get update -q </dev/null >/dev/null || die "apt-get update failed"
fi

if (( ${#missing[@]} )); then
    echo "vm/setup.sh: installing ${missing[*]}"
    apt-get install -y -q --no-install-recommends --no-remove "${missing[@]}" </dev/null \
        || die "apt-get install ${missing[*]} failed"
fi

# A private apt configuration: the system's sources plus suite $1 of the
# system's own Debian archive, with its own lists and archives, so /etc/apt
# is left alone.  Sets apt_dir (remove it when done) and apt_opts.
private_apt() {
    local mirror
    mirror=$(debian_mirror) || die "no apt source serves this release's own suite: cannot add $1"
    apt_dir=$(mktemp -d)
    mkdir -p "$apt_dir/parts" "$apt_dir/lists/partial" "$apt_dir/archives/partial"
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] && cp "$f" "$apt_dir/parts/"
    done
    [[ -f $apt_dir/parts/sources.list ]] && mv "$apt_dir/parts/sources.list" "$apt_dir/parts/system.list"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $1 main" \
        >"$apt_dir/parts/extra.list"
    apt_opts=(-o "Dir::Etc::sourcelist=/dev/null" -o "Dir::Etc::sourceparts=$apt_dir/parts"
              -o "Dir::State::lists=$apt_dir/lists" -o "Dir::Cache::archives=$apt_dir/archives"
              -o APT::Sandbox::User=root)
    apt-get "${apt_opts[@]}" update -q </dev/null >/dev/null || { rm -rf "$apt_dir"; die "apt-get update (with $1) failed"; }
}

if (( qemu_bpo )); then
    # shellcheck source=/dev/null
    suite=$(. /etc/os-release && echo "${VERSION_CODENAME:?}")-backports
    echo "vm/setup.sh: installing qemu-system-x86 from $suite (matches installed qemu-utils)"
    private_apt "$suite"
    apt-get "${apt_opts[@]}" install -y -q --no-install-recommends --no-remove -t "$suite" \
        qemu-system-x86 </dev/null || { rm -rf "$apt_dir"; die "apt-get install qemu-system-x86 from $suite failed"; }
    rm -rf "$apt_dir"
fi

mkdir -p "$CACHE"

# Kernel package: download once, keep under a fixed name.
DEB=$CACHE/linux-image-$KVER.deb
if [[ -z $KSUITE && ! -s $DEB ]] && ! has_candidate "linux-image-$KVER" && [[ -z ${USERBLK_VM_KVER:-} ]]; then
    alt=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64$' \
          | sed -n 's/^linux-image-\([^ ]*\) .*/\1/p' | sort -V | tail -n1)
    if [[ -n $alt ]]; then
        echo "vm/setup.sh: warning: linux-image-$KVER is no longer in apt; using linux-image-$alt" >&2
        KVER=$alt
        DEB=$CACHE/linux-image-$KVER.deb
    fi
fi
if [[ ! -s $DEB ]]; then
    apt_opts=() apt_dir=
    if [[ -n $KSUITE ]]; then
        private_apt "$KSUITE"
        if [[ -z ${USERBLK_VM_KVER:-} ]]; then
            KVER=$(apt-cache "${apt_opts[@]}" search --names-only '^linux-image-[0-9][0-9.]*\+[a-z0-9]*-amd64$' 2>/dev/null \
                   | sed -n 's/^linux-image-\([^ ]*\) .*/\1/p' | sort -V | tail -n1)
            [[ -n $KVER ]] || { rm -rf "$apt_dir"; die "$KSUITE has no linux-image-*-amd64"; }
            DEB=$CACHE/linux-image-$KVER.deb
            echo "vm/setup.sh: the newest kernel in $KSUITE: $KVER"
        fi
        p=$(apt-cache "${apt_opts[@]}" policy "linux-image-$KVER" 2>/dev/null)
        [[ $p =~ Candidate:\ [^\(] ]] || { rm -rf "$apt_dir"; die "$KSUITE has no linux-image-$KVER"; }
    else
        has_candidate "linux-image-$KVER" \
            || die "apt has no linux-image-$KVER (set USERBLK_VM_KVER to an available version)"
    fi
    dl=$(mktemp -d "$CACHE/dl.XXXXXX")
    # apt-get download writes to the cwd; _apt cannot write there, hence the
    # harmless 'unsandboxed' warning, which we filter out.
    fetch() { (cd "$dl" && { apt-get "${apt_opts[@]}" download -q "$@" </dev/null 2>&1 | grep -v 'unsandboxed' || true; }); }
    fetch "linux-image-$KVER"
    f=$(compgen -G "$dl/linux-image-${KVER}_*.deb" | head -n1 || true)
    [[ -n $f ]] || { rm -rf "$dl"; [[ -n $apt_dir ]] && rm -rf "$apt_dir"; die "apt-get download linux-image-$KVER failed"; }
    # Newer Debian kernels (trixie-backports 7.x) split the image into
    # linux-base (System.map, modules.builtin), linux-binary (vmlinuz) and
    # linux-modules packages it depends on.
    parts=$(dpkg-deb -f "$f" Depends | tr ',' '\n' | sed -n "s/^ *\(linux-\(base\|binary\|modules\)-$KVER\) .*/\1/p")
    for part in $parts; do
        fetch "$part"
        g=$(compgen -G "$dl/${part}_*.deb" | head -n1 || true)
        [[ -n $g ]] || { rm -rf "$dl"; [[ -n $apt_dir ]] && rm -rf "$apt_dir"; die "apt-get download $part failed"; }
        mv "$g" "$CACHE/${part%-"$KVER"}-$KVER.deb"
    done
    [[ -n $apt_dir ]] && rm -rf "$apt_dir"
    # The image last: its presence says the download is complete.
    mv "$f" "$DEB"
    rm -rf "$dl"
fi

# Unpacked kernel tree; also the modprobe root (-d) inside the guest.
# Modules are decompressed once here: the .deb ships .ko.xz, and kmod
# decompressing xz in a TCG guest costs about a second per big module
# (ext4, xfs) on every boot.  The marker's content is the tree's format, so
# a change to this step redoes it.
KDIR=$CACHE/linux-$KVER
MODDIR=$KDIR/lib/modules/$KVER
UNPACK_FMT="deb+xz-d+depmod v1"
if [[ $(cat "$KDIR/.userblk-unpacked" 2>/dev/null) != "$UNPACK_FMT" || $DEB -nt $KDIR/.userblk-unpacked ]]; then
    echo "vm/setup.sh: unpacking $DEB"
    rm -rf "$KDIR" "$KDIR.tmp"
    for d in "$CACHE"/linux-{base,binary,modules}-"$KVER".deb "$DEB"; do
        [[ -f $d ]] && dpkg-deb -x "$d" "$KDIR.tmp"
    done
    # Newer packages are usr-merged, with vmlinuz beside the modules: lay
    # the tree out as the older ones do (lib/modules, boot/vmlinuz-KVER).
    if [[ -d $KDIR.tmp/usr/lib/modules && ! -e $KDIR.tmp/lib/modules ]]; then
        mkdir -p "$KDIR.tmp/lib" "$KDIR.tmp/boot"
        mv "$KDIR.tmp/usr/lib/modules" "$KDIR.tmp/lib/modules"
        [[ -f $KDIR.tmp/lib/modules/$KVER/vmlinuz ]] \
            && mv "$KDIR.tmp/lib/modules/$KVER/vmlinuz" "$KDIR.tmp/boot/vmlinuz-$KVER"
    fi
    find "$KDIR.tmp/lib/modules" -name '*.ko.xz' -print0 | xargs -0 -r -P "$(nproc)" -n 64 xz -d
    find "$KDIR.tmp/lib/modules" -name '*.ko.zst' -print0 | xargs -0 -r -P "$(nproc)" -n 64 zstd -q -d --rm
    # The .deb ships no modules.dep (the postinst normally runs depmod).
    depmod -b "$KDIR.tmp" "$KVER"
    echo "$UNPACK_FMT" >"$KDIR.tmp/.userblk-unpacked"
    mv "$KDIR.tmp" "$KDIR"
fi
VMLINUZ=$KDIR/boot/vmlinuz-$KVER
[[ -f $VMLINUZ && -f $MODDIR/modules.dep ]] || die "unpacked kernel in $KDIR is incomplete"

# Modules the initramfs needs before it can reach the host: the 9p client
# over virtio (virtio and virtio_pci are built in) and overlayfs (for /tmp).
INITRD_MODS=(9pnet_virtio 9p overlay)

# Collect module $1 and its dependencies into ORDERED, dependencies first,
# each once.  Module names treat '-' and '_' alike.
declare -A seen=()
ORDERED=()
add_mod() {
    local line path d
    line=$(grep -E "(^|/)${1//[-_]/[-_]}\.ko(\.xz|\.zst|\.gz)?:" "$MODDIR/modules.dep" || true)
    [[ -n $line ]] || die "module $1 not in $MODDIR/modules.dep"
    path=${line%%:*}
    [[ -n ${seen[$path]:-} ]] && return 0
    seen[$path]=1
    for d in ${line#*:}; do
        d=${d##*/}
        add_mod "${d%%.ko*}"
    done
    ORDERED+=("$path")
}
for m in "${INITRD_MODS[@]}"; do add_mod "$m"; done

BUSYBOX=/bin/busybox
[[ -x $BUSYBOX ]] || die "$BUSYBOX missing (busybox-static)"

# Rebuild the initramfs only when one of its inputs changed.
INITRD=$CACHE/initramfs.cpio.gz
STAMP=$CACHE/initramfs.stamp
stamp=$( {
    echo "kver=$KVER kdir=$KDIR mods=${ORDERED[*]}"
    sha256sum "$HERE/guest/init" "$BUSYBOX" "$DEB"
} | sha256sum | cut -d' ' -f1)
if [[ ! -s $INITRD || ! -f $STAMP || $(cat "$STAMP") != "$stamp" ]]; then
    echo "vm/setup.sh: building $INITRD"
    root=$(mktemp -d "$CACHE/initramfs.XXXXXX")
    mkdir -p "$root"/{bin,sbin,dev,proc,sys,host,rw,etc,lib/modules}
    cp "$BUSYBOX" "$root/bin/busybox"
    # One symlink per applet, so /init and the modprobe helper find them.
    for a in $("$BUSYBOX" --list); do
        [[ $a == busybox || -e $root/bin/$a ]] || ln -s busybox "$root/bin/$a"
    done
    # The kernel opens /dev/console for /init before anything is mounted.
    mknod -m 600 "$root/dev/console" c 5 1
    # Decompressed copies: busybox insmod is not relied on to handle .ko.xz.
    : >"$root/lib/modules/load.order"
    for p in "${ORDERED[@]}"; do
        b=${p##*/}; b=${b%%.ko*}.ko
        case $p in
            *.xz) xz -dc "$MODDIR/$p" >"$root/lib/modules/$b" ;;
            *.zst) zstd -qdc "$MODDIR/$p" >"$root/lib/modules/$b" ;;
            *.gz) gzip -dc "$MODDIR/$p" >"$root/lib/modules/$b" ;;
            *) cp "$MODDIR/$p" "$root/lib/modules/$b" ;;
        esac
        echo "$b" >>"$root/lib/modules/load.order"
    done
    install -m 755 "$HERE/guest/init" "$root/init"
    # Facts /init needs: where the unpacked kernel is on the host share.
    printf 'KVER=%s\nKDIR=%s\n' "$KVER" "$KDIR" >"$root/etc/vm.conf"
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) \
        | gzip -9n >"$INITRD.tmp"
    mv "$INITRD.tmp" "$INITRD"
    echo "$stamp" >"$STAMP"
    rm -rf "$root"
fi

echo "$KVER" >"$CACHE/kver"

echo "vm/setup.sh: ready"
echo "  kernel:    $VMLINUZ"
echo "  modules:   $MODDIR (VM_KERNEL_DIR=$KDIR in the guest)"
names=("${ORDERED[@]##*/}")
echo "  initramfs: $INITRD (modules: ${names[*]%%.ko*})"
echo "  qemu:      $(command -v qemu-system-x86_64)"
