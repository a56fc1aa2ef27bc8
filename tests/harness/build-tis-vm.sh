#!/usr/bin/env bash
# Builds the VM that drives QEMU's TPM devices through our MMIO driver: Debian 12's
# linux-image-amd64 kernel and an initramfs with busybox and the driver's check program
# (tpm-mmio-check, with the host's libraries it links). Its init runs the program against
# /dev/mem at 0xFED40000, prints XVTPM-TIS lines on the serial console and powers off.
# Usage: build-tis-vm.sh OUTDIR CHECK_BINARY   -> OUTDIR/vmlinuz, OUTDIR/initrd.gz
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: build-tis-vm.sh OUTDIR CHECK_BINARY}
BIN=${2:?usage: build-tis-vm.sh OUTDIR CHECK_BINARY}
mkdir -p "$OUT/debs"

resolve() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
KPKG=$(resolve)
if [ -z "$KPKG" ]; then
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && KPKG=$(resolve)
fi
[ -n "$KPKG" ] || { echo "cannot resolve linux-image-amd64 (apt-get update?)" >&2; exit 1; }
stamp="$KPKG $(sha256sum "$HERE/tis-vm-init.sh" "$BIN" | cut -c1-16 | tr '\n' ' ')"
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$stamp" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.gz" ]; then
    exit 0
fi

( cd "$OUT/debs" && { ls "${KPKG}"_*.deb >/dev/null 2>&1 || apt-get download "$KPKG" 2>&1 | grep -v unsandboxed || true; } )
deb=$(ls "$OUT/debs/${KPKG}"_*.deb | tail -1)
rm -rf "$OUT/kroot" && mkdir -p "$OUT/kroot"
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$OUT/kroot" ./boot
cp "$OUT"/kroot/boot/vmlinuz-* "$OUT/vmlinuz"
# What the test needs to know about this kernel: how its TPM drivers are built, and the names
# of their init functions (for initcall_blacklist=).
grep -E '^CONFIG_(TCG_(TPM|CRB|TIS)|STRICT_DEVMEM|IO_STRICT_DEVMEM)=' "$OUT"/kroot/boot/config-* > "$OUT/kernel-config.txt"
grep -E ' (init_tis|crb_acpi_driver_init|tpm_init)$' "$OUT"/kroot/boot/System.map-* > "$OUT/kernel-initcalls.txt" || true

stage="$OUT/stage"
rm -rf "$stage" && mkdir -p "$stage"/{bin,dev,proc,sys,tmp,lib64,usr/lib/x86_64-linux-gnu}
cp /bin/busybox "$stage/bin/busybox"
file -L "$stage/bin/busybox" | grep -q 'statically linked' || { echo "busybox is not static (install busybox-static)" >&2; exit 1; }
cp "$HERE/tis-vm-init.sh" "$stage/init" && chmod +x "$stage/init"
cp "$BIN" "$stage/bin/tpm-mmio-check"
strip "$stage/bin/tpm-mmio-check" 2>/dev/null || true
for l in $(ldd "$BIN" | awk '/=>/ {print $3}' | sort -u); do
    cp "$(readlink -f "$l")" "$stage/usr/lib/x86_64-linux-gnu/$(basename "$l")"
done
cp /lib64/ld-linux-x86-64.so.2 "$stage/lib64/"
ln -sf usr/lib "$stage/lib"
( cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1 > "$OUT/initrd.gz" )
echo "$stamp" > "$OUT/stamp"
