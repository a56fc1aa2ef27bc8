# Sourced by the dom0 inits of the Xen scenarios: mounts, Xen's modules (plus $EXTRA_MODULES),
# xenstored, xen-init-dom0 and xenconsoled; `mark` reports on the serial console, `finish`
# ends the run through isa-debug-exit (QEMU exits with 3 = pass, 5 = fail).
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mark() { echo "XVTPM-DOM0[$(cut -d' ' -f1 /proc/uptime)]: $*" | tee -a /tmp/marks; }
finish() {
    mark "RESULT $1"; sync
    if [ "$1" = PASS ]; then v='\001'; else v='\002'; fi
    printf "$v" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    sleep 1; poweroff -f
}
serve() { # uuid logfile [--tpm1.2]: start `vtpm serve` for a device, wait until it watches xenstore
    RUST_LOG=info vtpm serve --state-dir /var/lib/xvtpm/$1 --key /var/lib/xvtpm/key --uuid $1 --domid 0 $3 > $2 2>&1 &
    SERVED=$!
    i=0; while ! grep -q watching $2; do i=$((i+1)); [ $i -gt 200 ] && { cat $2; finish FAIL; }; usleep 50000; done
}
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp /var/lib/xen /var/log/xen/console /var/lock /var/lib/xenstored /var/lib/xvtpm
# What udev makes on a full system; Xen's hotplug scripts use /dev/stdin.
ln -s /proc/self/fd /dev/fd; ln -s fd/0 /dev/stdin; ln -s fd/1 /dev/stdout; ln -s fd/2 /dev/stderr
mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
mkdir -p /run/xen /run/xenstored /var/run/xen
for m in xen-evtchn xen-privcmd xenfs xen-gntdev xen-gntalloc $EXTRA_MODULES; do
    insmod /lib/modules/$m.ko || finish FAIL
done
mount -t xenfs xenfs /proc/xen || finish FAIL
xenstored --pid-file /run/xenstored.pid || finish FAIL
i=0; while ! xenstore-read / >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 100 ] && finish FAIL; usleep 100000; done
xen-init-dom0 || finish FAIL
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console || finish FAIL
install_service() { # the package installed with dpkg, the manager and xvtpmd started as their units do
    # dpkg's database, empty: the libraries the package depends on are files of this image.
    mkdir -p /var/lib/dpkg/info /var/lib/dpkg/updates /var/lib/dpkg/triggers /var/lib/dpkg/alternatives
    : > /var/lib/dpkg/status; : > /var/lib/dpkg/available
    mark "dpkg: $(dpkg -i --force-depends /root/xvtpm.deb 2>&1 | grep -v '^(Reading' | tr '\n' ' ' | cut -c1-400)"
    mark "installed: $(dpkg-query -W -f='${Package} ${Version} ${Status}' xvtpm 2>&1)"
    # What systemd would do: tmpfiles, then each unit's ExecStart.
    awk '$1 == "d" {print $2, $3}' /usr/lib/tmpfiles.d/xvtpm.conf | while read -r d m; do mkdir -p "$d"; chmod "$m" "$d"; done
    execstart() { sed -n 's/^ExecStart=//p' /lib/systemd/system/$1.service; }
    [ -e /dev/tpmrm0 ] || { mark "no /dev/tpmrm0 in dom0"; ls -l /dev/tpm* | sed 's/^/  /'; finish FAIL; }
    vtpmmgr init --store /var/lib/xvtpm/mgr.img --tpm tpmrm:/dev/tpmrm0 --pcrs 0,1,2,3,4,5,6,7 2>&1 | tail -n 2 | sed 's/^/  vtpmmgr: /'
    MGR_CMD=$(execstart vtpmmgr); mark "vtpmmgr.service: $MGR_CMD"
    $MGR_CMD > /var/log/vtpmmgr.log 2>&1 &
    i=0; while [ ! -S /run/xvtpm/admin.sock ]; do i=$((i+1)); [ $i -gt 200 ] && { cat /var/log/vtpmmgr.log; finish FAIL; }; usleep 50000; done
    D_CMD=$(execstart xvtpmd); mark "xvtpmd.service: $D_CMD"
    start_daemon() { n0=$(grep -c watching /var/log/xvtpmd.log 2>/dev/null); $D_CMD >> /var/log/xvtpmd.log 2>&1 & DAEMON=$!
        i=0; while [ "$(grep -c watching /var/log/xvtpmd.log)" -le "${n0:-0}" ]; do
            i=$((i+1)); [ $i -gt 200 ] && { cat /var/log/xvtpmd.log; finish FAIL; }; usleep 50000; done; }
    start_daemon
}
