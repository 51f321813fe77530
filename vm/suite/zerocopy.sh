#!/usr/bin/env bash
# Real-kernel suite for zero copy (UBLK_F_AUTO_BUF_REG, Linux 6.16+) on
# every target that uses it: null, mem and a stack of pass-through filters,
# with one and two queues; qcow2 (fresh, over a backing file, compressed),
# checked against qemu-img; s3 against s3s-fs on loopback (a cache smaller
# than the data, a restart from the bucket alone, flush then kill -9 and
# recover) (docs/frontends/ublk.md#zero-copy).
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

state_is() { [ "$(list_word "$1" 11)" = "$2" ]; }

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

# ---- s3 (tests/s3/server.sh serves a directory as a bucket) ----------------------

S3SERVER=tests/s3/server.sh
export AWS_ACCESS_KEY_ID=userblk-test-key AWS_SECRET_ACCESS_KEY=userblk-test-secret
unset AWS_ENDPOINT_URL AWS_REGION AWS_SESSION_TOKEN AWS_PROFILE

# Start s3s-fs for this case (stopped when the case ends), with the empty
# bucket zcb; sets EP.
s3_server() {
    [ -x "$(bash "$S3SERVER" path)" ] || skip "s3s-fs is not installed (tests/s3/server.sh install)"
    ip link set lo up 2>/dev/null || true
    local port=$((20000 + RANDOM % 20000)) pid
    rm -rf "$WORK/s3" "$WORK"/c-s3*
    mkdir -p "$WORK/s3/zcb"
    pid=$(S3S_LOG=$WORK/s3s.log bash "$S3SERVER" start "$WORK/s3" "$port") || die "s3s-fs did not start"
    # shellcheck disable=SC2064 # the pid is known now
    trap "bash '$S3SERVER' stop $pid" EXIT
    EP=http://127.0.0.1:$port
}

# add_s3 PREFIX CACHE [OPTIONS...]: an s3 device of bucket zcb; prints its id.
add_s3() {
    local p=$1 c=$2; shift 2
    # --lease host: s3s-fs's conditional writes are not atomic.
    add_dev s3 --endpoint "$EP" --bucket zcb --prefix "$p" --cache-dir "$c" --lease host "$@"
}

# Field FIELD of device $1's `ctl status` (counters.evicted, say).
s3_status() { # s3_status ID FIELD
    ub ctl -n "$1" status | sed -n 's/^s3: //p' |
        python3 -c 'import json,sys; v=json.load(sys.stdin)
for k in sys.argv[1].split("."): v=v[k]
print(v)' "$2"
}

s3_evict_and_restart() { # fio verify through a small cache; the same data fetched again and from the bucket alone
    local id
    s3_server
    id=$(add_s3 v "$WORK/c-s3v" --size 64M --chunk-size 1M --cache-size 8M --writeback-delay 0.2)
    says "$id" "$WANT"
    # 32 MiB through an 8 MiB cache: partial writes to evicted chunks fetch
    # them first, the verify pass reads most chunks back from the bucket.
    fio_verify "/dev/ublkb$id" 1
    [ "$(s3_status "$id" counters.evicted)" -gt 0 ] || die "nothing was evicted"
    [ "$(s3_status "$id" counters.fetched)" -gt 0 ] || die "nothing was fetched back"
    dd if="/dev/ublkb$id" of="$WORK/s3v.raw" bs=1M count=32 iflag=direct status=none
    echo "note: evicted $(s3_status "$id" counters.evicted), fetched $(s3_status "$id" counters.fetched) chunks"
    del_dev "$id"
    # A new daemon on a new cache: everything comes from the bucket.
    id=$(add_s3 v "$WORK/c-s3v2")
    says "$id" "$WANT"
    cmp -n $((32 << 20)) "/dev/ublkb$id" "$WORK/s3v.raw" || die "the volume reads differently from the bucket alone"
    del_dev "$id"
    rm -f "$WORK/s3v.raw"
}

s3_flush_kill9_recover() { # flushed data survives kill -9 + recover, and is in the bucket
    local id pid
    s3_server
    head -c $((3 << 20)) /dev/urandom >"$WORK/s3k.raw"
    id=$(add_s3 k "$WORK/c-s3k" --size 64M --chunk-size 1M --writeback-delay 600 -r)
    says "$id" "$WANT"
    # 64 KiB writes from 1.5 MiB: partial chunks, then a flush.
    dd if="$WORK/s3k.raw" of="/dev/ublkb$id" bs=64k seek=24 oflag=direct conv=fsync status=none
    [ "$(find "$WORK/s3/zcb/k/chunks" -type f | wc -l)" -ge 4 ] || die "the flush did not upload the chunks"
    pid=$(list_word "$id" 7)
    kill -9 "$pid"
    wait_for 10 exited "$pid" || die "daemon $pid did not die"
    wait_for 30 state_is "$id" QUIESCED || die "device $id not QUIESCED after kill -9 (state $(list_word "$id" 11))"
    ub recover -n "$id" || die "recover failed"
    [ "$(list_word "$id" 11)" = LIVE ] || die "device $id not LIVE after recover"
    says "$id" "$WANT"
    cmp -n $((3 << 20)) "/dev/ublkb$id" "$WORK/s3k.raw" -i $((3 << 19)):0 || die "flushed data lost across kill -9"
    del_dev "$id"
    id=$(add_s3 k "$WORK/c-s3k2")
    cmp -n $((3 << 20)) "/dev/ublkb$id" "$WORK/s3k.raw" -i $((3 << 19)):0 || die "flushed data not in the bucket"
    del_dev "$id"
    rm -f "$WORK/s3k.raw"
}

no_panics_logged() {
    ! grep -l panicked /run/userblk/*.log 2>/dev/null || die "a daemon panicked (see logs above)"
}

# ---- run ---------------------------------------------------------------------

echo "kernel $(uname -r); userblk $("$USERBLK" --version); devices that take zero copy say: $WANT"
cleanup_devices
plan 18
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
case_run "s3 small cache: $WANT, fio verify, evicted and re-added reads" s3_evict_and_restart
case_run "s3 flush, kill -9, recover: $WANT, flushed data kept" s3_flush_kill9_recover
case_run "--zero-copy: granted, or one warning and a copying device" zero_copy_asked
case_run "no daemon panicked" no_panics_logged
cleanup_devices
summary
