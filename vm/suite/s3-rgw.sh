#!/usr/bin/env bash
# vm/suite/s3.sh against RADOS Gateway (a Ceph cluster in the guest), under
# a name vm/suite/several.sh can run: `vm/run.sh -- vm/suite/several.sh s3-rgw`.
# Two daemons race for a volume 8 rounds here, not 20: each round takes
# about 5 s under TCG, and the host suite runs the full 20 against RGW.
RACE_ROUNDS=${RACE_ROUNDS:-8} exec bash "$(dirname "$0")/s3.sh" --server rgw "$@"
