#!/bin/busybox sh
# init of the container vTPM VM: `xvtpm container` makes vTPMs through the kernel's vTPM
# proxy; tpm2-tools and raw TPM 1.2 commands use them; results go to the serial console as
# XVTPM-VM lines for tools/tests/container_vm.rs; then power off.
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu RUST_LOG_STYLE=never
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp; mount -t tmpfs tmpfs /run
say() { echo "XVTPM-VM: $*"; }
field() { echo "$1" | sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\).*/\1/p"; }
say "kernel $(uname -r)"
insmod /lib/modules/tpm_vtpm_proxy.ko && say "vtpmx $(ls /dev/vtpmx)" || say "insmod FAILED"

# Two TPM 2.0 container vTPMs.
A=$(xvtpm container create ca --json 2>&1) && say "create ca $A" || say "create ca FAILED $A"
B=$(xvtpm container create cb --json 2>&1) && say "create cb $B" || say "create cb FAILED $B"
NA=$(field "$A" tpm_num); NB=$(field "$B" tpm_num)
say "devices a $(ls /dev/tpm$NA /dev/tpmrm$NA 2>&1 | tr '\n' ' ')"
say "devices b $(ls /dev/tpm$NB /dev/tpmrm$NB 2>&1 | tr '\n' ' ')"
say "a tpm_version_major=$(cat /sys/class/tpm/tpm$NA/tpm_version_major 2>&1)"
TA=device:/dev/tpmrm$NA; TB=device:/dev/tpmrm$NB
r=$(tpm2_getrandom -T $TA --hex 16 2>&1) && say "a getrandom ok $r" || say "a getrandom FAILED $r"
tpm2_pcrextend -T $TA 16:sha256=0101010101010101010101010101010101010101010101010101010101010101 \
    && say "a pcrextend ok" || say "a pcrextend FAILED"
say "a pcr16 $(tpm2_pcrread -T $TA sha256:16 2>&1 | awk '/16:/ {print $2}')"
say "b pcr16 $(tpm2_pcrread -T $TB sha256:16 2>&1 | awk '/16:/ {print $2}')"

# Two clients at once through the kernel's resource manager.
client() { ok=0; for i in $(seq 1 15); do
    tpm2_getrandom -T $TA --hex 8 >/dev/null 2>&1 && tpm2_pcrread -T $TA sha256:16 >/dev/null 2>&1 && ok=$((ok+1)); done
    echo $ok > /tmp/client$1; }
client 1 & P1=$!; client 2 & P2=$!; wait $P1 $P2
say "concurrent client1 $(cat /tmp/client1)/15 client2 $(cat /tmp/client2)/15"

# What must outlive a restart: a persistent key and an NV index.
tpm2_createprimary -T $TA -Q -C o -G ecc -c /tmp/p.ctx && tpm2_evictcontrol -T $TA -Q -C o -c /tmp/p.ctx 0x81000001 \
    && say "a persistent key ok" || say "a persistent key FAILED"
printf 'xvtpm-ok' > /tmp/nv
tpm2_nvdefine -T $TA -Q 0x1500016 -C o -s 8 -a "ownerread|ownerwrite" && tpm2_nvwrite -T $TA -Q 0x1500016 -C o -i /tmp/nv \
    && say "a nv ok" || say "a nv FAILED"

# A process in its own mount namespace whose /dev holds only its TPM's node.
RM=$(field "$A" rm_major):$(field "$A" rm_minor)
r=$(unshare -m --propagation private sh -c "mount -t tmpfs tmpfs /dev && mknod /dev/tpmrm0 c ${RM%:*} ${RM#*:} \
    && echo \"dev=[\$(ls /dev | tr '\n' ' ')]\" && tpm2_getrandom -T device:/dev/tpmrm0 --hex 8 \
    && tpm2_pcrread -T device:/dev/tpmrm0 sha256:16 | awk '/16:/ {print \"pcr16=\" \$2}'" 2>&1 | tr '\n' ' ')
say "namespace $r"

# Stopping the vtpm under a client holding the device open: its next command fails.
GETRANDOM='\200\001\000\000\000\014\000\000\001\173\000\010'
(
    exec 3<>/dev/tpm$NA
    printf "$GETRANDOM" >&3; dd bs=4096 count=1 <&3 2>/dev/null | od -An -tx1 | tr -d ' \n' > /tmp/held.before
    while [ ! -e /tmp/stopped ]; do usleep 100000; done
    if printf "$GETRANDOM" >&3 2>/tmp/held.err && dd bs=4096 count=1 <&3 2>>/tmp/held.err >/tmp/held.after; then
        echo "answered $(od -An -tx1 /tmp/held.after | tr -d ' \n')" > /tmp/held
    else echo "error $(tr '\n' ' ' < /tmp/held.err)" > /tmp/held; fi
) & HELD=$!
# And one that keeps sending commands.
( while tpm2_getrandom -T $TA --hex 4 >/dev/null 2>/tmp/loop.err; do :; done; tr '\n' ' ' < /tmp/loop.err > /tmp/loop ) & LOOP=$!
sleep 2
say "held before stop: $(cat /tmp/held.before)"
T0=$(cut -d' ' -f1 /proc/uptime)
s=$(xvtpm container stop ca 2>&1) && say "stop ca $s" || say "stop ca FAILED $s"
touch /tmp/stopped
say "stop took $(awk -v t0=$T0 '{print $1 - t0}' /proc/uptime) s; devices now [$(ls /dev/tpm$NA /dev/tpmrm$NA 2>/dev/null | tr '\n' ' ')]"
i=0; while [ ! -e /tmp/held ] || [ ! -e /tmp/loop ]; do i=$((i+1)); [ $i -gt 300 ] && break; usleep 100000; done
say "held after stop: $(cat /tmp/held 2>/dev/null || echo HANG)"
say "loop after stop: $(cat /tmp/loop 2>/dev/null || echo HANG)"
kill $HELD $LOOP 2>/dev/null
say "b after stopping a: $(tpm2_pcrread -T $TB sha256:16 2>&1 | awk '/16:/ {print $2}')"
say "list stopped $(xvtpm container list --json 2>&1)"

# Started again from its state: the persistent key and the NV index are there.
A2=$(xvtpm container start ca --json 2>&1) && say "start ca $A2" || say "start ca FAILED $A2"
NA=$(field "$A2" tpm_num); TA=device:/dev/tpmrm$NA
tpm2_readpublic -T $TA -c 0x81000001 >/dev/null 2>&1 && say "restart persistent key ok" || say "restart persistent key FAILED"
say "restart nv $(tpm2_nvread -T $TA 0x1500016 -C o -s 8 2>&1)"
say "restart pcr16 $(tpm2_pcrread -T $TA sha256:16 2>&1 | awk '/16:/ {print $2}')"

# Cancellation: SIGUSR1 to the vtpm, repeated while an RSA-2048 primary key is made (libtpms
# clears the request when a command starts, so one sent before would be lost).
PA=$(field "$A2" pid)
( tpm2_createprimary -T $TA -Q -C o -G rsa2048 -c /tmp/r.ctx > /tmp/cancel.out 2>&1; echo "rc=$?" >> /tmp/cancel.out
  touch /tmp/cancel.done ) &
usleep 200000
while [ ! -e /tmp/cancel.done ]; do kill -USR1 $PA; usleep 20000; done
say "cancel $(tr '\n' ' ' < /tmp/cancel.out)"
say "after cancel $(tpm2_getrandom -T $TA --hex 4 2>&1)"

# A TPM 1.2 container vTPM: registered by the kernel, answers TPM 1.2 commands.
C=$(xvtpm container create c12 --tpm1.2 --json 2>&1) && say "create c12 $C" || say "create c12 FAILED $C"
NC=$(field "$C" tpm_num)
say "c12 tpm_version_major=$(cat /sys/class/tpm/tpm$NC/tpm_version_major 2>&1)"
say "c12 sysfs pcr10 $(grep 'PCR-10' /sys/class/tpm/tpm$NC/pcrs /sys/class/tpm/tpm$NC/device/pcrs 2>/dev/null | head -n 1 | sed 's/.*PCR-10: *//; s/ //g')"
raw12() { ( exec 3<>/dev/tpm$NC; printf "$1" >&3; dd bs=4096 count=1 <&3 2>/dev/null | od -An -tx1 | tr -d ' \n' ); }
# TPM_Extend(PCR 10, twenty 0x01 bytes), then TPM_PCRRead(PCR 10).
D='\001\001\001\001\001\001\001\001\001\001\001\001\001\001\001\001\001\001\001\001'
say "c12 extend $(raw12 "\000\301\000\000\000\042\000\000\000\024\000\000\000\012$D")"
say "c12 pcrread $(raw12 '\000\301\000\000\000\016\000\000\000\025\000\000\000\012')"

say "list $(xvtpm container list --json 2>&1)"
s=$(xvtpm container destroy cb 2>&1) && say "destroy cb $s" || say "destroy cb FAILED $s"
say "after destroy: tpm$NB [$(ls /dev/tpm$NB 2>/dev/null)] list $(xvtpm container list --json 2>&1)"
xvtpm container stop nosuch >/dev/null 2>&1; say "stop nosuch exit $?"
xvtpm container stop ca >/dev/null 2>&1; xvtpm container stop c12 >/dev/null 2>&1
say "logs: $(tail -n 3 /run/xvtpm/containers/ca.log | tr '\n' '|')"
say DONE
poweroff -f
