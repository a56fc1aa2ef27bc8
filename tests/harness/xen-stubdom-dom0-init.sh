#!/bin/busybox sh
# dom0 /init of the stub-domain end-to-end test: the manager in its own domain owning QEMU's
# TPM (iomem=), the guest's vTPM in its own domain with its own disk, the guest with an
# ordinary vtpm= line. Then QEMU exits through isa-debug-exit (3 = pass, 5 = fail).
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mark() { echo "XVTPM-DOM0[$(cut -d' ' -f1 /proc/uptime)]: $*" | tee -a /tmp/marks; }
finish() {
    mark "RESULT $1"; sync
    if [ "$1" = PASS ]; then v='\001'; else v='\002'; fi
    printf "$v" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    sleep 1; poweroff -f
}
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp /var/lib/xen /var/log/xen/console /var/lock /var/lib/xenstored /var/lib/xvtpm
# What udev makes on a full system; Xen's hotplug scripts use /dev/stdin.
ln -s /proc/self/fd /dev/fd; ln -s fd/0 /dev/stdin; ln -s fd/1 /dev/stdout; ln -s fd/2 /dev/stderr
mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
mkdir -p /run/xen /run/xenstored /var/run/xen
for m in xen-evtchn xen-privcmd xenfs xen-gntdev xen-gntalloc xen-blkback loop; do insmod /lib/modules/$m.ko || finish FAIL; done
mount -t xenfs xenfs /proc/xen || finish FAIL
xenstored --pid-file /run/xenstored.pid || finish FAIL
i=0; while ! xenstore-read / >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 100 ] && finish FAIL; usleep 100000; done
xen-init-dom0 || finish FAIL
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console || finish FAIL
mark "xen up; dom0 TPM devices: $(ls /sys/class/tpm 2>/dev/null | tr '\n' ' ')"
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
truncate -s 16M /var/lib/xvtpm/vtpmmgr.img
mkdir -p /tmp/disk; printf 'uuid=%s\ntpm=2.0\n' $GUUID > /tmp/disk/xvtpm.conf; : > /tmp/disk/create
mkfs.ext4 -q -F -d /tmp/disk /var/lib/xvtpm/vtpm-tpmguest.img 16M || finish FAIL
cat > /etc/xen/vtpmmgr.cfg <<CFG
name = "vtpmmgr"
type = "pv"
kernel = "$IMG/vmlinux"
ramdisk = "$IMG/vtpmmgr-stubdom.cpio.gz"
extra = "console=hvc0 loglevel=4 xvtpm.auto-provision"
memory = 128
vcpus = 1
disk = [ "/var/lib/xvtpm/vtpmmgr.img,raw,xvda,w" ]
iomem = [ "fed40,5" ]
on_crash = "preserve"
CFG
cat > /etc/xen/vtpm-tpmguest.cfg <<CFG
name = "vtpm-tpmguest"
type = "pv"
kernel = "$IMG/vmlinux"
ramdisk = "$IMG/vtpm-stubdom.cpio.gz"
extra = "console=hvc0 loglevel=4"
memory = 128
vcpus = 1
disk = [ "/var/lib/xvtpm/vtpm-tpmguest.img,raw,xvda,w" ]
vtpm = [ "backend=vtpmmgr,uuid=$VUUID" ]
on_crash = "preserve"
CFG
cat > /etc/xen/tpmguest.cfg <<CFG
name = "tpmguest"
type = "pv"
kernel = "/boot/vmlinux-domU"
ramdisk = "/boot/domU.cpio.gz"
extra = "console=hvc0 loglevel=4"
memory = 256
vcpus = 1
vtpm = [ "backend=vtpm-tpmguest,uuid=$GUUID" ]
on_crash = "preserve"
CFG
T0=$(cut -d' ' -f1 /proc/uptime)
xl create /etc/xen/vtpmmgr.cfg 'extra="console=hvc0 loglevel=4 xvtpm.init xvtpm.auto-provision"' 2>&1 | sed 's/^/  xl: /'
wait_for $CON/guest-vtpmmgr.log "watching" 120 vtpmmgr || { mark "MANAGER_FAILED"; sed 's/^/  hotplug: /' /var/log/xen/xen-hotplug.log; sed 's/^/  vtpmmgr: /' $CON/guest-vtpmmgr.log; finish FAIL; }
mark "manager domain serving after $(awk -v t0=$T0 '{print $1 - t0}' /proc/uptime) s"
sed 's/^/  vtpmmgr: /' $CON/guest-vtpmmgr.log | grep -v "^  vtpmmgr: \[" | tail -n 20
T0=$(cut -d' ' -f1 /proc/uptime)
xl create /etc/xen/vtpm-tpmguest.cfg 2>&1 | sed 's/^/  xl: /'
wait_for $CON/guest-vtpm-tpmguest.log "watching" 180 vtpm-tpmguest || { mark "VTPM_DOMAIN_FAILED"; sed 's/^/  vtpm-dom: /' $CON/guest-vtpm-tpmguest.log; sed 's/^/  vtpmmgr: /' $CON/guest-vtpmmgr.log | tail -n 20; finish FAIL; }
mark "vTPM domain serving after $(awk -v t0=$T0 '{print $1 - t0}' /proc/uptime) s"
sed 's/^/  vtpm-dom: /' $CON/guest-vtpm-tpmguest.log | grep -v "^  vtpm-dom: \[" | tail -n 20
xl list | sed 's/^/  xl list: /'
T0=$(cut -d' ' -f1 /proc/uptime)
xl create /etc/xen/tpmguest.cfg 2>&1 | sed 's/^/  xl: /'
GCON=$CON/guest-tpmguest.log
wait_for $GCON "XVTPM-DOMU: devices" 400
mark "xl create to usable /dev/tpm0 in the guest: $(awk -v t0=$T0 '{print $1 - t0}' /proc/uptime) s"
wait_for $GCON "XVTPM-DOMU: DONE" 400
grep "XVTPM-DOMU" $GCON | sed 's/^/  /'
mark "vTPM domain log:"; sed 's/^/  vtpm-dom: /' $CON/guest-vtpm-tpmguest.log | grep -v "^  vtpm-dom: \[" | tail -n 10
finish PASS
