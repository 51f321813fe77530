#!/usr/bin/env bash
# Real-kernel suite of the s3 target's snapshots, clones and gc:
# tests/s3/clones.sh on ublk devices, with s3s-fs inside the VM on loopback
# (vm/suite/s3.sh's setup), under a name vm/suite/several.sh can run:
#   vm/run.sh -- vm/suite/several.sh s3 s3-clones
# (CLONES, the clones of the golden volume, 6 by default; ONLY=regex.)
S3_VM_SUITE=clones exec bash "$(dirname "$0")/s3.sh" "$@"
