#!/usr/bin/env bash
# Builds the VM that drives QEMU's TPM devices through our MMIO driver: Debian 12's
# linux-image-amd64 kernel and an initramfs with busybox and the driver's check program
# (tpm-mmio-check, with the host's libraries it links). Its init runs the program against
# /dev/mem at 0xFED40000, prints XVTPM-TIS lines on the serial console and powers off.
# Usage: build-tis-vm.sh OUTDIR CHECK_BINARY   -> OUTDIR/vmlinuz, OUTDIR/initrd.gz
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/debian-kernel.sh"
OUT=${1:?usage: build-tis-vm.sh OUTDIR CHECK_BINARY}
BIN=${2:?usage: build-tis-vm.sh OUTDIR CHECK_BINARY}
mkdir -p "$OUT"
KPKG=$(kernel_package)
stamp="$KPKG $(sha256sum "$HERE/build-tis-vm.sh" "$HERE/tis-vm-init.sh" "$HERE/debian-kernel.sh" "$BIN" | cut -c1-16 | tr '\n' ' ')"
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$stamp" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.gz" ]; then
    exit 0
fi
fetch_kernel "$OUT" "$KPKG"
# What the test needs to know about this kernel: how its TPM drivers are built, and the names
# of their init functions (for initcall_blacklist=).
grep -E '^CONFIG_(TCG_(TPM|CRB|TIS)|STRICT_DEVMEM|IO_STRICT_DEVMEM)=' "$OUT"/kroot/boot/config-* > "$OUT/kernel-config.txt"
grep -E ' (init_tis|crb_acpi_driver_init|tpm_init)$' "$OUT"/kroot/boot/System.map-* > "$OUT/kernel-initcalls.txt" || true

stage="$OUT/stage"
new_stage "$stage"
cp "$HERE/tis-vm-init.sh" "$stage/init" && chmod +x "$stage/init"
cp "$BIN" "$stage/bin/tpm-mmio-check"
strip "$stage/bin/tpm-mmio-check" 2>/dev/null || true
copy_libs "$stage" "$BIN"
pack_stage "$stage" "$OUT/initrd.gz"
echo "$stamp" > "$OUT/stamp"
