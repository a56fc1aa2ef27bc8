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
