# Sourced by the stub domains' inits: mounts, the role's modules (in /lib/modules/order), and
# its disk xvda. `say` logs to the domain's console; `stop` logs why and powers off.
/bin/busybox --install -s /bin
export PATH=/bin LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu RUST_LOG_STYLE=never
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
say() { echo "xvtpm-stubdom: $*"; }
stop() { say "$*; powering off"; sync; poweroff -f; }
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m.ko" || stop "cannot load module $m"; done
i=0; while [ ! -b /dev/xvda ]; do i=$((i+1)); [ $i -gt 300 ] && stop "no disk xvda (disk= in the domain file)"; usleep 100000; done
