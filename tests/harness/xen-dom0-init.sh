#!/bin/busybox sh
# dom0 /init of the Xen end-to-end test: Xen's daemons, our vtpm as the guest's backend, the
# guest, its report; then QEMU exits through isa-debug-exit (3 = pass, 5 = fail).
. /lib/xen-dom0-common.sh
mark "xen up"
UUID=5e1f0a2b-7c3d-4e5f-8a9b-0c1d2e3f4a5b
head -c 32 /dev/urandom > /var/lib/xvtpm/key
vtpm create --state-dir /var/lib/xvtpm/$UUID --key /var/lib/xvtpm/key 2>&1 | sed 's/^/  vtpm: /' || finish FAIL
serve $UUID /var/log/vtpm.log; VTPM_PID=$SERVED
mark "vtpm serve up"
T0=$(cut -d' ' -f1 /proc/uptime)
xl create /etc/xen/domU.cfg 2>&1 | sed 's/^/  xl: /'
DOMID=$(xl domid tpmguest 2>/dev/null)
[ -n "$DOMID" ] || { cat /var/log/vtpm.log; finish FAIL; }
mark "guest created, domid $DOMID"
CON=/var/log/xen/console/guest-tpmguest.log
i=0; while ! grep -q "XVTPM-DOMU: devices" $CON 2>/dev/null; do i=$((i+1)); [ $i -gt 4000 ] && break; usleep 100000; done
mark "xl create to usable /dev/tpm0 in the guest: $(awk -v t0=$T0 '{print $1 - t0}' /proc/uptime) s"
i=0; while ! grep -q "XVTPM-DOMU: DONE" $CON 2>/dev/null; do i=$((i+1)); [ $i -gt 4000 ] && break; usleep 100000; done
T1=$(cut -d' ' -f1 /proc/uptime)
mark "guest report after $(echo "$T1 $T0" | awk '{print $1 - $2}') s:"
grep "XVTPM-DOMU" $CON | sed 's/^/  /'
mark "vtpm log:"; sed 's/^/  /' /var/log/vtpm.log
last_loop() { grep -o "XVTPM-DOMU: loop [0-9]* ok" $CON | tail -n 1 | awk '{print $3}'; }
wait_loop() { # wait until the guest reports a successful loop after number $1 matching $2
    i=0; while [ $i -lt 2400 ]; do
        grep "XVTPM-DOMU: loop [0-9]* ok" $CON | awk -v n=$1 '$3 > n' | grep -q -- "$2" && return 0
        i=$((i+1)); usleep 100000
    done; return 1
}
# 1. kill -9 the vtpm while the guest uses its TPM, start a new one: the guest's commands
#    resume, on its TPM as it was (PCR 16 kept; a reset one would fail the check).
wait_loop 1 "" || mark "guest loop did not start"
P16=$(grep -o "XVTPM-DOMU: loop [0-9]* ok .*" $CON | tail -n 1 | awk '{print $NF}')
kill -9 $VTPM_PID; N=$(last_loop); mark "vtpm killed after guest loop $N, PCR 16 $P16"
sleep 2
serve $UUID /var/log/vtpm-restarted.log; VTPM_PID=$SERVED
mark "vtpm restarted"
if wait_loop $((N + 2)) "pcr16 $P16"; then mark "RESTART_OK guest commands work again after loop $(last_loop), PCR 16 kept"
else mark "RESTART_FAILED: $(grep 'XVTPM-DOMU: loop' $CON | tail -n 1)"; fi
# 2. hot-plug a second vTPM, a TPM 1.2 one, into the running guest, list it, detach it.
UUID2=5e1f0a2b-7c3d-4e5f-8a9b-0c1d2e3f4a5c
vtpm create --state-dir /var/lib/xvtpm/$UUID2 --key /var/lib/xvtpm/key --tpm1.2 >/dev/null 2>&1
serve $UUID2 /var/log/vtpm2.log --tpm1.2
xl vtpm-attach $DOMID backend=0 uuid=$UUID2 2>&1 | sed 's/^/  xl: /'
if wait_loop $(last_loop) "/dev/tpm1"; then mark "ATTACH_OK guest sees /dev/tpm1"; else mark "ATTACH_FAILED"; fi
# Listed once the guest uses it, so both ends are Connected.
xl vtpm-list $DOMID 2>&1 | sed 's/^/  vtpm-list: /'
# Detach only once the guest has reported on the new device (its sysfs reads take a while).
i=0; while ! grep -q "XVTPM-DOMU: tpm1 .* pcrs" $CON && [ $i -lt 2400 ]; do i=$((i+1)); usleep 100000; done
xl vtpm-detach $DOMID 1 2>&1 | sed 's/^/  xl: /'
N=$(last_loop)
i=0; while [ $i -lt 2400 ]; do
    grep "XVTPM-DOMU: loop [0-9]* ok" $CON | awk -v n=$N '$3 > n' | grep -vq "/dev/tpm1" && break
    i=$((i+1)); usleep 100000
done
if [ $i -lt 2400 ]; then mark "DETACH_OK /dev/tpm1 gone, backend $(xenstore-read /local/domain/0/backend/vtpm/$DOMID/1/state 2>&1)"; else mark "DETACH_FAILED"; fi
xl vtpm-list $DOMID 2>&1 | sed 's/^/  vtpm-list: /'
mark "guest loop (tail):"; grep "XVTPM-DOMU: loop\|XVTPM-DOMU: tpm1" $CON | tail -n 10 | sed 's/^/  /'
xl destroy $DOMID 2>&1 | sed 's/^/  xl: /'
mark "guest destroyed; backend state $(xenstore-read /local/domain/0/backend/vtpm/$DOMID/0/state 2>&1)"
# The guest reboots: a new domain with the same vtpm uuid, served by the same vtpm process.
xl create /etc/xen/domU.cfg 'extra="console=hvc0 loglevel=4 xvtpm.phase=2"' 2>&1 | sed 's/^/  xl: /'
DOMID2=$(xl domid tpmguest 2>/dev/null)
mark "guest created again, domid $DOMID2"
i=0; while ! grep -q "XVTPM-DOMU: DONE2" $CON 2>/dev/null; do i=$((i+1)); [ $i -gt 4000 ] && break; usleep 100000; done
grep "XVTPM-DOMU: .*phase2\|XVTPM-DOMU: DONE2" $CON | sed 's/^/  /'
mark "vtpm log after the reboot:"; sed 's/^/  /' /var/log/vtpm.log | tail -n 6
[ -n "$DOMID2" ] && xl destroy $DOMID2 2>&1 | sed 's/^/  xl: /'
if grep -q "XVTPM-DOMU: DONE2" $CON && ! grep -q "XVTPM-DOMU: .*FAILED" $CON \
    && ! grep -q "_FAILED" /tmp/marks 2>/dev/null; then finish PASS; fi
finish FAIL
