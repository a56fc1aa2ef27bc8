#!/usr/bin/env bash
# Builds a small Linux VM for QEMU from Debian 12 packages, for the container vTPMs: the
# linux-image-amd64 kernel with its tpm_vtpm_proxy module, and an initramfs with busybox,
# tpm2-tools, our vtpm and xvtpm (and the libraries they need). Its init
# (proxy-vm-init.sh) drives `xvtpm container`, prints XVTPM-VM lines on the serial console,
# and powers off. Cached: rebuilt only when an input changes.
# Usage: build-proxy-vm.sh OUTDIR BINDIR   (BINDIR holds vtpm and xvtpm)
#   -> OUTDIR/vmlinuz, OUTDIR/initrd.gz
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: build-proxy-vm.sh OUTDIR BINDIR}; BIN=${2:?usage: build-proxy-vm.sh OUTDIR BINDIR}
mkdir -p "$OUT"
. "$HERE/debian-kernel.sh"
KPKG=$(kernel_package); KVER=${KPKG#linux-image-}
stamp="$KPKG $(cat "$HERE/build-proxy-vm.sh" "$HERE/proxy-vm-init.sh" "$HERE/debian-kernel.sh" "$BIN/vtpm" "$BIN/xvtpm" | sha256sum | cut -c1-16) $(dpkg-query -W -f='${Version} ' tpm2-tools busybox-static libtpms0 libssl3)"
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$stamp" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.gz" ]; then
    exit 0
fi

fetch_kernel "$OUT" "$KPKG"
stage="$OUT/stage"
new_stage "$stage"
mkdir -p "$stage/lib/modules" "$stage/usr/bin" "$stage/run" "$stage/var/lib"
dpkg-deb --fsys-tarfile "$(ls "$OUT/debs/${KPKG}"_*.deb | tail -1)" \
    | tar -xO "./lib/modules/$KVER/kernel/drivers/char/tpm/tpm_vtpm_proxy.ko" > "$stage/lib/modules/tpm_vtpm_proxy.ko"
install -m 755 "$HERE/proxy-vm-init.sh" "$stage/init"
for b in vtpm xvtpm; do strip -o "$stage/usr/bin/$b" "$BIN/$b"; done
tpm2=$(readlink -f "$(command -v tpm2)")
cp "$tpm2" "$stage/usr/bin/tpm2"
for t in getrandom pcrextend pcrread createprimary evictcontrol readpublic nvdefine nvwrite nvread; do
    ln -sf tpm2 "$stage/usr/bin/tpm2_$t"
done
copy_libs "$stage" "$BIN/vtpm" "$BIN/xvtpm" "$tpm2" /usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0
# Loaded with dlopen, so not among tpm2's own libraries.
for l in /usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0 /usr/lib/x86_64-linux-gnu/libtss2-tctildr.so.0; do
    cp "$(readlink -f "$l")" "$stage/usr/lib/x86_64-linux-gnu/$(basename "$l")"
done
pack_stage "$stage" "$OUT/initrd.gz"
rm -rf "$stage" "$OUT/kroot"
echo "$stamp" > "$OUT/stamp"
