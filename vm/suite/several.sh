#!/usr/bin/env bash
# Several real-kernel suites in one VM boot, one after the other (a boot
# under TCG costs about half a minute): `vm/run.sh -- vm/suite/several.sh
# zerocopy upgrade resize`. Each runs in its own bash with its own plan and
# summary; the exit status is non-zero if any failed, and the last line
# names them.
set -u
cd "$(dirname "$0")/../.."
(( $# )) || { echo "usage: $0 SUITE..." >&2; exit 2; }
failed=()
for s in "$@"; do
    [[ $s =~ ^[a-z0-9-]+$ && -f vm/suite/$s.sh ]] || { echo "no suite vm/suite/$s.sh" >&2; failed+=("$s"); continue; }
    echo "=== suite $s ($(uname -r))"
    bash "vm/suite/$s.sh" || failed+=("$s")
done
if (( ${#failed[@]} )); then
    echo "suites failed: ${failed[*]}"
    exit 1
fi
echo "suites passed: $*"
