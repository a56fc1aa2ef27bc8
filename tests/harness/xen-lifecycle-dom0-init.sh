#!/bin/busybox sh
# dom0 /init of the lifecycle scenario: a guest uses our vTPM (PCR 16 extended, a signing key
# loaded) while dom0 stops the vtpm with SIGTERM and restarts it, kills it with -9 and
# restarts it, and saves and restores the guest with xl. After each, the guest's next ticks
# say whether PCR 16 is as it was and the key still signs. Then the fallback: a kill -9 with
# the snapshot gone is refused until the guest reboots. QEMU exits 3 when all ran.
. /lib/xen-dom0-common.sh
mark "xen up"
UUID=5e1f0a2b-7c3d-4e5f-8a9b-0c1d2e3f4a5b
SNAPS=/run/xvtpm/snapshots
head -c 32 /dev/urandom > /var/lib/xvtpm/key
vtpm create --state-dir /var/lib/xvtpm/$UUID --key /var/lib/xvtpm/key 2>&1 | sed 's/^/  vtpm: /' || finish FAIL
n=0; start() { n=$((n+1)); LOG=/var/log/vtpm-$n.log; serve $UUID $LOG; VTPM_PID=$SERVED; }
now() { cut -d' ' -f1 /proc/uptime; }
CON=/var/log/xen/console/guest-tpmguest.log
last_tick() { grep -o "XVTPM-DOMU: tick [0-9]*" $CON 2>/dev/null | tail -n 1 | awk '{print $3}'; }
# The first tick numbered above $1 + 1 (the one in flight at the event may straddle it).
tick_after() {
    i=0; while [ $i -lt 1200 ]; do
        l=$(grep "XVTPM-DOMU: tick [0-9]*" $CON | awk -v n=$1 '$3 > n + 1' | head -n 1)
        [ -n "$l" ] && { echo "$l" | sed 's/.*XVTPM-DOMU: //'; return 0; }
        i=$((i+1)); usleep 100000
    done; echo "no tick after $1"; return 1
}
event() { # name: report the guest's first tick after the event and how long it took
    l=$(tick_after $N); mark "LC $1 after $(echo "$(now) $T0" | awk '{printf "%.1f", $1 - $2}') s: $l"
}
stopped() { i=0; while kill -0 $1 2>/dev/null; do i=$((i+1)); [ $i -gt 200 ] && return 1; usleep 50000; done; }

start
xl create /etc/xen/domU.cfg 'extra="console=hvc0 loglevel=4 xvtpm.phase=lifecycle"' 2>&1 | sed 's/^/  xl: /'
i=0; while ! grep -q "XVTPM-DOMU: tick 3 " $CON 2>/dev/null; do i=$((i+1)); [ $i -gt 3000 ] && break; usleep 100000; done
grep -q "XVTPM-DOMU: tick 3 " $CON || { mark "the guest did not start:"; tail -n 30 $CON; cat $LOG; finish FAIL; }
grep "XVTPM-DOMU: lc \|XVTPM-DOMU: tick 1 " $CON | sed 's/^/  /'

# 1. A planned stop: SIGTERM, a new vtpm.
N=$(last_tick); T0=$(now)
kill -TERM $VTPM_PID; stopped $VTPM_PID || mark "vtpm ignored SIGTERM"
grep -h "kept in snapshot" $LOG | sed 's/^/  vtpm: /'
start; event sigterm
# 2. An unplanned stop: kill -9, a new vtpm.
N=$(last_tick); T0=$(now)
kill -9 $VTPM_PID; stopped $VTPM_PID
start; event kill9
grep -h "resumed from snapshot" /var/log/vtpm-*.log | sed 's/^/  vtpm: /'
# 3. xl save, xl restore.
N=$(last_tick); T0=$(now)
xl save tpmguest /tmp/guest.save 2>&1 | sed 's/^/  xl: /'
mark "saved after $(echo "$(now) $T0" | awk '{printf "%.1f", $1 - $2}') s, $(ls -l /tmp/guest.save | awk '{print $5}') bytes"
xl restore /tmp/guest.save 2>&1 | sed 's/^/  xl: /'
event restore
grep -h "suspended\|continues" $LOG | sed 's/^/  vtpm: /'
rm -f /tmp/guest.save
# 4. The fallback: kill -9 with the snapshot gone. The running guest is refused, not reset.
N=$(last_tick); T0=$(now)
kill -9 $VTPM_PID; stopped $VTPM_PID
rm -f $SNAPS/*.snapshot
start; event refused
grep -h "cannot be resumed" $LOG | cut -c1-200 | sed 's/^/  vtpm: /'
# ... until it reboots: a new domain, whose TPM starts reset (PCR 16 extended once again).
grep "XVTPM-DOMU: tick\|XVTPM-DOMU: dmesg" $CON | tail -n 16 | sed 's/^/  /' > /tmp/ticks
xl destroy tpmguest 2>&1 | sed 's/^/  xl: /'
: > $CON
xl create /etc/xen/domU.cfg 'extra="console=hvc0 loglevel=4 xvtpm.phase=lifecycle"' 2>&1 | sed 's/^/  xl: /'
i=0; while ! grep -q "XVTPM-DOMU: tick 1 " $CON 2>/dev/null; do i=$((i+1)); [ $i -gt 3000 ] && break; usleep 100000; done
mark "LC rebooted: $(grep -o 'XVTPM-DOMU: tick 1 .*' $CON | head -n 1 | sed 's/XVTPM-DOMU: //')"
mark "vtpm logs:"; tail -n 40 /var/log/vtpm-*.log | cut -c1-260 | sed 's/^/  /'
mark "the guest's last ticks before its reboot:"; cat /tmp/ticks
xl destroy tpmguest 2>&1 | sed 's/^/  xl: /'
finish PASS
