# What the host-side bench scripts share; sourced, never run:
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# Only defines functions. Those that touch the tree (bench_build,
# bench_stale, bench_commit) expect the repository root as the working
# directory.

die() { echo "bench: $*" >&2; exit 2; }

# ---- the binary and the commit ------------------------------------------------

# Build target/release/userblk if it is missing (only then: a stale one is
# measured as it is, and bench_stale says so).
bench_build() {
    if [[ ! -x target/release/userblk ]]; then
        echo "bench: building target/release/userblk" >&2
        cargo build --release
    fi
}

# Sets `stale` to a source of the binary $1 newer than it (empty if none)
# and warns about it. Sources only: tests and benches do not change it.
bench_stale() {  # BINARY [NAME IN THE WARNING (BINARY)]
    stale=$(find crates/*/src crates/*/Cargo.toml Cargo.toml Cargo.lock -type f -newer "$1" -print -quit)
    [[ -z $stale ]] || echo "bench: warning: ${2:-$1} is older than $stale" >&2
}

# The short commit, marked when crates/ has uncommitted changes.
bench_commit() {
    local c
    c=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    git diff --quiet HEAD -- crates 2>/dev/null || c+=" (crates/ modified)"
    echo "$c"
}

# bench_build, then UB (the binary's absolute path), `stale` and `commit`.
bench_userblk() {
    bench_build
    UB=$PWD/target/release/userblk
    bench_stale "$UB" target/release/userblk
    commit=$(bench_commit)
}

# Die unless more than BYTES of memory are available (DESCRIPTION says how
# many, in the message).
need_memory() {  # BYTES DESCRIPTION
    local avail=$(( $(awk '/^MemAvailable:/ {print $2}' /proc/meminfo) * 1024 ))
    (( avail > $1 )) || die "needs $2 of free memory, have $(numfmt --to=iec "$avail")"
}

# ---- CPU accounting -------------------------------------------------------------

# Busy ticks of all CPUs, steal included (what a VM run loses to others).
cpu_busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
# Busy ticks of all CPUs, without steal (host-only runs).
busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
# CPU ticks of this shell's reaped children.
children_cpu() { awk '{print $16 + $17}' "/proc/$$/stat"; }
ticks() {  # utime + stime of a process (all its threads), 0 for none
    if [[ -n $1 && -r /proc/$1/stat ]]; then sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; else echo 0; fi
}
# Percent of one core others used since BUSY0/OURS0 (cpu_busy and
# children_cpu then) at START (a $SECONDS), averaged; never below 0.
others_pct() {  # BUSY0 OURS0 START
    local wall=$(( SECONDS - $3 ))
    local o=$(( ($(cpu_busy) - $1 - ($(children_cpu) - $2)) * 100 / $(getconf CLK_TCK) / (wall > 0 ? wall : 1) ))
    echo $(( o < 0 ? 0 : o ))
}

# ---- processes and waits ----------------------------------------------------------

# The process exists and has not exited (not a zombie).
alive() { [[ -r /proc/$1/status ]] && ! grep -qs '^State:[[:space:]]*Z' "/proc/$1/status"; }

# Wait up to TENTHS tenths of a second for PID to exit; 1 if it still runs.
wait_gone() {  # TENTHS PID
    local i
    for (( i = 0; i < $1; i++ )); do alive "$2" || return 0; sleep 0.1; done
    ! alive "$2"
}

# Poll COMMAND every 0.1 s until it succeeds (0), PID exits or TENTHS
# tenths of a second pass (1).
wait_up() {  # TENTHS PID COMMAND...
    local n=$1 pid=$2 i
    shift 2
    for (( i = 0; i < n; i++ )); do
        "$@" && return 0
        alive "$pid" || return 1
        sleep 0.1
    done
    return 1
}

stop_child() {  # pid: TERM, up to 5 s, then KILL; reaps it
    kill "$1" 2>/dev/null
    wait_gone 50 "$1" || kill -9 "$1"
    wait "$1" 2>/dev/null
}

# ---- fio ---------------------------------------------------------------------------

# Run fio with ARGS, its JSON to OUT; the command line goes to
# $RES/commands.txt, its stderr to $RES/fio.err, a failure sets `failed`.
# Uses FIO_PID for the caller's cleanup trap.
fio_json() {  # OUT ARGS...
    local out=$1
    shift
    echo "fio $*" >>"$RES/commands.txt"
    # In the background and waited for: bash runs no INT trap after a foreground
    # child that handled SIGINT itself (fio does), so Ctrl-C would only stop one job.
    fio --output-format=json --output="$out" "$@" >/dev/null 2>>"$RES/fio.err" &
    FIO_PID=$!
    wait "$FIO_PID" || { echo "bench: fio failed: $out (see fio.err)" >&2; failed=1; }
    FIO_PID=''
}

# ---- rublk, the baseline ---------------------------------------------------------

# Sets RUBLK to the rublk binary's absolute path: $RUBLK if set, else
# /opt/rublk/bin/rublk, installed with cargo (RUBLK_VERSION, default
# 0.2.15; its build needs libclang-dev, installed with apt-get as root)
# if missing. Dies unless the VM can see it.
bench_rublk() {
    local version=${RUBLK_VERSION:-0.2.15}
    if [[ -n ${RUBLK:-} ]]; then
        [[ -x $RUBLK ]] || die "RUBLK=$RUBLK is not an executable"
    else
        RUBLK=/opt/rublk/bin/rublk
        if [[ ! -x $RUBLK ]]; then
            echo "bench: rublk is not installed at $RUBLK; installing rublk $version with cargo" \
                "(--no-default-features, --root /opt/rublk; its build needs libclang-dev)" >&2
            command -v cargo >/dev/null || die "cargo is missing: install a Rust toolchain, or set RUBLK=/path/to/rublk"
            if ! dpkg -s libclang-dev >/dev/null 2>&1; then
                (( EUID == 0 )) || die "libclang-dev missing and not root: apt-get install libclang-dev"
                DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 libclang-dev >&2 \
                    || die "apt-get install libclang-dev failed"
            fi
            cargo install rublk --version "$version" --no-default-features --root /opt/rublk \
                || die "cargo install rublk $version failed"
        fi
    fi
    RUBLK=$(realpath "$RUBLK")
    [[ ! $RUBLK =~ ^/(run|mnt|dev|proc|sys)/ ]] || die "rublk at $RUBLK is not visible in the VM (the guest has its own /run, /mnt)"
}
