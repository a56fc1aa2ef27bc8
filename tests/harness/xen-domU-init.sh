#!/bin/busybox sh
# init of the Xen guest: the stock xen-tpmfront, then tpm2-tools on /dev/tpm0.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev; mount -t tmpfs tmpfs /tmp
say() { echo "XVTPM-DOMU: $*"; }
PHASE=1; case "$(cat /proc/cmdline)" in *xvtpm.phase=2*) PHASE=2;; *xvtpm.phase=lifecycle*) PHASE=lifecycle;;
    *xvtpm.phase=service*) PHASE=service;; *xvtpm.phase=hvm12*) PHASE=hvm12;; *xvtpm.phase=hvm*) PHASE=hvm;; esac
say "kernel $(uname -r), phase $PHASE"
pcr16() { tpm2_pcrread sha256:16 2>&1 | awk '/16:/ {print $2}'; }
insmod /lib/modules/xen-tpmfront.ko &
i=0; while [ ! -e /dev/tpm0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
say "devices $(ls /dev/tpm* 2>&1 | tr '\n' ' ')"
say "tpm_version_major=$(cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null)"
export TPM2TOOLS_TCTI=device:/dev/tpm0
if [ $PHASE = hvm12 ]; then
    # An HVM guest whose TPM (tpm_tis on the registers dom0 serves) is a 1.2: the kernel's own
    # TPM 1.2 reads. PCR 16 extended once with a raw TPM_Extend, then read every second while
    # dom0 kills the vtpm under this guest: the restarted one must never show PCR 16 reset.
    say "hvm12 caps $(cat /sys/class/tpm/tpm0/caps 2>&1 | tr '\n' ';')"
    say "hvm12 pcrcount $(grep -c PCR- /sys/class/tpm/tpm0/pcrs 2>/dev/null) enabled=$(cat /sys/class/tpm/tpm0/enabled 2>&1) active=$(cat /sys/class/tpm/tpm0/active 2>&1)"
    mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
    say "hvm12 bios events $(wc -l </sys/kernel/security/tpm0/ascii_bios_measurements 2>&1) $(grep 'PCR-00' /sys/class/tpm/tpm0/pcrs | tr -d ' ')"
    exec 3<>/dev/tpm0
    printf '\000\301\000\000\000\042\000\000\000\024\000\000\000\020\001\002\003\004\005\006\007\010\011\012\013\014\015\016\017\020\021\022\023\024' >&3
    say "hvm12 extend $(dd bs=64 count=1 <&3 2>/dev/null | od -An -tx1 | tr -d ' \n' | cut -c1-20)"
    exec 3<&-
    i=0
    while true; do
        i=$((i+1)); say "hvm12 tick $i $(grep 'PCR-16' /sys/class/tpm/tpm0/pcrs 2>&1 | tr -d ' ' | cut -c1-40)"; sleep 1
    done
fi
if [ $PHASE = hvm ]; then
    # An HVM guest: tpm_tis found the registers dom0 serves (hvmloader's ACPI names them).
    mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
    say "hvm driver $(basename "$(readlink /sys/class/tpm/tpm0/device/driver 2>/dev/null)") securityfs $(ls /sys/kernel/security/tpm0/ 2>&1 | tr '\n' ' ')"
    r=$(TPM2TOOLS_TCTI=device:/dev/tpmrm0 tpm2_getrandom --hex 8 2>&1) && say "hvm tpmrm0 ok $r" || say "hvm tpmrm0 FAILED $r"
    # Measured boot: the firmware's event log (SeaBIOS, its TPM2 table from the domain file)
    # replayed gives the PCRs the TPM holds.
    EL=/sys/kernel/security/tpm0/binary_bios_measurements
    if tpm2_eventlog $EL >/tmp/el.yaml 2>/tmp/el.err; then
        say "hvm eventlog $(grep -c 'EventNum:' /tmp/el.yaml) events: $(awk '/EventType:/ {print $2}' /tmp/el.yaml | sort | uniq -c | awk '{printf "%s=%s ", $2, $1}')"
        awk '/^pcrs:/ {p=1; next} p && /^  [a-z0-9]+:/ {b=$1} p && b == "sha256:" && /: 0x/ {gsub(/ /, ""); print toupper($0)}' /tmp/el.yaml >/tmp/el.pcrs
        tpm2_pcrread sha256:0,1,2,3,4,5,6,7 | awk '/: 0x/ {gsub(/ /, ""); print toupper($0)}' >/tmp/tpm.pcrs
        bad=$(grep -vxF -f /tmp/tpm.pcrs /tmp/el.pcrs | tr '\n' ' ')
        if [ -s /tmp/el.pcrs ] && [ -z "$bad" ]; then say "hvm eventlog replay ok $(wc -l </tmp/el.pcrs) pcrs"
        else say "hvm eventlog replay MISMATCH log: $bad tpm: $(tr '\n' ' ' </tmp/tpm.pcrs)"; fi
        say "hvm pcr0 $(grep '^0:' /tmp/tpm.pcrs | cut -d: -f2)"
    else
        say "hvm eventlog FAILED $(ls -la $EL 2>&1) $(tail -n 2 /tmp/el.err | tr '\n' ' ')"
    fi
    if tpm2_readpublic -c 0x81000001 >/dev/null 2>&1; then
        # The next boot of this guest (a reboot: a new domain, device model and vtpm).
        say "hvm2 persistent key ok"
        say "hvm2 nv $(tpm2_nvread 0x1500016 -C o -s 8 2>/dev/null)"
        say "hvm2 pcr16 $(pcr16)"
        say DONE2
        # Then PCR 16 extended once, and read every second while dom0 saves and restores
        # this guest (xl save, xl restore): the restored guest's TPM must go on.
        tpm2_pcrextend 16:sha256=0404040404040404040404040404040404040404040404040404040404040404 || say "hvm2 extend FAILED"
        say "hvm2 extended pcr16 $(pcr16)"
        i=0
        while true; do i=$((i+1)); say "hvm2 tick $i pcr16 $(pcr16)"; sleep 1; done
    fi
fi
if [ $PHASE = service ]; then
    # One of several guests served by xvtpmd: PCR 16 extended N times (xvtpm.n=N, so each
    # guest's value is its own), then a tick every second with PCR 16, while dom0 kills and
    # restarts vtpms and the daemon.
    n=$(sed -n 's/.*xvtpm\.n=\([0-9]*\).*/\1/p' /proc/cmdline); k=0
    while [ $k -lt "${n:-1}" ]; do
        tpm2_pcrextend 16:sha256=0303030303030303030303030303030303030303030303030303030303030303 || say "svc extend FAILED"
        k=$((k+1))
    done
    # A hostile guest asks dom0's xvtpmd for an HVM TPM of another guest's vTPM, as the
    # device model's wrapper does: dom0's part of xenstore is dom0's alone to write.
    # (The same client writes where a guest may: its own data directory.)
    me=$(xenstore-read domid 2>&1)
    xenstore-write data/xvtpm-probe 1 2>/dev/null && own=ok || own=FAILED
    if r=$(xenstore-write /local/domain/0/xvtpm-hvm/$me/uuid 22222222-2222-4222-8222-222222222222 \
            /local/domain/0/xvtpm-hvm/$me/state requested 2>&1); then say "svc request write ALLOWED (domain $me)"
    else say "svc request write refused (domain $me, own data write $own): $r"; fi
    say "svc ready pcr16 $(pcr16)"
    i=0
    while true; do
        # After a restore the stock xen-tpmfront may come back as the next /dev/tpmN.
        dev=$(ls /dev/tpm[0-9]* 2>/dev/null | head -n 1); export TPM2TOOLS_TCTI=device:${dev:-/dev/tpm0}
        i=$((i+1)); say "svc tick $i pcr16 $(pcr16 | cut -c1-18)"; sleep 1
    done
fi
if [ $PHASE = lifecycle ]; then
    # PCR 16 extended once from zero and a signing key left loaded; then, while dom0 stops,
    # kills, saves and restores our vTPM under this guest, a tick every 0.2 s: PCR 16 and
    # whether the key loaded at the start still signs.
    tpm2_pcrextend 16:sha256=0303030303030303030303030303030303030303030303030303030303030303 || say "lc extend FAILED"
    tpm2_createprimary -Q -C o -G ecc -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign' -c /tmp/k.ctx \
        || say "lc key FAILED"
    H=$(tpm2_getcap handles-transient | awk '/0x80/ {print $2; exit}')
    echo "signed by the guest's vTPM" > /tmp/msg
    # A secret sealed to PCR 16 as it is now, its object left loaded too.
    last() { tpm2_getcap handles-transient | awk '/0x80/ {h=$2} END {print h}'; }
    tpm2_createprimary -Q -C o -G ecc -c /tmp/s.ctx; P=$(last)
    tpm2_pcrread -Q sha256:16 -o /tmp/pcr.bin && tpm2_createpolicy -Q --policy-pcr -l sha256:16 -f /tmp/pcr.bin -L /tmp/pcr.policy
    printf 'sealed-to-pcr16' > /tmp/secret
    tpm2_create -Q -C "$P" -L /tmp/pcr.policy -i /tmp/secret -u /tmp/seal.pub -r /tmp/seal.priv \
        && tpm2_load -Q -C "$P" -u /tmp/seal.pub -r /tmp/seal.priv -c /tmp/seal.ctx || say "lc seal FAILED"
    S=$(last); tpm2_flushcontext "$P"
    say "lc ready pcr16 $(pcr16) key $H"
    i=0
    while true; do
        # The stock xen-tpmfront re-registers its chip on resume (xl restore, migration): the
        # old number may still be taken, so the TPM comes back as the next /dev/tpmN.
        dev=$(ls /dev/tpm[0-9]* 2>/dev/null | head -n 1)
        export TPM2TOOLS_TCTI=device:${dev:-/dev/tpm0}
        i=$((i+1)); p=$(pcr16)
        if tpm2_sign -Q -c "$H" -g sha256 -o /tmp/sig /tmp/msg 2>/tmp/err \
            && tpm2_verifysignature -Q -c "$H" -g sha256 -m /tmp/msg -s /tmp/sig 2>>/tmp/err; then s=ok
        else s="failed $(tail -n 1 /tmp/err | cut -c1-80)"; fi
        u=$(tpm2_unseal -c "$S" -p pcr:sha256:16 2>/dev/null); tpm2_flushcontext -s 2>/dev/null
        say "tick $i pcr16 ${p:-none} sign $s unseal ${u:-failed} devs $(ls /dev/tpm* 2>/dev/null | tr '\n' ' ')"
        [ "$s" = ok ] || dmesg | grep -i 'tpm' | grep -v 'command line' | tail -n 3 | sed 's/^/XVTPM-DOMU: dmesg: /'
        # A guest being migrated ticks slower: fewer exits under the nested emulation's flaw.
        case "$(cat /proc/cmdline)" in *xvtpm.tick=slow*) sleep 3;; *) sleep 0.2;; esac
    done
fi
if [ $PHASE = 2 ]; then
    # After a reboot (destroy + create with the same uuid): what phase 1 made is still there.
    tpm2_readpublic -c 0x81000001 >/dev/null 2>&1 && say "phase2 persistent key ok" || say "phase2 persistent key FAILED"
    say "phase2 nv $(tpm2_nvread 0x1500016 -C o -s 8 2>/dev/null)"
    # A new guest: its PCRs start reset, whatever the last guest extended.
    say "phase2 pcr16 $(tpm2_pcrread sha256:16 2>&1 | awk '/16:/ {print $2}')"
    say DONE2
    while true; do sleep 10; done
fi
r=$(tpm2_getrandom --hex 16 2>&1) && say "getrandom ok $r" || say "getrandom FAILED $r"
tpm2_pcrextend 16:sha256=0101010101010101010101010101010101010101010101010101010101010101 && say "pcrextend ok" || say "pcrextend FAILED"
say "pcr16 $(tpm2_pcrread sha256:16 2>&1 | awk '/16:/ {print $2}')"
tpm2_createprimary -Q -C o -G ecc -c /tmp/p.ctx && say "createprimary ok" || say "createprimary FAILED"
tpm2_evictcontrol -Q -C o -c /tmp/p.ctx 0x81000001 && say "evictcontrol ok" || say "evictcontrol FAILED"
tpm2_flushcontext -t 2>/dev/null
printf 'xvtpm-nv' > /tmp/nv
tpm2_nvdefine -Q 0x1500016 -C o -s 8 -a "ownerread|ownerwrite" && tpm2_nvwrite -Q 0x1500016 -C o -i /tmp/nv && say "nv ok" || say "nv FAILED"
# Seal to PCR 16, unseal; after PCR 16 changes the unseal must be refused.
tpm2_pcrread -Q sha256:16 -o /tmp/pcr.bin && tpm2_createpolicy -Q --policy-pcr -l sha256:16 -f /tmp/pcr.bin -L /tmp/pcr.policy
tpm2_createprimary -Q -C o -G ecc -c /tmp/s.ctx; tpm2_flushcontext -t 2>/dev/null
printf 'guest-secret-42' > /tmp/secret
tpm2_create -Q -C /tmp/s.ctx -L /tmp/pcr.policy -i /tmp/secret -u /tmp/seal.pub -r /tmp/seal.priv; tpm2_flushcontext -t 2>/dev/null
tpm2_load -Q -C /tmp/s.ctx -u /tmp/seal.pub -r /tmp/seal.priv -c /tmp/seal.ctx; tpm2_flushcontext -t 2>/dev/null
say "unseal $(tpm2_unseal -c /tmp/seal.ctx -p pcr:sha256:16 2>&1)"; tpm2_flushcontext -t 2>/dev/null
tpm2_pcrextend 16:sha256=0202020202020202020202020202020202020202020202020202020202020202
if tpm2_unseal -c /tmp/seal.ctx -p pcr:sha256:16 >/dev/null 2>&1; then say "unseal after extend FAILED (it worked)"; else say "unseal refused after extend"; fi
tpm2_flushcontext -t 2>/dev/null; tpm2_flushcontext -s 2>/dev/null
say "bench $(tpmbench /dev/tpm0 1000 2>&1)"
say "timeouts $(cat /sys/class/tpm/tpm0/timeouts 2>&1)"
say "durations $(cat /sys/class/tpm/tpm0/durations 2>&1)"
say "caps $(cat /sys/class/tpm/tpm0/caps 2>&1 | tr '\n' ';')"
say "hwrng $(cat /sys/class/misc/hw_random/rng_current 2>&1) $(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
say "dmesg-tpm-errors $(dmesg | grep -ci 'tpm.*error')"
dmesg | grep -i 'tpm' | sed 's/^/XVTPM-DOMU: dmesg: /' 
# The stock driver gives no /dev/tpmrm0: tpm2-abrmd on /dev/tpm0 is the guest's resource
# manager; two tpm2-tools clients use it at the same time.
mkdir -p /run/dbus
export DBUS_SYSTEM_BUS_ADDRESS=unix:path=/run/dbus/system_bus_socket
dbus-daemon --config-file=/etc/dbus.conf --fork
tpm2-abrmd --tcti=device:/dev/tpm0 --allow-root > /tmp/abrmd.log 2>&1 &
ABRMD=$!
i=0; while ! TPM2TOOLS_TCTI=tabrmd:bus_type=system tpm2_getrandom 4 >/dev/null 2>&1 && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done
client() { # name: three CreatePrimary and GetRandom through abrmd
    n=0; for k in 1 2 3; do
        TPM2TOOLS_TCTI=tabrmd:bus_type=system tpm2_createprimary -Q -C o -G ecc -c /tmp/$1.ctx && \
        TPM2TOOLS_TCTI=tabrmd:bus_type=system tpm2_getrandom 16 >/dev/null && n=$((n+1))
    done; echo $n > /tmp/$1.n
}
client a & A=$!; client b & B=$!; wait $A; wait $B
say "abrmd two clients: a=$(cat /tmp/a.n 2>/dev/null) b=$(cat /tmp/b.n 2>/dev/null) of 3"
grep -i -m 3 "critical\|error" /tmp/abrmd.log | sed 's/^/XVTPM-DOMU: abrmd log: /'
kill $ABRMD; sleep 1
say DONE
if [ $PHASE = hvm ]; then
    # Rebooted by the guest itself: xl makes the domain again from the same file.
    say "hvm rebooting"; sleep 2; reboot -f
fi
# Keep using the TPM while dom0 restarts the vtpm and hot-plugs a second one.
i=0; dmesg -c >/dev/null; NODEV=0
while [ $i -lt 150 ]; do
    i=$((i+1))
    if [ -e /sys/class/tpm/tpm1 ] && [ -z "$TPM1_SEEN" ]; then
        # The hot-plugged vTPM is a TPM 1.2: the kernel's sysfs files send real TPM 1.2 commands.
        say "tpm1 version_major=$(cat /sys/class/tpm/tpm1/tpm_version_major) caps $(cat /sys/class/tpm/tpm1/caps 2>&1 | tr '\n' ';')"
        say "tpm1 $(grep -c PCR- /sys/class/tpm/tpm1/pcrs 2>/dev/null) pcrs, enabled=$(cat /sys/class/tpm/tpm1/enabled 2>&1) active=$(cat /sys/class/tpm/tpm1/active 2>&1)"
        TPM1_SEEN=1
    fi
    # A device detached and attached again (a vTPM domain made again) may come back as the
    # next /dev/tpmN while the old number is still taken: the first that answers.
    ok=; r="no /dev/tpmN"
    for dev in $(ls /dev/tpm[0-9]* 2>/dev/null); do
        export TPM2TOOLS_TCTI=device:$dev
        if r=$(tpm2_getrandom --hex 8 2>&1); then ok=1; break; fi
    done
    if [ -n "$ok" ]; then say "loop $i ok devs $(ls /dev/tpm* | tr '\n' ' ')pcr16 $(pcr16)"
    else say "loop $i err $(echo "$r" | tail -n 1 | cut -c1-100)"; fi
    # What the kernel said meanwhile (a device that does not come back is explained here).
    k=$(dmesg -c)
    if [ -z "$ok" ] && [ -n "$k" ]; then echo "$k" | tail -n 8 | sed 's/^/XVTPM-DOMU: dmesg: /'; fi
    case "$r" in "no /dev/tpmN") NODEV=$((NODEV+1));; esac
    if [ $NODEV = 30 ]; then
        # Still no device 30 s on: the kernel's blocked tasks, to see what holds xenwatch.
        echo w 2>/dev/null > /proc/sysrq-trigger; sleep 1
        dmesg -c | sed -n '/Show Blocked State/,$p' | tail -n 60 | sed 's/^/XVTPM-DOMU: blocked: /'
    fi
    sleep 1
done
while true; do sleep 10; done
