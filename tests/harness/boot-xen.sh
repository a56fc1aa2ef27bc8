#!/usr/bin/env bash
# Boots Xen + dom0 (+ the guest) from build-xen.sh's images under QEMU (TCG), serial log to
# LOGFILE. Exits 0 when dom0 reports PASS.   Usage: boot-xen.sh IMGDIR LOGFILE [TIMEOUT]
set -uo pipefail
IMG=${1:?usage: boot-xen.sh IMGDIR LOGFILE [TIMEOUT]}; LOG=${2:?}; TMO=${3:-600}
XEN_CMD="dom0_mem=1024M,max:1024M dom0_max_vcpus=2 console=com1 com1=115200,8n1 loglvl=warning guest_loglvl=warning"
DOM0_CMD="console=hvc0 earlyprintk=xen loglevel=4"
timeout --foreground -k 5 "$TMO" qemu-system-x86_64 -machine pc -accel tcg,thread=multi -cpu qemu64 -m 2048 -smp 2 \
    -display none -monitor none -serial stdio -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    -kernel "$IMG/xen" -append "$XEN_CMD" -initrd "$IMG/vmlinux ${DOM0_CMD//,/,,},$IMG/dom0.cpio" </dev/null >"$LOG" 2>&1
rc=$?
[ $rc = 3 ] && exit 0
echo "QEMU exit code $rc (3 = pass, 5 = fail, 124 = timeout); log: $LOG" >&2
exit 1
