#!/usr/bin/env bash
# Run a bash script inside a qemu (TCG) VM booted with the Debian kernel
# prepared by vm/setup.sh; exit with the script's exit status.
#
#   vm/run.sh [--mem SIZE] [--smp N] [--timeout SECS] [--out DIR] [--] SCRIPT [ARGS...]
#
# The guest sees the host root read-only, in the same cwd as this call;
# --out DIR is shared writable at the same absolute path.
set -euo pipefail

CACHE=${USERBLK_VM_CACHE:-/var/cache/userblk-vm}
# The kernel version setup.sh prepared (see there).
KVER=${USERBLK_VM_KVER:-$(cat "$CACHE/kver" 2>/dev/null || echo 6.12.107+deb12-amd64)}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KDIR=$CACHE/linux-$KVER
VMLINUZ=$KDIR/boot/vmlinuz-$KVER
INITRD=$CACHE/initramfs.cpio.gz
# Host variables forwarded into the guest (names, space separated).
PASSENV=${USERBLK_VM_PASSENV:-CI RUST_BACKTRACE RUST_LOG}

die() { echo "vm/run.sh: error: $*" >&2; exit 1; }
usage() {
    echo "usage: vm/run.sh [--mem SIZE] [--smp N] [--timeout SECS] [--out DIR] [--] SCRIPT [ARGS...]" >&2
    exit 2
}

MEM=4G SMP=2 TIMEOUT=2400 OUT=
while (( $# )); do
    case $1 in
        --mem) (( $# >= 2 )) || usage; MEM=$2; shift 2 ;;
        --smp) (( $# >= 2 )) || usage; SMP=$2; shift 2 ;;
        --timeout) (( $# >= 2 )) || usage; TIMEOUT=$2; shift 2 ;;
        --out) (( $# >= 2 )) || usage; OUT=$2; shift 2 ;;
        --) shift; break ;;
        -h|--help) usage ;;
        -*) echo "vm/run.sh: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
(( $# >= 1 )) || usage
[[ $SMP =~ ^[1-9][0-9]*$ ]] || die "--smp wants a positive integer, not '$SMP'"
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "--timeout wants seconds, not '$TIMEOUT'"
[[ $MEM =~ ^[1-9][0-9]*[MGmg]?$ ]] || die "--mem wants e.g. 4G or 2048M, not '$MEM'"

[[ -f $VMLINUZ && -s $INITRD ]] || die "no kernel/initramfs in $CACHE: run vm/setup.sh (as root) first"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing: run vm/setup.sh first"

# The guest hides these host dirs behind its own mounts; /tmp, /var/tmp and
# /root stay visible (overlay), so only these are refused.
hidden() { [[ $1 =~ ^/(run|mnt|dev|proc|sys)(/|$) ]]; }
CWD=$(pwd -P)
hidden "$CWD" && die "cwd $CWD is not visible in the guest (/run, /mnt, /dev, /proc and /sys are the guest's own)"
SCRIPT=$1
[[ -f $SCRIPT ]] || die "script $SCRIPT not found"
abs=$(realpath "$SCRIPT")
hidden "$abs" && die "script $abs is not visible in the guest"

if [[ -n $OUT ]]; then
    mkdir -p "$OUT"
    OUT=$(realpath "$OUT")
    [[ $OUT != / ]] || die "--out / makes no sense"
    [[ $OUT =~ ^/(dev|proc|sys)(/|$) ]] && die "--out $OUT: not allowed under /dev, /proc or /sys"
    [[ $OUT != *$'\n'* ]] || die "--out path contains a newline"
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/userblk-vm.XXXXXX")
QPID=
# shellcheck disable=SC2317  # trap handlers
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT
# Ctrl-C / kill: take qemu down with us instead of leaving it running.
# shellcheck disable=SC2317
on_signal() { [[ -n $QPID ]] && kill -TERM "$QPID" 2>/dev/null; echo "vm/run.sh: interrupted" >&2; exit 130; }
trap on_signal INT TERM

# Per-run job, appended to the initramfs as a second (gzip'd) cpio archive;
# bash %q quoting keeps any cwd or argument intact.
mkdir "$TMP/job"
env_args=()
for v in $PASSENV; do
    [[ $v =~ ^[A-Za-z_][A-Za-z0-9_]*$ && -n ${!v+x} ]] && env_args+=("$v=${!v}")
done
{
    printf 'VM_CWD=%q\n' "$CWD"
    printf 'VM_ARGS=('; for a in "$@"; do printf ' %q' "$a"; done; printf ' )\n'
    printf 'VM_ENV=('; for a in "${env_args[@]}"; do printf ' %q' "$a"; done; printf ' )\n'
} >"$TMP/job/env"
cp "$HERE/guest/stage2.sh" "$TMP/job/stage2.sh"
[[ -n $OUT ]] && printf '%s\n' "$OUT" >"$TMP/job/out"
(cd "$TMP" && find job | cpio -o -H newc -R 0:0 --quiet | gzip -1) >"$TMP/job.cpio.gz"
cat "$INITRD" "$TMP/job.cpio.gz" >"$TMP/initrd"

# qemu option values escape ',' by doubling it.
# shellcheck disable=SC2054  # the commas belong to qemu options
qargs=(
    # q35: PCIe config space (no MMCONFIG warning on pc); -cpu max: crc32c,
    # AES, etc. as real CPUs have them.
    -machine q35 -accel tcg,thread=multi -cpu max -m "$MEM" -smp "$SMP"
    -nographic -no-reboot -nic none
    -kernel "$VMLINUZ" -initrd "$TMP/initrd"
    # loglevel=5: hides info/notice boot chatter, keeps warnings and oopses.
    # mitigations=off: they only cost time in a throwaway TCG guest.
    # edd=off: skip a BIOS probe.
    -append "console=ttyS0 panic=-1 loglevel=5 mitigations=off edd=off"
    -virtfs "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap"
)
# qboot: a minimal firmware that boots -kernel straight away (SeaBIOS also
# works, but is slower and prints terminal escapes).
[[ -f /usr/share/qemu/qboot.rom ]] && qargs+=(-bios qboot.rom)
[[ -n $OUT ]] && qargs+=(-virtfs "local,path=${OUT//,/,,},mount_tag=out,security_model=none,multidevs=remap")

LOG=${USERBLK_VM_LOG:-$TMP/console.log}
echo "vm/run.sh: booting $KVER (TCG, mem $MEM, smp $SMP, timeout ${TIMEOUT}s): $*" >&2
start=$SECONDS
# Console to our stdout as it comes (CI shows progress), \r stripped, and
# to $LOG for the exit marker (tee -p: a closed stdout does not stop the
# log).  qemu's stdin is /dev/null: the guest gets
# no input and qemu leaves the terminal alone.
exec {logfd}> >(sed -u 's/\r//g' | tee -p "$LOG")
LOGPID=$!
timeout -k 15 "$TIMEOUT" qemu-system-x86_64 "${qargs[@]}" </dev/null >&"$logfd" 2>&1 &
QPID=$!
set +e
wait "$QPID"
qrc=$?
set -e
QPID=
exec {logfd}>&-
wait "$LOGPID" 2>/dev/null || true
secs=$(( SECONDS - start ))

marker=$(grep -a -E '^USERBLK-VM-EXIT=[0-9]+$' "$LOG" | tail -n1 || true)
if [[ -n $marker ]]; then
    rc=${marker#USERBLK-VM-EXIT=}
    echo "vm/run.sh: script exited with status $rc after ${secs}s" >&2
    exit "$rc"
fi
why=$(grep -a -m1 -E '^vm-init: error:|Kernel panic - not syncing' "$LOG" | sed 's/^\[ *[0-9.]*\] //' || true)
case $qrc in
    124|137) msg="timed out after ${TIMEOUT}s, qemu killed" ;;
    0) msg="VM stopped after ${secs}s" ;;
    *) msg="qemu failed (status $qrc) after ${secs}s" ;;
esac
echo "vm/run.sh: error: $msg without an exit status from the guest${why:+: $why} (see console above)" >&2
exit 1
