#!/bin/busybox sh
# init of the Xen guest: the stock xen-tpmfront, then tpm2-tools on /dev/tpm0.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev; mount -t tmpfs tmpfs /tmp
say() { echo "XVTPM-DOMU: $*"; }
say "kernel $(uname -r)"
insmod /lib/modules/xen-tpmfront.ko &
i=0; while [ ! -e /dev/tpm0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
say "devices $(ls /dev/tpm* 2>&1 | tr '\n' ' ')"
say "tpm_version_major=$(cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null)"
export TPM2TOOLS_TCTI=device:/dev/tpm0
r=$(tpm2_getrandom --hex 16 2>&1) && say "getrandom ok $r" || say "getrandom FAILED $r"
tpm2_pcrextend 16:sha256=0101010101010101010101010101010101010101010101010101010101010101 && say "pcrextend ok" || say "pcrextend FAILED"
say "pcr16 $(tpm2_pcrread sha256:16 2>&1 | awk '/16:/ {print $2}')"
tpm2_createprimary -Q -C o -G ecc -c /tmp/p.ctx && say "createprimary ok" || say "createprimary FAILED"
say "timeouts $(cat /sys/class/tpm/tpm0/timeouts 2>&1)"
say "durations $(cat /sys/class/tpm/tpm0/durations 2>&1)"
say "caps $(cat /sys/class/tpm/tpm0/caps 2>&1 | tr '\n' ';')"
say "hwrng $(cat /sys/class/misc/hw_random/rng_current 2>&1) $(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
say "dmesg-tpm-errors $(dmesg | grep -ci 'tpm.*error')"
dmesg | grep -i 'tpm' | sed 's/^/XVTPM-DOMU: dmesg: /' 
say DONE
while true; do sleep 10; done
