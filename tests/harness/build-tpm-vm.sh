#!/usr/bin/env bash
# Builds a small Linux VM for QEMU from Debian 12 packages: the linux-image-amd64 kernel and an
# initramfs with busybox and tpm2-tools (the host's Debian binaries and their libraries). Its
# init uses the TPM QEMU gives it (/dev/tpm0, /dev/tpmrm0), prints results as XVTPM-VM lines on
# the serial console, and powers off. Cached: rebuilt only when an input changes.
# Usage: build-tpm-vm.sh OUTDIR   -> OUTDIR/vmlinuz, OUTDIR/initrd.gz
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: build-tpm-vm.sh OUTDIR}
mkdir -p "$OUT/debs"

resolve() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
KPKG=$(resolve)
if [ -z "$KPKG" ]; then
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && KPKG=$(resolve)
fi
[ -n "$KPKG" ] || { echo "cannot resolve linux-image-amd64 (apt-get update?)" >&2; exit 1; }
stamp="$KPKG $(sha256sum "$HERE/tpm-vm-init.sh" | cut -c1-16) $(dpkg-query -W -f='${Version}' tpm2-tools busybox-static | tr '\n' ' ')"
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$stamp" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.gz" ]; then
    exit 0
fi

( cd "$OUT/debs" && { ls "${KPKG}"_*.deb >/dev/null 2>&1 || apt-get download "$KPKG" 2>&1 | grep -v unsandboxed || true; } )
deb=$(ls "$OUT/debs/${KPKG}"_*.deb | tail -1)
rm -rf "$OUT/kroot" && mkdir -p "$OUT/kroot"
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$OUT/kroot" ./boot
cp "$OUT"/kroot/boot/vmlinuz-* "$OUT/vmlinuz"
grep -E '^CONFIG_TCG_(TPM|CRB|TIS)=' "$OUT"/kroot/boot/config-* > "$OUT/kernel-tpm-config.txt"

stage="$OUT/stage"
rm -rf "$stage" && mkdir -p "$stage"/{bin,dev,proc,sys,tmp,lib64,usr/lib/x86_64-linux-gnu}
cp /bin/busybox "$stage/bin/busybox"
file -L "$stage/bin/busybox" | grep -q 'statically linked' || { echo "busybox is not static (install busybox-static)" >&2; exit 1; }
cp "$HERE/tpm-vm-init.sh" "$stage/init" && chmod +x "$stage/init"
# tpm2-tools is one multi-call binary; the device TCTI is loaded with dlopen, so add it and
# its dependencies explicitly.
tpm2=$(readlink -f "$(command -v tpm2)")
cp "$tpm2" "$stage/bin/tpm2"
for t in getrandom pcrextend pcrread createprimary getcap; do ln -sf tpm2 "$stage/bin/tpm2_$t"; done
libs=$( (ldd "$tpm2"; ldd /usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0) | awk '/=>/ {print $3} /ld-linux/ {print $1}' | sort -u)
for l in $libs /usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0 /usr/lib/x86_64-linux-gnu/libtss2-tctildr.so.0; do
    real=$(readlink -f "$l")
    dest="$stage/usr/lib/x86_64-linux-gnu/$(basename "$l")"
    cp "$real" "$dest"
done
cp /lib64/ld-linux-x86-64.so.2 "$stage/lib64/"
ln -sf usr/lib "$stage/lib"
( cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1 > "$OUT/initrd.gz" )
echo "$stamp" > "$OUT/stamp"
