#!/bin/busybox sh
# dom0 /init of the hvm scenario: the xvtpm package installed and started as in the service
# scenario (the manager on dom0's TPM, xvtpmd), then:
# 1. a PV guest (a vtpm= line) runs the standard checks and its GetRandom benchmark;
# 2. an HVM guest whose domain file has one line more than usual, device_model_override =
#    "/usr/lib/xvtpm/xvtpm-qemu-dm": SeaBIOS, hvmloader, Debian's QEMU, and a TPM 2.0 that
#    Linux's tpm_tis drives: the same checks and benchmark, then the guest reboots itself and
#    its next domain finds its persistent key and NV index, with PCR 16 reset;
# 3. an HVM guest with the TPM 1.2 wrapper: the kernel's TPM 1.2 reads, PCR 16 extended; its
#    vtpm is killed under it, and the one xvtpmd starts again resumes its TPM (never reset).
# The HVM guest is also saved and restored with xl, and its TPM goes on.
# QEMU exits 3 when all ran; the test reads the marks.
. /lib/xen-dom0-common.sh
mark "xen up: $(xl info 2>/dev/null | grep -E 'virt_caps' | tr -s ' ')"
CON=/var/log/xen/console
install_service
status() { xvtpm status --json 2>&1; }
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v t0="$1" '{printf "%.1f", $1 - t0}' /proc/uptime; }
wait_for() { # file pattern seconds: waits until a line of file matches
    end=$(( $(cut -d. -f1 /proc/uptime) + $3 ))
    while ! grep -q "$2" "$1" 2>/dev/null; do [ "$(cut -d. -f1 /proc/uptime)" -gt $end ] && return 1; usleep 200000; done; }
report() { grep -a "XVTPM-DOMU" "$1" | sed "s/^.*XVTPM-DOMU: /XVTPM-DOMU: $2 /" | cut -c1-300 | while read -r l; do echo "$l"; done; }
# A heartbeat: what runs and what xvtpmd said last, every 30 s (a stuck guest shows here).
( while true; do sleep 30
    mark "BEAT $(xl list 2>&1 | awk 'NR > 1 {printf "%s:%s ", $1, $5}') vtpms $(ps | grep -c '[v]tpm serve') | $(tail -n 1 /var/log/xvtpmd.log | cut -c1-200)"
    for f in /var/log/*.serial; do [ -f "$f" ] && mark "BEAT $f: $(tail -n 1 "$f" | cut -c1-160)"; done
    for f in /var/log/xen/qemu-dm-*.log; do [ -f "$f" ] && mark "BEAT $f: $(tail -n 2 "$f" | tr '\n' ' ' | cut -c1-200)"; done
    for p in $(ps | awk '/[v]tpm serve-hvm|[x]en-qemu-system/ {print $1}'); do
        mark "BEAT pid $p $(cat /proc/$p/comm): $(for t in /proc/$p/task/*; do echo "$(cat $t/comm):$(cat $t/wchan)"; done | tr '\n' ' ')"; done
  done ) &
UP=11111111-1111-4111-8111-111111111111; UH=22222222-2222-4222-8222-222222222222
U12=33333333-3333-4333-8333-333333333333

# 1. The PV guest, for the same run's figures.
cat > /etc/xen/pv.cfg <<EOF
name = "pv"
type = "pv"
kernel = "/boot/vmlinux-domU"
ramdisk = "/boot/domU.cpio.gz"
extra = "console=hvc0 loglevel=4"
memory = 256
vtpm = [ "backend=0,uuid=$UP" ]
EOF
T0=$(now); xl create /etc/xen/pv.cfg 2>&1 | sed 's/^/  xl: /'
wait_for $CON/guest-pv.log "tpm_version_major" 300 && mark "HVMT pv usable after $(since $T0) s"
wait_for $CON/guest-pv.log "XVTPM-DOMU: DONE" 600 || mark "pv did not finish"
report $CON/guest-pv.log PV
xl destroy pv

# 2. The HVM guest: one line names the wrapper.
hvm_cfg() { # name uuid phase wrapper
    cat > /etc/xen/$1.cfg <<EOF
name = "$1"
type = "hvm"
uuid = "$2"
kernel = "/boot/vmlinuz-domU"
ramdisk = "/boot/domU.cpio.gz"
cmdline = "console=ttyS0 loglevel=4 xvtpm.phase=$3"
memory = 256
vcpus = 1
vga = "none"
vnc = 0
serial = "file:/var/log/$1.serial"
device_model_override = "/usr/lib/xvtpm/$4"
bios_path_override = "/usr/lib/xvtpm/seabios-xen-tpm.bin"
EOF
    # A TPM 2.0's event log is found through the TPM2 table (a TPM 1.2's through hvmloader's).
    if [ "$4" = xvtpm-qemu-dm ]; then echo 'acpi_firmware = "/usr/lib/xvtpm/acpi-tpm2.bin"' >> /etc/xen/$1.cfg; fi
}
diag() { # name: what there is to see when a guest is stuck
    mark "DIAG $1: serial tail:"; tail -n 15 /var/log/$1.serial 2>&1 | cut -c1-200 | sed 's/^/  /'
    mark "DIAG xl list:"; xl list 2>&1 | sed 's/^/  /'
    mark "DIAG qemu-dm log:"; tail -n 10 /var/log/xen/qemu-dm-$1.log 2>&1 | sed 's/^/  /'
    mark "DIAG xl log:"; tail -n 10 /var/log/xen/xl-$1.log 2>&1 | sed 's/^/  /'
    mark "DIAG requests:"; xenstore-ls /local/domain/0/xvtpm-hvm 2>&1 | sed 's/^/  /'
    mark "DIAG xvtpmd log:"; tail -n 25 /var/log/xvtpmd.log | cut -c1-250 | sed 's/^/  /'
}
hvm_cfg hvm $UH hvm xvtpm-qemu-dm
T0=$(now); xl create /etc/xen/hvm.cfg 2>&1 | sed 's/^/  xl: /'
mark "HVMT xl create returned after $(since $T0) s"
if wait_for /var/log/hvm.serial "tpm_version_major" 400; then mark "HVMT hvm usable after $(since $T0) s"
else diag hvm; fi
if wait_for /var/log/hvm.serial "hvm rebooting" 900; then
    # The next domain's device model starts the serial file anew.
    cp /var/log/hvm.serial /var/log/hvm.serial.1
    report /var/log/hvm.serial.1 HVM
    mark "HVMS $(status | tr -d ' \n')"
    # (The guest extends PCR 16 after DONE2, then ticks.)
    wait_for /var/log/hvm.serial "hvm2 extended" 900 || mark "hvm's next boot did not finish"
    report /var/log/hvm.serial HVM2 | grep -v tick
    # Saved and restored: the restored domain's TPM continues (its vtpm, told of the suspend
    # by xvtpmd, kept it marked in its snapshot; the new one, started for QEMU's -incoming,
    # resumes it).
    if wait_for /var/log/hvm.serial "hvm2 tick 2 " 300; then
        T0=$(now); xl save hvm /var/lib/hvm.save 2>&1 | sed 's/^/  xl: /'
        mark "HVMSAVE saved in $(since $T0) s; last tick $(grep 'hvm2 tick' /var/log/hvm.serial | tail -n 1 | sed 's/.*XVTPM-DOMU: //')"
        cp /var/log/hvm.serial /var/log/hvm.serial.2
        T0=$(now); xl restore /var/lib/hvm.save 2>&1 | sed 's/^/  xl: /'; rm -f /var/lib/hvm.save
        # The restored QEMU starts the serial file anew; the guest's loop goes on where it was.
        if wait_for /var/log/hvm.serial "hvm2 tick" 300; then
            sleep 3
            mark "HVMRESTORED after $(since $T0) s: $(grep 'hvm2 tick' /var/log/hvm.serial | tail -n 2 | sed 's/.*XVTPM-DOMU: //' | tr '\n' '|')"
        else
            mark "HVMRESTORED no tick after the restore"; diag hvm
        fi
    fi
else
    mark "hvm did not finish its first boot"; report /var/log/hvm.serial HVM; diag hvm
fi
mark "HVMQEMU $(grep -h 'xvtpm-qemu-dm' /var/log/xen/qemu-dm-hvm.log* 2>/dev/null | tr '\n' ' ')"
# Its vtpm's sandbox, as the service scenario checks the PV ones.
P=$(status | tr '{' '\n' | grep "\"uuid\":\"$UH\"" | sed -n 's/.*"pid":\([0-9]*\).*/\1/p')
field() { awk -v f="$2:" '$1 == f {print $2}' /proc/$1/status; }
[ -n "$P" ] && mark "HVMSANDBOX uid=$(field $P Uid) capeff=$(field $P CapEff) seccomp=$(field $P Seccomp) xendevs=$(ls -l /proc/$P/fd | grep -o -E 'evtchn|gntdev|privcmd|xenbus' | sort | tr '\n' ,)"
# The vTPM's key is at the manager, not in a file of the host.
mark "HVMKEY $(xvtpm vtpm show $UH 2>&1 | tr '\n' ' ' | cut -c1-200) files $(ls /var/lib/xvtpm/vtpms/$UH/ | tr '\n' ' ')"
xl destroy hvm
i=0; while [ -n "$(status | grep "$UH")" ] && [ $i -lt 100 ]; do i=$((i+1)); usleep 100000; done
mark "HVMGONE $(status | grep -c "$UH") left; request $(xenstore-ls /local/domain/0/xvtpm-hvm 2>&1 | wc -l)"

# 3. The TPM 1.2 HVM guest, and its vtpm killed under it (by its filter: syscall-inject).
hvm_cfg hvm12 $U12 hvm12 xvtpm-qemu-dm-tpm1.2
xl create /etc/xen/hvm12.cfg 2>&1 | sed 's/^/  xl: /'
if ! wait_for /var/log/hvm12.serial "hvm12 tick 3 " 600; then diag hvm12
else
    P=$(status | tr '{' '\n' | grep "\"uuid\":\"$U12\"" | sed -n 's/.*"pid":\([0-9]*\).*/\1/p')
    # Killed as a vtpm a guest had taken over would end: it makes a device-model operation on
    # another domain (dom0) through its privcmd handle, and its own filter kills it.
    mark "HVM12 inject: $(syscall-inject $P dm-op 0 2>&1 | tr '\n' ' ')"
    [ -d /proc/$P ] && kill -9 $P
    mark "HVM12 killed vtpm $P"
    N=$(grep -c "hvm12 tick" /var/log/hvm12.serial); sleep 15
    mark "HVM12 after kill: $(grep "hvm12 tick" /var/log/hvm12.serial | tail -n +$((N + 1)) | tail -n 3 | sed 's/.*XVTPM-DOMU: //' | tr '\n' '|')"
    mark "HVM12 vtpm now $(status | tr '{' '\n' | grep "\"uuid\":\"$U12\"" | sed -n 's/.*"pid":\([0-9]*\).*/\1/p')"
fi
report /var/log/hvm12.serial HVM12 | grep -v "tick" 
grep "hvm12 tick" /var/log/hvm12.serial | head -n 3 | sed 's/^.*XVTPM-DOMU: /XVTPM-DOMU: HVM12 /'
xl destroy hvm12
mark "xvtpmd log:"; tail -n 40 /var/log/xvtpmd.log | cut -c1-220 | sed 's/^/  /'
finish PASS
