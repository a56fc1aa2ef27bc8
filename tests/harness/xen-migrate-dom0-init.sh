#!/bin/busybox sh
# dom0 /init of the migrate scenario: two hosts, each Xen under its own QEMU with its own
# TPM, manager and xvtpmd (the package, as in the hvm scenario), one emulated network between
# them (src 10.9.0.1, dst 10.9.0.2; dom0's command line says which: xvtpm.role=src|dst).
# The managers exchange migration keys over the network (dst pins src's); src boots an HVM
# guest with a TPM 2.0 (the wrapper's line) that extends PCR 16, loads a signing key, seals a
# secret to PCR 16 and then ticks (reads PCR 16, signs, unseals); `xvtpm migrate` moves it to
# dst (`--via nc`: busybox's nc reaches dst's `xvtpm migrate-accept`). dst reports the guest's
# ticks there; src what is left of the vTPM after it left. Each QEMU exits 3 when its part ran.
EXTRA_MODULES=e1000
. /lib/xen-dom0-common.sh
ROLE=$(sed -n 's/.*xvtpm\.role=\([a-z]*\).*/\1/p' /proc/cmdline)
mark "xen up ($ROLE): $(xl info 2>/dev/null | grep -E 'virt_caps' | tr -s ' ')"
install_service
UH=44444444-4444-4444-8444-444444444444
SRC=10.9.0.1; DST=10.9.0.2
wait_for() { # file pattern seconds: waits until a line of file matches
    end=$(( $(cut -d. -f1 /proc/uptime) + $3 ))
    while ! grep -q "$2" "$1" 2>/dev/null; do [ "$(cut -d. -f1 /proc/uptime)" -gt $end ] && return 1; usleep 200000; done; }
report() { grep -a "XVTPM-DOMU" "$1" | sed "s/^.*XVTPM-DOMU: /XVTPM-DOMU: $2 /" | cut -c1-300 | while read -r l; do echo "$l"; done; }
fetch() { # host port file seconds: what a peer's `nc -l` serves, retried until it has a line
    end=$(( $(cut -d. -f1 /proc/uptime) + $4 ))
    until nc "$1" "$2" </dev/null >"$3" 2>/dev/null && [ -s "$3" ]; do
        [ "$(cut -d. -f1 /proc/uptime)" -gt $end ] && return 1; sleep 1; done; }
send() { # host port file seconds: to a peer's `nc -l`, retried until it is listening
    end=$(( $(cut -d. -f1 /proc/uptime) + $4 ))
    until nc "$1" "$2" <"$3" 2>/dev/null; do [ "$(cut -d. -f1 /proc/uptime)" -gt $end ] && return 1; sleep 1; done; }
diag() {
    mark "DIAG serial tail:"; tail -n 12 /var/log/mig.serial 2>&1 | cut -c1-200 | sed 's/^/  /'
    mark "DIAG xl list:"; xl list 2>&1 | sed 's/^/  /'
    mark "DIAG xvtpmd log:"; tail -n 25 /var/log/xvtpmd.log | cut -c1-250 | sed 's/^/  /'
    mark "DIAG qemu-dm log:"; tail -n 8 /var/log/xen/qemu-dm-mig*.log 2>&1 | sed 's/^/  /'
}

ME=$SRC; [ "$ROLE" = dst ] && ME=$DST
ip link set eth0 up && ip addr add $ME/24 dev eth0 || { mark "no network: $(ip link 2>&1 | tr '\n' ' ')"; finish FAIL; }
xvtpm vtpm migration-key > /tmp/my.key

if [ "$ROLE" = dst ]; then
    # Every wait bounded: a src that failed early costs minutes here, not the QEMU timeout.
    timeout 600 nc -l -p 7001 </tmp/my.key >/dev/null 2>&1 &
    timeout 600 nc -l -p 7002 >/tmp/src.key 2>/dev/null || { mark "no key from src"; finish FAIL; }
    mark "MIGKEY src key $(wc -c </tmp/src.key) bytes: $(xvtpm vtpm trust-source "$(cat /tmp/src.key)" 2>&1)"
    # One migration: busybox's nc runs the accepting end on the connection.
    RUST_LOG=info nc -l -p 7000 -e xvtpm migrate-accept 2>/var/log/accept.log &
    i=0; until netstat -ltn 2>/dev/null | grep -q ':7000 '; do i=$((i+1)); [ $i -gt 50 ] && { mark "nc on 7000 did not listen"; finish FAIL; }; usleep 100000; done
    echo ready >/tmp/ready; timeout 1200 nc -l -p 7003 </tmp/ready >/dev/null 2>&1 &
    timeout 1200 nc -l -p 7004 >/tmp/expect 2>/dev/null || { mark "no expectation from src"; finish FAIL; }
    mark "MIGEXPECT $(cat /tmp/expect)"
    timeout 1500 nc -l -p 7005 >/tmp/src.done 2>/dev/null &
    # The guest arrives (its device model writes the serial file here from then on), or src
    # says its move failed.
    end=$(( $(cut -d. -f1 /proc/uptime) + 900 ))
    while ! grep -q tick /var/log/mig.serial 2>/dev/null && ! grep -q failed /tmp/src.done 2>/dev/null \
        && [ "$(cut -d. -f1 /proc/uptime)" -lt $end ]; do sleep 1; done
    if grep -q tick /var/log/mig.serial 2>/dev/null; then
        sleep 20
        report /var/log/mig.serial DST | tail -n 6
        mark "MIGDST xl $(xl list 2>&1 | awk 'NR > 1 {printf "%s:%s ", $1, $5}')"
        mark "MIGDST status $(xvtpm status --json 2>&1 | tr -d ' \n')"
        mark "MIGDST manager $(xvtpm vtpm list 2>&1 | grep -c $UH) files $(ls /var/lib/xvtpm/vtpms/$UH 2>&1 | tr '\n' ' ')"
    else
        mark "MIGDST no guest arrived ($(cat /tmp/src.done 2>/dev/null))"; diag
    fi
    mark "MIGACCEPT $(tr '\n' '|' </var/log/accept.log | cut -c1-1500)"
    mark "MIGDSTD $(grep -i "HVM guest" /var/log/xvtpmd.log | tail -n 6 | tr '\n' '|' | cut -c1-1200)"
    finish PASS
fi

# src: the destination's key, ours to it.
fetch $DST 7001 /tmp/dst.key 300 || { mark "no key from dst"; finish FAIL; }
send $DST 7002 /tmp/my.key 60 || { mark "dst took no key"; finish FAIL; }
mark "MIGKEY dst key $(wc -c </tmp/dst.key) bytes"
cat > /etc/xen/mig.cfg <<EOF
name = "mig"
type = "hvm"
uuid = "$UH"
kernel = "/boot/vmlinuz-domU"
ramdisk = "/boot/domU.cpio.gz"
cmdline = "console=ttyS0 loglevel=4 xvtpm.phase=lifecycle xvtpm.tick=slow"
memory = 192
vcpus = 1
vga = "none"
vnc = 0
serial = "file:/var/log/mig.serial"
device_model_override = "/usr/lib/xvtpm/xvtpm-qemu-dm"
bios_path_override = "/usr/lib/xvtpm/seabios-xen-tpm.bin"
acpi_firmware = "/usr/lib/xvtpm/acpi-tpm2.bin"
EOF
xl create /etc/xen/mig.cfg 2>&1 | sed 's/^/  xl: /'
if ! wait_for /var/log/mig.serial "tick 3 " 900; then mark "the guest did not tick"; diag; finish FAIL; fi
report /var/log/mig.serial SRC
grep -a "lc ready" /var/log/mig.serial | sed 's/.*lc ready pcr16 \([^ ]*\).*/\1/' | head -n 1 >/tmp/expect
send $DST 7004 /tmp/expect 60 || { mark "dst took no expectation"; finish FAIL; }
fetch $DST 7003 /tmp/ready 120 || { mark "dst not ready"; finish FAIL; }
T0=$(cut -d' ' -f1 /proc/uptime)
RUST_LOG=info timeout 1200 xvtpm migrate mig $DST --to /tmp/dst.key --via "nc $DST 7000" >/tmp/migrate.out 2>&1
rc=$?
if [ $rc = 0 ]; then echo moved >/tmp/done; else echo failed >/tmp/done; fi
send $DST 7005 /tmp/done 30 || mark "dst took no result"
mark "MIGT xvtpm migrate exit $rc after $(awk -v t0="$T0" '{printf "%.1f", $1 - t0}' /proc/uptime) s: $(tr '\n' '|' </tmp/migrate.out | cut -c1-1500)"
report /var/log/mig.serial SRC | tail -n 2
# What is left here: no domain, no vtpm, no vTPM at the manager, no files.
sleep 5
gone() { ls -d "$1" 2>&1 | grep -c 'No such'; }
mark "MIGSRC xl $(xl list 2>&1 | awk 'NR > 1 {printf "%s:%s ", $1, $5}')vtpms $(ps | grep -c '[v]tpm serve') manager $(xvtpm vtpm list 2>&1 | grep -c $UH) dir $(gone /var/lib/xvtpm/vtpms/$UH) snapshots $(gone /run/xvtpm/snapshots/$UH)"
[ $rc = 0 ] || diag
finish PASS
