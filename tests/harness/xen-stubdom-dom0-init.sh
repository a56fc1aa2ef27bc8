#!/bin/busybox sh
# dom0 /init of the stub-domain end-to-end test: the manager in its own domain owning QEMU's
# TPM (iomem=), the guest's vTPM in its own domain with its own disk, the guest with an
# ordinary vtpm= line. Then QEMU exits through isa-debug-exit (3 = pass, 5 = fail).
EXTRA_MODULES="xen-blkback loop"
. /lib/xen-dom0-common.sh
mark "xen up; dom0 TPM devices: $(ls /sys/class/tpm 2>/dev/null | tr '\n' ' ')"
# dom0's part for vTPM stub domains: telling each its guests' lives (no vTPM served here).
RUST_LOG=info xvtpmd --stub-domains-only > /var/log/xvtpmd.log 2>&1 &
CON=/var/log/xen/console
wait_for() { # file pattern seconds [domain that must stay alive]
    i=0; while ! grep -q "$2" "$1" 2>/dev/null; do
        i=$((i+1)); [ $i -gt $(($3 * 10)) ] && return 1
        [ -n "$4" ] && [ $((i % 10)) = 0 ] && ! xl domid "$4" >/dev/null 2>&1 && return 1
        usleep 100000
    done
}
GUUID=5e1f0a2b-7c3d-4e5f-8a9b-0c1d2e3f4a5b   # the guest's vTPM
VUUID=5e1f0a2b-7c3d-4e5f-8a9b-0c1d2e3f4a60   # the vTPM domain's identity at the manager
IMG=/usr/lib/xvtpm
# The operator's path: the tool makes the disks and domain files. The uncompressed kernel
# boots faster under emulation.
xvtpm stubdom manager --images $IMG --kernel $IMG/vmlinux 2>&1 | sed 's/^/  xvtpm: /'
xvtpm stubdom vtpm --name vtpm-tpmguest --uuid $GUUID --vtpm-uuid $VUUID --images $IMG --kernel $IMG/vmlinux \
    > /tmp/vtpm.out 2>&1 || { cat /tmp/vtpm.out; finish FAIL; }
sed 's/^/  xvtpm: /' /tmp/vtpm.out
sed 's/^/  cfg: /' /etc/xen/vtpmmgr.cfg /etc/xen/vtpm-tpmguest.cfg
cat > /etc/xen/tpmguest.cfg <<CFG
name = "tpmguest"
type = "pv"
kernel = "/boot/vmlinux-domU"
ramdisk = "/boot/domU.cpio.gz"
extra = "console=hvc0 loglevel=4"
memory = 256
vcpus = 1
$(tail -n 1 /tmp/vtpm.out)
on_crash = "preserve"
CFG
T0=$(cut -d' ' -f1 /proc/uptime)
xl create /etc/xen/vtpmmgr.cfg 'extra="console=hvc0 xvtpm.init"' 2>&1 | sed 's/^/  xl: /'
wait_for $CON/guest-vtpmmgr.log "watching" 120 vtpmmgr || { mark "MANAGER_FAILED"; sed 's/^/  hotplug: /' /var/log/xen/xen-hotplug.log; sed 's/^/  vtpmmgr: /' $CON/guest-vtpmmgr.log; finish FAIL; }
mark "manager domain serving after $(awk -v t0=$T0 '{print $1 - t0}' /proc/uptime) s"
sed 's/^/  vtpmmgr: /' $CON/guest-vtpmmgr.log | grep -v "^  vtpmmgr: \[" | tail -n 20
# The vTPM domain's identity is provisioned from dom0, through the manager's domain: the
# manager provisions nothing on its own.
adm() { xvtpm "$@" --manager-domain vtpmmgr 2>&1 | tr '\n' ' '; }
T0=$(cut -d' ' -f1 /proc/uptime)
mark "admin: provisioned $(adm vtpm provision --uuid $VUUID)"
mark "admin: one command over the admin device took $(awk -v t0=$T0 '{print $1 - t0}' /proc/uptime) s"
mark "admin: before the first start $(adm vtpm show $VUUID --json)"
mark "admin: devices left in xenstore: [$(xenstore-list /local/domain/0/device/xvtpm-admin 2>/dev/null | tr '\n' ' ')]"
T0=$(cut -d' ' -f1 /proc/uptime)
xl create /etc/xen/vtpm-tpmguest.cfg 2>&1 | sed 's/^/  xl: /'
wait_for $CON/guest-vtpm-tpmguest.log "watching" 180 vtpm-tpmguest || { mark "VTPM_DOMAIN_FAILED"; sed 's/^/  vtpm-dom: /' $CON/guest-vtpm-tpmguest.log; sed 's/^/  vtpmmgr: /' $CON/guest-vtpmmgr.log | tail -n 20; finish FAIL; }
mark "vTPM domain serving after $(awk -v t0=$T0 '{print $1 - t0}' /proc/uptime) s"
sed 's/^/  vtpm-dom: /' $CON/guest-vtpm-tpmguest.log | grep -v "^  vtpm-dom: \[" | tail -n 20
mark "admin: after the first start $(adm vtpm show $VUUID --json)"
mark "admin: groups $(adm group list --json)"
xl list | sed 's/^/  xl list: /'
T0=$(cut -d' ' -f1 /proc/uptime)
xl create /etc/xen/tpmguest.cfg 2>&1 | sed 's/^/  xl: /'
GCON=$CON/guest-tpmguest.log
wait_for $GCON "XVTPM-DOMU: devices" 400
mark "xl create to usable /dev/tpm0 in the guest: $(awk -v t0=$T0 '{print $1 - t0}' /proc/uptime) s"
wait_for $GCON "XVTPM-DOMU: DONE" 400
grep "XVTPM-DOMU" $GCON | sed 's/^/  /'
mark "vTPM domain log:"; sed 's/^/  vtpm-dom: /' $CON/guest-vtpm-tpmguest.log | tail -n 4
last_loop() { grep -o "XVTPM-DOMU: loop [0-9]* ok" $GCON | tail -n 1 | awk '{print $3}'; }
# 1. The vTPM domain is destroyed while the guest uses its TPM: the guest's next command fails,
#    and the guest goes on running.
i=0; while [ -z "$(last_loop)" ] && [ $i -lt 600 ]; do i=$((i+1)); usleep 100000; done
pcr_of_loop() { grep -o "XVTPM-DOMU: loop $1 ok.*" $GCON | head -n 1 | sed 's/.*pcr16 //'; }
mark "guest's life as dom0's xvtpmd told the vTPM domain: $(xenstore-read /local/domain/$(xl domid vtpm-tpmguest)/backend/vtpm/$(xl domid tpmguest)/0/xvtpm-guest-life 2>&1)"
P=$(pcr_of_loop "$(last_loop)")
xl destroy vtpm-tpmguest 2>&1 | sed 's/^/  xl: /'
N=$(last_loop); T0=$(cut -d' ' -f1 /proc/uptime)
mark "vTPM domain destroyed after guest loop $N"
i=0; while ! grep "XVTPM-DOMU: loop [0-9]* err" $GCON | awk -v n=$N '$3 > n' | grep -q err; do
    i=$((i+1)); [ $i -gt 2000 ] && break; usleep 100000
done
E=$(grep "XVTPM-DOMU: loop [0-9]* err" $GCON | awk -v n=$N '$3 > n' | head -n 1)
if [ -n "$E" ]; then mark "DESTROYED_ERROR after $(awk -v t0=$T0 '{print $1 - t0}' /proc/uptime) s: $E"; else mark "DESTROYED_HANG no error within 200 s"; fi
i=0; while ! grep "XVTPM-DOMU: loop [0-9]* err" $GCON | awk -v n=$N '$3 > n' | sed -n 2p | grep -q err; do
    i=$((i+1)); [ $i -gt 2000 ] && break; usleep 100000
done
mark "guest after the destroy: $(grep 'XVTPM-DOMU: loop' $GCON | tail -n 1)"
xl list | sed 's/^/  xl list: /'
# 2. The vTPM domain is made again under the running guest, from its disk, and the guest's
#    device is moved to it (xl vtpm-detach, which gives up on the dead backend after libxl's
#    timeout, then vtpm-attach): the guest's TPM resumes, PCRs as they were.
E=$(grep -o "XVTPM-DOMU: loop [0-9]* err" $GCON | tail -n 1 | awk '{print $3}')
T0=$(cut -d' ' -f1 /proc/uptime)
n=$(grep -c watching $CON/guest-vtpm-tpmguest.log)
xl create /etc/xen/vtpm-tpmguest.cfg 2>&1 | sed 's/^/  xl: /'
i=0; while [ "$(grep -c watching $CON/guest-vtpm-tpmguest.log)" = "$n" ]; do
    i=$((i+1)); [ $i -gt 1800 ] && { mark "VTPM_RESTART_FAILED"; sed 's/^/  vtpm-dom: /' $CON/guest-vtpm-tpmguest.log | tail -n 20; finish FAIL; }; usleep 100000
done
mark "vTPM domain restarted after $(awk -v t0=$T0 '{print $1 - t0}' /proc/uptime) s:"
sed 's/^/  vtpm-dom: /' $CON/guest-vtpm-tpmguest.log | sed -n '/xvtpm-stubdom: serving/h; /xvtpm-stubdom: serving/!H; ${x;p}' | grep -v "^$" | head -n 8
T0=$(cut -d' ' -f1 /proc/uptime)
xl vtpm-detach tpmguest 0 2>&1 | sed 's/^/  xl: /'
mark "detached in $(awk -v t0=$T0 '{print $1 - t0}' /proc/uptime) s"
# (vtpm-attach takes its keys as separate arguments, not the vtpm= line's comma list.)
xl vtpm-attach tpmguest backend=vtpm-tpmguest uuid=$GUUID 2>&1 | sed 's/^/  xl: /'
# As docs/stubdom.md says: the attach is done when the guest's side is Connected (4). A guest
# kernel still removing the old device when the new one appears writes Closed (6) into the
# new one and never probes it; detached and attached again, it does.
FE=/local/domain/$(xl domid tpmguest)/device/vtpm/0/state
try=1
while true; do
    i=0; st=$(xenstore-read $FE 2>&1)
    while [ "$st" != 4 ] && [ "$st" != 6 ] && [ $i -lt 600 ]; do
        i=$((i+1)); usleep 100000; st=$(xenstore-read $FE 2>&1)
    done
    [ "$st" = 6 ] && [ $try -lt 3 ] || break
    mark "REATTACH_CLOSED the guest closed the new device (state 6, attach $try); detached and attached again"
    xl vtpm-detach tpmguest 0 2>&1 | sed 's/^/  xl: /'
    xl vtpm-attach tpmguest backend=vtpm-tpmguest uuid=$GUUID 2>&1 | sed 's/^/  xl: /'
    try=$((try+1))
done
mark "guest's side of the new device: state $st after $(awk -v t0=$T0 '{print $1 - t0}' /proc/uptime) s, attach $try"
xl vtpm-list tpmguest 2>&1 | sed 's/^/  xl vtpm-list: /'
i=0; while ! grep -o "XVTPM-DOMU: loop [0-9]* ok" $GCON | awk -v e=$E '$3 > e' | grep -q ok; do
    i=$((i+1)); [ $i -gt 3000 ] && break; usleep 100000
done
M=$(grep -o "XVTPM-DOMU: loop [0-9]* ok" $GCON | awk -v e=$E '$3 > e {print $3; exit}')
mark "guest's TPM back after $(awk -v t0=$T0 '{print $1 - t0}' /proc/uptime) s: loop ${M:-none}"
mark "REATTACHED pcr16 before $P after $(pcr_of_loop "${M:-none}")"
grep "XVTPM-DOMU: loop" $GCON | tail -n 3 | sed 's/^/  /'
sed 's/^/  vtpm-dom: /' $CON/guest-vtpm-tpmguest.log | grep -i "resumed\|reset\|life\|refus\|snapshot" | tail -n 6
if [ -z "$M" ]; then
    # The guest's TPM did not come back: what the guest's kernel, xenstore and the vTPM domain say.
    grep "XVTPM-DOMU: dmesg\|XVTPM-DOMU: blocked" $GCON | tail -n 80 | sed 's/^/  /'
    GID=$(xl domid tpmguest)
    xenstore-ls -f /local/domain/$GID/device/vtpm 2>&1 | sed 's/^/  xenstore: /'
    xenstore-ls -f /local/domain/$(xl domid vtpm-tpmguest)/backend/vtpm 2>&1 | sed 's/^/  xenstore: /'
    sed 's/^/  vtpm-dom: /' $CON/guest-vtpm-tpmguest.log | tail -n 15
fi
sed 's/^/  xvtpmd: /' /var/log/xvtpmd.log | tail -n 4
xl list | sed 's/^/  xl list: /'
# 3. xl save and xl restore of the guest: the vTPM domain hears of the suspend from dom0's
#    xvtpmd (xvtpm-guest-domain), and the restored guest continues its TPM.
P=$(pcr_of_loop "$(last_loop)"); T0=$(cut -d' ' -f1 /proc/uptime)
xl save tpmguest /tmp/guest.save 2>&1 | grep -v 'progress:' | sed 's/^/  xl: /'
mark "saved after $(awk -v t0=$T0 '{print $1 - t0}' /proc/uptime) s"
# The guest ran on while the save began: what it printed then is before the suspend.
L=$(grep -o "XVTPM-DOMU: loop [0-9]*" $GCON | tail -n 1 | awk '{print $3}')
xl restore /tmp/guest.save 2>&1 | grep -v 'progress:' | sed 's/^/  xl: /'
rm -f /tmp/guest.save
ok_after() { grep -o "XVTPM-DOMU: loop [0-9]* ok.*pcr16 0x" $GCON | awk -v e=$1 '$3 > e {print $3; exit}'; }
i=0; while [ -z "$(ok_after $L)" ]; do i=$((i+1)); [ $i -gt 3000 ] && break; usleep 100000; done
M=$(ok_after $L)
mark "guest's TPM back after save and restore: $(awk -v t0=$T0 '{print $1 - t0}' /proc/uptime) s after the save began, loop ${M:-none}"
mark "RESTORED pcr16 before $P after $(pcr_of_loop "${M:-none}")"
sed 's/^/  vtpm-dom: /' $CON/guest-vtpm-tpmguest.log | grep -i "suspend\|continues\|reset" | tail -n 4
# 4. The guest is shut down and boots again: a new guest, a reset TPM; what it made before
#    (a persistent key, an NV index) is still there.
T0=$(cut -d' ' -f1 /proc/uptime)
xl destroy tpmguest 2>&1 | sed 's/^/  xl: /'
mark "guest destroyed in $(awk -v t0=$T0 '{print $1 - t0}' /proc/uptime) s"
xl create /etc/xen/tpmguest.cfg 'extra="console=hvc0 loglevel=4 xvtpm.phase=2"' 2>&1 | sed 's/^/  xl: /'
wait_for $GCON "XVTPM-DOMU: DONE2" 400
grep "XVTPM-DOMU: .*phase2\|XVTPM-DOMU: DONE2" $GCON | sed 's/^/  /'
mark "manager log:"; sed 's/^/  vtpmmgr: /' $CON/guest-vtpmmgr.log | tail -n 8
xl destroy tpmguest; xl destroy vtpm-tpmguest; xl destroy vtpmmgr
finish PASS
