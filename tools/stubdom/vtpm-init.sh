#!/bin/busybox sh
# /init of a vTPM stub domain. Its disk (xvda, ext4, made by `xvtpm stubdom vtpm`) holds
# xvtpm.conf (the uuid of the guest device it serves, the TPM version) and the vTPM's state,
# whose key is kept by the manager: this domain's own vtpm device (handle 0) leads to it.
# A disk made with a create request gets its TPM manufactured at the first boot, once.
. /lib/init-common.sh
mount -t ext4 -o nodelalloc /dev/xvda /mnt || stop "cannot mount xvda"
conf() { sed -n "s/^$1=//p" /mnt/xvtpm.conf 2>/dev/null | head -n 1; }
UUID=$(conf uuid); VERSION=$(conf tpm)
[ -n "$UUID" ] || stop "xvda has no xvtpm.conf with a uuid"
case "$VERSION" in 1.2) V=--tpm1.2;; 2.0|"") V=;; *) stop "unknown tpm=$VERSION in xvtpm.conf";; esac
if [ -e /mnt/create ]; then
    if [ -e /mnt/state ]; then say "state exists; dropping the create request"
    else
        say "manufacturing TPM $VERSION for $UUID"
        mkdir -p /mnt/state.new && vtpm create --state-dir /mnt/state.new --manager xen:0 $V \
            && mv /mnt/state.new /mnt/state || stop "vtpm create failed"
    fi
    rm -f /mnt/create; sync
fi
say "serving $UUID"
# Snapshots on the disk: a vTPM domain made again under its running guest resumes the guest's
# TPM from them, once dom0's xvtpmd has told it the guest's life (a domU may not read it).
RUST_LOG=${RUST_LOG:-info} vtpm serve --state-dir /mnt/state --manager xen:0 --uuid "$UUID" $V \
    --snapshot-dir /mnt/snapshots --guest-life-wait-secs 30
stop "vtpm exited with status $?"
