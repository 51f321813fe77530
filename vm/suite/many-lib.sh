# Helpers for many devices at once (sourced by tests/host/many.sh,
# vm/suite/many.sh and bench/guest/many.sh; needs `ub` from lib.sh or a
# USERBLK binary): bring N devices up, time commands, and read what an idle
# daemon costs (Rss and Pss from /proc/PID/smaps_rollup, threads from
# /proc/PID/task).

# Milliseconds since the epoch.
ms_now() { date +%s%3N; }

# Milliseconds COMMAND takes (its output discarded; fails with it).
ms_of() { # ms_of COMMAND...
    local t0 rc=0
    t0=$(ms_now)
    "$@" >/dev/null || rc=$?
    echo $(( $(ms_now) - t0 ))
    return "$rc"
}

# Add N devices with `add ARGS...`, MANY_PARALLEL (8) at a time; prints
# their ids, one a line. Fails, showing the first failed add's output, if
# any add failed.
many_add() { # many_add N ARGS...
    local n=$1 par=${MANY_PARALLEL:-8} i j dir rc=0 out
    shift
    dir=$(mktemp -d)
    for (( i = 0; i < n; i += par )); do
        for (( j = i; j < n && j < i + par; j++ )); do
            "$USERBLK" add "$@" >"$dir/$j.out" 2>&1 &
        done
        wait || rc=1
    done
    for (( j = 0; j < n; j++ )); do
        out=$(cat "$dir/$j.out")
        id=$(sed -n 's/^dev id \([0-9]*\):.*/\1/p' <<<"$out" | head -n 1)
        if [[ -z $id ]]; then
            echo "add $j of $n failed: $out" >&2
            rc=1
            break
        fi
        echo "$id"
    done
    rm -rf "$dir"
    return "$rc"
}

# The daemons' pids and states, "ID PID STATE" a line, from `list --json`.
many_list() {
    "$USERBLK" list --json | python3 -c '
import json, sys
for d in json.load(sys.stdin):
    print(d["id"], d["pid"], d["state"])'
}

# One daemon's cost: "RSS_KIB PSS_KIB THREADS".
daemon_cost() { # daemon_cost PID
    local rss pss threads
    rss=$(awk '$1 == "Rss:" {print $2}' "/proc/$1/smaps_rollup")
    pss=$(awk '$1 == "Pss:" {print $2}' "/proc/$1/smaps_rollup")
    # io_uring's own workers (iou-wrk-*, made by the kernel on demand for
    # async work such as the control commands, and gone when idle) are not
    # the daemon's threads.
    threads=$(cat /proc/"$1"/task/*/comm 2>/dev/null | grep -vc '^iou-' || true)
    echo "$rss $pss $threads"
}

# What PIDS cost, summed up: "RSS_AVG RSS_MAX PSS_AVG PSS_MAX THREADS_MAX" (KiB).
many_cost() { # many_cost PID...
    local pid
    for pid in "$@"; do daemon_cost "$pid"; done | awk '
        { n++; r += $1; p += $2; if ($1 > rm) rm = $1; if ($2 > pm) pm = $2; if ($3 > tm) tm = $3 }
        END { if (n) printf "%d %d %d %d %d\n", r / n, rm, p / n, pm, tm }'
}

# Names what the daemons left behind (processes, state files, sockets,
# mounts under DIR, loop devices on files under DIR); fails if anything.
many_leftovers() { # many_leftovers STATE_DIR DIR PID...
    local state=$1 dir=$2 pid left=0
    shift 2
    for pid in "$@"; do
        if kill -0 "$pid" 2>/dev/null && ! grep -q '^State:.*[ZX]' "/proc/$pid/status" 2>/dev/null; then
            echo "daemon $pid still runs" >&2
            left=1
        fi
    done
    if compgen -G "$state/[0-9]*.json" >/dev/null || compgen -G "$state/ctl-*.sock" >/dev/null; then
        echo "left in $state: $(cd "$state" && ls)" >&2
        left=1
    fi
    if grep -q " $dir" /proc/self/mounts; then
        echo "still mounted: $(grep " $dir" /proc/self/mounts | head -n 3)" >&2
        left=1
    fi
    if command -v losetup >/dev/null && losetup -a | grep -q "$dir"; then
        echo "loop devices left: $(losetup -a | grep "$dir" | head -n 3)" >&2
        left=1
    fi
    return "$left"
}

# A case: `list` and `list --json` of the MANY_DEVICES devices in
# $WORK/list each answer within LIST_BOUND_MS; the figures in a note.
list_within_bound() {
    [ -s "$WORK/list" ] || skip "no devices (the first case failed)"
    local text json
    text=$(ms_of ub list)
    json=$(ms_of ub list --json)
    echo "note: list $text ms, list --json $json ms for $MANY_DEVICES devices"
    [ "$text" -lt "$LIST_BOUND_MS" ] || die "list took $text ms"
    [ "$json" -lt "$LIST_BOUND_MS" ] || die "list --json took $json ms"
}
