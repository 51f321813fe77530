#!/bin/bash
# Second stage of the test VM: runs chrooted into the host root (as seen
# over 9p) with a clean environment.  Makes modprobe use the unpacked
# Debian kernel, loads the modules tests rely on, then runs the user's
# script in the user's cwd.  Its exit status is what run.sh reports.
# Copied into each VM by run.sh; /init runs it as /run/vm/stage2.sh.
# No -e: each setup step fails explicitly (err, status 125), and the
# script's own status must be passed on, not acted upon.
set -uo pipefail

export PATH=/run/vm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb LANG=C.UTF-8 USERBLK_VM=1
export VM_KERNEL_DIR VM_KVER

err() { echo "vm: error: $*" >&2; exit 125; }

# VM_CWD, VM_ARGS (script and its arguments), VM_ENV (forwarded variables).
# shellcheck source=/dev/null
source /run/vm/env || err "cannot read /run/vm/env"
for kv in "${VM_ENV[@]}"; do export "${kv?}"; done

# The host's kmod knows nothing of this kernel's modules unless pointed at
# the unpacked package: wrappers first on PATH make plain 'modprobe x' and
# 'modinfo x' work (userblk itself runs 'modprobe ublk_drv').
mkdir -p /run/vm/bin
# The path is baked in so the wrappers also work under env -i.
printf '#!/bin/bash\nexec /sbin/modprobe -d %q "$@"\n' "$VM_KERNEL_DIR" >/run/vm/bin/modprobe
printf '#!/bin/bash\nexec /sbin/modinfo -b %q "$@"\n' "$VM_KERNEL_DIR" >/run/vm/bin/modinfo
chmod 755 /run/vm/bin/modprobe /run/vm/bin/modinfo

# ext4 and xfs are modules in this kernel; null_blk is left to the tests
# (they choose its parameters).
for m in ublk_drv loop ext4 xfs; do
    modprobe "$m" || err "modprobe $m failed"
done

read -r up _ </proc/uptime
echo "vm: ready after ${up}s of guest uptime; running: ${VM_ARGS[*]}"

cd "$VM_CWD" || err "cwd $VM_CWD does not exist in the guest"
# No stdin: the console has no input, a read would hang until the timeout.
bash "${VM_ARGS[@]}" </dev/null
exit $?
