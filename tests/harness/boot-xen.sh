#!/usr/bin/env bash
# Boots Xen + dom0 (+ the guests) from build-xen.sh's images under QEMU (TCG), serial log to
# LOGFILE. Exits 0 when dom0 reports PASS.   Usage: boot-xen.sh IMGDIR LOGFILE [TIMEOUT [tpm|tpm-dom0]]
# With `tpm`, the machine has a TPM 2.0 (QEMU's tpm-tis backed by a fresh Debian swtpm) that
# dom0's kernel leaves alone, for the manager's stub domain; with `tpm-dom0`, dom0's kernel
# drives it (/dev/tpmrm0, for a manager in dom0).
# XVTPM_QEMU names another qemu-system-x86_64 for the outer machine (default: Debian 12's);
# XVTPM_XEN_ARGS adds to Xen's command line (later options win: guest_loglvl=all, say);
# XVTPM_DOM0_ARGS to dom0's. XVTPM_NET gives the machine an e1000 on a QEMU socket network
# (`listen=127.0.0.1:PORT` or `connect=...`: two machines, one link), its MAC XVTPM_MAC.
set -uo pipefail
IMG=${1:?usage: boot-xen.sh IMGDIR LOGFILE [TIMEOUT [tpm]]}; LOG=${2:?}; TMO=${3:-600}; TPM=${4:-}
XEN_CMD="dom0_mem=1024M,max:1024M dom0_max_vcpus=2 console=com1 com1=115200,8n1 loglvl=warning guest_loglvl=warning ${XVTPM_XEN_ARGS:-}"
DOM0_CMD="console=hvc0 earlyprintk=xen loglevel=4 ${XVTPM_DOM0_ARGS:-}"
EXTRA=()
if [ -n "${XVTPM_NET:-}" ]; then
    EXTRA+=(-netdev "socket,id=n0,$XVTPM_NET" -device "e1000,netdev=n0,mac=${XVTPM_MAC:-52:54:00:12:34:56}")
fi
if [ "$TPM" = tpm ] || [ "$TPM" = tpm-dom0 ]; then
    T=$(mktemp -d); trap 'kill $SWTPM 2>/dev/null; rm -rf "$T"' EXIT
    mkdir "$T/state"
    swtpm socket --tpm2 --tpmstate dir="$T/state" --ctrl type=unixio,path="$T/ctrl" >/dev/null 2>&1 &
    SWTPM=$!
    # Ready when a connection succeeds: the socket file exists from bind(), before listen().
    ready() { perl -MIO::Socket::UNIX -e 'IO::Socket::UNIX->new(Peer => $ARGV[0]) or exit 1' "$1"; }
    i=0; while ! ready "$T/ctrl"; do i=$((i+1)); [ $i -gt 200 ] && { echo "swtpm did not start" >&2; exit 1; }; sleep 0.05; done
    EXTRA+=(-chardev "socket,id=chrtpm,path=$T/ctrl" -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-tis,tpmdev=tpm0)
    [ "$TPM" = tpm ] && DOM0_CMD="$DOM0_CMD initcall_blacklist=init_tis,crb_acpi_driver_init"
fi
# HVM guests need SVM with nested paging (Xen then has HAP); build-xen.sh says so in IMGDIR/cpu.
CPU=qemu64; [ -f "$IMG/cpu" ] && CPU=$(cat "$IMG/cpu")
timeout --foreground -k 5 "$TMO" "${XVTPM_QEMU:-qemu-system-x86_64}" -machine pc -accel tcg,thread=multi -cpu "$CPU" -m 2048 -smp 2 \
    -display none -monitor none -serial stdio -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=0x04 "${EXTRA[@]}" \
    -kernel "$IMG/xen" -append "$XEN_CMD" -initrd "$IMG/vmlinux ${DOM0_CMD//,/,,},$IMG/dom0.cpio" </dev/null >"$LOG" 2>&1
rc=$?
[ $rc = 3 ] && exit 0
echo "QEMU exit code $rc (3 = pass, 5 = fail, 124 = timeout); log: $LOG" >&2
exit 1
