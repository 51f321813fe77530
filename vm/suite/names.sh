#!/usr/bin/env bash
# Real-kernel suite for device names on ublk: `add --name` links
# /dev/userblk/NAME to /dev/ublkbN (the VM has no udev: userblk's own link),
# `udev-name` answers for the udev rule, the link survives recover and
# upgrade, and del removes it. (FUSE and NBD: tests/host/names.sh.)
# Runs inside the VM (vm/run.sh), as root, from the repository root.
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }

state_is() { [ "$(list_word "$1" 11)" = "$2" ]; }
# What makes a device upgradable on this kernel: -r with QUIESCE, else --reissue.
if ub features | grep -qw QUIESCE; then UPG=-r; else UPG=--reissue; fi

links_to() { # links_to NAME ID
    [ "$(readlink "/dev/userblk/$1")" = "/dev/ublkb$2" ] || die "/dev/userblk/$1 -> $(readlink "/dev/userblk/$1"), not /dev/ublkb$2"
}

case_name_links_the_ublk_node() {
    local id id2
    id=$(add_dev --name vol null --size 64M)
    links_to vol "$id"
    [ "$(ub udev-name "$id")" = vol ] || die "udev-name $id does not say vol"
    ub list --name vol | grep -q "^dev id $id:" || die "list --name does not show device $id"
    ub list --name vol --json | grep -q '"name": "vol"' || die "list --json has no name"
    expect_fail "name vol is in use by device $id" ub add --name vol null --size 1M
    id2=$(add_dev null --size 1M)
    expect_fail "has no name" ub udev-name "$id2"
    del_dev "$id2"
    ub del --name vol
    wait_for 10 test ! -e "/dev/ublkb$id" || die "/dev/ublkb$id still exists"
    [ ! -L /dev/userblk/vol ] || die "del --name left the link"
}

case_recover_keeps_the_link() {
    local id pid
    id=$(add_dev -r --name rec mem --size 16M)
    links_to rec "$id"
    echo named-data | dd of=/dev/userblk/rec oflag=direct conv=sync bs=4k status=none
    pid=$(list_word "$id" 7)
    kill -9 "$pid"
    wait_for 30 state_is "$id" QUIESCED || die "not QUIESCED after kill -9"
    links_to rec "$id"
    ub recover --name rec >/dev/null
    wait_for 30 state_is "$id" LIVE || die "not LIVE after recover"
    links_to rec "$id"
    dd if=/dev/userblk/rec iflag=direct bs=4k count=1 status=none | grep -q named-data || die "data lost across recover"
    ub list --name rec | grep -q "name rec" || die "the recovered daemon's state lost the name"
    del_dev "$id"
    [ ! -L /dev/userblk/rec ] || die "del left the link"
}

case_upgrade_keeps_the_link() {
    local id old
    id=$(add_dev $UPG --name up null --size 16M)
    old=$(list_word "$id" 7)
    ub upgrade --name up >/dev/null 2>&1 || die "upgrade --name failed"
    [ "$(list_word "$id" 7)" != "$old" ] || die "upgrade kept daemon $old"
    links_to up "$id"
    [ "$(ub udev-name "$id")" = up ] || die "the new daemon's state lost the name"
    ub del --name up
    [ ! -L /dev/userblk/up ] || die "del left the link"
}

plan 3
case_run name_links_the_ublk_node case_name_links_the_ublk_node
case_run recover_keeps_the_link case_recover_keeps_the_link
case_run upgrade_keeps_the_link case_upgrade_keeps_the_link
summary
