# What the guest-side bench scripts share; sourced, never run:
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# Only defines functions. guest_userblk expects the repository root as the
# working directory (guest_init goes there).

die() { echo "$*" >&2; exit 2; }

guest_counts() {  # RUNTIME REPEAT: both must be positive integers
    [[ $1 =~ ^[1-9][0-9]*$ && $2 =~ ^[1-9][0-9]*$ ]] || die "RUNTIME and REPEAT must be positive integers"
}

# For scripts called with OUT RUNTIME REPEAT first: checks RUNTIME and
# REPEAT, goes to the repository root, checks USERBLK if asked, makes OUT/raw.
guest_init() {  # OUT RUNTIME REPEAT [userblk]
    guest_counts "$2" "$3"
    cd "$(dirname "$0")/../.."
    [[ ${4:-} != userblk ]] || guest_userblk
    mkdir -p "$1/raw"
}

# USERBLK (default: this checkout's release build) must be executable.
guest_userblk() {
    : "${USERBLK:=$PWD/target/release/userblk}"
    [[ -x $USERBLK ]] || die "no binary at $USERBLK (cargo build --release first)"
}

# Makes WORK and points USERBLK at a private copy there (a rebuild on the
# host mid-run must not swap the binary under a later `add`).
guest_private_userblk() {  # WORK
    mkdir -p "$1"
    cp -p "$USERBLK" "$1/userblk"
    USERBLK=$1/userblk
}

# `BIN del -n ID` for every ID, each failure said; fails if any did.
guest_del() {  # BIN ID...
    local bin=$1 id rc=0; shift
    for id in "$@"; do
        "$bin" del -n "$id" || { echo "cleanup: userblk del -n $id failed" >&2; rc=1; }
    done
    return "$rc"
}

# The EXIT trap of a script whose only leftovers are its devices and WORK:
#   trap 'guest_cleanup "$BIN" "${IDS[@]}"' EXIT
# A failed del fails the script (unless it had failed already).
guest_cleanup() {  # BIN ID...
    local rc=$?
    guest_del "$@" || (( rc )) || rc=1
    rm -rf "$WORK"
    exit "$rc"
}
