#!/usr/bin/env bash
# Real-kernel suite of the s3 target's snapshots, clones and gc:
# tests/s3/clones.sh on ublk devices, with s3s-fs inside the VM on loopback
# (vm/suite/s3.sh's setup), under a name vm/suite/several.sh can run:
#   vm/run.sh -- vm/suite/several.sh s3 s3-clones
# Its fast form by default (CI's: 3 clones, the cases the frontend plays a
# part in; the host runs the rest): S3_CLONES_QUICK=0 and CLONES=N (through
# USERBLK_VM_PASSENV) for the full one. ONLY=regex.
export S3_CLONES_QUICK=${S3_CLONES_QUICK:-1} CLONES=${CLONES:-3}
S3_VM_SUITE=clones exec bash "$(dirname "$0")/s3.sh" "$@"
