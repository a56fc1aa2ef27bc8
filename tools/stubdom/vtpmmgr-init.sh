#!/bin/busybox sh
# /init of the manager's stub domain: the hardware TPM through iomem= (the `tis` driver on
# /dev/mem), the store on the raw disk xvda, vTPM domains served over tpmback.
# Kernel command line (extra= in the domain file):
#   xvtpm.init              create a new store on xvda first (refused if one is there)
#   xvtpm.auto-provision    provision unknown vTPMs into group 0
#   xvtpm.pcrs=LIST         PCRs the store is sealed to (default 0-7)
#   xvtpm.admin-domain=ID   the domain whose vtpm devices carry management commands
#                           (default 0: `xvtpm ... --manager-domain` in dom0; "none": no one)
. /lib/init-common.sh
PCRS=0,1,2,3,4,5,6,7; AUTO=; ADMIN="--admin-domain 0"
for a in $(cat /proc/cmdline); do case "$a" in
    xvtpm.pcrs=*) PCRS=${a#xvtpm.pcrs=};;
    xvtpm.auto-provision) AUTO=--auto-provision;;
    xvtpm.admin-domain=none) ADMIN=;;
    xvtpm.admin-domain=*) ADMIN="--admin-domain ${a#xvtpm.admin-domain=}";;
esac; done
export RUST_LOG=${RUST_LOG:-info}
if grep -qw xvtpm.init /proc/cmdline; then
    vtpmmgr init --store /dev/xvda --tpm mmio --pcrs "$PCRS" || stop "vtpmmgr init failed"
fi
vtpmmgr serve --store /dev/xvda --tpm mmio --pcrs "$PCRS" --xen $ADMIN $AUTO
stop "vtpmmgr exited with status $?"
