#!/usr/bin/env bash
# Builds a small Linux VM for QEMU from Debian 12 packages: the linux-image-amd64 kernel and an
# initramfs with busybox and tpm2-tools (the host's Debian binaries and their libraries). Its
# init uses the TPM QEMU gives it (/dev/tpm0, /dev/tpmrm0), prints results as XVTPM-VM lines on
# the serial console, and powers off. Cached: rebuilt only when an input changes.
# Usage: build-tpm-vm.sh OUTDIR   -> OUTDIR/vmlinuz, OUTDIR/initrd.gz
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: build-tpm-vm.sh OUTDIR}
mkdir -p "$OUT"
. "$HERE/debian-kernel.sh"
KPKG=$(kernel_package)
stamp="$KPKG $(sha256sum "$HERE/build-tpm-vm.sh" "$HERE/tpm-vm-init.sh" "$HERE/debian-kernel.sh" | cut -c1-16 | tr '\n' ' ') $(dpkg-query -W -f='${Version}' tpm2-tools busybox-static | tr '\n' ' ')"
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$stamp" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.gz" ]; then
    exit 0
fi

fetch_kernel "$OUT" "$KPKG"
grep -E '^CONFIG_TCG_(TPM|CRB|TIS)=' "$OUT"/kroot/boot/config-* > "$OUT/kernel-tpm-config.txt"

stage="$OUT/stage"
new_stage "$stage"
cp "$HERE/tpm-vm-init.sh" "$stage/init" && chmod +x "$stage/init"
# tpm2-tools is one multi-call binary; the device TCTI is loaded with dlopen, so add it and
# its dependencies explicitly.
tpm2=$(readlink -f "$(command -v tpm2)")
cp "$tpm2" "$stage/bin/tpm2"
for t in getrandom pcrextend pcrread createprimary getcap; do ln -sf tpm2 "$stage/bin/tpm2_$t"; done
copy_libs "$stage" "$tpm2" /usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0
# Loaded with dlopen, so not among tpm2's own libraries.
for l in /usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0 /usr/lib/x86_64-linux-gnu/libtss2-tctildr.so.0; do
    cp "$(readlink -f "$l")" "$stage/usr/lib/x86_64-linux-gnu/$(basename "$l")"
done
pack_stage "$stage" "$OUT/initrd.gz"
echo "$stamp" > "$OUT/stamp"
