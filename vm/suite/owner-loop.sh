# The udev stand-in for suites whose users add unprivileged devices
# (sourced; needs WORK, HELPER and USERBLK): the VM has no udevd, so
# start_owner_loop makes /dev/ublk-control 0666 and applies
# contrib/udev/userblk-owner to every new /dev/ublkcN and /dev/ublkbN node,
# as contrib/udev/70-userblk.rules' RUN+= would on each add event.

OWNER_LOOP_PID=
start_owner_loop() {
    chmod 0666 /dev/ublk-control
    local seen=$WORK/owner-seen
    : >"$seen"
    (
        while :; do
            for node in /dev/ublkc[0-9]* /dev/ublkb[0-9]*; do
                [ -e "$node" ] || continue
                # A node is new if its name and inode have not been seen (ids are reused).
                key="$node $(stat -c %i "$node" 2>/dev/null)" || continue
                grep -qxF -- "$key" "$seen" && continue
                USERBLK=$USERBLK sh "$HELPER" "${node#/dev/}" >>"$WORK/owner.log" 2>&1 &&
                    echo "$key" >>"$seen"
            done
            sleep 0.05
        done
    ) &
    OWNER_LOOP_PID=$!
}
stop_owner_loop() { [ -z "$OWNER_LOOP_PID" ] || kill "$OWNER_LOOP_PID" 2>/dev/null || true; }
