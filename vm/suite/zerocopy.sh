#!/usr/bin/env bash
# Real-kernel suite for zero copy (UBLK_F_AUTO_BUF_REG, Linux 6.16+) on
# every target that uses it: null, mem and a stack of pass-through filters,
# with one and two queues; qcow2 (fresh, over a backing file, compressed),
# checked against qemu-img (docs/frontends/ublk.md#zero-copy).
# On a 7.x kernel each device must say "data zero copy" in `list`; on 6.12
# the same devices copy, say so, and pass the same checks, and --zero-copy
# prints exactly one warning. Runs inside the VM (vm/run.sh), as root.
# Usage: bash vm/suite/zerocopy.sh   (from the repository root; USERBLK overrides the binary)
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }
[ -e /dev/ublk-control ] || modprobe ublk_drv || true

WORK=/run/zerocopy-suite
mkdir -p "$WORK"
FIO=(fio --ioengine=io_uring --direct=1 --output-format=terse --minimal --verify_state_save=0)

has_auto_buf_reg() { ub features | grep -q AUTO_BUF_REG; }

# What `list` must say of a device that takes zero copy by default.
if has_auto_buf_reg; then WANT="zero copy"; else WANT="copied"; fi

# The data line of device $1 ("zero copy", "copied", "user copy").
data_of() { ub list -n "$1" | sed -n 's/^\tdata //p'; }

# Device $1 moves data as $2, in the text and the JSON of `list`.
says() { # says ID MODE
    local got json
    got=$(data_of "$1")
    [ "$got" = "$2" ] || die "list says data '${got:-?}', want '$2'"
    json=$(ub list -n "$1" --json | grep -c "\"zero_copy\": $([ "$2" = "zero copy" ] && echo true || echo false)" || true)
    [ "$json" -ge 1 ] || die "list --json zero_copy disagrees with '$2'"
}

# fio writes with crc32c checksums, reading each block back soon after
# (verify_backlog), then verifies the whole range; one job per queue.
fio_verify() { # fio_verify DEV QUEUES
    local dev=$1 q=$2
    "${FIO[@]}" --name=zc --filename="$dev" --rw=randwrite --bsrange=4k-256k --iodepth=32 \
        --numjobs="$q" --offset_increment=32M --size=32M --io_size=48M --randrepeat=0 \
        --verify=crc32c --verify_fatal=1 --verify_backlog=64 --do_verify=1
}

# Write 1 MiB of 0xab at offset 0 of device $1 with O_DIRECT, then read it
# back with O_DIRECT into the same buffer (still 0xab): under zero copy the
# read lands in these very pages. Prints "zero" or "untouched" (or "mixed").
direct_read_after_write() { # direct_read_after_write DEV
    python3 - "$1" <<'PY'
import mmap, os, sys
n = 1 << 20
fd = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, n)
buf.write(b"\xab" * n)
assert os.pwritev(fd, [buf], 0) == n
assert os.preadv(fd, [buf], 0) == n
data = buf[:]
print("zero" if data == bytes(n) else "untouched" if data == b"\xab" * n else "mixed")
PY
}

null_zero_fill() { # null: zero copy (or not) as the kernel offers, reads are zeroes
    local q=$1 id
    id=$(add_dev null --size 1G -q "$q")
    says "$id" "$WANT"
    # The read's own buffer held the written bytes: null must zero it.
    [ "$(direct_read_after_write "/dev/ublkb$id")" = zero ] || die "a null read did not return zeroes"
    # fio's own check that every read is zeroes, with writes in between.
    "${FIO[@]}" --name=nullz --filename="/dev/ublkb$id" --rw=randwrite --bsrange=4k-512k --iodepth=32 \
        --numjobs="$q" --offset_increment=256M --size=64M --io_size=64M \
        --verify=pattern --verify_pattern=0x00 --verify_fatal=1 --verify_backlog=32 --do_verify=1
    del_dev "$id"
}

null_no_zero_fill() { # --no-zero-fill: I/O completes, no data movement, same data mode
    local q=$1 id got
    id=$(add_dev null --size 1G -q "$q" --no-zero-fill)
    says "$id" "$WANT"
    ub list -n "$id" | grep -q '"zero_fill":false' || die "list does not show zero_fill false"
    got=$(direct_read_after_write "/dev/ublkb$id")
    if [ "$WANT" = "zero copy" ]; then
        # The reader's own pages, left alone: null_blk's behaviour.
        [ "$got" = untouched ] || die "a --no-zero-fill read under zero copy changed the buffer ($got)"
    else
        echo "note: a --no-zero-fill read through the daemon's buffer gave: $got"
    fi
    "${FIO[@]}" --name=nullnz --filename="/dev/ublkb$id" --rw=randrw --bsrange=4k-1m --iodepth=32 \
        --numjobs="$q" --io_size=64M
    del_dev "$id"
}

mem_verify() {
    local q=$1 id
    id=$(add_dev mem --size 64M -q "$q")
    says "$id" "$WANT"
    fio_verify "/dev/ublkb$id" "$q"
    # Holes read as zeroes, written data stays; the data survives a discard elsewhere.
    blkdiscard -o 0 -l 1M "/dev/ublkb$id"
    cmp -n 1048576 "/dev/ublkb$id" /dev/zero || die "a discarded range is not zero"
    del_dev "$id"
}

mem_opted_out() { # --no-zero-copy: copied on every kernel, still correct
    local id
    id=$(add_dev mem --size 64M --no-zero-copy)
    says "$id" copied
    fio_verify "/dev/ublkb$id" 1
    del_dev "$id"
}

filter_stack() { # pass-through filters keep zero copy
    local q=$1 id
    id=$(add_dev mem --size 96M -q "$q" --filter "stats:file=$WORK/st$q.json" \
        --filter offset:offset=16M --filter delay:read=1ms --filter error:rate=0)
    says "$id" "$WANT"
    fio_verify "/dev/ublkb$id" "$q"
    del_dev "$id"
}

# The device's data, read before `del`, is what qemu reads of the image
# after it, and the image checks clean.
same_as_qemu() { # same_as_qemu ID IMAGE
    local id=$1 img=$2
    dd if="/dev/ublkb$id" of="$WORK/dev.raw" bs=1M iflag=direct status=none
    del_dev "$id"
    qemu-img check "$img" || die "qemu-img check $img is not clean"
    qemu-img convert -O raw "$img" "$WORK/qemu.raw"
    cmp "$WORK/dev.raw" "$WORK/qemu.raw" || die "qemu reads $img differently from the device"
    rm -f "$WORK/dev.raw" "$WORK/qemu.raw"
}

# LEN bytes of TEXT repeated (yes ends on SIGPIPE, which pipefail would count).
text() { yes "$1" | head -c "$2" || true; }

qcow2_fresh() { # a userblk-created image: zero copy (or not), fio verify, qemu agrees
    local q=$1 id img=$WORK/zc$q.qcow2
    needs qemu-img
    rm -f "$img"
    ub create qcow2 -f "$img" -s 64M >/dev/null
    id=$(add_dev qcow2 -f "$img" -q "$q")
    says "$id" "$WANT"
    fio_verify "/dev/ublkb$id" "$q"
    # Rewrites of clusters fio allocated go in place.
    fio_verify "/dev/ublkb$id" "$q"
    same_as_qemu "$id" "$img"
}

qcow2_backing() { # over a qcow2 backing file: reads through it, copy on write
    local q=$1 id base=$WORK/base$q.qcow2 img=$WORK/top$q.qcow2 sum
    needs qemu-img
    rm -f "$base" "$img"
    { head -c 8M /dev/urandom; text "backing $q" 40M; } >"$WORK/base.raw"
    qemu-img convert -O qcow2 "$WORK/base.raw" "$base"
    qemu-img create -q -f qcow2 -b "$base" -F qcow2 "$img" 64M
    sum=$(sha256sum <"$base")
    id=$(add_dev qcow2 -f "$img" -q "$q")
    says "$id" "$WANT"
    head -c 48M "/dev/ublkb$id" | cmp - "$WORK/base.raw" || die "reads through the backing file differ"
    fio_verify "/dev/ublkb$id" "$q"
    same_as_qemu "$id" "$img"
    [ "$(sha256sum <"$base")" = "$sum" ] || die "the backing file changed"
    rm -f "$WORK/base.raw"
}

qcow2_compressed() { # qemu-img convert -c: compressed reads as qemu's, then rewritten
    local id img=$WORK/z.qcow2
    needs qemu-img
    rm -f "$img"
    { text "compressed cluster" 24M; head -c 8M /dev/urandom; text more 32M; } >"$WORK/z.raw"
    qemu-img convert -c -O qcow2 "$WORK/z.raw" "$img"
    id=$(add_dev qcow2 -f "$img")
    says "$id" "$WANT"
    cmp "/dev/ublkb$id" "$WORK/z.raw" || die "the compressed image reads differently from its source"
    fio_verify "/dev/ublkb$id" 1
    same_as_qemu "$id" "$img"
    rm -f "$WORK/z.raw"
}

zero_copy_asked() { # --zero-copy: granted silently on 7.x; one warning, then copies, on 6.12
    local out id n
    out=$(ub add mem --size 64M --zero-copy 2>&1)
    echo "$out"
    id=$(dev_id_of "$out")
    [ -n "$id" ] || die "add mem --zero-copy failed"
    n=$(grep -ci "zero copy:.*\(lacks\|refuses\|only\)" <<<"$out" || true)
    if has_auto_buf_reg; then
        [ "$n" = 0 ] || die "a warning where zero copy was granted: $out"
        says "$id" "zero copy"
    else
        [ "$n" = 1 ] || die "want exactly one zero-copy warning, got $n: $out"
        says "$id" copied
    fi
    fio_verify "/dev/ublkb$id" 1
    del_dev "$id"
    # Taken by default: quiet on every kernel.
    out=$(ub add null --size 1G 2>&1)
    ! grep -qi "zero copy:.*lacks" <<<"$out" || die "a default device warned about zero copy: $out"
    del_dev "$(dev_id_of "$out")"
}

no_panics_logged() {
    ! grep -l panicked /run/userblk/*.log 2>/dev/null || die "a daemon panicked (see logs above)"
}

# ---- run ---------------------------------------------------------------------

echo "kernel $(uname -r); userblk $("$USERBLK" --version); devices that take zero copy say: $WANT"
cleanup_devices
plan 16
for q in 1 2; do
    case_run "null -q $q: $WANT, reads are zeroes (fio pattern verify)" null_zero_fill "$q"
    case_run "null --no-zero-fill -q $q: $WANT, fio" null_no_zero_fill "$q"
    case_run "mem -q $q: $WANT, fio verify, discard" mem_verify "$q"
    case_run "stats/offset/delay/error over mem -q $q: $WANT, fio verify" filter_stack "$q"
    case_run "qcow2 -q $q: $WANT, fio verify, qemu agrees" qcow2_fresh "$q"
    case_run "qcow2 over a backing file -q $q: $WANT, fio verify" qcow2_backing "$q"
done
case_run "compressed qcow2: $WANT, reads as its source, fio verify" qcow2_compressed
case_run "mem --no-zero-copy: copied, fio verify" mem_opted_out
case_run "--zero-copy: granted, or one warning and a copying device" zero_copy_asked
case_run "no daemon panicked" no_panics_logged
cleanup_devices
summary
