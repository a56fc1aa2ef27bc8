#!/bin/busybox sh
# dom0 /init of the service scenario: the xvtpm package installed with dpkg, the manager and
# xvtpmd started with their units' ExecStart lines and tmpfiles (no systemd here), the manager
# on dom0's TPM (QEMU's tpm-tis behind swtpm) through /dev/tpmrm0. Three guests from plain
# domain files (a vtpm= line each) get TPMs; one guest's vtpm is killed and the daemon
# restarts it; xvtpmd itself is restarted under the running guests; one guest is saved and
# restored; one guest is destroyed and its vtpm stops; a guest with an unknown uuid is refused with auto-create off. QEMU exits 3
# when all ran.
. /lib/xen-dom0-common.sh
mark "xen up"
CON=/var/log/xen/console
install_service
status() { xvtpm status --json 2>&1; }
guest() { # name n uuid: a plain domain file with one vtpm= line
    cat > /etc/xen/$1.cfg <<EOF
name = "$1"
type = "pv"
kernel = "/boot/vmlinux-domU"
ramdisk = "/boot/domU.cpio.gz"
extra = "console=hvc0 loglevel=4 xvtpm.phase=service xvtpm.n=$2"
memory = 192
vtpm = [ "backend=0,uuid=$3" ]
EOF
    xl create /etc/xen/$1.cfg 2>&1 | sed 's/^/  xl: /'
}
ready() { i=0; while ! grep -q "svc ready" $CON/guest-$1.log 2>/dev/null; do i=$((i+1)); [ $i -gt 1200 ] && break; usleep 100000; done
    mark "SVC $1 $(grep -o 'svc ready.*' $CON/guest-$1.log | head -n 1)"
    grep -q "svc ready" $CON/guest-$1.log 2>/dev/null || { mark "$1 not ready; xvtpmd log:"; tail -n 30 /var/log/xvtpmd.log | cut -c1-300 | sed 's/^/  /'; }; }
U1=11111111-1111-4111-8111-111111111111; U2=22222222-2222-4222-8222-222222222222
U3=33333333-3333-4333-8333-333333333333; U4=44444444-4444-4444-8444-444444444444
# One after another: each vTPM is created on first use while libxl waits (10 s) for its
# backend, which under TCG with other guests booting is not always enough.
guest g1 1 $U1; ready g1; guest g2 2 $U2; ready g2; guest g3 3 $U3; ready g3
mark "SVCSTATUS1 $(status)"
# Each guest tried to write an HVM TPM request for g2's vTPM into dom0's xenstore.
mark "SVCHVMREQ $(grep -h -o 'svc request write.*' $CON/guest-g1.log $CON/guest-g2.log $CON/guest-g3.log | cut -c1-120 | tr '\n' '|') requests: $(xenstore-ls /local/domain/0/xvtpm-hvm 2>&1 | tr '\n' ' ' | cut -c1-200) hvm vtpms: $(status | grep -o '"hvm":true' | wc -l)"
pid_of() { status | tr '{' '\n' | grep "\"uuid\":\"$1\"" | sed -n 's/.*"pid":\([0-9]*\).*/\1/p'; }
# What /proc says of a vtpm's sandbox, and what its state directory looks like from outside.
field() { awk -v f="$2:" '$1 == f {print $2}' /proc/$1/status; }
sandbox_of() { p=$(pid_of $2)
    echo "$1 uid=$(field $p Uid) gid=$(field $p Gid) groups=$(field $p Groups) capeff=$(field $p CapEff) capprm=$(field $p CapPrm) nnp=$(field $p NoNewPrivs) seccomp=$(field $p Seccomp)" \
        "mounts=$(awk '{print $5}' /proc/$p/mountinfo | sort | tr '\n' ,) vtpms=$(ls /proc/$p/root/var/lib/xvtpm/vtpms | tr '\n' ,)" \
        "etc=$(ls /proc/$p/root/etc 2>&1 | wc -l) state=$(ls -ldn /var/lib/xvtpm/vtpms/$2/state | awk '{print $1 "/" $3}')" \
        "core=$(awk '/^Max core file size/ {print $5}' /proc/$p/limits) xendevs=$(ls -l /proc/$p/fd | grep -o -E 'evtchn|gntdev|gntalloc|privcmd|hypercall|xenbus' | sort | tr '\n' ,)"; }
for g in "g1 $U1" "g2 $U2" "g3 $U3"; do mark "SVCSANDBOX $(sandbox_of $g)"; done
# Each vtpm's domain helper (its child): who it runs as, its filter, and what each costs in PSS.
pss() { awk '/^Pss:/ {print $2}' /proc/$1/smaps_rollup; }
priv() { awk '/^Private_(Clean|Dirty):/ {s += $2} END {print s}' /proc/$1/smaps_rollup; }
for g in "g1 $U1" "g2 $U2" "g3 $U3"; do set -- $g; p=$(pid_of $2); h=""
    for d in /proc/[0-9]*; do [ "$(awk '/^PPid:/ {print $2}' $d/status 2>/dev/null)" = "$p" ] && h=${d#/proc/}; done
    mark "SVCHELPER $1 helper=${h:-none} uid=$(field $h Uid) seccomp=$(field $h Seccomp) nnp=$(field $h NoNewPrivs) capeff=$(field $h CapEff) xendevs=$(ls -l /proc/$h/fd | grep -o -E 'evtchn|gntdev|privcmd|hypercall|xenbus' | sort | tr '\n' ,) pss_vtpm=$(pss $p) pss_helper=$(pss $h) private_vtpm=$(priv $p) private_helper=$(priv $h)"
done
mark "SVCDAEMONCAPS eff=$(field $DAEMON CapEff) bnd=$(field $DAEMON CapBnd)"
last_tick() { grep -o "svc tick [0-9]* pcr16 [0-9a-fA-Fx]*" $CON/guest-$1.log | tail -n 1; }
tick_after() { # guest tick-number: the first tick after it (waits)
    i=0; while [ $i -lt 600 ]; do
        l=$(grep -o "svc tick [0-9]* pcr16 [0-9a-fA-Fx]*" $CON/guest-$1.log | awk -v n=$2 '$3 > n + 1' | head -n 1)
        [ -n "$l" ] && { echo "$l"; return 0; }; i=$((i+1)); usleep 100000
    done; echo "no tick after $2"; }
# 1. g2's vtpm made to call what its filter forbids (a thread's next system call turned into
# socket(AF_INET) with ptrace): the filter kills it, the daemon logs it and restarts it; g2's
# PCR 16 is as it was; g1 goes on meanwhile.
P2=$(pid_of $U2); N=$(last_tick g2 | awk '{print $3}'); N1=$(last_tick g1 | awk '{print $3}')
mark "SVC inject: $(syscall-inject $P2 2>&1 | tr '\n' ' ')"
i=0; while [ "$(pid_of $U2)" = "$P2" ] || [ -z "$(pid_of $U2)" ]; do i=$((i+1)); [ $i -gt 200 ] && break; usleep 100000; done
mark "SVC killed g2 vtpm $P2, now $(pid_of $U2): $(tick_after g2 $N)"
mark "SVC meanwhile g1: $(tick_after g1 $N1)"
mark "SVC sigsys log: $(grep 'forbidden system call' /var/log/xvtpmd.log | tail -n 1 | cut -d']' -f2-)"
mark "SVCSTATUSK $(status)"
# 2. xvtpmd restarted under the running guests (as systemctl restart: SIGTERM, start again).
N1=$(last_tick g1 | awk '{print $3}'); N2=$(last_tick g2 | awk '{print $3}')
kill -TERM $DAEMON; i=0; while kill -0 $DAEMON 2>/dev/null; do i=$((i+1)); [ $i -gt 400 ] && break; usleep 50000; done
start_daemon
mark "SVC daemon restarted: g1 $(tick_after g1 $N1); g2 $(tick_after g2 $N2)"
# 3. g1 saved and restored: its device goes (xvtpmd stops its vtpm, which keeps the suspended
# TPM), the restored domain's device comes (a new vtpm continues it).
xl save g1 /tmp/g1.save 2>&1 | sed 's/^/  xl: /'
N1=$(last_tick g1 | awk '{print $3}')   # the saved guest ticks no more
xl restore /tmp/g1.save 2>&1 | sed 's/^/  xl: /'; rm -f /tmp/g1.save
mark "SVC g1 restored: $(tick_after g1 $N1)"
# 4. g3 destroyed: its vtpm stops.
P3=$(pid_of $U3)
xl destroy g3 2>&1 | sed 's/^/  xl: /'
if [ -z "$P3" ]; then mark "SVC g3 vtpm had no pid"; else
    i=0; while kill -0 $P3 2>/dev/null; do i=$((i+1)); [ $i -gt 200 ] && break; usleep 100000; done
    kill -0 $P3 2>/dev/null && mark "SVC g3 vtpm $P3 still running" || mark "SVC g3 vtpm $P3 stopped"
fi
# 5. auto-create off: a guest whose uuid the manager does not know is refused, by name.
sed -i 's/^auto-create = true/auto-create = false/' /etc/xvtpm/xvtpmd.toml
kill -TERM $DAEMON; i=0; while kill -0 $DAEMON 2>/dev/null; do i=$((i+1)); [ $i -gt 400 ] && break; usleep 50000; done
start_daemon
# xl gives up on a device its backend closes, and destroys the domain: the refusal is in
# xvtpmd's log (the journal, under systemd), naming the guest, the uuid and the remedy.
guest g4 4 $U4 > /tmp/g4.xl 2>&1; cat /tmp/g4.xl
mark "SVC g4 xl: $(grep -c 'unable to add vtpm devices' /tmp/g4.xl) failed; domid $(xl domid g4 2>&1 | tail -n 1)"
mark "SVC g4 refused: $(grep '44444444-4444-4444-8444-444444444444' /var/log/xvtpmd.log | grep ERROR | tail -n 1 | cut -d']' -f2-)"
mark "SVCSTATUS2 $(status)"
mark "xvtpmd log:"; tail -n 40 /var/log/xvtpmd.log | cut -c1-220 | sed 's/^/  /'
finish PASS
