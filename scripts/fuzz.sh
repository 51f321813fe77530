#!/usr/bin/env bash
# Fuzz the NBD handshake, request parser, server and client, and qcow2 images,
# with cargo-fuzz, on the stable toolchain (docs/fuzzing.md).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Builds the targets in fuzz/, then runs each (default: nbd_handshake,
# nbd_request, nbd_server, nbd_client, qcow2_image) for SECONDS (default 60), one after the other at
# nice 10, and prints per target: runs executed, exec/s, coverage (libFuzzer's
# cov and ft) and crashes found. Exits 1 if any target crashed or hung.
#
# Environment:
#   FUZZ_ARGS            extra libFuzzer options, e.g. "-max_len=8192"
#
# New corpus entries go to fuzz/target/corpus/<target> (not committed; kept
# between runs, delete it to start over); the committed seeds in
# fuzz/corpus/<target> are only read. Crashing inputs land in
# fuzz/artifacts/<target>/, logs in fuzz/target/fuzz-logs/<target>.log.
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2
ALL_TARGETS=(nbd_handshake nbd_request nbd_server nbd_client qcow2_image)
# libFuzzer options of one target: nbd_server needs inputs longer than a
# slot's 4 KiB buffer to send writes that take the grown-buffer path;
# qcow2_image's seeds are images of up to 6 KiB, and mutations may grow them.
declare -A TARGET_ARGS=([nbd_server]="-max_len=16384" [qcow2_image]="-max_len=16384")

secs=${1:-60}
if ! [[ $secs =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS] [TARGET...]   (targets: ${ALL_TARGETS[*]})" >&2
    exit 2
fi
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=("${ALL_TARGETS[@]}")
fi
for t in "${targets[@]}"; do
    if [[ " ${ALL_TARGETS[*]} " != *" $t "* ]]; then
        echo "fuzz.sh: unknown target $t (targets: ${ALL_TARGETS[*]})" >&2
        exit 2
    fi
done

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION from the Rust crate registry"
    nice -n 10 cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

# `-s none`: no sanitizer, so cargo-fuzz passes no -Z flag and the stable
# toolchain builds it (coverage comes from -Cpasses=sancov-module, which is
# stable). Rust code needs no ASan to catch its bugs: they are panics, and
# debug assertions and overflow checks are on.
FUZZ_BUILD=(-s none)

for t in "${targets[@]}"; do
    if [ "$t" = qcow2_image ] && [ -z "$(ls -A "corpus/$t" 2>/dev/null)" ]; then
        echo "fuzz.sh: writing the qcow2 seed corpus (needs qemu-img)"
        ./qcow2_seeds.sh >/dev/null
    fi
done
for t in "${targets[@]}"; do
    if [ "$t" != qcow2_image ] && [ -z "$(ls -A "corpus/$t" 2>/dev/null)" ]; then
        echo "fuzz.sh: writing the seed corpus (fuzz/corpus/)"
        nice -n 10 cargo run --quiet --example gen_seeds -- corpus
        break
    fi
done

echo "fuzz.sh: building the fuzz targets"
nice -n 10 cargo fuzz build "${FUZZ_BUILD[@]}"

logs=target/fuzz-logs
mkdir -p "$logs"
# The server target puts its socket under TMPDIR, qcow2_image its image
# files: on tmpfs when there is one (the qcow2 target's flushes sync the
# file, which on a disk would cost more than the rest of a run), else
# inside target/. Removed at the end.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    TMPDIR=$(mktemp -d /dev/shm/userblk-fuzz.XXXXXX)
else
    TMPDIR="$PWD/target/tmp"
    rm -rf "$TMPDIR"
    mkdir -p "$TMPDIR"
fi
export TMPDIR
trap 'rm -rf "$TMPDIR"' EXIT

failed=0
rows=()
for t in "${targets[@]}"; do
    mkdir -p "target/corpus/$t" "artifacts/$t"
    before=$(find "artifacts/$t" -type f | sort)
    log="$logs/$t.log"
    echo "fuzz.sh: $t for ${secs}s (log: fuzz/$log)"
    set +e
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of options
    nice -n 10 cargo fuzz run "${FUZZ_BUILD[@]}" "$t" "target/corpus/$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=20 -print_final_stats=1 \
        ${TARGET_ARGS[$t]:-} ${FUZZ_ARGS:-} \
        >"$log" 2>&1
    rc=$?
    set -e
    after=$(find "artifacts/$t" -type f | sort)
    new=$(comm -13 <(echo "$before") <(echo "$after") | sed '/^$/d')
    crashes=$(printf '%s' "$new" | grep -c . || true)
    if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        # The harness died without libFuzzer saving an input: count it all the same.
        crashes=1
        new="(no artifact; exit status $rc, see fuzz/$log)"
    fi
    runs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$log" | tail -n1)
    eps=$(sed -nE 's/^stat::average_exec_per_sec: *([0-9]+).*/\1/p' "$log" | tail -n1)
    last=$(grep -E '^#[0-9]+.* cov: ' "$log" | tail -n1 || true)
    runs=${runs:-$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$last")}
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
    corp=$(sed -nE 's/.* corp: ([0-9]+)\/.*/\1/p' <<<"$last")
    rows+=("$(printf '%-14s %12s %8s %6s %7s %6s %8s' "$t" "${runs:-?}" "${eps:-?}" \
        "${cov:-?}" "${ft:-?}" "${corp:-?}" "$crashes")")
    if [ "$crashes" -ne 0 ]; then
        failed=1
        echo "fuzz.sh: $t FAILED:"
        grep -m1 -A2 "panicked at" "$log" | sed 's/^/    /' || true
        printf '%s\n' "$new" | sed 's/^/    fuzz\//'
    fi
done
rm -rf "$TMPDIR"

echo
printf '%-14s %12s %8s %6s %7s %6s %8s\n' target runs exec/s cov ft corpus crashes
printf '%s\n' "${rows[@]}"
if [ "$failed" -ne 0 ]; then
    echo "fuzz.sh: crashes found; reproduce with" \
        "'cd fuzz && cargo fuzz run -s none TARGET artifacts/TARGET/FILE'"
    exit 1
fi
